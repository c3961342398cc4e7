"""The web UI end to end: `sdstudio serve` on the demo model, driven in headless Chromium (Debian's, through
Playwright). Screenshots are written to test-artifacts/webui/ (not committed).

`make test` installs Chromium first (scripts/install_browser.sh). Without it these tests fail, naming it.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, PngImagePlugin

from sdstudio import Settings
from sdstudio.server.app import create_app
from sdstudio.settings import PACKAGED_MODELS
from sdstudio.testing.live import live_server
from sdstudio.train.shapes import ShapeSpec, draw

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the dev extra)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "webui"
# Flags for a sandboxed, offline machine: no background connections that the closed network would refuse.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def webui_home(tmp_path_factory):
    return tmp_path_factory.mktemp("webui-home")


@pytest.fixture(scope="module")
def server(webui_home):
    home = webui_home
    settings = Settings.from_env(home=home, outputs_dir=home / "outputs", device=torch.device("cpu"),
                                 dtype=torch.float32, default_model="demo",
                                 models_dirs=(home / "models", PACKAGED_MODELS))
    with live_server(create_app(settings, home / "server")) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("the web UI tests need Debian's chromium: run scripts/install_browser.sh (make test does)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=server)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith((server, "data:")) else outside.append(r.url))
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    yield page
    context.close()
    assert not errors, f"JavaScript errors: {errors}"
    assert not outside, f"the page made requests outside the server: {outside}"


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def fill_basics(page, prompt: str, seed: int, steps: int = 8) -> None:
    page.fill("#prompt", prompt)
    page.fill("#steps", str(steps))
    page.fill("#seed", str(seed))


def result_pixels(page) -> np.ndarray:
    src = page.get_attribute("#result-main", "src")
    body = page.request.get(src).body() if not src.startswith("data:") else None
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(int)


def wait_for_result(page, previous: str | None = None) -> str:
    page.wait_for_function("prev => { const i = document.querySelector('#result-main');"
                           " return !i.hidden && i.getAttribute('src') && i.getAttribute('src') !== prev; }",
                           arg=previous, timeout=60_000)
    return page.get_attribute("#result-main", "src")


def png_file(image: Image.Image, text: dict[str, str] | None = None) -> dict:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return {"name": "picture.png", "mimeType": "image/png", "buffer": buffer.getvalue()}


def test_generate_shows_the_image_and_its_metadata(page):
    fill_basics(page, "a red circle on a blue background", seed=4)
    page.click("#generate")
    wait_for_result(page)
    info = page.inner_text("#infotext")
    assert "a red circle on a blue background" in info and "Seed: 4" in info and "Steps: 8" in info
    pixels = result_pixels(page)
    assert pixels.shape == (64, 64, 3)
    red = ((pixels[..., 0] > 150) & (pixels[..., 2] < 100)).sum()
    assert red > 100  # the demo model drew the red circle
    assert page.get_attribute("#download", "href").startswith("/api/v1/images/")
    shot(page, "generate")


def test_ctrl_enter_generates_and_seed_buttons(page):
    fill_basics(page, "a green square on a yellow background", seed=11, steps=4)
    page.press("#prompt", "Control+Enter")
    wait_for_result(page)
    assert "Seed: 11" in page.inner_text("#infotext")
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    page.click("#seed-reuse")
    assert page.input_value("#seed") == "11"


def test_paint_a_mask_and_inpaint(page):
    init = draw(ShapeSpec("circle", "red", "blue", "large", (1, 1)), 64)
    page.click("button[data-mode=inpaint]")
    page.set_input_files("#init-file", png_file(init))
    page.wait_for_selector("#canvas-wrap:not([hidden])")
    page.fill("#brush-size", "90")
    page.dispatch_event("#brush-size", "input")
    box = page.locator("#mask-canvas").bounding_box()
    for row in (0.35, 0.5, 0.65):  # three wide strokes over the middle of the picture
        page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * row)
        page.mouse.down()
        for k in range(1, 11):
            page.mouse.move(box["x"] + box["width"] * (0.3 + 0.04 * k), box["y"] + box["height"] * row)
        page.mouse.up()
    fill_basics(page, "a large yellow circle in the center on a blue background", seed=2, steps=10)
    page.fill("#strength", "1")
    shot(page, "inpaint-mask")
    page.click("#generate")
    wait_for_result(page)
    out = result_pixels(page)
    before = np.asarray(init.convert("RGB")).astype(int)
    assert (out[:6] == before[:6]).all()  # the unpainted top rows are exactly the user's pixels
    centre = out[28:36, 28:36].mean(axis=(0, 1))
    assert centre[0] > 150 and centre[1] > 150 and centre[2] < 120, centre  # repainted yellow
    assert "Mask blur" in page.inner_text("#infotext")
    shot(page, "inpaint")


def test_errors_appear_next_to_their_field(page):
    fill_basics(page, "a red circle", seed=1, steps=0)
    page.click("#generate")
    error = page.locator("[data-for=steps] .field-error")
    error.wait_for()
    assert "steps" in error.inner_text()
    page.click("button[data-mode=img2img]")
    page.fill("#steps", "4")
    page.click("#generate")
    sync_api.expect(page.locator("[data-error-for~=init_image]")).to_contain_text("drop an image")


def test_cancel_a_running_job(page, server):
    fill_basics(page, "a blue triangle on a red background", seed=5, steps=150)
    page.fill("#width", "512")
    page.fill("#height", "512")
    page.click("#generate")
    page.wait_for_function("() => /\\d+%/.test(document.querySelector('#progress-text').textContent) &&"
                           " !document.querySelector('#cancel').disabled", timeout=60_000)
    page.click("#queue")  # the queue lists the running job
    sync_api.expect(page.locator("#queue-list li").first).to_contain_text("a blue triangle on a red background")
    sync_api.expect(page.locator("#queue-list li").first).to_contain_text("running")
    page.keyboard.press("Escape")
    page.click("#cancel")
    page.wait_for_function("() => document.querySelector('#form-error').textContent.includes('cancelled')",
                           timeout=60_000)
    assert page.is_disabled("#cancel") and page.is_enabled("#generate")
    cancelled = page.request.get(f"{server}/api/v1/jobs?status=cancelled").json()["jobs"]
    assert cancelled, "the job was not cancelled"
    request = page.request.get(f"{server}/api/v1/jobs/{cancelled[0]['id']}/request").json()
    assert request["prompt"] == "a blue triangle on a red background"


def test_generate_while_a_job_runs_queues_and_interrupt_keeps_finished_images(page, server):
    """Generate is never blocked by a running job: the next one joins the queue and runs after it. Interrupt
    stops the running job and keeps the images it finished (A1111's Interrupt), then the queued job runs."""
    fill_basics(page, "a red circle on a blue background", seed=3, steps=60)
    page.fill("#n_iter", "30")
    page.click("#generate")
    page.wait_for_function("() => /\\d+%/.test(document.querySelector('#progress-text').textContent) &&"
                           " !document.querySelector('#interrupt').disabled", timeout=60_000)
    fill_basics(page, "a green square on a yellow background", seed=8, steps=4)
    page.fill("#n_iter", "1")
    assert page.is_enabled("#generate")
    page.click("#generate")
    sync_api.expect(page.locator("#queued")).to_have_text("+1 queued")
    page.wait_for_timeout(1500)  # let the running job finish an image or two
    page.click("#interrupt")
    page.wait_for_function("() => document.querySelector('#queued').textContent === ''", timeout=60_000)
    jobs = page.request.get(f"{server}/api/v1/jobs?q=red%20circle").json()["jobs"]
    interrupted = next(j for j in jobs if j["prompt"] == "a red circle on a blue background")
    assert interrupted["status"] == "done" and 1 <= len(interrupted["result"]["images"]) < 30
    page.wait_for_function("() => !document.querySelector('#result-main').hidden && "
                           "document.querySelector('#infotext').textContent.includes('a green square')",
                           timeout=60_000)
    assert page.is_disabled("#interrupt") and page.is_enabled("#generate")


def started(server: str, page, prompt: str) -> float:
    jobs = page.request.get(f"{server}/api/v1/jobs?q={prompt}").json()["jobs"]
    return next(j for j in jobs if j["prompt"] == prompt)["started"]


def test_ctrl_shift_enter_queues_at_the_front_and_generate_forever_repeats(page, server):
    fill_basics(page, "a red circle on a blue background", seed=3, steps=60)
    page.fill("#n_iter", "20")
    page.click("#generate")
    page.wait_for_function("() => !document.querySelector('#interrupt').disabled", timeout=60_000)
    page.fill("#n_iter", "1")
    fill_basics(page, "a green square on a red background", seed=8, steps=2)
    page.keyboard.press("Control+Enter")
    sync_api.expect(page.locator("#queued")).to_have_text("+1 queued")
    fill_basics(page, "a yellow star on a blue background", seed=9, steps=2)
    page.keyboard.press("Control+Shift+Enter")
    sync_api.expect(page.locator("#queued")).to_have_text("+2 queued")
    page.click("#interrupt")
    page.wait_for_function("() => document.querySelector('#queued').textContent === '' && "
                           "document.querySelector('#interrupt').disabled", timeout=60_000)
    assert "a green square" in page.inner_text("#infotext")  # the page shows the jobs in the order they ran
    assert started(server, page, "a yellow star on a blue background") < started(
        server, page, "a green square on a red background")

    fill_basics(page, "a green circle on a yellow background", seed=-1, steps=2)
    count = "() => fetch('/api/v1/jobs?q=green%20circle%20on%20a%20yellow').then(r => r.json()).then(j => j.total)"
    page.click("#forever")
    page.wait_for_function(f"async () => (await ({count})()) >= 3", timeout=60_000, polling=300)
    page.click("#forever")  # stop: the job running finishes, no new one is sent
    sync_api.expect(page.locator("#forever")).to_have_attribute("aria-pressed", "false")
    page.wait_for_function("() => document.querySelector('#interrupt').disabled", timeout=60_000)
    made = page.evaluate(f"({count})()")
    page.wait_for_timeout(1000)
    assert page.evaluate(f"({count})()") == made
    seeds = {j["result"]["seeds"][0] for j in page.request.get(
        f"{server}/api/v1/jobs?q=green%20circle%20on%20a%20yellow").json()["jobs"]}
    assert len(seeds) == made  # a new random seed each time, as A1111's Generate forever


def test_rerun_from_history_gives_the_same_image(page):
    fill_basics(page, "a yellow star on a green background", seed=21, steps=6)
    page.click("#generate")
    first_src = wait_for_result(page)
    first = result_pixels(page)
    page.click(".tabs button[data-view=history]")
    item = page.locator("#history-list li", has_text="a yellow star on a green background").first
    item.wait_for()
    shot(page, "history")
    item.locator("button.rerun").click()
    wait_for_result(page, first_src)
    assert page.locator("#view-generate").is_visible()
    assert "Seed: 21" in page.inner_text("#infotext")
    assert (result_pixels(page) == first).all()


def drop_on_png_info(page, buffer: bytes, name: str) -> None:
    page.click(".tabs button[data-view=pnginfo]")
    page.evaluate("""([bytes, name]) => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(bytes)], name, { type: "image/png" }));
        document.querySelector("#png-drop").dispatchEvent(new DragEvent("drop", { dataTransfer: data, bubbles: true }));
    }""", [list(buffer), name])


def test_drop_a1111_png_loads_its_parameters(page):
    text = "a cat in a hat\nNegative prompt: ugly\nSteps: 12, Sampler: Euler a, CFG scale: 5, Seed: 42, Size: 64x64"
    file = png_file(Image.new("RGB", (64, 64), (90, 90, 90)), {"parameters": text})
    drop_on_png_info(page, file["buffer"], file["name"])
    page.wait_for_function("() => !document.querySelector('#png-send [data-send=txt2img]').disabled")
    assert "Steps: 12" in page.inner_text("#png-text")
    table = page.inner_text("#png-fields")
    assert "Cfg scale" in table and "null" not in table and "aesthetic" not in table  # readable, no noise
    page.click("#png-send [data-send=txt2img]")
    assert page.input_value("#prompt") == "a cat in a hat"
    assert page.input_value("#negative_prompt") == "ugly"
    assert page.input_value("#steps") == "12" and page.input_value("#seed") == "42"
    assert page.input_value("#sampler") == "Euler a" and page.input_value("#cfg_scale") == "5"
    assert page.input_value("#width") == "64"
    drop_on_png_info(page, file["buffer"], file["name"])
    page.wait_for_function("() => !document.querySelector('#png-send [data-send=img2img]').disabled")
    page.click("#png-send [data-send=img2img]")  # the parameters and the picture itself
    assert page.locator(".modes button[data-mode=img2img]").get_attribute("class") == "active"
    assert page.locator("#init-preview").get_attribute("src").startswith("data:image/png")


def test_png_info_says_plainly_when_a_file_is_not_a_picture(page):
    drop_on_png_info(page, b"just some text", "notes.txt")
    page.wait_for_function("() => document.querySelector('#view-pnginfo .field-error:not([hidden])')")
    assert "notes.txt is not a picture sdstudio can read" in page.inner_text("#view-pnginfo")


def test_phone_width_has_no_sideways_scroll(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 844}, base_url=server, is_mobile=True)
    page = context.new_page()
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#generate").is_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, "phone")
    context.close()


