"""Bad input: a clear ValueError/TypeError naming the argument and the expected vs actual
value, raised before any kernel runs, with the model's weights left exactly as they were."""

import contextlib
import re
import tracemalloc

import numpy as np
import pytest

import gpubp as gb
from gpubp import backends, batches


class FakeCupyArray:
    """Looks like a cupy.ndarray to gpubp (its type lives in the ``cupy`` package)."""

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def __getitem__(self, index):
        return FakeCupyArray(np.empty(self.shape, bool)[index].shape, self.dtype)


FakeCupyArray.__module__ = "cupy._core.core"


class FakeDeviceArray:
    """Any other array in GPU memory: it only exposes ``__cuda_array_interface__``."""

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.__cuda_array_interface__ = {"shape": self.shape, "typestr": self.dtype.str, "data": (0, False),
                                         "version": 3}


def make_model(activation="relu", out=3):
    gb.seed(0)
    return gb.Sequential([gb.Dense(4, 5, activation), gb.Dense(5, out)], device="cpu")


def data(n=8, out=3):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, out, n)


@contextlib.contextmanager
def rejected(model, error, match):
    """Expect ``error`` matching ``match``, no kernel launch, and unchanged weights."""
    before = model.get_weights()
    with gb.trace() as t, pytest.raises(error, match=match):
        yield
    assert t.total == 0, f"kernels ran before the error: {dict(t.counts)}"
    assert_weights_equal(before, model)


def assert_weights_equal(expected, model):
    """``model``'s weights are ``expected`` (a list as ``get_weights`` returns), bit for bit."""
    assert_arrays_equal(model.get_weights(), expected)


def assert_arrays_equal(got, want):
    """Two lists of arrays (the weights of two runs, say) are the same length and equal bit for bit."""
    assert len(got) == len(want), f"{len(got)} arrays against {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(a, b, err_msg=f"array {i}")


# ----------------------------------------------------------------------------- shapes


def test_x_with_the_wrong_feature_count_names_both_shapes():
    model = make_model()
    with rejected(model, ValueError, r"x: expected shape \(batch, 4\), got \(8, 5\)"):
        model.forward(np.ones((8, 5), np.float32))


def test_x_that_is_not_2d_names_its_shape():
    model = make_model()
    with rejected(model, ValueError, r"x: expected a 2-D array of shape \(batch, 4\), got shape \(4,\)"):
        model.forward(np.ones(4, np.float32))


def test_x_with_no_rows_is_rejected():
    model = make_model()
    with rejected(model, ValueError, r"x: expected at least one row, got shape \(0, 4\)"):
        model.predict(np.ones((0, 4), np.float32))


def test_fit_with_x_of_the_wrong_width_trains_nothing():
    model = make_model()
    _, y = data()
    with rejected(model, ValueError, r"x: expected shape \(batch, 4\), got \(8, 3\)"):
        model.fit(np.ones((8, 3), np.float32), y, verbose=0)


def test_fit_with_a_y_of_the_wrong_length_names_both_lengths():
    model = make_model()
    x, y = data()
    with rejected(model, ValueError, "y: expected 8 targets to match x, got 7"):
        model.fit(x, y[:7], verbose=0)


def test_fit_with_mse_targets_of_the_wrong_width_names_both_shapes():
    model = make_model()
    x, _ = data()
    with rejected(model, ValueError, r"y: expected shape \(8, 3\), got \(8, 2\)"):
        model.fit(x, np.zeros((8, 2), np.float32), loss="mse", verbose=0)


def test_validation_data_of_the_wrong_width_is_named():
    model = make_model()
    x, y = data()
    with rejected(model, ValueError, r"validation_data: expected shape \(batch, 4\), got \(2, 5\)"):
        model.fit(x, y, validation_data=(np.ones((2, 5), np.float32), np.zeros(2, np.int64)), verbose=0)


