"""Scale-out on CPU with gloo: window / guidance / both parallel give the single-process
latents; failures reach every rank; `torchrun -m aa_trt run` writes the same video; `aa-trt batch`
shares jobs among ranks and resumes after a kill."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from aa_trt.cli import main as cli
from aa_trt.guidance import context_windows, make_plan
from helpers import save_tiny_checkpoint
from media import make_reference, make_video, probe, stick_frames

TIMEOUT = 180  # seconds any launched group may take before the test fails (2 busy cores)
STEP_KW = dict(steps=2, context_frames=3, context_overlap=1, seed=5, output="latent", progress=False)
# (name, parallel mode, frames, extra call arguments). Windows of 3 overlapping by 1 on 10 frames:
# 5 windows (closed loop), which divide evenly among neither 2 nor 3 ranks.
CASES = [
    ("window", "window", 10, {}),
    # 2 ranks: uncond | cond; 3 ranks: 1 uncond rank + 2 cond ranks sharing the windows (both at once)
    ("guidance", "guidance", 10, {"window_batch": 2}),
]
AFTER = ("nocfg", "guidance", 10, {"guidance": 1.0})  # without CFG: window parallel; run after failures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(n: int):
    rng = np.random.default_rng(0)
    ref = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    return ref, rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("dist") / "tiny.safetensors", 300)


# ---------------------------------------------------------------------------------- plans
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n_windows", [1, 2, 3, 4, 7, 30])
@pytest.mark.parametrize("mode", ["auto", "window", "guidance", "both"])
@pytest.mark.parametrize("cfg", [True, False])
def test_plans_cover_every_unit_once(world, n_windows, mode, cfg):
    plans = [make_plan(n_windows, world, r, cfg, mode) for r in range(world)]
    units = [(b, w) for p in plans for b in p.branches for w in p.windows]
    branches = ("uncond", "cond") if cfg else ("cond",)
    assert sorted(units) == sorted((b, w) for b in branches for w in range(n_windows))
    busiest = max(len(p.branches) * len(p.windows) for p in plans)
    assert busiest == plans[0].max_units
    if not cfg or world == 1 or mode == "window":
        assert {p.mode for p in plans} == {"single" if world == 1 else "window"}
    elif mode in ("guidance", "both"):
        assert {p.mode for p in plans} == {"guidance"}
        assert plans[0].groups == (world // 2, world - world // 2)


def test_auto_plan_picks_less_work():
    assert make_plan(1, 2, 0, True).mode == "guidance"  # one window: only the branches split
    assert make_plan(2, 2, 0, True).mode == "window"    # a tie: window (branches stay batched)
    assert make_plan(3, 3, 0, True).mode == "window"
    p = make_plan(1, 3, 2, True)                        # 3 ranks, 1 window: 1 uncond + 2 cond ranks
    assert p.mode == "guidance" and p.groups == (1, 2) and p.max_units == 1


# ---------------------------------------------------------------------------------- one video
def _worker(rank, world, port, ckpt, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), AA_TRT_DIST_TIMEOUT="120")
    torch.set_num_threads(1)
    from aa_trt import process_group as D
    from aa_trt.distributed import DistributedAnimator
    from aa_trt.errors import InputError

    started = D.init_process_group("cpu")
    load = DistributedAnimator.from_pretrained if rank == 0 else DistributedAnimator.follower
    anim = load(ckpt)
    assert (anim.models.vae is None) == (rank > 0)  # followers hold the denoising UNet only
    out = {}
    for name, mode, n, extra in CASES:
        anim.parallel = mode
        if rank == 0:
            lat = anim(*_inputs(n), **{**STEP_KW, **extra})
        else:
            lat = anim.follow()
        out[name] = {"latents": lat, "plan": anim.plan}

    def failure(fn):
        try:
            fn()
        except D.RankFailure as e:
            return str(e), e.exit_code
        return None

    # 1. the last rank fails inside a step (its UNet raises on its second call)
    last = world - 1
    real_step = anim.unet_step
    calls = []

    def failing_step(cond, *rest):
        step = real_step(cond, *rest)

        def f(*a):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("boom on purpose")
            return step(*a)
        return f

    if rank == last:
        anim.unet_step = failing_step
    anim.parallel = "window"
    out["fail_step"] = failure((lambda: anim(*_inputs(10), **STEP_KW)) if rank == 0 else anim.follow)
    anim.unet_step = real_step

    # 2. rank 0 fails before the conditioning exists (bad input); the others wait in follow()
    def lead_fails():
        with D.collective_errors():
            raise InputError("ref.png: no such file")
    out["fail_lead"] = failure(lead_fails if rank == 0 else anim.follow)

    # 3. a follower cannot load its model: rank 0 learns it at the start of denoising
    out["fail_load"] = failure((lambda: anim(*_inputs(10), **STEP_KW)) if rank == 0 else
                               (lambda: anim.follow(InputError("cuda:7: no such device") if rank == last else None)))

    # the group still works after agreed failures
    name, mode, n, extra = AFTER
    anim.parallel = mode
    lat = anim(*_inputs(n), **{**STEP_KW, **extra}) if rank == 0 else anim.follow()
    out[name] = {"latents": lat, "plan": anim.plan}
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    D.shutdown(started)


def _spawn(world, ckpt, out_dir):
    ctx = mp.start_processes(_worker, args=(world, free_port(), str(ckpt), str(out_dir)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.time() + TIMEOUT
    try:
        while not ctx.join(timeout=1):
            if time.time() > deadline:
                raise TimeoutError(f"{world} processes still running after {TIMEOUT} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def single(ckpt):
    """The single-process (plain Animator) latents of every case, at 1 thread like the workers."""
    from aa_trt.pipeline import Animator

    anim = Animator.from_pretrained(ckpt)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {name: anim(*_inputs(n), **{**STEP_KW, **extra}) for name, _, n, extra in CASES + [AFTER]}
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("world", [2, 3, pytest.param(4, marks=pytest.mark.slow)])
def test_parallel_matches_single_process(world, ckpt, single, tmp_path):
    ranks = _spawn(world, ckpt, tmp_path)
    n_windows = len(context_windows(10, 3, 1))
    assert n_windows == 5
    for name, mode, n, extra in CASES + [AFTER]:
        for r, res in enumerate(ranks):
            # fp32: the guidance split runs the branches at other batch sizes (other conv kernels)
            torch.testing.assert_close(res[name]["latents"], single[name], rtol=1e-5, atol=1e-4,
                                       msg=f"{name} rank {r}")
            assert torch.equal(res[name]["latents"], ranks[0][name]["latents"])  # ranks agree exactly
        plans = [res[name]["plan"] for res in ranks]
        assert sum(len(p.branches) * len(p.windows) for p in plans) == len(plans[0].all_branches) * n_windows
    # window parallel: 5 windows shared unevenly, both branches on every rank
    assert [len(res["window"]["plan"].windows) for res in ranks] == {2: [3, 2], 3: [2, 2, 1], 4: [2, 1, 1, 1]}[world]
    # guidance parallel: 2 ranks: one branch each, all windows; 3: 1 uncond rank + 2 cond ranks
    # sharing the windows 3 + 2 (guidance and window parallel together); 4: 2 x 2
    g = [res["guidance"]["plan"] for res in ranks]
    assert all(p.mode == "guidance" for p in g)
    assert [p.branches[0] for p in g] == {2: ["uncond", "cond"], 3: ["uncond", "cond", "cond"],
                                          4: ["uncond", "uncond", "cond", "cond"]}[world]
    assert [len(p.windows) for p in g] == {2: [5, 5], 3: [5, 3, 2], 4: [3, 2, 3, 2]}[world]
    assert all(res["nocfg"]["plan"].mode == "window" for res in ranks)
    for r, res in enumerate(ranks):
        assert res["fail_step"] == (f"rank {world - 1}: RuntimeError: boom on purpose", 1), r
        assert res["fail_lead"] == ("rank 0: ref.png: no such file", 2), r
        assert res["fail_load"] == (f"rank {world - 1}: cuda:7: no such device", 2), r


def test_one_process_is_the_plain_animator(ckpt, single):
    from aa_trt.distributed import DistributedAnimator

    anim = DistributedAnimator.from_pretrained(ckpt, parallel="guidance")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        name, _, n, extra = CASES[1]
        out = anim(*_inputs(n), **{**STEP_KW, **extra})
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, single[name]) and anim.plan.mode == "single"


# ---------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def media(tmp_path_factory, ckpt):
    d = tmp_path_factory.mktemp("media")
    return {"dir": d, "ckpt": ckpt, "ref": make_reference(d / "ref.png", (48, 64)),
            "dance": make_video(d / "dance.mp4", stick_frames(12, (64, 64)), fps=10, audio=True)}


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", AA_TRT_DIST_TIMEOUT="120")


def _torchrun(n, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(n),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "aa_trt", *args]


RUN_ARGS = ["--pose-video", "--steps", "2", "--context-frames", "4", "--context-overlap", "1", "--quiet",
            "--json", "--seed", "3"]


def test_torchrun_run_writes_the_single_process_video(media, tmp_path, capsys):
    one, two = tmp_path / "one.mp4", tmp_path / "two.mp4"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers: the same kernels, so the same pixels
    try:
        assert cli(["run", str(media["ref"]), str(media["dance"]), "-o", str(one), "--ckpt", str(media["ckpt"]),
                    *RUN_ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    cmd = _torchrun(2, "run", str(media["ref"]), str(media["dance"]), "-o", str(two), "--ckpt",
                    str(media["ckpt"]), *RUN_ARGS, "--parallel", "window")
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1  # only rank 0 reports
    assert lines[0]["world_size"] == 2 and lines[0]["parallel"] == "window: 2 ranks"
    a, b = probe(one), probe(two)
    assert (b["frames"], b["width"], b["height"], b["audio"]) == (12, 64, 88, 1)
    # Window parallel adds each frame's (at most 2) window predictions as the single process does,
    # so the latents are bitwise equal; the guidance split is compared on latents above (the tiny
    # random VAE amplifies 1e-5 latent differences to several grey levels).
    assert np.abs(a["pixels"].astype(int) - b["pixels"].astype(int)).max() <= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.mp4", "two.mp4"]


def test_torchrun_resumes_a_single_process_state(media, tmp_path, capsys, monkeypatch):
    from aa_trt.resume import ResumeState, state_path

    one, two = tmp_path / "one.mp4", tmp_path / "two.mp4"
    args = [str(media["ref"]), str(media["dance"]), "--ckpt", str(media["ckpt"]), *RUN_ARGS, "--resume",
            "--dtype", "fp32"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli(["run", *args[:2], "-o", str(one), *args[2:]]) == 0  # uninterrupted
        save = ResumeState.save

        def crash_after_first_step(self, info):
            save(self, info)
            raise KeyboardInterrupt  # as a Ctrl-C right after step 0 was saved

        monkeypatch.setattr(ResumeState, "save", crash_after_first_step)
        assert cli(["run", *args[:2], "-o", str(two), *args[2:]]) == 130
    finally:
        torch.set_num_threads(threads)
    monkeypatch.undo()
    capsys.readouterr()
    assert state_path(two).is_file() and not two.exists()
    r = subprocess.run(_torchrun(2, "run", *args[:2], "-o", str(two), *args[2:], "--parallel", "window"),
                       capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")][0]
    assert result["resumed_from_step"] == 1 and result["world_size"] == 2
    assert np.abs(probe(one)["pixels"].astype(int) - probe(two)["pixels"].astype(int)).max() <= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.mp4", "two.mp4"]


@pytest.mark.slow  # the same failures are checked without torchrun above; this is the CLI's wording
def test_torchrun_failure_stops_every_rank_with_one_message(media, tmp_path):
    cmd = _torchrun(2, "run", str(tmp_path / "missing.png"), str(media["dance"]), "-o", str(tmp_path / "o.mp4"),
                    "--ckpt", str(media["ckpt"]), *RUN_ARGS)
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
    assert r.returncode != 0
    errors = [x for x in r.stderr.splitlines() if x.startswith("aa-trt: error:")]
    assert errors == [f"aa-trt: error: rank 0: {tmp_path / 'missing.png'}: no such file"], r.stderr[-3000:]
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------- batch
def _jobs(path: Path, media, n: int, **extra) -> Path:
    jobs = [{"ref": str(media["ref"]), "driving": str(media["dance"]), "output": f"out{i}.mp4",
             "pose_video": True, "context_frames": 4, "context_overlap": 1, "seed": i, **extra}
            for i in range(n)]
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def _states(status_dir: Path) -> dict:
    out = {}
    for p in status_dir.glob("job-*.json"):
        try:
            out[p.name] = json.loads(p.read_text())
        except ValueError:  # cannot happen with atomic writes; fail loudly if it does
            raise AssertionError(f"{p}: torn status file")
    return out


def test_batch_bad_jobs_are_recorded_and_the_rest_runs(media, tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    good = {"ref": str(media["ref"]), "driving": str(media["dance"]), "output": "good.mp4", "pose_video": True,
            "steps": 1, "context_frames": 4, "context_overlap": 1, "frames": 4}
    jobs.write_text("\n".join([
        json.dumps({**good, "ref": "missing.png", "output": "bad.mp4"}),
        "{not json",
        json.dumps({**good, "output": "unknown.mp4", "colour": "red"}),
        "",
        json.dumps(good),
        json.dumps({**good, "seed": 2}),  # same output as the job before it
    ]) + "\n")
    rc = cli(["batch", str(jobs), "--ckpt", str(media["ckpt"])])
    out, err = capsys.readouterr()
    assert rc == 1, err
    assert (tmp_path / "good.mp4").is_file() and not (tmp_path / "bad.mp4").exists()
    assert "4 done" not in out and "1 done" in out and "4 failed" in out
    states = _states(tmp_path / "jobs.jsonl.status")
    assert [states[f"job-{i:05d}.json"]["state"] for i in range(5)] == ["failed", "failed", "failed", "done", "failed"]
    assert "missing.png: no such file" in states["job-00000.json"]["error"]
    assert "not a JSON object" in states["job-00001.json"]["error"]
    assert "unknown job option 'colour'" in states["job-00002.json"]["error"]
    assert "same output as job 3" in states["job-00004.json"]["error"]
    assert err.count("failed:") == 4
    # run again: the done job is skipped, its status untouched
    before = (tmp_path / "jobs.jsonl.status" / "job-00003.json").read_text()
    assert cli(["batch", str(jobs), "--ckpt", str(media["ckpt"]), "--json"]) == 1
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, 1, 4)
    assert (tmp_path / "jobs.jsonl.status" / "job-00003.json").read_text() == before


def test_batch_two_processes_killed_and_resumed(media, tmp_path):
    jobs = _jobs(tmp_path / "jobs.jsonl", media, 5, steps=4)
    status = tmp_path / "jobs.jsonl.status"
    cmd = _torchrun(2, "batch", str(jobs), "--ckpt", str(media["ckpt"]), "--json")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    deadline = time.time() + TIMEOUT
    try:
        while time.time() < deadline and proc.poll() is None:
            states = _states(status)
            if sum(s["state"] == "done" for s in states.values()) >= 2:
                # a rank crashes mid-job (SIGKILL: no cleanup); torchrun then stops the other one
                running = {s["pid"] for s in states.values() if s["state"] == "running"}
                for pid in running:
                    os.kill(pid, signal.SIGKILL)
                if not running:
                    proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0
    first = _states(status)
    finished = {str(tmp_path / f"out{i}.mp4") for i in range(5) if (tmp_path / f"out{i}.mp4").exists()}
    done = {s["output"]: s for s in first.values() if s["state"] == "done"}
    assert len(done) >= 2 and set(done) <= finished, out[-2000:] + err[-3000:]
    if len(finished) == 5:
        pytest.skip("every job finished before the kill (machine too fast for this timing)")
    mtimes = {o: Path(o).stat().st_mtime_ns for o in finished}

    r = subprocess.run(_torchrun(2, "batch", str(jobs), "--ckpt", str(media["ckpt"]), "--json"),
                       capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["jobs"] == 5 and summary["failed"] == 0 and summary["world_size"] == 2
    assert (summary["skipped"], summary["done"]) == (len(finished), 5 - len(finished))
    for i in range(5):
        assert probe(tmp_path / f"out{i}.mp4")["frames"] == 12
    assert {o: Path(o).stat().st_mtime_ns for o in finished} == mtimes  # finished jobs were not redone
    final = _states(status)
    assert len(final) == 5 and {s["state"] for s in final.values()} <= {"done", "skipped"}
    assert all(s["rank"] == s["job"] % 2 for s in final.values())  # job i on rank i % 2
    for o, s in done.items():  # their status files were left as they were
        assert next(f for f in final.values() if f["output"] == o) == s
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".mp4") == [f"out{i}.mp4" for i in range(5)]
    assert not list(tmp_path.glob(".*partial*"))  # the killed jobs' temporaries were cleaned up
