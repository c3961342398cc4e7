"""Single-file checkpoints: offline loading equals the folder, family detection, unsafe pickles refused."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdstudio import Engine, GenerationRequest
from sdstudio.errors import ModelError
from sdstudio.models.find.catalog import ModelRef
from sdstudio.models.find.hashing import HashCache
from sdstudio.models.load.configs import config_dir
from sdstudio.models.load.families import detect_family
from sdstudio.models.load.ldm_layout import ldm_layout
from sdstudio.models.load.loader import ModelManager, load_model
from sdstudio.models.load.parts import LoadOptions
from sdstudio.models.tools.convert import from_ldm, meta_model, to_ldm, write_single_file
from sdstudio.testing.tiny import FAMILIES, build_tiny
from tests.conftest import make_settings

BUNDLED = ("sd1", "sd1-inpaint", "sd2", "sd2-v", "sdxl", "sdxl-refiner", "sdxl-inpaint")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (diffusers folder, the same model as one original-layout .safetensors)."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for i, family in enumerate(FAMILIES):
        folder = build_tiny(family, root / family, seed=i)
        out[family] = (folder, write_single_file(folder, root / f"{family}.safetensors"))
    return out


def load(path: Path, config: Path | None = None, **kw):
    return load_model(ModelRef(path.stem, path), LoadOptions(config=config, **kw), HashCache(None))


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_loads_the_same_weights_as_the_folder(tiny, family):
    folder, file = tiny[family]
    a, b = load(folder), load(file, config=folder)
    assert a.family == b.family == family
    for name in ("unet", "vae"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for ea, eb in zip(a.text.encoders, b.text.encoders, strict=True):
        assert type(ea) is type(eb)
        assert all(torch.equal(x, y) for x, y in zip(ea.state_dict().values(), eb.state_dict().values(), strict=True))
    assert a.scheduler_config["prediction_type"] == b.scheduler_config["prediction_type"]


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
def test_single_file_generates_exactly_the_folder_image(tmp_path, tiny, family):
    folder, file = tiny[family]
    req = GenerationRequest(prompt="a red circle", steps=3, seed=5, sampler="Euler a", width=64, height=64)
    settings = make_settings(tmp_path, folder.parent)
    from_folder = Engine(settings).generate(req.replace(model=str(folder)))
    manager = ModelManager(LoadOptions(config=folder), HashCache(None))
    from_file = Engine(settings, models=manager).generate(req.replace(model=str(file)))
    assert torch.equal(from_folder.latents, from_file.latents)
    assert from_file.images[0].record["model"]["family"] == family


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_detected_from_keys_and_shapes(tiny, family):
    folder, _ = tiny[family]
    model = load(folder)
    parts = {"unet": model.unet, "vae": model.vae}
    names = [n for n in ldm_layout(family) if n.startswith("text_encoder")]
    parts |= dict(zip(names, model.text.encoders, strict=True))
    state_dict = to_ldm({k: m.state_dict() for k, m in parts.items()}, family)
    assert detect_family(state_dict, v_prediction={"sd2": False, "sd2-v": True}.get(family)) == family


@pytest.mark.parametrize("family", BUNDLED)
def test_bundled_configs_detect_and_load_at_full_size(family):
    """Full-size architectures on the meta device: an export in LDM layout is detected as its family
    and converts back onto the bundled config's models key for key and shape for shape."""
    root = config_dir(family)
    layout = ldm_layout(family)
    configs = {n: json.loads((root / n / "config.json").read_text()) for n in layout if (root / n).is_dir()}
    models = {n: meta_model(layout[n], c) for n, c in configs.items()}
    state_dict = to_ldm({n: m.state_dict() for n, m in models.items()}, family)
    v = {"sd2": False, "sd2-v": True}.get(family)
    assert detect_family(state_dict, v_prediction=v) == family
    assert detect_family({k: v for k, v in state_dict.items() if k.startswith("model.")},
                         v_prediction=v) == family  # UNet-only files: from the cross-attention width
    converted = from_ldm(state_dict, family, configs)
    for name, model in models.items():
        expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        got = {k: v.shape for k, v in converted[name].items()}
        assert got == expected, name


def test_a_lora_or_vae_given_as_a_model_says_what_it_is():
    with pytest.raises(ModelError, match="LoRA"):
        detect_family({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(1)})
    with pytest.raises(ModelError, match="VAE"):
        detect_family({"encoder.down.0.block.0.conv1.weight": torch.zeros(1)})


class Payload:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_malicious_ckpt_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    ckpt = tmp_path / "evil.ckpt"
    with ckpt.open("wb") as f:
        pickle.dump({"state_dict": {"model.diffusion_model.x": Payload(marker)}}, f)
    pickle.loads(pickle.dumps(Payload(tmp_path / "control")))  # the payload is real: plain pickle runs it
    assert (tmp_path / "control").exists()
    engine = Engine(make_settings(tmp_path, tmp_path))
    with pytest.raises(ModelError, match=r"refused to load evil\.ckpt.*not executed"):
        engine.generate(GenerationRequest(prompt="x", model=str(ckpt), steps=1))
    assert not marker.exists()


def test_a_safe_ckpt_loads(tmp_path, tiny):
    folder, file = tiny["sd1"]
    from safetensors.torch import load_file

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(file), "global_step": 1}, ckpt)
    model = load(ckpt, config=folder)
    assert model.family == "sd1"


def test_missing_weights_are_an_error_not_random_init(tmp_path, tiny):
    from safetensors.torch import load_file

    _, file = tiny["sd1"]
    state_dict = load_file(file)
    del state_dict["model.diffusion_model.out.2.weight"]
    broken = tmp_path / "broken.safetensors"
    save_file(state_dict, broken)
    with pytest.raises(ModelError, match=r"out\.2\.weight|conv_out"):
        load(broken, config=tiny["sd1"][0])
