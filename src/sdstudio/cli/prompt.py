"""`sdstudio prompt explain`: how a prompt is parsed, scheduled, weighted and cut into 77-token windows."""

from __future__ import annotations

from typing import Annotated

import typer

from sdstudio.cli.common import fail
from sdstudio.errors import SdStudioError

app = typer.Typer(no_args_is_help=True, help="Prompts: see how sdstudio reads them.")


@app.command()
def explain(prompt: Annotated[str, typer.Argument(help="A prompt in A1111 syntax.")],
            steps: Annotated[int, typer.Option(help="Sampling steps (prompt editing depends on them).")] = 20,
            negative: Annotated[bool, typer.Option(help="Read it as a negative prompt (no AND, no <lora:...>).")]
            = False) -> None:
    """Print the sub-prompts (AND), the schedule (prompt editing, alternation), the weights and the windows."""
    from sdstudio.models.load.configs import config_dir, load_tokenizer
    from sdstudio.prompts.encode import tokens_per_window
    from sdstudio.prompts.grammar import explain as explain_prompt
    from sdstudio.prompts.grammar import parse

    try:
        explanation = explain_prompt(parse(prompt, negative=negative), steps)
    except SdStudioError as e:
        fail(str(e))
    typer.echo(explanation.to_text())
    tokenizer = load_tokenizer(config_dir("sd1") / "tokenizer")
    for i, sub in enumerate(explanation.subprompts):
        for step in sub.steps:
            used = tokens_per_window(step.text, tokenizer)
            typer.echo(f"sub-prompt {i + 1}, steps ..{step.end_step}: {len(used)} window(s) of 75 tokens, "
                       f"tokens used {used}")
