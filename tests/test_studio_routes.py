"""The native routes a browser UI needs: catalog, PNG info, preprocessor preview, a job's request, denoising
captures and X/Y/Z plots as queued jobs, on a live app (worker thread, SQLite queue) with the tiny model."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from sdstudio import Settings
from sdstudio.engine.hooks import ProgressEvent
from sdstudio.engine.requests import ControlUnit, GenerationRequest
from sdstudio.engine.workflows.xyz import XYZProgress
from sdstudio.pictures import image_to_b64
from sdstudio.server.app import create_app
from sdstudio.server.xyz_job import plot_event
from sdstudio.settings import PACKAGED_MODELS
from sdstudio.testing.live import wait_for_job as wait
from tests.conftest import shapes_image


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared machine
    home = tmp_path_factory.mktemp("studio-home")
    settings = Settings(home=home, outputs_dir=home / "outputs", models_dirs=(tiny_model.parent, PACKAGED_MODELS),
                        device=torch.device("cpu"), dtype=torch.float32, default_model=str(tiny_model))
    with TestClient(create_app(settings, home / "data")) as c:
        yield c
    torch.set_num_threads(threads)


def run_job(client, **request) -> dict:
    job = client.post("/api/v1/jobs", json={"request": request})
    assert job.status_code == 202, job.json()
    done = wait(client, job.json()["id"])
    assert done["status"] == "done", done
    return done


def png(response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


def b64_png(image: Image.Image, text: dict[str, str] | None = None) -> str:
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_catalog_lists_what_requests_accept(client, tiny_model):
    cat = client.get("/api/v1/catalog").json()
    models = {m["name"]: m for m in cat["models"]}
    assert models["demo"]["family"] == "sd1" and models["demo"]["inpainting"] is False
    assert models["demo-inpaint"]["inpainting"] is True and models["demo"]["title"] == "demo"
    assert cat["default_model"] == tiny_model.name and tiny_model.name in models
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= set(cat["samplers"]) and "Karras" in cat["schedules"]
    assert "demo-canny" in cat["controlnets"] and {"canny", "openpose", "inpaint"} <= set(cat["preprocessors"])
    assert "Lanczos" in cat["upscalers"] and "Latent" in cat["latent_upscale_modes"]
    assert cat["masked_content"] == ["fill", "original", "latent noise", "latent nothing"]
    assert cat["inpaint_methods"] == ["auto", "condition", "blend"] and cat["vaes"] == ["taesd"]  # the demo's own
    assert cat["loras"] == ["lcm-lora-demo"]  # the demo's LCM-LoRA ships with the package
    assert cat["limits"]["max_steps"] == 150 and cat["limits"]["max_pixels"] == 2048 * 2048
    defaults = cat["defaults"]
    assert (defaults["steps"], defaults["cfg_scale"], defaults["sampler"], defaults["schedule"]) == \
           (20, 7.0, "DPM++ 2M", "Automatic")
    assert defaults["width"] is None and defaults["strength"] == 0.75 and defaults["mask_blur"] == 4
    assert cat["control_defaults"]["high_threshold"] == 200 and "steps" in {a["name"] for a in cat["xyz_axes"]}
    engine = client.app.state.sdstudio.engine
    for name in models:  # every name listed is one a request resolves
        assert engine.model_ref(name).name == name
    for sampler in cat["samplers"]:
        unit = ControlUnit(cat["controlnets"][0], image=shapes_image(), preprocessor="canny")
        engine.prepare(GenerationRequest(model="demo", sampler=sampler, schedule=cat["schedules"][0],
                                       controlnets=(unit,)))


def test_lora_and_embedding_cards_show_the_preview_kept_beside_the_file(client):
    home = client.app.state.sdstudio.settings.home
    lora, embeddings = home / "lora" / "styles", home / "embeddings"
    for folder in (lora, embeddings):
        folder.mkdir(parents=True, exist_ok=True)
    files = [lora / "ink wash.safetensors", lora / "plain.safetensors", embeddings / "bad-hands.pt"]
    for path in files:
        path.write_bytes(b"weights")
    shapes_image().save(lora / "ink wash.preview.png")  # A1111's names for a card's picture
    shapes_image().save(embeddings / "bad-hands.jpg")
    try:
        cards = client.get("/api/v1/catalog").json()["networks"]
        assert cards == [{"kind": "lora", "name": "ink wash", "preview": "/api/v1/previews/lora/ink%20wash"},
                         {"kind": "lora", "name": "plain", "preview": None},
                         {"kind": "lora", "name": "lcm-lora-demo", "preview": None},  # packaged, listed last
                         {"kind": "embedding", "name": "bad-hands", "preview": "/api/v1/previews/embedding/bad-hands"}]
        assert png(client.get(cards[0]["preview"])).size == shapes_image().size
        assert client.get(cards[3]["preview"]).headers["content-type"] == "image/jpeg"
        for missing in ("/api/v1/previews/lora/plain", "/api/v1/previews/vae/ink%20wash"):
            answer = client.get(missing)
            assert answer.status_code == 404 and "no preview picture" in answer.json()["detail"], missing
        assert client.get("/api/v1/previews/lora/..%2F..%2Flora%2Fstyles%2Fink%20wash").status_code == 404
    finally:
        for path in files:
            path.unlink()


def test_png_info_of_our_own_image_gives_back_its_request(client):
    done = run_job(client, prompt="a red circle", negative_prompt="blurry", steps=2, seed=5, cfg_scale=6)
    picture = client.get(done["result"]["images"][0]).content
    data_url = "data:image/png;base64," + base64.b64encode(picture).decode("ascii")
    info = client.post("/api/v1/png-info", json={"image": data_url})
    assert info.status_code == 200, info.json()
    body = info.json()
    assert body["source"] == "sdstudio" and "Seed: 5" in body["infotext"]
    fields = body["fields"]
    assert (fields["prompt"], fields["negative_prompt"], fields["seed"], fields["steps"], fields["cfg_scale"]) == \
           ("a red circle", "blurry", 5, 2, 6.0)


def test_png_info_of_an_a1111_text_and_of_nothing(client):
    text = "a cat\nNegative prompt: ugly\nSteps: 12, Sampler: Euler a, CFG scale: 5, Seed: 42, Size: 64x64"
    body = client.post("/api/v1/png-info", json={"image": b64_png(shapes_image(), {"parameters": text})}).json()
    assert body["source"] == "a1111" and body["infotext"] == text
    fields = body["fields"]
    assert (fields["prompt"], fields["negative_prompt"], fields["steps"], fields["sampler"], fields["seed"],
            fields["width"], fields["height"], fields["cfg_scale"]) == ("a cat", "ugly", 12, "Euler a", 42, 64, 64, 5.0)
    plain = client.post("/api/v1/png-info", json={"image": b64_png(shapes_image())})
    assert plain.status_code == 200 and plain.json() == {"infotext": None, "fields": {}, "source": None}
    bad = client.post("/api/v1/png-info", json={"image": base64.b64encode(b"not an image").decode()})
    assert bad.status_code == 422 and bad.json()["field"] == "image"


def test_preprocess_canny_draws_the_edges_of_a_rectangle(client):
    drawing = Image.new("RGB", (80, 64), "black")
    ImageDraw.Draw(drawing).rectangle((20, 16, 59, 47), fill="white")
    response = client.post("/api/v1/preprocess", json={"image": image_to_b64(drawing), "preprocessor": "canny",
                                                       "low_threshold": 100, "high_threshold": 200})
    assert response.status_code == 200, response.json()
    edges = Image.open(io.BytesIO(base64.b64decode(response.json()["image"]))).convert("L")
    assert edges.size == (80, 64)
    assert edges.getpixel((40, 16)) == 255 or edges.getpixel((40, 15)) == 255  # the top side is an edge
    assert edges.getpixel((20, 32)) == 255 or edges.getpixel((19, 32)) == 255  # ... and the left side
    assert edges.getpixel((40, 32)) == 0 and edges.getpixel((5, 5)) == 0      # inside and outside are black
    white = sum(1 for v in edges.getdata() if v == 255)
    assert 100 <= white <= 2 * 2 * (40 + 32)  # about the perimeter, at most two pixels thick


def test_preprocess_says_what_to_fix(client):
    image = image_to_b64(shapes_image())
    for body, field, words in [
        ({"image": image, "preprocessor": "edges"}, "preprocessor", "canny"),
        ({"image": image, "preprocessor": "openpose"}, "preprocessor", "body_pose_model.pth"),
        ({"image": image, "preprocessor": "inpaint"}, "preprocessor", "init image"),
        ({"image": image, "preprocessor": "canny", "low_threshold": 0}, "low_threshold", "between"),
        ({"image": "bm9wZQ==", "preprocessor": "canny"}, "image", "image"),
    ]:
        response = client.post("/api/v1/preprocess", json=body)
        assert response.status_code == 422 and response.json()["field"] == field, response.json()
        assert words in response.json()["detail"]


def test_request_route_gives_back_the_submitted_request(client):
    init = shapes_image()
    body = {"prompt": "a blue square", "init_image": image_to_b64(init), "strength": 0.5, "steps": 1, "seed": 1}
    job = client.post("/api/v1/jobs", json={"request": body}).json()
    stored = client.get(f"/api/v1/jobs/{job['id']}/request").json()
    assert stored["prompt"] == "a blue square" and stored["strength"] == 0.5
    again = Image.open(io.BytesIO(base64.b64decode(stored["init_image"]))).convert("RGB")
    assert again.tobytes() == init.tobytes()
    assert wait(client, job["id"])["status"] == "done"
    assert client.get("/api/v1/jobs/no-such-job/request").status_code == 404


def test_denoising_capture_frames_and_animation(client):
    done = run_job(client, prompt="a green diamond", steps=4, seed=2, capture_every=2, sampler="Euler")
    job_id = done["id"]
    capture = client.get(f"/api/v1/images/{job_id}/0/capture").json()
    assert capture["steps"] == [2, 4] and [f["step"] for f in capture["frames"]] == [2, 4]
    for frame in capture["frames"]:
        for kind in ("xt", "x0", "latents"):
            assert png(client.get(frame[kind])).size[0] > 0
    assert png(client.get(capture["frames"][1]["xt"])).size == (64, 64)
    gif = png(client.get(capture["animation"]))
    assert gif.format == "GIF" and gif.n_frames == 2
    assert client.get(f"/api/v1/images/{job_id}/0/capture/3/xt").status_code == 404
    assert client.get(f"/api/v1/images/{job_id}/0/capture/2/noise").status_code == 404
    assert client.get(f"/api/v1/images/{job_id}/1/capture").status_code == 404
    plain = run_job(client, prompt="a green diamond", steps=1, seed=2)
    assert client.get(f"/api/v1/images/{plain['id']}/0/capture").status_code == 404


def test_xyz_plot_is_a_queued_job_with_grid_and_cells(client):
    body = {"request": {"prompt": "a red circle", "seed": 3, "sampler": "Euler"}, "x": "steps=1,2", "y": "cfg=3,7"}
    submitted = client.post("/api/v1/xyz", json=body)
    assert submitted.status_code == 202, submitted.json()
    done = wait(client, submitted.json()["id"])
    assert done["status"] == "done", done
    result = done["result"]
    assert len(result["images"]) == 5 and result["grids"] == 1 and result["shape"] == [2, 2, 1]
    assert result["labels"] == {"x": ["steps: 1", "steps: 2"], "y": ["cfg: 3", "cfg: 7"], "z": []}
    assert result["seeds"] == [3] * 5 and "X/Y/Z plot" in result["infotexts"][0]
    assert "Steps: 2" in result["infotexts"][2] and "CFG scale: 7" in result["infotexts"][3]
    grid = png(client.get(result["images"][0]))
    assert grid.width > 128 and grid.height > 128
    assert png(client.get(result["images"][4])).size == (64, 64)
    assert client.get(f"/api/v1/jobs/{done['id']}/request").json() == {**body, "z": None}


def test_xyz_refuses_bad_axes_before_queueing(client):
    total = client.get("/api/v1/jobs").json()["total"]
    for body, field in [({"x": "colour=1,2"}, "x"), ({"x": "steps=1,2", "y": "steps=ten"}, "y"),
                        ({"x": "steps=1,2", "z": "cfg="}, "z"), ({"x": " "}, "x"),
                        ({"x": "steps=1,500"}, "steps")]:
        response = client.post("/api/v1/xyz", json={"request": {"prompt": "a cat"}, **body})
        assert response.status_code == 422 and response.json()["field"] == field, response.json()
    bad_sampler = client.post("/api/v1/xyz", json={"request": {"sampler": "Eulr"}, "x": "cfg=3,7"})
    assert bad_sampler.status_code == 422 and bad_sampler.json()["field"] == "sampler"
    assert client.get("/api/v1/jobs").json()["total"] == total


def test_xyz_progress_is_the_fraction_of_the_whole_plot():
    cell = ProgressEvent(iteration=1, n_iter=2, step=1, steps=4, _preview=lambda: Image.new("RGB", (1, 1)))
    progress = XYZProgress(cell=2, cells=4, event=cell)
    event = plot_event(progress)
    assert event.fraction == pytest.approx(progress.fraction) and (event.iteration, event.n_iter) == (5, 8)
