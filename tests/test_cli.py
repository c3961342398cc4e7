"""The CLI through its entry points (`sdstudio` and `python -m sdstudio`): exit codes, messages, files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.storage.results import read_metadata

from .conftest import shapes_image


def run(args: list[str], cwd: Path, home: Path, entry: str = "module",
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SDSTUDIO_HOME": str(home), "SDSTUDIO_DEVICE": "cpu", "COLUMNS": "200", **(extra_env or {})}
    env.pop("SDSTUDIO_MODEL", None)
    cmd = [sys.executable, "-m", "sdstudio"] if entry == "module" else [str(Path(sys.executable).parent / "sdstudio")]
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def workdir(tmp_path, tiny_model) -> Path:
    """A folder with a home whose models folder holds the tiny model (so it can be named)."""
    (tmp_path / "home" / "models").mkdir(parents=True)
    shutil.copytree(tiny_model, tmp_path / "home" / "models" / "tiny")
    return tmp_path


def test_txt2img_writes_pngs_with_metadata_and_captures(workdir):
    proc = run(["txt2img", "a red circle, small", "-m", "tiny", "--steps", "6", "--seed", "5", "--batch-size", "2",
                "--capture-every", "3", "-n", "blurry", "--sampler", "Euler a"], workdir, workdir / "home",
               entry="script")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    pngs = [Path(workdir, p) for p in lines if p.endswith(".png")]
    assert [p.name for p in pngs] == ["00000-5.png", "00001-6.png"]
    assert all(p.parent.parent.name == "txt2img-images" and p.parent.parent.parent.name == "outputs" for p in pngs)
    meta = read_metadata(pngs[1])
    assert meta.infotext.startswith("a red circle, small\nNegative prompt: blurry\nSteps: 6, Sampler: Euler a")
    frames = Path(workdir, lines[lines.index(str(pngs[1].relative_to(workdir))) + 1])
    assert sorted(p.name for p in frames.iterdir()) == [
        "denoise.gif", "step-003-latents.png", "step-003-x0.png", "step-003-xt.png",
        "step-006-latents.png", "step-006-x0.png", "step-006-xt.png"]
    with Image.open(frames / "denoise.gif") as gif:
        assert gif.n_frames == 2 and gif.size == (128, 64)
    final = np.asarray(Image.open(frames / "step-006-xt.png"), np.int16)
    assert np.abs(final - np.asarray(Image.open(pngs[1]), np.int16)).max() <= 1  # last frame is the image


def test_img2img_and_info_and_rerun_from_image(workdir):
    shapes_image().save(workdir / "init.png")
    proc = run(["img2img", "init.png", "a blue square", "--strength", "0.6", "-m", "tiny", "--steps", "5",
                "--seed", "9", "--batch-size", "2", "-o", "out"], workdir, workdir / "home")
    assert proc.returncode == 0, proc.stderr
    second = workdir / proc.stdout.split()[1]
    assert second.parent.parent.name == "img2img-images"

    info = run(["info", str(second)], workdir, workdir / "home")
    assert info.returncode == 0
    assert "Denoising strength: 0.6" in info.stdout and "seed: 10" in info.stdout

    rerun = run(["img2img", "init.png", "--from-image", str(second), "-o", "again"], workdir, workdir / "home")
    assert rerun.returncode == 0, rerun.stderr
    again = workdir / rerun.stdout.split()[0]
    assert again.name == "00000-10.png"
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(second)))

    override = run(["img2img", "init.png", "--from-image", str(second), "--steps", "3", "-o", "again"],
                   workdir, workdir / "home")
    assert "Steps: 3," in read_metadata(workdir / override.stdout.split()[0]).infotext


@pytest.mark.parametrize(("args", "message"), [
    (["txt2img", "x", "-m", "tiny", "-W", "500"], "error: width must be a multiple of 8, got 500"),
    (["txt2img", "x", "-m", "tiny", "--sampler", "Euler b"],
     "error: unknown sampler 'Euler b' (did you mean 'Euler a'?); valid"),
    (["txt2img", "x", "-m", "nope"], "error: unknown model 'nope'"),
    (["txt2img", "-m", "tiny"], "error: give a prompt"),
    (["img2img", "missing.png", "x", "-m", "tiny"], "error: image not found: missing.png"),
    (["img2img", "broken.png", "x", "-m", "tiny"], "error: cannot read image broken.png"),
    (["txt2img", "x", "-m", "tiny", "--from-image", "broken.png"], "error: cannot read image broken.png"),
    (["--dtype", "fp12", "txt2img", "x"], "error: dtype must be one of"),
])
def test_bad_input_is_one_line_and_exit_2(workdir, args, message):
    (workdir / "broken.png").write_bytes(b"not a png")
    proc = run(args, workdir, workdir / "home")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (workdir / "outputs").exists()


def test_help_shows_defaults_and_whole_lines_at_100_columns(workdir):
    env = {**os.environ, "COLUMNS": "100"}
    text = subprocess.run([sys.executable, "-m", "sdstudio", "txt2img", "--help"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=120).stdout
    assert "(default: 20)" in text and "(default: DPM++ 2M)" in text and ".safetensors/.ckpt file" in text
    assert "…" not in text  # no help cut short
    serve = subprocess.run([sys.executable, "-m", "sdstudio", "serve", "--help"], cwd=workdir, env=env,
                           capture_output=True, text=True, timeout=120).stdout
    assert "~/.sdstudio/server" in serve and "./outputs" in serve


def test_version_and_samplers(workdir):
    from sdstudio import __version__

    assert run(["--version"], workdir, workdir / "home").stdout.strip() == f"sdstudio {__version__}"
    listing = run(["samplers"], workdir, workdir / "home").stdout
    assert "DPM++ 2M SDE" in listing and "Karras" in listing


def test_train_commands_write_data_and_name_bad_files(workdir):
    proc = run(["train", "shapes-dataset", "data", "--count", "3", "--seed", "1"], workdir, workdir / "home")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (workdir / "data").iterdir()) == [
        "000000.png", "000000.txt", "000001.png", "000001.txt", "000002.png", "000002.txt"]
    (workdir / "data" / "000002.txt").unlink()
    proc = run(["train", "model", "data", "out", "--vae", "demo"], workdir, workdir / "home")
    assert proc.returncode == 2
    assert "error: missing caption for" in proc.stderr and "000002.png" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run(["train", "model", "data", "out", "--vae", "nowhere"], workdir, workdir / "home")
    assert proc.returncode == 2 and "error: unknown model 'nowhere'" in proc.stderr and "demo" in proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["txt2img", "x", "-m", "tiny", "-o", "afile"], "error: --out afile is a file: give a folder"),
    (["txt2img", b"a \xff b", "-m", "tiny"], "error: prompt is not valid text (bytes that are not UTF-8"),
])
def test_a_bad_output_folder_or_undecodable_prompt_fails_before_any_work(workdir, args, message):
    (workdir / "afile").write_bytes(b"")
    proc = run(args, workdir, workdir / "home")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr and (workdir / "afile").read_bytes() == b""


def test_serve_says_where_it_is_logs_requests_and_a_second_server_on_its_folder_exits(workdir):
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SDSTUDIO_HOME": str(workdir / "home"), "SDSTUDIO_DEVICE": "cpu"}
    server = subprocess.Popen([sys.executable, "-m", "sdstudio", "serve", "--port", str(port), "--data-dir", "data"],
                              cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline and not any("Uvicorn running" in line for line in lines):
        lines.append(server.stdout.readline())
    try:
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/sdapi/v1/samplers", timeout=30).status == 200
        second = run(["serve", "--port", str(port + 1), "--data-dir", "data"], workdir, workdir / "home")
        assert second.returncode == 2 and "in use by another sdstudio server (PID" in second.stderr
    finally:
        server.send_signal(signal.SIGINT)
        out = "".join(lines) + server.communicate(timeout=60)[0]
    assert f"web UI http://127.0.0.1:{port}/" in out and "queue and history: data" in out
    assert f"images: {workdir / 'outputs'}" in out  # the same outputs folder as the CLI's
    assert '"GET /sdapi/v1/samplers HTTP/1.1" 200' in out and "Shutting down" in out


def test_the_cli_never_touches_the_network_and_takes_model_names_everywhere(workdir, tmp_path):
    """A socket guard in the child (sitecustomize) records and refuses every connection; HF_HUB_OFFLINE unset."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(
        "import os, socket\n"
        "def connect(self, address):\n"
        "    with open(os.environ['SDSTUDIO_TEST_CONNECTS'], 'a') as f:\n"
        "        f.write(repr(address) + '\\n')\n"
        "    raise OSError('the network is blocked by the test')\n"
        "socket.socket.connect = connect\n")
    log = tmp_path / "connects.txt"
    env = {"PYTHONPATH": str(guard), "SDSTUDIO_TEST_CONNECTS": str(log), "HF_HUB_OFFLINE": "",
           "TRANSFORMERS_OFFLINE": ""}
    for args in (["txt2img", "a red circle", "--steps", "2", "-W", "64", "-H", "64"],
                 ["train", "model", "shapes", "trained", "--base", "demo", "--steps", "1", "--batch-size", "2"],
                 ["train", "model", "shapes", "scratch", "--vae", "demo", "--steps", "1", "--batch-size", "2"],
                 ["models", "convert", "demo", "converted/demo.safetensors"]):
        proc = run(args, workdir, workdir / "home", extra_env=env)
        assert proc.returncode == 0, (args, proc.stderr)
        for noise in ("Loading weights", "There are modules", "Writing model shards", "Traceback"):
            assert noise not in proc.stderr, (args, proc.stderr)  # only our own progress and messages
    assert not log.exists(), log.read_text()
    proc = run(["train", "model", "shapes", "x", "--steps", "1"], workdir, workdir / "home")
    assert proc.returncode == 2 and "needs a VAE: give --vae" in proc.stderr


