#!/usr/bin/env bash
# Run on the development machine (where pip reaches an index) before `benchmarks/amx_session.sh`:
# downloads OpenVINO's wheel for the device image's Python (3.12; the image has no openvino) into
# .whl/ (git ignores it), ~50 MB of the device call's 64 MiB carry.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl "openvino>=2025.0" openvino-telemetry
ls -l .whl