def test_controlnet_unit_preview_and_generate(page):
    edges = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(edges).rectangle((6, 6, 30, 30), fill="white")  # a square in the top-left corner
    page.click("#control-section summary")
    page.click("#control-add")
    page.set_input_files(".unit input[type=file]", png_file(edges))
    page.select_option(".unit select >> nth=1", "canny")
    page.click(".unit >> text=Preview preprocessor")
    page.wait_for_selector(".unit img[alt='preprocessor output']:not([hidden])")
    fill_basics(page, "a red square on a blue background", seed=4)
    page.click("#generate")
    wait_for_result(page)
    assert 'ControlNet 0: "Module: canny, Model: demo-canny' in page.inner_text("#infotext")
    red = (lambda p: (p[..., 0] > 150) & (p[..., 2] < 100))(result_pixels(page))
    assert red[:32, :32].sum() > 3 * red[32:, 32:].sum()  # the square is where the edge map put it


def test_outpaint_then_upscale(page):
    page.click("button[data-mode=outpaint]")
    page.set_input_files("#init-file", png_file(draw(ShapeSpec("square", "red", "blue", "large", (1, 1)), 64)))
    page.fill("#out-right", "64")
    fill_basics(page, "a red square on a blue background", seed=3)
    page.click("#generate")
    first = wait_for_result(page)
    assert result_pixels(page).shape == (64, 128, 3) and "Masked content" in page.inner_text("#infotext")
    page.click("#send-img2img")
    page.click("button[data-mode=upscale]")
    page.fill("#up-scale", "2")
    page.click("#generate")
    wait_for_result(page, first)
    assert "Postprocess upscale by: 2" in page.inner_text("#infotext")


