"""SDXL and the refiner in the one loop, against diffusers' SDXL pipelines on the same tiny components."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from sdstudio import Engine, GenerationRequest
from sdstudio.testing.tiny import build_tiny
from tests.conftest import make_settings
from tests.test_parity import assert_same, generators

SEED = 77


@pytest.fixture(scope="module")
def xl(tmp_path_factory) -> Engine:
    root = tmp_path_factory.mktemp("xl")
    build_tiny("sdxl", root / "tiny-xl", seed=3)
    build_tiny("sdxl-refiner", root / "tiny-refiner", seed=4)
    return Engine(make_settings(root / "home", root, default_model=str(root / "tiny-xl")))


def scheduler_from(result):
    config = result.images[0].record["sampler"]["config"]
    return getattr(diffusers, config["_class_name"]).from_config(config)


def xl_pipe(model, result):
    a, b = model.text.encoders
    ta, tb = model.text.tokenizers
    pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=a, text_encoder_2=b, tokenizer=ta, tokenizer_2=tb,
                                     unet=model.unet, scheduler=scheduler_from(result), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(("sampler", "negative"), [("Euler", ""), ("DPM++ 2M", "blurry"), ("Euler a", "")])
def test_sdxl_txt2img_matches_diffusers(xl, sampler, negative):
    req = GenerationRequest(prompt="a red circle", negative_prompt=negative, steps=5, cfg_scale=6.0,
                            sampler=sampler, seed=SEED, batch_size=2, width=96, height=64)
    result = xl.generate(req)
    model = xl.load()
    assert model.family == "sdxl" and model.is_xl
    pipe = xl_pipe(model, result)
    kwargs = dict(prompt=req.prompt, negative_prompt=negative or None, num_inference_steps=5, guidance_scale=6.0,
                  height=64, width=96, num_images_per_prompt=2)
    ref_latents = pipe(**kwargs, generator=generators(2, SEED), output_type="latent").images
    ref_images = pipe(**kwargs, generator=generators(2, SEED), output_type="pil").images
    assert_same(result.latents, [im.image for im in result.images], ref_latents, ref_images)


def test_sdxl_micro_conditioning_and_clip_skip_match_diffusers(xl):
    req = GenerationRequest(prompt="a blue square", steps=4, sampler="Euler", seed=SEED, width=64, height=64,
                            original_size=(128, 96), crop_left_top=(8, 16), clip_skip=2, guidance_rescale=0.5)
    result = xl.generate(req)
    pipe = xl_pipe(xl.load(), result)
    ref = pipe(prompt=req.prompt, num_inference_steps=4, guidance_scale=7.0, height=64, width=64,
               original_size=(96, 128), crops_coords_top_left=(16, 8), target_size=(64, 64), clip_skip=1,
               guidance_rescale=0.5, generator=generators(1, SEED), output_type="latent").images
    assert (result.latents - ref).abs().max() < 1e-4
    plain = xl.generate(req.replace(original_size=None, crop_left_top=(0, 0)))
    assert not torch.equal(plain.latents, result.latents)  # the time ids reach the UNet (weakly, in a tiny one)


def test_refiner_img2img_matches_diffusers(xl, init_image):
    req = GenerationRequest(prompt="a green triangle", negative_prompt="ugly", steps=8, cfg_scale=5.0,
                            sampler="Euler", seed=SEED, init_image=init_image, strength=0.5,
                            model=str(xl.model_ref().path.parent / "tiny-refiner"))
    result = xl.generate(req)
    model = xl.load(req.model)
    assert model.family == "sdxl-refiner" and len(model.text.encoders) == 1
    pipe = StableDiffusionXLImg2ImgPipeline(vae=model.vae, text_encoder=None, text_encoder_2=model.text.encoders[0],
                                            tokenizer=None, tokenizer_2=model.text.tokenizers[0], unet=model.unet,
                                            scheduler=scheduler_from(result), requires_aesthetics_score=True,
                                            add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    from sdstudio.engine.sd.stages import encode_image

    init = encode_image(model.vae, init_image, 64, 64, 8)
    ref = pipe(prompt=req.prompt, negative_prompt="ugly", image=init, strength=0.5, num_inference_steps=8,
               guidance_scale=5.0, generator=generators(1, SEED), output_type="latent").images
    assert (result.latents - ref).abs().max() < 1e-4
    changed = xl.generate(req.replace(aesthetic_score=2.0))
    assert not torch.equal(changed.latents, result.latents)  # the aesthetic score is conditioning


def test_zero_terminal_snr_schedule(xl):
    req = GenerationRequest(prompt="a circle", steps=4, sampler="Euler", seed=1, width=64, height=64,
                            zero_terminal_snr=True)
    result = xl.generate(req)
    config = result.images[0].record["sampler"]["config"]
    assert config["rescale_betas_zero_snr"] is True and config["timestep_spacing"] == "trailing"
    assert "Noise Schedule: Zero Terminal SNR" in result.images[0].infotext
    assert torch.isfinite(result.latents).all()
