"""`aa-trt batch jobs.jsonl`: many videos, shared among torchrun ranks, resumable.

One JSON object per line: {"ref": ..., "driving": ..., "output": ..., plus any `aa-trt run` option
by its RunOptions name, e.g. "steps": 20, "seed": 1, "pose_video": true}. Relative paths are
relative to the jobs file's folder. Job i (0-based, blank lines and lines starting with # not
counted) runs on rank i % world; each rank runs its jobs one after another in one process.

A job whose output exists is skipped: that is what makes a batch resumable (outputs appear only
when complete, see files.atomic_output), and a result already there is never replaced; with
`overwrite` the jobs whose output exists but whose status record does not say this batch finished
it render again and replace it. Before any job runs, every job's output is checked against every
job's inputs and the jobs file (files.guard_outputs): one that is, contains or lies inside an input
refuses the whole batch. Each job's state goes to its own file,
JOBS.status/job-00000.json (written atomically, so no locking between processes): running, done,
skipped, failed (with the error) or interrupted. A failed job does not stop the batch; it runs
again on the next start (it has no output). The exit code is 1 if any job failed, 3 if a job
failed because a file could not be written or read (disk full, read-only...). The status records
are the batch's notes, not its results: one the disk cannot take is left out (the output, when it
is written, still tells the next start that the job is done).
"""
from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

from aa_trt import process_group as D
from aa_trt.errors import AATrtError, InputError, StorageError
from aa_trt.files import clash, remove_stale_partials, write_json

PATH_FIELDS = ("ref", "driving", "output", "ckpt", "engine", "dwpose")
REQUIRED = ("ref", "driving", "output")
BATCH_TIMEOUT_S = 7 * 24 * 3600  # the closing gather waits for the slowest rank's jobs
BATCH_TIMEOUT_ENV = "AA_TRT_BATCH_TIMEOUT"


def status_dir(jobs: Path) -> Path:
    return jobs.with_name(jobs.name + ".status")


def status_path(folder: Path, index: int) -> Path:
    return folder / f"job-{index:05d}.json"


def write_status(path: Path, record: dict) -> None:
    """Atomic (files.atomic_output): readers never see half a record. A record the disk cannot
    take (full, read-only) is left out: the outputs are the batch's results, not these notes."""
    try:
        write_json(path, record, indent=None)
    except StorageError:
        pass


