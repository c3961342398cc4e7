"""The model manager's LRU and memory budget, offload placement, and VAE tiling for large images."""

from __future__ import annotations

import shutil
from dataclasses import replace

import torch

from sdstudio import Engine, GenerationRequest
from sdstudio.models.find.catalog import ModelRef
from sdstudio.models.find.hashing import HashCache
from sdstudio.models.load.loader import ModelManager
from sdstudio.models.load.memory import module_bytes
from sdstudio.models.load.parts import LoadOptions
from sdstudio.testing.tiny import tiny_vae
from tests.conftest import make_settings


def test_lru_capacity_and_budget(tmp_path, tiny_model):
    for name in ("a", "b", "c"):
        shutil.copytree(tiny_model, tmp_path / name)
    refs = [ModelRef(n, tmp_path / n) for n in ("a", "b", "c")]
    roomy = ModelManager(LoadOptions(), HashCache(None), capacity=2)
    first = roomy.get(refs[0])
    roomy.get(refs[1])
    assert roomy.get(refs[0]) is first  # a hit, and now the most recent
    roomy.get(refs[2])  # evicts b, the least recently used
    assert [m.name for m in roomy.loaded] == ["a", "c"]
    one_model = roomy.bytes_used() // 2
    tight = ModelManager(LoadOptions(), HashCache(None), capacity=3, budget_bytes=int(one_model * 1.5))
    tight.get(refs[0])
    tight.get(refs[1])
    assert [m.name for m in tight.loaded] == ["b"] and tight.bytes_used() == one_model


def test_module_bytes_counts_parameter_storage():
    vae = tiny_vae()
    assert module_bytes([vae]) == sum(p.numel() * 4 for p in vae.parameters())
    assert module_bytes([vae.half()]) == sum(p.numel() * 2 for p in vae.parameters())


def test_large_images_decode_with_tiles(tmp_path, tiny_model):
    settings = make_settings(tmp_path, tiny_model.parent, default_model=str(tiny_model))
    engine = Engine(settings)
    req = GenerationRequest(prompt="a circle", steps=2, sampler="Euler", seed=3, width=192, height=128)
    calls = []
    vae = engine.load().vae
    original = vae.tiled_decode
    vae.tiled_decode = lambda *a, **k: calls.append(1) or original(*a, **k)
    tiled = engine.generate(req)  # 192x128 > 4 x 64x64: auto tiles
    assert calls
    plain = Engine(replace(settings, vae_tiling="off"), models=engine.models).generate(req)
    assert len(calls) == 1  # "off" decodes in one piece
    assert torch.equal(tiled.latents, plain.latents)
    a = torch.tensor(list(tiled.images[0].image.getdata()), dtype=torch.float32)
    b = torch.tensor(list(plain.images[0].image.getdata()), dtype=torch.float32)
    assert (a - b).abs().mean() < 8  # tiles blend into nearly the same picture


def test_offload_modes_give_the_same_image(tmp_path, tiny_model):
    """The accelerate hooks run on the CPU too (where they save nothing): same pixels in every mode."""
    req = GenerationRequest(prompt="a circle", steps=3, sampler="Euler a", seed=4, width=64, height=64)
    results = {}
    for mode in ("none", "model", "sequential"):
        settings = replace(make_settings(tmp_path / mode, tiny_model.parent, default_model=str(tiny_model)),
                           offload=mode)
        engine = Engine(settings)
        results[mode] = engine.generate(req)
        assert engine.load().offload == mode
    for mode in ("model", "sequential"):
        assert torch.allclose(results[mode].latents, results["none"].latents, atol=1e-5)
