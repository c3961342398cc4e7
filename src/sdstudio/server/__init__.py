"""The HTTP doors: the A1111-compatible /sdapi/v1 and the native /api/v1."""
