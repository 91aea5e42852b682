#!/usr/bin/env bash
# Where pip reaches an index, before `benchmarks/gpu_checks.sh` runs on a machine without network:
# downloads the pure-Python wheels a bare GPU image may lack (diffusers, for the whole-model tests, and
# importlib_metadata) into .whl/, which git ignores and gpu_checks.sh installs when it is there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
version=$(python3 -c 'import diffusers; print(diffusers.__version__)')
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl "diffusers==$version" importlib_metadata
ls -l .whl
