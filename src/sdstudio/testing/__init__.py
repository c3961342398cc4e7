"""Helpers for tests and benchmarks: tiny seeded Stable Diffusion components, no downloads."""
