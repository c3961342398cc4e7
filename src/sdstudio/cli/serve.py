"""`sdstudio serve`: the HTTP server (native /api/v1 and AUTOMATIC1111's /sdapi/v1) on uvicorn."""

from __future__ import annotations

import dataclasses
import importlib.util
import threading
import time
import webbrowser
from pathlib import Path
from typing import Annotated, Any

import typer

from sdstudio import __version__
from sdstudio.cli.common import err, fail, quiet_libraries, settings_from
from sdstudio.server.cluster.options import ClusterOptions
from sdstudio.settings import Limits, Settings


def serve(ctx: typer.Context,
          host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes it to the network.")]
          = "127.0.0.1",
          port: Annotated[int, typer.Option(help="Port (A1111's default).")] = 7860,
          api_auth: Annotated[str | None, typer.Option("--api-auth", help="user:pass[,user2:pass2]: HTTP Basic "
                                                                          "on every route.")] = None,
          data_dir: Annotated[Path | None, typer.Option(help="Job queue and history "
                                                             "(default: ~/.sdstudio/server).")] = None,
          outputs: Annotated[Path | None, typer.Option(help="Where images are saved, in A1111's "
                                                            "<mode>-images/<date>/ folders (default: ./outputs, as "
                                                            "the CLI's).")] = None,
          allow_folder: Annotated[list[Path] | None, typer.Option(
              "--allow-folder", help="Another folder of models requests may name (repeatable); requests name "
                                     "models, never paths.")] = None,
          allowed_host: Annotated[list[str] | None, typer.Option(
              "--allowed-host", help="A name clients reach this server by, besides the bind address and "
                                     "localhost (repeatable); guards against DNS rebinding.")] = None,
          allow_origin: Annotated[list[str] | None, typer.Option(
              "--allow-origin", help="A web page origin (https://host:port) that may change state here, "
                                     "besides this server's own pages (repeatable; * allows any).")] = None,
          limit: Annotated[list[str] | None, typer.Option(
              "--limit", help="name=value: a request limit (repeatable), e.g. max_work=1e8, max_images=16; "
                              "`sdstudio serve --limit list` shows them with their defaults.")] = None,
          workers: Annotated[str, typer.Option(help="thread: one worker thread owns this machine's device; ray: "
                                                    "engine workers on a Ray cluster (pip install 'sdstudio[ray]').")]
          = "thread",
          address: Annotated[str | None, typer.Option(help="With --workers ray: the cluster to join (auto: the one "
                                                           "`ray start` runs here; ray://host:10001); default: start "
                                                           "one on this machine.")] = None,
          gpus_per_worker: Annotated[float, typer.Option(help="With --workers ray: GPUs per engine worker (0.5 puts "
                                                              "two on one GPU).")] = 1.0,
          workers_per_node: Annotated[int, typer.Option(help="With --workers ray on nodes without GPUs: engine "
                                                             "workers per node.")] = 1,
          autoscale: Annotated[bool, typer.Option("--autoscale", help="With --workers ray: ask the Ray autoscaler "
                                                                      "for a worker per queued job.")] = False,
          quiet: Annotated[bool, typer.Option("--quiet", help="No start-up summary and no request log.")] = False,
          open_browser: Annotated[bool, typer.Option("--open", help="Open the web UI in the browser once the "
                                                                    "server is up.")] = False) -> None:
    """Serve the HTTP API; jobs survive restarts (SQLite queue in the data folder)."""
    import uvicorn

    from sdstudio.errors import SdStudioError
    from sdstudio.server.app import create_app, parse_auth
    from sdstudio.server.browser_guards import allowed_hosts_for

    settings = settings_from(ctx.obj, None)
    if limit and "list" in limit:
        for f in dataclasses.fields(settings.limits):
            typer.echo(f"{f.name}={getattr(settings.limits, f.name)}")
        return
    try:
        settings = dataclasses.replace(settings, limits=parse_limits(limit or [], settings.limits))
    except ValueError as e:
        fail(str(e))
    if allow_folder:
        settings = dataclasses.replace(settings, models_dirs=(*settings.models_dirs, *allow_folder))
    if outputs is not None:
        settings = dataclasses.replace(settings, outputs_dir=outputs)
    quiet_libraries()
    try:
        cluster = cluster_options(workers, address, gpus_per_worker, workers_per_node, autoscale)
        app = create_app(settings, data_dir or settings.home / "server", auth=parse_auth(api_auth),
                         allowed_hosts=allowed_hosts_for(host, allowed_host or []),
                         allowed_origins=tuple(allow_origin or ()), cluster=cluster)
    except (SdStudioError, ValueError) as e:
        fail(str(e))
    if host not in ("127.0.0.1", "localhost", "::1") and not api_auth:
        err.print("[yellow]warning:[/yellow] listening beyond this machine without --api-auth")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    if not quiet:
        typer.echo(start_summary(url, host, data_dir or settings.home / "server", settings, bool(api_auth), cluster))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning" if quiet else "info"))
    if open_browser:
        threading.Thread(target=open_when_up, args=(server, url), daemon=True).start()
    server.run()


