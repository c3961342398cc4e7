"""SD3.5 and Flux: our flow loop against diffusers' own pipeline, the same folder and request, in one process.

    python bench/flow.py [--cases tiny-flux,tiny-sd3] [--runs 3] [--steps 28] [--size N] [--device cpu|cuda]
                         [--dtype float32|bfloat16|float16] [--offload none|model|sequential] [--models-dir DIR]

Cases: `tiny-sd3`, `tiny-flux` (the tests' tiny models, 64x64: a CPU smoke run) and the published-size random-weight
`sd35-medium`, `flux-dev` (bench/architectures.py, 1024x1024; Flux-dev needs ~33 GB of disk and memory in bf16).
Both sides run Euler on the model's schedule, CFG 4.5 for SD3.5 (two transformer rows per step) and Flux-dev's
distilled guidance 3.5 (one row). Reported per side: median seconds per image, seconds per step (between step
callbacks), peak memory (CUDA: max allocated; CPU: the process's peak RSS) and the largest pixel difference of the
two images. --offload applies to both sides (diffusers' enable_*_cpu_offload). Not a test: numbers go to
docs/benchmarks.md with the device.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from architectures import NATIVE_SIZE, build  # bench/ is the script's folder, so on sys.path
from sdstudio import Engine, GenerationRequest, Settings

PROMPT = "a red circle on a blue background"
CFG = {"sd3": 4.5, "flux": 1.0}


def folder_for(case: str, root: Path, dtype: torch.dtype, device: str) -> tuple[Path, str, int]:
    """The case's diffusers folder (built on first use), its family and its size."""
    from sdstudio.testing.tiny_flow import build_tiny_flux, build_tiny_sd3

    target = root / case
    if case == "tiny-sd3":
        return (target if target.exists() else build_tiny_sd3(target)), "sd3", 64
    if case == "tiny-flux":
        return (target if target.exists() else build_tiny_flux(target)), "flux", 64
    family = "flux" if case.startswith("flux") else "sd3"
    return build(case, target, dtype, device), family, NATIVE_SIZE[case]


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def timed(run, device: torch.device) -> tuple[float, float, np.ndarray]:
    """(seconds, median seconds per step, first image) of one call; `run(on_step)` calls on_step per step."""
    stamps: list[float] = []
    reset_peak(device)
    start = time.perf_counter()
    image = run(lambda: stamps.append(time.perf_counter()))
    if device.type == "cuda":
        torch.cuda.synchronize()
    steps = [b - a for a, b in pairwise(stamps)] or [0.0]
    return time.perf_counter() - start, statistics.median(steps), np.asarray(image.convert("RGB"))


def ours(folder: Path, family: str, size: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    home = Path(tempfile.mkdtemp())
    engine = Engine(Settings(home=home, outputs_dir=home / "out", models_dirs=(folder.parent,), device=device,
                             dtype=dtype, offload=args.offload))
    req = GenerationRequest(prompt=PROMPT, width=size, height=size, steps=args.steps, cfg_scale=CFG[family], seed=1,
                            model=folder.name, sampler="Euler")
    return lambda on_step: engine.generate(req, progress=lambda e: on_step()).images[0].image


def theirs(folder: Path, family: str, size: int, args: argparse.Namespace, device: torch.device,
           dtype: torch.dtype):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    pipe = (FluxPipeline if family == "flux" else StableDiffusion3Pipeline).from_pretrained(
        folder, dtype=dtype, local_files_only=True)
    if args.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif args.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    guidance = {"guidance_scale": 3.5} if family == "flux" else {"guidance_scale": CFG[family]}

    def run(on_step):
        def callback(pipe, i, t, kwargs):
            on_step()
            return kwargs
        return pipe(PROMPT, height=size, width=size, num_inference_steps=args.steps, **guidance,
                    generator=[torch.Generator("cpu").manual_seed(1)], callback_on_step_end=callback).images[0]
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="tiny-flux,tiny-sd3")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--offload", default="none", choices=["none", "model", "sequential"])
    parser.add_argument("--models-dir", type=Path, default=None)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    root = args.models_dir or Path(tempfile.mkdtemp())
    print(f"| case | side | s/image | s/step | peak GiB | max pixel diff |  ({device}, {args.dtype}, {args.steps} "
          f"steps, offload {args.offload})")
    for case in args.cases.split(","):
        folder, family, size = folder_for(case, root, dtype, args.device)
        size = args.size or size
        results = {}
        for side, make in (("ours", ours), ("diffusers", theirs)):
            run = make(folder, family, size, args, device, dtype)
            timed(run, device)  # warm-up
            samples = [timed(run, device) for _ in range(args.runs)]
            results[side] = (statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples),
                             peak_memory(device), samples[-1][2])
            del run
            if device.type == "cuda":
                torch.cuda.empty_cache()
        diff = int(np.abs(results["ours"][3].astype(int) - results["diffusers"][3].astype(int)).max())
        for side, (seconds, step, peak, _) in results.items():
            print(f"| {case} {size}x{size} | {side} | {seconds:.3f} | {step:.4f} | {peak / 2**30:.2f} | {diff} |")
        print(f"| {case} | ratio diffusers/ours | {results['diffusers'][0] / results['ours'][0]:.3f}x | | | |")


if __name__ == "__main__":
    main()
