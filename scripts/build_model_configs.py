"""Write the configs-only diffusers folders in src/sdstudio/assets/configs/<family>/ (no weights).

Single-file checkpoints (the original LDM/SGM key layout) carry weights but no architecture; these folders
carry the architecture, so `from_single_file(..., config=folder)` / `from_config` work offline.
Tokenizer folders hold only tokenizer_config.json + special_tokens_map.json: the CLIP BPE files ship once in
assets/clip-tokenizer and `sdstudio.models.load.configs.load_tokenizer` joins them.

Every value is the public checkpoint's own, taken from its Hugging Face repo config files and cross-checked
against the original inference yaml (v1-inference.yaml, v1-inpainting-inference.yaml,
v2-inference-512-base.yaml, v2-inference-v.yaml, sd_xl_base.yaml, sd_xl_refiner.yaml, sd_xl_inpaint.yaml)
through diffusers' `create_unet_diffusers_config_from_ldm`. Deliberate departures are marked "NOTE".

Run: python scripts/build_model_configs.py   (rewrites the folders; the output is deterministic)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "src" / "sdstudio" / "assets" / "configs"
DIFFUSERS_VERSION = "0.42.1"  # the diffusers these configs were checked against

Json = dict[str, Any]

# ---------------------------------------------------------------------------------------------- text encoders
# openai/clip-vit-large-patch14 text tower: SD1.x text_encoder and SDXL text_encoder (identical configs in
# stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0). bos/eos ids 0/2 are the repos' legacy values:
# with eos_token_id == 2, transformers pools at argmax(input_ids), i.e. at <|endoftext|> (49407).
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
          "hidden_act": "quick_gelu", "projection_dim": 768}
# OpenCLIP ViT-H/14 text tower as SD2.x uses it: 24 layers trained, the last one dropped ("penultimate"
# layer in v2-inference*.yaml), so diffusers' stabilityai/stable-diffusion-2-1(-base) ship 23 layers.
OPENCLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
              "hidden_act": "gelu", "projection_dim": 512}
# OpenCLIP ViT-bigG/14 text tower with its text projection: SDXL text_encoder_2 and the refiner's.
OPENCLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
                 "hidden_act": "gelu", "projection_dim": 1280}


def text_encoder(arch: str, dims: Json) -> Json:
    return {"architectures": [arch], "model_type": "clip_text_model", "vocab_size": 49408,
            "max_position_embeddings": 77, **dims, "layer_norm_eps": 1e-05, "attention_dropout": 0.0,
            "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


# ------------------------------------------------------------------------------------------------- tokenizers
# The pad token is the one real difference: "<|endoftext|>" (49407) for the OpenAI CLIP tokenizer (SD1.x,
# SDXL tokenizer), "!" (id 0) for the OpenCLIP ones (SD2.x tokenizer, SDXL tokenizer_2 and the refiner's).
# NOTE: SD2.x's tokenizer_config.json says "<|endoftext|>" while its special_tokens_map.json says "!", and
# the map wins when transformers loads it; here both files say "!".
def tokenizer(pad: str, clean_up_spaces: bool | None) -> tuple[Json, Json]:
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "add_prefix_space": False, "errors": "replace", **special}
    if clean_up_spaces is not None:  # only the SDXL repos set it
        config["clean_up_tokenization_spaces"] = clean_up_spaces
    return config, special


# ------------------------------------------------------------------------------------------------------- VAEs
# The KL-f8 autoencoder is one architecture everywhere (ch 128, ch_mult 1,2,4,4, z 4); families differ in the
# latent scale (yaml `scale_factor`) and in whether fp16 needs an fp32 upcast.
def vae(sample_size: int, scaling_factor: float, force_upcast: bool | None = None) -> Json:
    config = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
              "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
              "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "out_channels": 3,
              "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
              "sample_size": sample_size, "scaling_factor": scaling_factor}
    if force_upcast is not None:
        config["force_upcast"] = force_upcast
    return config


# ------------------------------------------------------------------------------------------------------ UNets
UNET_COMMON = {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
               "out_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "norm_eps": 1e-05,
               "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False, "downsample_padding": 1,
               "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn"}
SD_BLOCKS = {"block_out_channels": [320, 640, 1280, 1280],
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}


def sd1_unet(in_channels: int) -> Json:
    """v1-inference.yaml: model_channels 320, mult 1,2,4,4, attention at 4,2,1, num_heads 8, context 768."""
    return {**UNET_COMMON, **SD_BLOCKS, "in_channels": in_channels, "sample_size": 64, "cross_attention_dim": 768,
            "attention_head_dim": 8, "use_linear_projection": False, "upcast_attention": False}


def sd2_unet(sample_size: int, upcast_attention: bool) -> Json:
    """v2-inference*.yaml: as SD1 but num_head_channels 64 (heads 5,10,20,20), linear proj, context 1024."""
    return {**UNET_COMMON, **SD_BLOCKS, "in_channels": 4, "sample_size": sample_size, "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
            "upcast_attention": upcast_attention}


def sdxl_unet(in_channels: int) -> Json:
    """sd_xl_base.yaml: 320 x (1,2,4), attention at 4,2, depth 1,2,10 -> [1,2,10], context 2048, adm 2816.

    2816 = 1280 (pooled bigG) + 6 x 256 (original size, crop top-left, target size: 2 numbers each).
    """
    return {**UNET_COMMON, "in_channels": in_channels, "sample_size": 128, "cross_attention_dim": 2048,
            "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
            "use_linear_projection": True, "upcast_attention": False, "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256, "addition_embed_type_num_heads": 64,
            "projection_class_embeddings_input_dim": 2816}


def sdxl_refiner_unet() -> Json:
    """sd_xl_refiner.yaml: 384 x (1,2,4,4), attention at 4,2, depth 4, context 1280, adm 2560.

    2560 = 1280 (pooled bigG) + 5 x 256 (original size, crop top-left: 2 numbers each, aesthetic score: 1).
    """
    return {**UNET_COMMON, "in_channels": 4, "sample_size": 128, "cross_attention_dim": 1280,
            "block_out_channels": [384, 768, 1536, 1536],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": [6, 12, 24, 24], "transformer_layers_per_block": 4,
            "use_linear_projection": True, "upcast_attention": False, "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256, "addition_embed_type_num_heads": 64,
            "projection_class_embeddings_input_dim": 2560}


# ------------------------------------------------------------------------------------------------- schedulers
# All families train on the same DDPM schedule: 1000 steps, "scaled_linear" betas 0.00085..0.012
# (yaml linear_start/linear_end); the repos differ in the default sampler and the prediction type.
BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "trained_betas": None, "timestep_spacing": "leading", "steps_offset": 1}


def scheduler(cls: str, prediction_type: str) -> Json:
    extra: Json = {"interpolation_type": "linear", "use_karras_sigmas": False} if cls == "EulerDiscreteScheduler" \
        else {"set_alpha_to_one": False, "skip_prk_steps": True} if cls == "PNDMScheduler" \
        else {"set_alpha_to_one": False, "clip_sample": False}  # DDIMScheduler
    return {"_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION, **BETAS, "prediction_type": prediction_type,
            **extra}


# ---------------------------------------------------------------------------------------------- model indexes
def sd_index(pipeline: str, scheduler_cls: str) -> Json:
    # NOTE: the repos list a safety checker and feature extractor; their weights are not part of a
    # single-file checkpoint, so they are left out here (as stabilityai/stable-diffusion-2-1 does).
    return {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION,
            "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", scheduler_cls], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}


def sdxl_index(pipeline: str, *, force_zeros: bool, aesthetics: bool | None, te1: bool = True) -> Json:
    index = {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION,
             "force_zeros_for_empty_prompt": force_zeros, "add_watermarker": None,
             "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"] if te1 else [None, None],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"] if te1 else [None, None],
             "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if aesthetics is not None:
        index["requires_aesthetics_score"] = aesthetics
    return index


# --------------------------------------------------------------------------------------------------- families
def families() -> dict[str, dict[str, Any]]:
    """family -> {component folder: config (or (tokenizer_config, special_tokens_map)), "model_index": ...}."""
    sd1_tok, sd2_tok = tokenizer("<|endoftext|>", None), tokenizer("!", None)
    xl_tok, xl_tok2 = tokenizer("<|endoftext|>", True), tokenizer("!", True)
    clip_l, open_h = text_encoder("CLIPTextModel", CLIP_L), text_encoder("CLIPTextModel", OPENCLIP_H)
    big_g = text_encoder("CLIPTextModelWithProjection", OPENCLIP_BIGG)
    # stable-diffusion-xl-base-1.0's VAE: the stock SDXL VAE overflows in fp16, hence force_upcast.
    xl_vae = vae(1024, 0.13025, force_upcast=True)
    return {
        # stable-diffusion-v1-5/stable-diffusion-v1-5 (== runwayml/stable-diffusion-v1-5); v1-inference.yaml.
        "sd1": {"model_index": sd_index("StableDiffusionPipeline", "PNDMScheduler"),
                "scheduler": scheduler("PNDMScheduler", "epsilon"), "text_encoder": clip_l,
                "tokenizer": sd1_tok, "unet": sd1_unet(4), "vae": vae(512, 0.18215)},
        # stable-diffusion-v1-5/stable-diffusion-inpainting (== runwayml/...); v1-inpainting-inference.yaml:
        # UNet input = 4 latent + 1 mask + 4 masked-image latent channels.
        "sd1-inpaint": {"model_index": sd_index("StableDiffusionInpaintPipeline", "DDIMScheduler"),
                        "scheduler": scheduler("DDIMScheduler", "epsilon"), "text_encoder": clip_l,
                        "tokenizer": sd1_tok, "unet": sd1_unet(9), "vae": vae(256, 0.18215)},
        # stabilityai/stable-diffusion-2-1-base (512 px, epsilon); v2-inference-512-base.yaml.
        "sd2": {"model_index": sd_index("StableDiffusionPipeline", "PNDMScheduler"),
                "scheduler": scheduler("PNDMScheduler", "epsilon"), "text_encoder": open_h,
                "tokenizer": sd2_tok, "unet": sd2_unet(64, upcast_attention=False), "vae": vae(768, 0.18215)},
        # stabilityai/stable-diffusion-2-1 (768 px, v-prediction); v2-inference-v.yaml (parameterization "v").
        # upcast_attention: 2.1's attention overflows in fp16 without it.
        "sd2-v": {"model_index": sd_index("StableDiffusionPipeline", "DDIMScheduler"),
                  "scheduler": scheduler("DDIMScheduler", "v_prediction"), "text_encoder": open_h,
                  "tokenizer": sd2_tok, "unet": sd2_unet(96, upcast_attention=True), "vae": vae(768, 0.18215)},
        # stabilityai/stable-diffusion-xl-base-1.0; sd_xl_base.yaml.
        "sdxl": {"model_index": sdxl_index("StableDiffusionXLPipeline", force_zeros=True, aesthetics=None),
                 "scheduler": scheduler("EulerDiscreteScheduler", "epsilon"), "text_encoder": clip_l,
                 "text_encoder_2": big_g, "tokenizer": xl_tok, "tokenizer_2": xl_tok2, "unet": sdxl_unet(4),
                 "vae": xl_vae},
        # stabilityai/stable-diffusion-xl-refiner-1.0 (bigG only, aesthetic-score conditioning); sd_xl_refiner.yaml.
        "sdxl-refiner": {"model_index": sdxl_index("StableDiffusionXLImg2ImgPipeline", force_zeros=False,
                                                   aesthetics=True, te1=False),
                         "scheduler": scheduler("EulerDiscreteScheduler", "epsilon"), "text_encoder_2": big_g,
                         "tokenizer_2": xl_tok2, "unet": sdxl_refiner_unet(), "vae": xl_vae},
        # diffusers/stable-diffusion-xl-1.0-inpainting-0.1; sd_xl_inpaint.yaml (in_channels 9).
        # NOTE: that repo ships madebyollin/sdxl-vae-fp16-fix (force_upcast false, sample_size 512); a single
        # file carries whatever VAE it was merged with, usually the stock SDXL VAE, so the base VAE config
        # (force_upcast true) is used here: identical architecture, only safer in fp16.
        "sdxl-inpaint": {"model_index": sdxl_index("StableDiffusionXLInpaintPipeline", force_zeros=True,
                                                   aesthetics=False),
                         "scheduler": scheduler("EulerDiscreteScheduler", "epsilon"), "text_encoder": clip_l,
                         "text_encoder_2": big_g, "tokenizer": xl_tok, "tokenizer_2": xl_tok2,
                         "unet": sdxl_unet(9), "vae": xl_vae},
    }


def write_json(path: Path, data: Json) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_family(folder: Path, parts: dict[str, Any]) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    for name, value in parts.items():
        if name == "model_index":
            write_json(folder / "model_index.json", value)
        elif name.startswith("tokenizer"):
            config, special = value
            write_json(folder / name / "tokenizer_config.json", config)
            write_json(folder / name / "special_tokens_map.json", special)
        elif name == "scheduler":
            write_json(folder / name / "scheduler_config.json", value)
        else:
            write_json(folder / name / "config.json", value)


def main() -> None:
    for family, parts in families().items():
        write_family(OUT / family, parts)
        print(f"wrote {OUT / family}")


if __name__ == "__main__":
    main()
