"""The split-K sweep of bench/test_gpu_splitk.py as a table: per dW shape, the heuristic's split
and time against the same split forced and against the fastest other split.

    python bench/splitk_table.py splitk*.json > bench/results/splitk.md   (several runs, of one device, merge)

The heuristic's run and the forced run of its split are the same configuration: their ratio is
the measurement's noise, the yardstick for the other one. Against the fastest other split, not
the fastest of all: the minimum of several noisy medians that include the heuristic's own split
would read as a loss for the heuristic where every split is as fast.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from gpu_summary import merge_reports


def rows(report: dict) -> list[dict]:
    """Per workload with a heuristic run and a forced other split: the heuristic's split and time
    per pass, the forced run of the same split's (None where no forced run split so), the
    fastest other split's, and the heuristic's time over each."""
    by_workload: dict[str, dict[str, tuple[float, int]]] = {}
    for bench in report.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if str(info.get("workload", "")).startswith("dw split-K"):
            by_workload.setdefault(info["workload"], {})[info["backend"]] = (
                bench["stats"]["median"] / info["launches_per_round"], info["splits"])
    out = []
    for name, choices in sorted(by_workload.items()):
        if "heuristic" not in choices:
            continue
        heuristic, splits = choices["heuristic"]
        # Forced counts the backend clamps (to the batch's k tiles) can run one split: of those,
        # the first in the sweep's order, the one that asked for it, stands for it.
        forced: dict[int, float] = {}
        for backend, (seconds, ran) in choices.items():
            if backend != "heuristic":
                forced.setdefault(ran, seconds)
        same = forced.pop(splits, None)  # what is left: the other splits
        if not forced:
            continue
        best = min(forced, key=forced.get)
        out.append({"workload": name, "heuristic_splits": splits, "heuristic_ms": heuristic * 1e3,
                    "same_split_ms": None if same is None else same * 1e3,
                    "heuristic_over_same": None if same is None else heuristic / same,
                    "best_other_splits": best, "best_other_ms": forced[best] * 1e3,
                    "heuristic_over_best_other": heuristic / forced[best]})
    return out


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def markdown(table: list[dict]) -> str:
    def cell(value, form):
        return "-" if value is None else form.format(value)

    lines = ["| dW shape (batch x in x out), precision | heuristic's split | ms per pass | same split forced, ms "
             "| heuristic / same | fastest other split | ms | heuristic / fastest other |",
             "|---|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['workload'].removeprefix('dw split-K ')} | {row['heuristic_splits']} "
                     f"| {row['heuristic_ms']:.4f} | {cell(row['same_split_ms'], '{:.4f}')} "
                     f"| {cell(row['heuristic_over_same'], '{:.2f}')} | {row['best_other_splits']} "
                     f"| {row['best_other_ms']:.4f} | {row['heuristic_over_best_other']:.2f} |")
    if table:
        other = [row["heuristic_over_best_other"] for row in table]
        same = [row["heuristic_over_same"] for row in table if row["heuristic_over_same"] is not None]
        lines += ["", f"Heuristic over the fastest other split: geometric mean {_geomean(other):.3f}, "
                      f"worst {max(other):.3f} (below 1: the heuristic's split is the faster)."
                  + (f" Heuristic over the same split forced (the noise): geometric mean {_geomean(same):.3f}, "
                     f"{min(same):.3f} to {max(same):.3f}." if same else "")]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit("usage: splitk_table.py <pytest-benchmark JSON of bench/test_gpu_splitk.py> ...")
    try:
        report = merge_reports([Path(a) for a in argv])
    except ValueError as exc:
        raise SystemExit(f"splitk_table.py: {exc}") from None
    print(markdown(rows(report)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
