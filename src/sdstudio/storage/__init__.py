"""Storage: images on disk with their metadata (images.py), the job queue and history in SQLite (jobs.py)."""
