"""SD3 and Flux at every door: what they refuse (and how clearly), what A1111 clients get, the infotext, prompts,
progress and cancel, offload."""

from __future__ import annotations

import pytest
import torch

from sdstudio import Engine, GenerationRequest
from sdstudio.a1111.infotext import parse_infotext, request_fields
from sdstudio.engine.flow.encode import WeightedText, encode
from sdstudio.engine.flow.runner import weighted
from sdstudio.engine.hooks import CancelToken
from sdstudio.engine.requests import ControlUnit
from sdstudio.errors import Cancelled, RequestError
from sdstudio.pictures import decode_image
from tests.conftest import make_settings

FLUX = "tiny-flux-dev"


def small(**fields) -> GenerationRequest:
    return GenerationRequest.from_flat(**{"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "seed": 7,
                                "model": FLUX, "cfg_scale": 1.0, **fields})


@pytest.mark.parametrize(("fields", "field", "says"), [
    ({"sampler": "Euler a"}, "sampler", "flow-matching Euler"),
    ({"schedule": "Karras"}, "schedule", "shifted sigmas"),
    ({"controlnets": (ControlUnit(model="x", guess_mode=True),)}, "controlnets", "guess mode"),
    ({"pag_scale": 3.0}, "pag_scale", "perturbed-attention"),
    ({"guidance_rescale": 0.7}, "guidance_rescale", "rescale-CFG"),
    ({"clip_skip": 2}, "clip_skip", "pooled output"),
    ({"prompt": "a [red:blue:0.5] circle"}, "prompt", "prompt editing"),
    ({"prompt": "a <lora:x:1> circle"}, "prompt", "unknown LoRA"),
    ({"distilled_cfg_scale": -1.0}, "distilled_cfg_scale", "from 0 to"),
])
def test_what_flow_models_cannot_do_is_a_clear_error(flow_engine, fields, field, says):
    with pytest.raises(RequestError, match=says) as caught:
        flow_engine.prepare(small(**fields))
    assert caught.value.field == field


def test_sizes_off_the_grid_name_the_nearest(flow_engine):
    with pytest.raises(RequestError, match=r"multiple of 16 .*nearest: 64"):
        flow_engine.generate(small(width=72))


def test_a_fallback_request_runs_euler_and_says_so(flow_engine):
    result = flow_engine.generate(small(sampler="DPM++ 2M SDE", schedule="Karras", sampler_fallback=True))
    assert result.request.sampler == "Euler" and result.request.schedule == "Automatic"
    assert any("replaced by Euler" in w for w in result.warnings)
    assert any("shifted sigmas" in w for w in result.warnings)


def test_infotext_is_forges_and_reads_back(flow_engine):
    image = flow_engine.generate(small(distilled_cfg_scale=2.5, shift=2.0)).images[0]
    assert "Sampler: Euler" in image.infotext and "Distilled CFG Scale: 2.5" in image.infotext
    assert "Shift: 2," in image.infotext
    fields = request_fields(parse_infotext(image.infotext))
    assert fields["distilled_cfg_scale"] == 2.5 and fields["shift"] == 2.0 and fields["sampler"] == "Euler"
    again = flow_engine.generate(GenerationRequest.from_flat(**{**fields, "model": FLUX}))
    assert again.images[0].image.tobytes() == image.image.tobytes()


def test_shift_moves_the_schedule(flow_engine):
    own = flow_engine.generate(small(steps=4)).images[0].record["sampler"]["sigmas"]
    shifted = flow_engine.generate(small(steps=4, shift=6.0)).images[0].record["sampler"]["sigmas"]
    s = 0.75  # the second sigma of 4 linear steps from 1, shifted: shift * s / (1 + (shift - 1) * s)
    assert shifted[1] == pytest.approx(6.0 * s / (1 + 5.0 * s), abs=1e-5) and own[1] != shifted[1]


def test_weights_scale_clip_only_and_t5_reads_plain_text(flow_engine):
    model = flow_engine.families.get("flow").models.get(flow_engine.model_ref("tiny-sd3"))
    text = weighted("a (red:1.5) circle BREAK on blue", "a1111")
    assert text.text == "a red circle on blue" and text.weighted
    plain = encode(model, WeightedText(text.text))
    heavy = encode(model, text)
    t5_rows = slice(77, None)  # SD3's context: 77 CLIP rows, then T5's
    assert torch.equal(plain.context[:, t5_rows], heavy.context[:, t5_rows])
    assert not torch.allclose(plain.context[:, :77], heavy.context[:, :77])
    assert torch.equal(plain.pooled, heavy.pooled)  # pooled: CLIP's end token, unweighted as in A1111


def test_a_prompt_longer_than_t5_reads_is_a_warning(flow_engine):
    words = " ".join(f"word{i}" for i in range(400))  # > 512 T5 tokens for Flux
    result = flow_engine.generate(small(prompt=words, steps=1))
    assert any("T5 tokens" in w and "reads 512" in w for w in result.warnings)


