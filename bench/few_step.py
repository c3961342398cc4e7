"""CPU time per image of a few-step run against a full one, through the engine: the demo model and the
random-weight `mid` architecture (bench/architectures.py), 20 steps of DPM++ 2M at CFG 7 (two UNet rows per
step) against 4 steps of each few-step preset (one row per step, CFG 1), and the full VAE against the tiny one.
On the demo the LCM preset runs with its LCM-LoRA (`<lora:lcm-lora-demo:1>`). Plain diffusers runs the 20-step and
the LCM run on the same folder in the same process, for the ratio. Weights are random for `mid`, so only the
times mean anything there.

    .venv/bin/python bench/few_step.py --models demo mid --repeat 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from architectures import build  # bench/ is the script's folder, so on sys.path
from sdstudio import Engine, GenerationRequest, Settings
from sdstudio.engine.presets import PRESETS, with_companion
from sdstudio.settings import PACKAGED_MODELS

RUNS = {"20 steps, DPM++ 2M, CFG 7": {"steps": 20, "sampler": "DPM++ 2M", "cfg_scale": 7.0},
        **{f"preset {name}": p.fields() for name, p in PRESETS.items() if name in ("lcm", "lightning", "tcd")},
        "preset turbo (1 step)": PRESETS["turbo"].fields()}


def model_folder(name: str, scratch: Path) -> Path:
    if name == "demo":
        return PACKAGED_MODELS / "demo"
    return build(name, scratch / name, torch.float32)


def seconds(engine: Engine, request: GenerationRequest, repeat: int) -> float:
    engine.generate(request)  # warm-up: loading, first-call kernels
    start = time.perf_counter()
    for i in range(repeat):
        engine.generate(request.replace(seed=i))
    return (time.perf_counter() - start) / repeat


def diffusers_seconds(folder: Path, lcm: bool, lora: Path | None, repeat: int) -> float:
    """Plain diffusers on the same folder: DPM++ 2M (DPMSolverMultistepScheduler) 20 steps at CFG 7, or
    LCMScheduler 4 steps at CFG 1 with the LoRA fused."""
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kind = LCMScheduler if lcm else DPMSolverMultistepScheduler
    pipe.scheduler = kind.from_config(pipe.scheduler.config)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        pipe.fuse_lora()
    size = 8 * pipe.unet.config.sample_size
    kwargs = {"num_inference_steps": 4 if lcm else 20, "guidance_scale": 1.0 if lcm else 7.0, "height": size,
              "width": size}

    def run(seed: int) -> None:
        pipe("a red circle on a blue background", generator=torch.Generator().manual_seed(seed), **kwargs)

    run(0)
    start = time.perf_counter()
    for i in range(repeat):
        run(i)
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo", "mid"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for name in args.models:
            folder = model_folder(name, scratch)
            engine = Engine(Settings.from_env(home=scratch / "home", device=torch.device("cpu"), dtype=torch.float32,
                                              default_model=str(folder)))
            base = GenerationRequest(prompt="a red circle on a blue background", seed=0)
            lora = engine.preset_lora("lcm")
            prompts = {"preset lcm": with_companion(base.prompt, lora)}
            times = {label: seconds(engine, base.replace(prompt=prompts.get(label, base.prompt), **fields),
                                    args.repeat) for label, fields in RUNS.items()}
            if (folder / "taesd").is_dir():
                times["preset lcm + tiny VAE"] = seconds(
                    engine, base.replace(prompt=prompts["preset lcm"], **PRESETS["lcm"].fields(), vae="taesd"),
                    args.repeat)
            lora_file = next((p for p in engine.addons.lora_files() if p.stem == lora), None)
            plain = {"20 steps, DPM++ 2M, CFG 7": diffusers_seconds(folder, False, None, args.repeat),
                     "preset lcm": diffusers_seconds(folder, True, lora_file, args.repeat)}
            full = times["20 steps, DPM++ 2M, CFG 7"]
            print(f"{name} ({torch.get_num_threads()} threads, s/image; LCM-LoRA: {lora or 'none'}):")
            for label, t in times.items():
                versus = f"   diffusers {plain[label]:7.3f} ({plain[label] / t:4.2f}x)" if label in plain else ""
                print(f"  {label:32s} {t:7.3f}   {full / t:5.1f}x faster than 20 steps{versus}")


if __name__ == "__main__":
    main()
