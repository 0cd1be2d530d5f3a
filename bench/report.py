"""Turn pytest-benchmark JSONs of ``bench/test_cpu_step.py`` into markdown tables and a bar chart.

    python bench/report.py bench/results/cpu_step-1.json bench/results/cpu_step-2.json bench/results/cpu_step-3.json \
        --markdown bench/results/cpu_step.md --png bench/results/cpu_step.png

Give one JSON per run (three back-to-back runs, say). The first table has one row per shape
and the median step time of each backend (the median over runs of each run's median); the
second has the ratios that matter, each taken within one run and shown as the median over
runs with the range (where a benchmark interleaved the backends round by round, as
``test_cpu_step.py`` does, a run's ratio is the median of its rounds' ratios): each step against the GEMM floor (the step's own matrix products
alone, the most a step on the same BLAS could hope for), and against PyTorch's CPU build
(below 1 is faster than PyTorch). The header names the machine (CPU model and core count
from the JSON's ``machine_info``) and the NumPy, BLAS and PyTorch versions and thread counts
recorded in ``extra_info``. Without ``--markdown`` the tables go to stdout; without
``--png`` no chart is drawn.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

TORCH = "torch"
FLOOR = "gemm_floor"
LABELS = {"gpubp": "gpubp", "gpubp_numpy": "gpubp, NumPy only", "numpy_naive": "naive NumPy",
          "torch": "PyTorch CPU", "gemm_floor": "GEMM floor", "bridge": "bridge"}
# (numerator, denominator) of the ratio columns, where both were run (the bridge's:
# bench/test_torch_bridge.py's gpubp.torch.MLP step)
RATIOS = [("gpubp", FLOOR), (TORCH, FLOOR), ("gpubp", TORCH), ("gpubp_numpy", FLOOR), ("gpubp_numpy", TORCH),
          ("numpy_naive", TORCH), ("bridge", TORCH), ("bridge", "gpubp")]


def load(path: Path) -> tuple[dict, list[dict]]:
    with open(path) as f:
        data = json.load(f)
    return data, data["benchmarks"]


# what ``medians`` returns for one run: {shape: {backend: median}}, the backends, and where the
# backends were interleaved, {shape: {backend: [seconds per step in each round]}}
Medians = tuple[dict[str, dict[str, float]], list[str], dict[str, dict[str, list[float]]]]


def ratios(per_run: list[Medians], numerator: str, denominator: str) -> dict[str, list[float]]:
    """{shape: [numerator / denominator in each run that has both]}, from each run's ``medians``.

    Where a run interleaved the backends round by round, its ratio is the median of the rounds'
    ratios (each taken between blocks run moments apart); otherwise the ratio of the medians."""
    result: dict[str, list[float]] = {}
    for table, _, rounds in per_run:
        for shape, times in table.items():
            if numerator in times and denominator in times:
                paired = rounds.get(shape, {})
                if numerator in paired and denominator in paired:
                    value = statistics.median(n / d for n, d in zip(paired[numerator], paired[denominator]))
                else:
                    value = times[numerator] / times[denominator]
                result.setdefault(shape, []).append(value)
    return result


def median_of_runs(per_run: list[Medians]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Like ``medians``, with each time the median over runs of that run's median (from each run's ``medians``)."""
    table: dict[str, dict[str, list[float]]] = {}
    backends: list[str] = []
    for run_table, run_backends, _ in per_run:
        for shape, times in run_table.items():
            for backend, seconds in times.items():
                table.setdefault(shape, {}).setdefault(backend, []).append(seconds)
        backends += [b for b in run_backends if b not in backends]
    order = [b for b in LABELS if b in backends] + [b for b in backends if b not in LABELS]
    return {shape: {b: statistics.median(v) for b, v in times.items()} for shape, times in table.items()}, order


def medians(benchmarks: list[dict]) -> Medians:
    """{shape: {backend: median seconds}} in the order shapes first appear, the backends seen, and
    the per-round times of benchmarks that interleaved backends (``extra_info["interleaved"]``)."""
    table: dict[str, dict[str, float]] = {}
    rounds: dict[str, dict[str, list[float]]] = {}
    backends: list[str] = []
    for bench in benchmarks:
        info = bench.get("extra_info", {})
        shape = info.get("shape", bench.get("group") or bench["name"])
        interleaved = info.get("interleaved")
        if interleaved:
            rounds[shape] = interleaved
            measured = {backend: statistics.median(times) for backend, times in interleaved.items()}
        else:
            measured = {info.get("backend", bench["name"]): bench["stats"]["median"]}
        for backend, seconds in measured.items():
            table.setdefault(shape, {})[backend] = seconds
            if backend not in backends:
                backends.append(backend)
    order = [b for b in LABELS if b in backends] + [b for b in backends if b not in LABELS]
    return table, order, rounds


