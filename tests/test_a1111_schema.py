"""The A1111 /sdapi/v1 translation layer: bodies -> GenerationRequest, results -> A1111's response shape."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from sdstudio.a1111.bodies import Img2ImgBody, Txt2ImgBody, parse_body
from sdstudio.a1111.controlnet import controlnet_module
from sdstudio.a1111.options import A1111Options, error_body, samplers, schedulers, sd_models
from sdstudio.a1111.responses import a1111_response
from sdstudio.a1111.translate import fallback_notes, sampler_choice, to_native_payload
from sdstudio.errors import RequestError
from sdstudio.models.find.catalog import ModelRef
from sdstudio.pictures import decode_image
from sdstudio.server.payload import decode_request
from sdstudio.storage.results import save_result, saved_entries
from tests.conftest import shapes_image


def to_generation_request(body, options=None):
    """Our typed request for a body: the native payload the A1111 routes queue, decoded as the worker does."""
    return decode_request(to_native_payload(body, options))


def respond(body, result, folder: Path) -> dict:
    """The A1111 response built as the route builds it: from the job's record and its stored files."""
    saved = save_result(result, folder)
    record = {**saved_entries(result.images, saved, folder), "request": result.request.to_dict()}
    return a1111_response(body, record, [s.path.read_bytes() for s in saved])


def b64(image: Image.Image, data_url: bool = False) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    return f"data:image/png;base64,{text}" if data_url else text


def webuiapi_txt2img(**changes) -> dict:
    """What webuiapi's WebUIApi.txt2img sends (its defaults), with changes."""
    body = {
        "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
        "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None,
        "hr_prompt": "", "hr_negative_prompt": "", "denoising_strength": 0.7, "firstphase_width": 0,
        "firstphase_height": 0, "prompt": "a red circle", "styles": [], "seed": -1, "subseed": -1,
        "subseed_strength": 0.0, "seed_resize_from_h": 0, "seed_resize_from_w": 0, "batch_size": 1, "n_iter": 1,
        "steps": 30, "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": False, "tiling": False,
        "do_not_save_samples": False, "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0, "s_churn": 0,
        "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {},
        "override_settings_restore_afterwards": True, "sampler_name": "Euler a", "scheduler": "Automatic",
        "sampler_index": "Euler a", "script_name": None, "script_args": [], "send_images": True,
        "save_images": False, "alwayson_scripts": {},
    }
    return {**body, **changes}


def test_webuiapi_txt2img_defaults_map():
    req = to_generation_request(parse_body(Txt2ImgBody, webuiapi_txt2img()), A1111Options())
    assert (req.prompt, req.steps, req.width, req.height, req.seed) == ("a red circle", 30, 512, 512, -1)
    assert (req.sampler, req.schedule, req.enable_hr, req.controlnets) == ("Euler a", "Automatic", False, ())
    assert (req.model, req.vae, req.clip_skip, req.variation.resize_from_w) == (None, None, 1, 0)


def test_a1111_defaults_when_fields_are_missing():
    body = Txt2ImgBody()
    assert (body.steps, body.cfg_scale, body.width, body.seed, body.seed_resize_from_w) == (50, 7.0, 512, -1, -1)
    req = to_generation_request(body)
    assert (req.sampler, req.steps, req.variation.resize_from_h) == ("Euler", 50, 0)


def test_legacy_sampler_name_maps_to_sampler_and_schedule():
    req = to_generation_request(Txt2ImgBody(sampler_name="DPM++ 2M Karras"))
    assert (req.sampler, req.schedule) == ("DPM++ 2M", "Karras")
    req = to_generation_request(Txt2ImgBody(sampler_name="DPM++ 2M", scheduler="sgm_uniform"))
    assert (req.sampler, req.schedule) == ("DPM++ 2M", "SGM Uniform")
    req = to_generation_request(Txt2ImgBody(sampler_name="DDIM", scheduler="normal"))  # SillyTavern's default
    assert (req.sampler, req.schedule) == ("DDIM", "Normal")
    req = to_generation_request(Txt2ImgBody(sampler_name="Euler a Karras"))
    assert (req.sampler, req.schedule) == ("Euler a", "Karras")


