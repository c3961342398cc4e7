"""Fingerprint the images every door makes on the bundled demo models: pixel sha256 and infotext per image.

Run it before and after a change that must not alter behaviour, and compare the two JSON files:

    python scripts/door_images.py before.json   # on the old commit
    python scripts/door_images.py after.json    # on the new one
    cmp before.json after.json

Doors: the Python API (Engine), the CLI (its entry point in a subprocess), the native HTTP API (/api/v1/jobs,
/api/v1/xyz) and AUTOMATIC1111's (/sdapi/v1/txt2img, img2img) on a real server. Everything runs on the CPU.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from PIL import Image, ImageDraw

from sdstudio import Engine, GenerationRequest, Settings

PROMPT = "a red circle at the top left on a blue background"


def picture() -> Image.Image:
    im = Image.new("RGB", (64, 64), (30, 60, 200))
    ImageDraw.Draw(im).ellipse((16, 16, 48, 48), fill=(220, 30, 30))
    return im


def mask() -> Image.Image:
    m = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(m).rectangle((8, 8, 40, 40), fill=255)
    return m


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def fingerprint(image: Image.Image) -> dict[str, str]:
    text = image.info.get("parameters", "")
    params = ", ".join(p for p in text.split(", ") if not p.startswith("Version:"))
    return {"pixels": hashlib.sha256(image.convert("RGB").tobytes()).hexdigest(), "infotext": params}


def api_cases(engine: Engine) -> dict[str, list[dict[str, str]]]:
    from sdstudio.engine.requests import ControlUnit

    base = {"prompt": PROMPT, "negative_prompt": "green", "steps": 8, "seed": 7}
    flat = getattr(GenerationRequest, "from_flat", GenerationRequest)  # the JSON's flat hires keys, on any version
    cases = {
        "txt2img": GenerationRequest(**base, batch_size=2),
        "txt2img-karras-n_iter": GenerationRequest(**base, sampler="DPM++ 2M", schedule="Karras", n_iter=2),
        "txt2img-euler-a": GenerationRequest(**base, sampler="Euler a"),
        "txt2img-prompt-editing": GenerationRequest(**{**base, "prompt": "a [red:yellow:0.5] (circle:1.2) AND a "
                                                                         "square :0.5"}),
        "txt2img-variation": flat(**base, subseed=3, subseed_strength=0.4, batch_size=2),
        "img2img": GenerationRequest(**base, init_image=picture(), strength=0.6),
        "inpaint-blend": GenerationRequest(**base, init_image=picture(), mask=mask(), strength=0.9),
        "inpaint-9ch": GenerationRequest(**base, init_image=picture(), mask=mask(), strength=1.0,
                                         model="demo-inpaint", masked_content="latent noise"),
        "inpaint-only-masked": GenerationRequest(**base, init_image=picture(), mask=mask(), only_masked=True,
                                                 width=64, height=64),
        "hires-latent": flat(**base, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=4),
        "hires-lanczos": flat(**base, enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos",
                                           strength=0.5),
        "controlnet": GenerationRequest(**base, controlnets=(ControlUnit("demo-canny", image=picture(),
                                                                        preprocessor="canny"),)),
    }
    out = {}
    for name, request in cases.items():
        result = engine.generate(request)
        out[f"api/{name}"] = [fingerprint(im.image) for im in result.images]
    return out


def cli_cases(home: Path) -> dict[str, list[dict[str, str]]]:
    init, m = home / "init.png", home / "mask.png"
    picture().save(init)
    mask().save(m)
    commands = {
        "txt2img": ["txt2img", PROMPT, "--seed", "5", "--steps", "6", "--batch-size", "2", "--sampler", "Euler a"],
        "img2img": ["img2img", str(init), PROMPT, "--seed", "5", "--steps", "6", "--strength", "0.5"],
        "inpaint": ["inpaint", str(init), str(m), "a yellow square", "--seed", "5", "--steps", "6"],
        "hires": ["txt2img", PROMPT, "--seed", "5", "--steps", "6", "--hires", "--hr-scale", "1.5"],
    }
    out = {}
    for name, args in commands.items():
        folder = home / f"cli-{name}"
        subprocess.run([sys.executable, "-m", "sdstudio", *args, "-o", str(folder)], check=True,
                       capture_output=True)
        files = sorted(folder.rglob("*.png"))
        out[f"cli/{name}"] = [fingerprint(Image.open(f)) for f in files if "-denoise" not in str(f)]
    return out


def http_cases(settings: Settings, data: Path) -> dict[str, list[dict[str, str]]]:
    from sdstudio.server.app import create_app
    from sdstudio.testing.live import live_server

    out: dict[str, list[dict[str, str]]] = {}
    with live_server(create_app(settings, data)) as port:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)

        def native(name: str, path: str, body: dict) -> None:
            job = client.post(path, json=body).json()
            while (view := client.get(f"/api/v1/jobs/{job['id']}").json())["status"] in ("queued", "running"):
                time.sleep(0.05)
            assert view["status"] == "done", view
            out[name] = [fingerprint(Image.open(io.BytesIO(client.get(u).content))) for u in view["result"]["images"]]

        base = {"prompt": PROMPT, "steps": 6, "seed": 11}
        native("native/txt2img", "/api/v1/jobs", {"request": {**base, "batch_size": 2}})
        native("native/inpaint", "/api/v1/jobs", {"request": {**base, "init_image": b64(picture()),
                                                              "mask": b64(mask())}})
        native("native/xyz", "/api/v1/xyz", {"request": base, "x": "steps=4,6", "y": "cfg_scale=3,7"})

        def a1111(name: str, path: str, body: dict) -> None:
            response = client.post(path, json=body)
            assert response.status_code == 200, response.text
            out[name] = [fingerprint(Image.open(io.BytesIO(base64.b64decode(i)))) for i in response.json()["images"]]

        a1 = {"prompt": PROMPT, "steps": 6, "seed": 13, "width": 64, "height": 64, "sampler_name": "DPM++ 2M"}
        a1111("a1111/txt2img", "/sdapi/v1/txt2img", {**a1, "batch_size": 2})
        a1111("a1111/txt2img-hires", "/sdapi/v1/txt2img", {**a1, "enable_hr": True, "hr_scale": 1.5,
                                                           "hr_upscaler": "Latent", "denoising_strength": 0.6})
        a1111("a1111/img2img", "/sdapi/v1/img2img", {**a1, "init_images": [b64(picture())],
                                                     "denoising_strength": 0.5})
        a1111("a1111/inpaint", "/sdapi/v1/img2img", {**a1, "init_images": [b64(picture())], "mask": b64(mask()),
                                                     "inpainting_fill": 1, "inpaint_full_res": False})
        a1111("a1111/controlnet", "/sdapi/v1/txt2img", {**a1, "alwayson_scripts": {"ControlNet": {"args": [
            {"enabled": True, "module": "canny", "model": "demo-canny", "image": b64(picture())}]}}})
    return out


def main(target: str) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["SDSTUDIO_HOME"] = str(home / "sdhome")
        settings = Settings.from_env(outputs_dir=home / "outputs", device=torch.device("cpu"), dtype=torch.float32)
        results = api_cases(Engine(settings))
        results.update(cli_cases(home))
        results.update(http_cases(settings, home / "data"))
    Path(target).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"{sum(len(v) for v in results.values())} images from {len(results)} cases -> {target}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "door-images.json")
