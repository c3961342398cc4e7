"""Inpainting controls: paste-back, only masked, soft inpainting, mask checks, method override, outpainting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdstudio import Engine, GenerationRequest
from sdstudio.a1111.infotext import parse_infotext, request_fields
from sdstudio.engine.sd import canvas
from sdstudio.engine.sd.inpaint import soft_blend_fn
from sdstudio.engine.workflows.outpaint import Extension, extend_canvas, outpaint_request
from sdstudio.errors import RequestError
from sdstudio.testing.tiny import build_tiny
from tests.conftest import make_settings, shapes_image


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("controls")
    paths = {"four": build_tiny("sd1", root / "four", seed=6), "nine": build_tiny("sd1-inpaint", root / "nine", seed=5)}
    return Engine(make_settings(root / "home", root)), paths


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int], value: int = 255) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=value)
    return mask


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def request(model, **fields) -> GenerationRequest:
    base = dict(prompt="a green square", model=str(model), init_image=shapes_image(), steps=3, seed=4,
                strength=1.0, mask=box_mask((64, 64), (8, 16, 40, 48)))
    return GenerationRequest(**{**base, **fields})


def test_paste_back_keeps_every_pixel_outside_the_mask(tiny):
    engine, paths = tiny
    mask = box_mask((64, 64), (8, 16, 40, 48))
    outside = np.asarray(mask) < 128
    init = pixels(shapes_image())
    kept = pixels(engine.generate(request(paths["four"], mask_blur=4)).images[0].image)
    assert (kept[outside] == init[outside]).all()
    assert (kept[~outside] != init[~outside]).any()
    loose = pixels(engine.generate(request(paths["four"], mask_blur=4, keep_unmasked=False)).images[0].image)
    assert (loose[outside] != init[outside]).any()  # the VAE round trip alone changes some pixels


def test_seam_is_feathered_inside_the_mask():
    mask = box_mask((64, 64), (16, 16, 47, 47))
    alpha = np.asarray(canvas.seam_alpha(mask, 4)).astype(int)
    assert alpha[np.asarray(mask) < 128].max() == 0       # nothing outside the mask
    assert alpha[32, 32] == 255                            # full strength deep inside
    row = alpha[32, 16:33]
    assert (np.diff(row) >= 0).all() and 0 < row[2] < 255  # a ramp from the edge inwards
    assert np.array_equal(np.asarray(canvas.seam_alpha(mask, 0)), np.asarray(mask))


def test_crop_box_pads_and_matches_the_aspect_ratio():
    mask = box_mask((200, 100), (90, 40, 99, 49))  # a 10x10 mask
    assert canvas.crop_box(mask, 5, 1.0) == (85, 35, 105, 55)
    left, top, right, bottom = canvas.crop_box(mask, 5, 2.0)
    assert (right - left, bottom - top) == (40, 20) and left <= 85 and right >= 105
    assert canvas.crop_box(box_mask((200, 100), (0, 0, 4, 4)), 10, 1.0) == (0, 0, 15, 15)  # clamped at the corner
    assert canvas.crop_box(box_mask((200, 100), (0, 0, 199, 99)), 0, 1.0) == (0, 0, 200, 100)  # never cut the mask


def test_only_masked_changes_only_the_padded_box_and_keeps_the_size(tiny):
    engine, paths = tiny
    init = shapes_image(128)
    mask = box_mask((128, 128), (70, 70, 85, 85))
    result = engine.generate(request(paths["four"], init_image=init, mask=mask, mask_blur=0, only_masked=True,
                                     only_masked_padding=8, width=64, height=64, keep_unmasked=False))
    out = pixels(result.images[0].image)
    assert out.shape == (128, 128, 3)
    changed = np.argwhere((out != pixels(init)).any(-1))
    (top, left), (bottom, right) = changed.min(0), changed.max(0)
    assert left >= 62 and top >= 62 and right <= 93 and bottom <= 93  # the box 70-85 plus 8 px padding
    assert result.request.width == 64 and result.latents.shape[-1] == 8
    info = result.images[0].infotext
    assert "Inpaint area: Only masked" in info and "Masked area padding: 8" in info
    fields = request_fields(parse_infotext(info))
    assert fields["only_masked"] is True and fields["only_masked_padding"] == 8


def test_only_masked_defaults_to_the_models_native_size(tiny):
    engine, paths = tiny
    result = engine.generate(request(paths["four"], init_image=shapes_image(96), mask=box_mask((96, 96), (4, 4, 9, 9)),
                                     only_masked=True))
    assert result.images[0].image.size == (96, 96) and result.request.width == 64  # tiny sd1's native size


def test_soft_blend_frees_each_pixel_at_its_own_step():
    class Scheduler:  # add_noise marks its timestep so the test can see which one was used
        @staticmethod
        def add_noise(z0, noise, t):
            return z0 + t.float().view(-1, 1, 1, 1)

    timesteps = torch.arange(10, 0, -1)        # N = 10 steps
    strength = torch.tensor([[[[0.0, 0.5, 1.0]]]])  # (1, 1, 1, 3)
    blend = soft_blend_fn(Scheduler(), timesteps, torch.zeros(1, 1, 1, 3), None, strength)
    x = torch.full((1, 1, 1, 3), -1.0)
    assert blend(x, 0).flatten().tolist() == [9, 9, -1]   # before step 1: only s = 1 is free
    assert blend(x, 4).flatten().tolist() == [5, -1, -1]  # before step 5 = N * (1 - 0.5): s = 0.5 freed
    assert blend(x, 9).flatten().tolist() == [0, -1, -1]  # after the last: z0 itself where s = 0


def test_soft_inpainting_keeps_unmasked_latents_and_is_recorded(tiny):
    engine, paths = tiny
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=128)  # left half at half strength
    result = engine.generate(request(paths["four"], mask=mask, mask_blur=0, soft_inpainting=True, steps=4,
                                     strength=0.8))
    plain = engine.generate(request(paths["four"], init_image=shapes_image(), mask=None, steps=4, strength=0.8))
    right = result.latents[..., 5:]  # latent columns 5-7 never touch the mask
    assert not torch.equal(result.latents[..., :4], plain.latents[..., :4])
    z0 = engine.generate(request(paths["four"], mask=mask, mask_blur=0, soft_inpainting=True, steps=4,
                                 strength=0.8, seed=9)).latents[..., 5:]
    assert torch.allclose(right, z0, atol=1e-5)  # the untouched area is z0 whatever the seed
    assert "Soft inpainting enabled: True" in result.images[0].infotext
    out, init = pixels(result.images[0].image), pixels(shapes_image())
    assert (out[:, 32:] == init[:, 32:]).all()  # paste-back alpha is the grey mask: 0 on the right


def test_empty_mask_runs_as_img2img_with_a_warning(tiny):
    engine, paths = tiny
    empty = engine.generate(request(paths["four"], mask=Image.new("L", (64, 64), 0), strength=0.6))
    plain = engine.generate(request(paths["four"], mask=None, strength=0.6))
    assert empty.request.mode == "img2img" and any("empty" in w for w in empty.warnings)
    assert torch.equal(empty.latents, plain.latents)
    inverted_full = engine.generate(request(paths["four"], mask=Image.new("L", (64, 64), 255), invert_mask=True,
                                            strength=0.6))
    assert inverted_full.request.mode == "img2img"
    nine = engine.generate(request(paths["nine"], mask=Image.new("L", (64, 64), 0), strength=0.6))
    assert nine.request.mode == "inpaint" and nine.warnings  # the 9-channel UNet still gets its (empty) mask


def test_full_mask_and_mask_of_another_size(tiny):
    engine, paths = tiny
    full = engine.generate(request(paths["four"], mask=Image.new("L", (64, 64), 255), only_masked=True))
    assert full.images[0].image.size == (64, 64) and not full.warnings
    assert (pixels(full.images[0].image) != pixels(shapes_image())).any(-1).mean() > 0.9
    small = engine.generate(request(paths["four"], mask=box_mask((32, 32), (4, 8, 20, 24)), mask_blur=0))
    assert any("mask was resized" in w and "32x32" in w for w in small.warnings)
    outside = np.asarray(box_mask((32, 32), (4, 8, 20, 24)).resize((64, 64))) < 128
    assert (pixels(small.images[0].image)[outside] == pixels(shapes_image())[outside]).all()


def test_method_override(tiny):
    engine, paths = tiny
    with pytest.raises(RequestError, match="needs an inpainting checkpoint"):
        engine.generate(request(paths["four"], inpaint_method="condition"))
    with pytest.raises(RequestError, match="inpaint_method must be one of"):
        engine.generate(request(paths["four"], inpaint_method="magic"))
    mask = box_mask((64, 64), (8, 16, 40, 48))
    conditioned = engine.generate(request(paths["nine"], mask=mask, mask_blur=0))
    blended = engine.generate(request(paths["nine"], mask=mask, mask_blur=0, inpaint_method="blend"))
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[1:7, 0:6] = False  # latent cells touching the mask (pixels 8-40 x 16-48)
    assert not torch.equal(conditioned.latents, blended.latents)
    four_z0 = engine.generate(request(paths["nine"], mask=mask, mask_blur=0, inpaint_method="blend", seed=99))
    assert torch.allclose(blended.latents[..., keep], four_z0.latents[..., keep], atol=1e-5)  # held to z0


def test_outpaint_canvas_mask_and_prefills():
    image = shapes_image()
    ext = Extension(left=20, up=8).to_grid(64, 64)
    assert (64 + ext.left + ext.right) % 8 == 0 and ext.left == 24 and ext.right == 0
    for prefill in ("edge", "blur", "noise"):
        grown, mask = extend_canvas(image, ext, prefill, overlap=4)
        assert grown.size == (88, 72) and mask.size == (88, 72)
        assert pixels(grown)[8:, 24:].tolist() == pixels(image).tolist()  # the original, placed
        m = np.asarray(mask)
        assert m[:, :28].min() == 255 and m[:12].min() == 255 and m[12:, 28:].max() == 0  # new area + 4 px overlap
    edge, _ = extend_canvas(image, ext, "edge", 4)
    assert pixels(edge)[40, 0].tolist() == pixels(image)[32, 0].tolist()  # the border stretched outwards
    with pytest.raises(RequestError, match="at least one side"):
        outpaint_request(GenerationRequest(prompt="x"), image, Extension())
    with pytest.raises(RequestError, match="prefill must be one of"):
        outpaint_request(GenerationRequest(prompt="x"), image, Extension(left=8), prefill="mirror")
    with pytest.raises(RequestError, match="right must be"):
        outpaint_request(GenerationRequest(prompt="x"), image, Extension(right=-8))


def test_outpaint_runs_and_keeps_the_original(tiny):
    engine, paths = tiny
    req = outpaint_request(GenerationRequest(prompt="a blue sky", model=str(paths["four"]), steps=2, seed=1,
                                             strength=0.9), shapes_image(), Extension(right=16, down=8))
    result = engine.generate(req)
    out = pixels(result.images[0].image)
    assert out.shape == (72, 80, 3)
    assert (out[:56, :56] == pixels(shapes_image())[:56, :56]).all()  # outside mask and overlap: exact


def test_soft_grey_mask_is_not_empty_and_corner_box_is_cropped(tiny):
    engine, paths = tiny
    grey = Image.new("L", (64, 64), 100)  # below 128 everywhere, but every pixel has strength 0.39
    soft = engine.generate(request(paths["four"], mask=grey, soft_inpainting=True, strength=0.8))
    assert soft.request.mode == "inpaint" and not soft.warnings
    init = shapes_image(128)  # the mask's padded box is exactly 64x64 at the corner: still a crop of a larger image
    corner = engine.generate(request(paths["four"], init_image=init, mask=box_mask((128, 128), (0, 0, 55, 55)),
                                     mask_blur=0, only_masked=True, only_masked_padding=8, width=64, height=64,
                                     keep_unmasked=False))
    out = pixels(corner.images[0].image)
    assert out.shape == (128, 128, 3)
    assert (out[64:] == pixels(init)[64:]).all() and (out[:, 64:] == pixels(init)[:, 64:]).all()
