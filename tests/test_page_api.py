"""The page through gradio's own client, against a running `aa-trt ui` on 127.0.0.1: renders and
bad uploads (a text file as the picture or the video, decompression-bomb PNGs) sent at once; every
request is answered with a video or the app's one line, under named API parameters, and the server
keeps serving."""
from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import save_tiny_checkpoint
from media import make_reference, make_video, probe, stick_frames

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("gradio", reason='gradio is not installed (pip install "aa-trt[ui]")')
pytest.importorskip("gradio_client")


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header declares width x height pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = zlib.compress(b"\0" * (1 + 3 * width) * 8, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`aa-trt ui` on a tiny checkpoint, bound to 127.0.0.1; `timeout` stops it by itself should
    this process die before the teardown."""
    if shutil.which("timeout") is None:
        pytest.skip("coreutils' timeout is missing")
    d = tmp_path_factory.mktemp("page-api")
    ckpt = save_tiny_checkpoint(d / "tiny.safetensors", 310)
    port = _free_port()
    log = d / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(["timeout", "600", sys.executable, "-m", "aa_trt.cli", "ui", "--ckpt", str(ckpt),
                                 "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
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
            pytest.fail(f"aa-trt ui did not answer on {url} in 180 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield {"url": url, "log": log, "dir": d, "proc": proc}
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]  # nothing failed unexpectedly behind the page


def test_renders_and_bad_uploads_at_once(server):
    from gradio_client import Client, handle_file

    d = server["dir"]
    ref = make_reference(d / "ref.png", (64, 64))
    dance = make_video(d / "dance.mp4", stick_frames(4, (64, 64)), fps=10, audio=False)
    text = d / "notes.png"
    text.write_text("a text file, not a picture\n" * 20)
    text_video = d / "notes.mp4"
    text_video.write_text("a text file, not a video\n" * 20)
    bomb = bomb_png(d / "bomb.png", 30000, 30000)   # past PIL's own bomb limit
    big = bomb_png(d / "big.png", 9000, 8000)       # under PIL's, over the app's

    client = Client(server["url"], verbose=False)
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    names = [p["parameter_name"] for p in api["/generate"]["parameters"]]
    assert names[:4] == ["reference_image", "driving_video", "driving_is_pose_video", "steps"]
    assert "context_frames" in names and not any(n.startswith("param_") for n in names)
    assert [p["parameter_name"] for p in api["/pose_preview"]["parameters"]] == names

    quick = dict(driving_is_pose_video=True, steps=1, frames=4, context_frames=4, context_overlap=1,
                 random_seed=False, seed=3, api_name="/generate")
    requests = {
        "render": dict(reference_image=handle_file(str(ref)), driving_video=handle_file(str(dance)), **quick),
        "text as picture": dict(reference_image=handle_file(str(text)), driving_video=handle_file(str(dance)), **quick),
        "bomb": dict(reference_image=handle_file(str(bomb)), driving_video=handle_file(str(dance)), **quick),
        "big": dict(reference_image=handle_file(str(big)), driving_video=handle_file(str(dance)), **quick),
        "text as video": dict(reference_image=handle_file(str(ref)), driving_video=handle_file(str(text_video)), **quick),
        "preview of a bomb": dict(reference_image=handle_file(str(bomb)), driving_video=handle_file(str(dance)),
                                  driving_is_pose_video=False, api_name="/pose_preview"),
        "render again": dict(reference_image=handle_file(str(ref)), driving_video=handle_file(str(dance)), **quick),
    }
    with ThreadPoolExecutor(len(requests)) as pool:  # all at once: the queue answers each
        futures = {k: pool.submit(client.predict, **kw) for k, kw in requests.items()}
        answers = {k: f.result(timeout=300) for k, f in futures.items()}

    def status(k):
        s = answers[k][0]
        assert isinstance(s, str) and "\n" not in s.strip(), (k, s)
        return s

    assert status("render").startswith("Done: 4 frames"), status("render")
    video = answers["render"][1]
    video = video["video"] if isinstance(video, dict) else video
    assert probe(Path(video))["frames"] == 4
    assert status("render again").startswith("Done:")
    for k, needle in (("text as picture", "Error: notes.png: not a readable image"),
                      ("bomb", "Error: bomb.png: refused"), ("big", "Error: big.png: 9000x8000 pixels is more"),
                      ("text as video", "Error: notes.mp4: not a readable video"),
                      ("preview of a bomb", "Error: bomb.png: refused")):
        assert status(k).startswith(needle), (k, status(k))
        assert answers[k][1] is None
    assert server["proc"].poll() is None
    assert not (REPO / "aa_trt" / "ui.pyi").exists()  # gradio wrote no stub into the package
    with urllib.request.urlopen(server["url"], timeout=10) as r:  # still serving
        assert r.status == 200
