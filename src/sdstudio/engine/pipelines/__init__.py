"""Families that do not fit the one loop, run through diffusers pipelines behind our request and result
types: Kandinsky 2.2 (kandinsky.py) and the upscalers (upscale.py: resamplers and latent modes; x4.py: the SD x4
upscaler model)."""
