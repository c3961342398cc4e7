"""The engine: typed requests -> validation -> stages -> one denoising loop -> results."""
