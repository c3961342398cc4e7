"""Kandinsky 2.2 (prior + decoder) through Engine.generate, on tiny random models built in code."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import KandinskyV22CombinedPipeline
from PIL import Image, ImageDraw

from sdstudio import Engine
from sdstudio.engine import requests as requests_module
from sdstudio.engine.hooks import CancelToken, ProgressEvent
from sdstudio.engine.pipelines.kandinsky import KandinskyOptions, plain_prompts
from sdstudio.engine.record import image_fields
from sdstudio.engine.requests import GenerationRequest, GenerationResult
from sdstudio.errors import Cancelled, ModelError, RequestError
from sdstudio.models.find.catalog import ModelRef
from sdstudio.models.find.inventory import family_label, family_of
from sdstudio.models.load.kandinsky import find_layout, is_kandinsky_folder
from sdstudio.storage.results import read_metadata, save_result
from sdstudio.testing.tiny_kandinsky import (
    build_tiny_decoder,
    build_tiny_kandinsky,
    build_tiny_prior,
    tiny_decoder_pipeline,
    tiny_prior_pipeline,
)
from tests.conftest import make_settings, shapes_image

PRIOR_STEPS = KandinskyOptions().prior_steps  # one progress event per prior step, then per decoder step


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions are fastest on one thread (with two, OpenMP waits on busy cores); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def kandinsky_root(tmp_path_factory) -> Path:
    """kandinsky-2-2/ holds its prior in prior/; the inpainting decoder finds kandinsky-2-2-prior beside it."""
    root = tmp_path_factory.mktemp("kandinsky")
    build_tiny_kandinsky(root / "kandinsky-2-2", seed=0)
    build_tiny_decoder(root / "kandinsky-2-2-decoder-inpaint", inpaint=True, seed=2)
    build_tiny_prior(root / "kandinsky-2-2-prior", seed=1)
    return root


@pytest.fixture(scope="module")
def engine(tmp_path_factory, kandinsky_root) -> Engine:
    settings = make_settings(tmp_path_factory.mktemp("home"), kandinsky_root, default_model="kandinsky-2-2")
    return Engine(dataclasses.replace(settings, models_in_memory=2))


@pytest.fixture(scope="module")
def txt2img(engine) -> tuple[GenerationResult, list[ProgressEvent]]:
    """Two images, seeds 7 and 8, all defaults but size and steps; with the progress events."""
    events: list[ProgressEvent] = []
    return engine.generate(request(batch_size=2), progress=events.append), events


def request(**fields) -> GenerationRequest:
    base = {"prompt": "a red disc", "steps": 2, "width": 64, "height": 64, "seed": 7}
    return GenerationRequest.from_flat(**{**base, **fields})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def disc_mask(size: tuple[int, int] = (64, 64)) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    return mask


def test_txt2img_defaults_seeds_infotext_and_progress(txt2img):
    result, events = txt2img
    assert [im.image.size for im in result.images] == [(64, 64), (64, 64)]
    assert result.seeds == [7, 8]
    assert result.latents.shape == (2, 4, 16, 16)
    assert result.request.sampler == "DDPM" and result.request.model == "kandinsky-2-2"
    info = result.images[1].infotext
    for part in ("a red disc\n", "Steps: 2", "Sampler: DDPM", "CFG scale: 7", "Seed: 8", "Size: 64x64",
                 "Model: kandinsky-2-2", f"Prior steps: {PRIOR_STEPS}", "Prior CFG scale: 4", "Prior hash: "):
        assert part in info
    assert "Denoising strength" not in info
    record = result.images[1].record
    assert record["image"] == {"index": 1, "seed": 8}
    assert record["model"]["family"] == "kandinsky2.2"
    assert record["sampler"]["scheduler"] == "DDPMScheduler"
    assert record["sampler"]["prior"]["scheduler"] == "UnCLIPScheduler"
    assert [e.step for e in events] == list(range(1, PRIOR_STEPS + 3))
    assert {e.steps for e in events} == {PRIOR_STEPS + 2}
    assert events[-1].fraction == 1.0
    assert events[0].preview().size == (16, 16) and events[-1].preview().size == (16, 16)


def test_same_seed_same_image_and_batch_independent(engine, txt2img):
    batch = txt2img[0]
    again = engine.generate(request(batch_size=2))
    single = engine.generate(request(seed=8))  # image 1 of the batch, on its own
    assert np.array_equal(pixels(batch.images[0].image), pixels(again.images[0].image))
    assert np.array_equal(batch.latents, again.latents)
    assert np.abs(pixels(batch.images[1].image) - pixels(single.images[0].image)).max() <= 2
    assert not np.array_equal(pixels(batch.images[0].image), pixels(batch.images[1].image))


def test_negative_prompt_goes_through_the_prior(engine, txt2img):
    negative = engine.generate(request(negative_prompt="blue", batch_size=2))
    assert negative.seeds == [7, 8]
    assert "Negative prompt: blue" in negative.images[0].infotext
    assert not np.array_equal(pixels(txt2img[0].images[0].image), pixels(negative.images[0].image))
    alone = engine.generate(request(negative_prompt="blue", seed=8))  # prior rows: prompt, then negative
    assert np.abs(pixels(alone.images[0].image) - pixels(negative.images[1].image)).max() <= 2


def test_img2img_size_from_image_strength_and_steps(engine):
    events: list[ProgressEvent] = []
    result = engine.generate(request(init_image=shapes_image(96).resize((96, 64)), width=None, height=None,
                                     steps=4, strength=0.5), progress=events.append)
    assert result.images[0].image.size == (96, 64)
    assert result.request.mode == "img2img" and (result.request.width, result.request.height) == (96, 64)
    assert "Denoising strength: 0.5" in result.images[0].infotext
    assert events[-1].step == events[-1].steps == PRIOR_STEPS + 2  # int(4 * 0.5) decoder steps


def test_inpaint_keeps_unmasked_pixels(engine):
    init = shapes_image(64)
    result = engine.generate(request(model="kandinsky-2-2-decoder-inpaint", init_image=init, mask=disc_mask(),
                                     batch_size=2))
    assert result.request.mode == "inpaint" and result.request.strength == 1.0
    assert any("strength 0.75 was not used" in w for w in result.warnings)
    for im in result.images:
        assert im.image.size == (64, 64)
        out, src = pixels(im.image), pixels(init)
        assert np.array_equal(out[:12], src[:12]) and np.array_equal(out[52:], src[52:])  # beyond mask and blur
        assert not np.array_equal(out[20:44, 20:44], src[20:44, 20:44])
        assert "Mask blur: 4" in im.infotext and "Denoising strength: 1" in im.infotext
    assert result.images[0].record["model"]["family"] == "kandinsky2.2-inpaint"
    assert result.seeds == [7, 8]


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_gives_the_same_images(tmp_path, kandinsky_root, txt2img, offload):
    settings = make_settings(tmp_path, kandinsky_root, default_model="kandinsky-2-2")
    result = Engine(dataclasses.replace(settings, offload=offload)).generate(request(batch_size=2))
    assert np.array_equal(pixels(result.images[1].image), pixels(txt2img[0].images[1].image))


def test_cancel_raises_between_steps(engine):
    token, seen = CancelToken(), []

    def progress(event: ProgressEvent) -> None:
        seen.append(event.step)
        if event.step == 3:
            token.cancel()

    with pytest.raises(Cancelled):
        engine.generate(request(), progress=progress, cancel=token)
    assert seen == [1, 2, 3]


def test_saved_image_reproduces_from_its_record(engine, tmp_path):
    result = engine.generate(request(seed=11, n_iter=2))
    assert result.seeds == [11, 12]
    saved = save_result(result, tmp_path)
    fields = image_fields(read_metadata(saved[1].path))
    assert fields["sampler"] == "DDPM" and fields["seed"] == 12 and fields["n_iter"] == 1
    again = engine.generate(GenerationRequest.from_flat(**fields))
    assert np.array_equal(pixels(again.images[0].image), pixels(result.images[1].image))


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"sampler": "Euler a"}, "sampler", "DDPM"),
    ({"schedule": "Karras"}, "schedule", "Automatic"),
    ({"clip_skip": 2}, "clip_skip", "clip_skip must be 1"),
    ({"vae": "other.safetensors"}, "vae", "MoVQ"),
    ({"capture_every": 1}, "capture_every", "capture_every to 0"),
    ({"guidance_rescale": 0.5}, "guidance_rescale", "guidance_rescale to 0"),
    ({"zero_terminal_snr": True}, "zero_terminal_snr", "zero_terminal_snr to false"),
    ({"guidance": "apg"}, "guidance", "guidance to 'cfg'"),
    ({"pag_scale": 2.0}, "pag_scale", "pag_scale to 0"),
    ({"freeu": True}, "freeu", "freeu to false"),
    ({"eta": 0.3}, "eta", "leave eta unset"),
    ({"prompt": "a (red:1.3) disc"}, "prompt", "plain text"),
    ({"prompt": "a [red:blue:0.5] disc"}, "prompt", "plain text"),
    ({"negative_prompt": "(blue)"}, "negative_prompt", "plain text"),
    ({"prompt": "a disc <lora:ink:0.7>"}, "prompt", "<lora:...> tags"),
    ({"prompt": "a disc AND a square"}, "prompt", "AND"),
    ({"prompt_syntax": "compel"}, "prompt_syntax", "plain"),
    ({"width": 72}, "width", "multiple of 16"),
    ({"steps": 0}, "steps", "between"),
    ({"init_image": shapes_image(64), "strength": 0.1}, "strength", "at least one decoder step"),
    ({"init_image": shapes_image(64), "mask": disc_mask()}, "mask", "inpainting decoder"),
    ({"subseed": 3, "subseed_strength": 0.5}, "subseed_strength", "variation seeds"),
    ({"seed_resize_from_w": 128, "seed_resize_from_h": 128}, "seed_resize_from_w", "seed resize"),
    ({"enable_hr": True}, "enable_hr", "hires fix"),
    ({"denoising_end": 0.8}, "denoising_end", "latent handoff"),
])
def test_unsupported_fields_are_clear_errors(engine, fields, field, words):
    if not set(fields) <= GenerationRequest.field_names() | {"init_image", "mask"}:
        pytest.skip(f"this version of GenerationRequest has no {field}")
    with pytest.raises(RequestError) as caught:
        engine.generate(request(**fields))
    assert caught.value.field == field
    assert words in str(caught.value)


@pytest.mark.parametrize(("fields", "field"), [
    ({"masked_content": "fill"}, "masked_content"),
    ({"only_masked": True}, "only_masked"),
    ({"soft_inpainting": True}, "soft_inpainting"),
    ({"inpaint_method": "blend"}, "inpaint_method"),
    ({"mask": None}, "mask"),
])
def test_unsupported_inpaint_fields(engine, fields, field):
    base = {"model": "kandinsky-2-2-decoder-inpaint", "init_image": shapes_image(64), "mask": disc_mask()}
    with pytest.raises(RequestError) as caught:
        engine.generate(request(**{**base, **fields}))
    assert caught.value.field == field
    assert "Kandinsky" in str(caught.value)


def test_plain_syntax_passes_brackets(engine):
    result = engine.generate(request(prompt="a (red:1.3) disc", prompt_syntax="plain"))
    assert result.images[0].infotext.startswith("a (red:1.3) disc\n")
    assert plain_prompts(request(prompt="a (red:1.3) disc", prompt_syntax="plain"))[0] == "a (red:1.3) disc"
    assert plain_prompts(request(prompt=r"a \(red\) disc", negative_prompt="(x:1.0)")) == ("a (red) disc", "x")


def test_controlnet_units_are_refused(engine):
    unit_class = getattr(requests_module, "ControlUnit", None)
    if unit_class is None:
        pytest.skip("this version of GenerationRequest has no ControlNet units")
    with pytest.raises(RequestError) as caught:
        engine.generate(request(controlnets=(unit_class("some-controlnet"),)))
    assert caught.value.field == "controlnets" and "Kandinsky" in str(caught.value)


def _index(path: Path, cls: str, scheduler: str = "DDPMScheduler") -> Path:
    path.mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": cls, "scheduler": ["diffusers", scheduler]}))
    return path


def test_layouts(tmp_path, kandinsky_root):
    nested = find_layout(kandinsky_root / "kandinsky-2-2")
    assert nested.prior == kandinsky_root / "kandinsky-2-2" / "prior"
    sibling = find_layout(kandinsky_root / "kandinsky-2-2-decoder-inpaint")
    assert sibling.prior == kandinsky_root / "kandinsky-2-2-prior"
    with pytest.raises(ModelError, match="choose its decoder"):
        find_layout(kandinsky_root / "kandinsky-2-2-prior")
    lonely = _index(tmp_path / "lonely-decoder", "KandinskyV22Pipeline")
    with pytest.raises(ModelError, match="prior was not found"):
        find_layout(lonely)
    with pytest.raises(ModelError, match=r"Kandinsky 2\.2"):
        find_layout(_index(tmp_path / "k21", "KandinskyPipeline"))
    # the Hugging Face cache: sibling repositories, newest snapshot
    hub = tmp_path / "hub"
    decoder = _index(hub / "models--kc--kandinsky-2-2-decoder" / "snapshots" / "abc", "KandinskyV22Pipeline")
    prior = _index(hub / "models--kc--kandinsky-2-2-prior" / "snapshots" / "def", "KandinskyV22PriorPipeline")
    assert find_layout(decoder).prior == prior
    assert is_kandinsky_folder(decoder) and not is_kandinsky_folder(tmp_path)
    # what `sdstudio models list` shows
    families = {name: family_label(family_of(ModelRef(name, kandinsky_root / name)))
                for name in ("kandinsky-2-2", "kandinsky-2-2-decoder-inpaint", "kandinsky-2-2-prior")}
    assert families == {"kandinsky-2-2": "Kandinsky 2.2 (prior + decoder)",
                        "kandinsky-2-2-decoder-inpaint": "Kandinsky 2.2 inpainting",
                        "kandinsky-2-2-prior": "Kandinsky 2.2 prior (choose its decoder)"}


def test_the_family_registry_leaves_other_models_to_the_sd_runner(engine, tmp_path, kandinsky_root):
    sd = _index(tmp_path / "sd", "StableDiffusionPipeline", "PNDMScheduler")
    families = engine.families
    assert families.for_model(None).name == "sd"  # an unknown name: the SD runner reports it
    assert families.for_model(ModelRef("sd", sd)).name == "sd"
    assert families.for_model(ModelRef("k", kandinsky_root / "kandinsky-2-2")).name == "kandinsky"
    assert engine.prepare(GenerationRequest(prompt="a cat", model="kandinsky-2-2")).family == "kandinsky"


def test_combined_folder(engine, tmp_path):
    torch.manual_seed(0)
    prior, decoder = tiny_prior_pipeline(tmp_path / "tok"), tiny_decoder_pipeline()
    combined = KandinskyV22CombinedPipeline(
        **decoder.components, **{f"prior_{name}": part for name, part in prior.components.items()})
    combined.save_pretrained(tmp_path / "k22-combined", safe_serialization=True)
    result = engine.generate(request(model=str(tmp_path / "k22-combined")))
    assert result.images[0].image.size == (64, 64)
    assert result.images[0].record["model"]["layout"] == "combined"
    assert "Prior hash" not in result.images[0].infotext
