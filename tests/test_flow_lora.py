"""LoRAs on SD3 and Flux: kohya and PEFT layouts, merged for the job like diffusers' adapters compute them,
restored bit-exactly, and reported."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import save_file

from sdstudio import Engine, GenerationRequest
from sdstudio.errors import ModelError
from tests.conftest import make_settings
from tests.test_parity import SEED, assert_close_latents, generators

RANK = 4


def _pair(g: torch.Generator, out: int, inn: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(RANK, inn, generator=g) * 0.2, torch.randn(out, RANK, generator=g) * 0.2


def kohya_flux_lora(hidden: int = 128, clip: int = 64, text_encoder: bool = False) -> dict[str, torch.Tensor]:
    """sd-scripts' Flux LoRA layout (networks/lora_flux.py names), with alphas. The single blocks' fused linear1
    is left out: diffusers' converter splits it at the published widths (3072 + 12288) only."""
    g, sd = torch.Generator().manual_seed(1), {}
    layers = [("lora_unet_double_blocks_0_img_attn_qkv", 3 * hidden, hidden),
              ("lora_unet_double_blocks_0_txt_mlp_0", 4 * hidden, hidden),
              ("lora_unet_single_blocks_0_linear2", hidden, 5 * hidden)]
    if text_encoder:
        layers.append(("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", clip, clip))
    for name, out, inn in layers:
        down, up = _pair(g, out, inn)
        sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)})
    return sd


