"""Our one loop against diffusers' own pipelines on the same tiny components, scheduler config and seeds."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from sdstudio import GenerationRequest
from sdstudio.engine.sd.stages import encode_image

SAMPLERS = [("Euler", "Automatic"), ("DDIM", "Automatic"), ("DPM++ 2M", "Karras"), ("UniPC", "Automatic")]
# max |ours - diffusers| / max |diffusers| on final latents. float32 rounding differs with the CPU's kernels and
# with batching (image by image vs batched; a branch in its own UNet call): measured up to 6e-6 on an AMD EPYC
# (|latents| ~ 20-40 in these random tiny models), ~1e-7 on an Intel Xeon
LATENT_RTOL = 1.5e-5
SEED = 1234


def diffusers_pipe(cls, model, scheduler_config):
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    pipe = cls(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
               scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(n: int, seed: int = SEED) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def engine_for(prediction, engine, v_engine):
    return engine if prediction == "epsilon" else v_engine


def assert_close_latents(ours: torch.Tensor, ref: torch.Tensor) -> None:
    diff, size = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert diff <= LATENT_RTOL * size, f"latents differ by {diff} (largest |latent| {size})"


def assert_same(ours_latents, ours_images, ref_latents, ref_images):
    assert_close_latents(ours_latents, ref_latents)
    for mine, theirs in zip(ours_images, ref_images, strict=True):
        pixel_diff = np.abs(np.asarray(mine, np.int16) - np.asarray(theirs, np.int16)).max()
        assert pixel_diff <= 1, f"images differ by {pixel_diff} levels"


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("sampler", "schedule"), SAMPLERS)
@pytest.mark.parametrize("negative", ["", "blurry, green"])
def test_txt2img_matches_diffusers(engine, v_engine, prediction, sampler, schedule, negative):
    eng = engine_for(prediction, engine, v_engine)
    req = GenerationRequest(prompt="a small red circle at the top left", negative_prompt=negative, steps=6,
                            cfg_scale=7.5, sampler=sampler, schedule=schedule, seed=SEED, batch_size=2)
    result = eng.generate(req)
    model = eng.load()
    assert model.prediction_type == prediction
    config = result.images[0].record["sampler"]["config"]
    pipe = diffusers_pipe(StableDiffusionPipeline, model, config)
    kwargs = dict(prompt=req.prompt, negative_prompt=negative or None, num_inference_steps=6, guidance_scale=7.5,
                  height=64, width=64, num_images_per_prompt=2)
    ref_latents = pipe(**kwargs, generator=generators(2), output_type="latent").images
    ref_images = pipe(**kwargs, generator=generators(2), output_type="pil").images
    assert_same(result.latents, [im.image for im in result.images], ref_latents, ref_images)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("sampler", "schedule"), SAMPLERS)
@pytest.mark.parametrize("negative", ["", "blurry, green"])
def test_img2img_matches_diffusers(engine, v_engine, init_image, prediction, sampler, schedule, negative):
    eng = engine_for(prediction, engine, v_engine)
    req = GenerationRequest(prompt="a big blue square", negative_prompt=negative, steps=10, cfg_scale=6.0,
                            sampler=sampler, schedule=schedule, seed=SEED, batch_size=2, init_image=init_image,
                            strength=0.55)
    result = eng.generate(req)
    model = eng.load()
    pipe = diffusers_pipe(StableDiffusionImg2ImgPipeline, model, result.images[0].record["sampler"]["config"])
    # diffusers samples the VAE posterior with the generator; we use its mean so that image i still starts
    # from randn(seed + i). Handing diffusers our encoded latents compares everything after encoding.
    init_latents = encode_image(model.vae, init_image, 64, 64, 8).repeat(2, 1, 1, 1)
    kwargs = dict(prompt=req.prompt, negative_prompt=negative or None, image=init_latents, strength=0.55,
                  num_inference_steps=10, guidance_scale=6.0, num_images_per_prompt=1)
    ref_latents = pipe(**dict(kwargs, prompt=[req.prompt] * 2, negative_prompt=[negative] * 2 if negative else None),
                       generator=generators(2), output_type="latent").images
    ref_images = pipe(**dict(kwargs, prompt=[req.prompt] * 2, negative_prompt=[negative] * 2 if negative else None),
                      generator=generators(2), output_type="pil").images
    assert_same(result.latents, [im.image for im in result.images], ref_latents, ref_images)


def test_encode_image_is_the_vae_posterior_mean(engine, init_image):
    model = engine.load()
    pixels = torch.from_numpy(np.asarray(init_image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    expected = model.vae.encode(pixels).latent_dist.mean * model.vae.config.scaling_factor
    assert torch.allclose(encode_image(model.vae, init_image, 64, 64, 8), expected, atol=1e-4)


def test_cfg_at_most_one_runs_a_single_branch(engine):
    model = engine.load()
    calls = []
    handle = model.unet.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        engine.generate(GenerationRequest(prompt="a circle", steps=3, cfg_scale=1.0, sampler="Euler", seed=1))
        engine.generate(GenerationRequest(prompt="a circle", steps=3, cfg_scale=3.0, sampler="Euler", seed=1))
    finally:
        handle.remove()
    assert calls == [1, 1, 1, 2, 2, 2]
