"""The catalog: our folders, an A1111 and a ComfyUI install, the HF cache; names, hashes, close matches."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from sdstudio.errors import ModelError
from sdstudio.models.find import catalog
from sdstudio.models.find.hashing import HashCache, sha256_file
from sdstudio.models.find.inventory import describe
from sdstudio.models.tools.convert import write_single_file
from sdstudio.testing.tiny import build_tiny
from tests.conftest import make_settings
from tests.test_cli import run


@pytest.fixture(scope="module")
def installs(tmp_path_factory, tiny_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("installs")
    ours = root / "home" / "models"
    shutil.copytree(tiny_model, ours / "mine")
    a1111 = root / "webui" / "models" / "Stable-diffusion"
    (a1111 / "XL").mkdir(parents=True)
    xl = build_tiny("sdxl", root / "build-xl", seed=2)
    write_single_file(xl, a1111 / "XL" / "juggernaut.safetensors")
    comfy = root / "comfy" / "models" / "checkpoints"
    comfy.mkdir(parents=True)
    write_single_file(build_tiny("sd2-v", root / "build-v", seed=3), comfy / "sd21.safetensors")
    snapshot = root / "hf" / "models--org--tiny-sd" / "snapshots" / "abc123"
    shutil.copytree(tiny_model, snapshot)
    settings = make_settings(root / "home", ours)
    return {"settings": replace(settings, a1111_dir=root / "webui", comfyui_dir=root / "comfy",
                                hf_cache=root / "hf"), "root": root}


def refs(settings):
    return {r.name: r for r in catalog.scan(catalog.model_folders(settings))}


def test_scan_finds_every_install(installs):
    found = refs(installs["settings"])
    assert {"mine", "juggernaut", "sd21", "org/tiny-sd"} <= set(found)
    assert found["juggernaut"].source == "a1111" and found["sd21"].source == "comfyui"
    assert found["org/tiny-sd"].source == "hf-cache" and found["mine"].kind == "diffusers"


def test_describe_shows_family_hash_and_size(installs):
    found = refs(installs["settings"])
    hashes = HashCache(installs["root"] / "hashes.json")
    info = describe(found["juggernaut"], hashes)
    assert info.family == "sdxl" and info.size == found["juggernaut"].path.stat().st_size
    assert info.hash == sha256_file(found["juggernaut"].path)[:10]
    assert describe(found["sd21"], None).family == "sd2-v" and describe(found["mine"], None).family == "sd1"


def test_hashes_are_computed_once(installs, monkeypatch):
    path = refs(installs["settings"])["sd21"].path
    cache_file = installs["root"] / "hashes2.json"
    first = HashCache(cache_file).file_sha256(path)
    calls = []
    monkeypatch.setattr("sdstudio.models.find.hashing.sha256_file", lambda p: calls.append(p) or "x")
    assert HashCache(cache_file).file_sha256(path) == first and calls == []


def test_choose_by_name_title_hash_or_path(installs):
    folders = catalog.model_folders(installs["settings"])
    path = refs(installs["settings"])["juggernaut"].path
    digest = sha256_file(path)
    known = {str(path.resolve()): digest}
    assert catalog.resolve("juggernaut", folders).path == path
    assert catalog.resolve("Juggernaut.safetensors", folders).path == path
    assert catalog.resolve(f"juggernaut [{digest[:10]}]", folders, known).path == path
    assert catalog.resolve(digest[:10], folders, known).path == path
    assert catalog.resolve(str(path), folders).path == path


def test_unknown_model_lists_close_matches(installs):
    with pytest.raises(ModelError, match="Did you mean: juggernaut"):
        catalog.resolve("jugernaut", catalog.model_folders(installs["settings"]))


def test_cli_models_list_convert_and_merge(installs, tmp_path):
    root = installs["root"]
    env = {"SDSTUDIO_A1111": str(root / "webui"), "SDSTUDIO_COMFYUI": str(root / "comfy"),
           "HF_HUB_CACHE": str(root / "hf")}
    mine = root / "home" / "models" / "mine"
    single = tmp_path / "mine.safetensors"
    out = run(["models", "convert", str(mine), str(single), "--half"], tmp_path, root / "home", extra_env=env)
    assert out.returncode == 0, out.stderr
    back = tmp_path / "back"
    out = run(["models", "convert", str(single), str(back), "--config", str(mine)], tmp_path, root / "home")
    assert out.returncode == 0, out.stderr
    assert (back / "model_index.json").is_file() and (back / "unet" / "config.json").is_file()
    again = run(["models", "convert", str(mine), str(single)], tmp_path, root / "home")
    assert again.returncode == 2 and "already exists" in again.stderr
    recipe = root / "home" / "models" / "blend.merge.json"
    out = run(["models", "merge", str(single), str(single), "--alpha", "0.5", "-o", str(recipe), "--recipe"],
              tmp_path, root / "home")
    assert out.returncode == 0, out.stderr
    out = run(["models", "list", "--json"], tmp_path, root / "home", extra_env=env)
    assert out.returncode == 0, out.stderr
    listed = {m["name"]: m for m in json.loads(out.stdout)}
    assert listed["juggernaut"]["family"] == "sdxl" and len(listed["juggernaut"]["hash"]) == 10
    assert listed["sd21"]["source"] == "comfyui" and listed["blend"]["family"] == "merge recipe"
    assert "demo" in listed


def test_the_hash_cache_takes_threads_at_once(tmp_path):
    """The server hashes from request threads and its worker together (a Ray server: on every submit)."""
    import threading

    files = []
    for i in range(24):
        files.append(tmp_path / f"w{i}.safetensors")
        files[-1].write_bytes(bytes([i]) * 100_000)
    cache, errors = HashCache(tmp_path / "hashes.json"), []

    def hash_all(part):
        try:
            for path in part:
                cache.file_sha256(path)
                cache.known()
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=hash_all, args=(files[i::3],)) for i in range(3)]
    threads.append(threading.Thread(target=hash_all, args=(files,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(HashCache(tmp_path / "hashes.json").known()) == len(files)


def test_a_models_own_tiny_vae_leaves_its_hash_as_it_was(tmp_path):
    """The hash in an image's infotext names what made the image; a preview decoder added later does not."""
    from sdstudio.settings import PACKAGED_MODELS

    demo = tmp_path / "demo"
    shutil.copytree(PACKAGED_MODELS / "demo", demo, ignore=shutil.ignore_patterns("taesd"))
    before = HashCache(None).model_sha256(demo)
    shutil.copytree(PACKAGED_MODELS / "demo" / "taesd", demo / "taesd")
    assert HashCache(None).model_sha256(demo) == before
    assert before.startswith("680d0f8ba4")  # the demo's hash in every image made before it had a taesd/
