"""Diffusers <-> original (LDM/SGM) single-file layout, for every family, on tiny seeded models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors.torch import load_file, save_file

from sdstudio.errors import ModelError
from sdstudio.models.load.ldm_layout import has_component
from sdstudio.models.tools.convert import (
    LDM_LAYOUTS,
    from_ldm,
    meta_model,
    read_component_weights,
    read_family_from_folder,
    read_single_file_info,
    to_ldm,
    write_single_file,
)
from sdstudio.testing.tiny import FAMILIES, TE1_WIDTH, TE2_WIDTH, build_tiny

PIPELINES = {"sd1": "StableDiffusionPipeline", "sd1-inpaint": "StableDiffusionInpaintPipeline",
             "sd2": "StableDiffusionPipeline", "sd2-v": "StableDiffusionPipeline",
             "sd2-inpaint": "StableDiffusionInpaintPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline", "sdxl-inpaint": "StableDiffusionXLInpaintPipeline"}
# What diffusers' own detector says about our exports. SD2's test is the context width (1024), which the
# tiny models do not have: they read as SD1 (v2 is checked at real widths in test_real_geometry).
DETECTED = {"sd1": "v1", "sd1-inpaint": "inpainting", "sd2": "v1", "sd2-v": "v1", "sd2-inpaint": "inpainting",
            "sdxl": "xl_base", "sdxl-refiner": "xl_refiner", "sdxl-inpaint": "xl_inpaint"}
# Known original key names, with the rank of their tensors, per family (U: the UNet's prefix).
U, TE, G = "model.diffusion_model.", "cond_stage_model.", "conditioner.embedders."
KNOWN_KEYS = {
    "sd1": {U + "input_blocks.0.0.weight": 4, U + "input_blocks.1.1.proj_in.weight": 4,
            U + "output_blocks.1.1.conv.weight": 4, U + "middle_block.2.out_layers.3.bias": 1,
            "first_stage_model.decoder.mid.attn_1.q.weight": 4,
            "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": 4,
            TE + "transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": 2},
    "sd2": {U + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": 2, U + "input_blocks.1.1.proj_in.weight": 2,
            U + "output_blocks.5.2.conv.weight": 4, TE + "model.transformer.resblocks.0.attn.in_proj_weight": 2,
            TE + "model.positional_embedding": 2, TE + "model.ln_final.weight": 1},
    "sdxl": {U + "label_emb.0.0.weight": 2, U + "label_emb.0.2.bias": 1, U + "output_blocks.2.2.conv.weight": 4,
             U + "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": 2,
             G + "0.transformer.text_model.final_layer_norm.weight": 1,
             G + "1.model.transformer.resblocks.0.attn.in_proj_weight": 2,
             G + "1.model.transformer.resblocks.9.mlp.c_proj.bias": 1, G + "1.model.text_projection": 2},
    "sdxl-refiner": {G + "0.model.text_projection": 2, U + "label_emb.0.0.weight": 2},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: build_tiny(family, root / family, seed=i) for i, family in enumerate(FAMILIES)}


def components(folder: Path, family: str) -> tuple[dict, dict]:
    """({name: state dict}, {name: config}) of the weight components a folder has."""
    names = [n for n in LDM_LAYOUTS[family] if has_component(folder, n)]
    return ({n: read_component_weights(folder / n) for n in names},
            {n: json.loads((folder / n / "config.json").read_text()) for n in names})


def assert_equal_components(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys(), name
        for key, value in want[name].items():
            assert got[name][key].dtype == value.dtype and torch.equal(got[name][key], value), f"{name}.{key}"


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_folder_loads_with_its_pipeline_and_reads_as_its_family(tiny, family):
    folder = tiny[family]
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(folder)
    assert type(pipe).__name__ == PIPELINES[family]
    assert read_family_from_folder(folder) == family
    if family != "sd1":  # sd1 is build_tiny_sd's model, which other tests rely on as it is
        assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 2.2e6
    if family.startswith("sdxl"):
        assert pipe.text_encoder_2.config.hidden_size == TE2_WIDTH and pipe.tokenizer_2.pad_token == "!"
        assert (pipe.text_encoder is None) == (family == "sdxl-refiner")
    if family in ("sdxl", "sdxl-inpaint"):
        assert pipe.text_encoder.config.hidden_size == TE1_WIDTH
        assert pipe.unet.config.cross_attention_dim == TE1_WIDTH + TE2_WIDTH
    assert pipe.unet.config.in_channels == (9 if family.endswith("inpaint") else 4)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact_with_original_key_names(tiny, family):
    weights, configs = components(tiny[family], family)
    ldm = to_ldm(weights, family)
    assert_equal_components(from_ldm(ldm, family, configs), weights)
    assert infer_diffusers_model_type(ldm) == DETECTED[family]
    for key, rank in KNOWN_KEYS.get(family.removesuffix("-v").removesuffix("-inpaint"), {}).items():
        assert ldm[key].ndim == rank, key


def test_sd2_export_adds_an_identity_last_layer(tiny):
    weights, configs = components(tiny["sd2"], "sd2")
    ldm = to_ldm(weights, "sd2")
    n = configs["text_encoder"]["num_hidden_layers"]
    extra = {k: v for k, v in ldm.items() if f".resblocks.{n}." in k}
    assert len(extra) == 12 and all(not v.any() for v in extra.values())  # all zero: x -> x
    assert torch.equal(ldm["cond_stage_model.model.text_projection"], torch.eye(32))


def test_single_file_in_half_precision_carries_its_architecture(tiny, tmp_path):
    out = write_single_file(tiny["sdxl"], tmp_path / "xl.safetensors", dtype=torch.float16)
    info = read_single_file_info(out)
    assert info is not None and info.family == "sdxl"
    assert info.scheduler is not None and info.scheduler["_class_name"] == "EulerDiscreteScheduler"
    weights, configs = components(tiny["sdxl"], "sdxl")
    assert info.components == configs and info.configs["options"] == {"force_zeros_for_empty_prompt": True}
    half = {n: {k: v.half() for k, v in sd.items()} for n, sd in weights.items()}
    assert_equal_components(from_ldm(load_file(out), "sdxl", info.configs), half)  # extra entries ignored


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl-refiner"])
def test_diffusers_single_file_loader_reads_our_export(tiny, tmp_path, family):
    out = write_single_file(tiny[family], tmp_path / f"{family}.safetensors")
    pipe = getattr(diffusers, PIPELINES[family]).from_single_file(
        str(out), config=str(tiny[family]), local_files_only=True)
    weights, _ = components(tiny[family], family)
    got = {n: getattr(pipe, n).state_dict() for n in weights}
    assert_equal_components(got, weights)


def test_a_folder_with_a_missing_weight_is_refused(tiny, tmp_path):
    folder = shutil.copytree(tiny["sd1"], tmp_path / "broken")
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    del sd["mid_block.attentions.0.proj_in.weight"]
    save_file(sd, path)
    with pytest.raises(ModelError, match=r"1 missing: mid_block\.attentions\.0\.proj_in\.weight"):
        write_single_file(folder, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.fixture(scope="module")
def xl(tiny) -> tuple[dict, dict]:
    weights, configs = components(tiny["sdxl"], "sdxl")
    return to_ldm(weights, "sdxl"), configs


def test_a_missing_or_unexpected_checkpoint_weight_is_named(xl):
    ldm, configs = xl
    key = "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"
    with pytest.raises(ModelError, match=rf"text_encoder_2 .*1 missing: {key}"):
        from_ldm({k: v for k, v in ldm.items() if k != key}, "sdxl", configs)
    stray = "model.diffusion_model.input_blocks.99.0.in_layers.0.weight"
    with pytest.raises(ModelError, match=rf"unet .*1 unexpected: {stray}"):
        from_ldm({**ldm, stray: torch.zeros(1)}, "sdxl", configs)


def test_weights_without_a_config_and_configs_without_weights_are_errors(xl):
    ldm, configs = xl
    with pytest.raises(ModelError, match="text_encoder_2 weights but no config"):
        from_ldm(ldm, "sdxl", {k: v for k, v in configs.items() if k != "text_encoder_2"})
    no_vae = {k: v for k, v in ldm.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(ModelError, match="no vae weights"):
        from_ldm(no_vae, "sdxl", configs)
    assert from_ldm(no_vae, "sdxl", {k: v for k, v in configs.items() if k != "vae"}).keys() == {
        "unet", "text_encoder", "text_encoder_2"}


def test_wrong_config_and_family_are_errors(xl):
    ldm, configs = xl
    wider = {**configs, "text_encoder": {**configs["text_encoder"], "hidden_size": 64, "intermediate_size": 128}}
    with pytest.raises(ModelError, match="other shapes"):
        from_ldm(ldm, "sdxl", wider)
    with pytest.raises(ModelError, match="unknown model family 'sd3'"):
        from_ldm(ldm, "sd3", configs)
    with pytest.raises(ModelError, match="has no component"):
        to_ldm({"text_encoder_3": {}}, "sdxl")


# Real architectures (the published configs' geometry), built on the meta device: names and shapes only.
UNET_SD1 = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "attention_head_dim": 8}
UNET_SD2 = {**UNET_SD1, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True}
UNET_XL = {"block_out_channels": [320, 640, 1280], "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10],
           "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
           "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 2048,
           "attention_head_dim": [5, 10, 20], "use_linear_projection": True, "addition_embed_type": "text_time",
           "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}
UNET_REFINER = {**UNET_XL, "block_out_channels": [384, 768, 1536, 1536], "transformer_layers_per_block": 4,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "cross_attention_dim": 1280, "attention_head_dim": [6, 12, 24, 24],
                "projection_class_embeddings_input_dim": 2560}
VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
CLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
          "hidden_act": "gelu"}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "hidden_act": "gelu", "projection_dim": 1280, "architectures": ["CLIPTextModelWithProjection"]}
REAL = {  # family: (configs, diffusers' detection, LDM key count without position_ids / logit_scale)
    "sd1": ({"unet": UNET_SD1, "vae": VAE, "text_encoder": CLIP_L}, "v1", 1130),
    "sd2": ({"unet": UNET_SD2, "vae": VAE, "text_encoder": CLIP_H}, "v2", 1227),
    "sd2-inpaint": ({"unet": {**UNET_SD2, "in_channels": 9}, "vae": VAE, "text_encoder": CLIP_H},
                    "inpainting_v2", 1227),
    "sdxl": ({"unet": UNET_XL, "vae": VAE, "text_encoder": CLIP_L, "text_encoder_2": CLIP_G}, "xl_base", 2513),
    "sdxl-refiner": ({"unet": UNET_REFINER, "vae": VAE, "text_encoder_2": CLIP_G}, "xl_refiner", None),
}


@pytest.mark.parametrize("family", REAL)
def test_real_geometry_is_detected_and_round_trips_names_and_shapes(family):
    configs, detected, n_keys = REAL[family]
    weights = {n: meta_model(LDM_LAYOUTS[family][n], c).state_dict() for n, c in configs.items()}
    ldm = to_ldm(weights, family)
    assert infer_diffusers_model_type(ldm) == detected
    assert n_keys is None or len(ldm) == n_keys
    back = from_ldm(ldm, family, configs)
    assert {n: {k: v.shape for k, v in sd.items()} for n, sd in back.items()} == {
        n: {k: v.shape for k, v in sd.items()} for n, sd in weights.items()}
