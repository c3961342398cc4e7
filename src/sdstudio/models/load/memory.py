"""Where a loaded model's weights live: on the device, or offloaded to the CPU for small GPUs.

none:       every component on the device (fastest).
model:      components on the CPU; each moves to the device when it runs and the previous one moves back
            (accelerate's `cpu_offload_with_hook`, as diffusers' `enable_model_cpu_offload`). Peak memory is
            about the largest component (the UNet) plus activations.
sequential: weights stream to the device one submodule at a time (accelerate's `cpu_offload`, as
            diffusers' `enable_sequential_cpu_offload`): the least memory, much slower.
On a CPU device the hooks still run (and are tested there) but save nothing: weights already live on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import torch

log = logging.getLogger(__name__)

OffloadMode = Literal["none", "model", "sequential"]
OFFLOAD_MODES: tuple[str, ...] = ("none", "model", "sequential")


ALIGNMENT = 64  # bytes: what PyTorch's CPU allocator gives every fresh tensor


def realign(module: torch.nn.Module) -> torch.nn.Module:
    """Give each weight that sits at an odd address inside a loaded file's buffer (safetensors memory maps,
    converted single files) storage of its own. CPU kernels vectorise differently by address (a scalar
    prologue until the first aligned element), so the same weights at other offsets sum in another order and
    differ in the last bits on some CPUs (AVX-512 without AMX): aligned, a folder and the same model as a
    single file compute identically."""
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % ALIGNMENT:
                tensor.data = tensor.data.clone()
    return module


def place(modules: Sequence[torch.nn.Module], device: torch.device, mode: str) -> str:
    """Put `modules` (in execution order: text encoders, UNet, VAE) on `device` per `mode`; returns the
    mode actually used."""
    if mode == "none":
        for module in modules:
            module.to(device)
        return mode
    from accelerate import cpu_offload, cpu_offload_with_hook

    if mode == "sequential":
        for module in modules:
            cpu_offload(module, execution_device=device)
        return mode
    previous = None
    for module in modules:
        _, previous = cpu_offload_with_hook(module, execution_device=device, prev_module_hook=previous)
    return mode


def device_of(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: an offload hook's execution device (sequential offload hooks sit on the
    submodules), else where its weights are."""
    for part in module.modules():
        hook_device = getattr(getattr(part, "_hf_hook", None), "execution_device", None)
        if hook_device is not None:
            return torch.device(hook_device)
    return next(module.parameters()).device


def module_bytes(modules: Sequence[torch.nn.Module]) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
