"""IP-Adapter image prompts (engine/sd/ip_adapter.py): against diffusers' pipelines with `ip_adapter_image` on the
same tiny components and random adapters written in the published layouts; weights and windows; restoring the UNet;
finding files by name; the errors a user gets."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image, ImageDraw

from sdstudio import Engine, GenerationRequest
from sdstudio.engine.requests import HiresFix, IpAdapterUnit
from sdstudio.engine.sd.ip_adapter import ClipProcessor, adapters_installed
from sdstudio.errors import RequestError
from sdstudio.models.find.hashing import HashCache
from sdstudio.models.load.ip_adapter import load_encoder, read_adapter
from sdstudio.testing.ip_adapter import tiny_image_encoder, write_tiny_adapter
from sdstudio.testing.tiny import build_tiny
from tests.conftest import make_settings
from tests.test_parity import SEED, assert_close_latents, assert_same, diffusers_pipe, generators
from tests.test_sdxl import xl_pipe

PROMPT = dict(prompt="a small red circle", negative_prompt="blurry", steps=5, cfg_scale=7.0, seed=SEED,
              batch_size=2, sampler="Euler")
ADAPTERS = {"plain": "ip-adapter_tiny.safetensors", "plus": "ip-adapter-plus_tiny.bin",
            "full-face": "ip-adapter-full-face_tiny.safetensors"}


def picture(colour: tuple[int, int, int] = (240, 200, 20)) -> Image.Image:
    im = Image.new("RGB", (48, 40), (20, 120, 40))
    ImageDraw.Draw(im).rectangle((8, 6, 30, 30), fill=colour)
    return im


def install_files(home, unet) -> None:
    """Two encoders (one for plain and plus, one with ViT-H's 257 tokens for full-face) and three adapters."""
    tiny_image_encoder(home / "clip_vision" / "vit-tiny", hidden=64, projection=32, heads=2)
    tiny_image_encoder(home / "clip_vision" / "vit-257", hidden=48, projection=16, image_size=224, patch=14,
                       heads=2, seed=1)
    widths = {"plain": 32, "plus": 64, "full-face": 48}
    for kind, name in ADAPTERS.items():
        write_tiny_adapter(home / "ipadapter" / name, unet, kind, widths[kind], seed=len(kind))


@pytest.fixture(scope="module")
def ip(tmp_path_factory, tiny_model) -> Engine:
    home = tmp_path_factory.mktemp("ip-home")
    engine = Engine(make_settings(home, tiny_model.parent, default_model=str(tiny_model)))
    install_files(home, engine.load().unet)
    return engine


def reference(engine: Engine, req: GenerationRequest, result, kind: str, scale: float, xl: bool = False):
    """diffusers' pipeline with the same adapter, encoder and images, on the same model."""
    model, home = engine.load(), engine.settings.home
    adapter = read_adapter(home / "ipadapter" / ADAPTERS[kind], HashCache(home / "hashes.json"))
    encoder = load_encoder(home / "clip_vision" / ("vit-257" if kind == "full-face" else "vit-tiny"))
    size = encoder.config.image_size
    if xl:
        pipe = xl_pipe(model, result)
    else:
        pipe = diffusers_pipe(StableDiffusionPipeline, model, result.images[0].record["sampler"]["config"])
    pipe.image_encoder = encoder
    pipe.feature_extractor = ClipProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    kwargs = dict(prompt=req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=req.steps,
                  guidance_scale=req.cfg_scale, height=req.height or 64, width=req.width or 64,
                  num_images_per_prompt=req.batch_size, ip_adapter_image=[list(req.ip_adapters[0].images)])
    with adapters_installed(model.unet, [adapter]):
        pipe.set_ip_adapter_scale(scale)
        latents = pipe(**kwargs, generator=generators(req.batch_size), output_type="latent").images
        images = pipe(**kwargs, generator=generators(req.batch_size), output_type="pil").images
    return latents, images


def assert_close(result, ref_latents, ref_images) -> None:
    assert_same(result.latents, [im.image for im in result.images], ref_latents, ref_images)


@pytest.mark.parametrize("kind", ["plain", "plus", "full-face"])
def test_ip_adapter_matches_diffusers_ip_adapter_image(ip, kind):
    unit = IpAdapterUnit(model=ADAPTERS[kind].split(".")[0], images=(picture(),), weight=0.8)
    req = GenerationRequest(**PROMPT, ip_adapters=(unit,))
    result = ip.generate(req)
    ref_latents, ref_images = reference(ip, req, result, kind, 0.8)
    assert_close(result, ref_latents, ref_images)
    plain = ip.generate(req.replace(ip_adapters=()))
    assert (plain.latents - result.latents).abs().max() > 1e-2  # the image prompt acted
    assert result.images[0].record["request"]["ip_adapters"][0]["model"] == unit.model


def test_the_unet_is_restored_and_weight_zero_is_no_adapter(ip):
    before = ip.generate(GenerationRequest(**PROMPT))
    unit = IpAdapterUnit(model="ip-adapter_tiny", images=(picture(),), weight=0.0)
    off = ip.generate(GenerationRequest(**PROMPT, ip_adapters=(unit,)))
    assert (off.latents - before.latents).abs().max() < 1e-5
    with_adapter = ip.generate(GenerationRequest(**PROMPT, ip_adapters=(unit.__class__(unit.model, unit.images),)))
    after = ip.generate(GenerationRequest(**PROMPT))
    assert torch.equal(after.latents, before.latents)  # processors, projection and config flag all put back
    assert not torch.equal(with_adapter.latents, before.latents)
    assert ip.load().unet.encoder_hid_proj is None


def test_two_adapters_several_images_and_a_window(ip):
    red, blue = picture((230, 20, 20)), picture((20, 20, 230))
    both = (IpAdapterUnit("ip-adapter_tiny", (red, blue), 0.7), IpAdapterUnit("ip-adapter-plus_tiny", (blue,), 0.5))
    full = ip.generate(GenerationRequest(**PROMPT, ip_adapters=both))
    early = ip.generate(GenerationRequest(**PROMPT, ip_adapters=(both[0], IpAdapterUnit(
        "ip-adapter-plus_tiny", (blue,), 0.5, start=0.0, end=0.4))))
    first_only = ip.generate(GenerationRequest(**PROMPT, ip_adapters=both[:1]))
    for a, b in [(full, early), (early, first_only), (full, first_only)]:
        assert (a.latents - b.latents).abs().max() > 1e-3
    one_image = ip.generate(GenerationRequest(**PROMPT, ip_adapters=(IpAdapterUnit("ip-adapter_tiny", (red,), 0.7),)))
    assert (one_image.latents - first_only.latents).abs().max() > 1e-3  # the second picture counts


def test_ip_adapter_with_hires_and_inpainting(ip):
    unit = IpAdapterUnit("ip-adapter_tiny", (picture(),))
    hires = ip.generate(GenerationRequest(**{**PROMPT, "batch_size": 1}, ip_adapters=(unit,),
                                          hires=HiresFix(scale=1.5, upscaler="Latent")))
    assert hires.images[0].image.size == (96, 96)
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    inpaint = GenerationRequest(**{**PROMPT, "batch_size": 1}, init_image=picture().resize((64, 64)), mask=mask,
                                strength=0.9)
    with_unit = ip.generate(inpaint.replace(ip_adapters=(unit,)))
    assert not torch.equal(with_unit.latents, ip.generate(inpaint).latents)


def test_sdxl_ip_adapter_matches_diffusers(tmp_path_factory):
    root = tmp_path_factory.mktemp("xl-ip")
    build_tiny("sdxl", root / "tiny-xl", seed=3)
    xl = Engine(make_settings(root / "home", root, default_model=str(root / "tiny-xl")))
    install_files(root / "home", xl.load().unet)
    unit = IpAdapterUnit("ip-adapter-plus_tiny", (picture(),), 0.6)
    req = GenerationRequest(**{**PROMPT, "batch_size": 1}, width=64, height=64, ip_adapters=(unit,))
    result = xl.generate(req)
    ref_latents, ref_images = reference(xl, req, result, "plus", 0.6, xl=True)
    assert_close(result, ref_latents, ref_images)


def test_single_file_encoder_is_read_from_its_shapes(tmp_path):
    model = tiny_image_encoder(hidden=128, projection=32, heads=2, seed=5)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "clip-tiny.safetensors")
    loaded = load_encoder(tmp_path / "clip-tiny.safetensors")
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(pixels).image_embeds, model(pixels).image_embeds, atol=1e-6)


