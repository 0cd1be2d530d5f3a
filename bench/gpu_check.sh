#!/usr/bin/env bash
# Everything that needs a GPU, from the source tree (no pip install):
#   bash bench/gpu_check.sh                 # every stage, then the record of the run
#   bash bench/gpu_check.sh tests sanitize  # some stages; `summary` writes the record of them all
# Needs cupy, numba, numba-cuda, pytest and pytest-benchmark (torch optional), CMake, nvcc and
# the CUDA toolkit's compute-sanitizer. The stages, in order:
#   tests     the gpu-marked tests, and the rest of the suite with Numba on the real GPU
#   sanitize  compute-sanitizer over bench/sanitizer_driver.py: memcheck and initcheck over the
#             CuPy kernels, racecheck and synccheck over the CuPy and Numba kernels
#   demo      python -m gpubp demo on the GPU
#   aot       the CMake fatbin build, then bench/gpu_load_check.py: the fatbins load and
#             compute, and with none NVRTC does; device="auto" picks cupy
#   bench     the GPU benchmarks of bench/test_gpu_dense.py, into bench/results/<device>.json
#   fused     the fused MLP benchmarks, into bench/results/<device>_fused.json and fused_mlp.md
#   splitk    the dW split-K sweep, into bench/results/<device>_splitk.json and splitk.md
#   ncu       Nsight Compute's speed-of-light, occupancy, launch and memory sections for one
#             instance of each kernel of bench/ncu_driver.py, into bench/results/ncu_<device>.csv
#   summary   bench/gpu_summary.py: bench/results/gpu_summary.json and bench/results/<device>.md
#             from whatever the stages left in the check folder, then prints the latter
# GPUBP_BENCH_SELECT, a pytest -k expression, runs part of a benchmark stage (its JSON is named
# after it, and the tables and the summary merge every part): for a stage longer than one call.
# Each stage leaves its reports in the check folder, GPUBP_CHECK_DIR (default
# bench/results/check, which git ignores), so stages can run in separate calls, even on
# separate machines, and `summary` run last where the folder was brought back. The results
# go to GPUBP_RESULTS_DIR (default bench/results).
# Exits nonzero if any stage failed.
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset NUMBA_ENABLE_CUDASIM  # Numba kernels run on the GPU, not in the simulator
export CUPY_TF32=0          # cuBLAS through CuPy in plain fp32, like every other comparison
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
SANITIZER="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
NCU="${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}"
check="${GPUBP_CHECK_DIR:-bench/results/check}"
results="${GPUBP_RESULTS_DIR:-bench/results}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
STAGES=(tests sanitize demo aot bench fused splitk ncu summary)

run() {
    local name="$1"
    shift
    echo "==== $name"
    "$@" || failed+=("$name")
}

device_name() {  # read once on a GPU, then from the check folder (summary may run without one)
    if [ ! -s "$check/device.txt" ]; then
        "$PYTHON" -c 'import cupy; print(cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())' \
            >"$check/device.txt" 2>/dev/null || rm -f "$check/device.txt"
    fi
    cat "$check/device.txt" 2>/dev/null || echo "unknown GPU"
}

sanitize() {
    local tool="$1"
    shift
    echo "==== compute-sanitizer $tool ($*)"
    "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PYTHON" bench/sanitizer_driver.py "$@" 2>&1 \
        | tee "$check/$tool.log"
    local status="${PIPESTATUS[0]}"
    echo "$status" >"$check/$tool.status"
    [ "$status" -eq 0 ] || failed+=("compute-sanitizer $tool")
}

stage_tests() {
    # pytest-xdist, where installed, spreads the suite over the machine's cores.
    local workers=()
    "$PYTHON" -c "import xdist" 2>/dev/null && workers=(-n "${GPUBP_TEST_WORKERS:-8}")
    run "gpu tests" "$PYTHON" -m pytest -m gpu tests -q -rs "${workers[@]}" --junitxml "$check/gpu_tests.xml"
    run "other tests (Numba on the GPU)" "$PYTHON" -m pytest -m "not gpu" tests -q "${workers[@]}" \
        --junitxml "$check/other_tests.xml"
}

