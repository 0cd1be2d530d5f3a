#!/usr/bin/env bash
# Everything that needs a GPU, in one command, from the source tree (no pip install):
#   bash bench/gpu_check.sh
# Needs cupy, numba, numba-cuda, pytest and pytest-benchmark (torch optional) and the
# CUDA toolkit's compute-sanitizer. Runs the gpu-marked tests and the rest of the suite
# with Numba on the real GPU, compute-sanitizer memcheck / racecheck / initcheck over
# bench/sanitizer_driver.py, then the GPU benchmarks into bench/results/<device>.json,
# and prints their table last. Exits nonzero if any step failed.
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset NUMBA_ENABLE_CUDASIM  # Numba kernels run on the GPU, not in the simulator
PYTHON="${PYTHON:-python}"
SANITIZER="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
failed=()

run() {
    local name="$1"
    shift
    echo "==== $name"
    "$@" || failed+=("$name")
}

run "gpu tests" "$PYTHON" -m pytest -m gpu tests -q -rs
run "other tests (Numba on the GPU)" "$PYTHON" -m pytest -m "not gpu" tests -q
for tool in memcheck racecheck initcheck; do
    run "compute-sanitizer $tool" "$SANITIZER" --tool "$tool" --error-exitcode 1 \
        "$PYTHON" bench/sanitizer_driver.py
done

device="$("$PYTHON" -c 'import cupy; print(cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())' \
    | tr -c 'A-Za-z0-9\n' '_')"
results="bench/results/${device:-unknown_gpu}.json"
mkdir -p bench/results
run "GPU benchmarks" "$PYTHON" -m pytest bench/test_gpu_dense.py -q --benchmark-json "$results"
if [ -f "$results" ]; then
    run "table" "$PYTHON" bench/gpu_table.py "$results"
fi

if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
