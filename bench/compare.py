"""Our engine against the plain diffusers pipeline, the same request, in one process.

    python bench/compare.py [--cases demo,mid] [--runs 5] [--steps 20] [--batch 1] [--threads 2]
                            [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--size N]
                            [--offload none|model|sequential] [--compile none|unet|unet+vae]
                            [--compile-mode default|reduce-overhead|max-autotune] [--models-dir DIR]

Both sides load the same folder and run the same request (Euler, CFG 7, the same seed and size),
alternating ours/diffusers run by run after one warm-up each (excluded, but reported: it includes
torch.compile's compilation). Reported per side: median seconds per image, it/s, peak memory of the run
(CPU: the process's VmHWM, reset before each run; CUDA: max allocated), the raw call of that side's own
UNet on the loop's shapes, and the per-step time between consecutive step callbacks: the per-step
overhead is step / UNet - 1 (scheduler, CFG, hooks; encode and decode are outside the steps). The ratio
is diffusers' median time / ours (above 1: we are faster). The two images are compared too, so both sides
did the same work. --offload applies to both sides (diffusers' enable_*_cpu_offload); --compile to ours.

Cases: `demo` (the bundled model, 64x64) and the random-weight architectures of bench/architectures.py:
`mid` (256x256), `sd15` (512x512), `sdxl` (1024x1024); speed does not depend on weight values. They are
written to --models-dir (default: a temporary folder) on first use. Not a test: run it by hand; numbers
go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers

from architectures import NATIVE_SIZE, build  # bench/ is the script's folder, so on sys.path
from sdstudio import Engine, GenerationRequest, Settings
from sdstudio.settings import PACKAGED_MODELS

PROMPT = "a red circle on a blue background"


@dataclass(frozen=True)
class Case:
    name: str
    folder: Path
    size: int


@dataclass(frozen=True)
class Setup:
    device: torch.device
    dtype: torch.dtype
    steps: int
    batch: int
    offload: str = "none"
    compile: str = "none"
    compile_mode: str = "default"


@dataclass
class Run:
    seconds: float
    peak: int              # bytes: CUDA max allocated, or the process's peak RSS (both sides' models loaded)
    growth: int            # bytes: that peak minus the amount before the run
    step_seconds: float    # median time between consecutive step callbacks
    image: np.ndarray      # the first image, (H, W, 3) uint8


class Memory:
    """Peak memory of one run: CUDA's allocator on a GPU, else the process's resident set (Linux)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        return self._status("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM")

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        return 0


def timed(run: Callable[[Callable[[], None]], np.ndarray], memory: Memory) -> Run:
    """Time one generation; `run` gets a callback to call after every step."""
    stamps: list[float] = []
    sync = torch.cuda.synchronize if memory.cuda else (lambda: None)

    def on_step() -> None:
        sync()
        stamps.append(time.perf_counter())

    gc.collect()
    before = memory.reset()
    start = time.perf_counter()
    image = run(on_step)
    sync()
    seconds = time.perf_counter() - start
    gaps = np.diff(stamps) if len(stamps) > 1 else np.array([seconds])
    peak = memory.peak()
    return Run(seconds, peak, peak - before, float(np.median(gaps)), image)


def load_ours(case: Case, setup: Setup, home: Path) -> tuple[Engine, Callable[..., np.ndarray]]:
    """Our engine as a user runs it (defaults: channels_last on, prompt-encoding cache)."""
    settings = Settings.from_env(home=home, outputs_dir=home / "outputs", device=setup.device, dtype=setup.dtype,
                                 models_dirs=(case.folder.parent,))
    engine = Engine(replace(settings, offload=setup.offload, compile=setup.compile, compile_mode=setup.compile_mode))
    request = GenerationRequest(prompt=PROMPT, model=str(case.folder), steps=setup.steps, cfg_scale=7.0,
                                sampler="Euler", seed=1, width=case.size, height=case.size, batch_size=setup.batch)

    def run(on_step: Callable[[], None]) -> np.ndarray:
        result = engine.generate(request, progress=lambda event: on_step())
        return np.asarray(result.images[0].image.convert("RGB"))

    return engine, run


def load_diffusers(case: Case, setup: Setup) -> tuple[object, Callable[..., np.ndarray]]:
    """The pipeline as diffusers' documentation shows it, with the same scheduler as ours."""
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    index = json.loads((case.folder / "model_index.json").read_text())
    no_checker = {} if "XL" in index["_class_name"] else {"safety_checker": None, "requires_safety_checker": False}
    pipe = DiffusionPipeline.from_pretrained(case.folder, dtype=setup.dtype, local_files_only=True, **no_checker)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if setup.offload == "model":
        pipe.enable_model_cpu_offload(device=setup.device)
    elif setup.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=setup.device)
    else:
        pipe.to(setup.device)

    def run(on_step: Callable[[], None]) -> np.ndarray:
        def callback(pipeline, i, t, kwargs):
            on_step()
            return kwargs

        generator = torch.Generator().manual_seed(1)
        out = pipe(PROMPT, num_inference_steps=setup.steps, guidance_scale=7.0, height=case.size, width=case.size,
                   num_images_per_prompt=setup.batch, generator=generator, callback_on_step_end=callback)
        return np.asarray(out.images[0].convert("RGB"))

    return pipe, run


