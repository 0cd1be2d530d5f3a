"""bench/report.py: the ratios it prints are the ones the benchmark JSON supports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(shape: str, backend: str, median: float, interleaved: dict | None = None) -> dict:
    info = {"shape": shape, "backend": backend}
    if interleaved is not None:
        info["interleaved"] = interleaved
    return {"name": f"test_cpu_step[{shape}]", "group": shape, "stats": {"median": median}, "extra_info": info}


def test_an_interleaved_run_gives_the_median_of_its_rounds_ratios_not_the_ratio_of_medians(report):
    # gpubp takes 1.1x the floor in four of five rounds; the machine slowed down 3x for the floor's
    # last three blocks and gpubp's last two. The medians (1.1 and 3.0) would say 0.37x.
    rounds = {"gpubp": [1.1, 1.1, 1.1, 3.3, 3.3], "gemm_floor": [1.0, 1.0, 3.0, 3.0, 3.0]}
    per_run = [report.medians([bench("s", "gpubp", 0.0, rounds)])]
    assert per_run[0][0]["s"] == {"gpubp": pytest.approx(1.1), "gemm_floor": 3.0}
    assert report.ratios(per_run, "gpubp", "gemm_floor") == {"s": [pytest.approx(1.1)]}


def test_separate_cases_give_the_ratio_of_their_medians(report):
    per_run = [report.medians([bench("s", "gpubp", 3.0), bench("s", "torch", 4.0)])]
    assert report.ratios(per_run, "gpubp", "torch") == {"s": [pytest.approx(0.75)]}


def test_the_markdown_says_how_its_ratios_were_taken(report, tmp_path):
    rounds = {"gpubp": [1.0, 1.2], "torch": [2.0, 2.0], "gemm_floor": [0.9, 1.0]}
    data = {"machine_info": {}, "benchmarks": [bench("784@64", "gpubp", 1.1, rounds)]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "run.md"
    assert report.main([str(path), "--markdown", str(out)]) == 0
    text = out.read_text()
    assert "per-round ratios" in text
    assert "| `784@64` | 1100.000 | 2000.000 | 950.000 |" in text  # medians of the rounds, in ms
    # per round gpubp / floor is 1.0 / 0.9 and 1.2 / 1.0 (median 1.16), torch / floor 2.22 and 2.0, gpubp / torch 0.5 and 0.6
    assert "| `784@64` | 1.16x | 2.11x | 0.55x |" in text


def test_every_benchmark_module_collects():
    """pytest bench/ is what a user runs: a helper renamed in one benchmark module must not break
    another's import (bench/test_torch_bridge.py once imported a removed warmed_up_step)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", str(ROOT / "bench")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    collected = {line.split("::")[0] for line in done.stdout.splitlines() if "::" in line}
    assert {f"bench/{path.name}" for path in (ROOT / "bench").glob("test_*.py")} <= collected


def test_the_bridge_ratios_are_tabulated(report, tmp_path):
    rounds = {"gpubp": [1.0, 1.0], "torch": [2.0, 2.0], "bridge": [3.0, 3.0]}
    benchmarks = [bench("s@1", "gpubp", 1.0, rounds)]
    data = {"machine_info": {}, "benchmarks": benchmarks}
    text = report.markdown(data, [benchmarks])
    assert "| bridge / PyTorch CPU | bridge / gpubp |" in text and "| 1.50x | 3.00x |" in text


def test_the_sparse_input_table_gives_each_ways_ratio_to_the_sparse_fit_per_round(tmp_path, monkeypatch):
    """bench/test_sparse_input.py's table: each way's ratio to the sparse fit is the median of a
    run's per-round ratios, then the median (and spread) over runs; the fraction of batches that
    went sparse comes last."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_sparse_input", ROOT / "bench" / "test_sparse_input.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths = []
    for run, slow in enumerate((1.0, 2.0)):  # the second run's densified rounds are twice as slow
        rounds = {"sparse": [1.0, 1.5], "densified": [3.0 * slow, 2.0 * slow], "dense": [4.0, 4.5]}
        entry = bench("4000x20000 d=0.01", "sparse", 1.25, rounds)
        entry["extra_info"]["sparse_batch_fraction"] = 0.5
        paths.append(tmp_path / f"run{run}.json")
        paths[-1].write_text(json.dumps({"machine_info": {}, "benchmarks": [entry]}))
    text = module.markdown(paths)
    assert "| data | sparse (s) | densified (s) | dense (s) | densified / sparse | dense / sparse | sparse batches |" in text
    # densified / sparse per round: 3.0, 1.33 (median 2.17) in run 1; 6.0, 2.67 (4.33) in run 2;
    # dense / sparse: 4.0, 3.0 (3.5) in both
    assert "| `4000x20000 d=0.01` | 1.250 | 3.750 | 4.250 | 3.25x (2.17-4.33) | 3.50x (3.50-3.50) | 0.50 |" in text