def test_unknown_names_fall_back_as_a1111_does():
    body = Txt2ImgBody(sampler_name="DPM adaptive", scheduler="Nonsense")
    choice, notes = sampler_choice(body)
    assert (choice.sampler.name, choice.requested_schedule) == ("DPM++ 2M", "Automatic")
    assert ["scheduler 'Nonsense'" in notes[0], "sampler 'DPM adaptive'" in notes[1]] == [True, True]
    req = to_generation_request(body)
    assert (req.sampler, req.schedule) == ("DPM++ 2M", "Automatic")
    hires = Txt2ImgBody(enable_hr=True, hr_sampler_name="DPM adaptive", hr_scheduler="Karras")
    assert [(r.hires.sampler, r.hires.schedule) for r in [to_generation_request(hires)]] == [("DPM++ 2M", "Karras")]
    assert "unknown hires sampler 'DPM adaptive'" in fallback_notes(hires)[0]
    same = Txt2ImgBody(enable_hr=True, hr_sampler_name="Use same sampler", hr_scheduler="sometimes")
    assert to_generation_request(same).hires.schedule == "" and "hires scheduler" in fallback_notes(same)[0]


def test_hires_fields_and_override_settings():
    body = parse_body(Txt2ImgBody, webuiapi_txt2img(
        enable_hr=True, hr_scale=1.5, hr_upscaler="Latent (bicubic)", hr_second_pass_steps=5,
        hr_sampler_name="Use same sampler", hr_scheduler="Karras", hr_prompt="sharp", denoising_strength=0.55,
        override_settings={"sd_model_checkpoint": "tiny.safetensors [0123456789]", "sd_vae": "None",
                           "CLIP_stop_at_last_layers": 2, "samples_format": "png"}))
    options = A1111Options().updated({"sd_model_checkpoint": "other", "sd_vae": "my.vae.pt"})
    req = to_generation_request(body, options)
    assert (req.enable_hr, req.hires.scale, req.hires.upscaler, req.hires.steps) == (True, 1.5, "Latent (bicubic)", 5)
    assert (req.hires.sampler, req.hires.schedule, req.hires.prompt, req.strength) == ("", "Karras", "sharp", 0.55)
    assert (req.model, req.vae, req.clip_skip) == ("tiny.safetensors [0123456789]", "none", 2)
    plain = to_generation_request(parse_body(Txt2ImgBody, webuiapi_txt2img()), options)
    assert (plain.model, plain.vae, plain.clip_skip) == ("other", "my.vae.pt", 1)


def test_controlnet_units():
    hint = b64(shapes_image(32))
    scripts = {"ControlNet": {"args": [
        {"enabled": True, "image": hint, "mask": None, "module": "canny", "model": "control_canny [abcd1234]",
         "weight": 0.8, "resize_mode": "Resize and Fill", "low_vram": False, "processor_res": 512,
         "threshold_a": 50, "threshold_b": 150, "guidance_start": 0.1, "guidance_end": 0.9,
         "control_mode": "ControlNet is more important", "pixel_perfect": False},
        {"enabled": True, "input_image": "", "module": "inpaint_only", "model": "control_inpaint", "resize_mode": 1,
         "control_mode": 0},
        {"enabled": False, "module": "lineart_anime", "model": "x"},
    ]}, "ADetailer": {"args": [False]}}
    req = to_generation_request(parse_body(Txt2ImgBody, webuiapi_txt2img(alwayson_scripts=scripts)))
    canny, inpaint = req.controlnets
    assert (canny.model, canny.preprocessor, canny.weight, canny.start, canny.end) == (
        "control_canny [abcd1234]", "canny", 0.8, 0.1, 0.9)
    assert (canny.guess_mode, canny.resize_mode, canny.low_threshold, canny.high_threshold) == (
        True, "fill", 50, 150)
    assert canny.image.size == (32, 32)
    assert (inpaint.preprocessor, inpaint.image, inpaint.resize_mode, inpaint.guess_mode) == (
        "inpaint", None, "crop", False)
    assert [controlnet_module(m) for m in ("none", "inpaint", "inpaint_global_harmonious", "scribble_hed",
                                           "depth_midas", "tile_resample", "openpose_full")] == [
        "none", "inpaint", "inpaint", "scribble", "depth", "tile", "openpose"]
    with pytest.raises(RequestError, match="not supported"):
        controlnet_module("inpaint_only+lama")
    bad = {"ControlNet": {"args": [{"model": "c", "control_mode": "My prompt is more important"}]}}
    with pytest.raises(RequestError, match="My prompt is more important"):
        to_generation_request(Txt2ImgBody(alwayson_scripts=bad))