def machine_lines(data: dict, benchmarks: list[dict]) -> list[str]:
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    extra: dict = {}
    blas = []  # every run's, which should be one: a run on another BLAS measured another floor
    for bench in benchmarks:
        for key, value in bench.get("extra_info", {}).items():
            if value is not None:
                extra.setdefault(key, value)
        found = bench.get("extra_info", {}).get("blas")
        if found and found not in blas:
            blas.append(found)
    if len(blas) > 1:
        extra["blas"] = " / ".join(blas) + ": differs between runs"
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
    timers = sorted({b.get("options", {}).get("timer") for b in benchmarks} - {None})
    if timers and timers != ["perf_counter"]:
        lines.append(f"Timer: {', '.join(timers)} (CPU time of the process, not wall time)")
    loads = [b["extra_info"]["load_average_1min"] for b in benchmarks
             if b.get("extra_info", {}).get("load_average_1min") is not None]
    if loads:
        lines.append(f"Load average (1 min) seen by the benchmarks: {min(loads):.2f} to {max(loads):.2f}")
    if extra.get("cpu_kernels"):
        lines.append(f"gpubp's elementwise CPU kernels: {extra['cpu_kernels']}")
    if extra.get("OPENBLAS_CORETYPE"):
        lines.append(f"OPENBLAS_CORETYPE={extra['OPENBLAS_CORETYPE']}")
    if data.get("datetime"):
        lines.append(f"Run: {data['datetime']}")
    return lines


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(data: dict, runs: list[list[dict]]) -> str:
    per_run = [medians(benchmarks) for benchmarks in runs]
    table, backends = median_of_runs(per_run)
    interleaved = any(rounds for _, _, rounds in per_run)
    head = ["shape @ batch"] + [f"{LABELS.get(b, b)} (ms)" for b in backends]
    lines = ["# One CPU training step (forward, softmax-CE, backward, SGD momentum)", ""]
    lines += [f"{line}  " for line in machine_lines(data, [b for run in runs for b in run])]
    lines += ["", f"Median step time in milliseconds ({len(runs)} run{'s' if len(runs) > 1 else ''}: "
              "the median over runs of each run's median).", ""]
    lines += [_row(head), "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for shape, times in table.items():
        lines.append(_row([f"`{shape}`"] + [f"{times[b] * 1e3:.3f}" if b in times else "-" for b in backends]))
    columns = [(n, d, ratios(per_run, n, d)) for n, d in RATIOS if n in backends and d in backends]
    if columns:
        spread = " (min-max over runs)" if len(runs) > 1 else ""
        within = ("each the median of one run's per-round ratios (the backends interleaved round by round)"
                  if interleaved else "each taken within one run")
        floor = ("Against the GEMM floor (the step's matrix products alone, through NumPy's BLAS) lower is better "
                 "and 1 is the limit; " if any(d == FLOOR for _, d, _ in columns) else "")
        lines += ["", f"Ratios, {within}: the median over runs{spread}. {floor}"
                  f"{'against' if floor else 'Against'} PyTorch, below 1 is faster.", ""]
        lines += [_row(["shape @ batch"] + [f"{LABELS.get(n, n)} / {LABELS.get(d, d)}" for n, d, _ in columns]),
                  "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
        for shape in table:
            cells = [f"`{shape}`"]
            cells += [ratio_cell(values.get(shape)) for _, _, values in columns]
            lines.append(_row(cells))
    return "\n".join(lines) + "\n"


def ratio_cell(got: list[float] | None) -> str:
    """A ratio's table cell: "-" for none, one run's ratio, or the median over runs (min-max)."""
    if not got:
        return "-"
    if len(got) == 1:
        return f"{got[0]:.2f}x"
    return f"{statistics.median(got):.2f}x ({min(got):.2f}-{max(got):.2f})"


def plot(data: dict, runs: list[list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_run = [medians(benchmarks) for benchmarks in runs]
    table, backends = median_of_runs(per_run)
    shapes = list(table)
    reference = FLOOR if FLOOR in backends else TORCH if TORCH in backends else None
    shown = [b for b in backends if b != reference]
    width = 0.8 / len(shown)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.4 * len(shapes)), 4.4))
    for k, backend in enumerate(shown):
        xs, heights, labels = [], [], []
        # The table's ratios: each run's per-round ratios where it interleaved, their median over runs.
        paired = ratios(per_run, backend, reference) if reference else {}
        for i, shape in enumerate(shapes):
            times = table[shape]
            if backend not in times or (reference and reference not in times):
                continue
            xs.append(i + (k - (len(shown) - 1) / 2) * width)
            heights.append(statistics.median(paired[shape]) if reference else times[backend] * 1e3)
            labels.append(f"{times[backend] * 1e3:.3g}")
        bars = ax.bar(xs, heights, width, label=LABELS.get(backend, backend))
        ax.bar_label(bars, labels, fontsize=6, padding=1)
    if reference:
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_ylabel(f"step time / {LABELS[reference]} (lower is better)")
    else:
        ax.set_yscale("log")
        ax.set_ylabel("median step time (ms)")
    ax.set_xticks(range(len(shapes)), shapes, fontsize=8)
    ax.set_title(machine_lines(data, runs[0])[0], fontsize=8)
    fig.suptitle(f"CPU training step, median of {len(runs)} run(s) (bar labels: ms)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+", help="pytest-benchmark JSON (--benchmark-json), one per run")
    parser.add_argument("--markdown", type=Path, help="write the table here instead of stdout")
    parser.add_argument("--png", type=Path, help="write a bar chart here (matplotlib)")
    args = parser.parse_args(argv)
    loaded = [load(path) for path in args.json]
    for path, (_, benchmarks) in zip(args.json, loaded):
        if not benchmarks:
            parser.error(f"{path}: no benchmarks in this file")
    data, runs = loaded[0][0], [benchmarks for _, benchmarks in loaded]
    text = markdown(data, runs)
    if args.markdown:
        args.markdown.write_text(text)
    else:
        sys.stdout.write(text)
    if args.png:
        plot(data, runs, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
