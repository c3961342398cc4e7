"""LoRA: kohya and PEFT files change the tiny model's outputs, combine by the formula, and undo bit-exactly."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdstudio.errors import ModelError
from sdstudio.models.addons.lora import apply_loras, check_loras, lora_from_state_dict, loras_applied, read_lora
from sdstudio.testing.tiny import build_tiny

TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"       # Linear (32, 32)
ATTN2_TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # Linear (32, 32)
PROJ_IN = "down_blocks.0.attentions.0.proj_in"                            # Conv2d 1x1 (32, 32, 1, 1)
CONV1 = "down_blocks.0.resnets.0.conv1"                                   # Conv2d 3x3: LoCon
TE_Q = "encoder.layers.0.self_attn.q_proj"                                # CLIPTextModel has no text_model level
TE_FC1 = "encoder.layers.1.mlp.fc1"


@pytest.fixture(scope="module")
def sd1(tiny_model):
    return (UNet2DConditionModel.from_pretrained(tiny_model / "unet").eval(),
            CLIPTextModel.from_pretrained(tiny_model / "text_encoder").eval())


def low_rank(weight: torch.Tensor, seed: int, rank: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """down (r, in[, kh, kw]), up (out, r[, 1, 1]) for `weight`, seeded."""
    g = torch.Generator().manual_seed(seed)
    conv = weight.dim() == 4
    down = torch.randn((rank, *weight.shape[1:]) if conv else (rank, weight.shape[1]), generator=g) * 0.2
    up = torch.randn((weight.shape[0], rank, 1, 1) if conv else (weight.shape[0], rank), generator=g) * 0.2
    return down, up


def kohya_lora(unet, te, seed: int, alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """kohya names: lora_unet_<module with _>, lora_te_text_model_<module>; TE without out_proj on purpose."""
    sd = {}
    for component, model, names in (("unet", unet, (TO_Q, PROJ_IN, CONV1)), ("te", te, (TE_Q, TE_FC1))):
        for i, name in enumerate(names):
            stem = f"lora_{component}_" + ("text_model_" if component == "te" else "") + name.replace(".", "_")
            down, up = low_rank(model.get_submodule(name).weight, seed + i)
            sd |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)}
    return sd


def peft_lora(unet, te, seed: int) -> dict[str, torch.Tensor]:
    """diffusers/PEFT names: unet.<module>.lora_A/B, an attention-processor key, text_encoder.text_model.<module>."""
    sd = {}
    parts = (("unet.", unet, TO_Q), ("unet.", unet, ATTN2_TO_K), ("text_encoder.text_model.", te, TE_Q))
    for prefix, model, name in parts:
        down, up = low_rank(model.get_submodule(name).weight, seed, rank=2)
        if name == ATTN2_TO_K:  # the old attention-processor spelling
            base = prefix + name.removesuffix(".to_k") + ".processor.to_k_lora"
            sd |= {f"{base}.down.weight": down, f"{base}.up.weight": up}
        else:
            sd |= {f"{prefix}{name}.lora_A.weight": down, f"{prefix}{name}.lora_B.weight": up}
    return sd


PEFT_METADATA = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.r": 2, "text_encoder.lora_alpha": 2})}


def outputs(unet, te) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, unet.config.cross_attention_dim, generator=g)
    ids = torch.tensor([[512, 70, 71, 72, 513]])
    with torch.no_grad():
        return unet(x, 10, context).sample, te(ids).last_hidden_state


def save(tmp_path: Path, name: str, sd: dict, metadata: dict | None = None) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, path, metadata=metadata)
    return path


def test_kohya_lora_changes_outputs_and_undo_is_bit_exact(sd1, tmp_path):
    unet, te = sd1
    lora = read_lora(save(tmp_path, "style", kohya_lora(unet, te, seed=1)))
    assert lora.format == "kohya"
    before = outputs(unet, te)
    with loras_applied(unet, [te], [(lora, 1.0)]) as report:
        during = outputs(unet, te)
        # the TE LoRA has no out_proj: applied anyway (diffusers' converter would silently skip it)
        assert report.files[0].components == ("unet", "te1")
    after = outputs(unet, te)
    assert not torch.equal(during[0], before[0]) and not torch.equal(during[1], before[1])
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert report.files[0].matched_keys == 15 and report.files[0].dropped == ()


def test_peft_lora_changes_outputs_with_metadata_alpha(sd1, tmp_path):
    unet, te = sd1
    sd = peft_lora(unet, te, seed=2)
    lora = read_lora(save(tmp_path, "peft", sd, PEFT_METADATA))
    assert lora.format == "peft/diffusers"
    w0 = unet.get_submodule(TO_Q).weight.clone()
    before = outputs(unet, te)
    with loras_applied(unet, [te], [(lora, 1.0)]) as report:
        up, down = sd[f"unet.{TO_Q}.lora_B.weight"], sd[f"unet.{TO_Q}.lora_A.weight"]
        torch.testing.assert_close(unet.get_submodule(TO_Q).weight, w0 + 8 / 2 * up @ down)  # alpha 8, r 2
        during = outputs(unet, te)
    assert sorted(report.files[0].matched_modules) == sorted([f"unet:{TO_Q}", f"unet:{ATTN2_TO_K}", f"te1:{TE_Q}"])
    assert not torch.equal(during[0], before[0]) and not torch.equal(during[1], before[1])
    assert all(torch.equal(a, b) for a, b in zip(outputs(unet, te), before, strict=True))


def test_two_loras_combine_by_the_formula_and_negative_weights_subtract(sd1, tmp_path):
    unet, te = sd1
    k_sd, p_sd = kohya_lora(unet, te, seed=3, alpha=2.0), peft_lora(unet, te, seed=4)
    kohya, peft = lora_from_state_dict("k", k_sd), lora_from_state_dict("p", p_sd)  # peft: no alpha -> scale 1
    w0, c0 = unet.get_submodule(TO_Q).weight.clone(), unet.get_submodule(CONV1).weight.clone()
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    with loras_applied(unet, [te], [(kohya, 0.7), (peft, -0.5)]):
        stem = "lora_unet_" + TO_Q.replace(".", "_")
        k_delta = k_sd[f"{stem}.lora_up.weight"] @ k_sd[f"{stem}.lora_down.weight"]
        p_delta = p_sd[f"unet.{TO_Q}.lora_B.weight"] @ p_sd[f"unet.{TO_Q}.lora_A.weight"]
        # W' = W + Σ w_i · alpha_i / r_i · up_i @ down_i
        torch.testing.assert_close(unet.get_submodule(TO_Q).weight, w0 + 0.7 * 2.0 / 4 * k_delta - 0.5 * 1.0 * p_delta)
        conv_stem = "lora_unet_" + CONV1.replace(".", "_")  # LoCon 3x3: (out, r) @ (r, in·3·3) -> (out, in, 3, 3)
        conv_delta = (k_sd[f"{conv_stem}.lora_up.weight"].flatten(1) @ k_sd[f"{conv_stem}.lora_down.weight"].flatten(1))
        torch.testing.assert_close(unet.get_submodule(CONV1).weight, c0 + 0.7 * 0.5 * conv_delta.reshape(c0.shape))
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())


def test_weight_zero_skips_the_file(sd1):
    unet, te = sd1
    lora = lora_from_state_dict("off", kohya_lora(unet, te, seed=5))
    before = outputs(unet, te)
    with loras_applied(unet, [te], [(lora, 0.0)]) as report:
        assert all(torch.equal(a, b) for a, b in zip(outputs(unet, te), before, strict=True))
    assert report.files[0].skipped and report.infotext_hashes() == ""


def test_file_matching_nothing_raises_and_names_its_family(sd1):
    unet, te = sd1
    sdxl = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4)}
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ModelError, match="SDXL"), loras_applied(unet, [te], [(lora_from_state_dict("xl", sdxl), 1.0)]):
        pass
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())


def test_report_counts_dropped_keys_and_reasons(sd1, caplog):
    unet, te = sd1
    sd = kohya_lora(unet, te, seed=6)                                   # 5 layers x 3 keys, all match
    missing = "lora_unet_down_blocks_7_attentions_0_proj_in"            # no such module
    sd |= {f"{missing}.lora_down.weight": torch.zeros(4, 32), f"{missing}.lora_up.weight": torch.zeros(32, 4)}
    wrong = "lora_unet_" + TO_Q.replace("to_q", "to_v").replace(".", "_")  # shape mismatch: in 48 vs 32
    sd |= {f"{wrong}.lora_down.weight": torch.zeros(4, 48), f"{wrong}.lora_up.weight": torch.zeros(32, 4)}
    loha = "lora_unet_" + CONV1.replace("conv1", "conv2").replace(".", "_")
    sd |= {f"{loha}.{k}": torch.zeros(4, 4) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    sd |= {f"{loha}.alpha": torch.tensor(1.0)}
    with caplog.at_level(logging.WARNING, logger="sdstudio.models.addons.lora"):
        report = check_loras(unet, [te], [(lora_from_state_dict("mixed", sd), 1.0)]).files[0]
    assert (report.total_keys, report.matched_keys, len(report.matched_modules)) == (24, 15, 5)
    reasons = report.dropped_reasons()
    assert reasons["LoHa (hada_*) is not supported"] == 4
    assert sum(n for r, n in reasons.items() if r.startswith("its module also has unsupported keys")) == 1
    assert sum(n for r, n in reasons.items() if r.startswith("module not found")) == 2
    assert sum(n for r, n in reasons.items() if r.startswith("shape mismatch")) == 2
    assert report.matched_keys + len(report.dropped) == report.total_keys
    assert "only part of this model" in caplog.text and "LoHa" in caplog.text


def test_apply_loras_is_permanent(tiny_model):
    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    w0 = unet.get_submodule(TO_Q).weight.clone()
    down, up = low_rank(w0, 8)
    stem = "lora_unet_" + TO_Q.replace(".", "_")
    apply_loras(unet, [], [(lora_from_state_dict("bake", {f"{stem}.lora_down.weight": down,
                                                           f"{stem}.lora_up.weight": up}), 1.0)])
    torch.testing.assert_close(unet.get_submodule(TO_Q).weight, w0 + up @ down)  # no alpha: scale 1


def test_lora_hash_is_a1111s(sd1, tmp_path):
    unet, te = sd1
    path = save(tmp_path, "hashed", kohya_lora(unet, te, seed=9), {"ss_output_name": "x"})
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    addnet = hashlib.sha256(raw[8 + header:]).hexdigest()  # tensor bytes only
    lora = read_lora(path)
    assert lora.sha256 == addnet and lora.short_hash == addnet[:12]
    given = "ab" * 32
    assert read_lora(save(tmp_path, "given", kohya_lora(unet, te, 9), {"sshs_model_hash": given})).sha256 == given
    pt = tmp_path / "old.pt"
    torch.save(kohya_lora(unet, te, seed=9), pt)
    assert read_lora(pt).sha256 == hashlib.sha256(pt.read_bytes()).hexdigest()
    with loras_applied(unet, [te], [(lora, 0.5)]) as report:
        assert report.infotext_hashes() == f"hashed: {addnet[:12]}"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = build_tiny("sdxl", tmp_path_factory.mktemp("sdxl") / "m")
    return (UNet2DConditionModel.from_pretrained(root / "unet"), CLIPTextModel.from_pretrained(root / "text_encoder"),
            CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2"))


def test_sdxl_kohya_sgm_names_and_both_text_encoders(sdxl):
    unet, te1, te2 = sdxl
    targets = {  # kohya SDXL names (sgm blocks, te1/te2) -> diffusers modules
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
            (unet, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
        "lora_unet_output_blocks_0_0_in_layers_2": (unet, "up_blocks.0.resnets.0.conv1"),
        "lora_unet_middle_block_1_proj_in": (unet, "mid_block.attentions.0.proj_in"),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (te1, TE_Q),
        "lora_te2_text_model_encoder_layers_9_mlp_fc2": (te2, "text_model.encoder.layers.9.mlp.fc2"),
    }
    sd = {}
    for i, (stem, (model, name)) in enumerate(targets.items()):
        down, up = low_rank(model.get_submodule(name).weight, 10 + i)
        sd |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
    lora = lora_from_state_dict("xl", sd)
    originals = {name: model.get_submodule(name).weight.clone() for model, name in targets.values()}
    with loras_applied(unet, [te1, te2], [(lora, 1.0)]) as report:
        assert report.components == ("unet", "te1", "te2") and not report.files[0].dropped
        assert all(not torch.equal(m.get_submodule(n).weight, originals[n]) for m, n in targets.values())
    assert all(torch.equal(m.get_submodule(n).weight, originals[n]) for m, n in targets.values())
    only_te2_missing = check_loras(unet, [te1, None], [(lora, 1.0)]).files[0]
    assert only_te2_missing.dropped_reasons() == {"this model has no text encoder 2 (SDXL's OpenCLIP-G)": 2}


def test_malicious_pickle_lora_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"lora_unet_x.lora_down.weight": Payload()}, path)
    with pytest.raises(ModelError, match="refused"):
        read_lora(path)
    assert not marker.exists()