def test_xyz_plot_and_denoising_capture(page):
    fill_basics(page, "a green circle on a red background", seed=8, steps=4)
    page.click("details.section:last-of-type summary")
    page.fill("#capture_every", "2")
    page.click("#generate")
    wait_for_result(page)
    page.click("#show-capture")
    page.wait_for_selector("#capture:not([hidden])")
    assert page.inner_text("#capture-label") == "step 4 of 4"
    page.fill("#capture-step", "0")
    page.dispatch_event("#capture-step", "input")
    assert page.inner_text("#capture-label") == "step 2 of 4"
    page.keyboard.press("Escape")
    page.click(".tabs button[data-view=xyz]")
    page.fill("#xyz-x", "banana")
    page.click("#xyz-run")
    sync_api.expect(page.locator("[data-error-for~=x]")).to_contain_text("banana")
    page.fill("#xyz-x", "3,7")
    page.select_option("#view-xyz .axis[data-for=y] .axis-name", "steps")
    page.fill("#xyz-y", "2,4")
    page.press("#xyz-y", "Control+Enter")
    page.wait_for_selector("#xyz-grid:not([hidden])", timeout=60_000)
    grid = page.request.get(page.get_attribute("#xyz-grid", "src")).body()
    width, height = Image.open(io.BytesIO(grid)).size
    assert width > 2 * 64 and height > 2 * 64  # two columns and two rows of 64 px images, plus labels
    cells = page.locator("#xyz-cells img")
    assert cells.count() == 4 and page.inner_text("#xyz-cells tr:first-child").count("cfg") == 2  # labelled
    assert cells.first.bounding_box()["width"] >= 150  # readable, not 64 px
    cells.nth(3).click()  # a cell opens in the lightbox, with the others a step away
    sync_api.expect(page.locator("#viewer-count")).to_have_text("4 / 4")
    page.keyboard.press("Escape")
    shot(page, "xyz")