@pytest.mark.parametrize(("unit", "field", "message"), [
    (IpAdapterUnit("ip-adapter_tiny"), "ip_adapters.images", "needs 1 to 4 pictures"),
    (IpAdapterUnit("ip-adapter_tiny", (picture(),) * 5), "ip_adapters.images", "needs 1 to 4 pictures"),
    (IpAdapterUnit("ip-adapter_tiny", (picture(),), weight=3), "ip_adapters.weight", "between 0 and 2"),
    (IpAdapterUnit("ip-adapter_tiny", (picture(),), start=0.5, end=0.5), "ip_adapters.start", "start < end"),
    (IpAdapterUnit("ip-adapter_nope", (picture(),)), "ip_adapters", "unknown IP-Adapter 'ip-adapter_nope'"),
    (IpAdapterUnit("ip-adapter_tiny", (picture(),), encoder="vit-nope"), "ip_adapters", "unknown image encoder"),
])
def test_bad_units_are_refused_before_anything_runs(ip, unit, field, message):
    with pytest.raises(RequestError, match=message) as e:
        ip.prepare(GenerationRequest(**PROMPT, ip_adapters=(unit,)))
    assert e.value.field == field


def test_a_faceid_file_and_a_mismatched_encoder_say_what_to_do(ip, tmp_path):
    home = ip.settings.home
    faceid = {"image_proj.proj.0.weight": torch.zeros(8, 4), "image_proj.norm.weight": torch.ones(8),
              "ip_adapter.1.to_k_ip.weight": torch.zeros(8, 8)}
    from safetensors.torch import save_file

    save_file(faceid, home / "ipadapter" / "ip-adapter-faceid_tiny.safetensors")
    with pytest.raises(RequestError, match="FaceID"):
        ip.generate(GenerationRequest(**PROMPT, ip_adapters=(IpAdapterUnit("ip-adapter-faceid_tiny", (picture(),)),)))
    wrong = IpAdapterUnit("ip-adapter_tiny", (picture(),), encoder="vit-257")
    with pytest.raises(RequestError, match="does not fit ip-adapter_tiny"):
        ip.generate(GenerationRequest(**PROMPT, ip_adapters=(wrong,)))
    assert ip.load().unet.encoder_hid_proj is None


