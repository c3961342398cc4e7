from __future__ import annotations

from sdstudio import GenerationRequest
from sdstudio.a1111.infotext import format_infotext, generation_params, parse_infotext, request_fields
from sdstudio.engine.record import image_fields
from sdstudio.storage.results import read_metadata, save_result

A1111_SAMPLE = """masterpiece, best quality, 1girl, (red hair:1.2), looking at viewer
Negative prompt: EasyNegative, lowres, bad anatomy
Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 3520157236, Size: 512x768, Model hash: 7f96a1a9ca, \
Model: anything-v5, Denoising strength: 0.55, Clip skip: 2, Hires upscale: 2, Hires upscaler: Latent, Version: v1.6.0"""


def test_written_in_a1111_format_and_order(engine):
    result = engine.generate(GenerationRequest(prompt="a red circle, big", negative_prompt="blur", steps=3,
                                               cfg_scale=7.0, sampler="Euler a", seed=42))
    model = engine.load()
    assert result.images[0].infotext == (
        "a red circle, big\n"
        "Negative prompt: blur\n"
        f"Steps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 42, Size: 64x64, "
        f"Model hash: {model.short_hash}, Model: {model.name}, Version: sdstudio {_version()}"
    )


def test_img2img_records_denoising_strength(engine, init_image):
    result = engine.generate(GenerationRequest(prompt="p", steps=4, seed=1, init_image=init_image, strength=0.5))
    assert ", Denoising strength: 0.5, Version: sdstudio" in result.images[0].infotext


def test_values_with_commas_colons_or_newlines_are_quoted():
    text = format_infotext("p", "", {"Steps": 20, "Model": "my:model", "Note": "a, b", "Seed": 1})
    assert text == 'p\nSteps: 20, Model: "my:model", Note: "a, b", Seed: 1'
    assert parse_infotext(text).params["Model"] == "my:model"
    assert parse_infotext(text).params["Note"] == "a, b"


def test_write_parse_round_trip_gives_the_same_request():
    req = GenerationRequest(prompt="line one, with comma\nline two", negative_prompt="ugly\nworse", width=640,
                            height=448, steps=33, cfg_scale=5.5, sampler="DPM++ SDE", schedule="Exponential",
                            seed=987654321, model="some model")
    params = generation_params(req.to_dict(), req.seed, "0123456789", "1")
    text = format_infotext(req.prompt, req.negative_prompt, params)
    fields = request_fields(parse_infotext(text))
    assert GenerationRequest.from_flat(**fields) == req


def test_reads_a1111_infotext_with_legacy_sampler_names():
    fields = request_fields(parse_infotext(A1111_SAMPLE))
    assert fields == {
        "prompt": "masterpiece, best quality, 1girl, (red hair:1.2), looking at viewer",
        "negative_prompt": "EasyNegative, lowres, bad anatomy",
        "steps": 28, "sampler": "DPM++ 2M", "schedule": "Karras", "cfg_scale": 6.5, "seed": 3520157236,
        "width": 512, "height": 768, "model": "anything-v5", "strength": 0.55, "clip_skip": 2,
        "enable_hr": True, "hr_scale": 2.0, "hr_upscaler": "Latent",  # A1111's hires fix, re-run as such
    }


def test_prompt_only_infotext():
    info = parse_infotext("just a prompt")
    assert (info.prompt, info.negative_prompt, info.params) == ("just a prompt", "", {})


def test_png_carries_both_chunks_and_reads_back(engine, tmp_path):
    req = GenerationRequest(prompt="a blue square", steps=3, seed=9, batch_size=2)
    saved = save_result(engine.generate(req), tmp_path)
    meta = read_metadata(saved[1].path)
    assert meta.infotext.startswith("a blue square\nSteps: 3")
    assert meta.record["image"] == {"index": 1, "seed": 10}
    assert meta.record["environment"]["torch"].startswith("2.13.0")
    assert meta.record["sampler"]["config"]["_class_name"] == "DPMSolverMultistepScheduler"
    fields = image_fields(meta)
    assert (fields["seed"], fields["batch_size"], fields["prompt"]) == (10, 1, "a blue square")


def _version() -> str:
    from sdstudio import __version__

    return __version__
