"""LoRA, embeddings, VAE choice and clip skip through the engine: prompt syntax, undo, infotext."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from sdstudio import Engine, GenerationRequest
from sdstudio.a1111.infotext import parse_infotext, request_fields
from sdstudio.errors import RequestError
from tests.conftest import make_settings
from tests.test_lora import kohya_lora

REQ = GenerationRequest(prompt="a red circle", steps=3, sampler="Euler", seed=11, width=64, height=64)


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_model):
    home = tmp_path_factory.mktemp("studio")
    models = home / "models"
    models.mkdir()
    shutil.copytree(tiny_model, models / "tiny")
    engine = Engine(make_settings(home, models, default_model="tiny"))
    model = engine.load()
    (home / "lora").mkdir()
    save_file(kohya_lora(model.unet, model.text_encoder, seed=3), home / "lora" / "Ink Style.safetensors")
    (home / "embeddings").mkdir()
    width = model.text_encoder.config.hidden_size
    save_file({"emb_params": torch.randn(2, width, generator=torch.Generator().manual_seed(1))},
              home / "embeddings" / "BadHands.safetensors")
    vae = AutoencoderKL.from_config(model.vae.config)
    torch.manual_seed(9)
    for p in vae.parameters():
        p.data.normal_(0, 0.05)
    (home / "vae").mkdir()
    save_file(vae.state_dict(), home / "vae" / "other.safetensors")
    return engine


def test_lora_tag_changes_the_image_and_is_undone(studio):
    plain = studio.generate(REQ)
    styled = studio.generate(REQ.replace(prompt="a red circle <lora:Ink Style:0.8>"))
    again = studio.generate(REQ)
    assert not torch.equal(plain.latents, styled.latents)
    assert torch.equal(plain.latents, again.latents)  # the model is exactly as before
    text = styled.images[0].infotext
    assert "<lora:Ink Style:0.8>" in text.splitlines()[0]  # the prompt is kept as written, like A1111
    assert "Lora hashes: \"Ink Style: " in text
    addons = styled.images[0].record["addons"]["loras"][0]
    assert addons["weight"] == 0.8 and addons["matched_keys"] > 0


def test_lora_weight_zero_is_the_plain_image(studio):
    plain = studio.generate(REQ)
    assert torch.equal(plain.latents, studio.generate(REQ.replace(prompt="a red circle <lora:ink style:0>")).latents)


def test_unknown_lora_is_a_request_error_with_close_matches(studio):
    with pytest.raises(RequestError, match="Ink Style"):
        studio.generate(REQ.replace(prompt="a red circle <lora:ink-style:1>"))


def test_embedding_by_name_in_the_negative_prompt(studio):
    plain = studio.generate(REQ.replace(negative_prompt="blurry"))
    with_ti = studio.generate(REQ.replace(negative_prompt="blurry, BadHands"))
    assert not torch.equal(plain.latents, with_ti.latents)
    assert torch.equal(plain.latents, studio.generate(REQ.replace(negative_prompt="blurry")).latents)
    assert "TI hashes: \"BadHands: " in with_ti.images[0].infotext


def test_vae_choice_and_clip_skip_are_recorded_and_read_back(studio):
    plain = studio.generate(REQ)
    other = studio.generate(REQ.replace(vae="other", clip_skip=2))
    assert not torch.equal(plain.latents, other.latents)  # clip skip changes the conditioning
    assert plain.images[0].image.tobytes() != other.images[0].image.tobytes()
    info = parse_infotext(other.images[0].infotext)
    assert info.params["VAE"] == "other.safetensors" and len(info.params["VAE hash"]) == 10
    assert info.params["Clip skip"] == "2"
    fields = request_fields(info)
    assert fields["clip_skip"] == 2 and fields["vae"] == "other.safetensors"
    rerun = studio.generate(REQ.replace(**{k: fields[k] for k in ("vae", "clip_skip")}))
    assert torch.equal(rerun.latents, other.latents)


def test_same_latents_with_own_vae_and_another_decode_differently(studio):
    own = studio.generate(REQ.replace(vae="none"))
    other = studio.generate(REQ.replace(vae="other"))
    assert torch.equal(own.latents, other.latents)
    assert own.images[0].image.tobytes() != other.images[0].image.tobytes()
    assert "VAE" not in parse_infotext(own.images[0].infotext).params


def test_unknown_vae_lists_the_available_ones(studio):
    with pytest.raises(RequestError, match=r"unknown VAE 'othr'.*other\.safetensors"):
        studio.generate(REQ.replace(vae="othr"))


def test_clip_skip_deeper_than_the_text_encoder_is_a_request_error(studio):
    with pytest.raises(RequestError, match="clip_skip must be at most 2"):
        studio.generate(REQ.replace(clip_skip=3))


def test_an_embedding_for_another_family_is_skipped(studio, tmp_path):
    home = studio.settings.home
    save_file({"emb_params": torch.zeros(1, 768)}, home / "embeddings" / "wide.safetensors")
    try:
        plain = studio.generate(REQ)
        with_wide = studio.generate(REQ.replace(prompt="a red circle, wide"))
        assert "TI hashes" not in with_wide.images[0].infotext
        assert plain.latents.shape == with_wide.latents.shape
    finally:
        (home / "embeddings" / "wide.safetensors").unlink()