def test_img2img_inpaint_body():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = parse_body(Img2ImgBody, {
        "init_images": [b64(shapes_image(64), data_url=True)], "mask": b64(mask.convert("RGB")), "mask_blur": 2,
        "inpainting_fill": 1, "inpaint_full_res": True, "inpaint_full_res_padding": 16,
        "inpainting_mask_invert": 1, "denoising_strength": 0.6, "width": 64, "height": 64, "prompt": "a disc",
        "sampler_name": "Euler", "steps": 2, "image_cfg_scale": 1.5, "initial_noise_multiplier": 1})
    req = to_generation_request(body)
    assert req.mode == "inpaint"
    assert (req.masked_content, req.only_masked, req.only_masked_padding, req.invert_mask) == (
        "original", True, 16, True)
    assert (req.mask_blur, req.strength, req.init_image.size, req.mask.mode) == (2, 0.6, (64, 64), "L")
    fills = [to_generation_request(body.model_copy(update={"inpainting_fill": i})).masked_content for i in range(4)]
    assert fills == ["fill", "original", "latent noise", "latent nothing"]
    whole = to_generation_request(body.model_copy(update={"inpaint_full_res": False, "inpainting_mask_invert": 0}))
    assert (whole.only_masked, whole.invert_mask) == (False, False)


def test_img2img_resize_mode_crops_init_image():
    body = Img2ImgBody(init_images=[b64(Image.new("RGB", (64, 32)))], width=32, height=32, resize_mode=1)
    req = to_generation_request(body)
    assert (req.mode, req.init_image.size, req.mask) == ("img2img", (32, 32), None)
    with pytest.raises(RequestError, match="exactly one") as e:
        to_generation_request(Img2ImgBody())
    assert e.value.field == "init_images"


def test_unknown_fields_are_ignored():
    body = parse_body(Txt2ImgBody, webuiapi_txt2img(foo=1, refiner_switch_at=0.8, comments={"x": 1}))
    assert not hasattr(body, "foo")
    assert "foo" not in body.model_dump()
    to_generation_request(body)


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"restore_faces": True}, "restore_faces", "restore_faces false"),
    ({"tiling": True}, "tiling", "tiling false"),
    ({"script_name": "x/y/z plot"}, "script_name", "script_name null"),
    ({"alwayson_scripts": {"Regional Prompter": {"args": [True, "Matrix"]}}}, "alwayson_scripts",
     "ControlNet, FreeU Integrated and Perturbed Attention Guidance Integrated are"),
    ({"alwayson_scripts": {"FreeU Integrated": {"args": [True, "high", 1.2]}}}, "alwayson_scripts",
     "after 'enabled' must be numbers"),
    ({"hr_checkpoint_name": "other.safetensors"}, "hr_checkpoint_name", "same checkpoint"),
])
def test_what_we_cannot_honour_is_a_clear_error(change, field, words):
    with pytest.raises(RequestError, match=words) as e:
        to_generation_request(parse_body(Txt2ImgBody, webuiapi_txt2img(**change)))
    assert e.value.field == field


def test_type_errors_name_the_field():
    with pytest.raises(RequestError, match="steps") as e:
        parse_body(Txt2ImgBody, {"steps": "many"})
    assert e.value.field == "steps"


