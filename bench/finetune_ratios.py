"""Print the fine-tuning step ratios from a pytest-benchmark JSON as a markdown table.

    python -m pytest bench/test_finetune.py --benchmark-json ft.json
    python bench/finetune_ratios.py ft.json [--stat median|min|mean]

One row per backend and shape (see bench/test_finetune.py for the step kinds):
frozen-backbone step / forward pass (target <= 1.10), frozen-backbone / full step,
head-only / full step, BitFit (biases alone train) / full step. PyTorch's CPU build gets its own row in the same table.

Two estimates of each ratio: from the benchmarks' own statistics (``--stat``, default median,
as bench/gpu_summary.py and the GPU tables take it), and "paired": each training step timed
alternately with a forward pass, so both see the same load (``paired_over_forward`` in
extra_info); frozen / full (paired) is then the ratio of the two paired ratios. On a busy
machine trust the paired columns.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

STEPS = ("forward", "full", "frozen_backbone", "head_only", "bitfit")
RATIOS = (("frozen / forward", "frozen_backbone", "forward"),
          ("frozen / full", "frozen_backbone", "full"),
          ("head-only / full", "head_only", "full"),
          ("bitfit / full", "bitfit", "full"))


def step_times(report: dict, stat: str) -> dict[tuple, dict[str, float]]:
    """{(backend, shape, batch, device): {step: seconds, "paired " + step: step / forward}}."""
    table: dict[tuple, dict[str, float]] = defaultdict(dict)
    for bench in report["benchmarks"]:
        info = bench.get("extra_info", {})
        if info.get("step") not in STEPS:
            continue
        key = (info["backend"], "x".join(map(str, info["shape"])), info["batch"], info.get("device", ""))
        table[key][info["step"]] = bench["stats"][stat]
        paired = info.get("paired_over_forward", 1.0 if info["step"] == "forward" else None)
        table[key]["paired " + info["step"]] = paired
    return table


def _ratio(times: dict, top: str, bottom: str) -> str:
    if times.get(top) is None or times.get(bottom) is None:
        return "-"
    return f"{times[top] / times[bottom]:.2f}"


def markdown(table: dict[tuple, dict[str, float]], stat: str) -> str:
    header = (["backend", "shape", "batch"] + [f"{step} ms ({stat})" for step in STEPS]
              + [name for name, _, _ in RATIOS] + [f"{name} (paired)" for name, _, _ in RATIOS])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (backend, shape, batch, _), times in sorted(table.items()):
        cells = [backend, shape, str(batch)]
        cells += [f"{times[step] * 1e3:.2f}" if step in times else "-" for step in STEPS]
        cells += [_ratio(times, top, bottom) for _, top, bottom in RATIOS]
        cells += [_ratio(times, "paired " + top, "paired " + bottom) for _, top, bottom in RATIOS]
        lines.append("| " + " | ".join(cells) + " |")
    devices = sorted({(backend, device) for backend, _, _, device in table})
    lines.append("")
    lines += [f"{backend}: {device}" for backend, device in devices]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="the file written by pytest --benchmark-json")
    parser.add_argument("--stat", choices=("median", "min", "mean"), default="median")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        report = json.load(f)
    table = step_times(report, args.stat)
    if not table:
        raise SystemExit(f"{args.json}: no fine-tuning benchmarks (run bench/test_finetune.py)")
    print(markdown(table, args.stat))


if __name__ == "__main__":
    main()
