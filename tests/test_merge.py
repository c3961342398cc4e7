"""Checkpoint merging (A1111 Checkpoint Merger semantics) on tiny random LDM-layout state dicts."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdstudio.errors import ModelError
from sdstudio.models.load.checkpoint_io import read_state_dict
from sdstudio.models.tools.merge import (
    MergeRecipe,
    compute_recipe,
    merge_files,
    merge_state_dicts,
    recipe_name,
)

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
VAE_KEYS = ("first_stage_model.encoder.conv_in.weight", "first_stage_model.decoder.conv_out.bias")
TIGHT = {"rtol": 1e-6, "atol": 1e-7}


def ldm_state_dict(seed: int, in_channels: int = 4) -> dict[str, torch.Tensor]:
    """A few tensors named as in an SD1.x checkpoint, random but seeded."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        CONV_IN: r(8, in_channels, 3, 3),
        "model.diffusion_model.input_blocks.0.0.bias": r(8),
        "model.diffusion_model.out.2.weight": r(4, 8, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": r(16, 8),
        POSITION_IDS: torch.arange(6)[None] + seed,
        VAE_KEYS[0]: r(8, 3, 3, 3),
        VAE_KEYS[1]: r(3),
        "alphas_cumprod": r(10).abs(),  # no "model" in the name: always A's
    }


def merged_keys(sd: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in sd if "model" in k and k != POSITION_IDS]


@pytest.fixture
def sds() -> list[dict[str, torch.Tensor]]:
    return [ldm_state_dict(seed) for seed in (1, 2, 3)]


@pytest.fixture
def files(tmp_path: Path, sds) -> list[Path]:
    paths = [tmp_path / f"{name}.safetensors" for name in "abc"]
    for path, sd in zip(paths, sds, strict=True):
        save_file(sd, str(path), metadata={"note": path.stem})
    return paths


def test_weighted_sum_is_the_formula(sds):
    a, b, _ = sds
    out = merge_state_dicts(MergeRecipe("weighted-sum", ("a", "b"), 0.3), [a, b])
    assert list(out) == list(a)
    for key in merged_keys(a):
        torch.testing.assert_close(out[key], a[key] * (1 - 0.3) + b[key] * 0.3, **TIGHT)
    assert torch.equal(out[POSITION_IDS], a[POSITION_IDS])
    assert torch.equal(out["alphas_cumprod"], a["alphas_cumprod"])


def test_add_difference_is_the_formula(sds):
    a, b, c = sds
    out = merge_state_dicts(MergeRecipe("add-difference", ("a", "b", "c"), 0.7), [a, b, c])
    for key in merged_keys(a):
        torch.testing.assert_close(out[key], a[key] + (b[key] - c[key]) * 0.7, **TIGHT)
    assert torch.equal(out[POSITION_IDS], a[POSITION_IDS])


def test_fp16_output_is_the_float32_result_cast_at_the_end(sds):
    a, b, c = ({k: v.half() if v.is_floating_point() else v for k, v in sd.items()} for sd in sds)
    out = merge_state_dicts(MergeRecipe("add-difference", ("a", "b", "c"), 0.4, dtype="float16"), [a, b, c])
    for key in merged_keys(a):
        want = (a[key].float() + (b[key].float() - c[key].float()) * 0.4).half()
        assert out[key].dtype == torch.float16 and torch.equal(out[key], want)
    assert out[POSITION_IDS].dtype == torch.int64
    kept = merge_state_dicts(MergeRecipe("weighted-sum", ("a", "b"), 0.5), [a, b])
    assert all(t.dtype == a[k].dtype for k, t in kept.items())


@pytest.mark.parametrize("method", ["weighted-sum", "add-difference"])
def test_alpha_zero_gives_a(sds, method):
    n = 2 if method == "weighted-sum" else 3
    out = merge_state_dicts(MergeRecipe(method, ("a", "b", "c")[:n], 0), sds[:n])
    assert all(torch.equal(out[k], sds[0][k]) for k in sds[0])


def test_alpha_one_weighted_sum_gives_b(sds):
    a, b, _ = sds
    out = merge_state_dicts(MergeRecipe("weighted-sum", ("a", "b"), 1.0), [a, b])
    assert all(torch.equal(out[k], b[k]) for k in merged_keys(a))


def test_key_sets_follow_a(sds):
    a, b, c = sds
    a["model.only_in_a"] = torch.ones(2)
    b["model.only_in_b"] = torch.ones(2)
    del c["model.diffusion_model.out.2.weight"]
    out = merge_state_dicts(MergeRecipe("add-difference", ("a", "b", "c"), 0.5), [a, b, c])
    assert list(out) == list(a)
    assert torch.equal(out["model.only_in_a"], a["model.only_in_a"])
    assert torch.equal(out["model.diffusion_model.out.2.weight"], a["model.diffusion_model.out.2.weight"])


