"""Guidance add-ons (engine/sd/guidance.py): FreeU and PAG against diffusers' pipelines on the same tiny
components, CFG-Zero* and APG against diffusers' guiders on fixed tensors, and the checks a request gets."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPAGPipeline, StableDiffusionPipeline
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeZeroStarGuidance

from sdstudio import GenerationRequest
from sdstudio.engine.sd.guidance import FREEU_PRESETS, Guide, freeu_values
from sdstudio.errors import RequestError
from tests.conftest import make_settings
from tests.test_parity import SEED, assert_close_latents, assert_same, diffusers_pipe, generators
from tests.test_sdxl import xl_pipe

PROMPT = dict(prompt="a small red circle at the top left", negative_prompt="blurry", steps=6, cfg_scale=7.5,
              seed=SEED, batch_size=2)
FREEU = (1.5, 1.6, 0.9, 0.2)


def reference(pipe, req: GenerationRequest, **extra):
    kwargs = dict(prompt=req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=req.steps,
                  guidance_scale=req.cfg_scale, height=64, width=64, num_images_per_prompt=req.batch_size, **extra)
    latents = pipe(**kwargs, generator=generators(req.batch_size), output_type="latent").images
    images = pipe(**kwargs, generator=generators(req.batch_size), output_type="pil").images
    return latents, images


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_freeu_matches_diffusers_enable_freeu_and_changes_the_image(engine, sampler):
    req = GenerationRequest(**PROMPT, sampler=sampler, freeu=FREEU)
    result = engine.generate(req)
    model = engine.load()
    pipe = diffusers_pipe(StableDiffusionPipeline, model, result.images[0].record["sampler"]["config"])
    pipe.enable_freeu(b1=1.5, b2=1.6, s1=0.9, s2=0.2)
    try:
        ref_latents, ref_images = reference(pipe, req)
    finally:
        pipe.disable_freeu()
    assert_same(result.latents, [im.image for im in result.images], ref_latents, ref_images)
    plain = engine.generate(req.replace(freeu=False))
    assert (plain.latents - result.latents).abs().max() > 1e-2  # FreeU acted, and was undone after
    assert torch.equal(engine.generate(req.replace(freeu=False)).latents, plain.latents)


def test_freeu_true_takes_the_families_published_preset():
    assert freeu_values(True, "sd1") == FREEU_PRESETS["sd1"] == (1.5, 1.6, 0.9, 0.2)
    assert freeu_values(True, "sdxl-inpaint") == (1.3, 1.4, 0.9, 0.2)
    assert freeu_values(False, "sd1") is None and freeu_values([1, 1.2, 0.5, 0.1], "sd2") == (1.0, 1.2, 0.5, 0.1)


@pytest.mark.parametrize("cfg", [7.5, 1.0])
def test_pag_matches_diffusers_pag_pipeline(engine, cfg):
    req = GenerationRequest(**{**PROMPT, "cfg_scale": cfg}, sampler="Euler", pag_scale=3.0)
    result = engine.generate(req)
    model = engine.load()
    config = result.images[0].record["sampler"]["config"]
    plain = diffusers_pipe(StableDiffusionPipeline, model, config)
    pipe = StableDiffusionPAGPipeline(**plain.components, requires_safety_checker=False, pag_applied_layers=["mid"])
    pipe.set_progress_bar_config(disable=True)
    ref_latents, ref_images = reference(pipe, req, pag_scale=3.0)
    # diffusers runs the perturbed branch in the guidance batch, we as its own UNet call (see LATENT_RTOL)
    assert_same(result.latents, [im.image for im in result.images], ref_latents, ref_images)
    assert not torch.equal(engine.generate(req.replace(pag_scale=0.0)).latents, result.latents)


def test_freeu_on_sdxl_matches_diffusers(tmp_path_factory):
    from sdstudio import Engine
    from sdstudio.testing.tiny import build_tiny

    root = tmp_path_factory.mktemp("xl-guidance")
    build_tiny("sdxl", root / "tiny-xl", seed=3)
    xl = Engine(make_settings(root / "home", root, default_model=str(root / "tiny-xl")))
    req = GenerationRequest(prompt="a red circle", steps=4, cfg_scale=6.0, sampler="Euler", seed=SEED, width=64,
                            height=64, freeu=True, pag_scale=2.0)
    result = xl.generate(req)
    model = xl.load()
    pipe = xl_pipe(model, result)
    pipe.enable_freeu(*(FREEU_PRESETS["sdxl"][i] for i in (2, 3, 0, 1)))  # (s1, s2, b1, b2)
    try:
        ref = pipe(prompt=req.prompt, num_inference_steps=4, guidance_scale=6.0, height=64, width=64,
                   generator=generators(1, SEED), output_type="latent").images
    finally:
        pipe.disable_freeu()
    without_pag = xl.generate(req.replace(pag_scale=0.0))
    assert_close_latents(without_pag.latents, ref)
    assert not torch.equal(without_pag.latents, result.latents)  # PAG runs on the SDXL UNet's mid block too


def fixed_predictions() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    uncond = torch.randn(3, 4, 8, 8, generator=g)
    return uncond, uncond + 0.5 * torch.randn(3, 4, 8, 8, generator=g)


def test_cfg_zero_star_is_diffusers_guider_without_zero_init():
    uncond, cond = fixed_predictions()
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=6.0, zero_init_steps=0)
    guider.set_state(step=3, num_inference_steps=10, timestep=torch.tensor(500))
    expected = guider.forward(cond, uncond).pred
    ours = Guide(6.0, "cfg-zero*")(uncond, cond - uncond, lambda: pytest.fail("no second evaluation"))
    assert torch.allclose(ours, expected, atol=1e-6)
    # the scale a = <c, u> / |u|^2 is per image: the first image's result does not depend on the others
    alone = Guide(6.0, "cfg-zero*")(uncond[:1], (cond - uncond)[:1], lambda: None)
    assert torch.allclose(alone, ours[:1], atol=1e-6)


def test_apg_is_diffusers_guider_with_its_momentum_over_steps():
    uncond, cond = fixed_predictions()
    guider = AdaptiveProjectedGuidance(guidance_scale=5.0, adaptive_projected_guidance_momentum=-0.5,
                                       adaptive_projected_guidance_rescale=2.0, eta=0.0)
    ours = Guide(5.0, "apg", apg_eta=0.0, apg_norm_threshold=2.0, apg_momentum=-0.5)
    for step in range(3):  # diffusers keeps the running average between steps; so do we, within a batch
        guider.set_state(step=step, num_inference_steps=3, timestep=torch.tensor(900 - 300 * step))
        guider.prepare_inputs({"prompt_embeds": (torch.zeros(1), torch.zeros(1))})
        expected = guider.forward(cond * (1 + step), uncond).pred
        got = ours(uncond, cond * (1 + step) - uncond, lambda: None)
        assert torch.allclose(got, expected, atol=1e-5), step


@pytest.mark.parametrize("kind", ["cfg-zero*", "apg"])
def test_a_guidance_rule_changes_the_image_and_is_recorded(engine, kind):
    req = GenerationRequest(**PROMPT, sampler="Euler", guidance=kind, apg_norm_threshold=1.0)
    result = engine.generate(req)
    assert not torch.equal(result.latents, engine.generate(req.replace(guidance="cfg")).latents)
    assert torch.equal(result.latents, engine.generate(req).latents)  # reproducible
    assert result.images[0].record["request"]["guidance"] == kind


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"guidance": "cfg++"}, "guidance", "guidance must be one of cfg, cfg-zero*, apg"),
    ({"pag_scale": -1}, "pag_scale", "pag_scale must be a number from 0 to 100"),
    ({"pag_scale": 2.0, "pag_layers": ("middle",)}, "pag_layers", "pag_layers must be 1 to 16 of mid"),
    ({"pag_scale": 2.0, "pag_layers": ("mid_block.*(a+)+$",)}, "pag_layers", "pag_layers must be"),
    ({"pag_scale": 2.0, "prompt": "a cat AND a dog"}, "pag_scale", "takes one positive prompt"),
    ({"freeu": (1.5, 1.6, 0.9)}, "freeu", "freeu must be true, false or [b1, b2, s1, s2]"),
    ({"freeu": "yes"}, "freeu", "freeu must be"),
    ({"apg_momentum": 2}, "apg_momentum", "apg_momentum must be a number from -1 to 1"),
])
def test_bad_add_ons_are_refused_before_loading(engine, change, field, message):
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("*", r"\*")) as caught:
        engine.prepare(GenerationRequest(**{"prompt": "a cat", **change}))
    assert caught.value.field == field


def test_a_layer_the_unet_lacks_is_named(engine):
    with pytest.raises(RequestError, match=r"no self-attention in 'up\.7'") as caught:
        engine.generate(GenerationRequest(prompt="a cat", steps=2, pag_scale=1.0, pag_layers=("up.7",)))
    assert caught.value.field == "pag_layers"


def test_infotext_writes_forges_keys_and_reads_them_back(engine):
    from sdstudio.a1111.infotext import parse_infotext, request_fields

    req = GenerationRequest(prompt="a red circle", steps=2, sampler="Euler", seed=3, freeu=True, pag_scale=2.5,
                            pag_layers=("mid", "up.1"), guidance="apg", apg_eta=0.0, apg_momentum=-0.5)
    text = engine.generate(req).images[0].infotext
    for key in ("freeu_enabled: True", "freeu_b1: 1.5", "freeu_s2: 0.2", "PerturbedAttentionGuidance_enabled: True",
                "PerturbedAttentionGuidance_scale: 2.5", "PAG layers: mid up.1", "Guidance: APG", "APG eta: 0",
                "APG momentum: -0.5", "APG norm threshold: 15"):
        assert key in text, (key, text)
    fields = request_fields(parse_infotext(text))
    assert fields["freeu"] == (1.5, 1.6, 0.9, 0.2) and fields["pag_scale"] == 2.5
    assert fields["pag_layers"] == ("mid", "up.1") and fields["guidance"] == "apg" and fields["apg_momentum"] == -0.5
    again = engine.generate(GenerationRequest.from_flat(**{**fields, "steps": 2}))
    assert again.images[0].infotext == text  # the re-run is the same request
    plain = engine.generate(GenerationRequest(prompt="a red circle", steps=2, seed=3)).images[0].infotext
    assert "freeu" not in plain and "Perturbed" not in plain and "Guidance" not in plain


def test_json_lists_become_the_requests_tuples_and_bad_ones_are_refused():
    from sdstudio.engine.validate import check_fields, check_types
    from sdstudio.server.payload import decode_request, encode_request
    from sdstudio.settings import Limits

    req = decode_request({"prompt": "a cat", "freeu": [1.5, 1.6, 0.9, 0.2], "pag_layers": ["mid", "up.1"],
                          "pag_scale": 2, "guidance": "cfg-zero*"})
    assert req.freeu == (1.5, 1.6, 0.9, 0.2) and req.pag_layers == ("mid", "up.1")
    assert decode_request(encode_request(req)) == req  # what the queue stores comes back the same
    for bad in ({"pag_layers": "mid"}, {"pag_layers": ["mid"] * 17}, {"freeu": [1, 2, 3, "x"]}, {"guidance": 3},
                {"pag_scale": True}, {"apg_eta": float("nan")}):
        with pytest.raises(RequestError):
            r = decode_request({"prompt": "a cat", **bad})
            check_types(r)
            check_fields(r, Limits())


def test_cfg_pp_samplers_run_guide_with_a_twelfth_and_keep_their_names(engine):
    from sdstudio.samplers import resolve_sampler

    assert resolve_sampler("euler_ancestral_cfg_pp").sampler.name == "Euler a CFG++"  # ComfyUI's name
    assert resolve_sampler("DDIM CFG++").schedule == "DDIM"  # A1111's DDIM CFG++: DDIM's timesteps
    req = GenerationRequest(prompt="a red circle", steps=6, sampler="Euler CFG++", seed=2, cfg_scale=7.5)
    result = engine.generate(req)
    assert "Sampler: Euler CFG++" in result.images[0].infotext
    assert not torch.equal(result.latents, engine.generate(req.replace(sampler="Euler")).latents)
    with pytest.raises(RequestError, match="its own guidance rule") as caught:
        engine.prepare(req.replace(guidance="apg"))
    assert caught.value.field == "guidance"
