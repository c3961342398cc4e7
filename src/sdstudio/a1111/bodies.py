"""AUTOMATIC1111's txt2img/img2img request bodies (modules/api/models.py), with A1111's defaults, and what we
refuse rather than silently do otherwise. Unknown fields are ignored, as clients send many."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdstudio.a1111.forge_scripts import FORGE_SCRIPTS
from sdstudio.a1111.names import SAME_CHECKPOINT
from sdstudio.errors import RequestError

CONTROLNET_SCRIPT = "controlnet"


class Body(BaseModel):
    """Fields txt2img and img2img share, with A1111's defaults. Nullable where A1111 clients send null."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None           # ignored: sdstudio has no saved styles
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"               # A1111's deprecated name; used when sampler_name is empty
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    distilled_cfg_scale: float = 3.5           # Forge's: Flux-dev's distilled guidance
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    denoising_strength: float | None = 0.75
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)


class Txt2ImgBody(Body):
    """POST /sdapi/v1/txt2img (A1111's StableDiffusionTxt2ImgProcessingAPI)."""

    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgBody(Body):
    """POST /sdapi/v1/img2img (A1111's StableDiffusionImg2ImgProcessingAPI); inpainting when `mask` is set."""

    init_images: list[Any] | None = None
    resize_mode: int = Field(0, ge=0, le=3)
    mask: str | None = None
    mask_blur: int | None = None
    mask_blur_x: int = 4
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    include_init_images: bool = False


def parse_body(model: type[Body], data: Any) -> Body:
    """A body model from decoded JSON; pydantic's complaint becomes a RequestError naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        name = ".".join(str(p) for p in first["loc"]) or "body"
        raise RequestError(f"{name}: {first['msg']} (got {first.get('input')!r:.80})", name) from None


def check_supported(body: Body) -> None:
    """Refuse what sdstudio cannot do rather than silently doing something else."""
    if body.restore_faces:
        raise RequestError("restore_faces is not supported by sdstudio: send restore_faces false", "restore_faces")
    if body.tiling:
        raise RequestError("tiling is not supported by sdstudio: send tiling false", "tiling")
    if body.script_name:
        raise RequestError(f"script {body.script_name!r} is not supported: sdstudio runs no A1111 scripts; "
                           "send script_name null", "script_name")
    for name, script in body.alwayson_scripts.items():
        if name.lower() not in (CONTROLNET_SCRIPT, *FORGE_SCRIPTS) and script_args(script, name):
            raise RequestError(f"alwayson_scripts: {name!r} is not supported; ControlNet, FreeU Integrated and "
                               "Perturbed Attention Guidance Integrated are (remove the entry, or send it with "
                               "empty or false args)", "alwayson_scripts")
    if isinstance(body, Txt2ImgBody) and (body.hr_checkpoint_name or "").lower() not in SAME_CHECKPOINT:
        raise RequestError("hr_checkpoint_name is not supported: hires fix uses the same checkpoint; "
                           "send null", "hr_checkpoint_name")


def script_args(script: Any, name: str) -> list[Any]:
    """A script's args with falsy ones dropped (clients send {"args": [False]} for installed but off scripts)."""
    if not isinstance(script, dict) or not isinstance(script.get("args", []), list):
        raise RequestError(f"alwayson_scripts.{name} must be {{\"args\": [...]}}", "alwayson_scripts")
    return [a for a in script.get("args", []) if a]


class ExtrasBody(BaseModel):
    """POST /sdapi/v1/extra-single-image and extra-batch-images (A1111's ExtrasBaseRequest), A1111's defaults.

    resize_mode 0: scale by upscaling_resize; 1: to upscaling_resize_w x upscaling_resize_h (scaled to cover,
    then centre-cropped when upscaling_crop). upscaler_1 "None": the image is returned unchanged."""

    model_config = ConfigDict(extra="ignore")

    resize_mode: int = Field(0, ge=0, le=1)
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0.0, ge=0, le=1)
    codeformer_visibility: float = Field(0.0, ge=0, le=1)
    codeformer_weight: float = Field(0.0, ge=0, le=1)
    upscaling_resize: float = Field(2.0, ge=1, le=8)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str | None = "None"
    upscaler_2: str | None = "None"
    extras_upscaler_2_visibility: float = Field(0.0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleBody(ExtrasBody):
    image: str = ""


class ExtrasBatchItem(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchBody(ExtrasBody):
    imageList: list[ExtrasBatchItem] = Field(default_factory=list)


def check_extras(body: ExtrasBody) -> None:
    """Face restoration is refused as restore_faces is, until a face restorer exists."""
    for name in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(body, name) > 0:
            raise RequestError(f"{name}: face restoration is not supported by sdstudio (no face restorer is "
                               f"installed): send {name} 0", name)


class DetectBody(BaseModel):
    """POST /controlnet/detect (the sd-webui-controlnet extension's): run a module on pictures. webuiapi sends
    the pictures as controlnet_images, the extension names them controlnet_input_images; both are read."""

    model_config = ConfigDict(extra="ignore")

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_images: list[str] = Field(default_factory=list)
    controlnet_processor_res: int = Field(512, ge=64, le=2048)
    controlnet_threshold_a: float = 64
    controlnet_threshold_b: float = 64

    @property
    def images(self) -> list[str]:
        return self.controlnet_input_images or self.controlnet_images
