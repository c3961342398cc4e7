"""Reproducibility contract: image k of a batch equals a batch of one with seed s + k; reruns are identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdstudio import GenerationRequest
from sdstudio.storage.results import save_result


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Batched and single runs differ only by float rounding in batched kernels: relative error < 1e-5
    (measured up to 3e-6 on the tiny random model, whose latents reach |50|)."""
    scale = max(1.0, a.abs().max().item())
    assert (a - b).abs().max().item() < 1e-5 * scale


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M", "DDIM", "LCM"])
def test_image_k_of_a_batch_equals_a_batch_of_one(engine, sampler):
    batch = engine.generate(GenerationRequest(prompt="a green triangle", steps=5, sampler=sampler, seed=77,
                                              batch_size=3))
    single = engine.generate(GenerationRequest(prompt="a green triangle", steps=5, sampler=sampler, seed=79))
    assert batch.seeds == [77, 78, 79]
    assert_close(batch.latents[2], single.latents[0])
    pixels = np.abs(np.asarray(batch.images[2].image, np.int16) - np.asarray(single.images[0].image, np.int16))
    assert pixels.max() <= 1


def test_n_iter_continues_the_seeds(engine):
    result = engine.generate(GenerationRequest(prompt="a circle", steps=3, seed=5, batch_size=2, n_iter=2))
    assert result.seeds == [5, 6, 7, 8]
    assert [im.index for im in result.images] == [0, 1, 2, 3]
    single = engine.generate(GenerationRequest(prompt="a circle", steps=3, seed=8))
    assert_close(result.latents[3], single.latents[0])


def test_different_seeds_give_different_images(engine):
    result = engine.generate(GenerationRequest(prompt="a circle", steps=3, seed=5, batch_size=2))
    assert (result.latents[0] - result.latents[1]).abs().max().item() > 0.1


def test_random_seed_is_resolved_and_recorded(engine):
    result = engine.generate(GenerationRequest(prompt="a circle", steps=2, seed=-1))
    seed = result.request.seed
    assert 0 <= seed < 2**32
    assert result.images[0].seed == seed
    assert f"Seed: {seed}," in result.images[0].infotext
    again = engine.generate(GenerationRequest(prompt="a circle", steps=2, seed=seed))
    assert torch.equal(again.latents, result.latents)


def test_repeated_runs_write_identical_files(engine, tmp_path):
    req = GenerationRequest(prompt="a red square", steps=4, sampler="Euler a", seed=11, batch_size=2)
    first = save_result(engine.generate(req), tmp_path / "a")
    second = save_result(engine.generate(req), tmp_path / "b")
    for x, y in zip(first, second, strict=True):
        assert x.path.name == y.path.name
        assert x.path.read_bytes() == y.path.read_bytes()


def test_noise_is_drawn_from_a_cpu_generator_per_image(engine):
    """Image i starts from randn((1, C, h, w), generator=Generator('cpu').manual_seed(s + i))."""
    from sdstudio.engine.sd.stages import initial_noise, make_generators

    noise = initial_noise(make_generators([3, 4]), (4, 8, 8), torch.device("cpu"), torch.float32)
    expected = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(4))
    assert torch.equal(noise[1:], expected)
    assert np.isfinite(noise.numpy()).all()


def test_on_cpu_each_image_is_computed_alone_so_its_batch_does_not_matter(engine):
    """Contract (b) on CPU, bit for bit: the UNet runs image by image (engine/sd/rows.py), so every image goes
    through calls of the same shape whatever the batch size, on any CPU's kernels."""
    assert engine.load().per_image
    batch = engine.generate(GenerationRequest(prompt="a green triangle", steps=4, seed=70, batch_size=3,
                                              sampler="Euler a"))
    single = engine.generate(GenerationRequest(prompt="a green triangle", steps=4, seed=72, sampler="Euler a"))
    assert torch.equal(batch.latents[2], single.latents[0])


def test_a_batched_unet_stays_within_float_rounding(tmp_path, tiny_model):
    """SDSTUDIO_BATCH_INVARIANT=off (the GPU default) batches the UNet: within rounding, one 8-bit level."""
    from dataclasses import replace

    from sdstudio import Engine
    from tests.conftest import make_settings

    batched = Engine(replace(make_settings(tmp_path, tiny_model.parent, str(tiny_model)), batch_invariant="off"))
    assert not batched.load().per_image
    batch = batched.generate(GenerationRequest(prompt="a green triangle", steps=4, seed=70, batch_size=3))
    single = batched.generate(GenerationRequest(prompt="a green triangle", steps=4, seed=72))
    assert_close(batch.latents[2], single.latents[0])
    pixels = np.abs(np.asarray(batch.images[2].image, np.int16) - np.asarray(single.images[0].image, np.int16))
    assert pixels.max() <= 1


def test_per_image_keeps_the_row_order_and_checks_between_images():
    from sdstudio.engine.sd.rows import per_image

    x = torch.arange(12.0).reshape(6, 2)  # 3 groups (negative + 2 prompts) x 2 images, group-major
    context = torch.arange(6.0).reshape(6, 1)

    def net(rows, encoder_hidden_states, scale):
        assert rows.shape[0] == 3  # one image's rows: one per group
        return rows * scale + encoder_hidden_states, [rows.sum(1)]

    out, (sums,) = per_image(net, x, {"encoder_hidden_states": context, "scale": 2.0}, 2)
    torch.testing.assert_close(out, x * 2 + context, rtol=0, atol=0)
    torch.testing.assert_close(sums, x.sum(1), rtol=0, atol=0)
    checks = []
    per_image(net, x, {"encoder_hidden_states": context, "scale": 1.0}, 2, lambda: checks.append(1))
    assert checks == [1]  # before the second image
