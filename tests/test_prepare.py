"""Engine.prepare checks a request once without loading a model; generate runs what it returns; results save
themselves with their metadata."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from sdstudio import Engine, GenerationRequest, ModelError, RequestError
from sdstudio.engine.record import image_fields
from sdstudio.prompts import build
from sdstudio.storage.results import read_metadata, to_json
from tests.conftest import make_settings


@pytest.fixture
def fresh(tmp_path, tiny_model) -> Engine:
    """An engine with nothing loaded yet."""
    return Engine(make_settings(tmp_path / "home", tiny_model.parent, default_model=str(tiny_model)))


def test_prepare_refuses_bad_input_without_loading_a_model(fresh):
    with pytest.raises(RequestError, match="steps"):
        fresh.prepare(GenerationRequest(prompt="a cat", steps=0))
    with pytest.raises(RequestError) as syntax:
        fresh.prepare(GenerationRequest(prompt="a <lora:x:1> (cat:1..2)"))  # a weight that is no number
    assert syntax.value.column == 18  # counted in the prompt as written
    with pytest.raises(RequestError, match="must be a whole number"):
        fresh.prepare(GenerationRequest(prompt="a cat", steps="many"))
    with pytest.raises(ModelError):
        fresh.prepare(GenerationRequest(prompt="a cat", model="no-such-model"))
    job = fresh.prepare(GenerationRequest(prompt="a (cat:1.2)", steps=3))
    assert (job.family, job.model.path, job.sampler.sampler.name) == ("sd", fresh.model_ref().path, "DPM++ 2M")
    assert fresh.models.loaded == []


def test_generate_takes_the_prepared_job_and_parses_the_prompt_once(engine, monkeypatch):
    request = GenerationRequest(prompt="a [red:blue:0.5] circle", negative_prompt="green", steps=3, seed=5,
                                width=64, height=64)
    direct = engine.generate(request)
    calls = []
    real = build.parse
    monkeypatch.setattr(build, "parse", lambda text, **kw: calls.append(text) or real(text, **kw))
    prepared = engine.generate(engine.prepare(request))
    assert calls == ["a [red:blue:0.5] circle", "green"]  # once each, by prepare; the run reuses them
    assert torch.equal(prepared.latents, direct.latents)


def test_results_save_with_infotext_and_record(engine, tmp_path):
    result = engine.generate(GenerationRequest(prompt="a circle", steps=2, seed=9, batch_size=2, width=64,
                                               height=64))
    saved = result.save(tmp_path / "out")
    assert [s.path.parent.parent.name for s in saved] == ["txt2img-images"] * 2
    assert [s.path.name for s in saved] == ["00000-9.png", "00001-10.png"]
    second = result.images[1]
    path = second.save(tmp_path / "one.png")
    for png in (saved[1].path, path):
        meta = read_metadata(png)
        assert meta.infotext == second.infotext and meta.record == json.loads(to_json(second.record))
        assert image_fields(meta)["seed"] == 10
        assert Image.open(png).convert("RGB").tobytes() == second.image.convert("RGB").tobytes()
    second.save(path)  # saving over the same path replaces it whole
    assert read_metadata(path).infotext == second.infotext
