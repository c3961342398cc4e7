"""The Python API: settings, a request, images with metadata, progress and cancellation."""

from __future__ import annotations

import pytest
from PIL import Image

from sdstudio import Cancelled, CancelToken, GenerationRequest, ProgressEvent


def test_progress_events_cover_every_step_with_previews(engine):
    events: list[ProgressEvent] = []
    engine.generate(GenerationRequest(prompt="a circle", steps=4, seed=1, n_iter=2), progress=events.append)
    assert [(e.iteration, e.step, e.steps) for e in events] == [(i, s, 4) for i in range(2) for s in range(1, 5)]
    assert events[-1].fraction == 1.0
    preview = events[0].preview()
    assert isinstance(preview, Image.Image) and preview.size == (8, 8)


def test_cancel_token_stops_the_job(engine):
    token = CancelToken()
    seen = []

    def on_progress(event: ProgressEvent) -> None:
        seen.append(event.step)
        if event.step == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        engine.generate(GenerationRequest(prompt="a circle", steps=10, seed=1), progress=on_progress, cancel=token)
    assert seen == [1, 2]
