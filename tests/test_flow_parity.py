"""The flow loop against diffusers' SD3 and Flux pipelines on the same tiny components, schedulers and seeds."""

from __future__ import annotations

import sys

import pytest
import torch
from diffusers import (
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
)
from PIL import Image, ImageDraw

from sdstudio import GenerationRequest
from sdstudio.engine.flow.latents import encode_image, unpack
from tests.conftest import shapes_image
from tests.test_parity import SEED, assert_close_latents, assert_same, generators

PROMPT = "a small red circle at the top left"


PIPELINES = {"tiny-sd3": StableDiffusion3Pipeline, "tiny-sd3-no-t5": StableDiffusion3Pipeline,
             "tiny-flux-dev": FluxPipeline, "tiny-flux-schnell": FluxPipeline}


def reference(flow_models, name: str, cls=None):
    without_t5 = {"text_encoder_3": None, "tokenizer_3": None} if name.endswith("no-t5") else {}
    pipe = (cls or PIPELINES[name]).from_pretrained(flow_models / name, local_files_only=True, **without_t5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unpacked(pipe, latents: torch.Tensor, size: int = 64) -> torch.Tensor:
    """Flux pipelines return packed latents: (B, tokens, 64) -> (B, 16, h, w)."""
    return unpack(latents, size // 8, size // 8) if latents.ndim == 3 else latents


def run_both(engine, flow_models, name, req: GenerationRequest, cls=None, **kwargs):
    """Our result and the pipeline's (latents, images) for the same request."""
    result = engine.generate(req)
    pipe = reference(flow_models, name, cls)
    common = dict(height=req.height, width=req.width, num_inference_steps=req.steps, **kwargs)
    ref_latents = unpacked(pipe, pipe(**common, generator=generators(req.batch_size), output_type="latent").images)
    ref_images = pipe(**common, generator=generators(req.batch_size), output_type="pil").images
    return result, ref_latents, ref_images


def check(result, ref_latents, ref_images):
    assert_same(result.latents, [im.image for im in result.images], ref_latents, ref_images)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd3-no-t5"])
@pytest.mark.parametrize(("negative", "cfg"), [("", 5.0), ("blurry, green", 5.0), ("", 1.0)])
def test_sd3_txt2img_matches_diffusers(flow_engine, flow_models, name, negative, cfg):
    req = GenerationRequest(prompt=PROMPT, negative_prompt=negative, width=64, height=64, steps=5, cfg_scale=cfg,
                            seed=SEED, batch_size=2, model=name)
    check(*run_both(flow_engine, flow_models, name, req, prompt=[PROMPT] * 2, negative_prompt=[negative] * 2,
                    guidance_scale=cfg))


@pytest.mark.parametrize("guidance", [1.0, 3.5, 7.0])
def test_flux_dev_distilled_guidance_matches_diffusers(flow_engine, flow_models, guidance):
    req = GenerationRequest(prompt=PROMPT, width=64, height=64, steps=4, cfg_scale=1.0, distilled_cfg_scale=guidance,
                            seed=SEED, batch_size=2, model="tiny-flux-dev")
    check(*run_both(flow_engine, flow_models, "tiny-flux-dev", req, prompt=[PROMPT] * 2, guidance_scale=guidance))


def test_flux_guidance_changes_the_image(flow_engine):
    def latents(g):
        return flow_engine.generate(GenerationRequest(prompt=PROMPT, width=64, height=64, steps=3, cfg_scale=1.0,
                                                      distilled_cfg_scale=g, seed=SEED, model="tiny-flux-dev")).latents
    assert not torch.allclose(latents(1.0), latents(6.0), atol=1e-3)


def test_flux_true_cfg_with_a_negative_prompt_matches_diffusers(flow_engine, flow_models):
    req = GenerationRequest(prompt=PROMPT, negative_prompt="blurry", width=64, height=64, steps=3, cfg_scale=4.0,
                            seed=SEED, model="tiny-flux-dev")
    result, ref_latents, ref_images = run_both(flow_engine, flow_models, "tiny-flux-dev", req, prompt=PROMPT,
                                               negative_prompt="blurry", true_cfg_scale=4.0, guidance_scale=3.5)
    check(result, ref_latents, ref_images)
    assert any("true CFG" in w for w in result.warnings)


@pytest.mark.parametrize("size", [(64, 64), (96, 64)])
def test_flux_schnell_matches_diffusers(flow_engine, flow_models, size):
    req = GenerationRequest(prompt=PROMPT, width=size[0], height=size[1], steps=4, cfg_scale=1.0, seed=SEED,
                            batch_size=2, model="tiny-flux-schnell")
    result = flow_engine.generate(req)
    pipe = reference(flow_models, "tiny-flux-schnell")
    ref = pipe(prompt=[PROMPT] * 2, width=size[0], height=size[1], num_inference_steps=4, generator=generators(2),
               output_type="latent").images
    ref = unpack(ref, size[1] // 8, size[0] // 8)
    images = pipe(prompt=[PROMPT] * 2, width=size[0], height=size[1], num_inference_steps=4, generator=generators(2),
                  output_type="pil").images
    check(result, ref, images)
    assert result.images[0].image.size == size


@pytest.mark.parametrize(("name", "cls"), [("tiny-sd3", StableDiffusion3Img2ImgPipeline),
                                           ("tiny-flux-dev", FluxImg2ImgPipeline)])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_matches_diffusers(flow_engine, flow_models, name, cls, strength):
    init = shapes_image()
    cfg = 4.0 if "sd3" in name else 1.0
    req = GenerationRequest(prompt=PROMPT, negative_prompt="", width=64, height=64, steps=6, cfg_scale=cfg,
                            seed=SEED, batch_size=2, model=name, init_image=init, strength=strength)
    model = flow_engine.families.get("flow").models.get(flow_engine.model_ref(name))
    # diffusers samples the VAE posterior with each image's generator; we take its mean, so that image i still
    # starts from randn(seed + i). Handing the pipeline our latents compares everything after encoding.
    z0 = encode_image(model, init, 64, 64).repeat(2, 1, 1, 1)
    check(*run_both(flow_engine, flow_models, name, req, cls, prompt=[PROMPT] * 2, image=z0, strength=strength,
                    guidance_scale=cfg if "sd3" in name else 3.5))


def test_encoded_latents_are_the_shifted_posterior_mean(flow_engine):
    model = flow_engine.families.get("flow").models.get(flow_engine.model_ref("tiny-flux-dev"))
    pixels = torch.from_numpy(__import__("numpy").asarray(shapes_image(), "float32") / 127.5 - 1).permute(2, 0, 1)
    mean = model.vae.encode(pixels[None]).latent_dist.mean
    expected = (mean - model.vae.config.shift_factor) * model.vae.config.scaling_factor
    assert torch.allclose(encode_image(model, shapes_image(), 64, 64), expected, atol=1e-4)


def corner_mask(size: int = 64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, size // 2 - 1, size // 2 - 1), fill=255)
    return mask


@pytest.mark.parametrize(("name", "cls"), [("tiny-sd3", StableDiffusion3InpaintPipeline),
                                           ("tiny-flux-dev", FluxInpaintPipeline)])
@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_inpaint_blend_matches_diffusers(flow_engine, flow_models, monkeypatch, name, cls, strength):
    init, mask = shapes_image(), corner_mask()
    cfg = 4.0 if "sd3" in name else 1.0
    req = GenerationRequest(prompt=PROMPT, width=64, height=64, steps=6, cfg_scale=cfg, seed=SEED, batch_size=2,
                            model=name, init_image=init, mask=mask, mask_blur=0, strength=strength,
                            keep_unmasked=False)
    # the inpainting pipelines encode the picture themselves, sampling the posterior with each image's generator;
    # we take its mean (nothing drawn), so their encoder reads the mean here too
    monkeypatch.setattr(sys.modules[cls.__module__], "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": output.latent_dist.mode())
    result, ref_latents, ref_images = run_both(flow_engine, flow_models, name, req, cls, prompt=[PROMPT] * 2,
                                               image=init, mask_image=mask, strength=strength,
                                               guidance_scale=cfg if "sd3" in name else 3.5)
    if cls is StableDiffusion3InpaintPipeline:  # it decodes z / scaling_factor without adding the VAE's
        assert_close_latents(result.latents, ref_latents)  # shift_factor back, unlike SD3's other pipelines
    else:
        check(result, ref_latents, ref_images)
    # the kept three quarters are the init image's latents, where the mask is black at latent size
    model = flow_engine.families.get("flow").models.get(flow_engine.model_ref(name))
    z0 = encode_image(model, init, 64, 64)
    assert torch.allclose(result.latents[:, :, 4:, :], z0[:, :, 4:, :], atol=1e-5)
    assert torch.allclose(result.latents[:, :, :, 4:], z0[:, :, :, 4:], atol=1e-5)
