"""Variation seeds as A1111 defines them: slerp of two noises, seed resize from, infotext, CLI."""

from __future__ import annotations

import shutil

import pytest
import torch

from sdstudio.a1111.infotext import parse_infotext, request_fields
from sdstudio.engine.record import request_from_record
from sdstudio.engine.requests import GenerationRequest
from sdstudio.engine.sd.variation import paste_centred, slerp, start_noise
from sdstudio.errors import RequestError

from .test_cli import run

CPU = torch.device("cpu")


def req(**fields) -> GenerationRequest:
    base = {"prompt": "a red circle", "steps": 4, "sampler": "Euler", "seed": 11}
    return GenerationRequest.from_flat(**{**base, **fields})


def randn(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(seed))[0]


def test_slerp_ends_are_exact_and_the_middle_is_neither():
    low, high = randn(1, (4, 8, 8)), randn(2, (4, 8, 8))
    assert torch.equal(slerp(0.0, low, high), low)
    assert torch.equal(slerp(1.0, low, high), high)
    mid = slerp(0.5, low, high)
    assert not torch.allclose(mid, low) and not torch.allclose(mid, high)
    # spherical, not linear: the midpoint keeps about unit-noise length where a linear mix shrinks by ~1/sqrt(2)
    # (A1111 normalises along dim 1, so per channel and column)
    assert (mid.norm(dim=1) > (0.5 * low + 0.5 * high).norm(dim=1)).all()
    assert torch.equal(slerp(0.3, low, low), low * 0.3 + low * 0.7)  # nearly parallel: A1111's linear mix


def test_paste_centred_as_a1111():
    target, small = randn(1, (4, 12, 10)), randn(2, (4, 8, 6))
    out = paste_centred(target, small)
    assert torch.equal(out[:, 2:10, 2:8], small)
    out[:, 2:10, 2:8] = target[:, 2:10, 2:8]
    assert torch.equal(out, target)
    big = randn(3, (4, 16, 14))  # larger: its centre is cropped out
    assert torch.equal(paste_centred(target, big), big[:, 2:14, 2:12])


def test_start_noise_resized_keeps_the_from_size_noise_in_the_centre():
    r = req(seed_resize_from_w=64, seed_resize_from_h=64)
    gens = [torch.Generator("cpu").manual_seed(5)]
    noise = start_noise([5], gens, r, 0, (4, 12, 12), 8, CPU, torch.float32)[0]  # target 96x96, from 64x64
    assert torch.equal(noise[:, 2:10, 2:10], randn(5, (4, 8, 8)))
    target = randn(5, (4, 12, 12))
    border = torch.ones(12, 12, dtype=torch.bool)
    border[2:10, 2:10] = False
    assert torch.equal(noise[:, border], target[:, border])
    # the main seed's generator made exactly its one target-shape draw (step noise follows it)
    ref = torch.Generator("cpu").manual_seed(5)
    torch.randn((1, 4, 12, 12), generator=ref)
    assert torch.equal(torch.randn(3, generator=gens[0]), torch.randn(3, generator=ref))


def test_start_noise_variation_mixes_the_subseed_noise_drawn_at_the_from_size():
    r = req(seed=5, subseed=9, subseed_strength=0.4, seed_resize_from_w=64, seed_resize_from_h=64)
    noise = start_noise([5, 5], [torch.Generator("cpu").manual_seed(5) for _ in range(2)], r, 2, (4, 12, 12), 8,
                        CPU, torch.float32)
    for k in range(2):  # image 2 + k uses variation seed 9 + 2 + k
        expected = slerp(0.4, randn(5, (4, 8, 8)), randn(11 + k, (4, 8, 8)))
        assert torch.equal(noise[k, :, 2:10, 2:10], expected)


