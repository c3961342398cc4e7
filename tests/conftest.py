from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from sdstudio import Engine, Settings
from sdstudio.testing.tiny import build_tiny_sd


def pytest_configure(config: pytest.Config) -> None:
    """torch.compile's kernel cache (one folder per user in /tmp) is not keyed by the kernel family in use:
    code compiled under one ONEDNN/ATEN ISA setting, loaded under another, gives NaN or corrupts memory. Each
    test session compiles into its own folder."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdstudio-inductor-")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD1.x-layout models with random weights: one epsilon-, one v-prediction."""
    root = tmp_path_factory.mktemp("models")
    return {
        "epsilon": build_tiny_sd(root / "tiny-eps", seed=0),
        "v_prediction": build_tiny_sd(root / "tiny-v", seed=1, prediction_type="v_prediction"),
    }


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> Path:
    return tiny_models["epsilon"]


def make_settings(home: Path, models_dir: Path, default_model: str | None = None) -> Settings:
    return Settings(home=home, outputs_dir=home / "outputs", models_dirs=(models_dir,),
                    device=torch.device("cpu"), dtype=torch.float32, default_model=default_model)


@pytest.fixture(scope="session")
def engine(tmp_path_factory, tiny_model) -> Engine:
    home = tmp_path_factory.mktemp("home")
    return Engine(make_settings(home, tiny_model.parent, default_model=str(tiny_model)))


@pytest.fixture(scope="session")
def v_engine(tmp_path_factory, tiny_models) -> Engine:
    home = tmp_path_factory.mktemp("home-v")
    return Engine(make_settings(home, tiny_models["v_prediction"].parent, str(tiny_models["v_prediction"])))


def shapes_image(size: int = 64) -> Image.Image:
    """A red disc on a blue background."""
    im = Image.new("RGB", (size, size), (30, 60, 200))
    ImageDraw.Draw(im).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 30, 30))
    return im


@pytest.fixture
def init_image() -> Image.Image:
    return shapes_image()


@pytest.fixture(scope="session")
def flow_models(tmp_path_factory):
    from sdstudio.testing.tiny_flow import build_tiny_flux, build_tiny_sd3

    root = tmp_path_factory.mktemp("flow-models")
    build_tiny_sd3(root / "tiny-sd3", seed=3)
    build_tiny_sd3(root / "tiny-sd3-no-t5", seed=4, with_t5=False)
    build_tiny_flux(root / "tiny-flux-dev", seed=5)
    build_tiny_flux(root / "tiny-flux-schnell", seed=6, schnell=True)
    return root


@pytest.fixture(scope="session")
def flow_engine(tmp_path_factory, flow_models) -> Engine:
    return Engine(make_settings(tmp_path_factory.mktemp("flow-home"), flow_models))
