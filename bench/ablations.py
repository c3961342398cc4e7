"""Each optimisation on its own, before and after, on the CPU (or the device given).

    python bench/ablations.py [--model demo|mid|sd15] [--repeats 10] [--threads 2] [--device cpu] [--skip-compile]
                              [--sections unet,engine,tiling] [--tiling-size 1024]

UNet level (one call with CFG's doubled batch, median of --repeats, after a warm-up): SDPA against
diffusers' classic attention, channels_last, bfloat16, one batched CFG call against two batch-1 calls,
torch.compile (its compile time too). The UNet's FLOPs per call are counted (torch.utils.flop_counter) to
give the achieved rate. Engine level: the same request with a progress callback that never asks for a
preview against one that renders it every step, and a new prompt against a repeated one (the prompt-encoding
cache). Tiling: one VAE decode at --tiling-size with and without diffusers' tiling, time and peak memory.
`mid` and `sd15` are random-weight SD architectures (bench/architectures.py).
Not a test: run it by hand; numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from architectures import NATIVE_SIZE, build  # bench/ is the script's folder, so on sys.path
from sdstudio import Engine, GenerationRequest, Settings
from sdstudio.settings import PACKAGED_MODELS


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    with torch.inference_mode():
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def unet_ablations(folder: Path, size: int, repeats: int, device: torch.device, compile_too: bool) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=torch.float32).eval().to(device)
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, size // 8, size // 8, device=device)
    context = torch.randn(2, 77, cfg.cross_attention_dim, device=device)
    t = torch.tensor(500.0, device=device)

    def call(model=unet, xs=x, ctx=context):
        return model(xs, t, encoder_hidden_states=ctx, return_dict=False)

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        call()
    flops = counter.get_total_flops()
    rows = [("SDPA attention (our default)", median_ms(call, repeats))]
    unet.set_attn_processor(AttnProcessor())
    rows.append(("classic attention (no SDPA)", median_ms(call, repeats)))
    unet.set_attn_processor(AttnProcessor2_0())
    unet.to(memory_format=torch.channels_last)
    rows.append(("channels_last (our default)", median_ms(call, repeats)))
    half = x[:1], context[:1]
    rows.append(("CFG as two batch-1 calls", median_ms(lambda: (call(unet, *half), call(unet, *half)), repeats)))
    low = torch.float16 if device.type == "cuda" else torch.bfloat16
    unet.to(low)
    rows.append((str(low).removeprefix("torch."), median_ms(lambda: call(unet, x.to(low), context.to(low)), repeats)))
    unet.to(torch.float32)
    if compile_too:
        unet.compile()
        start = time.perf_counter()
        with torch.inference_mode():
            call()
        rows.append((f"torch.compile (compiling took {time.perf_counter() - start:.0f} s)", median_ms(call, repeats)))
    base = rows[0][1]
    print(f"\nUNet call, batch 2 (CFG), {size}x{size}: {flops / 1e9:.1f} GFLOP per call")
    for name, ms in rows:
        print(f"  {name:45} {ms:9.2f} ms  {base / ms:5.2f}x  {flops / ms / 1e6:7.1f} GFLOP/s")


def engine_ablations(folder: Path, size: int, home: Path, device: torch.device, repeats: int) -> None:
    engine = Engine(Settings.from_env(home=home, outputs_dir=home / "out", device=device, dtype=torch.float32,
                                      models_dirs=(folder.parent,)))
    request = GenerationRequest(prompt="a red circle on a blue background", model=str(folder), steps=20,
                                sampler="Euler", seed=1, width=size, height=size)

    def seconds(req: GenerationRequest, progress=None) -> float:
        start = time.perf_counter()
        engine.generate(req, progress=progress)
        return time.perf_counter() - start

    seconds(request)  # load and warm up
    runs = max(3, repeats // 3)
    quiet = statistics.median(seconds(request, lambda e: None) for _ in range(runs))
    watched = statistics.median(seconds(request, lambda e: e.preview()) for _ in range(runs))
    print(f"\nEngine, {size}x{size}, 20 steps: progress events without previews {quiet:.3f} s, "
          f"rendering a preview every step {watched:.3f} s ({(watched / quiet - 1) * 100:+.1f}%)")
    repeated = statistics.median(seconds(request) for _ in range(runs))
    fresh = statistics.median(seconds(request.replace(prompt=f"a red circle number {k}")) for k in range(runs))
    print(f"Prompt encoding cache: a repeated prompt {repeated:.3f} s, a new prompt {fresh:.3f} s "
          f"({(fresh - repeated) * 1e3:.1f} ms saved per job)")


def vae_tiling(folder: Path, size: int, device: torch.device) -> None:
    """Decode latents of a size x size image with and without diffusers' VAE tiling: time and peak memory."""
    from diffusers import AutoencoderKL

    from compare import Memory

    vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32).eval().to(device)
    vae.to(memory_format=torch.channels_last)
    z = torch.randn(1, vae.config.latent_channels, size // 8, size // 8, device=device)
    memory = Memory(device)
    print(f"\nVAE decode to {size}x{size}:")
    for tiled in (False, True):
        vae.enable_tiling() if tiled else vae.disable_tiling()
        with torch.inference_mode():
            before = memory.reset()
            start = time.perf_counter()
            vae.decode(z)
            peak = memory.peak()
        print(f"  {'tiled' if tiled else 'whole':6} {time.perf_counter() - start:7.2f} s, "
              f"peak {peak / 2**20:6.0f} MiB ({(peak - before) / 2**20:+.0f} MiB during the decode)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("demo", "mid", "sd15"), default="demo")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--sections", default="unet,engine", help="any of unet, engine, tiling")
    parser.add_argument("--tiling-size", type=int, default=1024, help="the image size the tiling section decodes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {args.device}, {args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        folder, size = (PACKAGED_MODELS / "demo", 64) if args.model == "demo" else \
            (build(args.model, Path(tmp) / "models" / args.model), NATIVE_SIZE[args.model])
        sections = args.sections.split(",")
        if "unet" in sections:
            unet_ablations(folder, size, args.repeats, device, not args.skip_compile)
        if "engine" in sections:
            engine_ablations(folder, size, Path(tmp) / "home", device, args.repeats)
        if "tiling" in sections:
            vae_tiling(folder, args.tiling_size, device)


if __name__ == "__main__":
    main()