def test_dout_of_the_wrong_shape_names_the_forward_output_shape():
    model = make_model()
    x, y = data()
    model.forward(x)
    with rejected(model, ValueError, r"dout: expected shape \(8, 3\) \(the last forward's output\), got \(8, 2\)"):
        model.backward(np.ones((8, 2), np.float32))


RAGGED_ROWS = [[0.0, 1.0, 2.0, 3.0], [0.0]]
X_EXPECTED = r"expected a 2-D array of shape \(batch, 4\)"
UNEVEN = "got something NumPy cannot make one array of"


@pytest.mark.parametrize("call, match", [
    (lambda model, x, y: model.fit(RAGGED_ROWS, y, verbose=0), rf"^x: {X_EXPECTED}, {UNEVEN}"),
    (lambda model, x, y: model.fit(x, [[0, 1], [1]], loss="mse", verbose=0),
     rf"^y: expected an array of targets, one per row of x, {UNEVEN}"),
    (lambda model, x, y: model.fit(x, y, sample_weight=[[1.0], [1.0, 2.0]], verbose=0),
     rf"^sample_weight: expected 2 weights \(one per sample of x\), {UNEVEN}"),
    (lambda model, x, y: model.fit(x, y, validation_data=(RAGGED_ROWS, y), verbose=0),
     rf"^validation_data: {X_EXPECTED}, {UNEVEN}"),
    (lambda model, x, y: model.fit(x, y, validation_data=(x, y, [[1.0], [1.0, 2.0]]), verbose=0),
     rf"^validation_data\[2\]: expected 2 weights \(one per sample of validation_data\), {UNEVEN}"),
    (lambda model, x, y: model.predict(RAGGED_ROWS), rf"^x: {X_EXPECTED}, {UNEVEN}"),
    (lambda model, x, y: model.forward(RAGGED_ROWS), rf"^x: {X_EXPECTED}, {UNEVEN}"),
    (lambda model, x, y: model.evaluate(RAGGED_ROWS, y), rf"^x: {X_EXPECTED}, {UNEVEN}"),
    (lambda model, x, y: model.train_step()(RAGGED_ROWS, y), rf"^x: {X_EXPECTED}, {UNEVEN}"),
], ids=["fit x", "fit y", "sample_weight", "validation x", "validation sample_weight", "predict", "forward",
        "evaluate", "train_step"])
def test_ragged_nested_lists_are_a_value_error_naming_the_argument(call, match):
    model = make_model()
    x, y = data(n=2)
    with rejected(model, ValueError, match):
        call(model, x, y)


@pytest.mark.parametrize("make", [lambda x: (row for row in x), iter], ids=["generator", "iterator"])
def test_an_iterator_as_x_is_a_type_error_pointing_at_arrays_or_train_step(make):
    model = make_model()
    x, y = data()
    with rejected(model, TypeError, rf"^x: {X_EXPECTED}, got an iterator .*pass arrays, or call model.train_step"):
        model.fit(make(x), y, verbose=0)


def test_a_dataset_or_a_dict_as_x_is_a_type_error_pointing_at_arrays_or_train_step():
    """NumPy wraps them whole in an array of shape (), which read as 'got shape ()'."""
    torch = pytest.importorskip("torch")
    model = make_model()
    x, y = data()
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    for source, name in ((torch.utils.data.DataLoader(dataset, batch_size=4), "DataLoader"),
                         (dataset, "TensorDataset"), ({"x": x}, "dict")):
        with rejected(model, TypeError, rf"^x: {X_EXPECTED}, got a {name}, which is no array; .*model.train_step"):
            model.fit(source, y, verbose=0)


def test_a_torch_tensor_that_requires_grad_is_read_as_its_values():
    """torch's own error said 'Can't call numpy() on Tensor that requires grad'."""
    torch = pytest.importorskip("torch")
    x, y = data()
    model, twin = make_model(), make_model()
    np.testing.assert_array_equal(model.predict(torch.from_numpy(x).requires_grad_(True)), twin.predict(x))
    rounded = torch.from_numpy(x).bfloat16()  # NumPy has no bfloat16: read as the float32 it holds
    np.testing.assert_array_equal(model.predict(rounded), twin.predict(rounded.float().numpy()))


