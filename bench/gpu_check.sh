#!/usr/bin/env bash
# Everything that needs a GPU, from the source tree (no pip install):
#   bash bench/gpu_check.sh                 # every stage, then the record of the run
#   bash bench/gpu_check.sh tests sanitize  # some stages; `summary` writes the record of them all
# Needs cupy, numba, numba-cuda, pytest, pytest-benchmark and hypothesis (the tests' conftest
# imports it; torch optional), CMake, nvcc and the CUDA toolkit's compute-sanitizer. The stages,
# in order:
#   tests     the gpu-marked tests, and the rest of the suite with Numba on the real GPU
#   sanitize  compute-sanitizer over bench/sanitizer_driver.py: memcheck and initcheck over the
#             CuPy kernels, racecheck and synccheck over the CuPy and Numba kernels
#   demo      python -m gpubp demo on the GPU
#   aot       the CMake fatbin build, then bench/gpu_load_check.py: the fatbins load and
#             compute, and with none NVRTC does; device="auto" picks cupy
#   bench     the GPU benchmarks of bench/test_gpu_dense.py, into bench/results/<device>.json
#   fused     the fused MLP benchmarks, into bench/results/<device>_fused.json and fused_mlp.md
#   splitk    the dW split-K sweep, into bench/results/<device>_splitk.json and splitk.md
#   finetune  bench/test_finetune.py on the GPU backends (cupy, numba): what freezing saves, into
#             bench/results/<device>_finetune.json and finetune_<device>.md
#   ncu       Nsight Compute's speed-of-light, occupancy, launch and memory sections for one
#             instance of each kernel of bench/ncu_driver.py, into bench/results/ncu_<device>.csv
#   summary   bench/gpu_summary.py: bench/results/gpu_summary.json and bench/results/<device>.md
#             from whatever the stages left in the check folder, then prints the latter
#
#   GPUBP_RESULTS_OUT=<dir> bash bench/gpu_check.sh first-contact
# is the first run on a new GPU, in one call of at most 9 minutes (named alone). Its steps run
# in order of value, each in a child shell under its own wall-clock budget (`timeout`: SIGINT,
# which makes pytest write what it has, then SIGKILL), and after each one the summary is
# written again (under half the summary step's budget), so a step that fails or runs out of
# time leaves what the earlier ones found:
#   facts      bench/first_contact.py facts: what needs no CuPy (nvidia-smi, versions, library
#              paths), then device facts and every kernel compiled by NVRTC for this GPU (its
#              modules side by side) with times, registers and spills; then the NVRTC load check
#              beside the CMake fatbin build (its lines in the log as they come, marked "cmake| "),
#              and the fatbin load check (bench/gpu_load_check.py)
#   tests      the gpu-marked tests and the Numba backend's numba_gpu ones (its dense kernels, the
#              dW split, the losses, a model's training), one pytest-xdist worker per core, past
#              collection errors, with the stacks of a test stuck for 60 s
#   memcheck   compute-sanitizer memcheck over bench/sanitizer_driver.py --reduced cupy (one odd
#              shape per kernel family, the split-K finish, replayed CUDA graphs)
#   racecheck  compute-sanitizer racecheck over bench/sanitizer_driver.py --reduced-racecheck cupy
#   bench      bench/first_contact.py bench: the headline ratios' benchmarks, 5 rounds each, each
#              group of them under its own timeout, the Numba one (numba_vs_cupy_1024) last; each
#              benchmark also written as it finishes (bench/benchmark_lines.py, bench_*.jsonl),
#              which the summary takes where its group's process died before writing its JSON
#   summary    gpu_summary.json and <device>.md, with the steps' results and the facts
# Its reports go to GPUBP_CHECK_DIR (default bench/results/first_contact), CuPy's kernel cache
# to a fresh folder (so the compile times are cold), and, when GPUBP_RESULTS_OUT is set, these
# files to that folder (at most 8, each under 16 MB): first_contact.log (everything printed, as
# it is printed), facts.json, gpu_tests.xml, memcheck.log and racecheck.log (copied as they are
# after each step, before anything parses them), and gpu_summary.json, <device>.md and
# benchmarks.json (bench/gpu_summary.py --results-out). GPUBP_FIRST_CONTACT_BUDGETS
# ("tests=200 bench=60") changes step budgets; GPUBP_COMMIT names the commit of a copy without
# git history (the summary's tree_sha256 names its source in any case).
#
# GPUBP_BENCH_SELECT, a pytest -k expression, runs part of a benchmark stage (its JSON is named
# after it, and the tables and the summary merge every part of this device, the newest report's
# benchmark where parts overlap): for a stage longer than one call.
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
# torch's profiler (kernel counts) otherwise leaves CUPTI attached, slowing later timings (PyTorch issue 144455)
export TEARDOWN_CUPTI="${TEARDOWN_CUPTI:-1}"
# The tests and the sanitizers run every activation in many processes: they load each kernel that
# takes its activation at launch with every activation it serves (GPUBP_NVRTC_ACTIVATIONS=all), as
# preload() and first_contact.py facts compile it, from CuPy's cache. The demo and the benchmarks
# load what a user's model loads (a module per kernel and activation; first_contact.py facts
# compiles a relu model's), and tests/test_cupy_backend.py checks that path once.
whole_sets() { GPUBP_NVRTC_ACTIVATIONS=all "$@"; }
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
SANITIZER="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
NCU="${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}"
check="${GPUBP_CHECK_DIR:-bench/results/check}"
results="${GPUBP_RESULTS_DIR:-bench/results}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
STAGES=(tests sanitize demo aot bench fused splitk finetune ncu summary)

