"""CPU time per image of a few-step run against a full one, through the engine: the demo model and the
random-weight `mid` architecture (bench/architectures.py), 20 steps of DPM++ 2M at CFG 7 (two UNet rows per
step) against 4 steps of each few-step preset (one row per step, CFG 1), and the full VAE against the tiny one.
Weights are random for `mid`, so only the times mean anything there.

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
from sdstudio.engine.presets import PRESETS
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
            times = {label: seconds(engine, base.replace(**fields), args.repeat) for label, fields in RUNS.items()}
            if (folder / "taesd").is_dir():
                times["preset lcm + tiny VAE"] = seconds(engine, base.replace(**PRESETS["lcm"].fields(), vae="taesd"),
                                                         args.repeat)
            full = times["20 steps, DPM++ 2M, CFG 7"]
            print(f"{name} ({torch.get_num_threads()} threads, s/image):")
            for label, t in times.items():
                print(f"  {label:32s} {t:7.3f}   {full / t:5.1f}x faster than 20 steps")


if __name__ == "__main__":
    main()
