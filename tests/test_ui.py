"""`aa-trt ui`: the page's logic on a tiny checkpoint (default run), and the real page in Debian's
headless Chromium driven by Playwright (marker `ui`: a server process on the embedded model, runs
through the browser; `.ci/run` runs them in their own step).

AA_TRT_UI_SCREENSHOT=docs/ui.png makes the browser test save the page after its run there."""
from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest
from PIL import Image

from aa_trt.errors import InputError, OptionError
from helpers import save_tiny_checkpoint
from media import make_reference, make_video, probe, stick_frames

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny-model runs: one thread is faster

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
# Headless on this closed network: no background connections, a fresh profile (Playwright makes
# one for every launch).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# -- the page's logic, no browser ---------------------------------------------------------------

def test_settings_map_onto_run_options():
    from aa_trt.ui import PageSettings

    kw = PageSettings().options()
    assert kw["steps"] is None and kw["seed"] is None and kw["width"] is None and kw["frames"] is None
    assert "guidance" not in kw  # empty: the checkpoint's own
    kw = PageSettings(steps=3.0, random_seed=False, seed=11.0, width=0, height=136.0, frames=0,
                      guidance=2.5, align=False, dtype="fp32", context_schedule="sliding").options()
    assert (kw["steps"], kw["seed"], kw["width"], kw["height"], kw["frames"]) == (3, 11, None, 136, None)
    assert (kw["guidance"], kw["align"], kw["dtype"], kw["context_schedule"]) == (2.5, False, "fp32", "sliding")
    with pytest.raises(OptionError) as e:
        PageSettings(steps=2.5).options()
    assert e.value.param == "steps"
    assert "timestep_power" not in PageSettings(timestep_power=0).options()  # 0: the model's spacing
    assert PageSettings(timestep_power=2.5).options()["timestep_power"] == 2.5
    with pytest.raises(OptionError) as e:  # the library checks it, naming the parameter
        from aa_trt.run import RunOptions
        RunOptions.create(ref=Path("r.png"), driving=Path("d.mp4"), output=Path("o.mp4"),
                          **PageSettings(timestep_power=11).options())
    assert e.value.param == "timestep_power"


def test_missing_gradio_says_how_to_install(monkeypatch):
    from aa_trt import ui

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(InputError, match=r'pip install "aa-trt\[ui\]"'):
        ui.gradio()