def test_the_form_survives_a_reload_and_restore_last_brings_back_the_last_generation(page):
    fill_basics(page, "a yellow star on a purple background", seed=12, steps=3)
    page.select_option("#sampler", "Euler a")
    page.click("#generate")
    page.wait_for_function("() => !document.querySelector('#result-main').hidden", timeout=60_000)
    page.fill("#prompt", "an unfinished thought")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.input_value("#prompt") == "an unfinished thought"  # as left, not as generated
    assert page.input_value("#sampler") == "Euler a" and page.input_value("#seed") == "12"
    page.click("#restore-last")
    assert page.input_value("#prompt") == "a yellow star on a purple background"


def test_at_phone_width_generate_brings_the_progress_and_result_into_view(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 844}, base_url=server)
    page = context.new_page()
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    fill_basics(page, "a red circle on a blue background", seed=2, steps=40)
    page.click("#generate")
    page.wait_for_function("() => !document.querySelector('#progress').hidden", timeout=60_000)
    box = page.locator("#progress").bounding_box()
    assert box is not None and 0 <= box["y"] < 844, box  # on screen, not ~1000 px below the form
    page.wait_for_function("() => !document.querySelector('#result-main').hidden", timeout=120_000)
    page.wait_for_function("() => { const r = document.querySelector('#result-main').getBoundingClientRect();"
                           " return r.height > 100 && r.top >= 0 && r.bottom <= innerHeight; }")  # all of it
    shot(page, "phone-generate")
    context.close()