def test_every_door_takes_an_ip_adapter_and_makes_the_same_image(tmp_path, tiny_model):
    """CLI --ip-adapter, the native job API's ip_adapters and A1111's ControlNet unit with an ip-adapter module give
    the engine's pixels; the extension's model and module lists name the adapter."""
    import numpy as np
    from fastapi.testclient import TestClient

    from sdstudio.pictures import decode_image, image_to_b64
    from sdstudio.server.app import create_app
    from sdstudio.testing.live import wait_for_job
    from tests.test_cli import run

    home = tmp_path / "home"
    settings = make_settings(home, tiny_model.parent, default_model=str(tiny_model))
    engine = Engine(settings)
    install_files(home, engine.load().unet)
    hint = picture()
    hint.save(tmp_path / "hint.png")
    req = GenerationRequest(prompt="a red circle", steps=4, seed=11, sampler="Euler", cfg_scale=6.0, ip_adapters=(
        IpAdapterUnit("ip-adapter_tiny", (hint,), 0.9, 0.0, 0.8),))
    expected = np.asarray(engine.generate(req).images[0].image)
    unit = {"model": "ip-adapter_tiny", "images": [image_to_b64(hint)], "weight": 0.9, "end": 0.8}
    a1111_unit = {"enabled": True, "module": "ip-adapter_clip_sd15", "model": "ip-adapter_tiny [00000000]",
                  "image": image_to_b64(hint), "weight": 0.9, "guidance_end": 0.8}
    with TestClient(create_app(settings, tmp_path / "data")) as client:
        job = client.post("/api/v1/jobs", json={"request": {**req.to_dict(), "ip_adapters": [unit]}}).json()
        done = wait_for_job(client, job["id"])
        native = np.asarray(Image.open(__import__("io").BytesIO(client.get(done["result"]["images"][0]).content)))
        body = {"prompt": "a red circle", "steps": 4, "seed": 11, "sampler_name": "Euler", "cfg_scale": 6.0,
                "width": 64, "height": 64, "alwayson_scripts": {"controlnet": {"args": [a1111_unit]}}}
        a1111 = client.post("/sdapi/v1/txt2img", json=body).json()
        models = client.get("/controlnet/model_list").json()["model_list"]
        modules = client.get("/controlnet/module_list").json()["module_list"]
        faceid = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [
            {**a1111_unit, "module": "ip-adapter_face_id_plus"}]}}})
    assert np.array_equal(native, expected)
    assert np.array_equal(np.asarray(decode_image(a1111["images"][0], "image").convert("RGB")), expected)
    assert any(m.startswith("ip-adapter_tiny [") for m in models) and "ip-adapter_clip_sd15" in modules
    assert faceid.status_code == 422 and "InsightFace" in faceid.json()["detail"]
    (home / "models").mkdir(exist_ok=True)
    proc = run(["txt2img", "a red circle", "-m", str(tiny_model), "--steps", "4", "--seed", "11", "--sampler",
                "Euler", "--cfg", "6", "--ip-adapter", f"model=ip-adapter_tiny,image={tmp_path / 'hint.png'},"
                "weight=0.9,end=0.8", "-o", str(tmp_path / "cli")], tmp_path, home)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.asarray(Image.open(next((tmp_path / "cli").rglob("*.png"))).convert("RGB")), expected)
    bad = run(["txt2img", "x", "-m", str(tiny_model), "--ip-adapter", "model=ip-adapter_tiny"], tmp_path, home)
    assert bad.returncode != 0 and "needs model=NAME and image=FILE" in bad.stderr