run() {  # name, command: run it, and remember the name if it fails; returns its status
    local name="$1" status
    shift
    echo "==== $name"
    "$@"
    status=$?
    [ "$status" -eq 0 ] || failed+=("$name")
    return "$status"
}

device_name() {  # read once on a GPU, then from the check folder (summary may run without one)
    if [ ! -s "$check/device.txt" ]; then
        "$PYTHON" -c 'import cupy; print(cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())' \
            >"$check/device.txt" 2>/dev/null || rm -f "$check/device.txt"
    fi
    cat "$check/device.txt" 2>/dev/null || echo "unknown GPU"
}

device_stem() {  # the device's name as bench/results names its files
    "$PYTHON" bench/gpu_summary.py --file-stem "$(device_name)"
}

sanitize() {  # tool, driver arguments: its output into $check/<tool>.log, its exit status into <tool>.status
    local tool="$1" status cut_off=0
    shift
    echo "==== compute-sanitizer $tool ($*)"
    # A first-contact step's timeout sends SIGINT to its whole process group, this shell and tee
    # included. Until the sanitizer ends, its status reads 124 ("cut off", as bench/gpu_summary.py
    # also reads a missing one); tee -i lets the log take all the sanitizer prints until it
    # exits; the trap holds the interrupt back until the status says so.
    echo 124 >"$check/$tool.status"
    trap 'cut_off=1' INT
    whole_sets "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PYTHON" bench/sanitizer_driver.py "$@" 2>&1 \
        | tee -i "$check/$tool.log"
    status="${PIPESTATUS[0]}"
    trap - INT
    [ "$cut_off" -eq 0 ] || status=124
    echo "$status" >"$check/$tool.status"
    [ "$status" -eq 0 ] || failed+=("compute-sanitizer $tool")
    [ "$cut_off" -eq 0 ] || kill -INT $$
}

xdist_workers() {  # default count: "-n <count>" where pytest-xdist is installed, to spread tests over cores
    "$PYTHON" -c "import xdist" 2>/dev/null && echo "-n ${GPUBP_TEST_WORKERS:-$1}"
}

