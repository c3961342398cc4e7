"""Models: find, recognise, hash and load Stable Diffusion checkpoints."""
