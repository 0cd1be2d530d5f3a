"""The README's Python examples run as printed.

Each ```python block of README.md runs in a fresh namespace, in a temporary working folder
(the examples save files). A block that ports a script (``# Keras`` or ``# PyTorch`` first,
then ``# gpubp``) runs from its ``# gpubp`` line. What a block takes as given (``x``, ``y``, a
``pretrained`` model, ``batches`` ...) comes from its entry in ``SETUP``, at sizes that keep the
block to a few seconds, and ``CHECKS`` asserts what the block's comments say it gives. A block
that needs a GPU runs as a ``gpu`` test (the rehearsal runs it on the stand-in); one that needs
more than one process is listed in ``NOT_RUN`` with the reason. A new block with none of these
fails ``test_every_readme_block_is_run_or_says_why_not``, so the README cannot grow an example
nobody runs. Below them, what the README's prose names must exist: the project's files, the
``GPUBP_*`` environment variables, the ``python -m gpubp`` commands.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest

from gpubp import backends

README = Path(__file__).resolve().parent.parent / "README.md"

# What every block may take as given, on top of its own entry.
COMMON = """
import numpy as np
import gpubp as gb
gb.seed(0)
rng = np.random.default_rng(0)
"""

DIGITS = """
x, y = gb.data.load_digits()
x, y = x[:240], y[:240]
x_test = x[:40]
"""

SMALL_MODEL = DIGITS + """
model = gb.Sequential([gb.Dense(64, 32, "relu"), gb.Dense(32, 10)], device="cpu")
opt = gb.optim.Adam(model.parameters(), lr=1e-3)
x_train, y_train = x, y
"""

# A block's key: its first line of code (after "# gpubp" for a port).
SETUP = {
    "import numpy as np": "",  # the quick start is self-contained
    # where the API tour leaves it: a model loaded from a file, and the old model's optimizer
    "opt = gb.optim.Adam(model.parameters(), lr=2e-3)": SMALL_MODEL + """
model.save("digits.npz")
model = gb.load("digits.npz")
weights_before = [w.copy() for w in model.get_weights()]
""",
    'model.fit(x, y, optimizer=opt, epochs=20, callbacks=[gb.ModelCheckpoint("run.safetensors")])': SMALL_MODEL,
    "from gpubp import finetune as ft": DIGITS + """
import types, torch
y = y % 5
pretrained = gb.Sequential([gb.Dense(64, 32, "relu"), gb.Dense(32, 32, "relu"), gb.Dense(32, 10)], device="cpu")
torch_model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                  torch.nn.Linear(32, 5))
keras_model = types.SimpleNamespace(get_weights=lambda: [rng.normal(size=s).astype(np.float32)
                                                         for s in [(64, 32), (32,), (32, 5), (5,)]])
""",
    "model = gb.Sequential([gb.Dense(2, 4, activation=\"relu\"), gb.Dense(4, 1, activation=\"sigmoid\")])": """
x, y = gb.data.xor()
x_new, y_new = x[::-1].copy(), y[::-1].copy()
""",
    'model = gb.Sequential([gb.Dense(64, 128, "relu"), gb.Dense(128, 10)])': DIGITS + """
xb, yb = x[:32], y[:32]
""",
    "from gpubp import callbacks as cb": """
x = rng.normal(size=(200, 20)).astype(np.float32)
y = rng.integers(0, 3, size=200)
""",
    "from gpubp.optim.lr_scheduler import OneCycleLR": """
x = rng.normal(size=(256, 20)).astype(np.float32)
y = rng.integers(0, 3, size=256)
w = rng.uniform(0.5, 2.0, size=256).astype(np.float32)
batches = [(x[i:i + 64], y[i:i + 64], w[i:i + 64]) for i in range(0, 256, 64)]
""",
    "import torch, torch.nn.functional as F": DIGITS + """
labels = __import__("torch").as_tensor(y)
x = __import__("torch").as_tensor(x)
model = gb.Sequential([gb.Dense(64, 128, "relu"), gb.Dense(128, 128, "relu"), gb.Dense(128, 10)], device="cpu")
""",
    "from sklearn.model_selection import GridSearchCV": """