def test_the_lightbox_fits_small_images_steps_through_the_batch_and_closes_on_escape(page):
    fill_basics(page, "a red circle on a blue background", seed=21, steps=3)
    page.fill("#batch_size", "2")
    page.click("#generate")
    page.wait_for_function("() => document.querySelectorAll('#gallery img').length === 2", timeout=60_000)
    page.click("#result-main")
    image = page.locator("#viewer-image")
    assert image.bounding_box()["height"] > 300  # a 64x64 image fitted to the screen, not shown at 64 px
    first = image.get_attribute("src")
    sync_api.expect(page.locator("#viewer-count")).to_have_text("1 / 2")
    page.keyboard.press("ArrowRight")
    sync_api.expect(page.locator("#viewer-count")).to_have_text("2 / 2")
    assert image.get_attribute("src") != first
    image.click()
    assert image.bounding_box()["height"] == 128  # zoomed: twice the natural size
    page.keyboard.press("Escape")
    assert not page.locator("#viewer").is_visible()


def test_ctrl_up_weights_the_word_at_the_cursor_and_the_counter_counts_tokens(page):
    page.fill("#prompt", "a red circle")
    sync_api.expect(page.locator("#prompt-tokens")).to_have_text("3/75")
    page.focus("#prompt")
    page.evaluate("() => document.querySelector('#prompt').setSelectionRange(3, 3)")  # inside "red"
    page.keyboard.press("Control+ArrowUp")
    assert page.input_value("#prompt") == "a (red:1.1) circle"
    page.keyboard.press("Control+ArrowUp")
    assert page.input_value("#prompt") == "a (red:1.2) circle"
    page.keyboard.press("Control+ArrowDown")
    page.keyboard.press("Control+ArrowDown")
    assert page.input_value("#prompt") == "a red circle"
    page.fill("#prompt", "word " * 80)
    sync_api.expect(page.locator("#prompt-tokens")).to_have_text("80/150")  # two windows