def test_bad_base64_and_non_images_are_clear_errors():
    with pytest.raises(RequestError, match="not valid base64") as e:
        to_generation_request(Img2ImgBody(init_images=["@@not base64@@"]))
    assert e.value.field == "init_images[0]"
    with pytest.raises(RequestError, match="not an image"):
        decode_image(base64.b64encode(b"hello world").decode(), "mask")
    assert decode_image(b64(shapes_image(16), data_url=True), "x").size == (16, 16)
    unpadded = b64(shapes_image(16)).rstrip("=")
    assert decode_image(unpadded, "x").size == (16, 16)


def test_listings_and_error_body(tmp_path: Path):
    names = {s["name"]: s for s in samplers()}
    assert names["DPM++ 2M"]["options"] == {"scheduler": "karras"}
    assert "k_euler_a" in names["Euler a"]["aliases"]
    sched = {s["name"]: s for s in schedulers()}
    assert sched["karras"] == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                               "need_inner_model": False}
    assert {"automatic", "sgm_uniform"} <= set(sched)
    (tmp_path / "tiny.safetensors").write_bytes(b"x")
    refs = [ModelRef("tiny", tmp_path / "tiny.safetensors")]
    assert sd_models(refs, lambda ref: "ab" * 32) == [{
        "title": "tiny.safetensors [ababababab]", "model_name": "tiny", "hash": "ababababab", "sha256": "ab" * 32,
        "filename": str(tmp_path / "tiny.safetensors"), "config": None}]
    assert sd_models(refs)[0]["title"] == "tiny.safetensors"
    assert error_body(422, "steps must be >= 1", "steps") == {
        "error": "RequestError", "detail": "steps must be >= 1", "body": "", "errors": "steps: steps must be >= 1"}
    assert error_body(404, "Not Found")["error"] == "HTTPException"


def test_options_list_every_a1111_key_with_its_default_and_check_values():
    options = A1111Options().to_dict()
    assert len(options) > 280  # A1111 1.10's GET /options, its built-in Lora extension's included
    assert {k: options[k] for k in ("send_seed", "samples_format", "CLIP_stop_at_last_layers", "sd_vae",
                                    "eta_noise_seed_delta", "sd_noise_schedule", "live_previews_enable",
                                    "outdir_txt2img_samples", "sd_lora")} == {
        "send_seed": True, "samples_format": "png", "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic",
        "eta_noise_seed_delta": 0, "sd_noise_schedule": "Default", "live_previews_enable": True,
        "outdir_txt2img_samples": "outputs/txt2img-images", "sd_lora": "None"}
    opts = A1111Options().updated({"send_seed": False, "CLIP_stop_at_last_layers": 2.0, "jpeg_quality": 90,
                                   "some_extension_option": {"any": ["json"]}})
    assert opts.get("send_seed") is False and opts.get("some_extension_option") == {"any": ["json"]}
    assert opts.get("CLIP_stop_at_last_layers") == 2 and isinstance(opts.get("CLIP_stop_at_last_layers"), int)
    assert A1111Options.restored(dict(opts.values)) == opts  # what the server stores, it reads back
    bad = [("CLIP_stop_at_last_layers", 1e30), ("CLIP_stop_at_last_layers", "2"), ("CLIP_stop_at_last_layers", 1.5),
           ("send_seed", "yes"), ("jpeg_quality", 0), ("samples_format", "bmp"), ("eta_ddim", float("nan")),
           ("hidden_tabs", [1]), ("sd_vae", 3), ("api_useragent", "curl"), ("x", "y" * 5000)]
    for key, value in bad:
        with pytest.raises(RequestError) as e:
            opts.updated({key: value})
        assert e.value.field == key, (key, value)
    assert opts.updated({"api_useragent": ""}) == opts  # a client posting back GET /options unchanged is fine


