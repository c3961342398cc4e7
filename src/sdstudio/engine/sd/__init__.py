"""The Stable Diffusion family (SD1.x, SD2.x, SDXL): the one denoising loop and every input it takes.

loop.py is the loop; stages.py the steps around it; job.py runs a prepared request through it batch by batch.
Mode inputs: inpaint.py, canvas.py (masks, crops, paste-back), control.py + preprocess.py (ControlNet),
variation.py (seeds), handoff.py (latent handoff), hires.py + hires_job.py (hires fix). Per-step extras:
capture.py, preview.py. addons.py: the LoRAs and embeddings a prompt names."""
