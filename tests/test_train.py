"""Training on tiny configs: deterministic, saves, reloads, resumes; bad data is named."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from sdstudio.train.data import TrainDataError
from sdstudio.train.loop import TrainConfigError
from sdstudio.train.sd import SdTrainConfig, train_sd
from sdstudio.train.shapes import write_dataset
from sdstudio.train.vae import VaeTrainConfig, train_vae


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.safetensors")):
        if "training-state" not in p.parts:
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "shapes", count=12, seed=3)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory, shapes_folder) -> Path:
    out = tmp_path_factory.mktemp("vae") / "vae"
    train_vae(VaeTrainConfig(data=str(shapes_folder), out=out, arch="tiny", batch_size=4, steps=2, warmup=1,
                             save_every=0, scale_samples=8))
    return out


def test_vae_training_saves_a_loadable_vae_with_a_measured_scaling_factor(tiny_vae):
    vae = AutoencoderKL.from_pretrained(tiny_vae)
    assert vae.config.latent_channels == 4 and len(vae.config.block_out_channels) == 4
    assert vae.config.scaling_factor != 0.18215 and vae.config.scaling_factor > 0
    assert (tiny_vae / "training-state" / "trainer.pt").is_file()


def sd_config(data: str, out: Path, vae: Path, steps: int) -> SdTrainConfig:
    return SdTrainConfig(data=data, out=out, vae=str(vae), arch="tiny", batch_size=3, steps=steps, warmup=1,
                         save_every=2, ema_decay=0.99)


def test_model_training_is_deterministic_and_resumes_exactly(tmp_path, shapes_folder, tiny_vae):
    straight = train_sd(sd_config(str(shapes_folder), tmp_path / "a", tiny_vae, steps=3))
    again = train_sd(sd_config(str(shapes_folder), tmp_path / "b", tiny_vae, steps=3))
    assert digest(straight) == digest(again)

    def crash_after_the_save_at_step_2(progress):
        if progress.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sd(sd_config(str(shapes_folder), tmp_path / "c", tiny_vae, steps=3), crash_after_the_save_at_step_2)
    resumed = train_sd(sd_config(str(shapes_folder), tmp_path / "c", tiny_vae, steps=3), resume=True)
    assert digest(resumed) == digest(straight)
    live = load_file(resumed / "training-state" / "unet.safetensors")
    reference = load_file(straight / "training-state" / "unet.safetensors")
    assert all(torch.equal(live[k], reference[k]) for k in reference)


def test_trained_model_generates_through_the_engine(tmp_path, shapes_folder, tiny_vae):
    from sdstudio import Engine, GenerationRequest

    from .conftest import make_settings

    out = train_sd(sd_config("shapes", tmp_path / "stream", tiny_vae, steps=2))
    assert (out / "model_index.json").is_file()
    result = Engine(make_settings(tmp_path, tmp_path)).generate(
        GenerationRequest(prompt="a red circle", model=str(out), steps=2, seed=1))
    assert result.images[0].image.size == (64, 64)


def test_refuses_to_overwrite_a_run_without_resume(tmp_path, shapes_folder, tiny_vae):
    train_sd(sd_config(str(shapes_folder), tmp_path / "run", tiny_vae, steps=1))
    with pytest.raises(TrainConfigError, match="pass --resume"):
        train_sd(sd_config(str(shapes_folder), tmp_path / "run", tiny_vae, steps=2))
    changed = SdTrainConfig(**{**sd_config(str(shapes_folder), tmp_path / "run", tiny_vae, 2).__dict__, "lr": 0.5})
    with pytest.raises(TrainConfigError, match=r"lr was 0\.001, now 0\.5"):
        train_sd(changed, resume=True)


def test_bad_training_data_names_the_file(tmp_path, tiny_vae):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainDataError, match="no images"):
        train_sd(sd_config(str(empty), tmp_path / "o1", tiny_vae, 1))
    data = write_dataset(tmp_path / "d", count=2)
    (data / "000001.txt").unlink()
    with pytest.raises(TrainDataError, match=r"missing caption for .*000001\.png"):
        train_sd(sd_config(str(data), tmp_path / "o2", tiny_vae, 1))
    (data / "000001.txt").write_text("x")
    (data / "000000.png").write_bytes(b"broken")
    with pytest.raises(TrainDataError, match=r"cannot read image .*000000\.png"):
        train_sd(sd_config(str(data), tmp_path / "o3", tiny_vae, 1))


def test_inpainting_variant_widens_the_base_and_trains(tmp_path, shapes_folder, tiny_vae):
    from diffusers import UNet2DConditionModel

    from sdstudio.models.load.ldm_layout import read_family_from_folder
    from sdstudio.train.inpaint import random_masks, widen_conv_in

    base = train_sd(sd_config(str(shapes_folder), tmp_path / "base", tiny_vae, steps=2))
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    wide = widen_conv_in(unet)
    x = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():  # zero-initialised extra channels: the base model's output, whatever they hold
        same = wide(torch.cat([x, torch.randn(1, 5, 8, 8)], 1), 10, context).sample
        assert torch.allclose(same, unet(x, 10, context).sample, atol=1e-5)
    masks = random_masks(64, 64, torch.Generator().manual_seed(0))
    assert set(masks.unique().tolist()) <= {0.0, 1.0} and 0.1 < masks.mean() < 0.9
    cfg = sd_config(str(shapes_folder), tmp_path / "inpaint", tiny_vae, steps=2)
    out = train_sd(SdTrainConfig(**{**cfg.__dict__, "base": str(base), "inpaint": True}))
    trained = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert trained.config.in_channels == 9 and trained.conv_in.weight[:, 4:].abs().sum() > 0
    assert read_family_from_folder(out) == "sd1-inpaint"
