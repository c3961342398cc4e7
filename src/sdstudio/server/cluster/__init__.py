"""The server's worker on a Ray cluster (`sdstudio serve --workers ray`): EngineActors (one Engine each, one per
GPU or N on CPUs) run the jobs the head's durable queue hands out; the head saves every image. Only this package
imports Ray, and only when the server is started with it."""
