"""sdstudio: a Stable Diffusion studio with one engine behind four doors.

The Python API::

    from sdstudio import Engine, GenerationRequest, Settings

    engine = Engine(Settings.from_env())
    result = engine.generate(GenerationRequest(prompt="a red circle on a blue background", seed=1))
    result.images[0].save("out.png")   # the PNG with its A1111 infotext and sdstudio record
    result.save("outputs")             # every image, as the CLI lays them out

Names are imported on first use, so that `sdstudio --help` does not pay for importing torch.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sdstudio")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

_EXPORTS = {
    "Chain": "sdstudio.engine.workflows.chain",
    "Engine": "sdstudio.engine.engine",
    "CancelToken": "sdstudio.engine.hooks",
    "ProgressEvent": "sdstudio.engine.hooks",
    "GeneratedImage": "sdstudio.engine.requests",
    "GenerationRequest": "sdstudio.engine.requests",
    "GenerationResult": "sdstudio.engine.requests",
    "Cancelled": "sdstudio.errors",
    "ModelError": "sdstudio.errors",
    "RequestError": "sdstudio.errors",
    "SdStudioError": "sdstudio.errors",
    "Settings": "sdstudio.settings",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sdstudio' has no attribute {name!r}")