def cluster_options(workers: str, address: str | None, gpus_per_worker: float, workers_per_node: int,
                    autoscale: bool) -> ClusterOptions | None:
    """None for the thread worker; ValueError saying what to change for a bad choice or a missing Ray."""
    if workers not in ("thread", "ray"):
        raise ValueError(f"--workers takes thread or ray, got {workers!r}")
    if workers == "thread":
        return None
    if importlib.util.find_spec("ray") is None:
        raise ValueError("--workers ray needs Ray: pip install 'sdstudio[ray]'")
    return ClusterOptions(address, gpus_per_worker, workers_per_node=workers_per_node, autoscale=autoscale)


def start_summary(url: str, host: str, data_dir: Path, settings: Settings, auth: bool,
                  cluster: ClusterOptions | None = None) -> str:
    """What a user needs to know before the first request: where to go, where things are kept."""
    lines = [f"sdstudio {__version__}: web UI {url}  (A1111 API {url}sdapi/v1, native {url}api/v1, docs {url}docs)"]
    if host in ("0.0.0.0", "::"):
        lines.append(f"  listening on every address, port {url.rsplit(':', 1)[1].rstrip('/')}")
    lines += [f"  images: {settings.outputs_dir.resolve()}   queue and history: {data_dir}",
              f"  models: {', '.join(str(p) for p in settings.models_dirs)}",
              f"  auth: {'on (--api-auth)' if auth else 'off'}; device {settings.device}; Ctrl+C stops"]
    if cluster is not None:
        lines.append(f"  jobs run on Ray ({cluster.address or 'a local instance'}); queue: {url}api/v1/queue, "
                     f"{url}metrics")
    return "\n".join(lines)


def open_when_up(server: Any, url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    if server.started:
        webbrowser.open(url)


def parse_limits(entries: list[str], limits: Limits) -> Limits:
    """`limits` with "name=value" entries applied; ValueError saying what is wrong."""
    fields = {f.name: f for f in dataclasses.fields(limits)}
    changes: dict[str, int | float] = {}
    for entry in entries:
        name, sep, text = entry.partition("=")
        if not sep or name.strip() not in fields:
            raise ValueError(f"--limit takes name=value with a name from: {', '.join(fields)}; got {entry!r}")
        kind = int if isinstance(getattr(limits, name.strip()), int) else float
        try:
            value = kind(float(text)) if kind is int else float(text)
        except ValueError:
            raise ValueError(f"--limit {name.strip()} takes a number, got {text!r}") from None
        if not value > 0:
            raise ValueError(f"--limit {name.strip()} must be above 0, got {text!r}")
        changes[name.strip()] = value
    return dataclasses.replace(limits, **changes)
