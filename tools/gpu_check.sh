#!/usr/bin/env bash
# GPU check of the calibrated sampler (kernels/calibrated_sampler.cu through CuPy), a few minutes
# (each step has its own timeout).
#
#   bash tools/gpu_check.sh          # on a machine with a CUDA GPU, torch (CUDA build), CuPy
#
# 1. glag is imported from a copy of this checkout in a temporary folder, the working folder of
#    every step (nothing is installed, no package index is needed, faiss is not needed)
# 2. the sampler tests, GPU ones included (tests/test_sampling_gpu.py, marked gpu), plus the CPU
#    ones: cuda vs the float64 reference (every tile shape, the tensor-core one included) and vs
#    numba, moments, CPU-input round trip
# 3. glag-bench --device cuda on cifar100-lt and imagenet-lt, d = 2048 / 512 / 64 (the target
#    first), k = 3: glag-cuda (default tile, and glag-cuda-<tile> for the others at d >= 256)
#    against torch (float32 eager, float32 replayed from a CUDA graph, and TF32), with % of the
#    FP32 peak
# 4. compute-sanitizer memcheck on a small call, every tile shape, when the tool is there (some
#    hosts refuse it)
# Everything is logged to $OUT/gpu_check.log (or ./gpu_check_out/ when OUT is unset), with the
# benchmark's JSON and plot beside it. Exit status: non-zero if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
OUT_DIR="${OUT:-gpu_check_out}"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
status=0

step() { echo; echo "== $* ($(date +%T))"; }

run_all() {
    step "environment"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
    "$PY" - <<'EOF' 2>&1 || true
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import cupy
    print("cupy", cupy.__version__, "devices", cupy.cuda.runtime.getDeviceCount())
except Exception as e:
    print("cupy not usable:", type(e).__name__, e)
EOF

    step "glag from a temporary copy"
    tree="$(mktemp -d)"
    cp -r glag "$tree/glag" && cp -r kernels "$tree/glag/kernels" && cp -r tools "$tree/glag/tools" || status=1
    cd "$tree" || return 1
    "$PY" -c "import glag.kernels.cuda as c, glag.tools.bench_kernel; print('glag from', c.__file__)" || status=1

    step "tests (GPU and CPU sampler tests; the emulated CUDA source is CI's, left out here)"
    timeout 240 "$PY" -m pytest "$repo/tests/test_sampling_gpu.py" "$repo/tests/test_philox.py" \
        "$repo/tests/test_sampling.py" -q -rs -p no:cacheprovider -k "not emulated" || status=1
    "$PY" -c "from glag import sampling; print('available backends:', sampling.available_backends())"

    step "benchmark (glag-bench --device cuda)"
    timeout 260 "$PY" -m glag.tools.bench_kernel --device cuda --profiles cifar100-lt imagenet-lt \
        --dims 2048 512 64 --ks 3 --work 1000 --repeats 3 --dc-seeds 3 --dc-seconds 4 \
        --out "$OUT_DIR/bench_kernel_gpu.json" --plot "$OUT_DIR/bench_kernel_gpu.png" --no-progress || status=1

    if command -v compute-sanitizer >/dev/null 2>&1; then
        step "compute-sanitizer memcheck (small call, d = 300 with each tile, and 37)"
        timeout 80 compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" - <<'EOF' || status=1
import os
import torch
from glag.kernels.cuda import ENV_TILE, WIDE_SHAPES
from glag.sampling import FactorBank, class_factor, sample_calibrated
g = torch.Generator().manual_seed(0)
for d, tile in [(300, t) for t in WIDE_SHAPES] + [(37, None)]:
    if tile:
        os.environ[ENV_TILE] = tile
    bank = FactorBank.from_factors([class_factor(torch.randn(n, d, generator=g)) for n in (1, 5, 70, 400)])
    bank = FactorBank(bank.data.cuda(), bank.offsets)
    m, k = 5, 3
    mu = torch.randn(m, d).cuda()
    sup = torch.stack([torch.randperm(4, generator=g)[:k] for _ in range(m)]).cuda()
    w = torch.rand(m, k).cuda()
    counts = torch.tensor([0, 3, 70, 1, 130]).cuda()
    x, y = sample_calibrated(bank, mu, sup, w, counts, torch.arange(m).cuda(), 0.1, "diag", 1, backend="cuda")
    torch.cuda.synchronize()
    print("d", d, "tile", tile or "64x64", "ok", tuple(x.shape), bool(torch.isfinite(x).all()))
EOF
    fi

    cd "$repo" && rm -rf "$tree"
    step "done, status $status"
    return $status
}

run_all 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
