"""Bad input is refused before any work, with a message that says what to fix."""

from __future__ import annotations

import pytest
from PIL import Image

from sdstudio import GenerationRequest, ModelError, RequestError


@pytest.mark.parametrize(("changes", "field", "message"), [
    ({"width": 500}, "width", "width must be a multiple of 8, got 500 (nearest: 496)"),
    ({"height": 100}, "height", "height must be a multiple of 8, got 100"),
    ({"width": 8}, "width", "width must be between 64 and 4096, got 8"),
    ({"steps": 0}, "steps", "steps must be between 1 and 150, got 0"),
    ({"steps": 151}, "steps", "steps must be between 1 and 150, got 151"),
    ({"cfg_scale": -1}, "cfg_scale", "cfg_scale must be a number from 0 to 100.0, got -1"),
    ({"cfg_scale": float("inf")}, "cfg_scale", "cfg_scale must be a number from 0 to 100.0, got inf"),
    ({"prompt": "a \ud800 b"}, "prompt", "prompt is not valid text"),
    ({"strength": 1.5}, "strength", "strength must be between 0 and 1, got 1.5"),
    ({"batch_size": 9}, "batch_size", "batch_size must be between 1 and 8, got 9"),
    ({"n_iter": 0}, "n_iter", "n_iter must be between 1 and 100, got 0"),
    ({"seed": -2}, "seed", "seed must be between -1 and"),
    ({"steps": 2.5}, "steps", "steps must be a whole number, got 2.5"),
    ({"sampler": "Euler z"}, "sampler", "unknown sampler 'Euler z' (did you mean 'Euler a'?); valid samplers"),
])
def test_bad_fields(engine, changes, field, message):
    with pytest.raises(RequestError) as e:
        engine.generate(GenerationRequest(**{"prompt": "x", **changes}))
    assert message in str(e.value)
    assert e.value.field == field


def test_unknown_model_lists_available_models(engine, tiny_model):
    with pytest.raises(ModelError) as e:
        engine.generate(GenerationRequest(prompt="x", model="no-such-model"))
    assert "unknown model 'no-such-model'" in str(e.value)
    assert tiny_model.name in str(e.value)


def test_model_by_name_from_the_models_folder(engine, tiny_model):
    result = engine.generate(GenerationRequest(prompt="x", model=tiny_model.name, steps=2, seed=1))
    assert result.request.model == tiny_model.name


def test_a_corrupt_single_file_is_a_clear_error(engine, tmp_path):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match=r"model\.safetensors is not a readable safetensors file"):
        engine.generate(GenerationRequest(prompt="x", model=str(ckpt)))


def test_folder_without_model_index(engine, tmp_path):
    with pytest.raises(ModelError, match=r"no model_index\.json"):
        engine.generate(GenerationRequest(prompt="x", model=str(tmp_path)))


def test_img2img_size_defaults_to_the_init_image_rounded_to_the_factor(engine):
    image = Image.new("RGB", (83, 70), (200, 10, 10))
    result = engine.generate(GenerationRequest(prompt="x", steps=2, seed=1, init_image=image))
    assert (result.request.width, result.request.height) == (80, 64)
    assert result.images[0].image.size == (80, 64)


def test_strength_zero_returns_the_init_image(engine, init_image):
    result = engine.generate(GenerationRequest(prompt="x", steps=10, seed=1, init_image=init_image, strength=0.0))
    model = engine.load()
    from sdstudio.engine.sd.stages import encode_image

    assert (result.latents[0] - encode_image(model.vae, init_image, 64, 64, 8)[0]).abs().max() < 1e-5
