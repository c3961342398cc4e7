"""AUTOMATIC1111 `/sdapi/v1` txt2img/img2img bodies -> our native request payload (the JSON `/api/v1/jobs`
takes and the job queue stores). Pure translation: no server, no engine calls; the routes queue the payload.

Field names and defaults are A1111's (modules/api/models.py, modules/processing.py). What sdstudio cannot
honour (restore_faces, tiling, scripts, ...) is a RequestError naming the field, which the routes answer with
422. Pictures pass through as the client sent them (base64), except where A1111's semantics change them:
init images and masks fitted by resize_mode, and converted to RGB / greyscale when sent otherwise.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from sdstudio.a1111.bodies import Body, Img2ImgBody, Txt2ImgBody, check_supported
from sdstudio.a1111.controlnet import controlnet_units
from sdstudio.a1111.forge_scripts import forge_script_fields
from sdstudio.a1111.names import IMG2IMG_RESIZE, MASKED_CONTENT, SAME_SAMPLER, SAME_SCHEDULER
from sdstudio.a1111.options import A1111Options
from sdstudio.errors import RequestError
from sdstudio.pictures import decode_image, fit, fit_mask, image_to_b64
from sdstudio.samplers import AUTOMATIC, SamplerChoice, resolve_sampler
from sdstudio.samplers.catalog import canonical_schedule

FALLBACK_SAMPLER = "DPM++ 2M"  # A1111's first sampler, what it runs for a name it does not know


def to_native_payload(body: Body, options: A1111Options | None = None,
                      max_units: int | None = None) -> dict[str, Any]:
    """Our request payload for an A1111 txt2img or img2img body; the body's override_settings win over
    `options` (the server's; None: A1111's defaults). max_units: ControlNet units allowed (None: any)."""
    check_supported(body)
    opts = (options or A1111Options()).updated(body.override_settings or {})
    choice, _ = sampler_choice(body)
    fields: dict[str, Any] = dict(
        prompt=body.prompt, negative_prompt=body.negative_prompt or "", width=body.width, height=body.height,
        steps=body.steps, cfg_scale=body.cfg_scale, sampler=choice.sampler.name, schedule=choice.requested_schedule,
        distilled_cfg_scale=body.distilled_cfg_scale, sampler_fallback=True,  # flow models: Euler, as Forge
        seed=body.seed, subseed=body.subseed, subseed_strength=body.subseed_strength,
        seed_resize_from_w=max(body.seed_resize_from_w, 0), seed_resize_from_h=max(body.seed_resize_from_h, 0),
        batch_size=body.batch_size, n_iter=body.n_iter, **opts.request_fields(),
        strength=0.75 if body.denoising_strength is None else body.denoising_strength,
    )
    if isinstance(body, Txt2ImgBody):
        fields.update(_hires_fields(body))
    elif isinstance(body, Img2ImgBody):
        fields.update(_img2img_fields(body))
    fields["controlnets"], fields["ip_adapters"] = controlnet_units(body.alwayson_scripts, max_units)
    fields.update(forge_script_fields(body.alwayson_scripts))
    return fields


def sampler_choice(body: Body) -> tuple[SamplerChoice, list[str]]:
    """The body's sampler and scheduler, falling back as A1111 does (sd_samplers.get_sampler_and_scheduler):
    an unknown scheduler -> Automatic, an unknown sampler -> its first sampler, DPM++ 2M; with what fell back,
    for the user (the infotext records what ran)."""
    return fallback_choice((body.sampler_name or body.sampler_index or "Euler").strip(),
                           (body.scheduler or AUTOMATIC).strip())


def fallback_choice(sampler: str, schedule: str, what: str = "") -> tuple[SamplerChoice, list[str]]:
    """resolve_sampler, falling back on unknown names as A1111 does; `what` prefixes the notes ("hires ")."""
    notes = []
    try:
        canonical_schedule(schedule)
    except RequestError:
        notes.append(f"unknown {what}scheduler {schedule!r}: used Automatic, as AUTOMATIC1111 does")
        schedule = AUTOMATIC
    try:
        return resolve_sampler(sampler, schedule), notes
    except RequestError:
        notes.append(f"unknown {what}sampler {sampler!r}: used {FALLBACK_SAMPLER}, as AUTOMATIC1111 does")
        return resolve_sampler(FALLBACK_SAMPLER, schedule), notes


def fallback_notes(body: Body) -> list[str]:
    """What fell back to A1111's defaults in the body's sampler names (main pass, then hires), for the user."""
    notes = sampler_choice(body)[1]
    if isinstance(body, Txt2ImgBody) and body.enable_hr:
        notes += _hires_sampler(body)[2]
    return notes


def _hires_sampler(body: Txt2ImgBody) -> tuple[str, str, list[str]]:
    """hr_sampler_name and hr_scheduler as our request takes them ("": the first pass's), unknown names fallen
    back as A1111 does, with notes."""
    sampler, schedule = (body.hr_sampler_name or "").strip(), (body.hr_scheduler or "").strip()
    same_schedule = schedule.lower() in SAME_SCHEDULER
    if sampler.lower() in SAME_SAMPLER:
        try:
            return "", "" if same_schedule else canonical_schedule(schedule), []
        except RequestError:
            return "", "", [f"unknown hires scheduler {schedule!r}: used the first pass's, as AUTOMATIC1111 does"]
    choice, notes = fallback_choice(sampler, AUTOMATIC if same_schedule else schedule, "hires ")
    return choice.sampler.name, "" if same_schedule else choice.requested_schedule, notes


def _hires_fields(body: Txt2ImgBody) -> dict[str, Any]:
    if not body.enable_hr:
        return {}
    hr_sampler, hr_scheduler, _ = _hires_sampler(body)
    return dict(enable_hr=True, hr_scale=body.hr_scale, hr_resize_x=body.hr_resize_x, hr_resize_y=body.hr_resize_y,
                hr_upscaler=body.hr_upscaler or "Latent", hr_second_pass_steps=body.hr_second_pass_steps,
                hr_sampler_name=hr_sampler, hr_scheduler=hr_scheduler,
                hr_prompt=body.hr_prompt, hr_negative_prompt=body.hr_negative_prompt)


def _img2img_fields(body: Img2ImgBody) -> dict[str, Any]:
    """The init image (and mask) fitted to width x height by A1111's resize_mode, and the inpaint fields."""
    images = body.init_images or []
    if len(images) != 1:
        raise RequestError(f"init_images must hold exactly one base64 image, got {len(images)}", "init_images")
    init = decode_image(images[0], "init_images[0]")
    mask = decode_image(body.mask, "mask") if body.mask else None
    only_masked = mask is not None and body.inpaint_full_res
    mode = IMG2IMG_RESIZE[body.resize_mode]
    fitted = mode != "just resize" and not only_masked  # "just resize" is the engine's own stretch
    fields: dict[str, Any] = {"init_image": _as_sent(images[0], init, "RGB", fitted and (
        lambda im: fit(im, body.width, body.height, mode)))}
    if mask is not None:
        fields.update(mask=_as_sent(body.mask, mask, "L", fitted and (
                          lambda im: fit_mask(im, body.width, body.height, mode))),
                      mask_blur=body.mask_blur_x if body.mask_blur is None else body.mask_blur,
                      masked_content=MASKED_CONTENT[body.inpainting_fill], only_masked=only_masked,
                      only_masked_padding=body.inpaint_full_res_padding,
                      invert_mask=bool(body.inpainting_mask_invert))
    return fields


def _as_sent(sent: str, image: Image.Image, mode: str, change: Any) -> str:
    """The picture as the client sent it when it is already in `mode` and needs no fitting; else re-encoded."""
    if image.mode == mode and not change:
        return sent
    image = image.convert(mode)
    return image_to_b64(change(image) if change else image)
