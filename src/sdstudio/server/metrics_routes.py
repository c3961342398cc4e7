"""Scale signals: the queue's depth as JSON (/api/v1/queue) and in Prometheus' text format (/metrics), with the
seconds each engine worker has been busy; an autoscaler or a dashboard reads them."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from sdstudio.server.state import ServerState

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def add_metrics_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/api/v1/queue")
    def queue() -> dict[str, Any]:
        """Jobs per status, and the engine workers with their busy seconds."""
        busy = state.worker.busy_seconds()
        return {"jobs": state.store.counts(), "workers": [{"name": n, "busy_seconds": s} for n, s in busy.items()]}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(state.store.counts(), state.worker.busy_seconds()),
                                 media_type=PROMETHEUS_TEXT)


def prometheus_text(counts: dict[str, int], busy: dict[str, float]) -> str:
    lines = ["# HELP sdstudio_jobs Jobs in the queue and history, by status.", "# TYPE sdstudio_jobs gauge"]
    lines += [f'sdstudio_jobs{{status="{status}"}} {n}' for status, n in counts.items()]
    lines += ["# HELP sdstudio_workers Engine workers running jobs.", "# TYPE sdstudio_workers gauge",
              f"sdstudio_workers {len(busy)}",
              "# HELP sdstudio_worker_busy_seconds_total Seconds an engine worker has spent on jobs.",
              "# TYPE sdstudio_worker_busy_seconds_total counter"]
    lines += [f'sdstudio_worker_busy_seconds_total{{worker="{name}"}} {seconds:.3f}' for name, seconds in busy.items()]
    return "\n".join(lines) + "\n"
