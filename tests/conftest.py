import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))
# The CPU's measured choices (aa_trt.autotune: layout, attention) depend on the machine's load
# at the moment they are timed, so tests would not be repeatable with them: the suite (and the
# processes it starts) takes each choice's plain default; tests/test_cpu_fast_paths.py forces
# every choice in turn and checks it against the plain computation.
os.environ.setdefault("AA_TRT_AUTOTUNE", "0")
# Without CUDA the Triton kernels run in Triton's CPU interpreter (tests/test_kernels.py). Triton
# reads TRITON_INTERPRET when it is first imported as well as when a kernel is decorated and
# launched; set here, before any test module is collected, it holds for whichever module imports
# triton first (set only in test_kernels.py, a module collected earlier that imported triton left
# every kernel failing with "Cannot call @triton.jit'd outside of the scope of a kernel").
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _private_pose_cache(tmp_path_factory):
    # Tests must not read poses a previous run cached in ~/.cache, nor leave any there.
    import os

    old = os.environ.get("AA_TRT_CACHE")
    os.environ["AA_TRT_CACHE"] = str(tmp_path_factory.mktemp("aa_trt_cache"))
    yield
    if old is None:
        os.environ.pop("AA_TRT_CACHE", None)
    else:
        os.environ["AA_TRT_CACHE"] = old


@pytest.fixture(scope="module")
def one_thread_module():
    """Tiny-model ops are far too small to share out: on 2 busy cores a second OpenMP thread only
    adds waiting (measured ~10x slower steps, ~3x slower tracing). Use with
    `pytestmark = pytest.mark.usefixtures("one_thread_module")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

