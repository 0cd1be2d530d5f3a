"""A fit on sparse input: gpubp's NumPy backend multiplying SciPy CSR batches as they are, against
the same batches made dense, the same data dense from the start, and scikit-learn's MLPClassifier.

The data: ``ROWS`` (4000) rows of ``FEATURES`` (20000) float32 features,
``scipy.sparse.random(..., density=d, format="csr", dtype=np.float32, random_state=0)`` for each
``d`` in ``DENSITIES`` (0.2%, 1% and 2% of the entries stored, a TF-IDF or hashed feature matrix's
range), with labels 0..4. The model: ``Dense(20000, 100, relu) -> Dense(100, 5)``, float32, on the
CPU backend, softmax cross-entropy and Adam, ``batch_size=200``. The timed unit is one epoch,
``model.fit(x, y, epochs=1, batch_size=200, verbose=0)`` (20 steps, with fit's own data checks and
shuffling), in four ways:

- ``sparse``: the CSR matrix, as a user passes it: a batch that stores at most
  ``numpy_backend.SPARSE_MAX_DENSITY`` (2%) of its entries reaches the first Dense layer sparse,
  and its forward product ``x @ W`` and weight gradient ``x.T @ dz`` skip the zeros;
- ``densified``: the same CSR matrix with ``SPARSE_MAX_DENSITY`` set to -1 (monkeypatched around
  each of its epochs), so that every batch is made dense as it is used: the path the backend took
  before it multiplied sparse batches, and still takes for a denser batch;
- ``dense``: ``x.toarray()`` passed in up front (a dense copy of the whole matrix, which a real
  TF-IDF matrix often has no room for);
- ``scikit-learn``: ``sklearn.neural_network.MLPClassifier(hidden_layer_sizes=(100,),
  max_iter=1, batch_size=200, solver="adam")`` fit on the same float32 CSR matrix (which it keeps
  sparse and float32), with ``random_state=0`` and ``warm_start=True``: each ``fit`` is then one
  more epoch of the same network, as each gpubp epoch is, rather than a new network's first.
  Left out where scikit-learn is not installed.

Each gpubp way builds its model once, after ``gb.seed(SEED)`` (the same weights in every way),
outside the timed part; the model trains on from round to round. The 2% case sits on the
threshold: the matrix stores 2% of its entries in all, so about half its batches store a little
more and are made dense even in the ``sparse`` way. ``extra_info["sparse_batch_fraction"]`` is the
fraction of the ``sparse`` way's batches that went sparse in its warm-up epoch.

As ``bench/test_cpu_step.py`` does, the ways are interleaved: a round times one epoch of each,
one after another (the order of the others rotates from round to round), each after a
``SETTLE_SECONDS`` sleep that lets the previous block's BLAS threads stop spinning, and a ratio is
the median of the rounds' ratios, taken between epochs timed moments apart. An epoch is long
enough (a tenth of a second to a second or so) that no untimed step is run after the sleep to wake the
threads. pytest-benchmark's own statistics are the ``sparse`` way's epochs; every way's seconds
per epoch in each round are in ``extra_info["interleaved"]``. A full run takes about two minutes
on a 2-core machine.

The tables, each from three runs back to back, come from this file run as a script (it needs
gpubp importable, as the benchmark does, and reads the JSONs with ``bench/report.py``'s helpers).
``bench/report.py`` reads these JSONs too, but as CPU steps: it lists every way's median time
(headed "step time" in ms), and its ratio columns are only those of ``test_cpu_step.py``'s
backends, so it shows none of these ways' ratios.

- **every core, wall clock** (what a user sees)::

      for run in 1 2 3; do
          python -m pytest bench/test_sparse_input.py -q --benchmark-json bench/results/sparse_input_allcores-$run.json
      done
      python bench/test_sparse_input.py bench/results/sparse_input_allcores-{1,2,3}.json \\
          --markdown bench/results/sparse_input_allcores.md

- **one thread, process time** (steadier on a shared machine)::

      for run in 1 2 3; do
          OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python -m pytest bench/test_sparse_input.py -q \\
              --benchmark-timer time.process_time --benchmark-json bench/results/sparse_input_1thread-$run.json
      done
      python bench/test_sparse_input.py bench/results/sparse_input_1thread-{1,2,3}.json \\
          --markdown bench/results/sparse_input_1thread.md

``extra_info`` records the thread counts (``gpubp_threads``, ``blas_threads``), the load average
at the start of the case and the scikit-learn version. A quick check that everything runs, untimed
(one round)::

    python -m pytest bench/test_sparse_input.py -q --benchmark-disable
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import gpubp as gb
from gpubp.backends import numpy_backend
from test_cpu_step import thread_info

pytest.importorskip("pytest_benchmark")
sparse = pytest.importorskip("scipy.sparse")

ROWS = 4000
FEATURES = 20000
HIDDEN = 100
CLASSES = 5
BATCH = 200
SEED = 0
DENSITIES = (0.002, 0.01, 0.02)
WAYS = ("sparse", "densified", "dense", "scikit-learn")

# Rounds per density: as many as fit in MAX_SECONDS_PER_CASE (one round is one epoch of every
# way, a second or two at 2%), at least MIN_ROUNDS and at most ROUNDS.
ROUNDS = 15
MIN_ROUNDS = 7
MAX_SECONDS_PER_CASE = 30.0
SETTLE_SECONDS = 0.15


def case_id(density: float) -> str:
    return f"{ROWS}x{FEATURES} d={density}"


def make_data(density: float):
    x = sparse.random(ROWS, FEATURES, density=density, format="csr", dtype=np.float32, random_state=0)
    labels = np.random.default_rng(0).integers(0, CLASSES, ROWS)
    return x, labels


# ----------------------------------------------------------------------------- the four ways


def gpubp_epoch(x, labels, densify: bool = False):
    """One epoch of fit of a model built here (``gb.seed(SEED)``), as a closure returning its loss;
    ``densify``: with ``SPARSE_MAX_DENSITY`` -1 during the epoch, so every batch is made dense."""
    gb.seed(SEED)
    model = gb.Sequential([gb.Dense(FEATURES, HIDDEN, activation="relu"), gb.Dense(HIDDEN, CLASSES)], device="cpu")
    model.compile(optimizer="adam", loss="cross_entropy")
    assert model.dtype == np.float32 and model.takes_sparse

    def fit() -> float:
        return model.fit(x, labels, epochs=1, batch_size=BATCH, verbose=0)["loss"][-1]

    if not densify:
        return fit

    def densified_fit() -> float:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(numpy_backend, "SPARSE_MAX_DENSITY", -1)
            return fit()

    return densified_fit


def sklearn_epoch(x, labels):
    """One more epoch of scikit-learn's MLPClassifier (``warm_start``), its loss; its first fit, the
    network's build, is the warm-up."""
    pytest.importorskip("sklearn")
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(HIDDEN,), max_iter=1, batch_size=BATCH, solver="adam", random_state=0,
                        warm_start=True)

    def fit() -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter=1 never converges
            clf.fit(x, labels)
        assert clf.coefs_[0].dtype == np.float32
        return float(clf.loss_)

    return fit


