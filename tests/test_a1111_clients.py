"""SillyTavern's and Open WebUI's A1111 traffic, replayed against a live server: the calls, headers and bodies
those clients send at their default settings (SillyTavern 1.15 src/endpoints/stable-diffusion.js and the
stable-diffusion extension's generateAutoImage; Open WebUI 0.10 routers/images.py), and the response fields
they read. Only the picture size and step count are smaller than their defaults, to keep the suite fast."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
import torch
from PIL import Image

from sdstudio import Settings
from sdstudio.server.app import create_app
from sdstudio.settings import PACKAGED_MODELS
from sdstudio.testing.live import live_server

EMPTY_BASIC = {"Authorization": "Basic"}  # both send "Basic " when no credentials are set (fetch trims it)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    home = tmp_path_factory.mktemp("clients-home")
    settings = Settings.from_env(home=home, outputs_dir=home / "outputs", device=torch.device("cpu"),
                                 dtype=torch.float32, default_model="demo", models_dirs=(PACKAGED_MODELS,))
    with live_server(create_app(settings, home / "server")) as port:
        yield f"http://127.0.0.1:{port}"


def sillytavern_txt2img(prompt: str) -> dict:
    """generateAutoImage's body at SillyTavern's default settings (its server adds url and auth)."""
    return {
        "url": "http://localhost:7860", "auth": "", "prompt": f"best quality, absurdres, aesthetic, {prompt}",
        "negative_prompt": "lowres, bad anatomy, bad hands, text, error, cropped, worst quality, low quality, "
                           "normal quality, jpeg artifacts, signature, watermark, username, blurry",
        "sampler_name": "DDIM", "scheduler": "normal", "steps": 4, "cfg_scale": 7, "width": 64, "height": 64,
        "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 1,
        "hr_additional_modules": [], "denoising_strength": 0.7, "hr_second_pass_steps": 0,
        "override_settings": {"CLIP_stop_at_last_layers": 1}, "override_settings_restore_afterwards": True,
        "clip_skip": 1, "save_images": True, "send_images": True, "do_not_save_grid": False,
        "do_not_save_samples": False,
    }


def png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def test_sillytavern_connects_lists_switches_model_and_generates(base):
    with httpx.Client(base_url=f"{base}/sdapi/v1", headers=EMPTY_BASIC, timeout=120) as st:
        options = st.get("/options").json()  # ping, and "is this Forge?"
        assert "forge_preset" not in options and isinstance(options["sd_model_checkpoint"], str)
        titles = [m["title"] for m in st.get("/sd-models").json()]
        samplers = [s["name"] for s in st.get("/samplers").json()]
        schedulers = [s["name"] for s in st.get("/schedulers").json()]
        upscalers = [u["name"] for u in st.get("/upscalers").json()]
        upscalers += [m["name"] for m in st.get("/latent-upscale-modes").json()]
        vaes = [v["model_name"] for v in st.get("/sd-vae").json()]
        assert "DDIM" in samplers and "normal" in schedulers and "Latent" in upscalers and vaes == []
        demo = next(t for t in titles if t.startswith("demo ["))
        assert st.post("/options", json={"sd_model_checkpoint": demo}).status_code == 200
        progress = st.get("/progress").json()  # polled until the switch is done
        assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
        response = st.post("/txt2img", json=sillytavern_txt2img("a red circle on a blue background"))
        assert response.status_code == 200, response.text
        assert png(response.json()["images"][0]).size == (64, 64)  # the one field SillyTavern reads
        assert st.post("/interrupt").status_code == 200  # sent without a body when the user aborts


def test_sillytavern_with_hires_fix_and_a_seed(base):
    body = {**sillytavern_txt2img("a red circle"), "enable_hr": True, "hr_scale": 2.0, "seed": 5}
    response = httpx.post(f"{base}/sdapi/v1/txt2img", json=body, headers=EMPTY_BASIC, timeout=120)
    assert response.status_code == 200, response.text
    assert png(response.json()["images"][0]).size == (128, 128)
    assert json.loads(response.json()["info"])["seed"] == 5


def test_open_webui_verifies_sets_model_and_generates(base):
    url = f"{base}/"  # Open WebUI joins its base URL and the path as strings: a trailing "/" gives "//sdapi/..."
    with httpx.Client(headers={"authorization": "Basic"}, timeout=120) as owui:
        options = owui.get(f"{url}/sdapi/v1/options")
        options.raise_for_status()  # the admin "verify" button
        models = [(m["title"], m["model_name"]) for m in owui.get(f"{url}/sdapi/v1/sd-models").json()]
        title = next(t for t, name in models if name == "demo-inpaint")
        options = options.json()
        for model in (title, "", "demo"):  # saving admin settings with no model posts back ""
            owui.post(f"{url}/sdapi/v1/options", json={**options, "sd_model_checkpoint": model}).raise_for_status()
            options = owui.get(f"{url}/sdapi/v1/options").json()
        assert options["sd_model_checkpoint"] == "demo"
        data = {"prompt": "a red circle on a blue background", "batch_size": 1, "width": 64, "height": 64,
                "steps": 5}
        res = owui.post(f"{url}/sdapi/v1/txt2img", json=data).json()
        assert [png(image).size for image in res["images"]] == [(64, 64)]
        json.dumps({**data, "info": res["info"]})  # stored with the image: must be JSON
        # its admin "Additional Parameters" merged over the body
        res = owui.post(f"{url}/sdapi/v1/txt2img", json={**data, "cfg_scale": 7, "sampler_name": "Euler a",
                                                         "scheduler": "Karras", "seed": -1}).json()
        assert json.loads(res["info"])["sampler_name"] == "Euler a"