@pytest.mark.parametrize("channels", [9, 8])
def test_inpaint_model_merges_only_the_shared_channels(sds, channels):
    a = ldm_state_dict(5, in_channels=channels)
    b = sds[1]
    out = merge_state_dicts(MergeRecipe("weighted-sum", ("a", "b"), 0.25), [a, b])
    assert out[CONV_IN].shape == (8, channels, 3, 3)
    torch.testing.assert_close(out[CONV_IN][:, :4], a[CONV_IN][:, :4] * 0.75 + b[CONV_IN] * 0.25, **TIGHT)
    assert torch.equal(out[CONV_IN][:, 4:], a[CONV_IN][:, 4:])
    with pytest.raises(ModelError, match="must be model A"):
        merge_state_dicts(MergeRecipe("weighted-sum", ("b", "a"), 0.25), [b, a])


def test_other_shape_mismatch_names_the_key(sds):
    a, b, _ = sds
    b["model.diffusion_model.out.2.weight"] = torch.zeros(4, 16, 3, 3)
    with pytest.raises(ModelError, match=r"model\.diffusion_model\.out\.2\.weight"):
        merge_state_dicts(MergeRecipe("weighted-sum", ("a", "b"), 0.5), [a, b])


def test_discard_drops_matching_keys_and_progress_counts_all(sds):
    a, b, _ = sds
    seen: list[tuple[int, int]] = []
    out = merge_state_dicts(MergeRecipe("weighted-sum", ("a", "b"), 0.5, discard=r"^first_stage_model\."),
                            [a, b], progress=lambda done, total: seen.append((done, total)))
    assert set(out) == set(a) - set(VAE_KEYS)
    assert seen[-1] == (len(a), len(a)) and len(seen) == len(a)


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_baked_vae_replaces_exactly_the_vae_keys(tmp_path, files, prefix):
    vae = {prefix + k.removeprefix("first_stage_model."): torch.full_like(v, 7.0)
           for k, v in ldm_state_dict(9).items() if k in VAE_KEYS}
    vae["loss.logvar"] = torch.zeros(())
    vae[prefix + "encoder.not_in_model"] = torch.zeros(2)
    save_file(vae, str(tmp_path / "my.vae.safetensors"))
    plain = MergeRecipe("weighted-sum", ("a.safetensors", "b.safetensors"), 0.5, base_dir=tmp_path)
    baked = MergeRecipe("weighted-sum", ("a.safetensors", "b.safetensors"), 0.5, vae="my.vae", base_dir=tmp_path)
    without, with_vae = merge_files(plain, None), merge_files(baked, None)
    assert list(with_vae) == list(without)
    for key in without:
        want = torch.full_like(without[key], 7.0) if key in VAE_KEYS else without[key]
        assert torch.equal(with_vae[key], want), key


def test_recipe_file_round_trips_and_compute_recipe_equals_merge_files(tmp_path, files):
    recipe = MergeRecipe("add-difference", ("a.safetensors", "b", "c.safetensors"), 0.3, dtype="float16",
                         discard="alphas")
    path = recipe.write(tmp_path / "mix.merge.json")
    assert recipe_name(path) == "mix"
    assert json.loads(path.read_text())["models"] == ["a.safetensors", "b", "c.safetensors"]
    again = MergeRecipe.read(path)
    assert again == recipe and again.base_dir == tmp_path
    computed = compute_recipe(path)
    written = merge_files(again, tmp_path / "out" / "mix.safetensors")
    from_disk = read_state_dict(tmp_path / "out" / "mix.safetensors")
    assert list(computed) == list(written) and "alphas_cumprod" not in computed
    assert all(torch.equal(computed[k], written[k]) and torch.equal(written[k], from_disk[k]) for k in computed)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mix.safetensors"]  # no temp file left


def test_output_metadata_records_the_recipe(tmp_path, files):
    recipe = MergeRecipe("add-difference", ("a", "b", "c"), 0.3, base_dir=tmp_path)
    out = tmp_path / "merged.safetensors"
    merge_files(recipe, out)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    a1111 = json.loads(meta["sd_merge_recipe"])
    assert a1111["interp_method"] == "Add difference" and a1111["multiplier"] == 0.3
    assert a1111["primary_model_hash"] == hashlib.sha256(files[0].read_bytes()).hexdigest()
    assert a1111["is_inpainting"] is False and a1111["bake_in_vae"] == "None"
    models = json.loads(meta["sd_merge_models"])
    assert sorted(m["name"] for m in models.values()) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    ours = json.loads(meta["sdstudio_merge_recipe"])
    assert ours == {"method": "add-difference", "models": ["a.safetensors", "b.safetensors", "c.safetensors"],
                    "alpha": 0.3}
    assert meta["format"] == "pt" and meta["note"] == "c"  # inputs' fields copied, C's last as in A1111


