"""`sdstudio serve`: the HTTP server (native /api/v1 and AUTOMATIC1111's /sdapi/v1) on uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdstudio.cli.common import err, fail, quiet_libraries, settings_from


def serve(ctx: typer.Context,
          host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes it to the network.")]
          = "127.0.0.1",
          port: Annotated[int, typer.Option(help="Port (A1111's default).")] = 7860,
          api_auth: Annotated[str | None, typer.Option("--api-auth", help="user:pass[,user2:pass2]: HTTP Basic "
                                                                          "on every route.")] = None,
          data_dir: Annotated[Path | None, typer.Option(help="Job queue, history and images. "
                                                             "[default: ~/.sdstudio/server]")] = None) -> None:
    """Serve the HTTP API; jobs survive restarts (SQLite queue in the data folder)."""
    import uvicorn

    from sdstudio.errors import SdStudioError
    from sdstudio.server.app import create_app, parse_auth

    settings = settings_from(ctx.obj, None)
    quiet_libraries()
    try:
        app = create_app(settings, data_dir or settings.home / "server", auth=parse_auth(api_auth))
    except SdStudioError as e:
        fail(str(e))
    if host not in ("127.0.0.1", "localhost", "::1") and not api_auth:
        err.print("[yellow]warning:[/yellow] listening beyond this machine without --api-auth")
    uvicorn.run(app, host=host, port=port, log_level="warning")