def peft_lora(modules: list[tuple[str, int, int]], seed: int) -> dict[str, torch.Tensor]:
    """diffusers' own (PEFT) names: <component>.<module>.lora_A/B.weight."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for name, out, inn in modules:
        down, up = _pair(g, out, inn)
        sd.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
    return sd


@pytest.fixture(scope="module")
def lora_engine(flow_models, tmp_path_factory):
    home = tmp_path_factory.mktemp("flow-lora-home")
    lora = home / "lora"
    lora.mkdir()
    save_file(kohya_flux_lora(), str(lora / "kohya-flux.safetensors"))
    save_file(kohya_flux_lora(text_encoder=True), str(lora / "kohya-flux-te.safetensors"))
    save_file(peft_lora([("transformer.single_transformer_blocks.0.attn.to_k", 128, 128),
                         ("transformer.transformer_blocks.0.ff.net.2", 128, 512)], 2),
              str(lora / "peft-flux.safetensors"))
    save_file(peft_lora([("transformer.transformer_blocks.0.attn.to_q", 64, 64),
                         ("transformer.transformer_blocks.0.ff_context.net.0.proj", 256, 64)], 3),
              str(lora / "peft-sd3.safetensors"))
    save_file(peft_lora([("text_encoder_2.text_model.encoder.layers.1.mlp.fc1", 256, 128)], 4),
              str(lora / "peft-sd3-te.safetensors"))
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)},
              str(lora / "sd15-style.safetensors"))
    return Engine(make_settings(home, flow_models)), lora


CASES = [("tiny-flux-dev", FluxPipeline, "kohya-flux", 0.8, 1.0),
         ("tiny-flux-dev", FluxPipeline, "peft-flux", 1.0, 1.0),
         ("tiny-sd3", StableDiffusion3Pipeline, "peft-sd3", 0.7, 4.0)]


@pytest.mark.parametrize(("model", "cls", "lora", "weight", "cfg"), CASES)
def test_lora_matches_diffusers_adapters(lora_engine, flow_models, model, cls, lora, weight, cfg):
    engine, folder = lora_engine
    prompt = "a small red circle"
    result = engine.generate(GenerationRequest(prompt=f"{prompt} <lora:{lora}:{weight}>", width=64, height=64,
                                               steps=3, cfg_scale=cfg, seed=SEED, model=model))
    assert "Lora hashes" in result.images[0].infotext
    pipe = cls.from_pretrained(flow_models / model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(folder / f"{lora}.safetensors"))  # naming the adapter breaks its text encoders' load
    pipe.set_adapters(["default_0"], [weight])
    extra = {"guidance_scale": cfg} if cls is StableDiffusion3Pipeline else {"guidance_scale": 3.5}
    ref = pipe(prompt=prompt, width=64, height=64, num_inference_steps=3, generator=generators(1),
               output_type="latent", **extra).images
    if ref.ndim == 3:
        from sdstudio.engine.flow.latents import unpack

        ref = unpack(ref, 8, 8)
    without = engine.generate(GenerationRequest(prompt=prompt, width=64, height=64, steps=3, cfg_scale=cfg, seed=SEED,
                                                model=model)).latents
    assert not torch.allclose(without, ref, atol=1e-3)  # the LoRA changes the picture...
    assert_close_latents(result.latents, ref)            # ...as diffusers' adapter layers do


# diffusers 0.42 cannot load these files' text-encoder layers ("Could not automatically infer state dict type"), so
# the parity above uses transformer-only files; the text-encoder layers are checked here: they change the text
# encoder's output (kohya's te1 for Flux, PEFT's text_encoder_2 for SD3) and are taken out after the job.
@pytest.mark.parametrize(("model", "lora", "slot"), [("tiny-flux-dev", "kohya-flux-te", 0),
                                                     ("tiny-sd3", "peft-sd3-te", 1)])
def test_text_encoder_layers_apply_and_restore(lora_engine, model, lora, slot):
    engine, _ = lora_engine
    loaded = engine.families.get("flow").models.get(engine.model_ref(model))
    encoder = loaded.clip[slot].encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    seen = []
    hook = encoder.register_forward_hook(lambda m, a, out: seen.append(out[0].detach().clone()))
    try:
        for prompt in ("x", f"x <lora:{lora}:1>"):
            engine.generate(GenerationRequest(prompt=prompt, width=64, height=64, steps=1, cfg_scale=1.0, seed=1,
                                              model=model))
    finally:
        hook.remove()
    assert not torch.allclose(seen[0], seen[-1], atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_weights_are_restored_bit_exactly(lora_engine):
    engine, _ = lora_engine
    model = engine.families.get("flow").models.get(engine.model_ref("tiny-flux-dev"))
    before = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    clip_before = {k: v.clone() for k, v in model.clip[0].encoder.state_dict().items()}
    engine.generate(GenerationRequest(prompt="x <lora:kohya-flux:1> <lora:peft-flux:0.5>", width=64, height=64,
                                      steps=1, cfg_scale=1.0, model="tiny-flux-dev"))
    assert all(torch.equal(before[k], v) for k, v in model.transformer.state_dict().items())
    assert all(torch.equal(clip_before[k], v) for k, v in model.clip[0].encoder.state_dict().items())


def test_a_lora_for_another_family_is_named(lora_engine):
    engine, _ = lora_engine
    with pytest.raises(ModelError, match="matches nothing"):
        engine.generate(GenerationRequest(prompt="x <lora:sd15-style:1>", width=64, height=64, steps=1,
                                          cfg_scale=1.0, model="tiny-flux-dev"))


def test_unknown_lora_is_refused_before_loading(lora_engine):
    engine, _ = lora_engine
    from sdstudio.errors import RequestError

    with pytest.raises(RequestError, match="unknown LoRA 'nope'"):
        engine.prepare(GenerationRequest(prompt="x <lora:nope:1>", model="tiny-flux-dev"))


def test_kohya_sd3_lora_matches_its_diffusers_layout(lora_engine, flow_models, tmp_path):
    """sd-scripts' SD3 layout (MMDiT names, fused qkv, alpha; the last block's context modulation and the final
    layer's stored (shift, scale)) against the same layers written in diffusers' names and run by diffusers."""
    engine, folder = lora_engine
    g, kohya, peft = torch.Generator().manual_seed(7), {}, {}
    layers = [("joint_blocks_0_x_block_attn_qkv", ["attn.to_q", "attn.to_k", "attn.to_v"], 64, 0),
              ("joint_blocks_0_x_block_attn2_qkv", ["attn2.to_q", "attn2.to_k", "attn2.to_v"], 64, 0),
              ("joint_blocks_0_context_block_mlp_fc1", ["ff_context.net.0.proj"], 256, 0),
              ("joint_blocks_1_context_block_adaLN_modulation_1", ["norm1_context.linear"], 128, 1),
              ("final_layer_adaLN_modulation_1", ["norm_out.linear"], 128, None)]
    for name, targets, rows, block in layers:
        down, up = _pair(g, rows * (3 if len(targets) == 3 else 1), 64)
        kohya.update({f"lora_unet_{name}.lora_down.weight": down, f"lora_unet_{name}.lora_up.weight": up,
                      f"lora_unet_{name}.alpha": torch.tensor(2.0)})
        if name.endswith("adaLN_modulation_1"):  # diffusers keeps (scale, shift) where MMDiT keeps (shift, scale)
            up = torch.cat(up.chunk(2)[::-1])
        prefix = f"transformer.transformer_blocks.{block}." if block is not None else "transformer."
        for target, piece in zip(targets, up.chunk(len(targets)), strict=True):
            peft.update({f"{prefix}{target}.lora_A.weight": down * (2.0 / RANK),  # alpha / rank folded in
                         f"{prefix}{target}.lora_B.weight": piece})
    save_file(kohya, str(folder / "kohya-sd3.safetensors"))
    save_file(peft, str(tmp_path / "peft-equivalent.safetensors"))
    result = engine.generate(GenerationRequest(prompt="a small red circle <lora:kohya-sd3:1>", width=64, height=64,
                                               steps=3, cfg_scale=4.0, seed=SEED, model="tiny-sd3"))
    pipe = StableDiffusion3Pipeline.from_pretrained(flow_models / "tiny-sd3", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path / "peft-equivalent.safetensors"))
    ref = pipe(prompt="a small red circle", width=64, height=64, num_inference_steps=3, guidance_scale=4.0,
               generator=generators(1), output_type="latent").images
    assert_close_latents(result.latents, ref)
    assert not any("partial" in w or "only part" in w for w in result.warnings)