def test_options_sdstudio_acts_on_become_request_fields():
    opts = A1111Options().updated({"sd_noise_schedule": "Zero Terminal SNR", "sdxl_crop_left": 8, "sdxl_crop_top": 16,
                                   "emphasis": "None", "eta_noise_seed_delta": 31337, "sd_vae": "None"})
    req = to_generation_request(Txt2ImgBody(prompt="a"), opts)
    assert (req.zero_terminal_snr, req.crop_left_top, req.prompt_syntax, req.eta_noise_seed_delta, req.vae) == (
        True, (8, 16), "plain", 31337, "none")


A1111_INFO_KEYS = {
    "prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
    "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
    "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash",
    "seed_resize_from_w", "seed_resize_from_h", "denoising_strength", "extra_generation_params",
    "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip", "is_using_inpainting_conditioning",
    "version"}


def test_response_shape_on_the_tiny_model(engine, tmp_path):
    body = parse_body(Txt2ImgBody, webuiapi_txt2img(
        prompt="a red circle", negative_prompt="blue", seed=7, steps=2, width=64, height=64, batch_size=2,
        sampler_name="DPM++ 2M Karras", styles=["ignored"]))
    result = engine.generate(to_generation_request(body))
    out = respond(body, result, tmp_path)
    assert set(out) == {"images", "parameters", "info"}
    info = json.loads(out["info"])
    assert set(info) >= A1111_INFO_KEYS
    assert (info["seed"], info["all_seeds"], info["width"], info["steps"]) == (7, [7, 8], 64, 2)
    assert (info["sampler_name"], info["extra_generation_params"]["Schedule type"]) == ("DPM++ 2M", "Karras")
    assert info["all_prompts"] == ["a red circle"] * 2 and info["styles"] == ["ignored"]
    assert info["infotexts"] == [im.infotext for im in result.images]
    assert info["sd_model_hash"] and len(info["job_timestamp"]) == 14
    assert out["parameters"]["prompt"] == "a red circle" and out["parameters"]["sampler_name"] == "DPM++ 2M Karras"
    assert len(out["images"]) == 2
    for encoded, generated in zip(out["images"], result.images, strict=True):
        png = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert png.format == "PNG" and png.size == (64, 64)
        assert png.info["parameters"] == generated.infotext
    quiet = respond(body.model_copy(update={"send_images": False}), result, tmp_path)
    assert quiet["images"] == []


def test_img2img_response_echoes_without_pictures(engine, tmp_path):
    body = Img2ImgBody(init_images=[b64(shapes_image(64))], width=64, height=64, steps=2, seed=3,
                       denoising_strength=0.5)
    result = engine.generate(to_generation_request(body))
    out = respond(body, result, tmp_path)
    assert out["parameters"]["init_images"] is None
    assert json.loads(out["info"])["denoising_strength"] == 0.5
    kept = respond(body.model_copy(update={"include_init_images": True}), result, tmp_path)
    assert kept["parameters"]["init_images"] == body.init_images


def test_forges_freeu_and_pag_scripts_become_request_fields():
    scripts = {"FreeU Integrated": {"args": [True, 1.3, 1.4, 0.9, 0.2]},
               "perturbed attention guidance integrated": {"args": [True]},  # Forge's default scale, 3
               "ControlNet": {"args": [{"enabled": False}]}}
    req = to_generation_request(parse_body(Txt2ImgBody, webuiapi_txt2img(alwayson_scripts=scripts)))
    assert req.freeu == (1.3, 1.4, 0.9, 0.2) and req.pag_scale == 3.0 and req.controlnets == ()
    off = {"FreeU Integrated": {"args": [False, 1.3, 1.4, 0.9, 0.2]},
           "Perturbed Attention Guidance Integrated": {"args": [False, 5.0]}}
    req = to_generation_request(parse_body(Txt2ImgBody, webuiapi_txt2img(alwayson_scripts=off)))
    assert req.freeu is False and req.pag_scale == 0.0


def test_controlnet_number_fields_are_checked():
    bad = {"ControlNet": {"args": [{"model": "c", "weight": "heavy"}]}}
    with pytest.raises(RequestError, match="weight must be a number"):
        to_generation_request(Txt2ImgBody(alwayson_scripts=bad))
