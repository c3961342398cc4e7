"""Loading models offline: diffusers folders and single files, the bundled architecture configs and
tokenizer, family detection, VAE and ControlNet choice, memory placement and speed settings."""
