"""The latent handoff (diffusers' denoising_end / denoising_start), chaining, and examples/chain.py."""

from __future__ import annotations

import dataclasses
import runpy
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from PIL import Image

from sdstudio import Chain, Engine, GenerationRequest
from sdstudio.a1111.infotext import parse_infotext
from sdstudio.engine.sd.stages import encode_image
from sdstudio.errors import RequestError
from sdstudio.settings import PACKAGED_MODELS
from sdstudio.testing.tiny import build_tiny
from tests.conftest import make_settings, shapes_image
from tests.test_parity import generators

SEED = 21
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def xl(tmp_path_factory) -> Engine:
    root = tmp_path_factory.mktemp("xl-handoff")
    build_tiny("sdxl", root / "tiny-xl", seed=3)
    build_tiny("sdxl-refiner", root / "tiny-refiner", seed=4)
    settings = make_settings(root / "home", root, default_model=str(root / "tiny-xl"))
    return Engine(dataclasses.replace(settings, models_in_memory=2))


def refiner_name(xl: Engine) -> str:
    return str(xl.model_ref().path.parent / "tiny-refiner")


def scheduler_of(result):
    config = result.images[0].record["sampler"]["config"]
    return getattr(diffusers, config["_class_name"]).from_config(config)


def diffusers_base_then_refiner(xl, base, refined, req, switch):
    """diffusers' documented ensemble: base(denoising_end, output_type="latent") -> refiner(denoising_start)."""
    model, refiner = xl.load(), xl.load(refiner_name(xl))
    (a, b), (ta, tb) = model.text.encoders, model.text.tokenizers
    pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=a, text_encoder_2=b, tokenizer=ta, tokenizer_2=tb,
                                     unet=model.unet, scheduler=scheduler_of(base), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    n = req.batch_size
    prompts = dict(prompt=[req.prompt] * n, negative_prompt=[req.negative_prompt] * n,
                   num_inference_steps=req.steps, guidance_scale=req.cfg_scale, output_type="latent")
    latents = pipe(**prompts, height=req.height, width=req.width, denoising_end=switch,
                   generator=generators(n, SEED)).images
    ref = StableDiffusionXLImg2ImgPipeline(vae=refiner.vae, text_encoder=None, text_encoder_2=refiner.text.encoders[0],
                                           tokenizer=None, tokenizer_2=refiner.text.tokenizers[0], unet=refiner.unet,
                                           scheduler=scheduler_of(refined), requires_aesthetics_score=True,
                                           add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    final = ref(**prompts, image=latents, denoising_start=switch, generator=generators(n, SEED)).images
    return latents, final


@pytest.mark.parametrize(("sampler", "switch"), [("Euler", 0.8), ("Euler a", 0.8), ("DPM++ 2M", 0.7), ("Heun", 0.8)])
def test_base_to_refiner_handoff_matches_diffusers(xl, sampler, switch):
    req = GenerationRequest(prompt="a red circle", negative_prompt="blurry", steps=10, cfg_scale=5.0, sampler=sampler,
                            seed=SEED, width=64, height=64, batch_size=2)
    base = xl.generate(req.replace(denoising_end=switch))
    refined = xl.generate(req.replace(model=refiner_name(xl), init_latents=base.latents, denoising_start=switch,
                                      width=None, height=None))
    ref_base, ref_final = diffusers_base_then_refiner(xl, base, refined, req, switch)
    assert (base.latents - ref_base).abs().max() < 1e-4
    assert (refined.latents - ref_final).abs().max() < 1e-4
    assert refined.request.mode == "img2img" and refined.images[0].image.size == (64, 64)


def test_chain_hands_latents_on_and_reuses_loaded_models(xl):
    req = GenerationRequest(prompt="a blue square", steps=8, sampler="Euler", seed=SEED, width=64, height=64,
                            batch_size=2, denoising_end=0.75)
    xl.load(), xl.load(refiner_name(xl))  # both in the model manager (it keeps two here)
    chain = Chain(xl)
    base = chain.run(req)
    refined = chain.then(GenerationRequest(prompt="a blue square", steps=8, sampler="Euler",
                                           model=refiner_name(xl)))
    assert refined.request.denoising_start == 0.75 and refined.request.seed == SEED
    assert refined.request.batch_size == 2 and refined.request.to_dict()["init_latents"] == {"shape": [2, 4, 8, 8]}
    manual = xl.generate(GenerationRequest(prompt="a blue square", steps=8, sampler="Euler", seed=SEED,
                                           batch_size=2, model=refiner_name(xl), init_latents=base.latents,
                                           denoising_start=0.75))
    assert torch.equal(refined.latents, manual.latents)
    final = chain.then(GenerationRequest(prompt="a blue square", steps=4, strength=0.5, seed=1))  # image -> img2img
    assert final.request.mode == "img2img" and final.request.init_latents is None
    assert [s.reused for s in chain.stages] == [True, True, True]  # no stage loaded a model again
    assert xl.load() is xl.load() and len(xl.models.loaded) == 2   # the manager keeps base and refiner


def test_denoising_end_stops_early_and_is_recorded(engine):
    events = []
    req = GenerationRequest(prompt="a red circle", steps=10, sampler="Euler", seed=3, denoising_end=0.5)
    result = engine.generate(req, progress=events.append)
    assert len(events) == 5  # of the timesteps 901, 801, ..., 1 those >= round(1000 - 0.5 * 1000) = 500
    params = parse_infotext(result.images[0].infotext).params
    assert params["Denoising end"] == "0.5" and "Denoising strength" not in params
    full = engine.generate(req.replace(denoising_end=None))
    assert not torch.equal(full.latents, result.latents)
    rest = engine.generate(req.replace(denoising_end=None, init_latents=result.latents, denoising_start=0.5))
    assert (rest.latents - full.latents).abs().max() < 1e-5  # one model on both sides: the plain run, resumed
    assert "Denoising start" in rest.images[0].infotext and "Denoising strength" not in rest.images[0].infotext


def test_init_latents_without_denoising_start_is_img2img_from_latents(engine, init_image):
    req = GenerationRequest(prompt="a blue square", steps=6, sampler="Euler a", seed=5, strength=0.6)
    from_image = engine.generate(req.replace(init_image=init_image))
    z0 = encode_image(engine.load().vae, init_image, 64, 64, 8)
    from_latents = engine.generate(req.replace(init_latents=z0))
    assert torch.equal(from_image.latents, from_latents.latents)


@pytest.mark.parametrize(("changes", "field", "words"), [
    ({"denoising_end": 1.0}, "denoising_end", "strictly between 0 and 1"),
    ({"denoising_start": 0.5}, "denoising_start", "give init_latents"),
    ({"init_latents": torch.zeros(1, 4, 8, 8), "denoising_start": 0.8, "denoising_end": 0.5}, "denoising_start",
     "below denoising_end"),
    ({"init_latents": torch.zeros(1, 3, 8, 8)}, "init_latents", "3 channels"),
    ({"init_latents": torch.zeros(3, 4, 8, 8), "batch_size": 2}, "init_latents", "one per image (2"),
    ({"init_latents": torch.zeros(4, 8, 8)}, "init_latents", "(B, C, h, w)"),
    ({"init_latents": torch.zeros(1, 4, 8, 8), "init_image": shapes_image()}, "init_latents", "not both"),
    ({"init_latents": torch.zeros(1, 4, 8, 8), "width": 128}, "width", "match init_latents (64"),
    ({"init_latents": torch.full((1, 4, 8, 8), float("nan"))}, "init_latents", "NaN"),
])
def test_bad_handoff_options_are_clear_errors(engine, changes, field, words):
    with pytest.raises(RequestError) as e:
        engine.generate(GenerationRequest(prompt="x", steps=4, **changes))
    assert e.value.field == field and words in str(e.value), str(e.value)


@pytest.mark.skipif(not all((PACKAGED_MODELS / m).is_dir() for m in ("demo", "demo-inpaint")),
                    reason="the demo models are not bundled")
def test_example_chain_runs_on_the_demo_models(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDSTUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SDSTUDIO_MODEL", raising=False)
    example = runpy.run_path(str(ROOT / "examples" / "chain.py"))
    paths = example["main"](["--steps", "4", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert [p.name for p in paths] == ["1-text2image.png", "2-inpaint.png", "3-refine.png", "4-image2image.png"]
    assert all(Image.open(p).size == (64, 64) for p in paths)
    out = capsys.readouterr().out
    assert "no --refiner given: demo refines instead" in out
    assert "3. refine       demo             (already loaded)" in out
    assert "4. image2image  demo             (already loaded)" in out