def test_strength_zero_is_the_plain_seed(engine):
    plain = engine.generate(req(batch_size=2))
    varied = engine.generate(req(batch_size=2, subseed=123, subseed_strength=0.0))
    assert torch.equal(plain.latents, varied.latents)
    assert varied.seeds == [11, 12]
    assert "Variation" not in varied.images[0].infotext


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_strength_one_is_the_subseed_and_half_is_neither(engine, sampler):
    full = engine.generate(req(sampler=sampler, subseed=77, subseed_strength=1.0))
    other = engine.generate(req(sampler=sampler, seed=77))
    assert torch.equal(full.latents, other.latents)
    assert full.images[0].image.tobytes() == other.images[0].image.tobytes()
    half = engine.generate(req(sampler=sampler, subseed=77, subseed_strength=0.5))
    plain = engine.generate(req(sampler=sampler))
    assert not torch.allclose(half.latents, plain.latents, atol=1e-3)
    assert not torch.allclose(half.latents, other.latents, atol=1e-3)


def test_a_variation_batch_keeps_the_seed_and_counts_the_subseed(engine):
    batch = engine.generate(req(batch_size=2, subseed=40, subseed_strength=0.3))
    assert batch.seeds == [11, 11]  # A1111: every image of a variation keeps the main seed
    assert "Variation seed: 41," in batch.images[1].infotext
    alone = engine.generate(req(subseed=41, subseed_strength=0.3))
    assert torch.equal(batch.latents[1:], alone.latents)
    again = engine.generate(GenerationRequest.from_flat(**request_from_record(batch.images[1].record)))
    assert torch.equal(again.latents, alone.latents)


def test_infotext_round_trip(engine):
    r = req(subseed=40, subseed_strength=0.25, width=96, height=64, seed_resize_from_w=64, seed_resize_from_h=64)
    result = engine.generate(r)
    text = result.images[0].infotext
    assert "Variation seed: 40, Variation seed strength: 0.25, Seed resize from: 64x64," in text
    fields = request_fields(parse_infotext(text))
    assert {k: fields[k] for k in ("subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h")} == {
        "subseed": 40, "subseed_strength": 0.25, "seed_resize_from_w": 64, "seed_resize_from_h": 64}
    again = engine.generate(GenerationRequest.from_flat(**{**fields, "model": None}))
    assert torch.equal(again.latents, result.latents)


def test_a_random_subseed_is_fixed_and_recorded_only_when_used(engine):
    used = engine.generate(req(subseed_strength=0.5))
    assert used.request.variation.seed >= 0
    assert f"Variation seed: {used.request.variation.seed}," in used.images[0].infotext
    assert used.images[0].record["request"]["subseed"] == used.request.variation.seed
    assert engine.generate(req()).request.variation.seed == -1


@pytest.mark.parametrize(("fields", "message"), [
    ({"subseed_strength": 1.5}, "subseed_strength must be between 0 and 1, got 1.5"),
    ({"subseed": -2}, "subseed must be a whole number between -1 (random)"),
    ({"seed_resize_from_w": 64}, "seed resize needs both a width and a height (or neither), got 64x0"),
    ({"seed_resize_from_w": 32, "seed_resize_from_h": 64}, "seed_resize_from_w must be 0 (off) or between 64 and"),
    ({"seed_resize_from_w": 100, "seed_resize_from_h": 64}, "seed_resize_from_w must be a multiple of 8, got 100"),
])
def test_bad_variation_fields_say_what_to_fix(engine, fields, message):
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        engine.generate(req(**fields))


def test_cli_variation_options(tmp_path, tiny_model):
    (tmp_path / "home" / "models").mkdir(parents=True)
    shutil.copytree(tiny_model, tmp_path / "home" / "models" / "tiny")
    proc = run(["txt2img", "a red circle", "-m", "tiny", "--steps", "3", "--seed", "5", "--subseed", "8",
                "--subseed-strength", "0.5", "--seed-resize-from", "64x64", "-W", "96"], tmp_path, tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    info = run(["info", proc.stdout.split()[0]], tmp_path, tmp_path / "home")
    assert "Variation seed: 8, Variation seed strength: 0.5, Seed resize from: 64x64" in info.stdout
    bad = run(["txt2img", "x", "-m", "tiny", "--seed-resize-from", "64"], tmp_path, tmp_path / "home")
    assert bad.returncode == 2 and "--seed-resize-from must be WIDTHxHEIGHT" in bad.stderr
