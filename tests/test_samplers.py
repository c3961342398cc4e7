from __future__ import annotations

import pytest

from sdstudio import GenerationRequest, RequestError
from sdstudio.samplers import AUTOMATIC, SAMPLERS, resolve_sampler


@pytest.mark.parametrize("spec", SAMPLERS, ids=lambda s: s.name)
def test_every_sampler_and_schedule_generates(engine, spec):
    for schedule in (AUTOMATIC, *spec.schedules):
        result = engine.generate(GenerationRequest(prompt="a circle", steps=4, sampler=spec.name,
                                                   schedule=schedule, seed=3))
        assert result.latents.isfinite().all(), (spec.name, schedule)
        assert result.images[0].record["sampler"]["scheduler"] == spec.scheduler_class


@pytest.mark.parametrize(("name", "sampler", "schedule"), [
    ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
    ("dpm++ 2m sde karras", "DPM++ 2M SDE", "Karras"),
    ("Euler a", "Euler a", "Automatic"),
    ("k_euler_a", "Euler a", "Automatic"),
    ("DPM++ 2M", "DPM++ 2M", "Karras"),        # Automatic means Karras for DPM++ 2M, as in A1111
    ("DPM++ 2M SDE", "DPM++ 2M SDE", "Exponential"),
    ("LMS Karras", "LMS", "Karras"),
])
def test_names_users_know(name, sampler, schedule):
    choice = resolve_sampler(name)
    assert (choice.sampler.name, choice.schedule) == (sampler, schedule)


def test_schedule_configures_the_scheduler():
    scheduler = resolve_sampler("Euler", "Karras").build({"num_train_timesteps": 1000})
    assert scheduler.config.use_karras_sigmas
    assert resolve_sampler("Euler", "sgm_uniform").build({}).config.timestep_spacing == "trailing"


def test_unknown_sampler_lists_the_valid_ones():
    with pytest.raises(RequestError) as e:
        resolve_sampler("Euler b")
    assert "unknown sampler 'Euler b'" in str(e.value)
    for spec in SAMPLERS:
        assert spec.name in str(e.value)
    assert e.value.field == "sampler"


def test_unsupported_schedule_is_an_error_naming_the_supported_ones():
    with pytest.raises(RequestError, match=r"'Euler a' does not support schedule type 'Karras'.*Automatic"):
        resolve_sampler("Euler a", "Karras")
    with pytest.raises(RequestError, match="unknown schedule type 'Polyexp'"):
        resolve_sampler("Euler", "Polyexp")
