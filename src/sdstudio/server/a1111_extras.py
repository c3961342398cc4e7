"""A1111's extras routes (extra-single-image, extra-batch-images) with A1111's semantics
(scripts/postprocessing_upscale.py): upscaler_1 "None" leaves the image as it is; resize_mode 0 scales by
upscaling_resize, 1 scales to cover upscaling_resize_w x upscaling_resize_h and centre-crops to it; upscaler_2
is blended over upscaler_1's result at extras_upscaler_2_visibility. Upscalers run on the worker's device."""

from __future__ import annotations

import base64
import io
from typing import Any

from fastapi import FastAPI
from PIL import Image

from sdstudio.a1111.bodies import ExtrasBatchBody, ExtrasBody, ExtrasSingleBody, check_extras
from sdstudio.engine.pipelines.upscale import UpscaleRequest, upscale_image
from sdstudio.errors import RequestError
from sdstudio.pictures import decode_image
from sdstudio.server.state import ServerState

NO_UPSCALER = "none"


def add_extras_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/sdapi/v1/extra-single-image")
    def extra_single_image(body: ExtrasSingleBody) -> dict[str, Any]:
        check_extras(body)
        image, info = run_extras(state, body, decode_image(body.image, "image", upload_pixels(state)))
        return {"html_info": info, "image": png_b64(image)}

    @app.post("/sdapi/v1/extra-batch-images")
    def extra_batch_images(body: ExtrasBatchBody) -> dict[str, Any]:
        check_extras(body)
        limit = state.settings.limits.max_images
        if not body.imageList or len(body.imageList) > limit:
            raise RequestError(f"imageList must hold 1 to {limit} images, got {len(body.imageList)}", "imageList")
        pictures = [decode_image(item.data, f"imageList[{i}].data", upload_pixels(state))
                    for i, item in enumerate(body.imageList)]
        done = [run_extras(state, body, picture) for picture in pictures]
        return {"html_info": done[0][1], "images": [png_b64(image) for image, _ in done]}


def upload_pixels(state: ServerState) -> int:
    return state.settings.limits.max_upload_pixels


def run_extras(state: ServerState, body: ExtrasBody, image: Image.Image) -> tuple[Image.Image, str]:
    """The picture after A1111's upscale step, and A1111's "Postprocess ..." text for it ("" when unchanged)."""
    first = _name(body.upscaler_1)
    if first is None:
        return image, ""
    if body.resize_mode == 1:
        width, height = body.upscaling_resize_w, body.upscaling_resize_h
        scale = max(width / image.width, height / image.height)
        info: dict[str, Any] = {"Postprocess upscale to": f"{width}x{height}"}
    else:
        scale, info = body.upscaling_resize, {"Postprocess upscale by": body.upscaling_resize}
    out = _upscale(state, image, scale, first)
    info["Postprocess upscaler"] = first
    second = _name(body.upscaler_2)
    if second is not None and body.extras_upscaler_2_visibility > 0:
        other = _upscale(state, image, scale, second).resize(out.size, Image.Resampling.LANCZOS)
        out = Image.blend(out, other, body.extras_upscaler_2_visibility)
        info.update({"Postprocess upscaler 2": second,
                     "Postprocess upscaler 2 visibility": round(body.extras_upscaler_2_visibility, 3)})
    if body.resize_mode == 1 and body.upscaling_crop:
        canvas = Image.new("RGB", (width, height))  # centred, as A1111 pastes it
        canvas.paste(out, (width // 2 - out.width // 2, height // 2 - out.height // 2))
        out = canvas
        info["Postprocess crop to"] = f"{width}x{height}"
    return out, ", ".join(f"{k}: {v}" for k, v in info.items())


def _name(upscaler: str | None) -> str | None:
    return None if upscaler is None or upscaler.strip().lower() in ("", NO_UPSCALER) else upscaler


def _upscale(state: ServerState, image: Image.Image, scale: float, upscaler: str) -> Image.Image:
    """`image` scaled by `scale` with `upscaler`: the engine's upscale (resamplers, x4 models) for scale >= 1;
    a resampler's plain resize below 1 (A1111 shrinks to a smaller target the same way)."""
    if scale < 1:
        return upscale_image(image.convert("RGB"), scale, upscaler)
    with state.worker.device_lock:  # the x4 model uses the device the worker owns
        return state.engine.upscale(UpscaleRequest(image=image, scale=float(scale), upscaler=upscaler)).image


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
