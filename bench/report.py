"""Turn a pytest-benchmark JSON of ``bench/test_cpu_step.py`` into a markdown table and a bar chart.

    python bench/report.py bench/results/cpu_step.json --markdown bench/results/cpu_step.md --png bench/results/cpu_step.png

The table has one row per shape: the median step time of each backend and each
backend's ratio to PyTorch's CPU build (below 1 is faster than PyTorch). The header
names the machine (CPU model and core count from the JSON's ``machine_info``) and the
NumPy, BLAS and PyTorch versions and thread counts recorded in ``extra_info``.
Without ``--markdown`` the table goes to stdout; without ``--png`` no chart is drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REFERENCE = "torch"
LABELS = {"gpubp": "gpubp", "numpy_naive": "naive NumPy", "torch": "PyTorch CPU"}


def load(path: Path) -> tuple[dict, list[dict]]:
    with open(path) as f:
        data = json.load(f)
    return data, data["benchmarks"]


def medians(benchmarks: list[dict]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """{shape: {backend: median seconds}} in the order shapes first appear, and the backends seen."""
    table: dict[str, dict[str, float]] = {}
    backends: list[str] = []
    for bench in benchmarks:
        info = bench.get("extra_info", {})
        shape = info.get("shape", bench.get("group") or bench["name"])
        backend = info.get("backend", bench["name"])
        table.setdefault(shape, {})[backend] = bench["stats"]["median"]
        if backend not in backends:
            backends.append(backend)
    order = [b for b in LABELS if b in backends] + [b for b in backends if b not in LABELS]
    return table, order


def machine_lines(data: dict, benchmarks: list[dict]) -> list[str]:
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    extra: dict = {}
    for bench in benchmarks:
        for key, value in bench.get("extra_info", {}).items():
            if value is not None:
                extra.setdefault(key, value)
    model = cpu.get("brand_raw") or machine.get("processor") or "unknown CPU"
    family = f" (family {cpu['family']}, model {cpu['model']})" if "family" in cpu and "model" in cpu else ""
    cores = cpu.get("count") or extra.get("cpu_count")
    lines = [
        f"Machine: {model}{family}, {cores} cores, {cpu.get('hz_advertised_friendly', '')}, "
        f"{machine.get('system', '')} {machine.get('release', '')}".rstrip(", "),
        f"Python {machine.get('python_version', '?')}, NumPy {extra.get('numpy_version', '?')} "
        f"({extra.get('blas', 'BLAS ?')}, {extra.get('blas_threads', '?')} threads)"
        + (f", PyTorch {extra['torch_version']} ({extra.get('torch_threads', '?')} threads)" if "torch_version" in extra else ""),
    ]
    if extra.get("OPENBLAS_CORETYPE"):
        lines.append(f"OPENBLAS_CORETYPE={extra['OPENBLAS_CORETYPE']}")
    if data.get("datetime"):
        lines.append(f"Run: {data['datetime']}")
    return lines


def markdown(data: dict, benchmarks: list[dict]) -> str:
    table, backends = medians(benchmarks)
    ratio_of = [b for b in backends if b != REFERENCE] if REFERENCE in backends else []
    head = ["shape @ batch"] + [f"{LABELS.get(b, b)} (ms)" for b in backends]
    head += [f"{LABELS.get(b, b)} / {LABELS[REFERENCE]}" for b in ratio_of]
    rows = []
    for shape, times in table.items():
        row = [f"`{shape}`"] + [f"{times[b] * 1e3:.3f}" if b in times else "-" for b in backends]
        for b in ratio_of:
            ok = b in times and REFERENCE in times
            row.append(f"{times[b] / times[REFERENCE]:.2f}x" if ok else "-")
        rows.append(row)
    lines = ["# One CPU training step (forward, softmax-CE, backward, SGD momentum)", ""]
    lines += [f"{line}  " for line in machine_lines(data, benchmarks)]
    lines += ["", "Median step time in milliseconds; ratios below 1 are faster than PyTorch.", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(data: dict, benchmarks: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, backends = medians(benchmarks)
    shapes = list(table)
    relative = REFERENCE in backends
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(shapes)), 4.2))
    for k, backend in enumerate(backends):
        xs, heights, labels = [], [], []
        for i, shape in enumerate(shapes):
            times = table[shape]
            if backend not in times or (relative and REFERENCE not in times):
                continue
            xs.append(i + (k - (len(backends) - 1) / 2) * width)
            heights.append(times[backend] / times[REFERENCE] if relative else times[backend] * 1e3)
            labels.append(f"{times[backend] * 1e3:.3g}")
        bars = ax.bar(xs, heights, width, label=LABELS.get(backend, backend))
        ax.bar_label(bars, labels, fontsize=7, padding=1)
    if relative:
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_ylabel(f"step time / {LABELS[REFERENCE]} (lower is better)")
    else:
        ax.set_yscale("log")
        ax.set_ylabel("median step time (ms)")
    ax.set_xticks(range(len(shapes)), shapes, fontsize=8)
    ax.set_title(machine_lines(data, benchmarks)[0], fontsize=8)
    fig.suptitle("CPU training step, median (bar labels: ms)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--markdown", type=Path, help="write the table here instead of stdout")
    parser.add_argument("--png", type=Path, help="write a bar chart here (matplotlib)")
    args = parser.parse_args(argv)
    data, benchmarks = load(args.json)
    if not benchmarks:
        parser.error(f"{args.json}: no benchmarks in this file")
    text = markdown(data, benchmarks)
    if args.markdown:
        args.markdown.write_text(text)
    else:
        sys.stdout.write(text)
    if args.png:
        plot(data, benchmarks, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
