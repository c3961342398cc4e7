"""Requests an attacker or an unlucky client sends: each is a 4xx that says what to fix, costs little, and the
server goes on serving (the regression tests of the hostile-input probe)."""

from __future__ import annotations

import base64
import dataclasses
import io
import struct
import time
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdstudio.pictures import image_to_b64
from sdstudio.server.app import create_app
from sdstudio.settings import Limits
from sdstudio.storage.lock import FolderInUse
from tests.conftest import make_settings

SMALL = {"prompt": "a", "steps": 1, "width": 64, "height": 64}
TINY_PNG = image_to_b64(Image.new("RGB", (8, 8)))


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model):
    home = tmp_path_factory.mktemp("hostile")
    settings = dataclasses.replace(make_settings(home / "home", tiny_model.parent, default_model=str(tiny_model)),
                                   limits=Limits(max_upload_bytes=1 << 20))
    with TestClient(create_app(settings, home / "data")) as c:
        yield c


def still_serving(client: TestClient) -> None:
    assert client.get("/sdapi/v1/samplers").status_code == 200


def test_a_huge_xyz_axis_is_refused_before_anything_is_made(client):
    start = time.monotonic()
    for axes, words in (({"x": "seed=1-1000000000"}, "at most 100"), ({"x": "seed=1-10 [99999999]"}, "at most 100"),
                        ({"x": "seed=" + ",".join(map(str, range(1000)))}, "at most 100"),
                        ({"x": "seed=1-10", "y": "steps=1-10"}, "the limit is 64")):
        response = client.post("/api/v1/xyz", json={"request": SMALL, **axes})
        assert response.status_code == 422 and words in response.json()["detail"], (axes, response.text)
    assert time.monotonic() - start < 5
    still_serving(client)


def test_a_chunked_body_over_the_limit_is_a_413(client):
    def chunks():
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MiB with no Content-Length: the limit is 1 MiB

    response = client.post("/api/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    response = client.post("/sdapi/v1/txt2img", content=b"{" + b" " * (2 << 20) + b"}",
                           headers={"content-type": "application/json"})
    assert response.status_code == 413
    still_serving(client)


