"""The command-line door (typer): each sub-command turns its options into a request and calls the engine."""
