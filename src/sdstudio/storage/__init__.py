"""Storage: images on disk with their metadata (and, later, history and the job queue)."""
