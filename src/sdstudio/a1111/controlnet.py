"""The sd-webui-controlnet extension's API unit (alwayson_scripts.ControlNet.args) -> our native unit fields."""

from __future__ import annotations

from typing import Any

from sdstudio.a1111.bodies import CONTROLNET_SCRIPT, script_args
from sdstudio.errors import RequestError
from sdstudio.pictures import decode_image

# A1111 module names by prefix -> our preprocessors; inpaint_only+lama fills with LaMa, which we lack.
_MODULE_PREFIXES = (("inpaint_only+lama", None), ("inpaint", "inpaint"), ("canny", "canny"),
                    ("scribble", "scribble"), ("invert", "invert"), ("lineart", "lineart"), ("tile", "tile"),
                    ("blur", "blur"), ("shuffle", "shuffle"), ("openpose", "openpose"), ("dw_openpose", "openpose"),
                    ("depth", "depth"))


_RESIZE_MODES = {"just resize": "just resize", "crop and resize": "crop", "resize and fill": "fill",
                 "envelope (outer fit)": "crop", "scale to fit (inner fit)": "fill",
                 "0": "just resize", "1": "crop", "2": "fill"}


_CONTROL_MODES = {"balanced": False, "controlnet is more important": True, "0": False, "2": True}


def controlnet_module(name: str | None) -> str:
    """A1111 ControlNet module -> our preprocessor: "canny" -> canny, "inpaint_only" -> inpaint, ..."""
    key = (name or "none").strip().lower()
    if key in ("none", ""):
        return "none"
    for prefix, ours in _MODULE_PREFIXES:
        if key.startswith(prefix):
            if ours is None:
                break
            return ours
    known = ", ".join(p for p, ours in _MODULE_PREFIXES if ours)
    raise RequestError(f"ControlNet module {name!r} is not supported; use none or one of (any variant of): {known}",
                       "alwayson_scripts.ControlNet.module")


# The extension's IP-Adapter modules (its preprocessors: which CLIP image encoder runs); the encoder is chosen
# here by the adapter's input width, so every non-FaceID module works with any adapter it fits.
IP_ADAPTER_MODULES = ("ip-adapter-auto", "ip-adapter_clip_sd15", "ip-adapter_clip_h", "ip-adapter_clip_sdxl",
                      "ip-adapter_clip_g", "ip-adapter_clip_sdxl_plus_vith")


def controlnet_units(scripts: dict[str, Any], max_units: int | None = None) -> tuple[list[dict[str, Any]],
                                                                                     list[dict[str, Any]]]:
    """The enabled units of `alwayson_scripts.ControlNet.args` as native fields (images: base64 as sent):
    (ControlNet units, IP-Adapter units: those with an ip-adapter module). More than `max_units` args are refused
    before any is read."""
    entry = next((v for k, v in scripts.items() if k.lower() == CONTROLNET_SCRIPT), None)
    if entry is None:
        return [], []
    units, adapters = [], []
    args = script_args(entry, "ControlNet")
    if max_units is not None and len(args) > max_units:
        raise RequestError(f"alwayson_scripts.ControlNet has {len(args)} units; the limit is {max_units}",
                           "alwayson_scripts")
    for i, arg in enumerate(args):
        if not isinstance(arg, dict):
            raise RequestError(f"alwayson_scripts.ControlNet.args[{i}] must be an object with named fields "
                               "(enabled, image, module, model, weight, ...)", "alwayson_scripts")
        if not arg.get("enabled", True):
            continue
        if str(arg.get("module") or "").strip().lower().startswith(("ip-adapter", "ip_adapter")):
            adapters.append(ip_adapter_unit(arg, i))
        else:
            units.append(controlnet_unit(arg, i))
    return units, adapters


