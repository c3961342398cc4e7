"""Prompts: text to the conditioning tensors the UNet attends to."""