@pytest.mark.parametrize(("route", "body", "field"), [
    ("/api/v1/jobs", '{"request": {"prompt": "a", "cfg_scale": Infinity}}', "request.cfg_scale"),
    ("/api/v1/jobs", '{"request": {"prompt": "a \\ud800 b"}}', "request.prompt"),
    ("/sdapi/v1/txt2img", '{"prompt": "a", "cfg_scale": NaN}', "cfg_scale"),
    ("/sdapi/v1/txt2img", '{"prompt": "a", "override_settings": {"CLIP_stop_at_last_layers": NaN}}',
     "override_settings.CLIP_stop_at_last_layers"),
    ("/sdapi/v1/options", '{"CLIP_stop_at_last_layers": -Infinity}', "CLIP_stop_at_last_layers"),
    ("/api/v1/jobs", '{"request": {"prompt": "a", "controlnets": [{"model": "x", "weight": Infinity}]}}',
     "request.controlnets.0.weight"),
    ("/api/v1/jobs", "[" * 5000 + "]" * 5000, "body"),
])
def test_numbers_json_lacks_and_broken_text_are_a_422_naming_the_field(client, route, body, field):
    response = client.post(route, content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert field in response.text
    still_serving(client)


def test_invalid_utf8_is_a_422(client):
    response = client.post("/api/v1/jobs", content=b'{"request": {"prompt": "a \xff b"}}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 422 and "UTF-8" in response.json()["detail"]


def test_one_server_per_data_folder(tmp_path, tiny_model):
    settings = make_settings(tmp_path / "home", tiny_model.parent, default_model=str(tiny_model))
    first = create_app(settings, tmp_path / "data", start_worker=False)
    with TestClient(first), pytest.raises(FolderInUse, match=r"in use by another sdstudio server \(PID \d+\)"):
        create_app(settings, tmp_path / "data", start_worker=False)
    with TestClient(create_app(settings, tmp_path / "data", start_worker=False)) as again:  # the first has stopped
        assert again.get("/api/v1/jobs").status_code == 200


@pytest.mark.parametrize("field", ["model", "vae", "controlnet", "upscaler_1", "sd_model_checkpoint"])
def test_model_fields_take_names_not_paths_and_tell_nothing_about_the_disk(client, tmp_path, field):
    """A path is never opened: an existing and a missing file get the same answer (no existence oracle)."""
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"not a model")

    def ask(value: str):
        if field == "controlnet":
            body = {"request": {**SMALL, "controlnets": [{"model": value, "image": TINY_PNG}]}}
            return client.post("/api/v1/jobs", json=body)
        if field == "upscaler_1":
            return client.post("/sdapi/v1/extra-single-image", json={"image": TINY_PNG, "upscaler_1": value})
        if field == "sd_model_checkpoint":
            return client.post("/sdapi/v1/options", json={"sd_model_checkpoint": value})
        return client.post("/api/v1/jobs", json={"request": {**SMALL, field: value}})

    answers = []
    for value in (str(secret), str(tmp_path / "missing.safetensors"), "/etc/passwd"):
        response = ask(value)
        assert 400 <= response.status_code < 500, (value, response.text)
        answers.append(response.json()["detail"].replace(value, "<given>").replace("secret", "missing")
                       .replace("passwd", "missing.safetensors"))
    assert len(set(answers)) == 1 and "unknown" in answers[0], answers
    still_serving(client)


def test_a_link_out_of_the_model_folders_is_refused(tmp_path, tiny_model):
    models = tmp_path / "models"
    models.mkdir()
    (models / "linked").symlink_to(tiny_model, target_is_directory=True)
    settings = make_settings(tmp_path / "home", models, default_model="linked")
    with TestClient(create_app(settings, tmp_path / "data", start_worker=False)) as c:
        response = c.post("/api/v1/jobs", json={"request": {**SMALL, "model": "linked"}})
        assert response.status_code == 422 and "--allow-folder" in response.json()["detail"]


def claimed_png(width: int, height: int) -> str:
    """A tiny PNG whose header claims width x height (the IHDR rewritten, its CRC fixed): a decompression bomb
    as far as any reader that trusts the header is concerned."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)            # IHDR data starts at 16: width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC over "IHDR" + its 13 bytes
    return base64.b64encode(bytes(data)).decode()


@pytest.mark.parametrize("size", [(30000, 30000), (12000, 12000)])
def test_pictures_over_the_pixel_limit_are_refused_before_decoding(client, size):
    bomb = claimed_png(*size)
    for route, body, field in (
            ("/sdapi/v1/png-info", {"image": bomb}, "image"),
            ("/api/v1/png-info", {"image": bomb}, "image"),
            ("/api/v1/jobs", {"request": {**SMALL, "init_image": bomb}}, "init_image"),
            ("/sdapi/v1/img2img", {"init_images": [bomb], "prompt": "a", "steps": 1}, "init_images[0]"),
            ("/sdapi/v1/img2img", {"init_images": [TINY_PNG], "mask": bomb, "prompt": "a", "steps": 1}, "mask"),
            ("/sdapi/v1/extra-single-image", {"image": bomb, "upscaler_1": "Lanczos"}, "image"),
            ("/controlnet/detect", {"controlnet_input_images": [bomb], "controlnet_module": "canny"},
             "controlnet_input_images[0]"),
            ("/api/v1/preprocess", {"image": bomb, "preprocessor": "canny"}, "image")):
        response = client.post(route, json=body)
        assert response.status_code == 422 and field in response.text and "pixels" in response.text, (
            route, response.text)
    still_serving(client)


@pytest.mark.parametrize(("body", "field", "words"), [
    ({**SMALL, "controlnets": [{"model": "x", "image": TINY_PNG}] * 9}, "controlnets", "the limit is 8"),
    ({**SMALL, "prompt": "a BREAK " * 33}, "prompt", "BREAKs"),
    ({**SMALL, "prompt": "(" * 3000 + "a" + ")" * 3000, "prompt_syntax": "compel"}, "prompt", "nests brackets"),
    ({**SMALL, "width": 2048, "height": 2048, "steps": 150, "batch_size": 8, "n_iter": 8}, "steps", "pixel-steps"),
])
def test_work_per_request_is_bounded_before_queueing(client, body, field, words):
    response = client.post("/api/v1/jobs", json={"request": body})
    assert response.status_code == 422 and words in response.json()["detail"], response.text
    assert response.json()["field"] == field


def test_an_a1111_body_with_1000_controlnet_units_is_refused_before_reading_them(client):
    unit = {"enabled": True, "image": TINY_PNG, "model": "x", "module": "none"}
    start = time.monotonic()
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 1, "alwayson_scripts": {
        "ControlNet": {"args": [unit] * 1000}}})
    assert response.status_code == 422 and "the limit is 8" in response.json()["detail"]
    assert time.monotonic() - start < 5


def test_cancel_acts_within_a_step_between_controlnet_units_and_decoded_images():
    """A long step (many units, a large batch's decode) checks the cancel token between its parts."""
    import torch

    from sdstudio.engine.hooks import CancelToken
    from sdstudio.engine.sd.control import ControlInput, residuals
    from sdstudio.engine.sd.stages import decode_latents
    from sdstudio.errors import Cancelled

    calls = []
    token = CancelToken()

    def unit_model(*args, **kwargs):
        calls.append(1)
        token.cancel()  # the user cancels while the first unit runs
        return [torch.zeros(1)], torch.zeros(1)

    units = [ControlInput(unit_model, torch.zeros(1, 3, 8, 8), 1.0, 0.0, 1.0, False)] * 5
    cond = type("Cond", (), {"positive": type("P", (), {"unet_kwargs": lambda self: {}})()})()
    with pytest.raises(Cancelled):
        residuals(units, torch.zeros(1, 4, 1, 1), torch.tensor(1), cond, False, 1, 0, 10, token.raise_if_cancelled)
    assert len(calls) == 1  # the other four units never ran

    class Vae(torch.nn.Module):
        dtype, config, decoded = torch.float32, type("C", (), {"scaling_factor": 1.0})(), 0

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def decode(self, z, return_dict=False):
            Vae.decoded += 1
            token.cancel()
            return (z,)

    token = CancelToken()
    with pytest.raises(Cancelled):
        decode_latents(Vae(), torch.zeros(8, 4, 2, 2), token.raise_if_cancelled)
    assert Vae.decoded == 1


def test_other_host_names_and_cross_site_pages_are_refused(tmp_path, tiny_model):
    """DNS rebinding (a foreign Host) and a cross-site page's body-less interrupt; API clients unaffected."""
    from sdstudio.server.browser_guards import allowed_hosts_for

    settings = make_settings(tmp_path / "home", tiny_model.parent, default_model=str(tiny_model))
    app = create_app(settings, tmp_path / "data", start_worker=False,
                     allowed_hosts=allowed_hosts_for("127.0.0.1", ["testserver"]))
    with TestClient(app) as c:
        assert c.get("/sdapi/v1/samplers", headers={"host": "evil.example"}).status_code == 400
        assert c.get("/sdapi/v1/samplers", headers={"host": "localhost:7860"}).status_code == 200
        assert c.get("/sdapi/v1/samplers", headers={"host": "[::1]:7860"}).status_code == 200
        refused = c.post("/sdapi/v1/interrupt", headers={"origin": "http://evil.example"})
        assert refused.status_code == 403 and "cross-site" in refused.json()["detail"]
        assert c.post("/sdapi/v1/interrupt", headers={"sec-fetch-site": "cross-site"}).status_code == 403
        assert c.post("/sdapi/v1/interrupt", headers={"origin": "http://testserver"}).status_code == 200  # its UI
        assert c.post("/sdapi/v1/interrupt").status_code == 200  # webuiapi, SillyTavern: no Origin
    assert allowed_hosts_for("0.0.0.0") is None  # bound to every address: any name, unless names are given


def test_a_missing_or_damaged_stored_image_is_a_404(client):
    job = client.post("/api/v1/jobs", json={"request": {**SMALL, "batch_size": 2}}).json()
    from sdstudio.testing.live import wait_for_job

    done = wait_for_job(client, job["id"])
    state = client.app.state.sdstudio
    files = done["result"]["images"]
    record = state.store.get(job["id"]).result["images"]
    (state.images_dir / record[0]).unlink()
    (state.images_dir / record[1]).write_bytes(b"garbage")
    for url in files:
        response = client.get(url)
        assert response.status_code == 404 and "missing or damaged" in response.json()["detail"]
    still_serving(client)


def test_requests_that_used_to_fail_in_the_worker_are_refused_at_the_door(client):
    no_model = client.post("/api/v1/jobs", json={"request": {**SMALL, "controlnets": [{"image": TINY_PNG}]}})
    assert no_model.status_code == 422 and no_model.json()["field"] == "controlnets.model"
    one_pixel = image_to_b64(Image.new("RGB", (1, 1)))
    outpaint = client.post("/api/v1/outpaint", json={"request": {"prompt": "a", "steps": 1, "init_image": one_pixel},
                                                     "left": 64})
    assert outpaint.status_code == 422 and outpaint.json()["field"] == "init_image", outpaint.text
    still_serving(client)
