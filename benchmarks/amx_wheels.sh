#!/usr/bin/env bash
# Where pip reaches an index, before `benchmarks/amx_checks.sh` runs on a machine without network:
# downloads OpenVINO's wheel for Python 3.12 (manylinux x86_64) into .whl/ (git ignores it, ~50 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl "openvino>=2025.0" openvino-telemetry
ls -l .whl
