"""SciPy sparse x in fit, evaluate, predict, a train step and forward: kept sparse; on the CPU a
batch that stores few of its entries reaches the first Dense layer sparse and gives its dense
form's results up to rounding, and a denser batch (or any batch on a GPU) is made dense and
gives them bit for bit."""

import tracemalloc
import warnings

import numpy as np
import pytest
from scipy import sparse

import gpubp as gb
from gpubp import batches, distributed, gradcheck
from gpubp.backends import numpy_backend
from test_bad_input import assert_arrays_equal, assert_weights_equal, rejected

rng = np.random.default_rng(0)
X = sparse.random(120, 40, density=0.1, format="csr", dtype=np.float32, random_state=1)
Y = rng.integers(0, 3, 120)

FORMATS = {
    "csr_matrix": lambda m: m,
    "csc_matrix": lambda m: m.tocsc(),
    "coo_matrix": lambda m: m.tocoo(),
    "csr_array": sparse.csr_array,
}


@pytest.fixture
def small_products_sparse(monkeypatch):
    """The tests' batches are small: multiplied sparse all the same (``SPARSE_MIN_WORK`` 0)."""
    monkeypatch.setattr(numpy_backend, "SPARSE_MIN_WORK", 0)


def model(width: int = 40, **kwargs) -> gb.Sequential:
    gb.seed(0)
    return gb.Sequential([gb.Dense(width, 16, activation="relu"), gb.Dropout(0.1), gb.Dense(16, 3)], **kwargs)


@pytest.mark.parametrize("form", FORMATS)
def test_fit_evaluate_and_predict_on_sparse_x_are_those_on_its_dense_form_bit_for_bit(form):
    sparse_x = FORMATS[form](X)
    weights = rng.uniform(0.5, 2.0, len(Y))
    fit = dict(epochs=2, batch_size=16, verbose=0, validation_split=0.25, metrics=["accuracy"],
               sample_weight=weights)
    on_sparse = model()  # each model's fit draws its shuffles and masks from the stream model() seeds
    history = on_sparse.fit(sparse_x, Y, **fit)
    on_dense = model()
    assert history.history == on_dense.fit(X.toarray(), Y, **fit).history
    assert_weights_equal(on_dense.get_weights(), on_sparse)
    np.testing.assert_array_equal(on_sparse.predict(sparse_x, batch_size=7), on_dense.predict(X.toarray()))
    assert on_sparse.evaluate(sparse_x, Y) == on_dense.evaluate(X.toarray(), Y)


def test_sparse_validation_data_is_scored_as_its_dense_form():
    fit = dict(epochs=1, batch_size=32, verbose=0, shuffle=False)
    logged = model().fit(X[:90], Y[:90], validation_data=(X[90:], Y[90:]), **fit).history
    assert logged == model().fit(X[:90].toarray(), Y[:90], validation_data=(X[90:].toarray(), Y[90:]), **fit).history


def test_a_wide_sparse_matrix_trains_and_predicts_without_a_dense_copy_of_itself():
    """A hashed or TF-IDF feature matrix: 2000 x 20000 is 160 MB dense in float32, 0.1 MB sparse."""
    wide = sparse.random(2000, 20000, density=0.0005, format="csr", dtype=np.float32, random_state=2)
    labels = rng.integers(0, 3, 2000)
    net = model(width=20000)
    tracemalloc.start()
    try:
        net.fit(wide, labels, epochs=1, batch_size=64, verbose=0, validation_data=(wide[:1500], labels[:1500]))
        net.predict(wide)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    dense_bytes = wide.shape[0] * wide.shape[1] * 4
    # A batch of predict's rows (CHUNK_BYTES) is the most that is dense at once.
    assert peak < batches.CHUNK_BYTES + dense_bytes // 8, f"peak {peak / 1e6:.0f} MB"


@pytest.mark.parametrize("form", ["sparse", "dense"])
def test_predict_takes_fewer_rows_a_batch_where_its_batch_would_be_large(monkeypatch, form):
    wide = sparse.random(50, 1000, density=0.01, format="csr", dtype=np.float32, random_state=3)
    net = model(width=1000)
    seen = []
    forward = type(net).forward
    monkeypatch.setattr(type(net), "forward", lambda self, x, **kw: (seen.append(x.shape), forward(self, x, **kw))[1])
    monkeypatch.setattr(batches, "CHUNK_BYTES", 16 * 1000 * 4)
    net.predict(wide if form == "sparse" else wide.toarray())
    assert seen == [(16, 1000)] * 3 + [(2, 1000)]