stage_tests() {
    local workers
    workers="$(xdist_workers 8)"
    # Every NVRTC module compiled once, side by side, before the workers would each compile what they need.
    run "kernels compiled" "$PYTHON" -c "from gpubp.backends import cupy_backend; cupy_backend.preload()"
    run "gpu tests" whole_sets "$PYTHON" -m pytest -m gpu tests -q -rs $workers --junitxml "$check/gpu_tests.xml"
    run "other tests (Numba on the GPU)" whole_sets "$PYTHON" -m pytest -m "not gpu" tests -q $workers \
        --junitxml "$check/other_tests.xml"
}

stage_sanitize() {
    # Numba's kernels too: nothing bounds-checks them on a GPU, and the simulator only the test shapes.
    sanitize memcheck cupy numba
    sanitize initcheck cupy numba
    sanitize racecheck cupy numba
    sanitize synccheck cupy numba
}

stage_demo() {
    run "demo on the GPU" "$PYTHON" -m gpubp demo --device cuda --quiet
}

aot_build() {  # [sass archs]: the CMake fatbin build, installed into $work/aot; SASS for those alone if named
    local sass=""
    [ -n "${1:-}" ] && sass="-DGPUBP_SASS_ARCHS=$1"
    run "CMake fatbin build" sh -c "cmake -S . -B \"$work/build\" -DGPUBP_AOT_DIR=\"$work/aot\" $sass >/dev/null \
        && cmake --build \"$work/build\" -j && cmake --install \"$work/build\" >/dev/null"
}

device_sass() {  # the GPU's architecture ("90") where CMakeLists.txt ships SASS for it, else nothing
    local cap
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .\r')
    [ -n "$cap" ] && grep -Eq "^set\(GPUBP_CUDA_ARCHS( [0-9]+)* $cap( [0-9]+)*\)" CMakeLists.txt && echo "$cap"
    return 0
}

load_check() {  # fatbin | nvrtc: the kernels load from there and train a step as NumPy does
    if [ "$1" = fatbin ]; then
        run "kernels from the fatbins" env GPUBP_AOT_DIR="$work/aot" "$PYTHON" bench/gpu_load_check.py fatbin
    else
        mkdir -p "$work/no_fatbins"
        run "kernels from NVRTC" env GPUBP_AOT_DIR="$work/no_fatbins" "$PYTHON" bench/gpu_load_check.py nvrtc
    fi
}

stage_aot() {
    aot_build
    load_check fatbin
    load_check nvrtc
}

select="${GPUBP_BENCH_SELECT:-}"