def test_progress_preview_and_cancel(flow_engine):
    events = []
    flow_engine.generate(small(steps=3, batch_size=2), progress=events.append)
    assert [e.step for e in events] == [1, 2, 3] and events[-1].fraction == 1.0
    assert events[0].preview().size == (8, 8)  # one pixel per latent cell
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        flow_engine.generate(small(steps=3), cancel=token)


def test_interrupt_keeps_the_image_made_so_far(flow_engine):
    token = CancelToken()
    token.interrupt()
    result = flow_engine.generate(small(steps=4, n_iter=3), cancel=token)
    assert len(result.images) == 1


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_gives_the_same_image(flow_models, tmp_path, flow_engine, offload):
    settings = make_settings(tmp_path, flow_models)
    engine = Engine(type(settings)(**{**settings.__dict__, "offload": offload}))
    ours = engine.generate(small(model="tiny-sd3", cfg_scale=3.0)).latents
    assert torch.allclose(ours, flow_engine.generate(small(model="tiny-sd3", cfg_scale=3.0)).latents, atol=1e-5)


def test_http_doors(flow_models, tmp_path):
    from fastapi.testclient import TestClient

    from sdstudio.server.app import create_app
    from sdstudio.testing.live import wait_for_job

    settings = make_settings(tmp_path / "home", flow_models)
    with TestClient(create_app(settings, tmp_path / "data")) as client:
        refused = client.post("/api/v1/jobs", json={"request": {**small(sampler="Euler a").to_dict()}})
        assert refused.status_code == 422 and "Euler" in refused.text
        job = client.post("/api/v1/jobs", json={"request": small(distilled_cfg_scale=2.0).to_dict()}).json()
        assert wait_for_job(client, job["id"])["status"] == "done"
        body = {"prompt": "a red circle", "steps": 2, "seed": 3, "width": 64, "height": 64, "cfg_scale": 1,
                "sampler_name": "DPM++ 2M", "scheduler": "Karras", "distilled_cfg_scale": 3.0,
                "override_settings": {"sd_model_checkpoint": FLUX}}
        reply = client.post("/sdapi/v1/txt2img", json=body)
        assert reply.status_code == 200, reply.text
        data = reply.json()
        assert decode_image(data["images"][0], "image").size == (64, 64)
        info = __import__("json").loads(data["info"])
        assert "Distilled CFG Scale: 3," in info["infotexts"][0] and "Sampler: Euler" in info["infotexts"][0]
        models = client.get("/sdapi/v1/sd-models").json()
        assert FLUX in [m["model_name"] for m in models]


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_runs_both_passes(flow_engine, upscaler):
    events = []
    req = small(steps=3, enable_hr=True, hr_scale=2.0, hr_upscaler=upscaler, hr_second_pass_steps=4, strength=0.5,
                batch_size=2, model="tiny-sd3", cfg_scale=3.0)
    result = flow_engine.generate(req, progress=events.append)
    assert [im.image.size for im in result.images] == [(128, 128)] * 2
    assert result.latents.shape == (2, 16, 16, 16)
    assert [e.step for e in events][-1] == 3 + 2 and events[-1].steps == 5  # 4 hires steps at strength 0.5: 2
    info = result.images[0].infotext
    assert "Hires upscale: 2" in info and f"Hires upscaler: {upscaler}" in info and "Denoising strength: 0.5" in info
    first = flow_engine.generate(small(steps=3, batch_size=2, model="tiny-sd3", cfg_scale=3.0))
    assert first.images[0].seed == result.images[0].seed  # the same seeds in both passes


def test_hires_with_another_sampler_is_refused_or_falls_back(flow_engine):
    with pytest.raises(RequestError, match="hr_sampler_name"):
        flow_engine.prepare(small(enable_hr=True, hr_sampler_name="DPM++ 2M SDE"))
    result = flow_engine.generate(small(enable_hr=True, hr_sampler_name="DPM++ 2M SDE", sampler_fallback=True,
                                        hr_scale=1.5, steps=1, width=64, height=64))
    assert result.images[0].image.size == (96, 96) and any("hires pass" in w for w in result.warnings)


def test_capture_keeps_the_denoising_process(flow_engine):
    result = flow_engine.generate(small(steps=4, capture_every=2, batch_size=2))
    capture = result.images[1].capture
    assert capture.steps == [2, 4] and len(capture.decoded) == 2 and capture.decoded[0].size == (64, 64)
    assert capture.denoised[-1].tobytes() == result.images[1].image.tobytes()  # the last x0 is the image


def test_variation_seeds_are_a1111s(flow_engine):
    """slerp(strength, noise(seed), noise(subseed + k)): strength 1 is the subseed's own picture, and the infotext
    records the variation seed."""
    varied = flow_engine.generate(small(seed=7, subseed=40, subseed_strength=1.0, batch_size=2))
    plain = flow_engine.generate(small(seed=40, batch_size=2))
    assert torch.allclose(varied.latents, plain.latents, atol=1e-5)
    assert [im.seed for im in varied.images] == [7, 7] and "Variation seed: 41" in varied.images[1].infotext
    half = flow_engine.generate(small(seed=7, subseed=40, subseed_strength=0.5)).latents
    assert not torch.allclose(half, plain.latents[:1], atol=1e-3)
