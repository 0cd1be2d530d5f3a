"""The NumPy backend's compiled CPU kernels compute what its pure-NumPy path computes.

With Numba installed, the backend fuses bias+activation, act'*dy with the db sums, the
optimizer updates and small softmax cross-entropies into compiled passes; without it (or with
``GPUBP_CPU_KERNELS=numpy``) it runs NumPy only. Both paths run here on the same inputs, in
float32 and float64, and must agree to rounding. Shapes are ragged (not multiples of any
vector width) and include a parameter large enough to be split across cores. Beside them: what
either path takes (state arrays of any layout) and keeps (a loss's dtype, a float64 mean).
"""

import numpy as np
import pytest

import gpubp as gb
from gpubp.backends import numpy_backend
from child_process import run_python

pytest.importorskip("numba", reason="the compiled CPU kernels need Numba: pip install numba")

FUSED_ACTS = ["identity", "relu", "leaky_relu"]
DTYPES = [np.float32, np.float64]
RTOL = {np.float32: 2e-6, np.float64: 1e-14}


def both_paths(fn, *args):
    """``fn(*copies of args)`` with the compiled kernels, then with NumPy only: (compiled, numpy, args used)."""
    runs = []
    for enabled in (True, False):
        copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
        with numpy_backend.compiled_kernels(enabled):
            runs.append((fn(*copies), copies))
    return runs


def assert_close(compiled, reference, dtype):
    compiled, reference = np.asarray(compiled), np.asarray(reference)
    scale = max(float(np.max(np.abs(reference), initial=0.0)), 1.0)
    np.testing.assert_allclose(compiled, reference, rtol=RTOL[dtype], atol=RTOL[dtype] * scale)


def test_the_compiled_kernels_are_in_use_here():
    assert numpy_backend.cpu_kernels() == "numba"
    with numpy_backend.compiled_kernels(False):
        assert numpy_backend.cpu_kernels().startswith("numpy (switched off")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", FUSED_ACTS)
def test_dense_forward_matches_the_numpy_path(act, dtype, rng):
    x = rng.standard_normal((37, 29)).astype(dtype)
    w = rng.standard_normal((29, 23)).astype(dtype)
    b = rng.standard_normal(23).astype(dtype)
    (compiled, _), (reference, _) = both_paths(numpy_backend.dense_forward, x, w, b, act)
    assert compiled[0].dtype == dtype
    assert_close(compiled[0], reference[0], dtype)
    assert compiled[1] is None and reference[1] is None


