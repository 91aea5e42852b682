#!/usr/bin/env bash
# Run on the development machine (where pip reaches an index) before a device call: downloads the
# pure-Python wheels that the GPU image lacks (diffusers and its importlib_metadata) into .whl/,
# which git ignores and `benchmarks/gpu_session.sh` installs when the call carries it.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
version=$(python3 -c 'import diffusers; print(diffusers.__version__)')
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl "diffusers==$version" importlib_metadata
ls -l .whl