@pytest.mark.usefixtures("small_products_sparse")
def test_predict_and_evaluate_on_wide_sparse_rows_multiply_them_sparse_and_agree_with_the_dense_form(monkeypatch):
    """420 rows of 20000 float32 features, 0.1% stored: no row is made dense (predict's last batch
    of one row included, where SPARSE_MIN_WORK is 0), and the outputs are the dense form's up to
    the order the products add in."""
    wide = sparse.random(420, 20000, density=0.001, format="csr", dtype=np.float32, random_state=6)
    labels = rng.integers(0, 3, 420)
    net = model(width=20000)
    on_dense = net.predict(wide.toarray()), net.evaluate(wide.toarray(), labels, loss="cross_entropy")
    monkeypatch.setattr(batches.SparseRows, "__getitem__", lambda self, index: pytest.fail("made dense"))
    np.testing.assert_allclose(net.predict(wide), on_dense[0], rtol=1e-5, atol=1e-7)
    on_sparse = net.evaluate(wide, labels, loss="cross_entropy")
    assert on_sparse.keys() == on_dense[1].keys()
    for name, value in on_sparse.items():
        assert value == pytest.approx(on_dense[1][name], rel=1e-5)


def test_duplicate_entries_are_summed_before_the_values_are_checked():
    """The dense form sums a COO or CSR matrix's duplicates: 2e38 stored twice is 4e38, past float32."""
    twice = sparse.csr_matrix((np.array([2e38, 2e38]), np.array([3, 3]), np.r_[np.zeros(101, int), np.full(20, 2)]),
                              shape=(120, 40))
    assert not twice.has_canonical_format
    net = model()
    with rejected(net, ValueError, r"^x: 4e\+38 in row 100 is beyond float32's range"):
        net.fit(twice, Y, verbose=0)
    assert twice.nnz == 2 and not twice.has_canonical_format  # the caller's matrix is as it was


def test_equal_matrices_stored_otherwise_are_the_same_rows():
    """Unsorted indices and stored zeros: the same dense form, the same SparseRows (and fingerprint)."""
    shuffled = X.copy()
    for row in range(X.shape[0]):
        span = slice(X.indptr[row], X.indptr[row + 1])
        shuffled.indices[span], shuffled.data[span] = shuffled.indices[span][::-1], shuffled.data[span][::-1]
    shuffled.has_sorted_indices = False
    with_zero = sparse.csr_matrix(X, copy=True)
    with_zero.data[0] = 0.0
    expected = X.copy()
    expected.data[0] = 0.0
    for matrix, same_as in ((shuffled, X), (with_zero, expected)):
        rows = batches.SparseRows(matrix)
        np.testing.assert_array_equal(rows[:], same_as.toarray())
        assert distributed.fingerprint(rows) == distributed.fingerprint(batches.SparseRows(same_as))


@pytest.mark.parametrize("value, message", [
    (np.nan, r"^x: non-finite values \(NaN or inf\), first in row 17$"),
    (np.inf, r"^x: non-finite values \(NaN or inf\), first in row 17$"),
    (1e39, r"^x: 1e\+39 in row 17 is beyond float32's range \(±3.403e\+38\), the model's dtype"),
])
def test_a_bad_stored_value_is_named_by_its_row_before_any_step(value, message):
    bad = X.astype(np.float64)
    row_start = bad.indptr[17]
    assert bad.indptr[18] > row_start  # row 17 stores a value
    bad.data[row_start] = value
    net = model()
    with rejected(net, ValueError, message):
        net.fit(bad, Y, verbose=0)
    with pytest.raises(ValueError, match=message.replace("^x", "^validation_data")):
        net.fit(X, Y, validation_data=(bad, Y), verbose=0)


