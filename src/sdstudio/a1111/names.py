"""A1111's names for our settings, each table written once: the index tables its API sends as numbers, and
the words its clients use for "the same as the first pass"."""

MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")  # inpainting_fill 0..3 ("Masked content")
IMG2IMG_RESIZE = ("just resize", "crop", "fill", "just resize")  # img2img resize_mode 0..3 (3: "latent upscale")
SAME_SAMPLER = ("", "use same sampler")
SAME_SCHEDULER = ("", "use same scheduler")
SAME_CHECKPOINT = ("", "use same checkpoint")
