"""Inpainting in the one loop, both methods, against diffusers' StableDiffusionInpaintPipeline."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image, ImageDraw

from sdstudio import Engine, GenerationRequest
from sdstudio.engine.sd.inpaint import inpaint_inputs
from sdstudio.errors import RequestError
from sdstudio.testing.tiny import build_tiny
from tests.conftest import make_settings, shapes_image
from tests.test_parity import generators

SEED = 21


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint")
    return {"nine": build_tiny("sd1-inpaint", root / "nine", seed=5), "four": build_tiny("sd1", root / "four", seed=6),
            "root": root}


def square_mask(size: int = 64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((8, 16, 40, 48), fill=255)
    return mask


def reference(model, result, init, mask, strength, steps):
    config = result.images[0].record["sampler"]["config"]
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    pipe = StableDiffusionInpaintPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                          unet=model.unet, scheduler=scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    inputs = inpaint_inputs(model.vae, init, mask, 64, 64, 8, nine_channel=True)
    # diffusers samples the VAE posterior; we use its mean. Handing it our latents compares the rest.
    kwargs = dict(prompt=result.request.prompt, image=inputs.image_latents, mask_image=mask, strength=strength,
                  num_inference_steps=steps, guidance_scale=7.0, height=64, width=64,
                  masked_image_latents=inputs.condition[:, 1:], generator=generators(1, SEED), output_type="latent")
    return pipe(**kwargs).images


@pytest.mark.parametrize("kind", ["nine", "four"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_matches_diffusers(tmp_path, models, kind, strength):
    engine = Engine(make_settings(tmp_path, models["root"]))
    init, mask = shapes_image(), square_mask()
    req = GenerationRequest(prompt="a blue square", model=str(models[kind]), init_image=init, mask=mask,
                            mask_blur=0, strength=strength, steps=6, sampler="Euler", seed=SEED)
    result = engine.generate(req)
    model = engine.load(str(models[kind]))
    ref = reference(model, result, init, mask, strength, 6)
    assert (result.latents - ref).abs().max() < 1e-4
    assert result.request.mode == "inpaint" and "Mask blur: 0" in result.images[0].infotext


def test_ordinary_checkpoint_keeps_the_unmasked_latents(tmp_path, models):
    engine = Engine(make_settings(tmp_path, models["root"]))
    init, mask = shapes_image(), square_mask()
    result = engine.generate(GenerationRequest(prompt="a green circle", model=str(models["four"]), init_image=init,
                                               mask=mask, mask_blur=0, strength=1.0, steps=5, seed=2))
    model = engine.load(str(models["four"]))
    inputs = inpaint_inputs(model.vae, init, mask, 64, 64, 8, nine_channel=False)
    keep = inputs.mask == 0
    assert torch.allclose(result.latents[:, :, keep[0, 0]], inputs.image_latents[:, :, keep[0, 0]], atol=1e-5)
    inverted = engine.generate(GenerationRequest(prompt="a green circle", model=str(models["four"]), init_image=init,
                                                 mask=mask, mask_blur=0, invert_mask=True, strength=1.0, steps=5,
                                                 seed=2))
    assert torch.allclose(inverted.latents[:, :, ~keep[0, 0]], inputs.image_latents[:, :, ~keep[0, 0]], atol=1e-5)


def test_inpainting_model_without_a_mask_is_a_clear_error(tmp_path, models):
    engine = Engine(make_settings(tmp_path, models["root"]))
    with pytest.raises(RequestError, match="inpainting model"):
        engine.generate(GenerationRequest(prompt="x", model=str(models["nine"]), steps=1))
    with pytest.raises(RequestError, match="mask needs an init image"):
        engine.generate(GenerationRequest(prompt="x", model=str(models["four"]), mask=square_mask(), steps=1))


def test_cli_inpaint(tmp_path, models):
    from tests.test_cli import run

    (tmp_path / "home" / "models").mkdir(parents=True)
    shapes_image().save(tmp_path / "init.png")
    square_mask().save(tmp_path / "mask.png")
    proc = run(["inpaint", "init.png", "mask.png", "a blue square", "-m", str(models["nine"]), "--steps", "2",
                "--mask-blur", "2", "--seed", "3"], tmp_path, tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    saved = proc.stdout.split()[0]
    assert "img2img-images" in saved
    from sdstudio.storage.results import read_metadata

    meta = read_metadata(tmp_path / saved)
    assert "Mask blur: 2" in meta.infotext and meta.record["request"]["mode"] == "inpaint"
    missing = run(["inpaint", "init.png", "nope.png", "x", "-m", str(models["nine"])], tmp_path, tmp_path / "home")
    assert missing.returncode == 2 and "nope.png" in missing.stderr


@pytest.mark.parametrize("content", ["fill", "latent noise", "latent nothing"])
def test_masked_content_changes_only_where_the_mask_is(tmp_path, models, content):
    engine = Engine(make_settings(tmp_path, models["root"]))
    init, mask = shapes_image(), square_mask()
    req = GenerationRequest(prompt="a blue square", model=str(models["four"]), init_image=init, mask=mask,
                            mask_blur=0, strength=0.5, steps=4, sampler="Euler", seed=SEED)
    original = engine.generate(req)
    other = engine.generate(req.replace(masked_content=content))
    assert not torch.equal(original.latents, other.latents)
    model = engine.load(str(models["four"]))
    keep = inpaint_inputs(model.vae, init, mask, 64, 64, 8, nine_channel=False).mask[0, 0] == 0
    if content != "fill":  # fill re-encodes the whole image, so the kept latents move a little near the mask
        assert torch.allclose(other.latents[:, :, keep], original.latents[:, :, keep], atol=1e-5)
    assert f"Masked content: {content}" in other.images[0].infotext
    with pytest.raises(RequestError, match="masked_content must be one of"):
        engine.generate(req.replace(masked_content="blur"))


def test_fill_spreads_the_surrounding_colours():
    from sdstudio.engine.sd.inpaint import fill_masked

    image = Image.new("RGB", (64, 64), (30, 60, 200))
    ImageDraw.Draw(image).rectangle((16, 16, 48, 48), fill=(255, 0, 0))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    filled = fill_masked(image, mask).getpixel((32, 32))
    assert filled[2] > 150 and filled[0] < 80  # the red square is gone; blue from around it
