"""aa_trt.host_memory: freed large tensors reused instead of unmapped and faulted in again."""
import subprocess
import sys

import pytest

# In a fresh process (the setting is process-wide): page faults of each of 20 cycles of a 64 MiB
# tensor made, written in full and freed (a render repeats its allocations in the same way).
CHILD = """
import resource, torch
from aa_trt.host_memory import keep_freed_memory
kept = keep_freed_memory()
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults)
"""


def _faults(env_value: str) -> tuple[bool, list[int]]:
    import os

    env = dict(os.environ, AA_TRT_KEEP_FREED_MEMORY=env_value)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    kept, *faults = out.stdout.split()
    return kept == "True", [int(f) for f in faults]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux")
def test_freed_memory_is_reused_and_the_switch_turns_it_off():
    kept, faults = _faults("1")
    if not kept:
        pytest.skip("the C library is not glibc (no mallopt): nothing to test")
    off_kept, off_faults = _faults("0")
    assert not off_kept
    pages = (64 << 20) // 4096
    # malloc's own: every block unmapped on free, so every new one faults its pages in again
    assert all(f > pages // 2 for f in off_faults[-5:])
    # kept: once the heap holds blocks that fit (glibc's aligned blocks take a few cycles to
    # coalesce into one), a new tensor reuses freed pages
    assert sum(faults[-5:]) < pages // 4, faults
