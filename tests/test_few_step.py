"""Few-step sampling: LCM and TCD against diffusers' pipelines on the same tiny components, the presets model
cards ask for, and the hint a few-step model or LoRA run the slow way gets."""

from __future__ import annotations

import diffusers
import pytest
import torch
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
    quiet = save(folder, "my_speedup", kohya_lora(model.unet, model.text.encoders[0], seed=4),
                 {"ss_output_name": "tiny-TCD-lora"})  # named plainly, its metadata says what it is
    try:
        prompt = "a red circle <lora:tiny_lcm_lora:1>"
        slow = engine.generate(GenerationRequest(prompt=prompt, steps=12, seed=1))
        assert any("--preset lcm" in w for w in slow.warnings), slow.warnings
        fast = engine.generate(GenerationRequest(prompt=prompt, **PRESETS["lcm"].fields(), seed=1))
        assert not any("--preset" in w for w in fast.warnings)
        by_metadata = engine.generate(GenerationRequest(prompt="x <lora:my_speedup:1>", steps=12, seed=1))
        (hint,) = [w for w in by_metadata.warnings if "--preset" in w]
        assert "'tiny-TCD-lora' looks like one of the TCD LoRAs" in hint
    finally:
        path.unlink()
        quiet.unlink()


def test_the_demo_lcm_lora_follows_prompts_in_4_steps(tmp_path):
    """The shipped LCM-LoRA (distilled from the demo by `sdstudio train lcm-lora`): --preset lcm adds it, and 4 LCM
    steps at CFG 1 draw what the prompt asks; it loads whole in our LoRA code."""
    from sdstudio import Engine, Settings
    from sdstudio.engine.presets import with_companion
    from sdstudio.train.analyse import analyse
    from tests.test_demo import PROMPTS

    demo = Engine(Settings.from_env(home=tmp_path, outputs_dir=tmp_path / "outputs", device=torch.device("cpu"),
                                    dtype=torch.float32, default_model="demo"))
    lora = demo.preset_lora("lcm")
    assert lora == "lcm-lora-demo" and demo.preset_lora("turbo") is None
    right = 0
    for i, (shape, colour, background) in enumerate(PROMPTS):
        prompt = with_companion(f"a {colour} {shape} on a {background} background", lora)
        result = demo.generate(GenerationRequest(**with_preset("lcm", {}, {}), prompt=prompt, seed=200 + i))
        found = analyse(result.images[0].image)
        right += (found.colour, found.background, found.shape) == (colour, background, shape)
        (record,) = result.images[0].record["addons"]["loras"]
        assert record["name"] == "lcm-lora-demo" and record["matched_keys"] > 100 and not record["dropped"]
    assert right >= 5, f"only {right} of {len(PROMPTS)} prompts came out right in 4 steps"
    assert with_companion("x <lora:LCM-lora-demo:0.8>", lora) == "x <lora:LCM-lora-demo:0.8>"


def test_train_lcm_lora_writes_a_kohya_lora_and_resumes(tmp_path, tiny_model):
    from safetensors import safe_open

    from sdstudio.models.addons.lora import read_lora
    from sdstudio.train.lcm_lora import LcmTrainConfig, train_lcm_lora

    cfg = LcmTrainConfig(base=str(tiny_model), out=tmp_path / "lcm-lora-tiny", rank=4, batch_size=4, steps=2,
                         save_every=1, warmup=1)
    path = train_lcm_lora(cfg)
    with safe_open(path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith("lora_unet_") for k in keys) and any(k.endswith(".lora_down.weight") for k in keys)
    assert meta["ss_network_dim"] == "4" and meta["ss_output_name"] == "lcm-lora-tiny"
    assert len(read_lora(path).layers) == len(keys) // 3
    longer = train_lcm_lora(LcmTrainConfig(**{**cfg.__dict__, "steps": 3}), resume=True)
    assert longer == path
    with pytest.raises(Exception, match="already holds a training run"):
        train_lcm_lora(cfg)


def test_train_lcm_lora_refuses_a_v_prediction_base(tmp_path, tiny_models):
    from sdstudio.train.lcm_lora import LcmTrainConfig, train_lcm_lora

    with pytest.raises(Exception, match="epsilon-prediction"):
        train_lcm_lora(LcmTrainConfig(base=str(tiny_models["v_prediction"]), out=tmp_path / "x", steps=1))


def test_cli_preset_lcm_on_the_demo_makes_a_correct_image_in_4_steps(tmp_path):
    from PIL import Image

    from sdstudio.train.analyse import analyse
    from tests.test_cli import run

    proc = run(["txt2img", "--preset", "lcm", "a red circle on a blue background", "--seed", "3"], tmp_path,
               tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert "--preset lcm: added <lora:lcm-lora-demo:1>" in proc.stderr
    image = Image.open(next((tmp_path / "outputs").rglob("*.png")))
    found = analyse(image)
    assert (found.colour, found.background, found.shape) == ("red", "blue", "circle")
    text = image.info["parameters"]
    assert "<lora:lcm-lora-demo:1>" in text and "Steps: 4, Sampler: LCM" in text and "CFG scale: 1," in text


def test_an_x0_lightning_file_predicts_the_sample_and_matches_diffusers(tmp_path):
    """SDXL-Lightning's 1-step files (`..._x0.safetensors`) predict x0 ("sample"): read from the name, and sampled
    as diffusers' pipeline does with that scheduler config."""
    import shutil

    from sdstudio import Engine
    from sdstudio.models.find.hashing import HashCache
    from sdstudio.models.load.loader import ModelManager
    from sdstudio.models.load.parts import LoadOptions
    from sdstudio.models.tools.convert import write_single_file
    from sdstudio.testing.tiny import build_tiny
    from tests.conftest import make_settings
    from tests.test_sdxl import xl_pipe

    folder = build_tiny("sdxl", tmp_path / "src" / "tiny-xl", seed=2)
    (tmp_path / "models").mkdir()
    file = write_single_file(folder, tmp_path / "models" / "tiny_lightning_1step_x0.safetensors")
    shutil.copy(file, tmp_path / "models" / "tiny_lightning.safetensors")
    manager = ModelManager(LoadOptions(config=folder), HashCache(None))
    engine = Engine(make_settings(tmp_path / "home", tmp_path / "models"), models=manager)
    req = GenerationRequest(**with_preset("lightning", {}, {"steps": 2}), prompt="a red circle", seed=SEED,
                            width=64, height=64, model="tiny_lightning_1step_x0")
    result = engine.generate(req)
    assert result.images[0].record["model"]["prediction_type"] == "sample"
    assert engine.load("tiny_lightning").prediction_type == "epsilon"
    ref = xl_pipe(engine.load("tiny_lightning_1step_x0"), result)(
        prompt=req.prompt, num_inference_steps=2, guidance_scale=1.0, height=64, width=64,
        generator=generators(1), output_type="latent").images
    assert (result.latents - ref).abs().max() < 1e-4
    with pytest.raises(RequestError, match="predicts x0") as e:  # Euler a's scheduler cannot step it
        engine.generate(req.replace(sampler="Euler a"))
    assert e.value.field == "sampler"
