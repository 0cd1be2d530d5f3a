"""Every example in gpubp's docstrings runs, shows what the docstring says it shows, and warns
of nothing (a user who pastes one should see no ConvergenceWarning).

A module's examples run in this process with doctest (ELLIPSIS and NORMALIZE_WHITESPACE),
with gpubp's random stream and ``tempfile``'s folder put back afterwards, so an example's
``gb.seed(0)`` or ``tempfile.mkdtemp()`` reaches no other test. The CuPy backend's examples
need a GPU (or the stand-in of ``--gpu-rehearsal``); the optional integrations' need their
packages, which the test extras install.
"""

from __future__ import annotations

import doctest
import importlib
import sys
import tempfile
import types
import warnings
from pathlib import Path

import pytest

import gpubp
from gpubp import _random, backends

PACKAGE = Path(gpubp.__file__).parent
GPU_MODULES = ("gpubp.backends.cupy_backend",)
# module -> the optional package its examples (and the module itself) import
OPTIONAL = {"gpubp.sklearn": "sklearn", "gpubp.torch": "torch", "gpubp.onnx": "onnxruntime"}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_with_examples() -> list[str]:
    return sorted(_module_name(p) for p in PACKAGE.rglob("*.py") if ">>>" in p.read_text(encoding="utf-8"))


def run_examples(module: types.ModuleType) -> doctest.TestResults:
    """Run ``module``'s examples; a failure's report goes to stdout, which pytest shows."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in finder.find(module, module.__name__):
        runner.run(test, out=sys.stdout.write)
    return runner.summarize(verbose=False)


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    monkeypatch.setattr(_random, "_generator", _random._generator)  # put back at teardown
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


CPU_MODULES = [name for name in modules_with_examples() if name not in GPU_MODULES]


def check_examples(name: str) -> None:
    module = importlib.import_module(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run_examples(module)
    assert results.attempted > 0, f"{name}: no example ran"
    assert results.failed == 0, f"{name}: {results.failed} of {results.attempted} examples failed (above)"
    assert not caught, f"{name}: its examples warn: " + "; ".join(f"{w.category.__name__}: {w.message}" for w in caught)


@pytest.mark.parametrize("name", CPU_MODULES)
def test_docstring_examples(name, isolated):
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name])
    check_examples(name)


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_MODULES)
def test_gpu_docstring_examples(name, isolated):
    try:
        backends.get("cupy")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    check_examples(name)


def test_every_module_with_examples_is_run_by_one_of_the_tests():
    assert set(CPU_MODULES) | set(GPU_MODULES) == set(modules_with_examples())
    assert "gpubp.layers" in CPU_MODULES and "gpubp.backends.cupy_backend" in modules_with_examples()


def test_a_planted_wrong_example_fails(capsys):
    module = types.ModuleType("planted")
    module.__doc__ = ">>> 1 + 1\n3\n>>> 2 * 2\n4\n"
    assert run_examples(module) == (1, 2)
    assert "Expected:\n    3\nGot:\n    2" in capsys.readouterr().out


def test_an_example_that_warns_fails(monkeypatch):
    module = types.ModuleType("gpubp_planted_warning")
    module.__doc__ = ">>> import warnings\n>>> warnings.warn('not converged')\n"
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(AssertionError, match="its examples warn: UserWarning: not converged"):
        check_examples(module.__name__)


def test_an_example_that_seeds_leaves_the_library_stream_alone(isolated):
    before = _random.generator()
    module = types.ModuleType("seeds")
    module.__doc__ = ">>> import gpubp as gb\n>>> gb.seed(0)\n"
    assert run_examples(module) == (0, 2)
    assert _random.generator() is not before  # the example reseeded; the fixture puts it back
