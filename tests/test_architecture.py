"""The layout keeps its promises (docs/architecture.md): imports point down, no import circle, small modules.

The import graph is read from the source (every import statement, deferred and TYPE_CHECKING ones included),
so a circle hidden inside a function still counts.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import sdstudio

PACKAGE = Path(sdstudio.__file__).resolve().parent

# package -> packages it must never import (DESIGN.md's layers; the doors are cli and server)
FORBIDDEN = {
    "sdstudio.engine": ("sdstudio.cli", "sdstudio.server"),
    "sdstudio.models": ("sdstudio.engine", "sdstudio.cli", "sdstudio.server", "sdstudio.a1111"),
    "sdstudio.prompts": ("sdstudio.engine", "sdstudio.cli", "sdstudio.server", "sdstudio.a1111"),
    "sdstudio.storage": ("sdstudio.engine", "sdstudio.cli", "sdstudio.server", "sdstudio.a1111"),
    "sdstudio.a1111": ("sdstudio.engine", "sdstudio.cli", "sdstudio.server", "fastapi", "torch"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """Every module `path` imports (sdstudio modules resolved to the module, others by top-level name)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                out.add(child if child in known else node.module)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: {m for m in imports(path, set(found)) if m in found and m != name} for name, path in found.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert circles(graph()) == []


def test_the_checker_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down(package):
    found = modules()
    wrong = {(name, imported) for name, path in found.items() if name.startswith(package)
             for imported in imports(path, set(found)) if imported.startswith(FORBIDDEN[package])}
    assert sorted(wrong) == []


def test_no_module_over_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}


def test_every_package_says_what_lives_there():
    missing = [name for name, path in modules().items() if path.name == "__init__.py" and not ast.get_docstring(
        ast.parse(path.read_text()))]
    assert missing == []


def test_the_sqlite_store_is_the_job_queue_the_server_needs():
    from sdstudio.storage.jobs import JobStore
    from sdstudio.storage.queue import JobQueue

    methods = [name for name, member in vars(JobQueue).items() if callable(member) and not name.startswith("_")]
    assert len(methods) >= 10
    for name in methods:
        assert inspect.signature(getattr(JobStore, name)) == inspect.signature(getattr(JobQueue, name)), name


def test_only_the_cluster_package_imports_ray():
    found = modules()
    users = {name for name, path in found.items() if any(m.split(".")[0] == "ray" for m in imports(path, set(found)))}
    assert users and all(name.startswith("sdstudio.server.cluster.") for name in users), users
    assert "sdstudio.server.cluster.options" not in users  # the CLI reads the options without Ray


def test_the_default_server_runs_jobs_without_importing_ray(tmp_path):
    """Without --workers ray nothing imports Ray (checked in a fresh interpreter: this one may have)."""
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        from fastapi.testclient import TestClient
        from sdstudio import Settings
        from sdstudio.server.app import create_app
        from sdstudio.settings import PACKAGED_MODELS
        from sdstudio.testing.live import wait_for_job
        home = Path(sys.argv[1])
        settings = Settings(home=home, outputs_dir=home / "out", models_dirs=(PACKAGED_MODELS,), default_model="demo")
        with TestClient(create_app(settings, home / "data")) as client:
            job = client.post("/api/v1/jobs", json={"request": {"prompt": "a red circle", "steps": 2}}).json()
            assert wait_for_job(client, job["id"])["status"] == "done"
        assert "ray" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=300)