stage_sanitize() {
    sanitize memcheck cupy
    sanitize initcheck cupy
    sanitize racecheck cupy numba
    sanitize synccheck cupy numba
}

stage_demo() {
    run "demo on the GPU" "$PYTHON" -m gpubp demo --device cuda --quiet
}

stage_aot() {
    local aot="$work/aot"
    mkdir -p "$work/no_fatbins"
    run "CMake fatbin build" sh -c "cmake -S . -B \"$work/build\" -DGPUBP_AOT_DIR=\"$aot\" >/dev/null \
        && cmake --build \"$work/build\" -j && cmake --install \"$work/build\" >/dev/null"
    run "kernels from the fatbins" env GPUBP_AOT_DIR="$aot" "$PYTHON" bench/gpu_load_check.py fatbin
    run "kernels from NVRTC" env GPUBP_AOT_DIR="$work/no_fatbins" "$PYTHON" bench/gpu_load_check.py nvrtc
}

select="${GPUBP_BENCH_SELECT:-}"

# <device stem><suffix>[_<the selection, as a file name>].json
bench_json() {
    local part=""
    [ -z "$select" ] || part="_$("$PYTHON" bench/gpu_summary.py --file-stem "$select")"
    echo "$results/$("$PYTHON" bench/gpu_summary.py --file-stem "$(device_name)")$1$part.json"
}

benchmarks() {  # name, benchmark file, JSON
    run "$1" "$PYTHON" -m pytest "$2" -q ${select:+-k "$select"} --benchmark-json "$3"
}

stage_bench() {
    local json
    json="$(bench_json "")"
    benchmarks "GPU benchmarks" bench/test_gpu_dense.py "$json"
    cp "$json" "$check/bench_$(basename "$json")" 2>/dev/null
}

stage_fused() {
    benchmarks "fused MLP benchmarks" bench/test_gpu_fused.py "$(bench_json _fused)"
    run "fused MLP table" sh -c "\"$PYTHON\" bench/fused_table.py \"$results\"/*_fused*.json > \"$results/fused_mlp.md\""
}

stage_splitk() {
    benchmarks "split-K sweep" bench/test_gpu_splitk.py "$(bench_json _splitk)"
    run "split-K table" sh -c "\"$PYTHON\" bench/splitk_table.py \"$results\"/*_splitk*.json > \"$results/splitk.md\""
}

stage_ncu() {
    local csv
    csv="$results/ncu_$("$PYTHON" bench/gpu_summary.py --file-stem "$(device_name)").csv"
    echo "==== Nsight Compute"
    "$NCU" --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section MemoryWorkloadAnalysis --csv --page details \
        "$PYTHON" bench/ncu_driver.py >"$csv" || failed+=("Nsight Compute")
}

stage_summary() {
    local inputs=()
    for xml in "$check"/gpu_tests.xml "$check"/other_tests.xml; do
        [ -f "$xml" ] && inputs+=(--junit "$xml")
    done
    for json in "$check"/bench_*.json; do
        [ -f "$json" ] && inputs+=(--benchmark "$json")
    done
    run "summary" "$PYTHON" bench/gpu_summary.py --device "$(device_name)" "${inputs[@]}" \
        --sanitizer-dir "$check" --out-dir "$results"
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=("${STAGES[@]}")
for stage in "${stages[@]}"; do
    case " ${STAGES[*]} " in
        *" $stage "*) ;;
        *) echo "gpu_check.sh: unknown stage '$stage'; expected some of: ${STAGES[*]}" >&2; exit 2 ;;
    esac
done
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    echo "warning: tracked files differ from HEAD; the summary's commit will read <sha>-dirty"
fi
mkdir -p "$check" "$results"
for stage in "${stages[@]}"; do
    "stage_$stage"
done

if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