def test_the_infotext_states_the_unit_as_the_controlnet_extension_does(ip):
    unit = IpAdapterUnit("ip-adapter_tiny", (picture(),), 0.7, 0.1, 0.9)
    text = ip.generate(GenerationRequest(**{**PROMPT, "batch_size": 1}, ip_adapters=(unit,))).images[0].infotext
    assert 'ControlNet 0: "Module: ip-adapter_clip_h, Model: ip-adapter_tiny [' in text
    assert "Weight: 0.7, Resize Mode: Crop and Resize, Guidance Start: 0.1, Guidance End: 0.9" in text


def test_ip_adapter_with_a_controlnet_matches_diffusers(tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from sdstudio.engine.requests import ControlUnit
    from tests.test_controlnet import control_picture, diffusers_pipe, tiny_controlnet

    model = build_tiny("sd1", tmp_path / "sd1", seed=3)
    tiny_controlnet(model, tmp_path / "controlnet" / "edges", 1)  # <models folder>/controlnet
    engine = Engine(make_settings(tmp_path / "home", tmp_path))
    install_files(tmp_path / "home", engine.load(str(model)).unet)
    req = GenerationRequest(prompt="a red circle", model=str(model), steps=4, sampler="Euler", seed=SEED, width=64,
                            height=64, controlnets=(ControlUnit("edges", control_picture(), weight=0.8),),
                            ip_adapters=(IpAdapterUnit("ip-adapter-plus_tiny", (picture(),), 0.7),))
    result = engine.generate(req)
    home = tmp_path / "home"
    pipe = diffusers_pipe(StableDiffusionControlNetPipeline, engine, model, result,
                          ControlNetModel.from_pretrained(tmp_path / "controlnet" / "edges"))
    pipe.image_encoder = load_encoder(home / "clip_vision" / "vit-tiny")
    pipe.feature_extractor = ClipProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    adapter = read_adapter(home / "ipadapter" / ADAPTERS["plus"], HashCache(home / "hashes.json"))
    with adapters_installed(pipe.unet, [adapter]):
        pipe.set_ip_adapter_scale(0.7)
        ref = pipe(prompt="a red circle", image=control_picture(), num_inference_steps=4, guidance_scale=7.0,
                   height=64, width=64, controlnet_conditioning_scale=0.8, ip_adapter_image=[[picture()]],
                   generator=generators(1, SEED), output_type="latent").images
    assert_close_latents(result.latents, ref)
    without = engine.generate(req.replace(ip_adapters=()))
    assert (without.latents - result.latents).abs().max() > 1e-3


def test_wrong_family_adapters_unreadable_encoders_and_bad_payloads_are_clear(ip, tmp_path):
    from safetensors.torch import save_file

    from sdstudio.server.payload import decode_request
    from sdstudio.testing.tiny import tiny_unet

    home = ip.settings.home
    write_tiny_adapter(home / "ipadapter" / "ip-adapter_other.safetensors", tiny_unet(context_dim=16), "plain", 32)
    with pytest.raises(RequestError, match="for another model family") as e:
        ip.generate(GenerationRequest(**PROMPT, ip_adapters=(IpAdapterUnit("ip-adapter_other", (picture(),)),)))
    assert e.value.field == "ip_adapters.model" and ip.load().unet.encoder_hid_proj is None
    save_file({"text_model.x": torch.zeros(2)}, home / "clip_vision" / "aaa-not-vision.safetensors")
    try:  # sorted first, it is skipped: the encoder that fits is still found
        ip.generate(GenerationRequest(**{**PROMPT, "steps": 2}, ip_adapters=(IpAdapterUnit("ip-adapter_tiny",
                                                                                           (picture(),)),)))
    finally:
        (home / "clip_vision" / "aaa-not-vision.safetensors").unlink()
    for unit, field in [({"images": ["x"]}, "ip_adapters.model"), ({"model": 3}, "ip_adapters.model"),
                        ({"model": "a", "images": "x"}, "ip_adapters.images"), ("unit", "ip_adapters")]:
        with pytest.raises(RequestError) as e:
            decode_request({"prompt": "a", "ip_adapters": [unit]})
        assert e.value.field == field
