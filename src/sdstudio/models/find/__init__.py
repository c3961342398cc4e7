"""Finding models: the catalog of folders (ours, A1111's, ComfyUI's, the Hugging Face cache), A1111's hashes,
and the inventory `sdstudio models list` shows."""
