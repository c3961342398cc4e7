"""ControlNet in the one loop, against diffusers' ControlNet pipelines on tiny components."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from PIL import Image, ImageDraw

from sdstudio import Engine, GenerationRequest
from sdstudio.engine.requests import ControlUnit
from sdstudio.errors import RequestError
from sdstudio.testing.tiny import build_tiny
from tests.conftest import make_settings, shapes_image
from tests.test_parity import generators

SEED = 8


def tiny_controlnet(unet_folder, out, seed: int):
    """A ControlNet shaped after the tiny UNet, every weight random (zero convs too, so it acts)."""
    unet = UNet2DConditionModel.from_pretrained(unet_folder, subfolder="unet")
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    net.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    model = build_tiny("sd1", root / "sd1", seed=3)
    nets = root / "controlnet"
    tiny_controlnet(model, nets / "edges", 1)
    tiny_controlnet(model, nets / "second", 2)
    engine = Engine(make_settings(root / "home", root))
    engine.folders = type(engine.folders)(**{**engine.folders.__dict__, "controlnet": (nets,)})
    return engine, model, nets


def control_picture() -> Image.Image:
    image = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(image).ellipse((10, 10, 40, 40), outline="white", width=2)
    return image


def diffusers_pipe(cls, engine, model, result, controlnet):
    loaded = engine.load(str(model))
    config = result.images[0].record["sampler"]["config"]
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    pipe = cls(vae=loaded.vae, text_encoder=loaded.text.encoders[0], tokenizer=loaded.text.tokenizers[0],
               unet=loaded.unet, controlnet=controlnet, scheduler=scheduler, safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def net(nets, name):
    return ControlNetModel.from_pretrained(nets / name)


@pytest.mark.parametrize("guess_mode,start,end", [(False, 0.0, 1.0), (True, 0.25, 0.75)])
def test_txt2img_matches_diffusers(setup, guess_mode, start, end):
    engine, model, nets = setup
    unit = ControlUnit("edges", control_picture(), weight=0.8, start=start, end=end, guess_mode=guess_mode)
    req = GenerationRequest(prompt="a red circle", model=str(model), steps=4, sampler="Euler", seed=SEED,
                            width=64, height=64, controlnets=(unit,))
    result = engine.generate(req)
    pipe = diffusers_pipe(StableDiffusionControlNetPipeline, engine, model, result, net(nets, "edges"))
    ref = pipe(prompt="a red circle", image=control_picture(), num_inference_steps=4, guidance_scale=7.0,
               height=64, width=64, controlnet_conditioning_scale=0.8, guess_mode=guess_mode,
               control_guidance_start=start, control_guidance_end=end, generator=generators(1, SEED),
               output_type="latent").images
    assert (result.latents - ref).abs().max() < 1e-4
    plain = engine.generate(req.replace(controlnets=()))
    assert (result.latents - plain.latents).abs().max() > 1e-3  # the unit acts
    info = result.images[0].infotext
    assert "ControlNet 0: \"Module: none, Model: edges [" in info and "Weight: 0.8" in info


def test_multi_controlnet_matches_diffusers(setup):
    engine, model, nets = setup
    second = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(second).rectangle((30, 30, 60, 60), outline="white", width=2)
    units = (ControlUnit("edges", control_picture(), weight=0.7), ControlUnit("second", second, weight=1.2))
    req = GenerationRequest(prompt="shapes", model=str(model), steps=3, sampler="DPM++ 2M", seed=SEED,
                            controlnets=units)
    result = engine.generate(req)
    pipe = diffusers_pipe(StableDiffusionControlNetPipeline, engine, model, result,
                          [net(nets, "edges"), net(nets, "second")])
    ref = pipe(prompt="shapes", image=[control_picture(), second], num_inference_steps=3, guidance_scale=7.0,
               height=64, width=64, controlnet_conditioning_scale=[0.7, 1.2], generator=generators(1, SEED),
               output_type="latent").images
    assert (result.latents - ref).abs().max() < 1e-4
    assert "ControlNet 1:" in result.images[0].infotext


def test_inpaint_with_the_inpaint_preprocessor_matches_diffusers(setup):
    engine, model, nets = setup
    init = shapes_image()
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((8, 16, 40, 48), fill=255)
    unit = ControlUnit("edges", preprocessor="inpaint")
    req = GenerationRequest(prompt="a blue square", model=str(model), init_image=init, mask=mask, mask_blur=0,
                            strength=1.0, steps=4, sampler="Euler", seed=SEED, controlnets=(unit,))
    result = engine.generate(req)
    pipe = diffusers_pipe(StableDiffusionControlNetInpaintPipeline, engine, model, result, net(nets, "edges"))
    vae = pipe.vae  # (this pipeline's default conditioning scale is 0.5; ours is A1111's 1)
    # diffusers samples the VAE posterior; we use its mean (see test_inpaint): hand it the mean
    pipe._encode_vae_image = lambda image, generator: vae.encode(image).latent_dist.mean * vae.config.scaling_factor
    control = np.asarray(init, np.float32) / 255.0
    control[np.asarray(mask) > 127] = -1.0  # the seeds' make_inpaint_condition
    control = torch.from_numpy(control).permute(2, 0, 1)[None]
    ref = pipe(prompt="a blue square", image=init, mask_image=mask, control_image=control, strength=1.0,
               controlnet_conditioning_scale=1.0, num_inference_steps=4, guidance_scale=7.0, height=64, width=64,
               generator=generators(1, SEED), output_type="latent").images
    assert (result.latents - ref).abs().max() < 1e-4


def test_img2img_takes_the_init_image_as_control_and_preprocessors_run(setup):
    engine, model, _ = setup
    for preprocessor in ("canny", "scribble", "lineart", "tile", "shuffle", "invert"):
        unit = ControlUnit("edges", preprocessor=preprocessor, resize_mode="crop")
        result = engine.generate(GenerationRequest(prompt="x", model=str(model), init_image=shapes_image(96),
                                                   strength=0.5, steps=2, seed=1, controlnets=(unit,)))
        assert f"Module: {preprocessor}" in result.images[0].infotext


def test_bad_units_are_clear_errors(setup):
    engine, model, _ = setup
    base = GenerationRequest(prompt="x", model=str(model), steps=1)
    cases = [
        (ControlUnit("nope", control_picture()), "unknown ControlNet"),
        (ControlUnit("edges", control_picture(), preprocessor="magic"), "unknown preprocessor 'magic'"),
        (ControlUnit("edges", control_picture(), start=0.8, end=0.2), "start < end"),
        (ControlUnit("edges", control_picture(), resize_mode="stretch"), "resize_mode must be one of"),
        (ControlUnit("edges"), "needs a control image"),
        (ControlUnit("edges", preprocessor="inpaint"), "needs an init image and a mask"),
        (ControlUnit("edges", control_picture(), preprocessor="openpose"), "body_pose_model.pth"),
    ]
    for unit, message in cases:
        with pytest.raises(RequestError, match=message):
            engine.generate(base.replace(controlnets=(unit,)))


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_single_file_controlnet_gives_the_same_image_as_the_folder(setup, tmp_path, layout):
    from safetensors.torch import save_file

    from sdstudio.models.tools.ldm_keys import controlnet_to_ldm

    engine, model, nets = setup
    state = net(nets, "edges").state_dict()
    if layout == "original":  # lllyasviel's layout, as control_*.safetensors ship
        state = {"control_model." + k: v for k, v in controlnet_to_ldm(state).items()}
    file = tmp_path / "edges.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, file)
    req = GenerationRequest(prompt="a red circle", model=str(model), steps=3, sampler="Euler", seed=SEED,
                            controlnets=(ControlUnit("edges", control_picture()),))
    folder = engine.generate(req)
    single = engine.generate(req.replace(controlnets=(ControlUnit(str(file), control_picture()),)))
    assert torch.equal(folder.latents, single.latents)
    with pytest.raises(RequestError, match="not a ControlNet"):
        bad = tmp_path / "bad.safetensors"
        save_file({"x": torch.zeros(1)}, bad)
        engine.generate(req.replace(controlnets=(ControlUnit(str(bad), control_picture()),)))


def test_img2img_matches_diffusers(setup):
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    from sdstudio.engine.sd.stages import encode_image

    engine, model, nets = setup
    init = shapes_image()
    req = GenerationRequest(prompt="a blue square", model=str(model), init_image=init, strength=0.6, steps=5,
                            sampler="Euler", seed=SEED, controlnets=(ControlUnit("edges", control_picture()),))
    result = engine.generate(req)
    pipe = diffusers_pipe(StableDiffusionControlNetImg2ImgPipeline, engine, model, result, net(nets, "edges"))
    z0 = encode_image(pipe.vae, init, 64, 64, 8)  # our posterior mean, as in test_parity
    ref = pipe(prompt="a blue square", image=z0, control_image=control_picture(), strength=0.6,
               controlnet_conditioning_scale=1.0, num_inference_steps=5, guidance_scale=7.0, height=64, width=64,
               generator=generators(1, SEED), output_type="latent").images
    assert (result.latents - ref).abs().max() < 1e-4


def test_sdxl_matches_diffusers(tmp_path):
    from diffusers import StableDiffusionXLControlNetPipeline

    from tests.test_sdxl import scheduler_from

    model = build_tiny("sdxl", tmp_path / "xl", seed=3)
    tiny_controlnet(model, tmp_path / "controlnet" / "xl-edges", 4)
    engine = Engine(make_settings(tmp_path / "home", tmp_path))
    engine.folders = type(engine.folders)(**{**engine.folders.__dict__, "controlnet": (tmp_path / "controlnet",)})
    unit = ControlUnit("xl-edges", control_picture(), weight=0.9, guess_mode=True)
    req = GenerationRequest(prompt="a red circle", model=str(model), steps=4, sampler="Euler", seed=SEED,
                            width=64, height=64, controlnets=(unit,))
    result = engine.generate(req)
    loaded = engine.load(str(model))
    (a, b), (ta, tb) = loaded.text.encoders, loaded.text.tokenizers
    pipe = StableDiffusionXLControlNetPipeline(vae=loaded.vae, text_encoder=a, text_encoder_2=b, tokenizer=ta,
                                               tokenizer_2=tb, unet=loaded.unet,
                                               controlnet=net(tmp_path / "controlnet", "xl-edges"),
                                               scheduler=scheduler_from(result), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt="a red circle", image=control_picture(), num_inference_steps=4, guidance_scale=7.0,
               height=64, width=64, controlnet_conditioning_scale=0.9, guess_mode=True,
               generator=generators(1, SEED), output_type="latent").images
    assert (result.latents - ref).abs().max() < 1e-4


def test_cli_controlnet_option(setup, tmp_path):
    from sdstudio.storage.results import read_metadata
    from tests.test_cli import run

    _, model, nets = setup
    (tmp_path / "home").mkdir()
    control_picture().save(tmp_path / "edges.png")
    spec = f"model={nets / 'edges'},image=edges.png,weight=0.5,end=0.8"
    proc = run(["txt2img", "a circle", "-m", str(model), "--steps", "2", "--seed", "1", "--controlnet", spec],
               tmp_path, tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    info = read_metadata(tmp_path / proc.stdout.split()[0]).infotext
    assert "ControlNet 0:" in info and "Weight: 0.5" in info and "Guidance End: 0.8" in info
    bad = run(["txt2img", "a circle", "-m", str(model), "--controlnet", "image=edges.png"], tmp_path, tmp_path / "home")
    assert bad.returncode == 2 and "needs model=NAME" in bad.stderr
