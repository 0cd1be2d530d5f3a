"""The README table of the fused MLP benchmarks, from a pytest-benchmark JSON of bench/test_gpu_fused.py.

    python bench/fused_table.py bench/results/<device>_fused*.json > bench/results/fused_mlp.md

The files must be of one device (an error names the devices otherwise); of a benchmark in
several, the newest file's is taken.

One row per workload ("<mode> <width>x<layers>@2^<k>"), the median milliseconds of every
implementation that ran it, and two speed ratios taken in the same run: PyTorch eager over
gpubp fused fp32, and gpubp per-layer over gpubp fused fp32 (above 1: the fused kernels are
faster). Benchmarks of other files in the same JSON are ignored.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gpu_summary import benchmark_medians, merge_reports

PREFIX = "fused "
IMPLS = ["gpubp-fused", "gpubp-fused-tf32", "gpubp-fused-bf16", "gpubp-per-layer", "torch", "torch-compile"]
RATIOS = {"torch / fused": ("torch", "gpubp-fused"), "per-layer / fused": ("gpubp-per-layer", "gpubp-fused")}


def medians(report: dict) -> dict[str, dict[str, float]]:
    """{workload: {implementation: median seconds}} for the fused sweep, in the order run."""
    table: dict[str, dict[str, float]] = {}
    for (workload, backend), seconds in benchmark_medians(report).items():
        if workload.startswith(PREFIX):
            table.setdefault(workload.removeprefix(PREFIX), {})[backend] = seconds
    return table


def markdown(report: dict) -> str:
    table = medians(report)
    impls = [impl for impl in IMPLS if any(impl in row for row in table.values())]
    device = next((b["extra_info"]["device"] for b in report.get("benchmarks", []) if "device" in
                   b.get("extra_info", {})), "unknown GPU")  # one device: merge_reports refuses more
    lines = [f"Fused MLP, median ms per call on {device} (fp32 unless named; ratios: above 1, fused is faster)", "",
             "| workload | " + " | ".join(impls + list(RATIOS)) + " |",
             "|---|" + "---:|" * (len(impls) + len(RATIOS))]
    for workload, row in table.items():
        cells = [f"{row[impl] * 1e3:.3f}" if impl in row else "-" for impl in impls]
        for numerator, denominator in RATIOS.values():
            ok = numerator in row and denominator in row and row[denominator] > 0
            cells.append(f"{row[numerator] / row[denominator]:.2f}" if ok else "-")
        lines.append(f"| {workload} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        report = merge_reports([Path(a) for a in args])
    except ValueError as exc:
        print(f"fused_table.py: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