def read_status(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_jobs(path: Path) -> list[tuple[int, dict | Exception]]:
    """[(line number, job dict or the error that line has)], one per non-blank, non-# line."""
    if not path.is_file():
        raise InputError(f"{path}: no such jobs file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); one JSON object per line") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            job = json.loads(line)
            if not isinstance(job, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            job = InputError(f"{path}:{n}: not a JSON object ({e})")
        out.append((n, job))
    return out


def job_options(job: dict, base: Path, defaults: dict):
    """A job's RunOptions: its keys (dashes or underscores; any RunOptions or SampleOptions
    field) over the batch defaults. A bad value raises the options' own OptionError."""
    from aa_trt.options import SampleOptions
    from aa_trt.run import RunOptions

    fields = (set(RunOptions.fields()) | set(SampleOptions.fields())) - {"sample", "quiet", "parallel", "overwrite"}
    # The batch's own defaults (command-line flags) are relative to the working folder, the
    # job's paths to the jobs file's folder.
    kw = {k: (Path(v).absolute() if k in PATH_FIELDS else v) for k, v in defaults.items() if v is not None}
    for key, value in job.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise InputError(f"unknown job option {key!r}; expected some of: {', '.join(sorted(fields))}")
        if name in PATH_FIELDS and value is not None:
            value = Path(os.path.expanduser(str(value)))
            value = value if value.is_absolute() else base / value
        kw[name] = value
    missing = [k for k in REQUIRED if not kw.get(k)]
    if missing:
        raise InputError(f"job without {', '.join(missing)}")
    kw["quiet"] = True
    return RunOptions.create(**kw)


INPUT_NAMES = {"ref": "reference image", "driving": "driving video", "ckpt": "checkpoint",
               "engine": "engine folder", "dwpose": "DWPose folder"}


def _job_paths(job: dict, base: Path, defaults: dict) -> dict[str, Path]:
    """The job's files as job_options resolves them (any line that names them, valid or not)."""
    out = {k: Path(v).absolute() for k, v in defaults.items() if k in PATH_FIELDS and v is not None}
    for key, value in job.items():
        name = key.replace("-", "_")
        if name in PATH_FIELDS and isinstance(value, str) and value:
            p = Path(os.path.expanduser(value))
            out[name] = p if p.is_absolute() else base / p
    return out


def check_outputs(jobs_path: Path, jobs: list, defaults: dict) -> None:
    """Before any job: no job's output is, contains or lies inside the jobs file or any job's
    input (InputError naming the line: the whole batch is refused)."""
    paths = [(line, _job_paths(job, jobs_path.parent, defaults)) for line, job in jobs if isinstance(job, dict)]
    inputs = [("jobs file", jobs_path)]
    for line, p in paths:
        inputs += [(f"{INPUT_NAMES[k]} of line {line}", v) for k, v in p.items() if k in INPUT_NAMES]
    for line, p in paths:
        if "output" not in p:
            continue
        for what, inp in inputs:
            how = clash(p["output"], inp)
            if how is not None:
                raise InputError(f"{jobs_path}:{line}: output {p['output']} {how} the {what} ({inp}); "
                                 f"an output never replaces an input: choose another output")


def run_batch(jobs_path, defaults: dict | None = None, status: Path | None = None,
              print_fn=print, overwrite: bool = False) -> dict:
    """Run this rank's share of the jobs; returns the summary over all ranks (gathered).
    `overwrite`: render again jobs whose output exists without a record of this batch's."""
    jobs_path = Path(jobs_path)
    started = D.init_process_group("cpu", backend="gloo", timeout_s=BATCH_TIMEOUT_S, timeout_env=BATCH_TIMEOUT_ENV)
    try:
        rank, world = D.rank(), D.world_size()
        jobs = read_jobs(jobs_path)
        folder = Path(status) if status is not None else status_dir(jobs_path)
        folder.mkdir(parents=True, exist_ok=True)
        counts = {"done": 0, "skipped": 0, "failed": 0}
        failures = []
        outputs: dict[str, int] = {}
        planned = []
        for i, (line, job) in enumerate(jobs):  # every rank parses every job: the same duplicates
            opts = job
            if not isinstance(job, Exception):
                try:
                    opts = job_options(job, jobs_path.parent, defaults or {})
                    key = str(opts.output.resolve())
                    if key in outputs:
                        raise InputError(f"{opts.output}: same output as job {outputs[key]}")
                    outputs[key] = i
                except AATrtError as e:
                    opts = InputError(f"{jobs_path}:{line}: {e}")
            planned.append((i, line, opts))
        check_outputs(jobs_path, jobs, defaults or {})
        cache: dict = {}
        for i, line, opts in planned:
            if i % world != rank:
                continue
            state, detail = _one(i, line, opts, status_path(folder, i), rank, cache, overwrite)
            counts[state] += 1
            if state == "failed":
                failures.append({"job": i, "line": line, "error": str(detail),
                                 "storage": isinstance(detail, StorageError)})
            if state != "skipped":
                where = f"[rank {rank}] " if world > 1 else ""
                print_fn(f"{where}job {i} (line {line}): {state}" + (f": {detail}" if str(detail) else ""))
        parts = D.all_gather_object({"rank": rank, "counts": counts, "failures": failures})
    finally:
        D.shutdown(started)
    total = {k: sum(p["counts"][k] for p in parts) for k in counts}
    fails = sorted((f for p in parts for f in p["failures"]), key=lambda f: f["job"])
    return {"jobs": len(jobs), **total, "failures": fails, "status": str(folder), "world_size": world}


def _one(i: int, line: int, opts, path: Path, rank: int, cache: dict,
         overwrite: bool = False) -> tuple[str, str | AATrtError]:
    import dataclasses

    from aa_trt.files import finished_result
    from aa_trt.run import run

    base = {"job": i, "line": line, "rank": rank, "pid": os.getpid()}
    if isinstance(opts, Exception):
        write_status(path, {**base, "state": "failed", "error": str(opts), "finished": time.time()})
        return "failed", opts
    base["output"] = str(opts.output)
    old = read_status(path)
    ours = bool(old and old.get("state") == "done" and old.get("output") == str(opts.output))
    exists = opts.output.is_file() or (opts.output.is_dir() and finished_result(opts.output))
    if exists and (ours or not overwrite):
        if not (old and old.get("state") in ("done", "skipped") and old.get("output") == str(opts.output)):
            write_status(path, {**base, "state": "skipped", "reason": "output exists", "finished": time.time()})
        return "skipped", ""
    if exists:
        opts = dataclasses.replace(opts, overwrite=True)
    t0 = time.time()
    write_status(path, {**base, "state": "running", "started": t0})
    remove_stale_partials(opts.output)

    def make_animator(ckpt, device, dtype):
        from aa_trt.pipeline import Animator

        key = (str(Path(ckpt).resolve()), str(D.local_device(str(device))), str(dtype))
        if key not in cache:
            cache.clear()  # one model in memory at a time
            cache[key] = Animator.from_pretrained(ckpt, device=key[1], dtype=dtype)
        return cache[key]

    try:
        result = run(opts, make_animator=make_animator)
    except AATrtError as e:
        err = e
    except OSError as e:  # a read or write the system refused: the batch goes on, the code says it
        from aa_trt.files import is_storage_failure, storage_error

        if not is_storage_failure(e):
            err = InputError(f"{type(e).__name__}: {e}")
            base["traceback"] = traceback.format_exc()
        else:
            err = storage_error(e)
    except Exception as e:  # noqa: BLE001 -- one bad job must not stop the batch
        err = InputError(f"{type(e).__name__}: {e}")
        base["traceback"] = traceback.format_exc()
    except BaseException:
        write_status(path, {**base, "state": "interrupted", "started": t0, "finished": time.time()})
        raise
    else:
        write_status(path, {**base, "state": "done", "started": t0, "finished": time.time(),
                            "seconds": round(time.time() - t0, 3), "result": result})
        return "done", ""
    write_status(path, {**base, "state": "failed", "error": str(err), "started": t0, "finished": time.time()})
    return "failed", err


def summary_line(s: dict) -> str:
    return (f"batch: {s['jobs']} jobs: {s['done']} done, {s['skipped']} skipped (output exists), "
            f"{s['failed']} failed; status in {s['status']}")
