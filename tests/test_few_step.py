"""Few-step sampling: LCM and TCD against diffusers' pipelines on the same tiny components, the presets model
cards ask for, and the hint a few-step model or LoRA run the slow way gets."""

from __future__ import annotations

import diffusers
import pytest
from diffusers import StableDiffusionPipeline

from sdstudio import GenerationRequest
from sdstudio.engine.presets import PRESETS, preset_hints, with_preset
from sdstudio.errors import RequestError
from tests.test_parity import SEED, assert_same, diffusers_pipe, generators


@pytest.mark.parametrize(("sampler", "eta", "cfg"), [("LCM", None, 1.0), ("TCD", None, 1.0), ("TCD", 0.8, 1.0),
                                                      ("TCD", 0.0, 4.0), ("LCM", None, 3.0)])
def test_few_step_samplers_match_diffusers(engine, sampler, eta, cfg):
    req = GenerationRequest(prompt="a small red circle at the top left", steps=4, cfg_scale=cfg, sampler=sampler,
                            seed=SEED, batch_size=2, eta=eta)
    result = engine.generate(req)
    model = engine.load()
    config = result.images[0].record["sampler"]["config"]
    assert config["_class_name"] == f"{sampler}Scheduler"
    pipe = diffusers_pipe(StableDiffusionPipeline, model, config)
    kwargs = dict(prompt=req.prompt, num_inference_steps=4, guidance_scale=cfg, height=64, width=64,
                  num_images_per_prompt=2, **({"eta": eta} if eta is not None else {}))
    if sampler == "TCD" and eta is None:
        kwargs["eta"] = 0.3  # the pipeline passes its own default (0.0); TCD's is 0.3, which we keep
    ref_latents = pipe(**kwargs, generator=generators(2), output_type="latent").images
    ref_images = pipe(**kwargs, generator=generators(2), output_type="pil").images
    assert_same(result.latents, [im.image for im in result.images], ref_latents, ref_images)


def test_tcd_gamma_changes_the_image_and_is_recorded(engine):
    req = GenerationRequest(prompt="a red circle", steps=4, cfg_scale=1.0, sampler="TCD", seed=3, eta=0.9)
    result = engine.generate(req)
    assert "Eta: 0.9" in result.images[0].infotext
    assert not (result.latents == engine.generate(req.replace(eta=0.0)).latents).all()
    with pytest.raises(RequestError, match="eta must be between 0 and 1"):
        engine.prepare(req.replace(eta=1.5))


def test_presets_are_defaults_the_request_overrides():
    fields = with_preset("lightning", {"sampler": "DPM++ 2M", "prompt": "a cat", "steps": 30}, {"steps": 2})
    assert fields == {"sampler": "Euler", "schedule": "SGM Uniform", "steps": 2, "cfg_scale": 1.0, "prompt": "a cat"}
    assert with_preset(None, {"steps": 30}, {}) == {"steps": 30}
    with pytest.raises(RequestError, match="unknown preset 'fast'; choose one of lcm, turbo, lightning"):
        with_preset("fast", {}, {})
    for name, p in PRESETS.items():  # every preset names a sampler and schedule the engine runs
        from sdstudio.samplers import resolve_sampler

        assert resolve_sampler(p.sampler, p.schedule).note is None, name
        assert getattr(diffusers, p.sampler + "Scheduler", None) or p.sampler in ("Euler a", "Euler", "DDIM")


def test_a_few_step_lora_run_the_slow_way_gets_a_hint():
    hints = preset_hints(["juggernaut", "sdxl_lightning_4step_lora"], "DPM++ 2M", 30, 7.0)
    assert len(hints) == 1 and "--preset lightning" in hints[0] and "Euler, sgm uniform schedule, 4 steps" in hints[0]
    assert preset_hints(["sdxl_lightning_4step_lora"], "Euler", 4, 1.0) == []  # run as its card says
    assert preset_hints(["hyperrealism_v3"], "Euler", 30, 7.0) == []  # a word containing a preset's is not it
    assert preset_hints(["lcm-lora-sdv1-5"], "Euler", 30, 7.0)[0].endswith("the web UI's Preset menu)")


def test_the_engine_reports_the_hint_for_a_lora_named_like_one(engine):
    from tests.test_lora import kohya_lora, save

    model = engine.load()
    folder = engine.settings.home / "lora"
    folder.mkdir(parents=True, exist_ok=True)
    path = save(folder, "tiny_lcm_lora", kohya_lora(model.unet, model.text.encoders[0], seed=4))
    try:
        prompt = "a red circle <lora:tiny_lcm_lora:1>"
        slow = engine.generate(GenerationRequest(prompt=prompt, steps=12, seed=1))
        assert any("--preset lcm" in w for w in slow.warnings), slow.warnings
        fast = engine.generate(GenerationRequest(prompt=prompt, **PRESETS["lcm"].fields(), seed=1))
        assert not any("--preset" in w for w in fast.warnings)
    finally:
        path.unlink()
