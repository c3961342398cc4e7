"""SD3 and Flux as single files: the published layouts load to the same model as the diffusers folder, families are
told from keys, missing parts are named, fp8 weights upcast, and the shipped configs have the published sizes."""

from __future__ import annotations

import shutil

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from sdstudio import Engine, GenerationRequest, Settings
from sdstudio.errors import ModelError
from sdstudio.models.find.catalog import ModelRef
from sdstudio.models.find.inventory import family_of
from sdstudio.models.load.configs import CONFIGS
from sdstudio.models.load.flow_files import file_family, file_variant, header, read_part
from sdstudio.models.load.flow_keys import flux_from_diffusers, flux_to_diffusers
from sdstudio.models.tools.convert import read_component_weights
from sdstudio.testing.flow_files import write_flux_files, write_sd3_file
from sdstudio.testing.tiny_flow import build_tiny_flux, build_tiny_sd3
from tests.test_parity import SEED

PROMPT = "a small red circle at the top left"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Folders and the same models as single files, in an A1111-less ComfyUI tree."""
    root = tmp_path_factory.mktemp("flow-files")
    folders = root / "folders"
    flux = build_tiny_flux(folders / "flux-folder", seed=11, full_vocab=True)
    sd3 = build_tiny_sd3(folders / "sd3-folder", seed=12, full_vocab=True)
    comfy = root / "ComfyUI"
    write_flux_files(flux, comfy)
    write_sd3_file(sd3, comfy / "models" / "checkpoints" / "sd3.5-tiny.safetensors")
    home = root / "home"
    settings = Settings(home=home, outputs_dir=home / "out", models_dirs=(folders,), device=torch.device("cpu"),
                        dtype=torch.float32, comfyui_dir=comfy)
    return {"engine": Engine(settings), "comfy": comfy, "flux": flux, "sd3": sd3, "root": root}


def latents(engine: Engine, model: str, **fields) -> torch.Tensor:
    req = GenerationRequest(prompt=PROMPT, negative_prompt="blurry", width=64, height=64, steps=3, seed=SEED,
                            model=model, **fields)
    return engine.generate(req).latents


@pytest.mark.parametrize(("single", "folder", "fields"), [("flux1-dev", "flux-folder", {"cfg_scale": 1.0}),
                                                           ("sd3.5-tiny", "sd3-folder", {"cfg_scale": 4.0})])
def test_single_file_is_the_folder(layouts, single, folder, fields):
    engine = layouts["engine"]
    assert torch.equal(latents(engine, single, **fields), latents(engine, folder, **fields))


def test_flux_file_under_the_ldm_prefix_loads_too(layouts, tmp_path):
    comfy = tmp_path / "ComfyUI"
    write_flux_files(layouts["flux"], comfy, name="flux-prefixed", prefixed=True)
    assert file_family(comfy / "models" / "unet" / "flux-prefixed.safetensors") == "flux"
    home = tmp_path / "home"
    engine = Engine(Settings(home=home, outputs_dir=home / "out", models_dirs=(layouts["root"] / "folders",),
                             device=torch.device("cpu"), comfyui_dir=comfy))
    assert torch.equal(latents(engine, "flux-prefixed", cfg_scale=1.0), latents(engine, "flux-folder", cfg_scale=1.0))


def test_families_and_variants_come_from_the_keys(layouts):
    unet, checkpoint = layouts["comfy"] / "models" / "unet", layouts["comfy"] / "models" / "checkpoints"
    assert file_family(unet / "flux1-dev.safetensors") == "flux"
    assert file_family(checkpoint / "sd3.5-tiny.safetensors") == "sd3"
    assert file_family(layouts["comfy"] / "models" / "vae" / "ae.safetensors") is None
    assert file_variant(unet / "flux1-dev.safetensors") == "flux-dev"
    assert file_variant(checkpoint / "sd3.5-tiny.safetensors") == "sd3.5-medium"  # QK-norm and dual attention
    assert family_of(ModelRef("flux1-dev", unet / "flux1-dev.safetensors")) == "flux-dev"
    assert family_of(ModelRef("flux-folder", layouts["flux"])) == "flux-dev"


def test_missing_parts_are_named(layouts, tmp_path):
    comfy = tmp_path / "ComfyUI"
    shutil.copytree(layouts["comfy"] / "models" / "unet", comfy / "models" / "unet")
    home = tmp_path / "home"
    engine = Engine(Settings(home=home, outputs_dir=home / "out", models_dirs=(), device=torch.device("cpu"),
                             comfyui_dir=comfy))
    with pytest.raises(ModelError, match=r"missing: CLIP-L .*T5-XXL .*16-channel VAE"):
        engine.generate(GenerationRequest(prompt="x", width=64, height=64, steps=1, model="flux1-dev"))


def test_fp8_weights_are_upcast(layouts, tmp_path):
    comfy = tmp_path / "ComfyUI"
    write_flux_files(layouts["flux"], comfy, t5_dtype=torch.float8_e4m3fn)
    path = comfy / "models" / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors"
    loaded = read_part(path, "", torch.float32)
    original = read_component_weights(layouts["flux"] / "text_encoder_2")
    key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert loaded[key].dtype == torch.float32
    assert torch.equal(loaded[key], original[key].to(torch.float8_e4m3fn).float())
    home = tmp_path / "home"
    engine = Engine(Settings(home=home, outputs_dir=home / "out", models_dirs=(), device=torch.device("cpu"),
                             comfyui_dir=comfy))
    result = engine.generate(GenerationRequest(prompt="x", width=64, height=64, steps=2, model="flux1-dev",
                                               cfg_scale=1.0))
    assert result.images[0].image.size == (64, 64)


def test_scaled_fp8_weights_are_multiplied_by_their_scale(tmp_path):
    from safetensors.torch import save_file

    weight = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    save_file({"w.weight": (weight / 2).to(torch.float8_e4m3fn), "w.scale_weight": torch.tensor(2.0),
               "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, str(tmp_path / "t5.safetensors"))
    loaded = read_part(tmp_path / "t5.safetensors", "", torch.float32)
    assert set(loaded) == {"w.weight"}  # the scale and the marker are read into the weight, not kept
    assert torch.equal(loaded["w.weight"], weight)


def test_flux_conversion_matches_diffusers_at_the_published_width():
    """Our Flux key table against diffusers' converter (written for the 3072-wide releases): every row of every
    tensor lands in the same place. One column per tensor keeps the published row counts cheap."""
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(dict(FluxTransformer2DModel.load_config(CONFIGS / "flux-dev" /
                                                                                          "transformer"),
                                                        num_layers=1, num_single_layers=1))
    ours_sd, start = {}, 0
    for key, value in model.state_dict().items():  # distinct values in every row of every tensor
        rows = value.shape[0]
        ours_sd[key] = torch.arange(start, start + rows, dtype=torch.float64)[:, None]
        start += rows
    original = flux_from_diffusers(ours_sd)
    assert set(flux_to_diffusers(original)) == set(ours_sd)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    ours = flux_to_diffusers(original)
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


PUBLISHED = {  # parameters (+ SD3's positional-embedding table) of the released transformers
    "flux-dev": (FluxTransformer2DModel, 11_901_408_320, 0.001),       # FLUX.1 [dev]: "12B"
    "flux-schnell": (FluxTransformer2DModel, 11_891_178_560, 0.001),   # no guidance embedder
    "sd3.5-large": (SD3Transformer2DModel, 8.1e9, 0.01),               # "8.1 billion parameters"
    "sd3.5-medium": (SD3Transformer2DModel, 2.5e9, 0.02),              # "2.5 billion parameters"
    "sd3-medium": (SD3Transformer2DModel, 2.0e9, 0.05),                # "2 billion parameters"
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_shipped_configs_have_the_published_sizes(name):
    cls, published, tolerance = PUBLISHED[name]
    with init_empty_weights():
        model = cls.from_config(cls.load_config(CONFIGS / name / "transformer"))
    count = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert abs(count - published) <= tolerance * published, count


def test_shipped_text_encoder_and_vae_configs_have_the_published_sizes():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with init_empty_weights():
        t5 = T5EncoderModel(T5Config.from_pretrained(CONFIGS / "flux-dev" / "text_encoder_2"))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(CONFIGS / "sd3.5-large" / "text_encoder_2"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "flux-dev" / "vae"))
    t5_params = {n: p.numel() for n, p in t5.named_parameters() if n != "encoder.embed_tokens.weight"}  # = shared
    assert sum(t5_params.values()) == 4_762_310_656  # T5-v1.1-XXL's encoder
    assert sum(p.numel() for p in clip_g.parameters()) == 694_659_840  # OpenCLIP ViT-bigG's text tower
    assert sum(p.numel() for p in vae.parameters()) == 83_819_683


def test_header_reads_no_tensors(layouts):
    shapes = header(layouts["comfy"] / "models" / "unet" / "flux1-dev.safetensors")
    assert tuple(shapes["img_in.weight"].shape) == (128, 64)
