"""Tiny VAEs (AutoencoderTiny, TAESD's architecture): chosen as the VAE by name, decoding live previews, and
distilled from a model's VAE by our trainer; the bundled demo carries one."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline
from safetensors import safe_open

from sdstudio import Engine, GenerationRequest
from sdstudio.errors import RequestError
from sdstudio.train.tiny_vae import TinyVaeTrainConfig, new_tiny_vae, save_tiny_vae, train_tiny_vae
from tests.conftest import make_settings, shapes_image
from tests.test_parity import SEED, diffusers_pipe, generators


@pytest.fixture(scope="module")
def with_taesd(tmp_path_factory, tiny_model):
    """A copy of the tiny model carrying its own tiny VAE (random weights) in taesd/."""
    root = tmp_path_factory.mktemp("taesd")
    model = root / "tiny-taesd"
    shutil.copytree(tiny_model, model)
    torch.manual_seed(5)
    save_tiny_vae(new_tiny_vae(16, 4, 4), model / "taesd")  # 4 levels: the tiny VAE's factor 8
    return Engine(make_settings(root / "home", root, default_model=str(model)))


def test_vae_taesd_decodes_as_diffusers_with_autoencoder_tiny(with_taesd):
    req = GenerationRequest(prompt="a red circle", steps=4, sampler="Euler", seed=SEED, batch_size=2, vae="taesd")
    result = with_taesd.generate(req)
    assert "VAE: taesd" in result.images[0].infotext
    model = with_taesd.load()
    pipe = diffusers_pipe(StableDiffusionPipeline, model, result.images[0].record["sampler"]["config"])
    pipe.vae = AutoencoderTiny.from_pretrained(model.ref.path / "taesd")
    ref = pipe(prompt=req.prompt, num_inference_steps=4, guidance_scale=7.0, height=64, width=64,
               num_images_per_prompt=2, generator=generators(2), output_type="pil").images
    for ours, theirs in zip(result.images, ref, strict=True):
        assert np.abs(np.asarray(ours.image, int) - np.asarray(theirs, int)).max() <= 1
    full = with_taesd.generate(req.replace(vae=None))
    assert torch.equal(full.latents, result.latents)  # the same denoising; only the decode differs
    assert np.asarray(full.images[0].image).tolist() != np.asarray(result.images[0].image).tolist()


def test_previews_are_decoded_by_the_tiny_vae_when_the_model_has_one(with_taesd, engine):
    def preview_size(eng):
        sizes = []
        eng.generate(GenerationRequest(prompt="a red circle", steps=2, seed=1),
                     progress=lambda event: sizes.append(event.preview().size))
        return sizes[-1]

    assert preview_size(with_taesd) == (64, 64)  # the image's size, decoded by TAESD
    assert preview_size(engine) == (8, 8)        # one pixel per latent cell: the latent -> RGB approximation


def test_img2img_encodes_with_the_tiny_vae_and_a_missing_one_is_named(with_taesd, engine):
    req = GenerationRequest(prompt="a red circle", steps=4, seed=1, init_image=shapes_image(64), strength=0.5,
                            vae="taesd")
    assert with_taesd.generate(req).images[0].image.size == (64, 64)
    with pytest.raises(RequestError, match="unknown VAE 'taesdxl': no tiny VAE of that name") as caught:
        with_taesd.prepare(req.replace(vae="taesdxl"))
    assert caught.value.field == "vae"


def test_the_trainer_distils_a_vae_and_resumes(tiny_model, tmp_path):
    cfg = TinyVaeTrainConfig(teacher=str(tiny_model / "vae"), out=tmp_path / "taesd", resolution=32, batch_size=4,
                             steps=3, save_every=2, channels=8)
    train_tiny_vae(cfg)
    student = AutoencoderTiny.from_pretrained(tmp_path / "taesd")
    with safe_open(tmp_path / "taesd" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        assert all(weights.get_tensor(k).dtype == torch.float16 for k in weights.keys())  # noqa: SIM118 (not a dict): saved in half
    assert student.config.latent_channels == 4 and "block_out_channels" not in json.loads(
        (tmp_path / "taesd" / "config.json").read_text())
    longer = TinyVaeTrainConfig(**{**cfg.__dict__, "steps": 5})
    train_tiny_vae(longer, resume=True)
    assert (tmp_path / "taesd" / "diffusion_pytorch_model.safetensors").is_file()


def taesd_original(latent_channels: int = 4) -> tuple[torch.nn.Sequential, torch.nn.Sequential]:
    """TAESD's original (encoder, decoder) module layout, as its taesd_encoder.pth/taesd_decoder.pth hold them:
    three 2x stages of 64-wide residual blocks; the decoder starts with the parameter-free clamp."""
    class Clamp(torch.nn.Module):
        def forward(self, x):
            return torch.tanh(x / 3) * 3

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            relu, c = torch.nn.ReLU, lambda: torch.nn.Conv2d(64, 64, 3, padding=1)
            self.conv = torch.nn.Sequential(c(), relu(), c(), relu(), c())
            self.skip, self.fuse = torch.nn.Identity(), relu()

        def forward(self, x):
            return self.fuse(self.conv(x) + self.skip(x))

    def conv(n_in, n_out, **kw):
        return torch.nn.Conv2d(n_in, n_out, 3, padding=1, **kw)

    def down():
        return [conv(64, 64, stride=2, bias=False), Block(), Block(), Block()]

    def up():
        return [Block(), Block(), Block(), torch.nn.Upsample(scale_factor=2), conv(64, 64, bias=False)]

    encoder = torch.nn.Sequential(conv(3, 64), Block(), *down(), *down(), *down(), conv(64, latent_channels))
    decoder = torch.nn.Sequential(Clamp(), conv(latent_channels, 64), torch.nn.ReLU(), *up(), *up(), *up(), Block(),
                                  conv(64, 3))
    return encoder, decoder


@pytest.mark.parametrize("with_encoder", [True, False])
def test_a1111s_taesd_decoder_file_is_read_as_an_autoencoder_tiny(tmp_path, with_encoder):
    from sdstudio.models.load.tiny_vae import find_tiny_vae, load_tiny_vae

    torch.manual_seed(1)
    encoder, decoder = taesd_original()
    approx = tmp_path / "VAE-approx"
    approx.mkdir()
    torch.save(decoder.state_dict(), approx / "taesd_decoder.pth")
    if with_encoder:
        torch.save(encoder.state_dict(), approx / "taesd_encoder.pth")
    found = find_tiny_vae("taesd", tmp_path / "model.safetensors", [], [approx])
    assert found == approx / "taesd_decoder.pth"
    tiny = load_tiny_vae(found, torch.float32)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(tiny.decode(z).sample, decoder(z) * 2 - 1)  # TAESD's [0, 1] -> [-1, 1]
        if with_encoder:
            x = torch.rand(1, 3, 64, 64)
            torch.testing.assert_close(tiny.encode(x * 2 - 1).latents, encoder(x))
    assert tiny.decodes_only is not with_encoder
    if not with_encoder:
        from sdstudio.engine.sd.stages import encode_pixels

        with pytest.raises(RequestError, match=r"taesd_encoder\.pth"):
            encode_pixels(tiny, torch.zeros(1, 3, 64, 64))


def test_the_demo_ships_a_tiny_vae_close_to_its_full_vae():
    """The demo's taesd/ (distilled by `sdstudio train tiny-vae demo ...`): <= 2 MB, decoding the demo's latents
    within a few levels of the full VAE and encoding images to nearly the same latents."""
    from diffusers import AutoencoderKL

    from sdstudio.settings import PACKAGED_MODELS
    from sdstudio.train.shapes import ShapeSpec, draw

    demo = PACKAGED_MODELS / "demo"
    assert sum(f.stat().st_size for f in (demo / "taesd").iterdir()) <= 2 * 1024 * 1024
    tiny = AutoencoderTiny.from_pretrained(demo / "taesd", torch_dtype=torch.float32).eval()
    full = AutoencoderKL.from_pretrained(demo / "vae", torch_dtype=torch.float32).eval()
    specs = [ShapeSpec(shape, colour, background, "large", (i % 3, i // 3 % 3)) for i, (shape, colour, background)
             in enumerate([("circle", "red", "blue"), ("square", "yellow", "black"), ("triangle", "white", "green"),
                           ("diamond", "orange", "purple"), ("circle", "green", "white"), ("square", "blue", "red")])]
    x = torch.from_numpy(np.stack([np.asarray(draw(s), np.float32) / 127.5 - 1 for s in specs])).permute(0, 3, 1, 2)
    with torch.no_grad():
        z = full.encode(x).latent_dist.mode() * full.config.scaling_factor      # (6, 4, 8, 8)
        reference = full.decode(z / full.config.scaling_factor).sample
        decoded, encoded = tiny.decode(z).sample, tiny.encode(x).latents
    levels = ((decoded - reference).abs() * 127.5).flatten()
    assert levels.mean() < 4 and levels.quantile(0.99) < 60, (levels.mean(), levels.quantile(0.99))
    assert (encoded - z).pow(2).mean().sqrt() < 0.05 * z.std()