def test_sparse_x_of_the_wrong_width_or_integers_is_refused_as_a_dense_one_is():
    net = model()
    with rejected(net, ValueError, r"^x: expected shape \(batch, 40\), got \(120, 39\)"):
        net.fit(X[:, :39], Y, verbose=0)
    with rejected(net, TypeError, r"^x: expected a floating-point array"):
        net.fit(sparse.csr_matrix(X.toarray().astype(np.int32)), Y, verbose=0)
    with pytest.raises(ValueError, match=r"^x: expected shape \(batch, 40\), got \(120, 39\)"):
        net.predict(X[:, :39])


def test_what_takes_no_sparse_array_says_to_make_it_dense():
    net = model()
    net.forward(X[:16])
    with pytest.raises(TypeError, match=r"^dout: expected an array of shape \(16, 3\) \(the last forward's output\), "
                                        r"got a SciPy sparse csr_matrix; only the samples x of fit, evaluate, predict, "
                                        r"forward, a train step and train_test_split may be sparse: "
                                        r"pass dout.toarray\(\)$"):
        net.backward(sparse.csr_matrix(np.ones((16, 3), np.float32)))


@pytest.mark.parametrize("argument, dense", [("y", r"y\.toarray\(\)"),
                                             ("sample_weight", r"sample_weight\.toarray\(\)\.ravel\(\)")])
def test_sparse_targets_or_weights_are_refused_naming_them(argument, dense):
    net = model()
    message = rf"^{argument}: .*got a SciPy sparse csr_matrix; only the samples x of fit, .* may be sparse: pass {dense}$"
    with rejected(net, TypeError, message):
        if argument == "y":
            net.fit(X, sparse.csr_matrix(np.eye(3)[Y]), loss="categorical_crossentropy", verbose=0)
        else:
            net.fit(X, Y, sample_weight=sparse.csr_matrix(np.ones((120, 1))), verbose=0)


def test_a_train_step_on_a_sparse_batch_is_the_step_on_its_dense_form():
    steps = []
    for batch in (X[:16], X[:16].toarray()):
        net = model()
        step = net.train_step(loss="cross_entropy", optimizer=gb.optim.SGD(net.parameters(), lr=0.1))
        steps.append((step(batch, Y[:16]), net.get_weights()))
    assert steps[0][0] == steps[1][0]
    assert_arrays_equal(steps[0][1], steps[1][1])


def test_fit_leaves_the_callers_sparse_matrix_as_it_was():
    given = X.tocoo()
    before = (given.row.copy(), given.col.copy(), given.data.copy())
    model().fit(given, Y, epochs=1, verbose=0)
    for kept, now in zip(before, (given.row, given.col, given.data)):
        np.testing.assert_array_equal(kept, now)


def test_a_distributed_fit_fingerprints_sparse_x_from_what_it_stores(monkeypatch):
    """The ranks' data check hashes the CSR arrays: equal data agrees, one changed value does not,
    and nothing is made dense for it."""
    rows = batches.SparseRows(X)
    monkeypatch.setattr(batches.SparseRows, "__getitem__", lambda self, index: pytest.fail("made dense"))
    changed = X.copy()
    changed.data[5] += 1
    same = distributed.fingerprint(rows)
    assert distributed.fingerprint(batches.SparseRows(X.copy())) == same
    assert distributed.fingerprint(batches.SparseRows(changed)) != same
    assert distributed.fingerprint(batches.SparseRows(X[:119])) != same
    assert distributed.fingerprint(X.toarray()) != same


def test_scikit_learn_estimators_train_on_sparse_x_as_on_its_dense_form():
    """5% stored, past SPARSE_MAX_DENSITY: each batch is made dense, so the results are bit for bit."""
    pytest.importorskip("sklearn")
    from gpubp.sklearn import MLPClassifier

    data = sparse.random(300, 500, density=0.05, format="csr", random_state=4)
    labels = rng.integers(0, 2, 300)
    make = lambda: MLPClassifier((8,), max_iter=2, early_stopping=True, random_state=0, device="cpu")  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on_sparse, on_dense = make().fit(data.tocsc(), labels), make().fit(data.toarray(), labels)
    for got, want in zip(on_sparse.coefs_, on_dense.coefs_):
        np.testing.assert_array_equal(got, want)
    assert on_sparse.validation_scores_ == on_dense.validation_scores_
    np.testing.assert_array_equal(on_sparse.predict_proba(data), on_dense.predict_proba(data.toarray()))