# <device stem><suffix>[_<the selection, as a file name>].json
bench_json() {
    local part=""
    [ -z "$select" ] || part="_$("$PYTHON" bench/gpu_summary.py --file-stem "$select")"
    echo "$results/$(device_stem)$1$part.json"
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

# The tables take this device's parts only: bench/results keeps every device's JSON.
stage_fused() {
    benchmarks "fused MLP benchmarks" bench/test_gpu_fused.py "$(bench_json _fused)"
    run "fused MLP table" sh -c "\"$PYTHON\" bench/fused_table.py \"$results/$(device_stem)_fused\"*.json \
        > \"$results/fused_mlp.md\""
}

stage_splitk() {
    benchmarks "split-K sweep" bench/test_gpu_splitk.py "$(bench_json _splitk)"
    run "split-K table" sh -c "\"$PYTHON\" bench/splitk_table.py \"$results/$(device_stem)_splitk\"*.json \
        > \"$results/splitk.md\""
}

stage_finetune() {  # the GPU backends' part of bench/test_finetune.py (its CPU part runs without a GPU)
    local json
    json="$(bench_json _finetune)"
    run "fine-tuning benchmarks" "$PYTHON" -m pytest bench/test_finetune.py -q \
        -k "(cupy or numba)${select:+ and ($select)}" --benchmark-json "$json"
    run "fine-tuning table" sh -c "\"$PYTHON\" bench/finetune_ratios.py \"$json\" \
        > \"$results/finetune_$(device_stem).md\""
}

stage_ncu() {
    local csv
    csv="$results/ncu_$(device_stem).csv"
    echo "==== Nsight Compute"
    "$NCU" --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section MemoryWorkloadAnalysis --csv --page details \
        "$PYTHON" bench/ncu_driver.py >"$csv" || { failed+=("Nsight Compute"); return; }
    # ncu exits 0 where it may not read the counters (ERR_NVGPUCTRPERM: profiling needs the
    # driver's NVreg_RestrictProfilingToAdminUsers=0, or root) or cannot load its library: its
    # ==ERROR== lines stand where the report's rows would.
    if grep -q '==ERROR==' "$csv" || ! grep -q '^"ID"' "$csv"; then
        grep '==ERROR==' "$csv" | head -n 5
        failed+=("Nsight Compute (no report: see $csv)")
    fi
}

summarize() {  # bench/gpu_summary.py over what the check folder holds; extra arguments are passed on
    local inputs=()
    for xml in "$check"/gpu_tests.xml "$check"/other_tests.xml; do
        [ -f "$xml" ] && inputs+=(--junit "$xml")
    done
    for json in "$check"/bench_*.json; do
        [ -f "$json" ] && inputs+=(--benchmark "$json")
    done
    for lines in "$check"/bench_*.jsonl; do  # what each benchmark of a first-contact group wrote as it finished
        [ -f "$lines" ] && inputs+=(--benchmark-lines "$lines")
    done
    "$PYTHON" bench/gpu_summary.py --device "$(device_name)" "${inputs[@]}" --sanitizer-dir "$check" \
        --out-dir "$results" "$@"
}

stage_summary() {
    run "summary" summarize
}

# ----------------------------------------------------------------------------- first-contact

FIRST_CONTACT_STEPS=(facts tests memcheck racecheck bench summary)
# Wall-clock seconds per step. Their sum, 505, and the five publishes between steps, at most
# 11 s each (PUBLISH_SECONDS and a second's grace), keep the stage within 560 s; the call that
# runs it is killed at about 570. facts should take about 70 s: the CMake build (about 60 s of
# nvcc on its slowest file, fused_mlp.cu, on a 2-core machine; SASS for this GPU alone) runs
# from the step's start beside the device facts (the NVRTC modules side by side, about 15 s,
# and a cold `import torch`) and the NVRTC load check, then the fatbin check; bench has five
# pytest runs, the Numba one compiling its kernels (bench/first_contact.py).
declare -A budget=([facts]=100 [tests]=135 [memcheck]=55 [racecheck]=70 [bench]=125 [summary]=20)
# bench/gpu_summary.py's CARRY_BYTES: a raw file this big or bigger keeps its first third and its end.
CARRY_BYTES=15000000

fc_facts() {
    # The CMake build needs no GPU and is the step's longest part: it starts first and runs while
    # the facts are gathered and the NVRTC load check uses the kernels facts compiled, with SASS
    # for this GPU alone (the others' would double ptxas's work). Its lines go to the log as they
    # come, marked, so a build the step's budget cuts off still shows how far it got.
    local cmake sass
    sass=$(device_sass)
    (aot_build "$sass" 2>&1 | while IFS= read -r line; do printf 'cmake| %s\n' "$line"; done
     exit "${PIPESTATUS[0]}") &
    cmake=$!
    run "device facts and NVRTC compile times" "$PYTHON" bench/first_contact.py facts "$check/facts.json"
    load_check nvrtc
    if wait "$cmake"; then
        load_check fatbin
    else
        failed+=("CMake fatbin build")
    fi
}

fc_tests() {
    # A test file that fails to import costs its own tests, not the others'; a test stuck for a
    # minute has every thread's stack dumped into the log (pytest's faulthandler: pytest-timeout
    # is not installed); -rfEs lists failures, errors and skips at the end, and -v each test's
    # result as it ends, which the log keeps should the junit report be lost to a kill.
    run "gpu tests" whole_sets "$PYTHON" -m pytest -m "gpu or numba_gpu" tests -v -rfEs -p no:cacheprovider \
        --continue-on-collection-errors -o faulthandler_timeout=60 $(xdist_workers "$(nproc)") \
        --junitxml "$check/gpu_tests.xml"
}

fc_memcheck() {
    sanitize memcheck --reduced cupy
}

fc_racecheck() {
    sanitize racecheck --reduced-racecheck cupy
}

fc_bench() {
    run "headline benchmarks" "$PYTHON" bench/first_contact.py bench "$check"
}

# The check folder's files that first-contact copies into GPUBP_RESULTS_OUT as they are, after
# each step, each under CARRY_BYTES: what a step found comes back even if bench/gpu_summary.py
# cannot read it.
carry_raw() {
    local name size head=$((CARRY_BYTES / 3)) tail=$((CARRY_BYTES - CARRY_BYTES / 3 - 200))
    for name in facts.json gpu_tests.xml memcheck.log racecheck.log; do
        [ -f "$check/$name" ] || continue
        size=$(wc -c <"$check/$name")
        if [ "$size" -lt "$CARRY_BYTES" ]; then
            cp "$check/$name" "$GPUBP_RESULTS_OUT/$name"
        else
            { head -c "$head" "$check/$name"
              printf '\n[... %s bytes cut here: the file had %s ...]\n' "$((size - head - tail))" "$size"
              tail -c "$tail" "$check/$name"; } >"$GPUBP_RESULTS_OUT/$name"
        fi
    done
}

fc_publish() {  # the raw files, then the summary of what the steps so far left (to GPUBP_RESULTS_OUT when set)
    local out=()
    if [ -n "${GPUBP_RESULTS_OUT:-}" ]; then
        carry_raw
        out=(--results-out "$GPUBP_RESULTS_OUT")
    fi
    timeout --kill-after=1 "$PUBLISH_SECONDS" bash -c 'summarize "$@"' summarize \
        --command "GPUBP_RESULTS_OUT=<dir> bash bench/gpu_check.sh first-contact" \
        --steps "$check/first_contact_steps.tsv" --facts "$check/facts.json" "${out[@]}"
}

fc_summary() {
    run "summary" fc_publish
}

fc_step() {  # name: fc_<name> in a child shell under its budget; records how it ended, then publishes
    local name="$1" limit="${budget[$1]}" start=$SECONDS status result grace
    grace=$((limit >= 40 ? 10 : limit / 4))
    # After the SIGINT, pytest-xdist waits 10 s for a worker stuck in a kernel or a sync before it
    # kills it and writes the junit report: the tests step's SIGKILL must come after that.
    if [ "$name" = tests ] && [ "$limit" -ge 80 ]; then grace=20; fi
    echo "==== first-contact step $name (budget $limit s)"
    # GPUBP_STEP_SECONDS: what the step has before its SIGINT, for a step that shares it out (bench).
    GPUBP_STEP_SECONDS=$((limit - grace)) timeout --signal=INT --kill-after="$grace" "$((limit - grace))" \
        bash -c "set -uo pipefail; failed=(); fc_$name; [ \${#failed[@]} -eq 0 ]"
    status=$?
    case "$status" in
        0) result=ok ;;
        124 | 137) result="out of time"; failed+=("first-contact $name: out of time after $limit s") ;;
        *) result="failed (exit status $status)"; failed+=("first-contact $name") ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$result" "$((SECONDS - start))" "$limit" >>"$check/first_contact_steps.tsv"
    [ "$name" = summary ] || fc_publish >/dev/null
}

