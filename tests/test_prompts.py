"""The prompt language in the engine: long prompts, BREAK, weights, prompt editing, AND, compel, explain."""

from __future__ import annotations

import pytest
import torch

from sdstudio import GenerationRequest
from sdstudio.engine.sd.loop import Plan, denoise
from sdstudio.errors import RequestError
from sdstudio.prompts.conditioning import GuidedConditioning, StaticCond, TextConditioning
from sdstudio.prompts.encode import PromptEncoder, emphasis

REQ = GenerationRequest(prompt="a red circle", steps=4, sampler="Euler", seed=3, width=64, height=64)


def encoder(engine, syntax="a1111"):
    return PromptEncoder(engine.load().text, syntax=syntax)


def test_weight_one_is_unweighted_and_emphasis_restores_the_mean():
    z = torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(0)) + 0.3
    assert torch.equal(emphasis(z, [1.0] * 77), z)
    weights = [1.0] * 77
    weights[3] = 1.5
    out = emphasis(z, weights)
    assert torch.allclose(out.mean(), z.mean(), atol=1e-6)
    scale = out[0, 0] / z[0, 0]  # every token rescaled by the same factor, token 3 by 1.5 more
    assert torch.allclose(out[0, 3], z[0, 3] * 1.5 * scale[0], atol=1e-5)


def test_weighted_words_change_the_encoding(engine):
    enc = encoder(engine)
    plain, weighted = enc("a red circle").embeds, enc("a (red:1.5) circle").embeds
    assert plain.shape == weighted.shape == (1, 77, 32)
    assert not torch.allclose(plain, weighted)
    assert torch.allclose(enc("a (red:1.0) circle").embeds, plain)


def test_long_prompts_are_windows_and_their_end_matters(engine):
    """The tiny tokenizer is byte-level: one token per character (spaces are word ends)."""
    head = "a small red circle, " * 9  # 16 tokens each
    long_a, long_b = head + "on a blue sky", head + "on a green sea"
    enc = encoder(engine)
    tokens = len(engine.load().tokenizer(long_a, add_special_tokens=False).input_ids)
    assert tokens >= 150
    assert enc(long_a).embeds.shape[1] == 77 * 3
    a = engine.generate(REQ.replace(prompt=long_a))
    b = engine.generate(REQ.replace(prompt=long_b))
    assert not torch.equal(a.latents, b.latents)  # the last words count
    plain_a = engine.generate(REQ.replace(prompt=long_a, prompt_syntax="plain"))
    plain_b = engine.generate(REQ.replace(prompt=long_b, prompt_syntax="plain"))
    assert torch.equal(plain_a.latents, plain_b.latents)  # diffusers' behaviour: cut at 75 tokens
    assert a.images[0].record["request"]["prompt_syntax"] == "a1111"


def test_break_starts_a_new_window_and_the_negative_is_padded(engine):
    enc = encoder(engine)
    assert enc("a red circle BREAK on blue").embeds.shape[1] == 2 * 77
    result = engine.generate(REQ.replace(prompt="a red circle BREAK on blue", negative_prompt="green"))
    assert result.latents.shape == (1, 4, 8, 8)


def positive_contexts(engine, req) -> list[torch.Tensor]:
    """The positive rows of the UNet's cross-attention context at every step of `req`."""
    seen = []
    handle = engine.load().unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["encoder_hidden_states"][1:]), with_kwargs=True)
    try:
        engine.generate(req)
    finally:
        handle.remove()
    return seen


def test_prompt_editing_switches_at_the_a1111_step(engine):
    seen = positive_contexts(engine, REQ.replace(prompt="a [red:blue:0.5] circle", steps=10, cfg_scale=7))
    enc = encoder(engine)
    red, blue = enc("a red circle").embeds, enc("a blue circle").embeds
    used = ["red" if torch.allclose(s, red) else "blue" if torch.allclose(s, blue) else "?" for s in seen]
    assert used == ["red"] * 6 + ["blue"] * 4  # A1111: int(0.5 * 10) = 5, `from` while step <= 5


def test_alternation_alternates_every_step(engine):
    seen = positive_contexts(engine, REQ.replace(prompt="a [red|blue] circle", steps=5))
    enc = encoder(engine)
    red = enc("a red circle").embeds
    assert [torch.allclose(s, red) for s in seen] == [True, True, False, True, False]


class AddUNet(torch.nn.Module):
    """eps = mean of the context row: each branch's output tells which conditioning it saw."""

    def forward(self, x, t, encoder_hidden_states, return_dict=False):
        return (encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None].expand_as(x).clone(),)


class Identity:
    def scale_model_input(self, x, t):
        return x

    def step(self, out, t, x, return_dict=False):
        return (out,)


def test_and_combines_as_a1111_composable_diffusion():
    def cond(v):
        return TextConditioning(torch.full((1, 2, 3), v))

    guided = GuidedConditioning(cond(1.0), (cond(3.0), cond(7.0)), (1.0, 0.5))
    plan = Plan(torch.zeros(1, 4, 2, 2), torch.tensor([10]), StaticCond(guided), cfg_scale=2.0)
    out = denoise(AddUNet(), Identity(), plan)
    # u + s * sum_j w_j (c_j - u) = 1 + 2 * (1 * 2 + 0.5 * 6) = 11
    assert torch.allclose(out, torch.full_like(out, 11.0))


def test_and_in_a_prompt_runs_one_batch_with_every_part(engine):
    model = engine.load()
    sizes = []
    handle = model.unet.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    try:
        result = engine.generate(REQ.replace(prompt="a red circle AND a blue square :0.6", batch_size=2))
    finally:
        handle.remove()
    # negative + 2 parts in one UNet call: for both images at once, or image by image on CPU (engine/sd/rows.py)
    assert sizes == ([3] * 8 if model.per_image else [6] * 4)
    assert not torch.equal(result.latents, engine.generate(REQ.replace(batch_size=2)).latents)


def test_syntax_errors_point_at_the_column(engine):
    with pytest.raises(RequestError, match=r"\^"):
        engine.generate(REQ.replace(prompt="a (red:1.2.3) circle"))
    with pytest.raises(RequestError, match="prompt_syntax must be one of"):
        engine.generate(REQ.replace(prompt_syntax="sdxl"))


def test_compel_syntax_weights_words(engine):
    plain = engine.generate(REQ.replace(prompt="a red circle", prompt_syntax="compel"))
    up = engine.generate(REQ.replace(prompt="a red++ circle", prompt_syntax="compel"))
    assert not torch.equal(plain.latents, up.latents)
    assert up.images[0].record["request"]["prompt_syntax"] == "compel"


def test_prompt_explain_cli(tmp_path):
    from tests.test_cli import run

    proc = run(["prompt", "explain", "a (red:1.3) [cat:dog:0.5] BREAK sky", "--steps", "10"], tmp_path, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "'red'x1.3" in proc.stdout and "steps ..5" in proc.stdout and "2 window(s)" in proc.stdout
    bad = run(["prompt", "explain", "a (red:1.2.3)"], tmp_path, tmp_path)
    assert bad.returncode == 2 and "error:" in bad.stderr