def test_the_light_theme_applies_at_once_and_server_settings_say_they_are_unsaved(page):
    page.click(".tabs button[data-view=settings]")
    page.wait_for_function("() => document.querySelector('#set-model').options.length > 0")
    assert "sdstudio serve --outputs FOLDER" in page.inner_text("#outputs-help")  # where the images go
    page.check("#set-light")
    assert page.evaluate("() => document.documentElement.classList.contains('light')")  # no Save needed
    page.fill("#set-clip", "2")
    page.dispatch_event("#set-clip", "change")
    sync_api.expect(page.locator("#settings-saved")).to_have_text("unsaved changes")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.evaluate("() => document.documentElement.classList.contains('light')")  # kept


def test_refresh_finds_a_model_added_while_the_page_is_open(page, webui_home):
    assert "demo-later" not in page.locator("#model").inner_text()
    page.select_option("#model", "demo-inpaint")
    shutil.copytree(PACKAGED_MODELS / "demo", webui_home / "models" / "demo-later")
    try:
        page.click("#refresh-catalog")
        sync_api.expect(page.locator("#model option[value=demo-later]")).to_have_count(1)
        assert page.input_value("#model") == "demo-inpaint"  # the choice is kept
    finally:
        shutil.rmtree(webui_home / "models" / "demo-later")


def test_lora_and_embedding_cards_insert_into_the_prompt_box_last_used(page, webui_home):
    lora, embeddings = webui_home / "lora", webui_home / "embeddings"
    for folder in (lora, embeddings):
        folder.mkdir(exist_ok=True)
    files = [lora / "ink wash.safetensors", embeddings / "bad-hands.pt", lora / "ink wash.png"]
    files[0].write_bytes(b"weights")
    files[1].write_bytes(b"weights")
    draw(ShapeSpec("circle", "red", "blue", "large", (1, 1)), 64).save(files[2])
    try:
        page.click("#refresh-catalog")
        page.click("#networks summary")
        cards = page.locator("#network-cards .card")
        sync_api.expect(cards).to_have_count(3)  # with the demo's packaged LCM-LoRA
        sync_api.expect(page.locator("#network-count")).to_have_text("(3)")
        page.wait_for_function("() => document.querySelector('#network-cards img')?.naturalWidth === 64")
        page.fill("#prompt", "a red circle")
        page.click(".card[data-name='ink wash']")
        assert page.input_value("#prompt") == "a red circle, <lora:ink wash:1>"
        page.fill("#prompt", "a red circle, <lora:ink wash:0.6>, on blue")
        page.click(".card[data-name='ink wash']")  # a second click takes it out, at any weight
        assert page.input_value("#prompt") == "a red circle, on blue"
        page.fill("#negative_prompt", "blurry")
        page.click(".card[data-name='bad-hands']")  # the negative prompt was used last
        assert page.input_value("#negative_prompt") == "blurry, bad-hands"
        page.fill("#network-filter", "hands")
        sync_api.expect(page.locator(".card[data-name='ink wash']")).to_be_hidden()
        shot(page, "networks")
    finally:
        for path in files:
            path.unlink()


def test_guidance_add_ons_from_the_form_reach_the_image_and_come_back_from_history(page):
    fill_basics(page, "a red circle on a blue background", seed=6, steps=4)
    page.click("#guidance-section summary")
    page.select_option("#guidance", "apg")
    page.fill("#pag_scale", "2")
    page.check("#freeu")
    page.click("#generate")
    wait_for_result(page)
    info = page.inner_text("#infotext")
    assert "freeu_enabled: True, freeu_b1: 1.5" in info and "PerturbedAttentionGuidance_scale: 2" in info
    assert "Guidance: APG" in info
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.input_value("#guidance") == "apg" and page.is_checked("#freeu")  # the form kept them