first_contact() {
    local item step
    for item in ${GPUBP_FIRST_CONTACT_BUDGETS:-}; do
        step="${item%%=*}"
        if [ -z "${budget[$step]:-}" ] || ! [[ "${item#*=}" =~ ^[0-9]+$ ]]; then
            echo "gpu_check.sh: GPUBP_FIRST_CONTACT_BUDGETS: '$item' is not <step>=<seconds> for a step of:" \
                "${FIRST_CONTACT_STEPS[*]}" >&2
            exit 2
        fi
        budget[$step]="${item#*=}"
    done
    check="${GPUBP_CHECK_DIR:-bench/results/first_contact}"
    PUBLISH_SECONDS=$((budget[summary] / 2))
    mkdir -p "$check" "$results" "$work/cupy_cache"
    rm -f "$check"/{first_contact.log,first_contact_steps.tsv,facts.json,gpu_tests.xml,device.txt} \
        "$check"/{memcheck,racecheck}.{log,status} "$check"/bench_first_contact_*.{json,jsonl}
    if [ -n "${GPUBP_RESULTS_OUT:-}" ]; then
        mkdir -p "$GPUBP_RESULTS_OUT"
        # Into GPUBP_RESULTS_OUT too, as it is printed, so a kill at any moment leaves all printed
        # until then: its first CARRY_BYTES (head, unbuffered, else it would hold the last few kB;
        # once it has them tee -p goes on without it).
        exec > >(tee -p -a "$check/first_contact.log" \
            >(stdbuf -o0 head -c "$CARRY_BYTES" >"$GPUBP_RESULTS_OUT/first_contact.log")) 2>&1
    else
        exec > >(tee -a "$check/first_contact.log") 2>&1
    fi
    log_tee=$!  # waited for at the end: bash does not wait for a process substitution
    export PYTHONUNBUFFERED=1  # what a Python step printed is in the log, even if it is killed
    export CUPY_CACHE_DIR="$work/cupy_cache"  # empty: facts times cold compiles; later steps reuse them
    export PYTHON SANITIZER check results work PUBLISH_SECONDS CARRY_BYTES
    export -f run sanitize whole_sets xdist_workers aot_build device_sass load_check fc_facts fc_tests fc_memcheck fc_racecheck fc_bench \
        carry_raw fc_publish fc_summary summarize device_name
    echo "first-contact: steps ${FIRST_CONTACT_STEPS[*]}; budgets $(for s in "${FIRST_CONTACT_STEPS[@]}"; do
        printf '%s=%s ' "$s" "${budget[$s]}"; done)"
    for step in "${FIRST_CONTACT_STEPS[@]}"; do
        fc_step "$step"
    done
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=("${STAGES[@]}")
if [ "${stages[*]}" != first-contact ]; then
    for stage in "${stages[@]}"; do
        if [ "$stage" = first-contact ]; then
            echo "gpu_check.sh: first-contact runs alone, in a call of its own" >&2
            exit 2
        fi
        case " ${STAGES[*]} " in
            *" $stage "*) ;;
            *) echo "gpu_check.sh: unknown stage '$stage'; expected some of: ${STAGES[*]} (or first-contact alone)" >&2
               exit 2 ;;
        esac
    done
fi
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    echo "warning: tracked files differ from HEAD; the summary's commit will read <sha>-dirty"
fi
if [ "${stages[*]}" = first-contact ]; then
    first_contact
else
    mkdir -p "$check" "$results"
    for stage in "${stages[@]}"; do
        "stage_$stage"
    done
fi

status=0
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    status=1
fi
if [ -n "${log_tee:-}" ]; then
    # The log's last lines (the table, the FAILED list) are still in tee's pipe: end it and let it
    # write them, before the caller, done, ends what this left running.
    exec >&- 2>&-
    # A process a step left behind (stuck in a CUDA call after its SIGINT) may still hold the pipe
    # open, and tee would wait on it to the caller's limit: it gets 15 s, all it needs to write.
    for _ in $(seq 150); do
        kill -0 "$log_tee" 2>/dev/null || break
        sleep 0.1
    done
    kill "$log_tee" 2>/dev/null
    wait "$log_tee" 2>/dev/null
fi
exit "$status"