@torch.inference_mode()
def raw_unet_seconds(unet, case: Case, setup: Setup, repeats: int = 10) -> float:
    """Median time of one UNet call with CFG's doubled batch, the shapes the loop uses."""
    cfg, n = unet.config, 2 * setup.batch
    device, dtype = setup.device, next(unet.parameters()).dtype
    x = torch.randn(n, cfg.in_channels, case.size // 8, case.size // 8, device=device, dtype=dtype)
    context = torch.randn(n, 77, cfg.cross_attention_dim, device=device, dtype=dtype)
    extra = {}
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text and the six size/crop ids
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(n, pooled, device=device, dtype=dtype),
                                      "time_ids": torch.zeros(n, 6, device=device, dtype=dtype)}
    t = torch.tensor(500.0, device=device)
    memory = Memory(device)
    times = []
    for k in range(repeats + 1):
        memory.reset()
        start = time.perf_counter()
        unet(x, t, encoder_hidden_states=context, return_dict=False, **extra)
        memory.peak()  # synchronizes on CUDA
        if k:  # the first call warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(case: Case, setup: Setup, runs: int, home: Path) -> dict:
    engine, our_run = load_ours(case, setup, home)
    pipe, their_run = load_diffusers(case, setup)
    sides = {"sdstudio": our_run, "diffusers": their_run}
    memory = Memory(setup.device)
    warm = {}
    for name, run in sides.items():
        start = time.perf_counter()
        run(lambda: None)  # warm-up: first-call allocations, torch.compile's compilation
        warm[name] = time.perf_counter() - start
    results: dict[str, list[Run]] = {name: [] for name in sides}
    for _ in range(runs):
        for name, run in sides.items():
            results[name].append(timed(run, memory))
    unets = {"sdstudio": engine.load(str(case.folder)).unet, "diffusers": pipe.unet}
    report = {"case": case.name, "size": case.size, "setup": setup}
    for name, found in results.items():
        seconds = statistics.median(r.seconds for r in found)
        step = statistics.median(r.step_seconds for r in found)
        unet_s = raw_unet_seconds(unets[name], case, setup)
        report[name] = {"s_per_image": seconds / setup.batch, "seconds": seconds, "it_s": setup.steps / seconds,
                        "warm_up": warm[name], "unet_ms": unet_s * 1e3, "step_ms": step * 1e3,
                        "overhead_pct": (step / unet_s - 1) * 100, "peak_mib": max(r.peak for r in found) / 2**20,
                        "growth_mib": max(r.growth for r in found) / 2**20}
    report["ratio"] = report["diffusers"]["seconds"] / report["sdstudio"]["seconds"]
    a, b = results["sdstudio"][0].image.astype(int), results["diffusers"][0].image.astype(int)
    report["max_pixel_diff"] = int(np.abs(a - b).max()) if a.shape == b.shape else None
    return report


def show(r: dict) -> None:
    s: Setup = r["setup"]
    print(f"\n{r['case']}: {r['size']}x{r['size']}, {s.steps} steps, batch {s.batch}, {s.device.type}, "
          f"{str(s.dtype).removeprefix('torch.')}, offload {s.offload}, compile {s.compile} ({s.compile_mode}); "
          f"images differ by at most {r['max_pixel_diff']} of 255")
    print(f"{'':10} {'s/image':>9} {'it/s':>8} {'UNet ms':>9} {'step ms':>9} {'overhead':>9} {'peak':>10} "
          f"{'growth':>9} {'warm-up':>8}")
    for name in ("sdstudio", "diffusers"):
        v = r[name]
        print(f"{name:10} {v['s_per_image']:9.3f} {v['it_s']:8.2f} {v['unet_ms']:9.2f} {v['step_ms']:9.2f} "
              f"{v['overhead_pct']:8.1f}% {v['peak_mib']:6.0f} MiB {v['growth_mib']:5.0f} MiB {v['warm_up']:7.1f}s")
    print(f"ratio (diffusers time / ours): {r['ratio']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="demo,mid")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--size", type=int, default=None, help="instead of each case's native size")
    parser.add_argument("--offload", choices=("none", "model", "sequential"), default="none")
    parser.add_argument("--compile", choices=("none", "unet", "unet+vae"), default="none")
    parser.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune"), default="default")
    parser.add_argument("--models-dir", type=Path, default=None, help="keep the built models here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    setup = Setup(torch.device(args.device), getattr(torch, args.dtype), args.steps, args.batch, args.offload,
                  args.compile, args.compile_mode)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
          f"{args.threads} CPU threads, {args.runs} runs after one warm-up each")
    if setup.device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models_dir or Path(tmp) / "models"
        for name in args.cases.split(","):
            if name != "demo" and name not in NATIVE_SIZE:
                parser.error(f"unknown case {name!r}: use demo, {', '.join(NATIVE_SIZE)}")
            folder = PACKAGED_MODELS / "demo" if name == "demo" else build(name, models / name)
            case = Case(name, folder, args.size or NATIVE_SIZE.get(name, 64))
            show(compare(case, setup, args.runs, Path(tmp) / f"home-{name}"))


if __name__ == "__main__":
    main()
