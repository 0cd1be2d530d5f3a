"""Turn pytest-benchmark JSONs of ``bench/test_sklearn_fit.py`` into a markdown table.

    python bench/sklearn_table.py bench/results/sklearn_fit_1thread.json bench/results/sklearn_fit_all_cores.json \\
        --markdown bench/results/sklearn_fit.md

One section per JSON (a timer and thread setting), one row per float type: each library's
median fit time over the interleaved runs with its range, scikit-learn's time over gpubp's taken
within each run (the median over runs, and the range), and each library's test accuracy.
The machine lines come from ``bench/report.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from report import load, machine_lines

OURS, THEIRS = "gpubp", "scikit-learn"


def fits(benchmarks: list[dict]) -> dict[str, dict[str, dict[int, dict]]]:
    """{dtype: {library: {run: {"seconds": ..., "accuracy": ...}}}}."""
    table: dict = {}
    for bench in benchmarks:
        info = bench["extra_info"]
        table.setdefault(info["dtype"], {}).setdefault(info["library"], {})[info["run"]] = {
            "seconds": bench["stats"]["median"], "accuracy": info["test_accuracy"]}
    return table


def _spread(values: list[float], unit: str = "") -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}{unit}"
    return f"{statistics.median(values):.2f}{unit} ({min(values):.2f}-{max(values):.2f})"


def section(path: Path) -> list[str]:
    data, benchmarks = load(path)
    versions = sorted({b["extra_info"].get("scikit_learn_version", "?") for b in benchmarks})
    lines = [f"## {path.name}", ""] + [f"{line}  " for line in machine_lines(data, benchmarks)]
    lines += [f"scikit-learn {', '.join(versions)}", ""]
    head = ["input", f"{OURS} s", f"{THEIRS} s", f"{THEIRS} / {OURS}", f"test accuracy {OURS}",
            f"test accuracy {THEIRS}"]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    runs = set()
    for dtype, libraries in fits(benchmarks).items():
        ours, theirs = libraries.get(OURS, {}), libraries.get(THEIRS, {})
        runs |= set(ours) | set(theirs)
        ratios = [theirs[run]["seconds"] / ours[run]["seconds"] for run in sorted(set(ours) & set(theirs))]
        cells = [dtype, _spread([fit["seconds"] for fit in ours.values()]),
                 _spread([fit["seconds"] for fit in theirs.values()]), _spread(ratios, "x") if ratios else "-"]
        cells += [", ".join(sorted({f"{fit['accuracy']:.4f}" for fit in library.values()}))
                  for library in (ours, theirs)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Seconds per fit: the median over {len(runs)} interleaved runs (range); the ratio is taken within "
                  "each run.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+", help="pytest-benchmark JSON (--benchmark-json), one per setting")
    parser.add_argument("--markdown", type=Path, help="write the tables here instead of stdout")
    args = parser.parse_args(argv)
    lines = ["# MLPClassifier.fit: gpubp.sklearn against scikit-learn", "",
             "hidden (256, 256), relu, adam, batch 64, 30 epochs, no early stopping; the 8x8 digits "
             "(1437 training, 360 test images).", ""]
    for path in args.json:
        lines += section(path)
    text = "\n".join(lines)
    if args.markdown:
        args.markdown.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
