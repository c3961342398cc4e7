"""LoRA files for SD3 and Flux, read into the same LoraFile the merge code applies (lora.py).

diffusers reads the layouts these LoRAs ship in and converts them to its PEFT names (`transformer.<module>.lora_A/B`,
`text_encoder[_2].<module>...`): for Flux, kohya/sd-scripts (`lora_unet_double_blocks_0_img_attn_qkv...`, fused
q/k/v split per projection, alpha folded into the weights), XLabs and ComfyUI/BFL files; for SD3, the PEFT layout its
trainers write. The converted layers then merge into the transformer and the CLIP encoders for one job and are
restored bit-exactly afterwards, with the same pre-flight report as Stable Diffusion's LoRAs.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from sdstudio.errors import ModelError
from sdstudio.models.addons.lora import LoraFile, lora_from_state_dict, lora_sha256
from sdstudio.models.addons.lora_plan import guess_family
from sdstudio.models.load.checkpoint_io import read_metadata, read_state_dict
from sdstudio.models.load.flow import FAMILY_NAMES


def read_flow_lora(path: Path, family: str) -> LoraFile:
    """A LoRA for an SD3 ('sd3') or Flux ('flux') model, in diffusers' names (alphas kept as `.alpha` keys)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    state_dict, metadata = read_state_dict(path), read_metadata(path)
    try:
        if family == "flux":
            converted, alphas = FluxPipeline.lora_state_dict(dict(state_dict), return_alphas=True)
        else:
            converted, alphas = StableDiffusion3Pipeline.lora_state_dict(dict(state_dict)), {}
    except (KeyError, ValueError, RuntimeError, AssertionError) as e:
        raw = lora_from_state_dict(path.stem, state_dict, metadata=metadata)
        raise ModelError(f"LoRA {path.stem!r} matches nothing in this {FAMILY_NAMES[family]} model: it looks like "
                         f"{guess_family(raw)} ({str(e).strip().splitlines()[0]})") from None
    merged: dict[str, Tensor] = {**converted, **(alphas or {})}
    return lora_from_state_dict(path.stem, merged, metadata=metadata, path=path, sha256=lora_sha256(path, metadata))
