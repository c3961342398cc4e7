"""ControlNets on SD3 and Flux against diffusers' ControlNet pipelines, Union modes, and the refusals."""

from __future__ import annotations

import sys

import pytest
import torch
from diffusers import FluxControlNetPipeline, StableDiffusion3ControlNetPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from sdstudio import Engine, GenerationRequest
from sdstudio.engine.flow.latents import unpack
from sdstudio.engine.requests import ControlUnit
from sdstudio.engine.sd.control import control_image
from sdstudio.errors import RequestError
from sdstudio.testing.tiny_flow import build_tiny_flow_controlnet
from tests.conftest import make_settings, shapes_image
from tests.test_parity import SEED, assert_same, generators

PROMPT = "a small red circle"


@pytest.fixture(scope="module")
def control_engine(flow_models, tmp_path_factory):
    home = tmp_path_factory.mktemp("flow-control-home")
    folder = home / "controlnet"
    build_tiny_flow_controlnet(folder / "flux-cn", "flux", seed=1)
    build_tiny_flow_controlnet(folder / "flux-union", "flux", union=True, seed=2)
    build_tiny_flow_controlnet(folder / "sd3-cn", "sd3", seed=3)
    return Engine(make_settings(home, flow_models)), folder


def reference(flow_models, control_folder, model, net_name):
    from diffusers import FluxControlNetModel, SD3ControlNetModel

    if model.startswith("tiny-flux"):
        cls, net = FluxControlNetPipeline, FluxControlNetModel.from_pretrained(control_folder / net_name)
    else:
        cls, net = StableDiffusion3ControlNetPipeline, SD3ControlNetModel.from_pretrained(control_folder / net_name)
    pipe = cls.from_pretrained(flow_models / model, controlnet=net, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = [("tiny-flux-dev", "flux-cn", "none", None), ("tiny-flux-dev", "flux-union", "canny", 0),
         ("tiny-sd3", "sd3-cn", "none", None)]


@pytest.mark.parametrize(("model", "net", "preprocessor", "mode"), CASES)
def test_controlnet_matches_diffusers(control_engine, flow_models, monkeypatch, model, net, preprocessor, mode):
    engine, folder = control_engine
    picture = shapes_image()
    unit = ControlUnit(model=net, image=picture, preprocessor=preprocessor, weight=0.8, start=0.0, end=0.75)
    cfg = 4.0 if model == "tiny-sd3" else 1.0
    req = GenerationRequest(prompt=PROMPT, width=64, height=64, steps=4, cfg_scale=cfg, seed=SEED, batch_size=2,
                            model=model, controlnets=(unit,))
    result = engine.generate(req)
    assert "ControlNet 0" in result.images[0].infotext
    # the pipelines sample the VAE posterior of the control picture; we take its mean
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    monkeypatch.setattr(sys.modules[FluxControlNetPipeline.__module__], "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": output.latent_dist.mode())
    pipe = reference(flow_models, folder, model, net)
    hint = control_image(unit, 64, 64, None, None)  # the preprocessed picture, as the unit's ControlNet sees it
    extra = {"control_mode": mode} if mode is not None else {}
    guidance = {"guidance_scale": cfg} if model == "tiny-sd3" else {"guidance_scale": 3.5}
    kwargs = dict(prompt=[PROMPT] * 2, control_image=hint, controlnet_conditioning_scale=0.8,
                  control_guidance_start=0.0, control_guidance_end=0.75, width=64, height=64, num_inference_steps=4,
                  **guidance, **extra)
    latents = pipe(**kwargs, generator=generators(2), output_type="latent").images
    latents = unpack(latents, 8, 8) if latents.ndim == 3 else latents
    images = pipe(**kwargs, generator=generators(2), output_type="pil").images
    assert_same(result.latents, [im.image for im in result.images], latents, images)
    plain = engine.generate(GenerationRequest(prompt=PROMPT, width=64, height=64, steps=4, cfg_scale=cfg, seed=SEED,
                                              batch_size=2, model=model)).latents
    assert not torch.allclose(plain, result.latents, atol=1e-3)  # the unit changed the picture


def test_union_control_type_comes_from_the_preprocessor(control_engine):
    engine, _ = control_engine
    unit = ControlUnit(model="flux-union", image=shapes_image(), preprocessor="scribble")
    with pytest.raises(RequestError, match="Union ControlNet"):
        engine.generate(GenerationRequest(prompt=PROMPT, width=64, height=64, steps=1, cfg_scale=1.0,
                                          model="tiny-flux-dev", controlnets=(unit,)))


def test_a_controlnet_of_another_family_is_named(control_engine):
    engine, _ = control_engine
    unit = ControlUnit(model="sd3-cn", image=shapes_image())
    with pytest.raises(RequestError, match="is for SD3 models"):
        engine.generate(GenerationRequest(prompt=PROMPT, width=64, height=64, steps=1, cfg_scale=1.0,
                                          model="tiny-flux-dev", controlnets=(unit,)))
    with pytest.raises(RequestError, match="unknown ControlNet"):
        engine.prepare(GenerationRequest(prompt=PROMPT, model="tiny-flux-dev",
                                         controlnets=(ControlUnit(model="nope", image=shapes_image()),)))
