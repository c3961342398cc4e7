"""Samplers and schedule types by the names users know (AUTOMATIC1111, k-diffusion, ComfyUI).

catalog.py: names -> a diffusers scheduler where diffusers has the (sampler, schedule) pair, else our
k-diffusion-style steps (ksteps.py) on A1111's sigma schedules (sigmas.py), behind the same scheduler
interface (kscheduler.py). Importing this package loads neither torch nor diffusers.
"""

from sdstudio.samplers.catalog import (
    AUTOMATIC,
    SAMPLERS,
    SCHEDULE_TYPES,
    SamplerChoice,
    SamplerSpec,
    resolve_sampler,
    sampler_names,
    split_legacy_name,
    zero_snr_samplers,
)

__all__ = ["AUTOMATIC", "SAMPLERS", "SCHEDULE_TYPES", "SamplerChoice", "SamplerSpec", "resolve_sampler",
           "sampler_names", "split_legacy_name", "zero_snr_samplers"]
