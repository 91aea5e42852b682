#!/usr/bin/env bash
# The CPU speed targets for a CPU with AMX (`--dtype auto` >= 4x and the OpenVINO engine >= 5x the
# Moore-style fp32 pipeline), in about 6 minutes, on the CPU only:
#   0. the CPU: model, flags, and whether oneDNN really runs AMX under this kernel (a bf16 matmul's
#      GFLOP/s against fp32's: AMX gives ~5x);
#   1. benchmarks/test_precision_speed.py: the whole pipeline at sd15 half widths, Moore-style fp32
#      against aa-trt fp32, `--dtype auto` and the OpenVINO engine, same rounds;
#   2. benchmarks/test_cpu_rate.py: the same work against the machine's own bf16 matmul and conv
#      rates, attention on sd15 shapes, the VAE decode (about 15 more minutes on 2 cores).
# A host without amx_bf16 stops after step 0 (exit 0) and says so (FORCE=1 runs step 1 anyway).
#
# Usage, from the repository root:  bash benchmarks/amx_checks.sh
#   THREADS=N: the cores used (default 8); ROUNDS=N (default 2). Logs and results JSON go to $OUT
#   (default ./amx_out). On a machine without network, first run benchmarks/amx_wheels.sh where pip
#   reaches an index and copy the .whl/ folder along with the checkout.
set -uo pipefail
OUT=${OUT:-$PWD/amx_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=""
cd "$(dirname "$0")/.."
started=$(date +%s)
THREADS=${THREADS:-8}
ROUNDS=${ROUNDS:-2}
cores=$(nproc)
[ "$THREADS" -gt "$cores" ] && THREADS=$cores
PIN="taskset -c 0-$((THREADS - 1))"
command -v taskset > /dev/null || PIN=""

{ lscpu; echo "nproc $cores, using $THREADS"; grep -o -w 'amx_bf16\|amx_int8\|amx_tile\|avx512_bf16\|avx512f' /proc/cpuinfo | sort | uniq -c; } \
    > "$OUT/cpu.txt" 2>&1
grep -E "Model name|^nproc|^ +[0-9]+ (amx|avx512)" "$OUT/cpu.txt"
if ! grep -qw amx_bf16 /proc/cpuinfo && [ -z "${FORCE:-}" ]; then
    echo "no amx_bf16 on this host: the AMX speed targets cannot be measured here"
    exit 0
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
    || { echo "pip install -e . failed:"; tail -20 "$OUT/install.log"; exit 1; }

# 0. Does the matmul run on the AMX units under this kernel (it needs the tile-state permission)?
$PIN timeout 60 python3 - <<'PY' 2>&1 | tee "$OUT/amx_probe.txt"
import time, torch
print("torch", torch.__version__, "threads", torch.get_num_threads(), "capability", torch.backends.cpu.get_cpu_capability())
for dt in (torch.float32, torch.bfloat16):
    a, b = torch.randn(4096, 4096, dtype=dt), torch.randn(4096, 4096, dtype=dt)
    a @ b
    t = time.perf_counter(); [a @ b for _ in range(3)]; s = (time.perf_counter() - t) / 3
    print(f"matmul 4096^3 {dt}: {2 * 4096 ** 3 / s / 1e9:.0f} GFLOP/s")
try:
    import openvino as ov
    print("openvino", ov.__version__, ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
except Exception as e:
    print("openvino:", e)
PY

# 1. The pipeline benchmark (the OpenVINO case builds its engine first, outside the timed rounds).
$PIN timeout 500 python3 -m pytest -q -rs -p no:cacheprovider benchmarks/test_precision_speed.py \
    --bench-rounds "$ROUNDS" --bench-results "$OUT" 2>&1 | tee "$OUT/bench_amx.log"
bench_rc=${PIPESTATUS[0]}
# 2. The machine's own rates: the pipeline's share of the bf16 matmul rate, attention on sd15
#    shapes, the VAE decode against the best bf16 conv rate (benchmarks/test_cpu_rate.py).
$PIN timeout 900 python3 -m pytest -q -rs -p no:cacheprovider benchmarks/test_cpu_rate.py \
    --bench-rounds "$ROUNDS" --bench-results "$OUT" 2>&1 | tee "$OUT/cpu_rate_amx.log"
rate_rc=${PIPESTATUS[0]}
echo "benchmarks rc=$bench_rc/$rate_rc, $(( $(date +%s) - started )) s in all"
[ "$bench_rc" = 0 ] && [ "$rate_rc" = 0 ]
