"""Print a short table from a GPU benchmark JSON (bench/test_gpu_dense.py --benchmark-json).

    python bench/gpu_table.py bench/results/<device>.json

One row per benchmark: group, backend, mean time, TFLOP/s, and the speed-up over the
unfused cuBLAS path (cupy-unfused, or cublas for the bare GEMM) in the same group.
"""

from __future__ import annotations

import json
import sys

BASELINES = ("cupy-unfused", "cublas")


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    rows = [(b["group"], b["extra_info"]["backend"], b["stats"]["mean"], b["extra_info"]["tflops"])
            for b in data["benchmarks"]]
    baseline = {group: mean for group, backend, mean, _ in rows if backend in BASELINES}
    device = data["benchmarks"][0]["extra_info"]["device"] if rows else "no benchmarks"
    print(f"GPU benchmarks on {device} (fp32, TF32 off)")
    print(f"{'group':<26} {'backend':<13} {'mean ms':>9} {'TFLOP/s':>8} {'vs cuBLAS unfused':>18}")
    for group, backend, mean, tflops in sorted(rows, key=lambda r: (r[0], r[2])):
        ratio = f"{baseline[group] / mean:.2f}x" if group in baseline else "-"
        print(f"{group:<26} {backend:<13} {mean * 1e3:>9.3f} {tflops:>8.2f} {ratio:>18}")


if __name__ == "__main__":
    main(sys.argv[1])
