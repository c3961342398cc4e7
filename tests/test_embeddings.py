"""Textual inversion: A1111 files load, expand to n tokens, change the encoding, and come out exactly."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdstudio.a1111.extras import addon_params
from sdstudio.errors import ModelError
from sdstudio.models.addons.embeddings import (
    embedding_from_data,
    embeddings_applied,
    expand_prompt,
    read_embedding,
    used_embeddings,
)
from sdstudio.testing.tiny import build_tiny


@pytest.fixture(scope="module")
def sd1(tiny_model):
    return (CLIPTokenizer.from_pretrained(tiny_model / "tokenizer"),
            CLIPTextModel.from_pretrained(tiny_model / "text_encoder").eval())


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = build_tiny("sdxl", tmp_path_factory.mktemp("sdxl") / "m")
    return ([CLIPTokenizer.from_pretrained(root / "tokenizer"), CLIPTokenizer.from_pretrained(root / "tokenizer_2")],
            [CLIPTextModel.from_pretrained(root / "text_encoder").eval(),
             CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2").eval()])


def vectors(n: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def a1111_pt(path, vecs):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vecs}, "name": path.stem, "step": 500,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    return path


def encode(tokenizer, encoder, text: str):
    ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = encoder(ids)
    return ids, out


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a1111_embedding_expands_changes_encoding_and_is_removed_exactly(sd1, tmp_path, suffix):
    tokenizer, encoder = sd1
    vecs = vectors(3, 32)
    path = tmp_path / f"MyStyle{suffix}"
    if suffix == ".pt":
        a1111_pt(path, vecs)
    else:
        save_file({"emb_params": vecs}, path)
    emb = read_embedding(path)
    assert (emb.name, emb.num_vectors, emb.widths) == ("mystyle", 3, (32,))
    assert emb.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert addon_params([], [(emb.stem, emb.short_hash)])["TI hashes"] == f"MyStyle: {emb.sha256[:12]}"

    prompt, plain = "a MyStyle cat", "a red cat"
    assert used_embeddings(prompt, [emb]) == [emb]
    expanded = expand_prompt(prompt, [emb])
    assert expanded == "a mystyle mystyle_1 mystyle_2 cat"
    size, table = len(tokenizer), encoder.get_input_embeddings()
    _, plain_before = encode(tokenizer, encoder, plain)
    ids_before, with_name_before = encode(tokenizer, encoder, prompt)

    with embeddings_applied([tokenizer], [encoder], [emb]):
        ids, out = encode(tokenizer, encoder, expanded)
        new_ids = tokenizer.convert_tokens_to_ids(emb.tokens)
        assert len(tokenizer) == size + 3 and ids[0, 2:5].tolist() == new_ids
        assert torch.equal(encoder.get_input_embeddings()(torch.tensor(new_ids)), vecs)  # n vectors, in order
        assert not torch.equal(out.last_hidden_state, with_name_before.last_hidden_state)

    assert len(tokenizer) == size and encoder.get_input_embeddings() is table
    assert torch.equal(encode(tokenizer, encoder, prompt)[0], ids_before)
    assert torch.equal(encode(tokenizer, encoder, plain)[1].last_hidden_state, plain_before.last_hidden_state)


def test_used_embeddings_matches_whole_words_in_order():
    one = embedding_from_data("Bad-Hands", {"x": vectors(1, 8)})
    two = embedding_from_data("mystyle", {"x": vectors(2, 8)})
    assert used_embeddings("(mystyle:1.2), BAD-HANDS, mystyle", [one, two]) == [two, one]
    assert used_embeddings("mystyles, mystyle_v2, amystyle", [one, two]) == []
    assert expand_prompt("[mystyle:cat:0.5]", [two]) == "[mystyle mystyle_1:cat:0.5]"


def test_sdxl_embedding_needs_both_widths(sd1, sdxl):
    tokenizers, encoders = sdxl
    xl = embedding_from_data("xlstyle", {"clip_l": vectors(2, 32, 1), "clip_g": vectors(2, 48, 2)})
    sd1_emb = embedding_from_data("oldstyle", {"string_to_param": {"*": vectors(2, 32)}})
    with pytest.raises(ModelError, match=r"width 32 \(.*\).*take 32 \+ 48"), \
            embeddings_applied(tokenizers, encoders, [sd1_emb]):
        pass
    with pytest.raises(ModelError, match=r"width 32 \+ 48 .*take 32"), embeddings_applied([sd1[0]], [sd1[1]], [xl]):
        pass
    text = expand_prompt("photo, xlstyle", [xl])
    before = [encode(t, e, text)[1] for t, e in zip(tokenizers, encoders, strict=True)]
    with embeddings_applied(tokenizers, encoders, [xl]):
        during = [encode(t, e, text)[1] for t, e in zip(tokenizers, encoders, strict=True)]
        for slot, (t, e) in enumerate(zip(tokenizers, encoders, strict=True)):
            rows = e.get_input_embeddings()(torch.tensor(t.convert_tokens_to_ids(xl.tokens)))
            assert torch.equal(rows, xl.vectors[slot])
    assert not torch.equal(during[1].text_embeds, before[1].text_embeds)
    after = [encode(t, e, text)[1] for t, e in zip(tokenizers, encoders, strict=True)]
    assert torch.equal(after[0].last_hidden_state, before[0].last_hidden_state)
    assert torch.equal(after[1].text_embeds, before[1].text_embeds)


def test_legacy_eos_config_pools_at_end_of_text_not_at_new_tokens(sd1):
    tokenizer, encoder = sd1
    legacy = CLIPTextModel(encoder.config.__class__(**{**encoder.config.to_dict(), "eos_token_id": 2})).eval()
    assert legacy.eos_token_id == 2
    emb = embedding_from_data("mystyle", {"t": vectors(2, 32)})
    with embeddings_applied([tokenizer], [legacy], [emb]):
        ids, out = encode(tokenizer, legacy, expand_prompt("a mystyle", [emb]))
        eos = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])
        assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, eos])
    assert legacy.eos_token_id == 2


def test_name_already_in_vocabulary_is_refused(sd1):
    tokenizer, encoder = sd1
    with pytest.raises(ModelError, match="already words"), \
            embeddings_applied([tokenizer], [encoder], [embedding_from_data("a", {"t": vectors(1, 32)})]):
        pass


def test_diffusers_learned_embeds_and_bad_files(tmp_path):
    torch.save({"<cat-toy>": vectors(1, 32)[0]}, tmp_path / "learned_embeds.bin")
    emb = read_embedding(tmp_path / "learned_embeds.bin")
    assert (emb.name, emb.num_vectors) == ("learned_embeds", 1)
    save_file({"a": vectors(1, 4), "b": vectors(1, 4)}, tmp_path / "two.safetensors")
    with pytest.raises(ModelError, match="not a textual-inversion embedding"):
        read_embedding(tmp_path / "two.safetensors")


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": Payload()}}, path)
    with pytest.raises(ModelError, match="refused"):
        read_embedding(path)
    assert not marker.exists()
