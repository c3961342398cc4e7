"""A1111's interrupt and skip in the engine: the current image ends as the model's current estimate."""

from __future__ import annotations

import pytest

from sdstudio import GenerationRequest
from sdstudio.engine.hooks import CancelToken
from sdstudio.errors import Cancelled


@pytest.mark.parametrize(("how", "images"), [("interrupt", 1), ("skip", 2)])
def test_interrupt_keeps_the_current_image_and_skip_goes_on(engine, how, images):
    token = CancelToken()

    def on_step(event):
        if event.iteration == 0 and event.step == 3:
            getattr(token, how)()

    req = GenerationRequest(prompt="a red circle", steps=8, seed=1, n_iter=2)
    result = engine.generate(req, progress=on_step, cancel=token)
    assert len(result.images) == images
    full = engine.generate(req)
    assert not result.latents[0].equal(full.latents[0])  # stopped at step 3 of 8
    if how == "skip":
        assert result.latents[1].equal(full.latents[1])  # the next batch ran in full


def test_cancel_gives_no_result(engine):
    token = CancelToken()
    with pytest.raises(Cancelled):
        engine.generate(GenerationRequest(prompt="x", steps=8), progress=lambda e: token.cancel(), cancel=token)
