"""Shared fixtures of the benchmarks, and the hook that writes their results.

`pytest benchmarks/` runs everything (pytest-benchmark tables plus our ratios); the results, with
the machine's description, land in benchmarks/results/<UTC time>-<machine>.json and a summary
table is printed at the end. The default test run (testpaths = tests) never collects this folder.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from aa_trt.config import PRESETS
from aa_trt.pipeline import Animator

from . import machine
from .results import Ledger, Record, markdown
from .workloads import ROOT, full_models

LEDGER = pytest.StashKey[Ledger]()
WRITTEN = pytest.StashKey[Path]()


def pytest_addoption(parser):
    group = parser.getgroup("aa-trt benchmarks")
    group.addoption("--bench-rounds", type=int, default=3,
                    help="timed rounds per comparison (each round runs aa-trt and the baseline once)")
    group.addoption("--bench-results", default=str(ROOT / "benchmarks" / "results"),
                    help="folder for the results JSON ('none': do not write one)")


def pytest_configure(config):
    from .op_profile import keep_freed_memory

    args = " ".join(config.invocation_params.args)
    kept = keep_freed_memory()  # what `aa-trt`'s own process does: the benchmarks time that process
    config.stash[LEDGER] = Ledger(dict(machine.describe(), keep_freed_memory=kept),
                                  invocation=f"pytest {args}".strip())


def pytest_sessionfinish(session):
    ledger = session.config.stash.get(LEDGER, None)
    folder = session.config.getoption("--bench-results", "none")
    if ledger is None or not ledger.records or folder == "none":
        return
    if hasattr(os, "getloadavg"):
        ledger.machine["loadavg_at_end"] = list(os.getloadavg())
    session.config.stash[WRITTEN] = ledger.write(Path(folder), machine.tag(ledger.machine))


def pytest_terminal_summary(terminalreporter, config):
    ledger = config.stash.get(LEDGER, None)
    if ledger is None or not ledger.records:
        return
    terminalreporter.section("aa-trt vs Moore-style baseline")
    terminalreporter.write_line(markdown(ledger.to_json()))
    path = config.stash.get(WRITTEN, None)
    if path is not None:
        terminalreporter.write_line(f"results written to {path}")


@pytest.fixture(scope="session")
def ledger(pytestconfig) -> Ledger:
    return pytestconfig.stash[LEDGER]


@pytest.fixture
def record(request, ledger):
    """record(name, value, unit, baseline=..., ...): one line of the results, with the command
    that reproduces it (this test's node id)."""
    def add(name, value, unit, **kw) -> Record:
        return ledger.add(Record(name, value, unit, command=f"pytest {request.node.nodeid}", **kw))
    return add


@pytest.fixture(scope="session")
def rounds(pytestconfig) -> int:
    return max(1, pytestconfig.getoption("--bench-rounds"))


@pytest.fixture
def one_thread():
    """Tiny-preset work on one thread: its ops are too small for a second thread to help, and on a
    shared 2-core machine every OpenMP barrier of a 2-thread op stalls while a neighbour's job
    holds the other core (the tiny pipeline ran ~10x slower on 2 threads than on 1 here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_animator() -> Animator:
    return Animator(full_models(PRESETS["tiny"], seed=0))
