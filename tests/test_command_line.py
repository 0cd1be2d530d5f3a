"""``python -m gpubp demo``, the Quick start's first command, on the CPU backend with few epochs.

CI runs the whole demo once on a clean machine; these tests check what it prints, so a change
that breaks a line of it (or its timing line's arithmetic) fails here with the reason. ``info``
is tested where what it reports is (tests/test_kernels_compile.py, tests/test_cupy_paths_on_cpu.py).
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import gpubp as gb
from gpubp import __main__ as cli
from gpubp.__main__ import _epoch_times, main
from child_process import child_env

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


def test_one_epoch_reads_one_epoch(capsys):
    assert main(["demo", "--epochs", "1", "--shots", "3", "--quiet", "--device", "cpu"]) == 0
    assert re.search(r"after 1 epoch, ", capsys.readouterr().out)


@pytest.mark.parametrize("how", ["python -m gpubp", "the gpubp script"])
def test_a_reader_that_goes_away_ends_the_demo_quietly(tmp_path, how):
    """``gpubp demo | head -2``: a BrokenPipeError traceback at the first print after. The script
    pyproject.toml installs calls main() itself, as this does."""
    command = ["-m", "gpubp"] if how == "python -m gpubp" else [
        "-c", "import sys; from gpubp.__main__ import main; sys.exit(main())"]
    reader = subprocess.Popen(["head", "-c", "1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    done = subprocess.run([sys.executable, *command, "demo", "--epochs", "1", "--shots", "3", "--quiet",
                           "--device", "cpu"], stdout=reader.stdin, stderr=subprocess.PIPE, text=True,
                          env=child_env(), cwd=tmp_path, timeout=300)
    reader.stdin.close()
    reader.wait()
    assert "BrokenPipeError" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1


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


def test_the_demo_without_scikit_learn_is_a_usage_error_naming_the_demo_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `pip install gpubp`, without the demo extra
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    err = usage_error(["demo", "--epochs", "1", "--quiet", "--backend", "numpy"], capsys)
    assert 'pip install "gpubp[demo]"' in err and "Traceback" not in err


@pytest.mark.parametrize("env, argv", [
    ({"GPUBP_DEVICE": "cuda"}, ["--device", "cpu"]),
    ({"GPUBP_DEVICE": "cuda"}, ["--backend", "numpy"]),
    ({"GPUBP_BACKEND": "numba"}, ["--device", "cpu"]),
], ids=["device_over_GPUBP_DEVICE", "backend_over_GPUBP_DEVICE", "device_over_GPUBP_BACKEND"])
def test_the_demo_runs_where_its_arguments_say_whatever_the_environment_says(env, argv, capsys, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["demo", "--epochs", "1", "--shots", "5", "--quiet"] + argv) == 0
    assert re.search(r"^gpubp \S+: device 'cpu', backend 'numpy'$", capsys.readouterr().out, re.M)


@pytest.fixture
def untimed(monkeypatch):
    """``bench`` with every step timed at 1 ms: what it prints, not how long the steps take."""
    monkeypatch.setattr(cli, "_step_seconds", lambda model, x, y, opt, repeats: 1e-3)


def test_bench_times_the_backend_asked_for_whatever_gpubp_device_says(untimed, capsys, monkeypatch):
    monkeypatch.setenv("GPUBP_DEVICE", "cuda")
    assert main(["bench", "--backend", "numpy", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("; 1 repeat")
    assert len(lines) == 4 and all(line.endswith("numpy: 1.000") for line in lines[1:]), lines


def test_bench_of_the_numba_backend_in_the_cuda_simulator_is_a_usage_error_saying_why(capsys, monkeypatch):
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    reasons = {**gb.backends.available(), "numba": None}  # as numba-cuda's simulator runs anywhere
    monkeypatch.setattr(gb.backends, "available", lambda: reasons)
    err = usage_error(["bench", "--backend", "numba", "--repeats", "1"], capsys)
    assert "argument --backend: 'numba' cannot be timed: it runs in the CUDA simulator" in err


def test_bench_of_every_backend_skips_one_in_the_cuda_simulator(untimed, capsys, monkeypatch):
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    monkeypatch.setattr(gb.backends, "available", lambda: {"numpy": None, "cupy": "no GPU", "numba": None})
    assert main(["bench", "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("; 2 repeats")
    assert all(line.endswith("numpy: 1.000  numba: skipped (CUDA simulator)") for line in lines[1:]), lines


@pytest.mark.parametrize("argv0, prog", [
    ("/venv/bin/gpubp", "gpubp"),  # the console script (pip's wrapper strips a Windows .exe)
    ("/site-packages/gpubp/__main__.py", "python -m gpubp"),  # what -m puts in argv[0]
], ids=["console_script", "module"])
def test_usage_errors_name_the_command_as_it_was_run(argv0, prog, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [argv0, "bench", "--repeats", "0"])
    assert f"\n{prog} bench: error: argument --repeats" in usage_error(None, capsys)


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_every_option_with_a_value_shows_its_default_in_the_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    options = re.split(r"options:|optional arguments:", text)[1]
    helps = {part.split()[0]: part for part in re.split(r" (?=--[a-z])", options) if part.startswith("--")}
    defaults = {"demo": {"--epochs": 40, "--shots": 20, "--seed": 0, "--device": "auto", "--backend": "auto"},
                "bench": {"--repeats": 20, "--backend": "auto"}}[command]
    assert set(helps) - {"--help", "--quiet"} == set(defaults)
    for option, default in defaults.items():
        assert helps[option].endswith(f"(default: {default})"), helps[option]
