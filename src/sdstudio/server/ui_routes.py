"""The web UI's door: the static single-page app at `/`, and outpainting as a queued job.

The UI (src/sdstudio/webui/) is plain HTML, CSS and ES modules: no build step, nothing fetched from
outside the server. It talks only to the public HTTP API, like any other client.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Header
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from sdstudio.engine.validate import check_types
from sdstudio.engine.workflows.outpaint import PREFILLS, Extension, outpaint_request
from sdstudio.errors import RequestError
from sdstudio.models.load.configs import config_dir, load_tokenizer
from sdstudio.prompts.encode import tokens_per_window
from sdstudio.prompts.grammar import explain, parse
from sdstudio.server.payload import encode_request
from sdstudio.server.state import ServerState, job_view

WEBUI = Path(__file__).resolve().parent.parent / "webui"


class TokensBody(BaseModel):
    prompt: str = Field(max_length=20_000)
    negative: bool = Field(default=False, description="read as a negative prompt (no AND, no <lora:...>)")


class OutpaintBody(BaseModel):
    """An image extended on some sides: the request's init_image is the picture to extend."""

    request: dict[str, Any] = Field(description="GenerationRequest fields; init_image is the picture to extend")
    left: int = Field(default=0, ge=0)
    right: int = Field(default=0, ge=0)
    up: int = Field(default=0, ge=0)
    down: int = Field(default=0, ge=0)
    prefill: str = Field(default="blur", description=f"one of {', '.join(PREFILLS)}")
    overlap: int = Field(default=8, ge=0, le=256)
    idempotency_key: str | None = Field(default=None, max_length=200)


def add_ui_routes(app: FastAPI, state: ServerState) -> None:

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEBUI / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.mount("/ui", StaticFiles(directory=WEBUI), name="webui")

    tokenizer = functools.cache(lambda: load_tokenizer(config_dir("sd1") / "tokenizer"))

    @app.post("/api/v1/tokens")
    def tokens(body: TokensBody) -> dict[str, Any]:
        """The prompt's tokens per 75-token window, as A1111's counter shows them (the longest AND part, at
        the first step); a syntax error is a 422 pointing at its column."""
        parsed = explain(parse(body.prompt, negative=body.negative), 1)
        windows = max((tokens_per_window(sub.steps[0].text, tokenizer()) for sub in parsed.subprompts if sub.steps),
                      key=len, default=[0])
        return {"windows": windows, "tokens": sum(windows), "capacity": 75 * len(windows)}

    @app.post("/api/v1/outpaint", status_code=202)
    def outpaint(body: OutpaintBody, idempotency_key: str | None = Header(default=None)) -> dict[str, Any]:
        """Queue an inpainting job that extends the init image: the canvas is pre-filled and masked here,
        so the stored job is a plain inpainting request (re-runnable as it is)."""
        base = state.decode(body.request)
        check_types(base)  # the fields are read before Engine.prepare sees them
        if base.init_image is None:
            raise RequestError("outpainting needs the picture to extend in request.init_image", "init_image")
        limit = state.settings.limits.max_pixels
        request = outpaint_request(base, base.init_image, Extension(body.left, body.right, body.up, body.down),
                                   body.prefill, body.overlap, limit=int(limit**0.5))
        prepared = state.engine.prepare(request)  # bad input: a 422 before anything is queued
        job = state.worker.submit(request.mode, encode_request(request), prepared,
                                  body.idempotency_key or idempotency_key)
        return job_view(job, state)
