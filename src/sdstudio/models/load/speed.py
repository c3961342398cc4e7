"""Speed settings applied to a loaded model: memory format and torch.compile.

channels_last: UNet and VAE convolution weights in NHWC order, which oneDNN (CPU) and cuDNN (GPU, fp16
    tensor cores) run faster than NCHW: on 2 CPU cores the demo UNet 1.18x and an SD VAE decode 1.1x, a
    mid-size UNet unchanged (docs/benchmarks.md). The same convolutions, summed in another order.
compile: "none", "unet" or "unet+vae" (the VAE decoder): `torch.compile` in place, so the modules keep
    their class, config and parameters (LoRA weights can still be patched). The first call with a new shape
    compiles (tens of seconds on a CPU), so it pays off only over many images: a server, a batch job.
compile_mode: torch.compile's mode: "default", "reduce-overhead" (CUDA graphs of the compiled step on a
    GPU) or "max-autotune".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

COMPILE_TARGETS = ("none", "unet", "unet+vae")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class SpeedOptions:
    channels_last: bool = True
    compile: str = "none"
    compile_mode: str = "default"
    batch_invariant: str = "auto"  # auto (on CPU) | on | off: the UNet image by image (engine/sd/rows.py)

    def __post_init__(self) -> None:
        if self.batch_invariant not in ("auto", "on", "off"):
            raise ValueError(f"batch_invariant must be auto, on or off, got {self.batch_invariant!r}")
        if self.compile not in COMPILE_TARGETS:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_TARGETS)}, got {self.compile!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")


def apply_speed(unet: torch.nn.Module, vae: torch.nn.Module, options: SpeedOptions) -> None:
    """Before placement on the device (offload hooks move weights with their memory format)."""
    if options.channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if options.compile != "none":
        log.info("compiling the UNet%s (mode %s) on first use", " and VAE decoder" * ("vae" in options.compile),
                 options.compile_mode)
        unet.compile(mode=options.compile_mode)
        if "vae" in options.compile:
            vae.decoder.compile(mode=options.compile_mode)
