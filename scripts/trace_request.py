"""How much of sdstudio one request walks through: files entered by a txt2img call, checks per HTTP request.

Run from a checkout, on the CPU, with the bundled demo model (a temporary SDSTUDIO_HOME; nothing else is written):

    .venv/bin/python scripts/trace_request.py
    PYTHONPATH=/path/to/other/checkout/src .venv/bin/python scripts/trace_request.py   # measure another tree

1. txt2img: `Engine.generate(GenerationRequest(prompt="a red circle", steps=2, seed=1))` is run once to warm up,
   then a second identical call is traced with sys.setprofile. Only Python "call" events of frames whose code lies
   in the sdstudio package count. An *entry* is a call whose file differs from the file of the nearest sdstudio
   frame below it (the first call, from outside sdstudio, is an entry too); a *re-entry* is an entry into a file
   already entered earlier in the call. So files entered = entries - re-entries.
2. Checks per HTTP request: the real app (create_app, fastapi's TestClient, worker running) gets one warm-up job,
   then one POST /api/v1/jobs (measured until its job is done) and one POST /sdapi/v1/txt2img (which waits for its
   job). The profiler is installed on every thread; calls are counted only inside each request's window, matched
   by function name (and a path pattern) anywhere in the package, so the counts survive files moving. CHECKS
   below lists what is counted; extend it as needed.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path

# (label, function-name pattern, pattern for the file's path relative to the package dir)
CHECKS = [
    ("prepares", "prepare", "engine/engine.py"),  # Engine.prepare
    ("type checks", "check_types", "*"),
    ("field checks", "check_fields", "*"),
    ("prompt parses", "plan_prompts", "*"),
    ("prompt parses", "parse*", "*prompts/*"),
    ("model names", "resolve", "*catalog*"),
    ("model names", "model_ref", "*"),
]
PROMPT = "a red circle"
NATIVE = ("/api/v1/jobs", {"request": {"prompt": PROMPT, "steps": 2, "seed": 1}})
A1111 = ("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64})

_rel_cache: dict[str, str | None] = {}


def package_file(filename: str, package: str) -> str | None:
    """The path of `filename` relative to the package dir, or None when it lies outside."""
    if filename not in _rel_cache:
        inside = filename.startswith(package + os.sep)
        _rel_cache[filename] = Path(filename).relative_to(package).as_posix() if inside else None
    return _rel_cache[filename]


def trace_txt2img(package: str) -> tuple[list[str], int, int]:
    """The distinct files entered by one warm Engine.generate call, the number of entries and of re-entries."""
    from sdstudio import Engine, GenerationRequest, Settings

    engine = Engine(Settings.from_env())
    request = GenerationRequest(prompt=PROMPT, steps=2, seed=1)
    engine.generate(request)  # warm-up: loads the model and whatever is imported on first use
    seen: set[str] = set()
    counts = Counter()

    def profile(frame, event, _arg):
        if event != "call" or (file := package_file(frame.f_code.co_filename, package)) is None:
            return
        caller = frame.f_back
        while caller is not None and package_file(caller.f_code.co_filename, package) is None:
            caller = caller.f_back
        if caller is not None and package_file(caller.f_code.co_filename, package) == file:
            return
        counts["entries"] += 1
        counts["re-entries"] += file in seen
        seen.add(file)

    sys.setprofile(profile)
    try:
        engine.generate(request)
    finally:
        sys.setprofile(None)
    return sorted(seen), counts["entries"], counts["re-entries"]


def count_checks(package: str, data_dir: Path) -> dict[str, Counter]:
    """Calls of the CHECKS functions during one native and one A1111 request, job run included."""
    from fastapi.testclient import TestClient

    from sdstudio import Settings
    from sdstudio.server.app import create_app

    window = {"on": False}
    counts = Counter()

    def profile(frame, event, _arg):
        if event != "call" or not window["on"]:
            return
        if (file := package_file(frame.f_code.co_filename, package)) is None:
            return
        name = frame.f_code.co_name
        for i, (label, name_pattern, path_pattern) in enumerate(CHECKS):
            if fnmatch(name, name_pattern) and fnmatch(file, path_pattern):
                counts[i, label, name] += 1
                break

    def post(client: TestClient, route: str, body: dict) -> None:
        response = client.post(route, json=body)
        response.raise_for_status()
        if route == NATIVE[0]:  # queued: wait until the worker has run it
            while client.get(f"/api/v1/jobs/{response.json()['id']}").json()["status"] in ("queued", "running"):
                time.sleep(0.02)

    results = {}
    threading.setprofile(profile)  # threads started from now on (worker, event loop, thread pool)
    sys.setprofile(profile)
    try:
        with TestClient(create_app(Settings.from_env(), data_dir)) as client:
            post(client, *NATIVE)  # warm-up: the worker loads the model
            for route, body in (NATIVE, A1111):
                counts.clear()
                window["on"] = True
                post(client, route, body)
                window["on"] = False
                results[route] = Counter(counts)
    finally:
        threading.setprofile(None)
        sys.setprofile(None)
    return results


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for key in [k for k in os.environ if k.startswith("SDSTUDIO_")]:
            del os.environ[key]
        os.environ.update(SDSTUDIO_HOME=f"{tmp}/home", SDSTUDIO_OUTPUTS=f"{tmp}/outputs", HF_HUB_CACHE=f"{tmp}/hf",
                          SDSTUDIO_DEVICE="cpu", SDSTUDIO_DTYPE="float32")
        import sdstudio

        package = os.path.dirname(os.path.abspath(sdstudio.__file__))
        print(f"sdstudio package: {package}\n")
        files, entries, reentries = trace_txt2img(package)
        results = count_checks(package, Path(tmp) / "server")

    print("one txt2img call (Engine.generate, 2 steps, warm)")
    for label, value in (("files entered", len(files)), ("entries", entries), ("re-entries", reentries)):
        print(f"  {label:<14}{value:>6}")
    print("  files:\n" + "\n".join(f"    {file}" for file in files))

    rows = sorted({*(k for c in results.values() for k in c),
                   *((i, label, name) for i, (label, name, _) in enumerate(CHECKS) if "*" not in name)})
    print("\nchecks per HTTP request (worker running; counted until the request's job is done)")
    print(f"  {'what':<15}{'function':<16}" + "".join(f"{'POST ' + route:>26}" for route in results))
    for row in rows:
        print(f"  {row[1]:<15}{row[2]:<16}" + "".join(f"{c[row]:>26}" for c in results.values()))


if __name__ == "__main__":
    main()
