#!/usr/bin/env bash
# Everything that needs a GPU, in one command, from the source tree (no pip install):
#   bash bench/gpu_check.sh
# Needs cupy, numba, numba-cuda, pytest and pytest-benchmark (torch optional) and the
# CUDA toolkit's compute-sanitizer. Runs the gpu-marked tests and the rest of the suite
# with Numba on the real GPU; compute-sanitizer over bench/sanitizer_driver.py (memcheck and
# initcheck over the CuPy kernels, racecheck and synccheck over the CuPy and Numba kernels);
# the demo on the GPU; the GPU benchmarks into bench/results/<device>.json. Then writes the
# record of the run, bench/results/gpu_summary.json and bench/results/<device>.md
# (bench/gpu_summary.py), and prints the latter. Exits nonzero if any step failed.
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset NUMBA_ENABLE_CUDASIM  # Numba kernels run on the GPU, not in the simulator
export CUPY_TF32=0          # cuBLAS through CuPy in plain fp32, like every other comparison
PYTHON="${PYTHON:-python}"
SANITIZER="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()

run() {
    local name="$1"
    shift
    echo "==== $name"
    "$@" || failed+=("$name")
}

sanitize() {
    local tool="$1"
    shift
    echo "==== compute-sanitizer $tool ($*)"
    "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PYTHON" bench/sanitizer_driver.py "$@" 2>&1 \
        | tee "$work/$tool.log"
    local status="${PIPESTATUS[0]}"
    echo "$status" >"$work/$tool.status"
    [ "$status" -eq 0 ] || failed+=("compute-sanitizer $tool")
}

if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    echo "warning: tracked files differ from HEAD; the summary's commit will read <sha>-dirty"
fi

run "gpu tests" "$PYTHON" -m pytest -m gpu tests -q -rs --junitxml "$work/gpu_tests.xml"
run "other tests (Numba on the GPU)" "$PYTHON" -m pytest -m "not gpu" tests -q --junitxml "$work/other_tests.xml"
sanitize memcheck cupy
sanitize initcheck cupy
sanitize racecheck cupy numba
sanitize synccheck cupy numba
run "demo on the GPU" "$PYTHON" -m gpubp demo --device cuda --quiet

device="$("$PYTHON" -c 'import cupy; print(cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())')"
stem="$("$PYTHON" bench/gpu_summary.py --file-stem "${device:-unknown GPU}")"
mkdir -p bench/results
run "GPU benchmarks" "$PYTHON" -m pytest bench/test_gpu_dense.py bench/test_gpu_fused.py -q \
    --benchmark-json "bench/results/$stem.json"
run "fused MLP table" sh -c "\"$PYTHON\" bench/fused_table.py \"bench/results/$stem.json\" > bench/results/fused_mlp.md"
run "summary" "$PYTHON" bench/gpu_summary.py --device "${device:-unknown GPU}" \
    --junit "$work/gpu_tests.xml" --junit "$work/other_tests.xml" --sanitizer-dir "$work" \
    --benchmark "bench/results/$stem.json" --out-dir bench/results

if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