def test_scikit_learn_estimators_keep_sparse_x_sparse():
    """A 3000 x 20000 float64 matrix is 480 MB dense; fit and predict hold a few batches of it."""
    pytest.importorskip("sklearn")
    from gpubp.sklearn import MLPClassifier

    wide = sparse.random(3000, 20000, density=0.0005, format="csr", random_state=5)
    labels = rng.integers(0, 2, 3000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracemalloc.start()
        try:
            MLPClassifier((8,), max_iter=1, batch_size=50, random_state=0, device="cpu").fit(wide, labels).predict(wide)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 3000 * 20000 * 8 // 8, f"peak {peak / 1e6:.0f} MB"


@pytest.mark.parametrize("stratify", [False, True])
def test_train_test_split_splits_sparse_x_by_rows_and_keeps_it_sparse(stratify):
    parts = gb.data.train_test_split(X.tocoo(), Y, test_size=0.3, seed=0, stratify=stratify)
    dense_parts = gb.data.train_test_split(X.toarray(), Y, test_size=0.3, seed=0, stratify=stratify)
    for got, want in zip(parts[:2], dense_parts[:2]):
        assert sparse.issparse(got) and got.format == "csr"
        np.testing.assert_array_equal(got.toarray(), want)
    for got, want in zip(parts[2:], dense_parts[2:]):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"^y: expected 120 rows to match x, got 119$"):
        gb.data.train_test_split(X, Y[:119])


# ----------------------------------------------------------------------------- the sparse product


def first_layer_inputs(monkeypatch) -> list:
    """What each dense_forward call of the NumPy backend is given as x, in order."""
    seen = []
    forward = numpy_backend.dense_forward
    monkeypatch.setattr(numpy_backend, "dense_forward", lambda x, *args, **kwargs: (seen.append(x),
                                                                                     forward(x, *args, **kwargs))[1])
    return seen


