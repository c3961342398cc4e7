"""Add-ons applied to a loaded model for one request: LoRA (files, keys, merge plan) and
textual-inversion embeddings."""
