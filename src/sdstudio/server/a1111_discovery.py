"""Routes A1111 clients probe to learn what a server has: listings (empty in A1111's shape where we have nothing
of that kind, never a 404), the command-line flags, interrogate (a clear 422: no captioning model), and the
sd-webui-controlnet extension's version, model_list, module_list and detect (our preprocessors)."""

from __future__ import annotations

from typing import Any

import torch
from fastapi import FastAPI
from PIL import Image

from sdstudio.a1111.bodies import CONTROLNET_SCRIPT, DetectBody
from sdstudio.a1111.controlnet import IP_ADAPTER_MODULES, controlnet_module
from sdstudio.a1111.forge_scripts import FORGE_SCRIPTS
from sdstudio.engine.sd.control import preprocess_control
from sdstudio.engine.sd.preprocess import ALL_PREPROCESSORS
from sdstudio.errors import RequestError
from sdstudio.models.load import controlnet
from sdstudio.models.load.ip_adapter import available_adapters
from sdstudio.pictures import decode_image
from sdstudio.server.a1111_extras import png_b64
from sdstudio.server.state import ServerState
from sdstudio.server.studio_routes import PreprocessBody, check_preprocess


def add_discovery_routes(app: FastAPI, state: ServerState) -> None:
    worker = state.worker

    """Listings clients probe: what we have none of is an empty list in A1111's shape, not a 404; the
    ControlNet extension's discovery routes list our ControlNets as `name [hash]` and our preprocessors."""
    for route in ("hypernetworks", "face-restorers", "realesrgan-models", "prompt-styles"):
        app.add_api_route(f"/sdapi/v1/{route}", lambda: [], methods=["GET"])

    for route in ("refresh-loras", "refresh-embeddings", "refresh-vae"):  # we scan on every lookup
        app.add_api_route(f"/sdapi/v1/{route}", lambda: None, methods=["POST"])

    @app.get("/internal/ping")
    def ping() -> dict[str, Any]:
        return {}

    @app.get("/sdapi/v1/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        """A1111's command-line flags that describe this server (no paths, no credentials)."""
        cpu = state.settings.device.type == "cpu"
        return {"api": True, "nowebui": False, "api_log": False, "lowvram": False, "medvram": False,
                "medvram_sdxl": False, "no_half": state.settings.dtype == torch.float32,
                "no_half_vae": state.settings.dtype == torch.float32, "precision": "full" if cpu else "autocast",
                "use_cpu": ["all"] if cpu else [], "device_id": None, "xformers": False, "opt_sdp_attention": True,
                "hide_ui_dir_config": True, "enable_insecure_extension_access": False, "skip_torch_cuda_test": cpu}

    @app.post("/sdapi/v1/interrogate")
    def interrogate(data: dict[str, Any]) -> dict[str, Any]:
        model = data.get("model", "clip")
        raise RequestError(f"interrogate ({model!r}) needs a captioning model (A1111's BLIP + CLIP interrogator or "
                           "DeepBooru); sdstudio has none and downloads nothing: write the prompt yourself, or read "
                           "one from the image with /sdapi/v1/png-info", "model")

    @app.get("/sdapi/v1/scripts")
    def scripts() -> dict[str, list[str]]:
        """The always-on scripts we run (their args in alwayson_scripts): ControlNet, Forge's FreeU and PAG."""
        names = [CONTROLNET_SCRIPT, *FORGE_SCRIPTS]
        return {"txt2img": names, "img2img": names}

    @app.get("/sdapi/v1/script-info")
    def script_info() -> list[dict[str, Any]]:
        return [{"name": name, "is_alwayson": True, "is_img2img": img2img, "args": []}
                for img2img in (False, True) for name in (CONTROLNET_SCRIPT, *FORGE_SCRIPTS)]

    @app.get("/controlnet/version")
    def controlnet_version() -> dict[str, int]:
        return {"version": 2}

    @app.get("/controlnet/model_list")
    def controlnet_models(update: bool = True) -> dict[str, list[str]]:
        folders = state.engine.folders  # IP-Adapters too, as the extension lists them from its models folder
        paths = controlnet.available(folders.controlnet)
        paths += [p for p in available_adapters(folders.ip_adapter) if p not in paths]
        hashes = state.engine.models.hashes  # 8 hex digits of the sha256, as the extension shows them
        return {"model_list": [f"{p.stem if p.is_file() else p.name} [{hashes.model_sha256(p)[:8]}]" for p in paths]}

    @app.post("/controlnet/detect")
    def controlnet_detect(body: DetectBody) -> dict[str, Any]:
        """Our preprocessor for the module on each picture, its short side brought to processor_res first."""
        module = controlnet_module(body.controlnet_module)
        limit = state.settings.limits.max_images
        if not body.images or len(body.images) > limit:
            raise RequestError(f"controlnet_input_images must hold 1 to {limit} pictures", "controlnet_input_images")
        low = min(max(int(body.controlnet_threshold_a), 1), 255)
        high = min(max(int(body.controlnet_threshold_b), low), 255)
        out = []
        for i, data in enumerate(body.images):
            picture = decode_image(data, f"controlnet_input_images[{i}]",
                                   state.settings.limits.max_upload_pixels).convert("RGB")
            scale = body.controlnet_processor_res / min(picture.size)
            picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                     Image.Resampling.LANCZOS)
            check_preprocess(PreprocessBody(image="", preprocessor=module, low_threshold=low, high_threshold=high),
                             picture, state.settings.limits.max_pixels)
            with worker.device_lock:  # annotators may use the device the worker owns
                control = preprocess_control(picture, module, low, high, state.settings.home / "annotators")
            out.append(png_b64(control))
        return {"images": out, "info": "Success"}

    @app.get("/controlnet/module_list")
    def controlnet_modules(alias_names: bool = False) -> dict[str, Any]:
        modules = ["none", *ALL_PREPROCESSORS, *IP_ADAPTER_MODULES]
        return {"module_list": modules,
                "module_detail": {m: {"model_free": False, "sliders": []} for m in modules}}