def test_help_says_what_host_does(capsys):
    from aa_trt.cli import main

    with pytest.raises(SystemExit):
        main(["ui", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default 127.0.0.1" in out and "--host 0.0.0.0 exposes" in out and "explicit choice" in out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("ui")
    return {"dir": d, "ckpt": save_tiny_checkpoint(d / "tiny.safetensors", 300),
            "ref": make_reference(d / "ref.png", (48, 64)),
            "dance": make_video(d / "dance.mp4", stick_frames(10, (64, 64)), fps=10, audio=True)}


def test_generate_on_the_run_path(tiny, tmp_path):
    """generate() is run(): the result, its grid (reference | pose | result), the source's audio,
    the model loaded once for all runs, bad settings as the library's one-line error."""
    from aa_trt.ui import PageApp, PageSettings

    app = PageApp(ckpt=tiny["ckpt"], workdir=tmp_path / "work")
    settings = PageSettings(steps=2, context_frames=8, context_overlap=2, frames=8, random_seed=False, seed=5)
    calls = []
    out = app.generate(tiny["ref"], tiny["dance"], True, settings, lambda d, t: calls.append((d, t)))
    res, grid = probe(Path(out["video"])), probe(Path(out["grid"]))
    assert (res["frames"], res["fps"], res["audio"], res["codec"]) == (8, 10.0, 1, "h264")
    w, h = out["summary"]["width"], out["summary"]["height"]
    assert (res["width"], res["height"]) == (w, h)
    assert (grid["frames"], grid["width"], grid["height"], grid["audio"]) == (8, 3 * w, h, 1)
    assert out["summary"]["seed"] == 5 and out["loaded"]
    assert calls and calls[-1][0] == calls[-1][1] and calls[-1][1] >= 2  # every denoising unit
    assert {"read", "load", "pose", "animate", "write", "page videos"} <= set(out["seconds"])
    assert not (tmp_path / "work" / "job-00001" / "grid-lossless.mp4").exists()

    # The frames are those `aa-trt run` renders for the same options (one code path): against a
    # lossless CLI render (crf=0) the page's video is about as close as the CLI's own default
    # encode, and so is the grid's right third; another seed is far from it.
    from aa_trt.run import run

    def cli_video(crf):
        opts = app.run_options(tiny["ref"], tiny["dance"], True, settings, tmp_path / f"cli-{crf}.mp4")
        run(dataclasses.replace(opts, crf=crf), make_animator=app.make_animator)
        return probe(tmp_path / f"cli-{crf}.mp4")["pixels"]

    def mad(a, b):
        return float(np.abs(a.astype(int) - b.astype(int)).mean())

    truth, cli = cli_video(0), cli_video(None)
    own = mad(cli, truth)  # what encoding at the default quality costs on its own
    assert mad(res["pixels"], truth) < 1.5 * own + 0.5, (mad(res["pixels"], truth), own)
    assert mad(grid["pixels"][:, :, 2 * w:], truth) < 1.5 * own + 0.5
    other = app.generate(tiny["ref"], tiny["dance"], True, dataclasses.replace(settings, seed=6))
    assert not other["loaded"] and app.model_loads == 1  # one load for four runs
    assert mad(probe(Path(other["video"]))["pixels"], truth) > 3 * mad(res["pixels"], truth)

    with pytest.raises(OptionError) as e:
        app.generate(tiny["ref"], tiny["dance"], True, PageSettings(width=100))
    assert app.message(e.value) == "Error: width=100: must be a positive multiple of 8"
    with pytest.raises(InputError) as e:
        app.generate(None, tiny["dance"], True, settings)
    assert "give a reference image" in app.message(e.value)


def test_messages_are_one_line_without_upload_folders(tmp_path):
    from aa_trt.ui import PageApp

    upload = tmp_path / "gradio" / "0123abcd" / "me.png"
    e = InputError(f"{upload}: no person found in the reference image (drive it without alignment)")
    assert PageApp.message(e, upload) == ("Error: me.png: no person found in the reference image "
                                          "(drive it without alignment)")
    line = PageApp.message(ValueError("bad\nthing"))
    assert line == "Error: unexpected error (ValueError: bad thing); the server's log has the details"


def test_preview_of_a_pose_video_is_the_video(tiny):
    from aa_trt.ui import PageApp, PageSettings

    app = PageApp(ckpt=tiny["ckpt"], workdir=tiny["dir"] / "work-preview")
    out = app.preview(None, tiny["dance"], True, PageSettings())
    assert out["video"] == str(tiny["dance"]) and "pose video" in out["note"]


def test_one_queue_for_the_device(tiny):
    """Generate and the pose preview share one queue of one: two tabs never run on the device at
    the same time."""
    pytest.importorskip("gradio", reason='gradio is not installed (pip install "aa-trt[ui]")')
    from aa_trt.ui import PageApp, build

    demo = build(PageApp(ckpt=tiny["ckpt"], workdir=tiny["dir"] / "work-queue"))
    fns = {f.name: f for f in demo.fns.values()}
    for name in ("on_generate", "on_preview"):
        assert fns[name].queue and fns[name].concurrency_limit == 1, name
    assert fns["on_generate"].concurrency_id == fns["on_preview"].concurrency_id


# -- the page in a real browser -------------------------------------------------------------------

def _browser_tests_selected(config) -> bool:
    """The browser tests run when asked for (`-m ui`, as .ci/run's second step does, or
    AA_TRT_UI_TESTS=1): the README's default command (-m "not slow") leaves them out."""
    return "ui" in (config.getoption("markexpr") or "").split() or os.environ.get("AA_TRT_UI_TESTS") == "1"


def _need_browser_stack(config):
    if not _browser_tests_selected(config):
        pytest.skip("browser test: runs on its own (python -m pytest -q -m ui tests/test_ui.py, "
                    ".ci/run's second step; or AA_TRT_UI_TESTS=1)")
    pytest.importorskip("gradio", reason='gradio is not installed (pip install "aa-trt[ui]")')
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM} missing: apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    """`aa-trt ui` on the embedded model, on a free 127.0.0.1 port; `timeout` stops it by itself
    should this process die before the teardown."""
    _need_browser_stack(request.config)
    if shutil.which("timeout") is None:
        pytest.skip("coreutils' timeout is missing")
    port = _free_port()
    log = tmp_path_factory.mktemp("ui-server") / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(["timeout", "900", sys.executable, "-m", "aa_trt.cli", "ui",
                                 "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 240
    while True:
        if proc.poll() is not None:
            pytest.fail(f"aa-trt ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"aa-trt ui did not answer on {url} in 240 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield {"url": url, "log": log}
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]  # nothing failed unexpectedly behind the page


@pytest.fixture(scope="module")
def browser(request):
    _need_browser_stack(request.config)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    pg.goto(server["url"], wait_until="domcontentloaded")
    pg.locator("#aa-generate").wait_for()
    yield pg
    context.close()


def _status(page) -> str:
    return page.locator("#aa-status textarea").input_value()


def _click_and_wait(page, button: str, timeout_s: float = 400, watch: str | None = None):
    """Click, then wait for the status line to change; (the new line, whether `watch` was seen in
    the page meanwhile: the progress bar's text)."""
    before = _status(page)
    page.click(button)
    seen = False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if watch and not seen:
            seen = page.get_by_text(watch).count() > 0
        now = _status(page)
        if now != before:
            return now, seen
        time.sleep(0.1)
    raise AssertionError(f"the status stayed {before!r} for {timeout_s} s after {button}")


def _fetch(page, selector: str, attr: str, path: Path) -> dict:
    """The file an element points to (a <video> src, a download link), as the page serves it."""
    el = page.locator(selector).first
    el.wait_for(state="attached")
    url = urljoin(page.url, el.get_attribute(attr))
    body = page.request.get(url)
    assert body.ok, (url, body.status)
    path.write_bytes(body.body())
    return probe(path)


def _upload(page, elem_id: str, path: Path) -> None:
    """Put a file into an image or video input, clearing what it holds first (as a user would)."""
    for label in ("Clear", "Remove Image"):
        button = page.locator(f"#{elem_id} button[aria-label='{label}']")
        if button.count() and button.first.is_visible():
            button.first.click()
    page.locator(f"#{elem_id} input[type=file]").set_input_files(str(path))
    page.locator(f"#{elem_id} img, #{elem_id} video").first.wait_for(state="attached")


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input")
    box.fill(str(value))
    box.press("Tab")


@pytest.mark.ui
def test_page_runs_the_bundled_example(page, tmp_path):
    """Load the page, take the bundled example, preview its pose, generate with few steps, and
    read back what the page plays and offers for download."""
    import av

    with av.open(str(REPO / "examples" / "dance.mp4")) as c:
        src_fps = float(c.streams.video[0].average_rate)
    page.click("#aa-example")
    page.locator("#aa-ref img").wait_for()
    page.locator("#aa-driving video").wait_for(state="attached")
    shot = os.environ.get("AA_TRT_UI_SCREENSHOT")
    steps = 20 if shot else 3  # the picture in the README shows the default steps
    _set_number(page, "aa-frames", 8)
    _set_number(page, "aa-steps", steps)
    page.locator("#aa-random input").uncheck()
    _set_number(page, "aa-seed", 7)

    line, _ = _click_and_wait(page, "#aa-preview", 120)
    assert line.startswith("pose preview: 8 frames, a person in 8"), line
    pose = _fetch(page, "#aa-pose video", "src", tmp_path / "pose.mp4")
    assert (pose["frames"], pose["width"], pose["height"]) == (8, 256, 128)  # source | skeleton

    t = time.monotonic()
    line, progress_seen = _click_and_wait(page, "#aa-generate", watch="denoising")
    took = time.monotonic() - t
    assert line.startswith("Done: 8 frames 128x128 at 15 fps"), line
    assert "seed 7" in line and f"{steps} ddim steps" in line
    from aa_trt.checkpoint import read_config
    from aa_trt.run import DEFAULT_MODEL

    assert f"guidance {read_config(DEFAULT_MODEL).guidance:g};" in line  # the model's, untouched
    assert progress_seen, "the progress bar never showed the denoising steps"
    result = _fetch(page, "#aa-result video", "src", tmp_path / "result.mp4")
    assert (result["frames"], result["width"], result["height"], result["fps"]) == (8, 128, 128, src_fps)
    assert result["codec"] == "h264"
    download = _fetch(page, "#aa-download a", "href", tmp_path / "download.mp4")
    assert np.array_equal(download["pixels"], result["pixels"])
    grid = _fetch(page, "#aa-grid video", "src", tmp_path / "grid.mp4")
    assert (grid["frames"], grid["width"], grid["height"]) == (8, 3 * 128, 128)
    assert grid["pixels"][:, :, :128].std() > 5  # the reference panel is a picture, not blank
    times = page.locator("#aa-times").inner_text()
    for stage in ("read", "load", "pose", "animate", "write", "total"):
        assert stage in times, times
    print(f"generate through the page: {took:.1f} s")
    # The page shows the result: the video element has loaded frames it can play.
    page.wait_for_function("() => { const v = document.querySelector('#aa-result video');"
                           " return v && v.readyState >= 2 && v.videoWidth === 128; }", timeout=30_000)
    if shot:
        page.locator("#aa-result video").evaluate("v => { v.pause(); v.currentTime = v.duration / 2; }")
        time.sleep(1.0)
        page.screenshot(path=str(REPO / shot if not os.path.isabs(shot) else shot), full_page=True)


@pytest.mark.ui
def test_bad_inputs_show_one_line_and_the_next_run_works(page, tmp_path):
    # A reference with nobody in it: the pose stage's own message, with the file's name.
    blank = tmp_path / "empty_wall.png"
    Image.new("RGB", (96, 128), (235, 235, 230)).save(blank)
    page.click("#aa-example")
    page.locator("#aa-driving video").wait_for(state="attached")
    _upload(page, "aa-ref", blank)
    _set_number(page, "aa-frames", 4)
    _set_number(page, "aa-steps", 1)
    line, _ = _click_and_wait(page, "#aa-generate", 240)
    assert line.startswith("Error: empty_wall.png: no person found in the reference image"), line
    assert "\n" not in line and "Traceback" not in page.content()

    # A setting the library refuses, named as the library names it.
    _set_number(page, "aa-width", 100)
    line, _ = _click_and_wait(page, "#aa-generate", 60)
    assert line == "Error: width=100: must be a positive multiple of 8", line
    _set_number(page, "aa-width", 0)

    # A driving "video" that is not one.
    junk = tmp_path / "not_a_video.mp4"
    junk.write_bytes(b"this is text, not a video\n" * 20)
    _upload(page, "aa-driving", junk)
    line, _ = _click_and_wait(page, "#aa-generate", 60)
    assert "not_a_video.mp4" in line and "not a readable video" in line, line

    # The server kept serving: a good run on uploaded files, a pose video with a soundtrack.
    ref = make_reference(tmp_path / "character.png", (64, 64))
    dance = make_video(tmp_path / "sticks.mp4", stick_frames(6, (64, 64)), fps=10, audio=True)
    _upload(page, "aa-ref", ref)
    _upload(page, "aa-driving", dance)
    page.locator("#aa-pose-video input").check()
    _set_number(page, "aa-frames", 0)
    _set_number(page, "aa-steps", 2)
    time.sleep(1.0)
    line, _ = _click_and_wait(page, "#aa-generate", 300)
    assert line.startswith("Done: 6 frames 128x128 at 10 fps, with the source's audio"), line
    assert "model reused from the last run" in line  # loaded once, for the first run that got there
    result = _fetch(page, "#aa-result video", "src", tmp_path / "result.mp4")
    assert (result["frames"], result["width"], result["height"], result["fps"], result["audio"]) == \
        (6, 128, 128, 10.0, 1)
