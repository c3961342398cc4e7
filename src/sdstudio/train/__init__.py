"""Training: the procedural shapes dataset, a VAE trainer and an SD (UNet + text encoder) trainer."""