def built_ways(density: float) -> tuple[dict, dict]:
    """{way: epoch} on one density, each run once untimed (its loss must be finite), and what the
    warm-up saw: the fraction of the sparse way's batches that went sparse."""
    x, labels = make_data(density)
    builders = {"sparse": lambda: gpubp_epoch(x, labels),
                "densified": lambda: gpubp_epoch(x, labels, densify=True),
                "dense": lambda: gpubp_epoch(x.toarray(), labels),
                "scikit-learn": lambda: sklearn_epoch(x, labels)}
    ways, seen = {}, {}
    for way in WAYS:
        try:
            epoch = builders[way]()
        except pytest.skip.Exception:
            continue
        if way == "sparse":
            loss, seen["sparse_batch_fraction"] = counting_sparse_batches(epoch)
        else:
            loss = epoch()
        assert np.isfinite(loss), way
        ways[way] = epoch
    seen.update(nnz=int(x.nnz), stored_fraction=x.nnz / (ROWS * FEATURES))
    return ways, seen


def counting_sparse_batches(epoch) -> tuple[float, float]:
    """``epoch()``'s loss, and the fraction of its batches that the backend took sparse."""
    taken = []

    def multiplies_sparse(x, width: int) -> bool:
        taken.append(original(x, width))
        return taken[-1]

    original = numpy_backend.multiplies_sparse
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numpy_backend, "multiplies_sparse", multiplies_sparse)
        loss = epoch()
    assert len(taken) == -(-ROWS // BATCH), len(taken)  # one decision a batch, none missed
    return loss, sum(taken) / len(taken)


# ----------------------------------------------------------------------------- the benchmark


@pytest.mark.parametrize("density", DENSITIES, ids=[f"d{d}" for d in DENSITIES])
def test_sparse_fit(benchmark, request, density):
    """One epoch of every way on one density, interleaved round by round (``interleaved``)."""
    from pytest_benchmark.utils import load_timer

    ways, seen = built_ways(density)
    timer = load_timer(request.config.getoption("benchmark_timer")).target
    if benchmark.disabled:  # --benchmark-disable: one untimed round, a check that everything runs
        rounds = 1
    else:
        one_round = sum(timed(epoch, timer) + SETTLE_SECONDS for epoch in ways.values())
        rounds = max(MIN_ROUNDS, min(ROUNDS, int(MAX_SECONDS_PER_CASE / one_round)))
    others = [way for way in ways if way != "sparse"]
    times: dict[str, list[float]] = {way: [] for way in ways}
    order = {"next": 0}

    def run_the_others():
        k = order["next"] % max(len(others), 1)
        order["next"] += 1
        for way in others[k:] + others[:k]:
            times[way].append(timed(ways[way], timer))
        time.sleep(SETTLE_SECONDS)  # the sparse way's settling, outside pytest-benchmark's timing

    def timed_sparse_epoch():
        started = timer()
        ways["sparse"]()
        times["sparse"].append(timer() - started)

    name = case_id(density)
    benchmark.group = name
    benchmark.extra_info.update(shape=name, density=density, rows=ROWS, features=FEATURES, hidden=HIDDEN,
                                classes=CLASSES, batch=BATCH, backend="sparse", dtype="float32",
                                unit="seconds per epoch", sparse_max_density=numpy_backend.SPARSE_MAX_DENSITY,
                                gpubp_version=gb.__version__, cpu_kernels=numpy_backend.cpu_kernels(), **seen,
                                **thread_info())
    if "scikit-learn" in ways:
        import sklearn

        benchmark.extra_info.update(scikit_learn_version=sklearn.__version__)
    benchmark.pedantic(timed_sparse_epoch, setup=run_the_others, rounds=rounds)
    assert all(len(v) == rounds for v in times.values()), {w: len(v) for w, v in times.items()}
    benchmark.extra_info.update(interleaved=times)


def timed(epoch, timer) -> float:
    """Seconds (by ``timer``) of one ``epoch()``, after ``SETTLE_SECONDS`` of sleep."""
    time.sleep(SETTLE_SECONDS)
    started = timer()
    epoch()
    return timer() - started


# ----------------------------------------------------------------------------- the table

# (numerator, denominator): above 1, the sparse fit is the faster
RATIOS = [("densified", "sparse"), ("dense", "sparse"), ("scikit-learn", "sparse")]


def markdown(paths: list[Path]) -> str:
    """A table of the runs in ``paths`` (one JSON each): every way's median seconds per epoch (the
    median over runs of each run's median) and the ratios, each run's the median of its rounds'."""
    from report import load, machine_lines, median_of_runs, medians, ratio_cell, ratios

    loaded = [load(path) for path in paths]
    for path, (_, benchmarks) in zip(paths, loaded):
        if not benchmarks:
            raise SystemExit(f"{path}: no benchmarks in this file")
    runs = [benchmarks for _, benchmarks in loaded]
    per_run = [medians(benchmarks) for benchmarks in runs]
    table, ways = median_of_runs(per_run)
    ways = [w for w in WAYS if w in ways] + [w for w in ways if w not in WAYS]
    everything = [b for run in runs for b in run]
    fractions = {}
    for bench in everything:
        info = bench.get("extra_info", {})
        fractions.setdefault(info.get("shape"), set()).add(info.get("sparse_batch_fraction"))
    versions = sorted({b["extra_info"]["scikit_learn_version"] for b in everything
                       if b.get("extra_info", {}).get("scikit_learn_version")})
    columns = [(n, d, ratios(per_run, n, d)) for n, d in RATIOS if n in ways and d in ways]
    lines = [f"# One epoch of fit on sparse input ({ROWS} rows, Dense({FEATURES}, {HIDDEN}, relu) -> "
             f"Dense({HIDDEN}, {CLASSES}), Adam, batch {BATCH}, float32)", ""]
    lines += [f"{line}  " for line in machine_lines(loaded[0][0], everything)]
    if versions:
        lines.append(f"scikit-learn {', '.join(versions)}  ")
    spread = " (min-max over runs)" if len(runs) > 1 else ""
    lines += ["", f"Median seconds per epoch ({len(runs)} run{'s' if len(runs) > 1 else ''}: the median over runs of "
              "each run's median), then each way's time over the sparse fit's, each run's the median of its "
              f"rounds' ratios, the median over runs{spread}: above 1, the sparse fit is the faster. "
              "`sparse batches`: the fraction of the sparse fit's batches that went sparse.", ""]
    head = (["data"] + [f"{way} (s)" for way in ways] + [f"{n} / {d}" for n, d, _ in columns]
            + ["sparse batches"])
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for shape, times in table.items():
        cells = [f"`{shape}`"] + [f"{times[w]:.3f}" if w in times else "-" for w in ways]
        cells += [ratio_cell(values.get(shape)) for _, _, values in columns]
        seen = sorted(f for f in fractions.get(shape, ()) if f is not None)
        cells.append(", ".join(f"{f:.2f}" for f in seen) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tabulate pytest-benchmark JSONs of bench/test_sparse_input.py.")
    parser.add_argument("json", type=Path, nargs="+", help="pytest-benchmark JSON (--benchmark-json), one per run")
    parser.add_argument("--markdown", type=Path, help="write the table here instead of stdout")
    args = parser.parse_args(argv)
    text = markdown(args.json)
    if args.markdown:
        args.markdown.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
