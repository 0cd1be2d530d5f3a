"""``python -m gpubp demo``, the Quick start's first command, on the CPU backend with few epochs.

CI runs the whole demo once on a clean machine; these tests check what it prints, so a change
that breaks a line of it (or its timing line's arithmetic) fails here with the reason. ``info``
is tested where what it reports is (tests/test_kernels_compile.py, tests/test_cupy_paths_on_cpu.py).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import gpubp as gb
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


def usage_error(argv, capsys) -> str:
    """What ``main(argv)`` writes to stderr, after checking it exits as argparse does on a usage error."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""  # refused before anything runs
    return err


@pytest.mark.parametrize("argv, message", [
    (["demo", "--epochs", "0"], "argument --epochs: expected an int >= 1, got 0"),
    (["demo", "--epochs", "-2"], "argument --epochs: expected an int >= 1, got -2"),
    (["demo", "--epochs", "1.5"], "argument --epochs: expected an int >= 1, got '1.5'"),
    (["demo", "--shots", "0"], "argument --shots: expected an int >= 1, got 0"),
    (["demo", "--seed", "-1"], "argument --seed: expected an int >= 0, got -1"),
    (["bench", "--repeats", "0"], "argument --repeats: expected an int >= 1, got 0"),
], ids=["epochs_0", "epochs_negative", "epochs_not_an_int", "shots_0", "seed_negative", "repeats_0"])
def test_an_option_out_of_its_range_is_a_usage_error_naming_the_option_and_the_range(argv, message, capsys):
    assert message in usage_error(argv, capsys)


def fewest_training_images_of_a_new_digit(seed=0):
    x, y = gb.data.load_digits()
    y_train = gb.data.train_test_split(x, y, test_size=0.2, seed=seed, stratify=True)[2]
    return min(int(np.count_nonzero(y_train == digit)) for digit in range(5, 10))


def test_more_shots_than_the_rarest_new_digit_has_is_a_usage_error_naming_the_most(capsys):
    most = fewest_training_images_of_a_new_digit()
    err = usage_error(["demo", "--shots", str(most + 1), "--backend", "numpy"], capsys)
    assert f"argument --shots: expected an int in [1, {most}]" in err and f"got {most + 1}" in err


def test_the_demo_takes_as_many_shots_as_the_rarest_new_digit_has(capsys):
    most = fewest_training_images_of_a_new_digit()
    assert main(["demo", "--epochs", "1", "--shots", str(most), "--quiet", "--backend", "numpy"]) == 0
    assert f"with {most} labels per class" in capsys.readouterr().out


def test_a_backend_of_another_device_is_a_usage_error(capsys):
    err = usage_error(["demo", "--device", "cpu", "--backend", "cupy"], capsys)
    assert "backend: 'cupy' runs on device 'cuda', but device='cpu' was asked for" in err


@pytest.mark.parametrize("argv", [["demo", "--backend", "cupy"], ["bench", "--backend", "cupy", "--repeats", "1"]])
def test_a_backend_that_cannot_run_here_is_a_usage_error_not_a_traceback(argv, capsys, monkeypatch):
    reasons = {**gb.backends.available(), "cupy": "no CUDA here (stand-in reason)"}
    monkeypatch.setattr(gb.backends, "available", lambda: reasons)
    err = usage_error(argv, capsys)
    assert "'cupy' is not available" in err and "Traceback" not in err