def test_a_few_step_preset_fills_the_sampling_fields(page):
    page.select_option("#preset", "lcm")
    assert (page.input_value("#sampler"), page.input_value("#steps"), page.input_value("#cfg_scale")) == \
        ("LCM", "4", "1")
    assert page.input_value("#preset") == ""  # a menu of actions, not a setting
    assert page.input_value("#prompt").endswith("<lora:lcm-lora-demo:1>")  # the demo's few-step LoRA
    fill_basics(page, "a red circle on a blue background", seed=4, steps=4)
    page.click("#guidance-section summary")
    page.fill("#eta", "0.4")
    page.select_option("#sampler", "TCD")
    page.click("#generate")
    wait_for_result(page)
    info = page.inner_text("#infotext")
    assert "Sampler: TCD" in info and "Eta: 0.4" in info and "CFG scale: 1," in info


def test_an_image_prompt_unit_reaches_the_image(page, webui_home):
    from diffusers import UNet2DConditionModel

    from sdstudio.testing.ip_adapter import tiny_image_encoder, write_tiny_adapter

    unet = UNet2DConditionModel.from_pretrained(PACKAGED_MODELS / "demo" / "unet")
    tiny_image_encoder(webui_home / "clip_vision" / "vit-tiny", hidden=64, projection=32, heads=2)
    write_tiny_adapter(webui_home / "ipadapter" / "ip-adapter_demo-test.safetensors", unet, "plain", 32)
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    fill_basics(page, "a red circle on a blue background", seed=8, steps=4)
    page.click("#generate")
    plain = wait_for_result(page)
    before = result_pixels(page)
    page.click("#ip-section summary")
    page.click("#ip-add")
    page.set_input_files(".ip-unit input[type=file]", png_file(Image.new("RGB", (48, 48), (240, 220, 10))))
    page.wait_for_selector(".ip-unit img[alt='image prompt']")
    page.fill(".ip-unit input[type=number] >> nth=0", "1.5")
    page.click("#generate")
    wait_for_result(page, plain)
    assert 'Module: ip-adapter_clip_h, Model: ip-adapter_demo-test [' in page.inner_text("#infotext")
    assert np.abs(result_pixels(page) - before).max() > 0
    page.click(".ip-unit >> text=Remove")
    assert page.locator(".ip-unit").count() == 0


def test_a_flux_model_gets_its_own_pickers(page, webui_home):
    from sdstudio.testing.tiny_flow import build_tiny_flux

    if not (webui_home / "models" / "tiny-flux-dev").exists():
        build_tiny_flux(webui_home / "models" / "tiny-flux-dev")
    page.click("#refresh-catalog")
    page.wait_for_selector("#model option[value=tiny-flux-dev]", state="attached")
    page.select_option("#model", "tiny-flux-dev")
    options = page.eval_on_selector_all("#sampler option", "os => os.map(o => o.value)")
    assert options == ["Euler"]
    assert page.eval_on_selector_all("#schedule option", "os => os.map(o => o.value)") == ["Automatic", "Simple"]
    assert page.is_visible("#distilled_cfg_scale") and page.is_visible("#shift")
    assert page.is_visible("#hires-section") and page.is_visible("#control-section")
    assert not page.is_visible("#ip-section") and not page.is_visible("#guidance-section")
    fill_basics(page, "a red circle", seed=3, steps=2)
    page.fill("#cfg_scale", "1")
    page.fill("#distilled_cfg_scale", "2.5")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.click("#generate")
    wait_for_result(page)
    info = page.inner_text("#infotext")
    assert "Model: tiny-flux-dev" in info and "Distilled CFG Scale: 2.5" in info and "Sampler: Euler" in info
    shot(page, "flux")
    page.select_option("#model", "demo")
    assert len(page.eval_on_selector_all("#sampler option", "os => os.map(o => o.value)")) > 10
    assert not page.is_visible("#distilled_cfg_scale") and page.is_visible("#ip-section")