@pytest.mark.parametrize("need_dx,need_dw", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", FUSED_ACTS)
def test_dense_backward_matches_the_numpy_path(act, dtype, need_dx, need_dw, rng):
    x = rng.standard_normal((37, 29)).astype(dtype)
    w = rng.standard_normal((29, 23)).astype(dtype)
    y, _ = numpy_backend.dense_forward(x, w, rng.standard_normal(23).astype(dtype), act)
    dy = rng.standard_normal(y.shape).astype(dtype)
    (compiled, args), (reference, _) = both_paths(
        numpy_backend.dense_backward, dy, x, w, y, None, act, need_dx, need_dw)
    for got, want in zip(compiled, reference):
        assert (got is None) == (want is None)
        if want is not None:
            assert_close(got, want, dtype)
    np.testing.assert_array_equal(args[0], dy)  # dy is never modified


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", FUSED_ACTS)
def test_an_infinite_or_nan_gradient_through_a_unit_the_activation_turns_off_matches_too(act, dtype, rng):
    """relu passes nothing where y <= 0, even inf or NaN (the NumPy path multiplied by y > 0: NaN);
    leaky_relu scales it."""
    x = rng.standard_normal((9, 5)).astype(dtype)
    w = rng.standard_normal((5, 4)).astype(dtype)
    y, _ = numpy_backend.dense_forward(x, w, rng.standard_normal(4).astype(dtype), act)
    dy = rng.standard_normal(y.shape).astype(dtype)
    off = np.argwhere(y <= 0)[:2]
    assert len(off) == 2
    dy[tuple(off[0])], dy[tuple(off[1])] = np.inf, np.nan
    with np.errstate(invalid="ignore"):
        (compiled, _), (reference, _) = both_paths(numpy_backend.dense_backward, dy, x, w, y, None, act, False, True)
    for got, want in zip(compiled[1:], reference[1:]):  # dw, db; NaN and inf where they are
        np.testing.assert_allclose(got, want, rtol=RTOL[dtype], atol=10 * RTOL[dtype])
    if act == "relu":
        assert np.isfinite(reference[1]).all() and np.isfinite(reference[2]).all()


@pytest.mark.parametrize("act", FUSED_ACTS[1:])
def test_a_frozen_layer_sums_no_bias_gradient(act, rng):
    """need_dw=False: dz for dX only; the fused pass leaves the db sums out, writing no out_db."""
    x = rng.standard_normal((37, 29)).astype(np.float32)
    w = rng.standard_normal((29, 23)).astype(np.float32)
    y, _ = numpy_backend.dense_forward(x, w, rng.standard_normal(23).astype(np.float32), act)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    out_db = np.full(23, 7.0, np.float32)
    dx, dw, db = numpy_backend.dense_backward(dy, x, w, y, None, act, True, False, out_db=out_db)
    assert dw is None and db is None
    np.testing.assert_array_equal(out_db, np.full(23, 7.0, np.float32))
    with numpy_backend.compiled_kernels(False):
        reference, _, _ = numpy_backend.dense_backward(dy, x, w, y, None, act, True, False)
    assert_close(dx, reference, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,classes", [(64, 10), (7, 3), (300, 1), (5, 40)])
def test_softmax_cross_entropy_matches_the_numpy_path(batch, classes, dtype, rng):
    logits = (rng.standard_normal((batch, classes)) * 30).astype(dtype)  # large: exercises the max shift
    labels = rng.integers(0, classes, batch)
    (compiled, _), (reference, _) = both_paths(numpy_backend.softmax_cross_entropy, logits, labels)
    assert compiled[0] == pytest.approx(reference[0], rel=10 * RTOL[dtype], abs=RTOL[dtype])
    assert compiled[1].dtype == dtype
    assert_close(compiled[1], reference[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,classes", [(64, 10), (7, 3), (300, 1), (5, 31)])
def test_label_smoothed_softmax_cross_entropy_matches_the_numpy_path(batch, classes, dtype, rng):
    logits = (rng.standard_normal((batch, classes)) * 30).astype(dtype)
    labels = rng.integers(0, classes, batch)
    if classes > 1:  # a masked logit in one row: that row's loss, and so the mean, is inf on both paths
        masked = logits.copy()
        masked[0, (labels[0] + 1) % classes] = -np.inf
        (compiled, _), (reference, _) = both_paths(numpy_backend.softmax_cross_entropy, masked, labels, None, 0.1)
        assert compiled[0] == reference[0] == np.inf
        assert_close(compiled[1], reference[1], dtype)
    for _ in range(3):
        # The compiled pass writes into np.empty arrays: leave NaNs where they may come from (it once
        # summed a row starting from the output's unwritten first element, giving a NaN loss at random).
        np.full((batch, classes), np.nan, dtype)
        (compiled, _), (reference, _) = both_paths(numpy_backend.softmax_cross_entropy, logits, labels, None, 0.1)
        assert compiled[0] == pytest.approx(reference[0], rel=10 * RTOL[dtype], abs=RTOL[dtype])
        assert compiled[1].dtype == dtype
        assert_close(compiled[1], reference[1], dtype)


@pytest.mark.parametrize("weighted", [False, True], ids=["", "weighted"])
def test_cross_entropy_takes_the_mean_of_huge_row_losses_in_float64_on_both_paths(weighted):
    """Each row's loss is 2e38, a float32; their sum is not (the NumPy path summed in float32 and
    gave inf). The weighted loss takes the NumPy path either way."""
    logits = np.array([[1e38, -1e38, 0.0]] * 4, np.float32)
    labels = np.ones(4, np.int64)
    weights = np.ones(4, np.float32) if weighted else None
    (compiled, _), (reference, _) = both_paths(numpy_backend.softmax_cross_entropy, logits, labels, weights)
    assert compiled[0] == pytest.approx(2e38, rel=1e-6)
    assert reference[0] == pytest.approx(compiled[0], rel=RTOL[np.float32])


def test_huber_keeps_the_predictions_dtype_whatever_type_delta_is():
    """A NumPy float64 delta made a float32 gradient float64 (NumPy keeps a NumPy scalar's type,
    where a Python float takes the array's): every delta gives the Python float's loss and gradient."""
    for dtype in (np.float32, np.float16):
        pred = np.linspace(-2, 2, 12, dtype=dtype).reshape(4, 3)
        target = np.zeros_like(pred)
        want_loss, want = numpy_backend.huber(pred, target, delta=0.5)
        assert want.dtype == dtype
        for delta in (np.float64(0.5), np.float32(0.5), np.array(0.5)):
            loss, grad = numpy_backend.huber(pred, target, delta=delta)
            assert grad.dtype == dtype, (dtype, type(delta))
            np.testing.assert_array_equal(grad, want)
            assert loss == want_loss


def test_arrays_of_a_dtype_the_kernels_are_not_built_for_run_on_numpy(rng):
    # float16 logits (a dtype losses accept) once reached the float32/float64-only kernels.
    logits = (3 * rng.standard_normal((6, 4))).astype(np.float16)
    labels = rng.integers(0, 4, 6)
    (compiled, _), (reference, _) = both_paths(numpy_backend.softmax_cross_entropy, logits, labels)
    assert compiled[0] == reference[0] and np.array_equal(compiled[1], reference[1])
    p, g = (rng.standard_normal(9).astype(np.float16) for _ in range(2))
    (_, (p_compiled, *_)), (_, (p_reference, *_)) = both_paths(
        lambda p, g: numpy_backend.sgd_update(p, g, None, 0.1, 0.0, False, 0.0), p, g)
    assert p_compiled.dtype == np.float16 and np.array_equal(p_compiled, p_reference)


# (rows, cols): ragged, and one over the backend's threshold for splitting across cores.
PARAM_SHAPES = [(29, 23), (23,), (1100, 500)]
SGD_OPTIONS = [
    dict(momentum=0.0, nesterov=False, weight_decay=0.0),
    dict(momentum=0.9, nesterov=False, weight_decay=0.0),
    dict(momentum=0.9, nesterov=True, weight_decay=0.01),
]


@pytest.mark.parametrize("options", SGD_OPTIONS, ids=["plain", "momentum", "nesterov_decay"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PARAM_SHAPES, ids=str)
def test_sgd_update_matches_the_numpy_path(shape, dtype, options, rng):
    param, grad = rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)
    velocity = rng.standard_normal(shape).astype(dtype) if options["momentum"] else None

    def sgd(param, grad, velocity):
        numpy_backend.sgd_update(param, grad, velocity, 0.05, **options)
        return param, velocity

    (compiled, _), (reference, _) = both_paths(sgd, param, grad, velocity)
    for got, want in zip(compiled, reference):
        if want is not None:
            assert_close(got, want, dtype)


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PARAM_SHAPES, ids=str)
def test_adam_update_matches_the_numpy_path(shape, dtype, decoupled, rng):
    param, grad = rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)
    m, v = rng.standard_normal(shape).astype(dtype), rng.random(shape).astype(dtype)

    def adam(param, grad, m, v):
        numpy_backend.adam_update(param, grad, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.01, 3, decoupled)
        return param, m, v

    (compiled, _), (reference, _) = both_paths(adam, param, grad, m, v)
    for got, want in zip(compiled, reference):
        assert_close(got, want, dtype)


RMSPROP_OPTIONS = [
    dict(momentum=0.0, centered=False, weight_decay=0.0),
    dict(momentum=0.0, centered=True, weight_decay=0.01),
    dict(momentum=0.9, centered=True, weight_decay=0.0),
]


@pytest.mark.parametrize("options", RMSPROP_OPTIONS, ids=["plain", "centered_decay", "centered_momentum"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PARAM_SHAPES, ids=str)
def test_rmsprop_update_matches_the_numpy_path(shape, dtype, options, rng):
    param, grad, grad_avg, buffer = (rng.standard_normal(shape).astype(dtype) for _ in range(4))
    square_avg = (rng.random(shape) + grad_avg.astype(np.float64) ** 2).astype(dtype)  # above grad_avg^2
    grad_avg = grad_avg if options["centered"] else None
    buffer = buffer if options["momentum"] else None

    def rmsprop(param, grad, square_avg, grad_avg, buffer):
        numpy_backend.rmsprop_update(param, grad, square_avg, grad_avg, buffer, 1e-2, 0.9, 1e-8,
                                     options["weight_decay"], options["momentum"], options["centered"])
        return param, square_avg, grad_avg, buffer

    (compiled, _), (reference, _) = both_paths(rmsprop, param, grad, square_avg, grad_avg, buffer)
    for got, want in zip(compiled, reference):
        if want is not None:
            assert_close(got, want, dtype)


STATE_LAYOUTS = {
    "fortran": np.asfortranarray,
    "every_other_column": lambda a: np.repeat(a, 2, axis=1)[:, ::2],
    "reversed": lambda a: a[::-1].copy()[::-1],
}
STATE_UPDATES = {
    "sgd": (1, lambda p, g, s: numpy_backend.sgd_update(p, g, s[0], 0.05, 0.9, True, 0.01)),
    "adam": (2, lambda p, g, s: numpy_backend.adam_update(p, g, s[0], s[1], 1e-3, 0.9, 0.999, 1e-8, 0.01, 3, False)),
    "rmsprop": (3, lambda p, g, s: numpy_backend.rmsprop_update(p, g, s[0], s[1], s[2], 1e-2, 0.9, 1e-8, 0.01, 0.9,
                                                                True)),
}


@pytest.mark.parametrize("layout", sorted(STATE_LAYOUTS))
@pytest.mark.parametrize("optimizer", sorted(STATE_UPDATES))
def test_an_update_whose_state_is_laid_out_otherwise_gives_what_a_c_contiguous_state_gives(optimizer, layout, rng):
    """The compiled updates read their state arrays flat too; one not C-contiguous (under a
    C-contiguous parameter and gradient) stopped the call inside Numba. It takes the NumPy path."""
    param, grad = (rng.standard_normal((7, 5)) for _ in range(2))
    count, update = STATE_UPDATES[optimizer]
    state = [rng.random((7, 5)) for _ in range(count)]
    state[0] += 2  # RMSprop's square average, above its gradient average squared
    want_param, want_state = param.copy(), [a.copy() for a in state]
    update(want_param, grad, want_state)
    got_param, got_state = param.copy(), [STATE_LAYOUTS[layout](a) for a in state]
    assert not any(a.flags.c_contiguous for a in got_state)
    with numpy_backend.compiled_kernels(True):
        update(got_param, grad, got_state)
    np.testing.assert_allclose(got_param, want_param, rtol=RTOL[np.float64])
    for got, want in zip(got_state, want_state):
        np.testing.assert_allclose(got, want, rtol=RTOL[np.float64])


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_steps_agree_on_both_paths(dtype):
    """A few full fit epochs (forward, loss, backward, Adam) end at the same weights either way."""
    x, y = gb.data.load_digits()

    def train():
        gb.seed(0)
        model = gb.Sequential([gb.Dense(64, 32, "relu"), gb.Dense(32, 16, "leaky_relu"), gb.Dense(16, 10)],
                              device="cpu", dtype=dtype)
        model.fit(x[:256], y[:256], epochs=2, batch_size=64, verbose=0)
        return model.get_weights()

    (compiled, _), (reference, _) = both_paths(train)
    for got, want in zip(compiled, reference):
        assert_close(got, want, dtype)


def test_without_numba_the_numpy_path_runs_and_says_why():
    """In a fresh interpreter where Numba cannot be imported, training still works on NumPy alone."""
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import numpy as np, gpubp as gb\n"
        "from gpubp.backends import numpy_backend\n"
        "model = gb.Sequential([gb.Dense(4, 8, 'relu'), gb.Dense(8, 3)], device='cpu')\n"
        "loss = model.fit(np.ones((8, 4), np.float32), np.arange(8) % 3, epochs=1, verbose=0).history['loss'][0]\n"
        "assert np.isfinite(loss), loss\n"
        "print(numpy_backend.cpu_kernels())\n"
        "print('numba' in sys.modules and sys.modules['numba'] is not None)\n"
    )
    reason, numba_loaded = run_python(code).splitlines()
    assert reason.startswith("numpy (Numba is not installed")
    assert numba_loaded == "False"


def test_the_environment_variable_switches_the_compiled_kernels_off():
    code = "from gpubp.backends import numpy_backend; print(numpy_backend.cpu_kernels())"
    assert run_python(code, GPUBP_CPU_KERNELS="numpy").startswith("numpy (switched off")


def test_with_nowhere_to_cache_the_kernels_they_compile_in_the_process():
    """A read-only install whose user has no writable home: Numba's cache=True raised at import,
    and the CPU backend failed every call, its fallback included."""
    code = (
        "import numba.core.caching as caching\n"
        "caching.CacheImpl._locator_classes = []  # no cache locator finds a writable place\n"
        "import numpy as np\n"
        "from gpubp.backends import numpy_backend as nb\n"
        "x, w, b = np.array([[-2.0, 3.0]], np.float32), np.eye(2, dtype=np.float32), np.zeros(2, np.float32)\n"
        "print(nb.cpu_kernels(), nb.dense_forward(x, w, b, 'relu')[0].tolist())\n"
    )
    assert run_python(code).strip() == "numba [[0.0, 3.0]]"


def test_a_bad_value_of_the_environment_variable_warns_and_keeps_the_default():
    code = ("import warnings\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    from gpubp.backends import numpy_backend\n"
            "print(numpy_backend.cpu_kernels(), '|', *(str(w.message) for w in caught))")
    assert run_python(code, GPUBP_CPU_KERNELS="off").strip() == (
        "numba | GPUBP_CPU_KERNELS='off' ignored: expected 'numba' (the default) or 'numpy'")


def test_with_numbas_jit_disabled_the_numpy_path_runs_and_says_why():
    """NUMBA_DISABLE_JIT runs the kernels as Python loops, about 170x slower than NumPy's passes."""
    code = "from gpubp.backends import numpy_backend; print(numpy_backend.cpu_kernels())"
    assert run_python(code, NUMBA_DISABLE_JIT="1").startswith("numpy (Numba's kernels cannot be loaded here: "
                                                             "RuntimeError: NUMBA_DISABLE_JIT is set")


def test_machine_code_cached_before_a_module_the_kernels_compile_in_changed_is_not_run(tmp_path):
    """Numba keys its cache on the kernel file's contents alone: after activations.py changed the
    activation codes (an editable install after a pull), the cached relu ran as another activation,
    and a process started before the change, compiling on, could write its code back for later ones."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import gpubp

    package = tmp_path / "gpubp"
    shutil.copytree(Path(gpubp.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from gpubp.backends import numpy_backend as nb\n"
        "for dtype in sys.argv[1:]:\n"
        "    if dtype == 'wait':\n"
        "        sys.stdin.readline()\n"
        "        continue\n"
        "    x, w, b = np.array([[-2.0, 3.0]], dtype), np.eye(2, dtype=dtype), np.zeros(2, dtype)\n"
        "    print(nb.cpu_kernels(), dtype, nb.dense_forward(x, w, b, 'relu')[0].tolist(), flush=True)\n"
    )
    # In the copy's folder: python -c puts the working directory first on the path.
    options = dict(env={**os.environ, "PYTHONPATH": str(tmp_path), "NUMBA_CACHE_DIR": str(tmp_path / "cache")},
                   cwd=tmp_path, text=True)

    def relu_of_the_copy(dtype: str) -> str:
        done = subprocess.run([sys.executable, "-c", code, dtype], capture_output=True, timeout=120, **options)
        assert done.returncode == 0, done.stderr[-4000:]
        return done.stdout.strip()

    assert relu_of_the_copy("float32") == "numba float32 [[0.0, 3.0]]"
    started_before = subprocess.Popen([sys.executable, "-c", code, "float32", "wait", "float64"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, **options)
    try:
        assert started_before.stdout.readline().strip() == "numba float32 [[0.0, 3.0]]"
        source = package / "activations.py"
        text = source.read_text()
        old = "ACT_ID = {name: i for i, name in enumerate(ACTIVATIONS)}"
        assert old in text
        source.write_text(text.replace(old, "ACT_ID = {name: (i + 1) % len(ACTIVATIONS) "
                                            "for i, name in enumerate(ACTIVATIONS)}"))
        # the stale code ran relu as leaky_relu: [[-0.02, 3.0]]
        assert relu_of_the_copy("float32") == "numba float32 [[0.0, 3.0]]"
        started_before.stdin.write("\n")
        started_before.stdin.flush()  # it compiles float64 from the sources it loaded, and caches that
        assert started_before.stdout.readline().strip() == "numba float64 [[0.0, 3.0]]"
    finally:
        started_before.kill()
        started_before.wait()
    assert relu_of_the_copy("float64") == "numba float64 [[0.0, 3.0]]"


def test_importing_gpubp_does_not_import_numba():
    code = "import sys, gpubp; print('numba' in sys.modules)"
    assert run_python(code).strip() == "False"


# ----------------------------------------------------------------------------- every core


@pytest.fixture
def split_everything(monkeypatch):
    """Row blocks for every size, on up to 3 threads whatever this machine's core count (the
    worker pool queues what it cannot run at once), so the split paths run on small shapes."""
    monkeypatch.setattr(numpy_backend, "_CORES", 4)
    monkeypatch.setattr(numpy_backend, "_PARALLEL_MIN_ELEMENTS", 0)
    monkeypatch.setattr(numpy_backend, "_COMPILED_PARALLEL_MIN_ELEMENTS", 0)


def dense_step(x, w, b, dy, act, threads, dropout=None):
    with numpy_backend.use_cpu_threads(threads):
        y, z = numpy_backend.dense_forward(x, w, b, act, dropout=dropout)
        dx, dw, db = numpy_backend.dense_backward(dy, x, w, y, z, act, True, True, dropout=dropout)
        masked_input = numpy_backend.dropout_forward(x, dropout) if dropout is not None else x
    return [a.copy() for a in (y, dx, dw, db, masked_input)]


@pytest.mark.parametrize("dropout", [False, True], ids=["", "dropout"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", FUSED_ACTS + ["gelu", "sigmoid"])
def test_dense_layer_results_do_not_depend_on_the_thread_count(act, dtype, dropout, split_everything, rng):
    """203 rows: three blocks of whole 64-row chunks and a ragged last chunk; bit-identical,
    dropout masks included (each block counts its rows from the array's first)."""
    x = rng.standard_normal((203, 29)).astype(dtype)
    w = rng.standard_normal((29, 23)).astype(dtype)
    b = rng.standard_normal(23).astype(dtype)
    dy = rng.standard_normal((203, 23)).astype(dtype)
    mask = None
    if dropout:
        from gpubp import philox

        mask = philox.Mask(np.array([0x1234, 0xBEEF], np.uint32), *philox.mask_constants(0.3), first_row=5)
    one, three = dense_step(x, w, b, dy, act, 1, mask), dense_step(x, w, b, dy, act, 3, mask)
    for got, want in zip(three, one):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dropout", [False, True], ids=["", "dropout"])
def test_the_bias_gradient_adds_its_row_chunks_in_order(dropout, split_everything, rng):
    """db is the float32 sum of each chunk of rows of dz, the chunks then added first to last:
    the same numbers on any thread count, and within rounding of the float64 sum. Under a
    dropout mask dz is leaky_relu's ``dy * scale * slope`` where kept, each product rounded to
    float32 before it is summed, as the dz the backward hands on holds it."""
    chunk = numpy_backend._SUM_CHUNK_ROWS
    dy = (rng.standard_normal((5 * chunk + 7, 11)) * 1e3).astype(np.float32)
    if dropout:
        from gpubp import philox
        from gpubp.activations import LEAKY_SLOPE

        mask = philox.Mask(np.array([0x1234, 0xBEEF], np.uint32), *philox.mask_constants(0.3), first_row=5)
        act, y = "leaky_relu", -np.ones_like(dy)  # leaky_relu' = slope wherever the mask keeps
        keep = philox.keep_mask(mask.key, *dy.shape, mask.threshold, mask.first_row)
        dz = np.where(keep, dy * mask.scale * np.float32(LEAKY_SLOPE), np.float32(0))
    else:
        mask, act, y, dz = None, "relu", np.ones_like(dy), dy  # relu' = 1 everywhere
    expected = np.zeros(11, np.float32)
    for first in range(0, dz.shape[0], chunk):
        part = np.zeros(11, np.float32)
        for row in dz[first:first + chunk]:
            part += row
        expected = part if first == 0 else expected + part
    for threads in (1, 2, 3):
        with numpy_backend.use_cpu_threads(threads):
            _, _, db = numpy_backend.dense_backward(dy, dy[:, :3], np.ones((3, 11), np.float32), y, None, act,
                                                    False, True, dropout=mask)
        np.testing.assert_array_equal(db, expected)
    np.testing.assert_allclose(db, dz.astype(np.float64).sum(0), rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_optimizer_updates_do_not_depend_on_the_thread_count(dtype, split_everything, rng):
    start = [rng.standard_normal((131, 7)).astype(dtype) for _ in range(4)]
    results = []
    for threads in (1, 3):
        p, g, m, v = (a.copy() for a in start)
        v = np.abs(v)
        with numpy_backend.use_cpu_threads(threads):
            numpy_backend.adam_update(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.01, 5, True)
            numpy_backend.sgd_update(p, g, m, 0.05, 0.9, True, 0.01)
            numpy_backend.rmsprop_update(p, g, v, None, m, 1e-2, 0.99, 1e-8, 0.01, 0.9, False)
        results.append((p, m, v))
    for got, want in zip(*results):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rows,chunk_rows,threads", [(203, 64, 3), (10, 1, 3), (64, 64, 3), (1000, 7, 2)])
def test_row_blocks_are_whole_chunks_covering_every_row_once(rows, chunk_rows, threads, split_everything):
    blocks = []
    with numpy_backend.use_cpu_threads(threads):
        numpy_backend._in_row_blocks(lambda lo, hi: blocks.append((lo, hi)), rows, rows, 0, chunk_rows)
    blocks.sort()
    assert blocks[0][0] == 0 and blocks[-1][1] == rows
    assert all(hi == next_lo for (_, hi), (next_lo, _) in zip(blocks, blocks[1:]))
    assert all(lo % chunk_rows == 0 and hi > lo for lo, hi in blocks)
    assert len(blocks) == min(threads, -(-rows // chunk_rows))


def test_small_work_stays_on_the_calling_thread(monkeypatch):
    import threading

    monkeypatch.setattr(numpy_backend, "_CORES", 4)
    callers = []
    with numpy_backend.use_cpu_threads(3):
        numpy_backend._in_row_blocks(lambda lo, hi: callers.append((threading.current_thread(), lo, hi)),
                                     100, 100, 101)
    assert callers == [(threading.current_thread(), 0, 100)]


def test_an_error_in_a_worker_block_reaches_the_caller(split_everything):
    def body(lo, hi):
        if lo > 0:
            raise FloatingPointError(f"rows {lo}:{hi}")

    with numpy_backend.use_cpu_threads(3), pytest.raises(FloatingPointError, match="rows"):
        numpy_backend._in_row_blocks(body, 30, 30, 0)


@pytest.mark.parametrize("environment,expected", [
    ({}, 4),
    ({"OPENBLAS_NUM_THREADS": "2"}, 2),
    ({"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "3"}, 2),  # OpenBLAS reads its own first
    ({"MKL_NUM_THREADS": "2", "OMP_NUM_THREADS": "3"}, 2),
    ({"OMP_NUM_THREADS": "3", "NUMBA_NUM_THREADS": "1"}, 1),
    ({"MKL_NUM_THREADS": "16"}, 4),  # never more threads than cores
    ({"OMP_NUM_THREADS": "", "OPENBLAS_NUM_THREADS": "two", "MKL_NUM_THREADS": "0"}, 4),  # unusable: ignored
])
def test_the_thread_count_follows_the_blas_environment(environment, expected, monkeypatch):
    for variable in numpy_backend._THREAD_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setattr(numpy_backend, "_CORES", 4)
    assert numpy_backend._default_threads() == expected


@pytest.mark.parametrize("threads", [0, -2, 2.5, True, "2"])
def test_use_cpu_threads_rejects_what_is_not_a_positive_count(threads):
    before = numpy_backend.cpu_threads()
    with pytest.raises(ValueError, match="threads"):
        with numpy_backend.use_cpu_threads(threads):
            pass
    assert numpy_backend.cpu_threads() == before
