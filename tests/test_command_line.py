"""``python -m gpubp demo``, the Quick start's first command, on the CPU backend with few epochs.

CI runs the whole demo once on a clean machine; these tests check what it prints, so a change
that breaks a line of it (or its timing line's arithmetic) fails here with the reason. ``info``
is tested where what it reports is (tests/test_kernels_compile.py, tests/test_cupy_paths_on_cpu.py).
"""

from __future__ import annotations

import re

import pytest

from gpubp.__main__ import _epoch_times, main

pytest.importorskip("sklearn", reason="the demo's digits ship with scikit-learn (the demo extra)")


def test_the_demo_trains_fine_tunes_a_frozen_backbone_and_times_both_steps(capsys):
    assert main(["demo", "--epochs", "3", "--shots", "5", "--quiet", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^gpubp \S+: device 'cpu', backend 'numpy'$", out, re.M), out
    accuracy = re.search(r"^test accuracy ([\d.]+)% \(macro F1 [\d.]+\) after 3 epochs, [\d.]+ ms per epoch after "
                         r"the first \(\d+ ms\)$", out, re.M)
    assert accuracy and float(accuracy.group(1)) > 80, out  # three epochs already learn the digits
    assert re.search(r"^fine-tuned on 5-9 with 5 labels per class: test accuracy [\d.]+%; backbone unchanged: True$",
                     out, re.M), out
    assert re.search(r"^step time at batch 256: frozen backbone [\d.]+ ms, full [\d.]+ ms \([\d.]+x\)", out, re.M), out


def test_the_demo_reports_the_median_epoch_after_the_first_which_loads_the_kernels():
    assert _epoch_times([5.5, 0.031, 0.029, 0.030, 0.2], "cupy") == (
        "30.5 ms per epoch after the first (5500 ms, loading the kernels: NVRTC compiles them on a GPU's first run)")
    assert _epoch_times([0.04, 0.02, 0.03], "numpy") == "25.0 ms per epoch after the first (40 ms)"
    assert _epoch_times([0.04], "numpy") == "one epoch of 40 ms"
