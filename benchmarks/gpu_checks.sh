#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in about 8 minutes on one card:
#   1. the CUDA tests (Triton kernels at SD1.5 shapes, the whole step with kernels against the plain
#      path, --offload memory, CUDA graph against eager) and the kernels' compile report for this card;
#   2. the CUDA benchmarks (sd15 step against the Moore-style step in bf16 with MFU, CUDA graphs on/off,
#      each kernel against SDPA / F.group_norm + F.silu).
# Logs and the results JSON go to $OUT (default ./gpu_out).
#
# Usage, from the repository root of a checkout on the GPU machine:
#   bash benchmarks/gpu_checks.sh
# On a machine without network, first run benchmarks/gpu_wheels.sh where pip reaches an index and copy
# the .whl/ folder it fills along with the checkout: the wheels found there are installed first.
# Copy the results JSON into benchmarks/results/ to keep it.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
started=$(date +%s)

{ nvidia-smi; python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
"triton", triton.__version__, torch.cuda.get_device_name(0))'; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
    || { echo "pip install -e . failed:"; tail -20 "$OUT/install.log"; exit 1; }

# 1. Correctness on the GPU first: a kernel that is wrong is not worth timing.
timeout 200 python3 -m pytest -q -rs -p no:cacheprovider -m "not slow" tests/test_kernels.py tests/test_speed_options.py \
    2>&1 | tee "$OUT/tests_cuda.log"
tests_rc=${PIPESTATUS[0]}

# 1b. Every kernel launch of an sd15 step compiled for this card's architecture, with ptxas's and
# the driver's register / spill counts side by side (~20 s; the full CPU table is in docs/performance.md).
cc=$(python3 -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"sm_{a}{b}")' 2>/dev/null || echo sm_90)
timeout 60 python3 -m aa_trt.kernels.aot --arch "$cc" --chosen-only --json > "$OUT/kernels_aot.jsonl" 2> "$OUT/kernels_aot.log"
echo "kernels aot ($cc) rc=$?: $(tail -2 "$OUT/kernels_aot.log" | tr '\n' ' ')"

# 2. Timings (5 rounds per comparison), written as JSON with the card's name.
timeout 320 python3 -m pytest -q -rs -p no:cacheprovider benchmarks/test_cuda.py benchmarks/test_kernels_bench.py \
    --bench-rounds 5 --bench-results "$OUT" 2>&1 | tee "$OUT/bench_cuda.log"
bench_rc=${PIPESTATUS[0]}

echo "tests rc=$tests_rc, benchmarks rc=$bench_rc, $(( $(date +%s) - started )) s in all"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
