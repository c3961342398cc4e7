"""Speed settings (models/load/speed.py): channels_last and torch.compile change speed, not images."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sdstudio import Engine, GenerationRequest
from tests.conftest import make_settings

REQUEST = GenerationRequest(prompt="a circle", steps=3, sampler="Euler", seed=4, width=64, height=64)


def engine_with(tmp_path, tiny_model, **speed) -> Engine:
    settings = make_settings(tmp_path / "-".join(f"{k}={v}" for k, v in speed.items()), tiny_model.parent,
                             default_model=str(tiny_model))
    return Engine(replace(settings, **speed))


def test_channels_last_is_on_by_default_and_gives_the_same_image(tmp_path, tiny_model):
    fast, plain = engine_with(tmp_path, tiny_model), engine_with(tmp_path, tiny_model, channels_last=False)
    assert fast.load().unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.load().vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.load().unet.conv_in.weight.is_contiguous()
    a, b = fast.generate(REQUEST).latents, plain.generate(REQUEST).latents
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_compiled_unet_gives_the_same_image(tmp_path, tiny_model):
    compiled = engine_with(tmp_path, tiny_model, compile="unet")
    plain = engine_with(tmp_path, tiny_model, compile="none")
    a = compiled.generate(REQUEST).latents
    assert compiled.load().unet._compiled_call_impl is not None  # nn.Module.compile() in place: same class
    assert torch.allclose(a, plain.generate(REQUEST).latents, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("name", "value"), [("compile", "all"), ("compile_mode", "fastest")])
def test_unknown_speed_settings_are_refused(tmp_path, tiny_model, name, value):
    with pytest.raises(ValueError, match=name):
        engine_with(tmp_path, tiny_model, **{name: value})