def test_ctrl_c_keeps_the_finished_images_as_a1111s_interrupt(workdir):
    import signal
    import time

    env = {**os.environ, "SDSTUDIO_HOME": str(workdir / "home"), "SDSTUDIO_DEVICE": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "sdstudio", "txt2img", "a red circle", "-m", "tiny", "--steps",
                             "150", "--n-iter", "50", "-o", "out"], cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # loaded and generating: 50 x 150 steps take far longer
    proc.send_signal(signal.SIGINT)
    out, errors = proc.communicate(timeout=120)
    saved = [line for line in out.splitlines() if line.endswith(".png")]
    assert proc.returncode == 0, errors
    assert 1 <= len(saved) < 50 and all((workdir / p).is_file() for p in saved)
    assert "interrupting" in errors


def test_rerunning_someone_elses_image_lists_everything_missing_at_once(workdir):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a cat <lora:nosuch:0.8>\nSteps: 12, Sampler: Euler a, CFG scale: 5, Seed: 42, "
                                "Size: 64x64, Model hash: 0123456789, Model: juggernaut_xl, Denoising strength: 0.4, "
                                "Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+")
    Image.new("RGB", (64, 64)).save(workdir / "theirs.png", pnginfo=info)
    proc = run(["txt2img", "--from-image", "theirs.png"], workdir, workdir / "home")
    assert proc.returncode == 2 and "3 things this request names are missing" in proc.stderr
    assert "unknown LoRA 'nosuch'" in proc.stderr and "unknown model 'juggernaut_xl'" in proc.stderr
    assert "unknown hr_upscaler 'R-ESRGAN 4x+'" in proc.stderr


def test_cli_runs_appear_in_the_servers_history_and_both_write_to_one_outputs_folder(workdir):
    from fastapi.testclient import TestClient

    from sdstudio import Settings
    from sdstudio.server.app import create_app

    made = run(["txt2img", "a red circle on a blue background", "-m", "tiny", "--steps", "2", "--seed", "5"], workdir,
               workdir / "home")
    assert made.returncode == 0, made.stderr
    path = workdir / made.stdout.split()[0]
    assert path.parent.parent.parent == workdir / "outputs"  # outputs/txt2img-images/<date>/
    settings = Settings.from_env(home=workdir / "home", outputs_dir=workdir / "outputs", device=torch.device("cpu"),
                                 dtype=torch.float32, default_model="tiny")
    with TestClient(create_app(settings, workdir / "home" / "server", start_worker=False)) as client:
        jobs = client.get("/api/v1/jobs").json()["jobs"]
        assert [j["kind"] for j in jobs] == ["cli-txt2img"] and jobs[0]["status"] == "done"
        image = client.get(jobs[0]["result"]["images"][0])
        assert image.status_code == 200 and image.content == path.read_bytes()
        assert client.get(f"/api/v1/jobs/{jobs[0]['id']}/request").json()["seed"] == 5