def test_an_ml_dtypes_bfloat16_array_is_read_as_the_float32_it_holds():
    """JAX's host arrays are ml_dtypes' bfloat16, which NumPy sees as kind 'V' (no float type of its
    own); they are read as float32, exactly, as a torch bfloat16 tensor is."""
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes (JAX's bfloat16 for NumPy) is not installed")
    x, y = data()
    rounded = x.astype(ml_dtypes.bfloat16)
    assert rounded.dtype.kind == "V"
    widened = rounded.astype(np.float32)
    model, twin = make_model(), make_model()
    np.testing.assert_array_equal(model.predict(rounded), twin.predict(widened))
    np.testing.assert_array_equal(model.forward(rounded, training=False), twin.forward(widened, training=False))
    assert model.evaluate(rounded, y) == twin.evaluate(widened, y)
    model.fit(rounded, y, sample_weight=np.ones(len(x)).astype(ml_dtypes.bfloat16), shuffle=False, verbose=0)
    twin.fit(widened, y, sample_weight=np.ones(len(x)), shuffle=False, verbose=0)
    assert_weights_equal(twin.get_weights(), model)


def test_a_void_dtype_of_another_name_is_still_no_floating_point_array():
    """bfloat16 is known by its name: other two-byte records stay refused."""
    model = make_model()
    with rejected(model, TypeError, r"^x: expected a floating-point array, got dtype \|V2"):
        model.predict(np.zeros((3, 4), "V2"))


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("call, flag", [
    (lambda model, x, value: model.forward(x, training=value), "training"),
    (lambda model, x, value: model.forward(x, logits=value), "logits"),
    (lambda model, x, value: model.forward(x, need_input_grad=value), "need_input_grad"),
    (lambda model, x, value: model.backward_plan(need_input_grad=value), "need_input_grad"),
    (lambda model, x, value: model.backward_plan(logits=value), "logits"),
    (lambda model, x, value: model.backward(np.ones((8, 3), np.float32), need_input_grad=value), "need_input_grad"),
], ids=["forward_training", "forward_logits", "forward_need_input_grad", "plan_need_input_grad", "plan_logits",
        "backward_need_input_grad"])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_a_flag_that_is_not_a_bool_is_a_type_error_naming_it(call, flag, value):
    """As predict's logits: a truthy string or number is a mistake, not a choice."""
    model = make_model()
    x, _ = data()
    with rejected(model, TypeError, rf"^{flag}: expected True or False, got {value!r}$"):
        call(model, x, value)


def test_integer_x_is_a_type_error_naming_the_dtype():
    model = make_model()
    with rejected(model, TypeError, "x: expected a floating-point array, got dtype int64"):
        model.forward(np.ones((2, 4), np.int64))


def test_string_x_is_a_type_error():
    model = make_model()
    _, y = data(n=1)
    with rejected(model, TypeError, "x: expected a floating-point array, got dtype <U1"):
        model.fit([["a", "b", "c", "d"]], y, verbose=0)


def test_float_labels_for_cross_entropy_are_a_type_error():
    model = make_model()
    x, y = data()
    with rejected(model, TypeError, "y: cross_entropy expects 1-D integer class labels, got dtype float64"):
        model.fit(x, y.astype(np.float64), verbose=0)


def test_labels_in_a_column_for_cross_entropy_are_a_type_error_saying_to_ravel_them():
    model = make_model()
    x, y = data()
    with rejected(model, TypeError, r"y: cross_entropy expects 1-D integer class labels, got dtype int64, shape "
                                    r"\(\d+, 1\) \(labels in a column: pass y.ravel\(\)\)"):
        model.fit(x, y.reshape(-1, 1).astype(np.int64), verbose=0)


def test_integer_dout_is_a_type_error():
    model = make_model()
    x, _ = data()
    model.forward(x)
    with rejected(model, TypeError, "dout: expected a floating-point array, got dtype int64"):
        model.backward(np.ones((8, 3), np.int64))


# ----------------------------------------------------------------------------- values


def test_labels_out_of_range_name_the_range_and_the_values():
    model = make_model()
    x, y = data()
    y[3] = 3
    with rejected(model, ValueError, r"y: expected class labels in \[0, 3\), got values from 0 to 3"):
        model.fit(x, y, verbose=0)


def test_binary_cross_entropy_targets_outside_0_1_are_rejected():
    model = make_model(out=1)
    x, _ = data()
    with rejected(model, ValueError, r"y: binary_cross_entropy expects targets in \[0, 1\], got 0.0 to 2.0"):
        model.fit(x, np.array([0, 1, 2, 0, 1, 0, 1, 0], np.float32), loss="bce", verbose=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_x_is_rejected_before_any_step_naming_the_row(bad):
    model = make_model()
    x, y = data()
    x[1, 2] = bad
    with rejected(model, ValueError, r"x: non-finite values \(NaN or inf\), first in row 1"):
        model.fit(x, y, batch_size=4, shuffle=False, verbose=0)


def test_non_finite_x_in_a_late_batch_trains_nothing_at_all():
    model = make_model()
    x, y = data(n=12)
    x[9, 0] = np.nan
    with rejected(model, ValueError, r"x: non-finite values \(NaN or inf\), first in row 9"):
        model.fit(x, y, optimizer=gb.optim.SGD(model.parameters(), lr=0.1), batch_size=4, shuffle=False, verbose=0)


def test_non_finite_regression_targets_are_rejected_before_any_step():
    model = make_model(out=1)
    x, _ = data()
    y = np.zeros(len(x), np.float32)
    y[5] = np.inf
    with rejected(model, ValueError, r"y: non-finite values \(NaN or inf\), first in row 5"):
        model.fit(x, y, loss="mse", batch_size=2, shuffle=False, verbose=0)


@pytest.mark.parametrize("what", ["x", "y"])
def test_float64_data_past_the_float32_range_is_rejected_before_any_step(what):
    """Finite in float64, inf in the float32 model: refused up front, not a NaN loss late in an epoch."""
    model = make_model(out=1)
    x, _ = data(n=12)
    x, y = x.astype(np.float64), np.zeros(len(x))
    (x[9] if what == "x" else y[9:10])[0] = -1e39
    with rejected(model, ValueError, rf"{what}: -1e\+39 in row 9 is beyond float32's range"):
        model.fit(x, y, loss="mse", optimizer=gb.optim.SGD(model.parameters(), lr=0.1), batch_size=4,
                  shuffle=False, verbose=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_finite_check_of_a_dataset_makes_no_array_of_its_size(tmp_path, dtype):
    """fit checks every value up front; on a memory-mapped dataset larger than memory, a mask or
    an np.abs copy of it would not fit. The check finds a clean file clean with under a tenth of
    its size allocated, and a bad value in it still by its row."""
    x = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", dtype, (20_000, 50))
    x[:] = 0.5
    x.flush()
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    tracemalloc.start()
    try:
        batches.all_finite(x, "x", np.float32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes / 10, f"the check allocated {peak} bytes for a {x.nbytes}-byte dataset"
    bad = np.array(x)
    bad[12_345, 7] = np.nan
    with pytest.raises(ValueError, match=r"^x: non-finite values \(NaN or inf\), first in row 12345"):
        batches.all_finite(bad, "x", np.float32)


@pytest.mark.parametrize("weights, message", [
    ({"sample_weight": np.r_[np.ones(11), 1e39]}, r"^sample_weight: 1e\+39 at sample 11 is beyond float32's range"),
    ({"class_weight": {2: 1e39}}, r"^class_weight: 1e\+39 for class 2 is beyond float32's range"),
    ({"sample_weight": np.full(12, 1e20), "class_weight": {1: 1e20}},
     r"^sample_weight times class_weight: 1e\+40 in row 0 is beyond float32's range"),
    ({"validation_data": (np.zeros((3, 4), np.float32), np.array([1, 0, 1]), np.array([1.0, 1e39, 1.0]))},
     r"^validation_data\[2\]: 1e\+39 at sample 1 is beyond float32's range"),
], ids=["sample_weight", "class_weight", "their_product", "validation_weights"])
def test_weights_past_the_float32_range_are_refused_before_any_step(weights, message):
    """A float64 weight that is inf in the float32 model's loss: refused up front, as x and y are,
    not a FloatingPointError batches into the epoch."""
    model = make_model()
    x, _ = data(n=12)
    y = np.r_[1, np.zeros(11, np.int64)]
    with rejected(model, ValueError, message):
        model.fit(x, y, optimizer="sgd", batch_size=4, shuffle=False, verbose=0, **weights)


def test_evaluate_refuses_a_sample_weight_past_the_float32_range():
    model = make_model()
    x, y = data()
    with rejected(model, ValueError, r"^sample_weight: 1e\+39 at sample 7 is beyond float32's range"):
        model.evaluate(x, y, loss="cross_entropy", sample_weight=np.r_[np.ones(7), 1e39])


def test_weights_past_the_float32_range_train_a_float64_model():
    gb.seed(0)
    model = gb.Sequential([gb.Dense(4, 3)], device="cpu", dtype="float64")
    x, y = data()
    history = model.fit(x, y, class_weight={2: 1e39}, sample_weight=np.full(len(x), 1e-39), verbose=0)
    assert np.isfinite(history["loss"][0])


def test_a_loss_that_turns_nan_stops_fit_before_that_batchs_update():
    calls = []

    def nan_on_third_batch(pred, target, backend=None):
        calls.append(1)
        value, grad = gb.losses.cross_entropy(pred, target, backend=backend)
        return (float("nan") if len(calls) == 3 else value), grad

    x, y = data(n=12)
    reference = make_model()
    reference.fit(x[:8], y[:8], optimizer=gb.optim.SGD(reference.parameters(), lr=0.1), batch_size=4,
                  shuffle=False, verbose=0)
    model = make_model()
    with pytest.raises(FloatingPointError, match=r"the loss became nan in epoch 1, batch 3"):
        model.fit(x, y, loss=nan_on_third_batch, optimizer=gb.optim.SGD(model.parameters(), lr=0.1),
                  batch_size=4, shuffle=False, verbose=0)
    assert_weights_equal(reference.get_weights(), model)


class RecordWeights(gb.Callback):
    def __init__(self):
        self.weights = []

    def on_epoch_end(self, model, epoch, logs):
        self.weights.append(model.get_weights())


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_a_diverging_run_stops_when_the_loss_overflows_keeping_the_last_finite_weights():
    model = gb.Sequential([gb.Dense(1, 1)], device="cpu")
    model.set_weights([np.ones((1, 1)), np.zeros(1)])
    record = RecordWeights()
    with pytest.raises(FloatingPointError, match=r"the loss became inf in epoch 2, batch 1"):
        model.fit(np.ones((1, 1), np.float32), np.zeros((1, 1), np.float32), loss="mse",
                  optimizer=gb.optim.SGD(model.parameters(), lr=1e20), epochs=5, verbose=0, callbacks=[record])
    assert len(record.weights) == 1
    assert_weights_equal(record.weights[0], model)
    assert np.all(np.isfinite(model[0].weight.data))


# ----------------------------------------------------------------------------- names and options


def test_unknown_loss_name_in_fit_trains_nothing():
    model = make_model()
    x, y = data()
    with rejected(model, ValueError, "loss: unknown loss 'hinge'"):
        model.fit(x, y, loss="hinge", verbose=0)


def test_unknown_optimizer_name_in_fit_trains_nothing():
    model = make_model()
    x, y = data()
    with rejected(model, ValueError, r"optimizer: unknown optimizer 'adagrad'; expected one of \['adam', 'adamw', "
                                     r"'rmsprop', 'sgd'\]"):
        model.fit(x, y, optimizer="adagrad", verbose=0)


def test_unknown_activation_name_is_rejected_when_the_layer_is_built():
    with pytest.raises(ValueError, match="activation: unknown activation 'softplus'"):
        gb.Dense(4, 5, activation="softplus")


def test_unknown_metric_name_in_fit_trains_nothing():
    model = make_model()
    x, y = data()
    with rejected(model, ValueError, "metrics: unknown metric 'balanced_accuracy'"):
        model.fit(x, y, metrics=["balanced_accuracy"], validation_split=0.25, verbose=0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(epochs=0), ValueError, "epochs: expected a positive int, got 0"),
    (dict(batch_size=2.5), TypeError, "batch_size: expected a positive int, got float 2.5"),
    (dict(validation_split=1.5), ValueError, r"validation_split: expected a float in \[0, 1\), got 1.5"),
    (dict(verbose=3), ValueError, "verbose: expected 0, 1, 2 or 'auto', got 3"),
    (dict(validation_data=np.ones((2, 4))), TypeError,
     r"validation_data: expected \(x_val, y_val\) or \(x_val, y_val, val_sample_weight\)"),
    (dict(callbacks=[print]), TypeError, r"callbacks\[0\]: expected a gpubp Callback"),
], ids=["epochs", "batch_size", "validation_split", "verbose", "validation_data", "callbacks"])
def test_bad_fit_options_name_the_option_and_train_nothing(kwargs, error, match):
    model = make_model()
    x, y = data()
    with rejected(model, error, match):
        model.fit(x, y, **{"verbose": 0, **kwargs})


@pytest.mark.parametrize("flag, value", [("shuffle", "False"), ("shuffle", "batch"), ("shuffle", 0), ("shuffle", None),
                                         ("distributed", "False"), ("distributed", 1)])
def test_a_fit_flag_that_is_not_a_bool_is_a_type_error_naming_it_before_any_step(flag, value):
    """As predict's logits: "False" is true to Python, and Keras's shuffle="batch" is no gpubp order."""
    model = make_model()
    x, y = data()
    with rejected(model, TypeError, rf"^{flag}: expected True or False, got {value!r}$"):
        model.fit(x, y, verbose=0, **{flag: value})


def test_fit_takes_numpy_bools_as_its_flags():
    x, y = data()
    models = make_model(), make_model()
    models[0].fit(x, y, batch_size=4, shuffle=False, distributed=False, cuda_graph=False, verbose=0)
    models[1].fit(x, y, batch_size=4, shuffle=np.False_, distributed=np.False_, cuda_graph=np.False_, verbose=0)
    assert_weights_equal(models[0].get_weights(), models[1])


@pytest.mark.parametrize("call", [
    lambda model, x, y, verbose: model.evaluate(x, y, verbose=verbose),
    lambda model, x, y, verbose: model.predict(x, verbose=verbose),
], ids=["evaluate", "predict"])
@pytest.mark.parametrize("value", [3, -1, "1", "Auto", None])
def test_evaluate_and_predict_check_verbose_as_fit_does(call, value):
    model = make_model()
    x, y = data()
    with rejected(model, ValueError, rf"^verbose: expected 0, 1, 2 or 'auto', got {re.escape(repr(value))}$"):
        call(model, x, y, value)


def test_verbose_auto_is_keras_3s_default_level_1(capsys):
    """Keras 3's fit, evaluate and predict default to verbose="auto", which is 1: code written for
    them runs. (Captured stdout is no terminal, so level 1 prints a line per epoch, as 2 does.)"""
    model = make_model()
    x, y = data()
    history = model.fit(x, y, epochs=2, verbose="auto")
    assert history.params["verbose"] == 2 and capsys.readouterr().out.count("epoch ") == 2
    model.evaluate(x, y, verbose="auto")
    assert capsys.readouterr().out.startswith("evaluate - ")
    model.predict(x, verbose="auto")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("make, match", [
    (lambda p: gb.optim.SGD(p, lr=-0.1), "lr: expected a finite number >= 0, got -0.1"),
    (lambda p: gb.optim.SGD(p, lr=float("nan")), "lr: expected a finite number >= 0, got nan"),
    (lambda p: gb.optim.SGD(p, lr=0.1, momentum=1.5), r"momentum: expected a number in \[0, 1\], got 1.5"),
    (lambda p: gb.optim.SGD(p, lr=0.1, momentum=-0.5), "momentum: expected a finite number >= 0, got -0.5"),
    (lambda p: gb.optim.SGD(p, lr=0.1, nesterov=True), "nesterov: Nesterov momentum needs momentum > 0"),
    (lambda p: gb.optim.SGD(p, lr=0.1, weight_decay=-1), "weight_decay: expected a finite number >= 0, got -1"),
    (lambda p: gb.optim.Adam(p, betas=(0.9, 1.0)), r"betas\[1\]: expected a number in \[0, 1\), got 1.0"),
    (lambda p: gb.optim.Adam(p, betas=0.9), r"betas: expected a pair \(beta1, beta2\), got 0.9"),
    (lambda p: gb.optim.Adam(p, eps=0.0), "eps: expected a finite number > 0, got 0.0"),
    (lambda p: gb.optim.AdamW(p, lr=-1e-3), "lr: expected a finite number >= 0, got -0.001"),
], ids=["negative_lr", "nan_lr", "momentum_above_1", "negative_momentum", "nesterov_no_momentum", "negative_decay",
        "beta2_1", "betas_scalar", "eps_0", "adamw_negative_lr"])
def test_bad_optimizer_hyperparameters_are_value_errors_naming_them(make, match):
    with pytest.raises(ValueError, match=match):
        make(make_model().parameters())


def test_an_optimizer_over_non_parameters_is_a_type_error():
    with pytest.raises(TypeError, match=r"params\[0\]: expected a gpubp Parameter, got ndarray"):
        gb.optim.SGD([np.ones(3)], lr=0.1)


@pytest.mark.parametrize("use", [
    lambda model, x, y, opt: model.fit(x, y, optimizer=opt, verbose=0),
    lambda model, x, y, opt: model.compile(optimizer=opt),
    lambda model, x, y, opt: model.train_step("cross_entropy", opt),
], ids=["fit", "compile", "train_step"])
def test_an_optimizer_of_another_models_parameters_is_refused_before_any_step(use):
    model, other = make_model(), make_model()
    x, y = data()
    other.backward(gb.losses.cross_entropy(other.forward(x), y)[1])  # gradients the optimizer would apply
    other_before = other.get_weights()
    with rejected(model, ValueError, r"^optimizer: it updates parameters that are not the model's; .*"
                                     r"use the optimizer the checkpoint loaded"):
        use(model, x, y, gb.optim.SGD(other.parameters(), lr=0.1))
    assert_weights_equal(other_before, other)


@pytest.mark.parametrize("params", [
    lambda model: model.trainable_parameters(),
    lambda model: model[1].parameters(),
    lambda model: gb.finetune.param_groups(model, lr=0.1),
], ids=["trainable", "head", "finetune_groups"])
def test_an_optimizer_of_some_of_the_models_parameters_trains_them(params):
    model = make_model()
    model[0].freeze()
    x, y = data()
    before = model.get_weights()
    model.fit(x, y, optimizer=gb.optim.SGD(params(model), lr=0.1), verbose=0)
    assert_arrays_equal(model.get_weights()[:2], before[:2])
    assert not np.array_equal(model.get_weights()[2], before[2])


# ----------------------------------------------------------------------------- GPU arrays and devices


@pytest.mark.parametrize("fake", [FakeCupyArray, FakeDeviceArray], ids=["cupy", "cuda_array_interface"])
def test_a_gpu_array_given_to_a_cpu_model_says_where_the_model_is(fake):
    model = make_model()
    with rejected(model, TypeError, r"x: got a .* \(GPU memory\) but the model is on cpu .* model.to\('cuda'\)"):
        model.forward(fake((2, 4)))


def test_a_cupy_array_given_to_predict_on_a_cpu_model_is_a_type_error():
    model = make_model()
    with rejected(model, TypeError, r"x: got a cupy._core.core.FakeCupyArray \(GPU memory\)"):
        model.predict(FakeCupyArray((5, 4)))


def test_a_cupy_dout_given_to_a_cpu_model_is_a_type_error():
    model = make_model()
    x, _ = data()
    model.forward(x)
    with rejected(model, TypeError, r"dout: got a cupy._core.core.FakeCupyArray \(GPU memory\)"):
        model.backward(FakeCupyArray((8, 3)))


def test_cuda_without_a_gpu_says_which_extra_to_install(monkeypatch):
    # Simulate a machine where neither GPU backend can run, whatever this one has.
    monkeypatch.setattr(backends, "_modules", {k: v for k, v in backends._modules.items() if k == "numpy"})
    monkeypatch.setattr(backends, "_unavailable", {"cupy": "CuPy is not installed", "numba": "no CUDA driver"})
    monkeypatch.setitem(backends._unavailable, "cupy", f"CuPy is not installed; {backends.INSTALL_HINT}")
    with pytest.raises(RuntimeError, match=r"device='cuda' was asked for.*pip install \"gpubp\[cuda12\]\"") as error:
        gb.Sequential([gb.Dense(4, 5)], device="cuda")
    assert str(error.value).count(backends.INSTALL_HINT) == 1, "the install hint once, at the end"


def test_moving_a_model_to_cuda_without_a_gpu_keeps_it_on_the_cpu(monkeypatch):
    monkeypatch.setattr(backends, "_modules", {k: v for k, v in backends._modules.items() if k == "numpy"})
    monkeypatch.setattr(backends, "_unavailable", {"cupy": "CuPy is not installed", "numba": "no CUDA driver"})
    model = make_model()
    before = model.get_weights()
    with pytest.raises(RuntimeError, match=r"gpubp\[cuda12\]"):
        model.to("cuda")
    assert model.device == "cpu"
    assert_weights_equal(before, model)


def test_an_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match=r"backend: expected one of \('auto', 'numpy', 'cupy', 'numba'\), got 'tpu'"):
        gb.Sequential([gb.Dense(4, 5)], backend="tpu")


# ----------------------------------------------------------------------------- set_weights


def test_set_weights_with_too_few_arrays_names_both_counts():
    model = make_model()
    with rejected(model, ValueError, r"weights: expected 4 arrays \[W0, b0, W1, b1, ...\], got 3"):
        model.set_weights(model.get_weights()[:3])


def test_set_weights_with_a_wrong_shape_changes_no_weight():
    model = make_model()
    new = [w + 1 for w in model.get_weights()]
    new[2] = new[2].T  # the first three would fit; the third does not
    with rejected(model, ValueError, r"weights\[2\]: expected shape \(5, 3\) for weight, got \(3, 5\)"):
        model.set_weights(new)


def test_set_weights_with_non_finite_values_is_rejected():
    model = make_model()
    new = model.get_weights()
    new[1] = np.full_like(new[1], np.nan)
    with rejected(model, ValueError, r"weights\[1\]: contains NaN or inf"):
        model.set_weights(new)


def test_set_weights_with_a_non_numeric_array_is_a_type_error():
    model = make_model()
    new = model.get_weights()
    new[3] = np.array(["a", "b", "c"])
    with rejected(model, TypeError, r"weights\[3\]: expected a real numeric array \(floats or integers\), "
                                    r"got dtype <U1"):
        model.set_weights(new)


def test_set_weights_with_a_single_array_is_a_type_error():
    model = make_model()
    with rejected(model, TypeError, "weights: expected a list of arrays, got ndarray"):
        model.set_weights(np.ones((4, 5)))
