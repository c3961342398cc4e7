"""The flow-matching families (SD3/SD3.5, Flux.1): their runner, prompt encoding, latents and the one flow loop."""
