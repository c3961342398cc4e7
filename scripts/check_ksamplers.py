"""Prove our k-diffusion-style samplers (sdstudio.samplers.ksteps) equal k-diffusion's own, and store the
reference outputs tests/test_ksamplers.py checks against (tests/data/ksamplers.json).

k-diffusion (the library AUTOMATIC1111 runs) is not a dependency: it pulls wandb, torchvision and more. Install
it without its dependencies into the project's venv for this check only, then run:

    .venv/bin/pip install --no-deps k-diffusion==0.1.1.post1
    .venv/bin/python scripts/check_ksamplers.py            # prints max |ours - k-diffusion| per case
    .venv/bin/python scripts/check_ksamplers.py --write    # and rewrites tests/data/ksamplers.json

Only k_diffusion/sampling.py and utils.py are loaded (torchvision and torchdiffeq, which they import but the
samplers never call, are stubbed). The model is the exact denoiser of Gaussian data N(mu, s^2):
D(x; sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2); the step noise is one seeded CPU stream, handed to both.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers.schedulers.scheduling_dpmsolver_sde  # noqa: F401  (before the torchvision stub)

from sdstudio.samplers.ksteps import KSAMPLERS
from sdstudio.samplers.sigmas import SCHEDULES, DiscreteSigmas, schedule_sigmas
from sdstudio.testing.ksamplers import BETAS, MU, SHAPE, STD, STEPS, drive, gaussian_denoiser, noise_stream, start

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "ksamplers.json"
K_NAMES = {"dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}),
           "restart": ("sample_heun", {})}  # A1111's Restart is Heun under 20 steps (its own code, not k-diffusion's)


def k_sampler(k: types.ModuleType, sampler: str) -> Callable[..., Any]:
    """k-diffusion's function for our sampler, called as fn(model, x, sigmas, disable=True, **kwargs)."""
    if sampler == "dpm_fast":  # A1111 passes the schedule's ends, n = steps and its eta_ancestral (1)
        return lambda model, x, sigmas, **kw: k.sample_dpm_fast(model, x, sigmas[-2], sigmas[0], len(sigmas) - 1,
                                                                eta=1.0, **kw)
    k_name, extra = K_NAMES.get(sampler, (f"sample_{sampler}", {}))
    return functools.partial(getattr(k, k_name), **extra)


def load_k_diffusion() -> types.ModuleType:
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1.post1")
    root = Path(spec.submodule_search_locations[0])
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchdiffeq"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    sys.modules["torchdiffeq"].odeint = None
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(root)]
    sys.modules["k_diffusion"] = package
    for sub in ("utils", "sampling"):
        module_spec = importlib.util.spec_from_file_location(f"k_diffusion.{sub}", root / f"{sub}.py")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    return sys.modules["k_diffusion.sampling"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite tests/data/ksamplers.json")
    args = parser.parse_args()
    k = load_k_diffusion()
    from diffusers import EulerDiscreteScheduler

    table = DiscreteSigmas.from_alphas_cumprod(EulerDiscreteScheduler(**BETAS).alphas_cumprod)
    for name in ("karras", "exponential", "polyexponential"):
        ref = getattr(k, f"get_sigmas_{name}")(STEPS, table.sigma_min, table.sigma_max)
        ours = schedule_sigmas(name.capitalize(), STEPS, table)
        print(f"schedule {name:<16} max |diff| {float((ref - ours).abs().max()):.3g}")
    den = gaussian_denoiser(MU, STD)
    stored: dict[str, dict[str, list[float]]] = {}
    worst = 0.0
    for sampler, (run, _, _) in KSAMPLERS.items():
        k_fn = k_sampler(k, sampler)
        stored[sampler] = {}
        for schedule in SCHEDULES:
            sigmas = schedule_sigmas(schedule, STEPS, table)
            kwargs = {}
            if sampler == "dpm_fast" or "noise_sampler" in inspect.signature(k_fn).parameters:
                kwargs["noise_sampler"] = noise_stream()
            ref = k_fn(lambda x, s: den(x, s), start(sigmas), sigmas, disable=True, **kwargs)
            ours = drive(run, start(sigmas), sigmas, den, noise_stream())
            diff = float((ref - ours).abs().max())
            worst = max(worst, diff)
            print(f"{sampler:<20} {schedule:<17} max |ours - k-diffusion| {diff:.3g}")
            stored[sampler][schedule] = [round(v, 7) for v in ref.flatten().tolist()]
    print(f"worst: {worst:.3g} over {len(KSAMPLERS)} samplers x {len(SCHEDULES)} schedules, shape {SHAPE}")
    if args.write:
        OUT.write_text(json.dumps(stored, indent=0, sort_keys=True) + "\n")
        print(f"wrote {OUT.name}")


if __name__ == "__main__":
    main()