x = rng.normal(size=(150, 6)).astype(np.float32)  # cv=3 leaves 100 rows a fit: more than batch_size
y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
x_test, x_more, y_more = x[:10], x[:80], y[:80]
""",
    "import onnxruntime as ort": SMALL_MODEL,
    # the CUDA examples: gpu tests
    'model = gb.Sequential([gb.Dense(32, 64, "relu"), gb.Dense(64, 64, "relu"), gb.Dense(64, 10)],': """
layers = [gb.Dense(32, 64, "relu"), gb.Dense(64, 10)]
""",
    'step = model.train_step("cross_entropy", gb.optim.Adam(model.parameters(), lr=1e-3), cuda_graph=True)': """
model = gb.Sequential([gb.Dense(32, 64, "relu"), gb.Dense(64, 10)], backend="cupy")
x = rng.normal(size=(192, 32)).astype(np.float32)
y = rng.integers(0, 10, size=192)
batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 192, 64)]
""",
}

# Blocks that run on the CuPy backend: gpu tests.
GPU = {
    'model = gb.Sequential([gb.Dense(32, 64, "relu"), gb.Dense(64, 64, "relu"), gb.Dense(64, 10)],',
    'step = model.train_step("cross_entropy", gb.optim.Adam(model.parameters(), lr=1e-3), cuda_graph=True)',
}

# Blocks no test here can run, and why (each is covered where it can run: the reason says where).
NOT_RUN = {
    "import gpubp as gb": "data-parallel fit needs several processes under torchrun and GPUs for "
                          "distributed.init('cuda'); tests/test_distributed.py runs the same calls on CPU processes",
}

# The packages a block imports that the test extras may lack.
NEEDS = {
    "from gpubp import finetune as ft": "torch",
    "import torch, torch.nn.functional as F": "torch",
    "from sklearn.model_selection import GridSearchCV": "sklearn",
    "import onnxruntime as ort": "onnxruntime",
}

# What each block's comments say it gives, checked after it runs (an expression on its names).
CHECKS = {
    "import numpy as np": ["logits.shape == (len(x_test), 10)", "isinstance(model, gb.Sequential)",
                           "x.shape == (1797, 64) and x.dtype == np.float32"],
    "opt = gb.optim.Adam(model.parameters(), lr=2e-3)": [
        "isinstance(loss, float)", "dout.shape == (32, 10)",
        # opt.step() moved the loaded model's weights, not those of the model it was loaded from
        "not all(np.array_equal(a, b) for a, b in zip(weights_before, model.get_weights()))"],
    'model.fit(x, y, optimizer=opt, epochs=20, callbacks=[gb.ModelCheckpoint("run.safetensors")])': [
        "ckpt.epoch == 20", "isinstance(ckpt.model, gb.Sequential)"],
    "from gpubp import finetune as ft": ["dict(t.counts) == {'dense_dw': 1}"],
    "model = gb.Sequential([gb.Dense(2, 4, activation=\"relu\"), gb.Dense(4, 1, activation=\"sigmoid\")])": [
        "set(model.evaluate(x, y)) == {'loss', 'accuracy'}"],
    'model = gb.Sequential([gb.Dense(64, 128, "relu"), gb.Dense(128, 10)])': [
        "probs.shape == (len(x_test), 10)", "dlogits.shape == (32, 10)"],
    "from gpubp import callbacks as cb": ["len(open('log.csv').read().splitlines()) > 1"],
    "from gpubp.optim.lr_scheduler import OneCycleLR": ["np.isfinite(loss)"],
    "import torch, torch.nn.functional as F": ["isinstance(mlp, __import__('torch').nn.Module)",
                                               "isinstance(model, gb.Sequential)"],
    "from sklearn.model_selection import GridSearchCV": [
        "search.predict_proba(x_test).shape == (10, 2)", "isinstance(clf.model_, gb.Sequential)"],
    "import onnxruntime as ort": ["np.allclose(probs, model.predict(x_test), atol=1e-5)"],
    'model = gb.Sequential([gb.Dense(32, 64, "relu"), gb.Dense(64, 64, "relu"), gb.Dense(64, 10)],': [
        "model.uses_fused is True"],
    'step = model.train_step("cross_entropy", gb.optim.Adam(model.parameters(), lr=1e-3), cuda_graph=True)': [
        "isinstance(loss, float) and np.isfinite(loss)"],
}


def readme_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of each ```python block; a port's code from its "# gpubp" line on."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        code = match.group(1)
        port = re.search(r"^# gpubp\n", code, flags=re.M)
        if port:
            code = code[port.end():]
        blocks.append((text.count("\n", 0, match.start()) + 1, code))
    return blocks


def key(code: str) -> str:
    """A block's first line of code, without its comment."""
    first = next(line for line in code.splitlines() if line.strip() and not line.startswith("#"))
    return re.sub(r"\s+#.*$", "", first)


