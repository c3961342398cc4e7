"""Screenshots of the web UI's Generate view after one generation on the demo model, at 1280x800 (desktop,
also scrolled to the end of the form with every section open) and 390x844 (phone): what a user sees. For
before/after comparisons of UI work, run it once from each checkout into its own folder:

    .venv/bin/python scripts/webui_screenshots.py docs/images --tag after
    PYTHONPATH=<older checkout>/src .venv/bin/python scripts/webui_screenshots.py docs/images --tag before

Needs the dev extra (Playwright) and Debian's chromium (scripts/install_browser.sh).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from playwright.sync_api import sync_playwright

from sdstudio import Settings
from sdstudio.server.app import create_app
from sdstudio.settings import PACKAGED_MODELS
from sdstudio.testing.live import live_server

VIEWPORTS = {"1280": (1280, 800), "390": (390, 844)}
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def shoot(url: str, out: Path, tag: str) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
        for name, (width, height) in VIEWPORTS.items():
            context = browser.new_context(viewport={"width": width, "height": height}, base_url=url)
            page = context.new_page()
            page.goto("/")
            page.wait_for_selector("body[data-ready=true]")
            page.fill("#prompt", "a red circle on a blue background")
            page.fill("#steps", "8")
            page.fill("#seed", "4")
            page.click("#generate")
            page.wait_for_function("() => { const i = document.querySelector('#result-main');"
                                   " return !i.hidden && i.getAttribute('src'); }", timeout=120_000)
            page.wait_for_timeout(300)  # smooth scrolling settles
            page.screenshot(path=str(out / f"generate-{tag}-{name}.png"))
            if name == "1280":  # every section open, scrolled to the end of the form: is the result still in view?
                page.evaluate("() => { document.querySelectorAll('#gen-form details').forEach((d) => {"
                              " d.open = true; }); scrollTo(0, document.body.scrollHeight); }")
                page.wait_for_timeout(300)
                page.screenshot(path=str(out / f"generate-{tag}-{name}-scrolled.png"))
            context.close()
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for generate-<tag>-1280.png and generate-<tag>-390.png")
    parser.add_argument("--tag", default="now", help="part of the file names, e.g. before or after")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        settings = Settings.from_env(home=home, outputs_dir=home / "outputs", device=torch.device("cpu"),
                                     dtype=torch.float32, default_model="demo",
                                     models_dirs=(home / "models", PACKAGED_MODELS))
        with live_server(create_app(settings, home / "server")) as port:
            shoot(f"http://127.0.0.1:{port}", args.out, args.tag)


if __name__ == "__main__":
    main()
