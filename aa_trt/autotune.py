"""Choices made by measuring this machine, once, like cudnn.benchmark: which memory layout the
UNet's activations keep, which attention implementation a shape runs.

CPUs differ in what is fast: on a Xeon with AMX, bf16 3x3 convolutions run ~3.6x faster in
channels-last than in NCHW and the attention's matmuls at 2 TFLOP/s; on an AMD EPYC without AMX
the two layouts are within a few percent and CPU flash attention wins at small head dims. A
rule written from one machine is wrong on the other, so each choice is timed here on the shapes
the run needs, the first time they are needed, and the winner is kept:

- in memory for the process;
- on disk, in `$AA_TRT_CACHE/tuning.json` (default `~/.cache/aa-trt`), keyed by this machine's
  fingerprint (CPU model and flags, threads, torch version), so later runs pay nothing.

`AA_TRT_AUTOTUNE=0` turns measuring off: every choice then takes its first candidate (the
plain path), which is what the tests use to pin a choice, with `override` to force one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

# A candidate replaces the default (the first, plain one) only when it measured faster by more
# than this fraction: a tie on a noisy machine keeps the simpler path.
MARGIN = 0.05
_lock = threading.RLock()  # reentrant: a timed candidate (a whole UNet call) makes choices of its own
_memory: dict[str, str] = {}
_loaded = False
_forced: dict[str, str] = {}
# timer(name, fn) -> seconds: a parameter (and a module attribute) so that tests can play a
# machine of either kind.
Timer = Callable[[str, Callable[[], object]], float]


def cache_file() -> Path:
    root = os.environ.get("AA_TRT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aa-trt"
    return Path(root) / "tuning.json"


def enabled() -> bool:
    return os.environ.get("AA_TRT_AUTOTUNE", "1") not in ("0", "false", "off", "")


def fingerprint() -> str:
    """What makes a measurement valid elsewhere: the CPU, its flags, threads and torch."""
    import torch

    from aa_trt.precision import Machine

    m = Machine.detect()
    text = f"{m.cpu_model}|{' '.join(sorted(m.cpu_flags))}|{torch.get_num_threads()}|{torch.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def best_time(name: str, fn: Callable[[], object], reps: int = 3) -> float:
    """Best of up to `reps` timed calls after one warm-up (first calls create oneDNN primitives);
    a candidate whose warm-up took over 0.2 s is timed once more, one over 1 s not again (its
    first call is the measurement: the one-time cost stays bounded)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first > 1.0:  # a call this long is its own work, not first-call set-up: timed once
        return first
    if first > 0.2:
        reps = 1
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        data = json.loads(cache_file().read_text())
        entries = data.get(fingerprint(), {}) if isinstance(data, dict) else {}
        _memory.update({k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, str)})
    except (OSError, ValueError):
        pass  # no cache yet, or an unreadable one: measure again


def _save(key: str, choice: str) -> None:
    """Merge one entry into the cache file (written whole to a temporary name, then renamed)."""
    path = cache_file()
    try:
        try:
            data = json.loads(path.read_text())
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        data.setdefault(fingerprint(), {})[key] = choice
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the choice still holds for this process


def choose(key: str, names: Sequence[str], make: Callable[[], Mapping[str, Callable[[], object]]],
           timer: Timer | None = None) -> str:
    """Which of `names` runs fastest for `key`, measured once per machine. `make()` builds the
    timed work, {name: zero-argument call}, all doing the same job; it is only called when a
    measurement is needed. The first name is the default when measuring is off. The chosen name
    is what callers dispatch on."""
    names = list(names)
    with _lock:
        for prefix, forced in _forced.items():
            if key.startswith(prefix):
                return forced
        if timer is None:
            _load()
            if key in _memory and _memory[key] in names:
                return _memory[key]
            if not enabled():
                return names[0]
        candidates = make()
        measure = timer or best_time
        times = {name: measure(name, candidates[name]) for name in names}
        choice = min(names, key=lambda n: times[n])
        if times[names[0]] <= times[choice] * (1 + MARGIN):
            choice = names[0]  # within the noise of one measurement: keep the plain default
        _memory[key] = choice
    if timer is None:
        _save(key, choice)
    return choice


def chosen() -> dict[str, str]:
    """Every choice made or loaded in this process (for a results file or the summary)."""
    return dict(_memory)


@contextlib.contextmanager
def override(choices: Mapping[str, str]) -> Iterator[None]:
    """Force choices for the duration: {key prefix: candidate name} (tests; a benchmark pinning
    one side, e.g. {"layout:": "nchw"})."""
    with _lock:
        saved = dict(_forced)
        _forced.update(choices)
    try:
        yield
    finally:
        with _lock:
            _forced.clear()
            _forced.update(saved)


def forget() -> None:
    """Drop what this process has measured or loaded (tests)."""
    global _loaded
    with _lock:
        _memory.clear()
        _loaded = False