BLOCKS = {key(code): (line, code) for line, code in readme_blocks(README.read_text(encoding="utf-8"))}


def shown_output(code: str) -> list[str] | None:
    """The output a block shows as the comment lines right below a bare ``print(...)`` line."""
    lines = code.splitlines()
    for i, line in enumerate(lines):
        if re.fullmatch(r"print\(.*\)", line):
            shown = [rest[2:] for rest in lines[i + 1:] if rest.startswith("# ")]
            taken = len(shown)
            for j, rest in enumerate(lines[i + 1:]):  # only the run right below the print
                if not rest.startswith("# "):
                    taken = j
                    break
            return shown[:taken]
    return None


def run_block(name: str, workdir: Path) -> dict:
    line, code = BLOCKS[name]
    namespace: dict = {"__name__": "readme"}
    exec(compile(COMMON + SETUP[name], f"<setup of README.md:{line}>", "exec"), namespace)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        # README line numbers in tracebacks: the block starts on the line after its fence.
        exec(compile("\n" * line + code, str(README), "exec"), namespace)
    shown = shown_output(code)
    if shown:
        assert printed.getvalue().splitlines()[:len(shown)] == shown, (
            f"README.md:{line}: the block prints\n{printed.getvalue()}\nbut shows\n" + "\n".join(shown))
    for check in CHECKS.get(name, []):
        assert eval(check, namespace), f"README.md:{line}: after the block, {check!r} is false"
    return namespace


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    from gpubp import _random

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(_random, "_generator", _random._generator)  # the blocks' gb.seed stays here
    return tmp_path


# The grid search's default max_iter=200 warns at these sizes, as scikit-learn's own would.
@pytest.mark.filterwarnings("ignore:max_iter. all 200 epochs ran:UserWarning")
@pytest.mark.parametrize("name", [n for n in BLOCKS if n not in GPU and n not in NOT_RUN], ids=lambda n: n[:48])
def test_readme_block_runs(name, workdir):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    run_block(name, workdir)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(GPU), ids=lambda n: n[:48])
def test_readme_gpu_block_runs(name, workdir):
    try:
        backends.get("cupy")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    run_block(name, workdir)


def test_every_readme_block_is_run_or_says_why_not():
    assert len(BLOCKS) == len(readme_blocks(README.read_text(encoding="utf-8"))), "two blocks start alike"
    missing = [name for name in BLOCKS if name not in SETUP and name not in NOT_RUN]
    assert not missing, f"README blocks with no SETUP entry and no NOT_RUN reason: {missing}"
    stale = (set(SETUP) | set(NOT_RUN) | set(CHECKS) | set(NEEDS) | GPU) - set(BLOCKS)
    assert not stale, f"entries for blocks the README no longer has: {stale}"


def test_a_block_whose_comment_is_wrong_fails(workdir, monkeypatch):
    name = "from gpubp.optim.lr_scheduler import OneCycleLR"
    monkeypatch.setitem(CHECKS, name, ["not np.isfinite(loss)"])
    with pytest.raises(AssertionError, match=r"README.md:\d+: after the block, 'not np.isfinite\(loss\)' is false"):
        run_block(name, workdir)


