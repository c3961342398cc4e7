"""Write the bundled configs of the flow families (src/sdstudio/assets/configs/{sd3-medium,sd3.5-medium,sd3.5-large,
flux-dev,flux-schnell}): model_index.json and each component's config, no weights.

The values are those of the published diffusers repositories (stabilityai/stable-diffusion-3-medium-diffusers,
stabilityai/stable-diffusion-3.5-medium and -large, black-forest-labs/FLUX.1-dev and -schnell) and of
google/t5-v1_1-xxl; tests/test_flow_files.py checks that each transformer built from them has the published
parameter count. The CLIP encoders' configs are SDXL's (the same CLIP-L and OpenCLIP-G). Run:
python scripts/build_flow_configs.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
from transformers import T5Config

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "sdstudio" / "assets" / "configs"

SD3 = dict(attention_head_dim=64, in_channels=16, out_channels=16, patch_size=2, joint_attention_dim=4096,
           pooled_projection_dim=2048, sample_size=128)
TRANSFORMERS = {
    "sd3-medium": (SD3Transformer2DModel, dict(SD3, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                               pos_embed_max_size=192)),
    "sd3.5-medium": (SD3Transformer2DModel, dict(SD3, num_layers=24, num_attention_heads=24,
                                                 caption_projection_dim=1536, pos_embed_max_size=384,
                                                 qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))),
    "sd3.5-large": (SD3Transformer2DModel, dict(SD3, num_layers=38, num_attention_heads=38,
                                                caption_projection_dim=2432, pos_embed_max_size=192,
                                                qk_norm="rms_norm")),
    "flux-dev": (FluxTransformer2DModel, dict(attention_head_dim=128, num_attention_heads=24, num_layers=19,
                                              num_single_layers=38, in_channels=64, joint_attention_dim=4096,
                                              pooled_projection_dim=768, guidance_embeds=True,
                                              axes_dims_rope=(16, 56, 56), patch_size=1)),
}
TRANSFORMERS["flux-schnell"] = (FluxTransformer2DModel, dict(TRANSFORMERS["flux-dev"][1], guidance_embeds=False))
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
           layers_per_block=2, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
           force_upcast=True)
SCALING = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
SCHEDULERS = {"sd3": dict(num_train_timesteps=1000, shift=3.0),
              "flux-dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                               max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
              "flux-schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)}
T5 = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
              layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
              tie_word_embeddings=False, architectures=["T5EncoderModel"])
T5_TOKENIZER = {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "eos_token": "</s>", "pad_token": "<pad>",
                "unk_token": "<unk>", "extra_ids": 100}


def component(kind: str, cls: str) -> list[str]:
    return [kind, cls]


def write_variant(name: str) -> None:
    family = "flux" if name.startswith("flux") else "sd3"
    out = CONFIGS / name
    shutil.rmtree(out, ignore_errors=True)
    cls, config = TRANSFORMERS[name]
    with init_empty_weights():
        cls.from_config(config).save_config(out / "transformer")
        scaling, shift = SCALING[family]
        AutoencoderKL.from_config(dict(VAE, scaling_factor=scaling, shift_factor=shift)).save_config(out / "vae")
    scheduler = SCHEDULERS.get(name, SCHEDULERS["sd3"])
    FlowMatchEulerDiscreteScheduler(**scheduler).save_config(out / "scheduler")
    sdxl = CONFIGS / "sdxl"
    clips = ["text_encoder", "text_encoder_2"] if family == "sd3" else ["text_encoder"]
    t5 = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    for i, folder in enumerate(clips):
        source = sdxl / ("text_encoder_2" if i else "text_encoder")
        config = json.loads((source / "config.json").read_text())
        config["architectures"] = ["CLIPTextModelWithProjection" if family == "sd3" else "CLIPTextModel"]
        (out / folder).mkdir(parents=True)
        (out / folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        shutil.copytree(sdxl / ("tokenizer_2" if i else "tokenizer"), out / folder.replace("text_encoder", "tokenizer"))
    T5.save_pretrained(out / t5)
    tokenizer = out / t5.replace("text_encoder", "tokenizer")
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(T5_TOKENIZER, indent=2) + "\n")
    index = {"_class_name": "FluxPipeline" if family == "flux" else "StableDiffusion3Pipeline",
             "scheduler": component("diffusers", "FlowMatchEulerDiscreteScheduler"),
             "transformer": component("diffusers", cls.__name__), "vae": component("diffusers", "AutoencoderKL"),
             t5: component("transformers", "T5EncoderModel"),
             t5.replace("text_encoder", "tokenizer"): component("transformers", "T5TokenizerFast")}
    for folder in clips:
        index[folder] = component("transformers", "CLIPTextModelWithProjection" if family == "sd3" else "CLIPTextModel")
        index[folder.replace("text_encoder", "tokenizer")] = component("transformers", "CLIPTokenizer")
    (out / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    for variant in TRANSFORMERS:
        write_variant(variant)