def ip_adapter_unit(arg: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """A unit with an ip-adapter module: its model is an IP-Adapter, its image the image prompt."""
    where = f"alwayson_scripts.ControlNet.args[{index}]"
    module = str(arg.get("module")).strip().lower()
    if "face_id" in module or "faceid" in module:
        raise RequestError(f"{where}.module {arg.get('module')!r}: IP-Adapter FaceID needs InsightFace face "
                           "embeddings, which sdstudio does not compute; use ip-adapter_clip_sd15 or _sdxl with a "
                           "plain, plus or plus-face adapter", f"{where}.module")
    model = arg.get("model")
    if not isinstance(model, str) or model.strip().lower() in ("", "none"):
        raise RequestError(f"{where}.model must name an IP-Adapter model, got {model!r}", f"{where}.model")
    image = arg.get("image", arg.get("input_image"))
    if isinstance(image, dict):
        image = image.get("image")
    if not image:
        raise RequestError(f"{where}.image: an IP-Adapter unit needs the image prompt", f"{where}.image")
    decode_image(image, f"{where}.image")  # refused here, naming the unit, if it is no picture
    return dict(model=model.strip(), images=[image], weight=_number(arg, "weight", 1.0, where),
                start=_number(arg, "guidance_start", 0.0, where), end=_number(arg, "guidance_end", 1.0, where))


def controlnet_unit(arg: dict[str, Any], index: int = 0) -> dict[str, Any]:
    where = f"alwayson_scripts.ControlNet.args[{index}]"
    model = arg.get("model")
    if not isinstance(model, str) or model.strip().lower() in ("", "none"):
        raise RequestError(f"{where}.model must name a ControlNet model, got {model!r}", f"{where}.model")
    image = arg.get("image", arg.get("input_image"))
    if isinstance(image, dict):  # the extension's {"image": ..., "mask": ...} form
        image, unit_mask = image.get("image"), image.get("mask")
    else:
        unit_mask = arg.get("mask") or arg.get("mask_image")
    if unit_mask:
        raise RequestError(f"{where}: per-unit ControlNet masks are not supported; send mask null", f"{where}.mask")
    preprocessor = controlnet_module(arg.get("module"))
    low, high = arg.get("threshold_a", -1), arg.get("threshold_b", -1)
    canny = preprocessor == "canny"
    if image:
        decode_image(image, f"{where}.image")  # refused here, naming the unit, if it is no picture
    return dict(
        model=model.strip(), image=image or None,
        preprocessor=preprocessor, weight=_number(arg, "weight", 1.0, where),
        start=_number(arg, "guidance_start", 0.0, where), end=_number(arg, "guidance_end", 1.0, where),
        guess_mode=_control_mode(arg, where), resize_mode=_lookup(_RESIZE_MODES, arg.get("resize_mode", 1), where,
                                                                  "resize_mode"),
        low_threshold=int(low) if canny and _given(low) else 100,
        high_threshold=int(high) if canny and _given(high) else 200,
    )


def _number(arg: dict[str, Any], name: str, default: float, where: str) -> float:
    value = arg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{where}.{name} must be a number, got {value!r}", f"{where}.{name}")
    return float(value)


def _given(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _control_mode(arg: dict[str, Any], where: str) -> bool:
    if arg.get("guess_mode"):  # the extension's pre-1.1 name for "ControlNet is more important"
        return True
    mode = str(arg.get("control_mode", 0)).strip().lower()
    if mode in ("1", "my prompt is more important"):
        raise RequestError(f"{where}.control_mode 'My prompt is more important' is not supported; use Balanced "
                           "or 'ControlNet is more important'", f"{where}.control_mode")
    return _lookup(_CONTROL_MODES, mode, where, "control_mode")


def _lookup(table: dict[str, Any], value: Any, where: str, name: str) -> Any:
    key = str(value).strip().lower()
    if key not in table:
        raise RequestError(f"{where}.{name} {value!r} is not one of {', '.join(repr(k) for k in table)}",
                           f"{where}.{name}")
    return table[key]