def batch_storing(count: int, rows: int = 10, cols: int = 100, dtype=np.float32):
    """A CSR batch of ``rows`` x ``cols`` that stores exactly ``count`` values."""
    flat = np.random.default_rng(count).choice(rows * cols, size=count, replace=False)
    values = np.random.default_rng(1).uniform(0.5, 1.5, count).astype(dtype)
    return sparse.csr_matrix((values, (flat // cols, flat % cols)), shape=(rows, cols))


def test_a_batch_reaches_the_first_layer_sparse_up_to_sparse_max_density_and_dense_past_it(monkeypatch):
    """10 x 100 entries at SPARSE_MAX_DENSITY (2%) are 20: 20 stored stay sparse, 21 go dense;
    the layer above the first always gets a dense array. A product of 10 x 100 x 16 multiply-adds
    is SPARSE_MIN_WORK's: one row fewer, or one output fewer, and the batch goes dense."""
    assert numpy_backend.SPARSE_MAX_DENSITY == 0.02
    monkeypatch.setattr(numpy_backend, "SPARSE_MIN_WORK", 10 * 100 * 16)
    net = model(width=100)
    assert net.takes_sparse
    seen = first_layer_inputs(monkeypatch)
    for count, stays_sparse in ((20, True), (21, False)):
        seen.clear()
        x = batch_storing(count)
        out = net.forward(x, training=False)
        assert sparse.issparse(seen[0]) is stays_sparse, count
        assert all(isinstance(later, np.ndarray) for later in seen[1:])
        np.testing.assert_allclose(out, net.forward(x.toarray(), training=False), rtol=1e-6, atol=1e-7)
    seen.clear()
    net.forward(batch_storing(20)[:9], training=False)
    assert isinstance(seen[0], np.ndarray)
    gb.seed(0)
    narrower = gb.Sequential([gb.Dense(100, 15, activation="relu"), gb.Dense(15, 3)])
    seen.clear()
    narrower.forward(batch_storing(20), training=False)
    assert isinstance(seen[0], np.ndarray)
    # The switch is the backend's: past a density of -1 every batch is made dense.
    monkeypatch.setattr(numpy_backend, "SPARSE_MAX_DENSITY", -1)
    seen.clear()
    net.forward(batch_storing(1), training=False)
    assert isinstance(seen[0], np.ndarray)


def test_a_model_that_cannot_multiply_sparse_makes_the_batch_dense(monkeypatch):
    """A Dropout on the input comes before the first Dense: the batch is made dense for it."""
    gb.seed(0)
    net = gb.Sequential([gb.Dropout(0.2), gb.Dense(100, 8, activation="relu"), gb.Dense(8, 3)])
    assert not net.takes_sparse
    seen = first_layer_inputs(monkeypatch)
    net.forward(batch_storing(5))
    assert seen and all(isinstance(x, np.ndarray) for x in seen)


def gradients(net, x, dout, need_input_grad=False):
    """The output of a training forward on ``x`` and the gradients backward gives for ``dout``."""
    out = np.array(net.forward(x, logits=True, need_input_grad=need_input_grad))
    dx = net.backward(dout, need_input_grad=need_input_grad)
    grads = [np.array(p.grad) for p in net.parameters() if p.trainable]
    return out, grads, dx


@pytest.mark.parametrize("dtype, rtol", [("float32", 2e-5), ("float64", 1e-12)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("act", ["relu", "gelu", "tanh", "identity"])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.usefixtures("small_products_sparse")
def test_a_sparse_batchs_forward_and_gradients_are_its_dense_forms_up_to_rounding(dtype, rtol, precision, act,
                                                                                   dropout, monkeypatch):
    """Every activation path of the first layer (gelu keeps z; identity forms no dz), a Dropout's
    mask on its output, bf16's rounding of x's stored values: the sparse product's forward, dW,
    db and the layers above are those of the dense form up to the order the products add in."""
    x = sparse.random(48, 300, density=0.01, format="csr", dtype=np.float64, random_state=7)
    dout = np.random.default_rng(8).standard_normal((48, 3))
    runs = []
    seen = first_layer_inputs(monkeypatch)
    for batch in (x, x.toarray()):
        gb.seed(3)
        layers = [gb.Dense(300, 16, activation=act)] + ([gb.Dropout(0.3)] if dropout else []) + [gb.Dense(16, 3)]
        net = gb.Sequential(layers, dtype=dtype, precision=precision)
        runs.append(gradients(net, batch, dout.astype(dtype)))
    assert sparse.issparse(seen[0]) and isinstance(seen[-2], np.ndarray)
    (out, grads, _), (want_out, want_grads, _) = runs
    atol = 1e-6 if dtype == "float32" else 1e-14
    np.testing.assert_allclose(out, want_out, rtol=rtol, atol=atol)
    assert len(grads) == len(want_grads) == 4
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


@pytest.mark.usefixtures("small_products_sparse")
def test_the_gradients_from_a_sparse_batch_are_the_central_differences_of_the_loss():
    """float64: backward through the sparse product (and the input's gradient, dz @ W.T) against
    central differences of the loss of the same rows made dense."""
    x = batch_storing(4, rows=6, cols=40, dtype=np.float64)
    labels = np.array([0, 1, 2, 1, 0, 2])
    gb.seed(4)
    net = gb.Sequential([gb.Dense(40, 5, activation="tanh"), gb.Dense(5, 3)], dtype="float64")
    _, analytic = gradcheck.analytic_gradients(net, x, labels, loss="cross_entropy")
    numerical = gradcheck.numerical_gradients(net, x.toarray(), labels, loss="cross_entropy")
    assert analytic.keys() == numerical.keys()
    for name, want in numerical.items():
        np.testing.assert_allclose(analytic[name], want, rtol=1e-6, atol=1e-9, err_msg=name)
    # check_gradients takes the sparse rows whole: backward on them, differences on their dense form.
    assert max(gradcheck.check_gradients(net, x, labels, loss="cross_entropy").values()) < 1e-8
    # Columns no row stores get a zero gradient in the first weight, exactly.
    empty = np.flatnonzero(np.diff(x.tocsc().indptr) == 0)
    assert empty.size and not np.any(analytic["layers.0.weight"][empty])


@pytest.mark.usefixtures("small_products_sparse")
def test_the_input_gradient_of_a_sparse_batch_is_dense_and_a_frozen_first_layer_keeps_nothing():
    x = sparse.random(32, 200, density=0.01, format="csr", dtype=np.float32, random_state=10)
    dout = np.random.default_rng(11).standard_normal((32, 3)).astype(np.float32)
    net = model(width=200)
    out, grads, dx = gradients(net, x, dout, need_input_grad=True)
    gb.seed(0)
    want = gradients(model(width=200), x.toarray(), dout, need_input_grad=True)
    assert isinstance(dx, np.ndarray) and dx.shape == (32, 200)
    np.testing.assert_allclose(dx, want[2], rtol=1e-5, atol=1e-7)
    # Kept for dW: the CSR batch's three arrays, counted as what they hold, not as a dense batch.
    csr_bytes = sum(a.nbytes for a in (x.data, x.indices, x.indptr))
    net.forward(x)
    on_sparse = net.activation_bytes()
    net.forward(x.toarray())
    assert on_sparse - net.activation_bytes() == csr_bytes - x.toarray().nbytes
    net.layers[0].freeze()
    net.forward(x)
    assert net.layers[0].saved_for_backward()[0] is None  # a frozen first layer keeps no input: it forms no dW
    net.backward(dout)
    assert net.layers[0].weight.grad is None and net.layers[2].weight.grad is not None


@pytest.mark.usefixtures("small_products_sparse")
def test_fit_on_sparse_batches_trains_as_on_the_dense_form_up_to_rounding(monkeypatch):
    """Two epochs with validation, sample weights and a Dropout: the same History and weights up
    to rounding, every training batch multiplied sparse and none made dense."""
    wide = sparse.random(160, 1000, density=0.005, format="csr", dtype=np.float32, random_state=12)
    labels = rng.integers(0, 3, 160)
    weights = rng.uniform(0.5, 2.0, 160)
    fit = dict(epochs=2, batch_size=16, verbose=0, validation_split=0.25, metrics=["accuracy"],
               sample_weight=weights)
    on_dense = model(width=1000)
    dense_history = on_dense.fit(wide.toarray(), labels, **fit).history
    seen = first_layer_inputs(monkeypatch)
    monkeypatch.setattr(batches.SparseRows, "__getitem__", lambda self, index: pytest.fail("made dense"))
    on_sparse = model(width=1000)
    history = on_sparse.fit(wide, labels, **fit).history
    assert seen and all(sparse.issparse(x) for x in seen[::2])  # the first of each model's two layers
    assert history.keys() == dense_history.keys()
    for name, values in history.items():
        np.testing.assert_allclose(values, dense_history[name], rtol=1e-5, err_msg=name)
    for got, want in zip(on_sparse.get_weights(), on_dense.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.usefixtures("small_products_sparse")
def test_a_first_dense_of_the_users_own_whose_forward_reads_an_array_gets_each_batch_dense():
    """A subclass of Dense that overrides forward was written against the layer protocol, whose x
    is a backend array (here it clips it with np.clip): the model must not hand it a CSR batch, and
    fit and predict on sparse x then give what they give on its dense form, bit for bit, as before."""
    seen = []

    class Clipped(gb.Dense):
        def forward(self, x, *args, **kwargs):
            seen.append(type(x))
            return super().forward(np.clip(x, -0.5, 0.5), *args, **kwargs)

    x = sparse.random(64, 200, density=0.01, format="csr", dtype=np.float32, random_state=13)
    labels = rng.integers(0, 3, 64)
    runs = []
    for data in (x, x.toarray()):
        gb.seed(0)
        net = gb.Sequential([Clipped(200, 16, activation="relu"), gb.Dense(16, 3)])
        net.fit(data, labels, epochs=1, batch_size=16, verbose=0)
        runs.append((net.predict(data), net.get_weights()))
    assert seen and all(kind is np.ndarray for kind in seen)
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert_arrays_equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("frozen", [False, True])
def test_a_sparse_dout_is_refused_alike_whether_or_not_a_layer_reads_it(frozen):
    """A backward with every layer frozen reads no dout, but refuses what one that reads it refuses,
    in the same words: a SciPy sparse dout says to pass dout.toarray()."""
    net = model()
    if frozen:
        net.freeze()
    net.forward(X[:16])
    with pytest.raises(TypeError, match=r"^dout: expected an array of shape \(16, 3\) \(the last forward's output\), "
                                        r"got a SciPy sparse csr_matrix; .* pass dout.toarray\(\)$"):
        net.backward(sparse.csr_matrix(np.ones((16, 3), np.float32)))
