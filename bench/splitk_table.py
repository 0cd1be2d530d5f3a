"""The split-K sweep of bench/test_gpu_splitk.py as a table: per dW shape, the fastest batch split
and the heuristic's, and what the heuristic loses.

    python bench/splitk_table.py splitk*.json > bench/results/splitk.md   (several runs merge)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from gpu_summary import merge_reports


def rows(report: dict) -> list[dict]:
    """Per workload: the fastest forced split, the heuristic's split, their medians (seconds)."""
    by_workload: dict[str, dict[str, tuple[float, int]]] = {}
    for bench in report.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if str(info.get("workload", "")).startswith("dw split-K"):
            by_workload.setdefault(info["workload"], {})[info["backend"]] = (bench["stats"]["median"], info["splits"])
    out = []
    for name, choices in sorted(by_workload.items()):
        forced = {backend: value for backend, value in choices.items() if backend != "heuristic"}
        if not forced or "heuristic" not in choices:
            continue
        best_backend = min(forced, key=lambda backend: forced[backend][0])
        (best, best_splits), (heuristic, heuristic_splits) = forced[best_backend], choices["heuristic"]
        out.append({"workload": name, "best_splits": best_splits, "best_ms": best * 1e3,
                    "heuristic_splits": heuristic_splits, "heuristic_ms": heuristic * 1e3,
                    "heuristic_over_best": heuristic / best})
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| dW shape (batch x in x out), precision | fastest split | ms | heuristic's split | ms | heuristic / fastest |",
             "|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['workload'].removeprefix('dw split-K ')} | {row['best_splits']} | {row['best_ms']:.4f} | "
                     f"{row['heuristic_splits']} | {row['heuristic_ms']:.4f} | {row['heuristic_over_best']:.2f} |")
    if table:
        ratios = [row["heuristic_over_best"] for row in table]
        geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        lines += ["", f"Heuristic over fastest: geometric mean {geomean:.3f}, worst {max(ratios):.3f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit("usage: splitk_table.py <pytest-benchmark JSON of bench/test_gpu_splitk.py> ...")
    print(markdown(rows(merge_reports([Path(a) for a in argv]))), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
