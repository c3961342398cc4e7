"""Real A1111 clients work unchanged: the `webuiapi` package against a live server on the demo model."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image, ImageDraw

from sdstudio import Settings
from sdstudio.server.app import create_app
from sdstudio.settings import PACKAGED_MODELS
from sdstudio.testing.live import live_server


@pytest.fixture(scope="module", params=["thread", pytest.param("ray", marks=pytest.mark.ray)])
def api(request, tmp_path_factory):
    """The real webuiapi client against the server, its jobs run by the worker thread or by Ray actors."""
    cluster = None
    if request.param == "ray":
        pytest.importorskip("ray")
        from sdstudio.server.cluster.options import ClusterOptions

        cluster = ClusterOptions()  # starts a local Ray instance, and stops it with the server
    home = tmp_path_factory.mktemp("a1111-home")
    shutil.copytree(PACKAGED_MODELS / "demo", home / "models" / "demo-copy")  # a second model to switch to
    settings = Settings.from_env(home=home, outputs_dir=home / "outputs", device=torch.device("cpu"),
                                 dtype=torch.float32, default_model="demo",
                                 models_dirs=(home / "models", PACKAGED_MODELS))
    with live_server(create_app(settings, home / "server", cluster=cluster)) as port:
        yield webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=10)


def test_txt2img(api):
    result = api.txt2img(prompt="a red circle on a blue background", seed=4, width=64, height=64,
                         batch_size=2, cfg_scale=7)
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    assert result.info["all_seeds"] == [4, 5] and result.info["sampler_name"] == "Euler a"
    assert "Seed: 4" in result.info["infotexts"][0]
    red = sum(1 for px in result.image.convert("RGB").getdata() if px[0] > 150 and px[2] < 100)
    assert red > 100  # the demo model drew the red circle


def test_img2img_and_inpainting(api):
    init = Image.new("RGB", (64, 64), (40, 80, 220))
    ImageDraw.Draw(init).ellipse((16, 16, 48, 48), fill=(220, 40, 40))
    out = api.img2img(images=[init], prompt="a yellow circle on a blue background", denoising_strength=0.6,
                      seed=1, width=64, height=64)
    assert out.image.size == (64, 64) and out.info["denoising_strength"] == 0.6
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((12, 12, 52, 52), fill=255)
    inpainted = api.img2img(images=[init], mask_image=mask, prompt="a large yellow square in the center on a blue "
                            "background", denoising_strength=1.0, inpainting_fill=1, inpaint_full_res=False,
                            seed=2, width=64, height=64)
    assert "Masked content: original" in inpainted.info["infotexts"][0]
    corner = inpainted.image.convert("RGB").getpixel((2, 2))
    assert corner == init.getpixel((2, 2))  # outside the mask: the user's pixels


def test_png_info_reads_our_images(api):
    result = api.txt2img(prompt="a green diamond", seed=9, width=64, height=64, steps=4)
    info = api.png_info(result.image)
    assert "Seed: 9" in info.info and info.parameters["Seed"] == "9"


def test_set_and_get_model(api):
    models = {m["model_name"]: m for m in api.get_sd_models()}
    demo = models["demo"]  # bundled models carry their real hash, in the title too, as A1111 lists them
    assert len(demo["sha256"]) == 64 and demo["hash"] == demo["sha256"][:10]
    assert demo["title"] == f"demo [{demo['hash']}]" and models["demo-copy"]["sha256"] == demo["sha256"]
    api.util_set_model("demo-copy")
    assert api.util_get_current_model() == models["demo-copy"]["title"]
    result = api.txt2img(prompt="a red circle", seed=1, width=64, height=64, steps=2)
    assert result.info["sd_model_name"] == "demo-copy" and result.info["sd_model_hash"] == demo["hash"]
    api.util_set_model("demo")
    refused = api.set_options({"sd_model_checkpoint": "no-such-model"})  # webuiapi returns the error body
    assert "no-such-model" in refused["detail"] and api.util_get_current_model() == demo["title"]


def test_progress_polling_and_interrupt(api):
    done = {}

    def long_job():
        done["result"] = api.txt2img(prompt="a red circle", seed=3, width=64, height=64, steps=150, n_iter=3)

    worker = threading.Thread(target=long_job)
    worker.start()
    deadline = time.monotonic() + 60
    progress = api.get_progress()
    while progress["progress"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
        progress = api.get_progress()
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] > 0
    assert progress["current_image"]  # a live preview, base64
    api.interrupt()
    worker.join(60)
    result = done["result"]  # as A1111: the image so far (the model's current estimate), no further batch
    assert len(result.images) == 1 and result.image.size == (64, 64)
    assert api.get_progress()["progress"] == 0


def test_bad_input_is_a_422_naming_what_to_fix(api):
    response = api.session.post(f"{api.baseurl}/txt2img", json={"prompt": "x", "width": 64, "height": 64,
                                                                 "steps": 2, "restore_faces": True})
    assert response.status_code == 422
    body = response.json()
    assert "restore_faces" in body["detail"] and set(body) >= {"error", "detail", "body", "errors"}


def test_an_unknown_sampler_falls_back_as_a1111_and_says_so(api):
    response = api.session.post(f"{api.baseurl}/txt2img", json={"prompt": "x", "sampler_name": "Eulr",
                                                                 "width": 64, "height": 64, "steps": 2})
    assert response.status_code == 200
    info = json.loads(response.json()["info"])
    assert info["sampler_name"] == "DPM++ 2M" and "Sampler: DPM++ 2M" in info["infotexts"][0]
    assert any("unknown sampler 'Eulr'" in w for w in info["warnings"])


def test_controlnet_through_alwayson_scripts(api):
    from sdstudio.engine.sd.preprocess import canny
    from sdstudio.train.analyse import analyse
    from sdstudio.train.shapes import ShapeSpec, draw

    edges = canny(draw(ShapeSpec("circle", "white", "black", "large", (0, 0)), 64))
    unit = webuiapi.ControlNetUnit(image=edges, module="none", model="demo-canny", resize_mode="Just Resize")
    result = api.txt2img(prompt="a red circle on a blue background", seed=1, width=64, height=64, steps=20,
                         sampler_name="DPM++ 2M", controlnet_units=[unit])
    assert analyse(result.image).position == (0, 0)
    assert "Model: demo-canny [" in result.info["infotexts"][0]


def test_forge_freeu_and_pag_over_the_api_are_applied_and_written_as_forge_does(api):
    request = dict(prompt="a red circle on a blue background", seed=5, width=64, height=64, steps=6)
    scripts = {"FreeU Integrated": {"args": [True, 1.5, 1.6, 0.9, 0.2]},
               "Perturbed Attention Guidance Integrated": {"args": [True, 2.0]}}
    guided = api.txt2img(**request, alwayson_scripts=scripts)
    text = guided.info["infotexts"][0]
    assert "freeu_enabled: True, freeu_b1: 1.5" in text and "PerturbedAttentionGuidance_scale: 2" in text
    plain = api.txt2img(**request)
    assert np.abs(np.asarray(guided.image, int) - np.asarray(plain.image, int)).max() > 0


def test_listings_and_extras(api):
    assert {"Euler a", "DPM++ 2M"} <= {s["name"] for s in api.get_samplers()}
    assert "Karras" in {s["label"] for s in api.get_schedulers()}
    assert "Lanczos" in {u["name"] for u in api.get_upscalers()}
    assert "Latent (bicubic)" in {m["name"] for m in api.get_latent_upscale_modes()}
    assert api.get_sd_vae() == [] and [lora["name"] for lora in api.get_loras()] == ["lcm-lora-demo"]
    assert api.get_options()["CLIP_stop_at_last_layers"] == 1



def test_extras_have_a1111s_semantics(api):
    red = Image.new("RGB", (32, 16), "red")
    same = api.extra_single_image(red, upscaling_resize=2)  # upscaler_1 "None", webuiapi's default: unchanged
    assert same.image.size == (32, 16) and same.info == ""
    bigger = api.extra_single_image(red, upscaling_resize=2, upscaler_1="Lanczos")
    assert bigger.image.size == (64, 32) and bigger.info.startswith("Postprocess upscale by: 2")
    cropped = api.extra_single_image(red, resize_mode=1, upscaling_resize_w=48, upscaling_resize_h=48,
                                     upscaler_1="Nearest")
    assert cropped.image.size == (48, 48) and "Postprocess crop to: 48x48" in cropped.info
    assert cropped.image.getpixel((24, 24)) == (255, 0, 0)  # scaled to cover 48x48, centre-cropped
    blend = api.extra_single_image(Image.new("RGB", (8, 8), "white"), upscaling_resize=2, upscaler_1="Nearest",
                                   upscaler_2="Bilinear", extras_upscaler_2_visibility=0.5)
    assert "Postprocess upscaler 2 visibility: 0.5" in blend.info
    batch = api.extra_batch_images([red, Image.new("RGB", (8, 8), "blue")], upscaling_resize=3, upscaler_1="Lanczos")
    assert [im.size for im in batch.images] == [(96, 48), (24, 24)]
    with pytest.raises(RuntimeError, match=r"422.*codeformer_visibility"):
        api.extra_single_image(red, codeformer_visibility=0.5, upscaler_1="Lanczos")


def test_options_are_a1111s_whole_table_kept_checked_and_acted_on(api):
    options = api.get_options()
    assert len(options) > 280 and options["send_seed"] is True  # A1111's own test_options_write
    api.set_options({"send_seed": False, "samples_format": "jpg", "my_extension_option": [1, 2]})
    assert api.get_options()["send_seed"] is False and api.get_options()["my_extension_option"] == [1, 2]
    result = api.txt2img(prompt="a red circle", seed=3, width=64, height=64, steps=2)
    assert result.image.format == "JPEG"  # samples_format takes effect, the infotext in EXIF as A1111 writes it
    sent = api.session.post(f"{api.baseurl}/png-info", json={"image": result.json["images"][0]}).json()
    assert sent["info"].startswith("a red circle\n") and sent["parameters"]["Seed"] == "3"
    refused = api.session.post(f"{api.baseurl}/options", json={"CLIP_stop_at_last_layers": 1e30, "send_seed": True})
    assert refused.status_code == 422 and "CLIP_stop_at_last_layers" in refused.json()["detail"]
    assert api.get_options()["send_seed"] is False  # a refused request changes nothing
    api.set_options({**api.get_options(), "samples_format": "png", "send_seed": True})  # GET posted back whole
    again = api.txt2img(prompt="a red circle", seed=3, width=64, height=64, steps=2)
    assert again.image.format == "PNG" and again.info["clip_skip"] == 1


def test_native_progress_stream(api):
    import httpx

    base = api.baseurl.removesuffix("/sdapi/v1")
    job = httpx.post(f"{base}/api/v1/jobs", json={"request": {"prompt": "a red circle", "steps": 150}}).json()
    kinds, previews = [], 0
    with httpx.stream("GET", f"{base}/api/v1/jobs/{job['id']}/events", timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kinds.append(line[7:])
            elif line.startswith("data: ") and '"preview"' in line:
                previews += 1
    assert kinds[-1] == "done" and set(kinds[:-1]) <= {"progress"}
    assert previews > 0  # 150 steps take long enough for the 4-per-second stream to see the running job


def test_routes_clients_probe_answer_in_a1111s_shapes(api):
    base = api.baseurl
    for route in ("hypernetworks", "face-restorers", "realesrgan-models", "prompt-styles"):
        response = api.session.get(f"{base}/{route}")
        assert response.status_code == 200 and response.json() == [], route
    scripts = ["controlnet", "freeu integrated", "perturbed attention guidance integrated"]
    assert api.session.get(f"{base}/scripts").json() == {"txt2img": scripts, "img2img": scripts}
    assert {s["name"] for s in api.session.get(f"{base}/script-info").json()} == set(scripts)
    assert api.session.post(f"{base}/interrupt").json() == {} and api.session.post(f"{base}/skip").json() == {}
    assert api.controlnet_version() == 2
    models = api.controlnet_model_list()
    assert any(m.startswith("demo-canny [") and m.endswith("]") and len(m.split("[")[1]) == 9 for m in models)
    assert "canny" in api.controlnet_module_list()
    detected = api.controlnet_detect([Image.new("RGB", (64, 32), "black")], module="canny", processor_res=64)
    assert detected.images[0].size == (128, 64) and detected.info == "Success"
    flags = api.get_cmd_flags()
    assert flags["api"] is True and not any("/" in str(v) for v in flags.values())  # no local paths
    refused = api.session.post(f"{base}/interrogate", json={"image": "", "model": "clip"})
    assert refused.status_code == 422 and "captioning model" in refused.json()["detail"]
    for route in ("refresh-loras", "refresh-embeddings", "refresh-vae"):
        assert api.session.post(f"{base}/{route}").status_code == 200
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}} and api.get_hypernetworks() == []


def test_sillytavern_default_sampler_and_a1111_default_with_karras(api):
    for sampler, scheduler in (("DDIM", "normal"), ("Euler a", "Karras"), ("Euler a Karras", None)):
        body = {"prompt": "a red circle", "sampler_name": sampler, "steps": 3, "width": 64, "height": 64}
        if scheduler:
            body["scheduler"] = scheduler
        response = api.session.post(f"{api.baseurl}/txt2img", json=body)
        assert response.status_code == 200, (sampler, scheduler, response.text)
        assert len(response.json()["images"]) == 1


def test_every_webuiapi_method_that_needs_no_download(api):
    """Each of webuiapi's methods a server without extensions or downloaded models can serve answers in the
    shape webuiapi reads; those it cannot (interrogate, face restoration) raise with a 422 that says why."""
    listings = {"get_samplers": list, "get_schedulers": list, "get_sd_models": list, "get_sd_vae": list,
                "get_upscalers": list, "get_latent_upscale_modes": list, "get_loras": list, "get_hypernetworks": list,
                "get_face_restorers": list, "get_realesrgan_models": list, "get_prompt_styles": list,
                "get_scripts": dict, "get_embeddings": dict, "get_memory": dict, "get_options": dict,
                "get_cmd_flags": dict, "get_progress": dict, "controlnet_model_list": list,
                "controlnet_module_list": list, "util_get_model_names": list, "util_get_sampler_names": list,
                "util_get_scheduler_names": list}
    for method, kind in listings.items():
        assert isinstance(getattr(api, method)(), kind), method
    assert api.controlnet_version() == 2 and api.util_get_current_model()
    assert "DPM fast" in api.util_get_sampler_names() and "Restart" in api.util_get_sampler_names()
    api.util_wait_for_ready(check_interval=0.1)  # idle: returns at once
    assert api.refresh_checkpoints() is None
    api.check_extensions()
    assert api.custom_get("controlnet/version") == {"version": 2}
    assert api.interrupt() is not None and api.skip() is not None
    with pytest.raises(RuntimeError, match="422"):
        api.interrogate(Image.new("RGB", (8, 8)))
    with pytest.raises(RuntimeError, match="422"):
        api.extra_single_image(Image.new("RGB", (8, 8)), gfpgan_visibility=1, upscaler_1="Lanczos")
