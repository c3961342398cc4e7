"""Hires fix (A1111's): first pass, upscale, second pass as img2img on the same seeds, recorded as A1111 does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio import Cancelled, CancelToken, GenerationRequest
from sdstudio.a1111.infotext import parse_infotext, request_fields
from sdstudio.engine.pipelines.upscale import upscale_image, upscale_latents
from sdstudio.engine.record import request_from_record
from sdstudio.engine.sd.stages import decode_latents, encode_image, to_pil
from sdstudio.errors import RequestError
from sdstudio.storage.results import read_metadata
from tests.conftest import shapes_image
from tests.test_cli import run, workdir  # noqa: F401 (a fixture)

BASE = GenerationRequest(prompt="a red circle on a blue background", steps=4, sampler="Euler", seed=11, width=64,
                         height=64)


def hires(**changes) -> GenerationRequest:
    return BASE.replace(enable_hr=True, **changes)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), np.int16)


@pytest.mark.parametrize(("changes", "size"), [
    ({}, (128, 128)),                                                 # hr_scale 2
    ({"hr_scale": 1.5, "width": 96}, (144, 96)),                      # int(W * scale), int(H * scale)
    ({"hr_resize_x": 100}, (96, 96)),                                 # the other side by aspect; floored to 8
    ({"hr_resize_x": 128, "hr_resize_y": 96, "hr_upscaler": "Lanczos"}, (128, 96)),  # cover, centre-crop
])
def test_output_is_the_hires_size(engine, changes, size):
    result = engine.generate(hires(hr_second_pass_steps=2, strength=0.5, **changes))
    assert result.images[0].image.size == size
    assert tuple(result.latents.shape[-2:]) == (size[1] // 8, size[0] // 8)
    assert result.request.width == changes.get("width", 64)  # the request keeps the first pass's size (A1111)


def test_strength_zero_returns_the_upscaled_first_pass(engine):
    first = engine.generate(BASE)  # what the first pass makes: a plain txt2img with the same seed
    vae = engine.load().vae
    # image upscaler: the first pass's 8-bit picture, resized, through the VAE (encode, then decode)
    result = engine.generate(hires(hr_upscaler="Lanczos", strength=0.0))
    expected = encode_image(vae, upscale_image(first.images[0].image, (128, 128), "Lanczos"), 128, 128, 8)
    assert torch.equal(result.latents, expected.float())
    round_trip = to_pil(decode_latents(vae, expected), 8)[0]
    assert np.array_equal(pixels(result.images[0].image), pixels(round_trip))
    # latent upscaler: the first pass's latents, interpolated
    latent = engine.generate(hires(hr_upscaler="Latent (bicubic)", strength=0.0))
    assert torch.equal(latent.latents, upscale_latents(first.latents, (16, 16), "Latent (bicubic)"))


def test_latent_upscaler_second_pass_differs_from_a_plain_large_txt2img(engine):
    result = engine.generate(hires(strength=0.6, hr_second_pass_steps=5))
    plain = engine.generate(BASE.replace(width=128, height=128))
    assert result.images[0].image.size == plain.images[0].image.size == (128, 128)
    assert np.abs(pixels(result.images[0].image) - pixels(plain.images[0].image)).mean() > 1
    again = engine.generate(hires(strength=0.6, hr_second_pass_steps=5))
    assert torch.equal(again.latents, result.latents)  # the second pass is seeded too


def test_infotext_keys_and_round_trip(engine):
    req = hires(hr_second_pass_steps=3, strength=0.6, hr_upscaler="latent (bicubic)", hr_sampler_name="Euler a",
                hr_prompt="a green circle on a blue background", batch_size=2)
    result = engine.generate(req)
    text = result.images[1].infotext
    params = parse_infotext(text).params
    assert params["Size-1"] == "64" and params["Seed"] == "12"
    assert params["Denoising strength"] == "0.6"
    assert params["Hires upscale"] == "2" and params["Hires steps"] == "3"
    assert params["Hires upscaler"] == "Latent (bicubic)"  # canonical name
    assert params["Hires sampler"] == "Euler a" and params["Hires prompt"] == req.hires.prompt
    assert "Hires resize-1" not in params and "Hires negative prompt" not in params
    fields = request_fields(parse_infotext(text))
    assert fields["enable_hr"] is True and fields["hr_second_pass_steps"] == 3 and fields["strength"] == 0.6
    again = engine.generate(GenerationRequest.from_flat(**{**fields, "model": None}))
    assert np.array_equal(pixels(again.images[0].image), pixels(result.images[1].image))
    from_record = engine.generate(GenerationRequest.from_dict({**request_from_record(result.images[1].record),
                                                               "model": None}))
    assert torch.equal(from_record.latents[0], result.latents[1])


def test_infotext_of_an_explicit_resize_and_defaults():
    from sdstudio.a1111.infotext import generation_params

    req = hires(hr_resize_x=96, seed=1, model="m")
    params = generation_params(req.to_dict(), 1, "abc", "0")
    assert params["Hires resize"] == "96x0" and params["Hires upscale"] is None
    assert params["Hires steps"] is None and params["Hires sampler"] is None and params["Hires prompt"] is None
    assert params["Denoising strength"] == 0.75 and params["Hires upscaler"] == "Latent"
    fields = request_fields(parse_infotext("p\nSteps: 4, Seed: 1, Size: 64x64, Hires resize: 96x0, "
                                           "Hires upscaler: Lanczos, Hires sampler: DPM++ 2M Karras"))
    assert (fields["hr_resize_x"], fields["hr_resize_y"], fields["hr_upscaler"]) == (96, 0, "Lanczos")
    assert (fields["hr_sampler_name"], fields["hr_scheduler"]) == ("DPM++ 2M", "Karras")
    assert "enable_hr" not in request_fields(parse_infotext("p\nSteps: 4, Seed: 1, Size: 64x64"))
    assert "hr_scale" not in BASE.to_dict() and "strength" not in BASE.to_dict()
    assert req.to_dict()["hr_scale"] == 2.0 and req.to_dict()["strength"] == 0.75


def test_progress_covers_both_passes_and_capture_spans_them(engine):
    events = []
    req = hires(hr_second_pass_steps=6, strength=0.5, n_iter=2, capture_every=2)
    result = engine.generate(req, progress=events.append)
    first, second = 4, int(6 * 0.5)
    assert len(events) == 2 * (first + second)
    assert {e.steps for e in events} == {first + second}
    assert [(e.iteration, e.step) for e in events] == [(i, s) for i in range(2) for s in range(1, first + second + 1)]
    assert events[-1].fraction == 1.0 and events[first - 1].fraction == pytest.approx(first / 7 / 2)
    assert events[-1].preview().size == (16, 16)  # the second pass's latents: one pixel per latent cell
    capture = result.images[0].capture
    assert capture.steps == [2, 4, 6, 7]
    assert {im.size for im in capture.decoded} == {(128, 128)}


@pytest.mark.parametrize("at", [2, 6])  # in the first pass, in the second
def test_cancel_works_in_both_passes(engine, at):
    token, seen = CancelToken(), []

    def progress(event):
        seen.append(event.step)
        if event.step == at:
            token.cancel()

    with pytest.raises(Cancelled):
        engine.generate(hires(hr_second_pass_steps=6, strength=0.5), progress=progress, cancel=token)
    assert seen[-1] == at


@pytest.mark.parametrize(("changes", "field", "words"), [
    ({"init_image": shapes_image()}, "enable_hr", "txt2img"),
    ({"hr_scale": 0.5}, "hr_scale", "between 1 and 8"),
    ({"hr_upscaler": "Bogus"}, "hr_upscaler", "Latent (bicubic)"),
    ({"hr_upscaler": "4x-UltraSharp"}, "hr_upscaler", "Lanczos"),
    ({"hr_second_pass_steps": -1}, "hr_second_pass_steps", "0 (the same as steps)"),
    ({"hr_sampler_name": "Nope"}, "hr_sampler_name", "unknown sampler"),
    ({"hr_scheduler": "Nope"}, "hr_scheduler", "unknown schedule type"),
    ({"hr_resize_x": 32}, "hr_resize_x", "between 64 and 4096"),
    ({"hr_scale": 8.0, "width": 1024, "height": 64}, "hr_scale", "8192x512"),
    ({"denoising_end": 0.8}, "denoising_end", "hires"),
    ({"hr_prompt": "a (x:1.2.3) cat"}, "hr_prompt", "^"),
])
def test_bad_hires_options_are_clear_errors(engine, changes, field, words):
    with pytest.raises(RequestError) as e:
        engine.generate(hires(**changes))
    assert e.value.field == field and words in str(e.value), str(e.value)


def test_hires_fields_are_ignored_without_enable_hr(engine):
    plain = engine.generate(BASE)
    ignored = engine.generate(BASE.replace(hr_scale=3.0, hr_upscaler="Lanczos"))
    assert torch.equal(plain.latents, ignored.latents) and ignored.images[0].image.size == (64, 64)


def test_cli_hires_options(workdir):  # noqa: F811 (the fixture)
    proc = run(["txt2img", "a red circle", "-m", "tiny", "--steps", "3", "--seed", "4", "--hr-scale", "1.5",
                "--hr-steps", "2", "--hr-denoise", "0.5", "--hr-upscaler", "Lanczos"], workdir, workdir / "home")
    assert proc.returncode == 0, proc.stderr
    png = Path(workdir, next(p for p in proc.stdout.split() if p.endswith(".png")))
    assert Image.open(png).size == (96, 96)
    meta = read_metadata(png)
    assert "Denoising strength: 0.5, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Lanczos" in meta.infotext
    fields = request_fields(parse_infotext(meta.infotext))
    assert (fields["enable_hr"], fields["hr_scale"], fields["strength"]) == (True, 1.5, 0.5)