def test_refuses_to_write_over_an_input(files, tmp_path):
    recipe = MergeRecipe("weighted-sum", ("a", "b"), 0.5, base_dir=tmp_path)
    before = files[1].read_bytes()
    with pytest.raises(ModelError, match=r"refusing to write over b\.safetensors"):
        merge_files(recipe, files[1])
    assert files[1].read_bytes() == before


@pytest.mark.parametrize(("data", "message"), [
    ({"method": "sum", "models": ["a", "b"], "alpha": 0.5}, "weighted-sum' or 'add-difference"),
    ({"method": "weighted-sum", "models": ["a", "b", "c"], "alpha": 0.5}, "takes 2 models"),
    ({"method": "add-difference", "models": ["a", "b"], "alpha": 0.5}, "takes 3 models"),
    ({"method": "weighted-sum", "models": ["a", "b"], "alpha": "0.5"}, "alpha must be a number"),
    ({"method": "weighted-sum", "models": ["a", "b"], "alpha": True}, "alpha must be a number"),
    ({"method": "weighted-sum", "models": ["a", "b"]}, "needs alpha"),
    ({"method": "weighted-sum", "models": ["a", "b"], "alpha": 0.5, "alhpa": 1}, "unknown recipe field"),
    ({"method": "weighted-sum", "models": ["a", "b"], "alpha": 0.5, "dtype": "fp8"}, "dtype must be one of"),
    ({"method": "weighted-sum", "models": ["a", "b"], "alpha": 0.5, "discard": "("}, "not a valid regular"),
    ([1, 2], "JSON object"),
])
def test_bad_recipes_say_what_to_fix(tmp_path, data, message):
    path = tmp_path / "bad.merge.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match=message):
        MergeRecipe.read(path)


def test_missing_files_are_named(tmp_path, files):
    with pytest.raises(ModelError, match="recipe not found"):
        MergeRecipe.read(tmp_path / "nope.merge.json")
    (tmp_path / "broken.merge.json").write_text("{")
    with pytest.raises(ModelError, match="cannot read merge recipe"):
        MergeRecipe.read(tmp_path / "broken.merge.json")
    with pytest.raises(ModelError, match="model B 'missing' not found"):
        merge_files(MergeRecipe("weighted-sum", ("a", "missing"), 0.5, base_dir=tmp_path), None)
    with pytest.raises(ModelError, match=r"<name>\.merge\.json"):
        MergeRecipe("weighted-sum", ("a", "b"), 0.5).write(tmp_path / "recipe.json")


class CreatesFile:
    """A pickle payload that creates a file when unpickled."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_ckpt_is_refused_unrun(tmp_path, writer):
    probe, target = tmp_path / "probe", tmp_path / "pwned"
    pickle.loads(pickle.dumps(CreatesFile(probe))).close()
    assert probe.exists()  # the payload is real
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {CONV_IN: torch.zeros(1)}, "x": CreatesFile(target)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ModelError, match=r"refused to load evil\.ckpt"):
        read_state_dict(path)
    assert not target.exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_ckpt_state_dict_is_unwrapped_and_merges_with_safetensors(tmp_path, sds, files, zip_format):
    old_layout = {k.replace("text_model.", ""): v for k, v in sds[1].items()}  # pre-2022 CLIP key names
    torch.save({"state_dict": old_layout, "global_step": 1000}, tmp_path / "b2.ckpt",
               _use_new_zipfile_serialization=zip_format)
    loaded = read_state_dict(tmp_path / "b2.ckpt")
    assert list(loaded) == list(sds[1]) and all(torch.equal(loaded[k], sds[1][k]) for k in loaded)
    out = merge_files(MergeRecipe("weighted-sum", ("a", "b2.ckpt"), 0.5, base_dir=tmp_path), None)
    reference = merge_state_dicts(MergeRecipe("weighted-sum", ("a", "b"), 0.5), sds[:2])
    assert all(torch.equal(out[k], reference[k]) for k in reference)


def test_writing_to_a_loaded_zip_ckpt_leaves_the_file_unchanged(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {CONV_IN: torch.ones(4)}}, path)
    loaded = read_state_dict(path)
    loaded[CONV_IN].add_(1)  # a private mapping: writing to it must not change the file
    assert torch.equal(read_state_dict(path)[CONV_IN], torch.ones(4))