def test_shown_output_is_the_comment_run_right_below_a_bare_print():
    code = "a = 1\nprint(a)\n# 1\n# 2\nb = 2\n# not output\n"
    assert shown_output(code) == ["1", "2"]
    assert shown_output("print(a)  # a comment, not output\n# x\n") is None


def test_a_block_that_prints_other_than_it_shows_fails(workdir, monkeypatch):
    name = "from gpubp import finetune as ft"
    pytest.importorskip("torch")
    line, code = BLOCKS[name]
    monkeypatch.setitem(BLOCKS, name, (line, code.replace("dense_1  (nothing: skipped)", "dense_1  dense_dw")))
    with pytest.raises(AssertionError, match="the block prints"):
        run_block(name, workdir)


def test_a_hand_loop_that_steps_the_optimizer_of_the_model_before_loading_fails(workdir, monkeypatch):
    name = "opt = gb.optim.Adam(model.parameters(), lr=2e-3)"
    line, code = BLOCKS[name]
    monkeypatch.setitem(BLOCKS, name, (line, code.replace(name, "opt = opt", 1)))  # SETUP's, of the saved model
    with pytest.raises(AssertionError, match=r"after the block, 'not all\(np.array_equal"):
        run_block(name, workdir)


def test_a_block_that_calls_what_gpubp_lacks_fails_with_its_readme_line(workdir, monkeypatch):
    name = "from gpubp.optim.lr_scheduler import OneCycleLR"
    line, code = BLOCKS[name]
    monkeypatch.setitem(BLOCKS, name, (line, code.replace("model.train_step(", "model.train_stepp(")))
    with pytest.raises(AttributeError, match="train_stepp") as caught:
        run_block(name, workdir)
    assert any(entry.path == README for entry in caught.traceback)


# ----------------------------------------------------------------------------- what the prose names

ROOT = README.parent
PATH = re.compile(r"(?<![\w/.])((?:bench|tests|kernels|gpubp|\.ci)/[\w./-]+\.(?:py|cu|cuh|md|json|sh|ld|cpp|h))\b")
# Results the README says a GPU run writes; none has run yet (issue: GPU truth).
WRITTEN_ON_A_GPU = {"bench/results/fused_mlp.md", "bench/results/gpu_summary.json"}
SOURCES = [p for folder in ("gpubp", "bench", "tests", "kernels", ".ci") for p in (ROOT / folder).rglob("*")
           if p.is_file() and p.suffix in (".py", ".sh", ".cu", ".cuh", ".h", ".cpp", "")
           and p.resolve() != Path(__file__).resolve()] + [ROOT / "CMakeLists.txt"]  # not this file's planted names


def missing_paths(text: str) -> list[str]:
    return sorted({path for path in PATH.findall(text) if not (ROOT / path).exists()} - WRITTEN_ON_A_GPU)


def unknown_variables(text: str) -> list[str]:
    code = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in SOURCES)
    return sorted({name for name in re.findall(r"\bGPUBP_[A-Z0-9_]+\b", text) if name not in code})


def test_every_file_the_readme_names_exists():
    assert missing_paths(README.read_text(encoding="utf-8")) == []


def test_every_environment_variable_the_readme_names_is_read_somewhere():
    assert unknown_variables(README.read_text(encoding="utf-8")) == []


def test_every_gpubp_command_the_readme_names_exists():
    from gpubp.__main__ import main as gpubp_main

    for command in sorted(set(re.findall(r"python -m gpubp (\w+)", README.read_text(encoding="utf-8")))):
        with pytest.raises(SystemExit) as done:
            with contextlib.redirect_stdout(io.StringIO()):
                gpubp_main([command, "--help"])
        assert done.value.code == 0, command


def test_a_renamed_file_or_variable_in_the_readme_is_found():
    text = "see `bench/no_such_script.py` and bench/results/gpu_summary.json, with GPUBP_NO_SUCH_SETTING=1"
    assert missing_paths(text) == ["bench/no_such_script.py"]
    assert unknown_variables(text) == ["GPUBP_NO_SUCH_SETTING"]
