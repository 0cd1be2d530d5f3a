""".onnx files: the inference graph gpubp writes, checked in onnxruntime against predict; files
read back, PyTorch's exports read; and broken or forged files refused with a ValueError that
names the file, before anything is built."""

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpubp as gb
from gpubp import _random, activations
from gpubp.backends import PRECISIONS
from gpubp.backends.numpy_backend import round_bf16

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from gpubp import onnx as gpubp_onnx  # noqa: E402
from test_layers import scaled_and_folded  # noqa: E402

HEADS = ("identity", "sigmoid", "softmax")
BATCHES = (1, 7, 33)


def model_with(hidden: str, head: str, dtype=np.float32, sizes=(5, 9, 6, 3), precision="fp32") -> gb.Sequential:
    """Two hidden layers of ``hidden`` and a ``head``, with random biases (a dropped bias shows)."""
    gb.seed(3)
    layers = [gb.Dense(a, b, hidden, dtype=dtype) for a, b in zip(sizes[:-2], sizes[1:-1])]
    model = gb.Sequential(layers + [gb.Dense(sizes[-2], sizes[-1], head, dtype=dtype)], device="cpu",
                          backend="numpy", precision=precision)
    rng = np.random.default_rng(4)
    model.set_weights([w if w.ndim == 2 else rng.normal(0, 0.5, w.shape) for w in model.get_weights()])
    return model


def run_onnxruntime(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return session.run(None, {name: x})[0]


def assert_runs_as_predict(model, path, rtol: float) -> None:
    """onnxruntime's output equals ``predict``'s within ``rtol`` of the largest output, batch by batch."""
    rng = np.random.default_rng(5)
    for batch in BATCHES:
        x = rng.normal(0, 2, (batch, model.in_features)).astype(model.dtype)
        expected = model.predict(x)
        np.testing.assert_allclose(run_onnxruntime(path, x), expected, rtol=rtol, atol=rtol * np.abs(expected).max(),
                                   err_msg=f"batch {batch}")


def assert_same_model(loaded, model) -> None:
    """``loaded`` computes what ``model`` does: its activations, float type, precision (tf32, which ONNX does
    not hold, as fp32) and the weights its products multiply (a bf16 model's rounded to bfloat16)."""
    assert [layer.activation for layer in loaded] == [layer.activation for layer in model]
    assert loaded.dtype == model.dtype
    assert loaded.precision == ("bf16" if model.precision == "bf16" else "fp32")
    for ours, theirs in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(ours, round_bf16(theirs) if model.precision == "bf16" and theirs.ndim == 2
                                      else theirs)


# ----------------------------------------------------------------------------- writing, checked in onnxruntime


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("hidden", activations.ACTIVATIONS)
def test_onnxruntime_computes_what_predict_does_and_the_file_loads_back(tmp_path, hidden, head, precision):
    model = model_with(hidden, head, precision=precision)
    model.save(tmp_path / "m.onnx")
    assert_runs_as_predict(model, tmp_path / "m.onnx", rtol=1e-5)
    assert_same_model(gb.load(tmp_path / "m.onnx", device="cpu"), model)


@pytest.mark.parametrize("act", ["sigmoid", "silu"])
def test_a_sigmoid_near_zero_runs_as_predict_at_batch_1(tmp_path, act):
    """onnxruntime's float32 Sigmoid is accurate to about 2e-7 absolute, not relative: below -5 it drifts
    (2e-4 off at -8) and from -16 on it gives 0. A sigmoid head (or a silu output layer) whose only output is
    that small is then far from predict's, against "within 1e-5 of the largest output ... at batch 1"."""
    unit = gb.Sequential([gb.Dense(1, 1, act)], device="cpu", backend="numpy")
    unit.set_weights([np.ones((1, 1), np.float32), np.zeros(1, np.float32)])
    unit.save(tmp_path / "unit.onnx")
    for z in (-6.0, -8.0, -12.0, -17.0):
        x = np.array([[z]], np.float32)
        expected = unit.predict(x)
        np.testing.assert_allclose(run_onnxruntime(tmp_path / "unit.onnx", x), expected, rtol=1e-5,
                                   atol=1e-5 * np.abs(expected).max(), err_msg=f"z = {z}")


# A float64 gelu computes its Erf in float32, so not within 1e-9:
# test_a_float64_gelu_runs_its_erf_in_float32_in_onnxruntime_and_loads_back.
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("hidden", [act for act in activations.ACTIVATIONS if act != "gelu"])
def test_float64_models_run_in_double(tmp_path, hidden, precision):
    model = model_with(hidden, "softmax", dtype=np.float64, precision=precision)
    model.save(tmp_path / "m.onnx")
    assert_runs_as_predict(model, tmp_path / "m.onnx", rtol=1e-9)
    assert_same_model(gb.load(tmp_path / "m.onnx", device="cpu"), model)


def test_a_float64_leaky_relu_keeps_its_slope_in_double(tmp_path):
    """LeakyRelu's alpha is a float attribute, which holds 0.01 rounded to float32 (-9999.999776 for -1e6):
    a float64 model's leaky_relu is Max(x, Mul(x, 0.01)) with 0.01 a double, which onnxruntime computes as
    predict does, -0.0, inf and NaN included, and which loads back; a float32 model's is still a LeakyRelu."""
    unit = gb.Sequential([gb.Dense(1, 1, "leaky_relu", dtype=np.float64)], device="cpu", backend="numpy")
    unit.set_weights([np.ones((1, 1)), np.zeros(1)])
    path = tmp_path / "unit.onnx"
    unit.save(path)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert [n.op_type for n in proto.graph.node] == ["Gemm", "Mul", "Max"]
    (slope,) = [t for t in proto.graph.initializer if t.name not in ("layers.0.weight", "layers.0.bias")]
    assert slope.data_type == TensorProto.DOUBLE and numpy_helper.to_array(slope) == activations.LEAKY_SLOPE
    x = np.array([[-1e6], [-1.0], [-1e-320], [-5e-324], [-0.0], [0.0], [3.0], [1e300], [-1e300], [np.inf],
                  [-np.inf], [np.nan]])
    expected = unit.predict(x)
    assert expected[0, 0] == -1e4
    for found in (run_onnxruntime(path, x), gb.load(path, device="cpu").predict(x)):
        np.testing.assert_array_equal(found, expected)
        np.testing.assert_array_equal(np.signbit(found), np.signbit(expected))
    for precision in ("fp32", "bf16"):
        model = model_with("leaky_relu", "identity", dtype=np.float64, precision=precision)
        model.save(tmp_path / "m.onnx")
        x = np.random.default_rng(5).normal(0, 1e6, (33, model.in_features))
        expected = model.predict(x)
        np.testing.assert_allclose(run_onnxruntime(tmp_path / "m.onnx", x), expected, rtol=1e-14,
                                   atol=1e-14 * np.abs(expected).max(), err_msg=precision)
        assert_same_model(gb.load(tmp_path / "m.onnx", device="cpu"), model)
    assert "LeakyRelu" in [n.op_type for n in gpubp_onnx.model_proto(model_with("leaky_relu", "identity")).graph.node]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_float64_gelu_runs_its_erf_in_float32_in_onnxruntime_and_loads_back(tmp_path, precision):
    """onnxruntime has no double kernel for Erf: a float64 model's gelu casts Erf's input to float32 and its
    output back, within about 1e-7 of |x| of predict, and the file reads back as the float64 gelu model."""
    model = model_with("gelu", "sigmoid", dtype=np.float64, precision=precision)
    model.save(tmp_path / "m.onnx")
    assert_runs_as_predict(model, tmp_path / "m.onnx", rtol=1e-6)
    assert_same_model(gb.load(tmp_path / "m.onnx", device="cpu"), model)


def outputs_and_hidden(path, x: np.ndarray, n_hidden: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """onnxruntime's output for ``x``, and the output of each of the first ``n_hidden`` layers (before the
    next one rounds it to bfloat16)."""
    proto = onnx.load(path)
    names = [f"layers.{i}.y" for i in range(n_hidden)]
    proto.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    output, *hidden = session.run([gpubp_onnx.OUTPUT, *names], {"input": x})
    return output, hidden


@pytest.mark.parametrize("hidden", ["relu", "sigmoid", "tanh", "gelu"])
def test_a_bf16_model_of_a_realistic_size_runs_as_predict_but_where_a_sum_rounds_to_the_other_bfloat16(tmp_path,
                                                                                                      hidden):
    """The file rounds as predict does, but onnxruntime's float32 results can differ from predict's in the last
    bit (its Sigmoid, Tanh and Erf here; sums added in another order elsewhere); where one lies that close to a
    bfloat16 rounding boundary, the next layer's input rounds to the neighbouring bfloat16 value, one bfloat16
    step (2^-8 to 2^-7 of it) away, and that row's outputs move by about bfloat16's precision. At width 256 a
    few rows in a thousand do (up to 1.3e-3 of the largest output): the rows that differ by more than 1e-5 of
    it are those, and by at most 1e-2."""
    gb.seed(1)
    model = gb.Sequential([gb.Dense(16, 256, hidden), gb.Dense(256, 256, hidden), gb.Dense(256, 4)], device="cpu",
                          backend="numpy", precision="bf16")
    model.save(tmp_path / "m.onnx")
    x = np.random.default_rng(1).normal(size=(1001, 16)).astype(np.float32)
    expected = model.predict(x)
    found, hidden_found = outputs_and_hidden(tmp_path / "m.onnx", x, 2)
    off = np.abs(found - expected).max(axis=1) / np.abs(expected).max()
    assert off.max() <= 1e-2
    assert np.count_nonzero(off > 1e-5) <= 20  # 2% of the rows
    # Layer by layer, predict as a model of that layer alone: fed onnxruntime's input to the layer, it gives
    # onnxruntime's output but for the last bit; fed its own, it rounds to bfloat16 what onnxruntime rounds
    # to the neighbouring value in the rows where the outputs differ, and in no other.
    weights, ours, theirs, flipped = model.get_weights(), x, x, np.zeros(len(x), bool)
    for i, activation in enumerate([hidden, hidden, "identity"]):
        layer = gb.Sequential([gb.Dense(*weights[2 * i].shape, activation)], device="cpu", backend="numpy",
                              precision="bf16")
        layer.set_weights(weights[2 * i:2 * i + 2])
        following = hidden_found[i] if i < len(hidden_found) else found
        same_input = layer.predict(theirs)
        np.testing.assert_allclose(following, same_input, rtol=1e-5, atol=1e-5 * np.abs(same_input).max())
        ours, theirs = layer.predict(ours), following
        if i < len(hidden_found):
            flipped |= (round_bf16(ours) != round_bf16(theirs)).any(axis=1)
    np.testing.assert_array_equal(ours, expected)
    assert flipped[off > 1e-5].all()


@pytest.mark.parametrize("dtype, large", [(np.float32, 3e38), (np.float64, 1.5e308)])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_the_gelus_stay_finite_up_to_the_largest_float_as_predict_does(tmp_path, act, dtype, large):
    """Past half the largest float x (1 + erf) overflows: the file halves before the last product, as
    predict does, node for node in onnxruntime with its optimizations off (on, they fuse the gelus)."""
    unit = gb.Sequential([gb.Dense(1, 1, act, dtype=dtype)], device="cpu", backend="numpy")
    unit.set_weights([np.ones((1, 1), dtype), np.zeros(1, dtype)])
    unit.save(tmp_path / "unit.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(tmp_path / "unit.onnx"), options, providers=["CPUExecutionProvider"])
    x = np.array([[large], [-large], [1.0]], dtype)
    expected = unit.predict(x)
    assert expected[0, 0] == large
    np.testing.assert_allclose(session.run(None, {"input": x})[0], expected, rtol=1e-6)


@pytest.mark.parametrize("dtype, element, gelu", [
    (np.float32, TensorProto.FLOAT, ["Div", "Erf", "Add", "Mul", "Mul"]),
    (np.float64, TensorProto.DOUBLE, ["Div", "Cast", "Erf", "Cast", "Add", "Mul", "Mul"])])
def test_the_graph_is_gemms_and_activations_over_a_free_batch_axis(tmp_path, dtype, element, gelu):
    model = gb.Sequential([gb.Dense(4, 8, "relu", dtype=dtype), gb.Dense(8, 8, "gelu", dtype=dtype),
                           gb.Dense(8, 8, dtype=dtype), gb.Dense(8, 3, "softmax", dtype=dtype)], device="cpu")
    model.save(tmp_path / "m.onnx")
    proto = onnx.load(tmp_path / "m.onnx")
    assert [node.op_type for node in proto.graph.node] == ["Gemm", "Relu", "Gemm", *gelu, "Gemm", "Gemm", "Softmax"]
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    for value, features in ((proto.graph.input[0], 4), (proto.graph.output[0], 3)):
        tensor = value.type.tensor_type
        assert tensor.elem_type == element
        assert [d.dim_param or d.dim_value for d in tensor.shape.dim] == ["batch", features]
    assert {t.data_type for t in proto.graph.initializer} == {element}


@pytest.mark.parametrize("dtype, casts", [(np.float32, [TensorProto.BFLOAT16, TensorProto.FLOAT]),
                                          (np.float64, [TensorProto.FLOAT, TensorProto.BFLOAT16, TensorProto.DOUBLE])])
def test_a_bf16_model_rounds_each_gemm_input_by_casts_and_its_weights_in_the_file(dtype, casts):
    model = model_with("relu", "identity", dtype=dtype, precision="bf16")
    proto = gpubp_onnx.model_proto(model)
    layer = ["Cast"] * len(casts) + ["Gemm"]
    assert [node.op_type for node in proto.graph.node] == layer + ["Relu"] + layer + ["Relu"] + layer
    assert [helper.get_attribute_value(node.attribute[0]) for node in proto.graph.node
            if node.op_type == "Cast"] == casts * 3
    for i, dense in enumerate(model):  # the weights already rounded, the bias as it is
        np.testing.assert_array_equal(numpy_helper.to_array(initializer(proto, f"layers.{i}.weight")),
                                      round_bf16(dense.weight.data))
        np.testing.assert_array_equal(numpy_helper.to_array(initializer(proto, f"layers.{i}.bias")), dense.bias.data)


def test_onnxruntime_casts_to_bfloat16_as_round_bf16_rounds_ties_included():
    """The Casts a bf16 model's file rounds with, bit for bit: ties to even, overflow to inf, subnormals, and
    float64 by way of float32 (1 + 2^-8 + 2^-40 rounds to 1 there, not to 1 + 2^-7 as a single rounding would)."""
    rng = np.random.default_rng(7)
    high = rng.integers(0, 2 ** 16, 20_000, dtype=np.uint32) << np.uint32(16)
    bits = np.concatenate([rng.integers(0, 2 ** 32, 20_000, dtype=np.uint32), high | np.uint32(0x8000),
                           high | np.uint32(0x7FFF), high | np.uint32(0x8001),
                           np.array([0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x00008000, 0x00018000, 0x7F800000],
                                    np.uint32)])
    x = bits.view(np.float32)[~np.isnan(bits.view(np.float32))]
    x64 = np.concatenate([x.astype(np.float64), [1 + 2 ** -8 + 2 ** -40, 1 + 3 * 2 ** -8 - 2 ** -40]])
    for values, element in ((x, TensorProto.FLOAT), (x64, TensorProto.DOUBLE)):
        nodes = []
        output = gpubp_onnx._cast_nodes("x", gpubp_onnx.BF16_CASTS[element], "x", nodes)
        graph = helper.make_graph(nodes, "casts", [helper.make_tensor_value_info("x", element, [None])],
                                  [helper.make_tensor_value_info(output, element, [None])])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", gpubp_onnx.OPSET)],
                                  ir_version=gpubp_onnx.IR_VERSION)
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(session.run(None, {"x": values})[0], round_bf16(values))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_a_scikit_learn_estimator_exports_through_its_model(tmp_path):
    sklearn = pytest.importorskip("gpubp.sklearn")
    x = np.random.default_rng(0).normal(size=(30, 4))
    clf = sklearn.MLPClassifier((8,), max_iter=5, random_state=0, device="cpu").fit(x, x[:, 0] > 0)
    clf.model_.save(tmp_path / "clf.onnx")
    positive = run_onnxruntime(tmp_path / "clf.onnx", x)  # the sigmoid output: the probability of classes_[1]
    np.testing.assert_allclose(np.hstack([1 - positive, positive]), clf.predict_proba(x), rtol=1e-9)


X_ESTIMATOR = np.random.default_rng(8).normal(size=(30, 4))
# (estimator, y, its parameters): a task for each output the estimators' files end in.
ESTIMATOR_TASKS = {
    "poisson counts": ("MLPRegressor", np.random.default_rng(9).poisson(2.0, 30), {"loss": "poisson"}),
    "two poisson targets": ("MLPRegressor", np.random.default_rng(9).poisson(2.0, (30, 2)), {"loss": "poisson"}),
    "one regression target": ("MLPRegressor", X_ESTIMATOR[:, 0], {}),
    "two regression targets": ("MLPRegressor", X_ESTIMATOR[:, :2], {}),
    "two classes": ("MLPClassifier", np.where(X_ESTIMATOR[:, 0] > 0, "yes", "no"), {}),
    "three classes": ("MLPClassifier", np.digitize(X_ESTIMATOR[:, 0], [-0.5, 0.5]), {}),
    "two labels": ("MLPClassifier", (X_ESTIMATOR[:, :2] > 0).astype(int), {}),
}


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("task", ESTIMATOR_TASKS)
def test_an_estimators_file_computes_its_predict_or_predict_proba(tmp_path, task, dtype, rtol):
    """A Poisson regressor's model gives the log of the mean and a binary classifier's the probability of
    classes_[1] alone: their files go on to predict's mean and predict_proba's two columns."""
    sklearn = pytest.importorskip("gpubp.sklearn")
    name, y, params = ESTIMATOR_TASKS[task]
    x = X_ESTIMATOR.astype(dtype)
    estimator = getattr(sklearn, name)(hidden_layer_sizes=(8,), max_iter=5, random_state=0, device="cpu", **params).fit(x, y)
    estimator.save(tmp_path / "e.onnx")
    found = run_onnxruntime(tmp_path / "e.onnx", x)
    expected = estimator.predict_proba(x) if name == "MLPClassifier" else estimator.predict(x).reshape(len(x), -1)
    assert found.dtype == dtype and found.shape == expected.shape
    np.testing.assert_allclose(found, expected, rtol=rtol, atol=rtol * np.abs(expected).max())
    proto = onnx.load(tmp_path / "e.onnx")
    assert proto.graph.name == f"gpubp.sklearn.{name}"
    assert [d.dim_param or d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == \
        ["batch", expected.shape[1]]
    assert gpubp_onnx.model_proto(estimator) == proto


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_an_estimator_saves_to_onnx_only_and_once_fitted(tmp_path):
    sklearn = pytest.importorskip("gpubp.sklearn")
    from sklearn.exceptions import NotFittedError

    reg = sklearn.MLPRegressor(hidden_layer_sizes=(8,), loss="poisson", max_iter=5, device="cpu")
    with pytest.raises(NotFittedError):
        reg.save(tmp_path / "e.onnx")
    reg.fit(X_ESTIMATOR, ESTIMATOR_TASKS["poisson counts"][1])
    with pytest.raises(ValueError, match=r"^path: an estimator saves its inference graph, to a file ending in \.onnx, "
                                         r"got '.*e\.npz'; pickle the estimator"):
        reg.save(tmp_path / "e.npz")
    assert list(tmp_path.iterdir()) == []


def test_a_model_over_protobufs_2_gib_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(gpubp_onnx, "MAX_BYTES", 100)  # not 2 GiB of memory for a test
    model = gb.Sequential([gb.Dense(3, 4), gb.Dense(4, 2)], device="cpu")  # 104 bytes of float32
    with pytest.raises(ValueError, match=r"model: its weights take 104 bytes, over the 2 GiB that protobuf allows a "
                                         r"single \.onnx file; save it as \.safetensors"):
        model.save(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_weights_under_2_gib_in_a_file_over_it_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    """The file holds the graph and the tensors' names around the weights: weights a few bytes under the
    limit make a message over it, which onnx.checker and protobuf would refuse without saying what to do."""
    model = gb.Sequential([gb.Dense(3, 4), gb.Dense(4, 2)], device="cpu")  # 104 bytes of float32
    size = gpubp_onnx.model_proto(model).ByteSize()
    assert size > 104 + 8
    monkeypatch.setattr(gpubp_onnx, "MAX_BYTES", 104 + 8)  # not 2 GiB of memory for a test
    with pytest.raises(ValueError, match=rf"model: its \.onnx file would take {size} bytes, over the 2 GiB that "
                                         r"protobuf allows a single \.onnx file; save it as \.safetensors"):
        model.save(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(gpubp_onnx, "MAX_BYTES", size)  # the largest message protobuf writes: the limit itself
    model.save(tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").stat().st_size == size


class Unserializable:
    """A message past 2 GiB as protobuf's upb implementation has it: serializing it (ByteSize too) fails."""

    def SerializeToString(self):
        from google.protobuf.message import EncodeError

        raise EncodeError("Failed to serialize proto")


def test_a_message_protobuf_cannot_serialize_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(gpubp_onnx.helper, "make_model", lambda *args, **kwargs: Unserializable())
    with pytest.raises(ValueError, match=rf"model: its \.onnx file would take more than {2 ** 31 - 1} bytes, over the "
                                         r"2 GiB that protobuf allows a single \.onnx file; save it as \.safetensors"):
        model_with("relu", "identity").save(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_layer_onnx_cannot_hold_is_the_type_error_of_the_other_formats(tmp_path):
    scaled, _ = scaled_and_folded()
    with pytest.raises(TypeError, match=r"model: layers\[1\] is a Scale; the file format holds Dense and Dropout "
                                        r"layers only"):
        scaled.save(tmp_path / "scaled.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_is_never_an_onnx_file(tmp_path):
    model_with("relu", "identity").save(tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="path: expected a file ending in .npz or .safetensors"):
        gb.load_checkpoint(tmp_path / "m.onnx")


# ----------------------------------------------------------------------------- reading what others wrote


def test_matmul_and_add_layers_and_a_layer_without_bias(tmp_path):
    rng = np.random.default_rng(6)
    w0, b0, w1 = (rng.normal(size=shape).astype(np.float32) for shape in ((4, 6), (6,), (6, 2)))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("Add", ["b0", "h"], ["z"]),
         helper.make_node("Tanh", ["z"], ["a"]), helper.make_node("Identity", ["a"], ["a2"]),
         helper.make_node("MatMul", ["a2", "w1"], ["y"])], "others",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        [numpy_helper.from_array(a, name) for a, name in ((w0, "w0"), (b0, "b0"), (w1, "w1"))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    model = gb.load(tmp_path / "m.onnx", device="cpu")
    assert [layer.activation for layer in model] == ["tanh", "identity"]
    x = rng.normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x), run_onnxruntime(tmp_path / "m.onnx", x), rtol=1e-5)
    np.testing.assert_array_equal(model[1].bias.data, np.zeros(2, np.float32))


def test_a_matmul_whose_output_is_added_to_itself(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"), helper.make_node("Add", ["h", "h"], ["y"],
                                                                                       name="twice")],
        "others", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        [numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    expect_rejected(path, "adds the layer's output to itself, where gpubp needs a bias")


def followed_by(proto, op_type: str, new_op: str, inputs=(), outputs=()) -> None:
    """The ``op_type`` node of ``proto`` followed by a ``new_op`` node reading its output (then ``inputs``)
    and writing what it wrote (then ``outputs``)."""
    before = node(proto, op_type)
    after = before.output[0]
    before.output[0] = f"{after}.before"
    position = list(proto.graph.node).index(before) + 1
    proto.graph.node.insert(position, helper.make_node(new_op, [before.output[0], *inputs], [after, *outputs],
                                                       name=new_op.lower()))


@pytest.mark.parametrize("op_type", ["Identity", "Dropout"])
def test_an_identity_after_the_softmax_head(tmp_path, op_type):
    proto = valid_proto()
    followed_by(proto, "Softmax", op_type)
    path = written(tmp_path, proto)
    model = gb.load(path, device="cpu")
    assert [layer.activation for layer in model] == ["leaky_relu", "relu", "softmax"]
    x = np.random.default_rng(8).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x), run_onnxruntime(path, x), rtol=1e-5)


@pytest.mark.parametrize("inputs, outputs", [(["ratio", "inference"], []), ([], [""]), (["ratio"], ["mask"])],
                         ids=["training_mode false", "mask unnamed", "mask written"])
def test_a_dropout_as_inference_runs_it_passes_through(tmp_path, inputs, outputs):
    """A Dropout whose training_mode is absent or false is the identity; its mask, if written, no step of a
    chain can read."""
    proto = valid_proto()
    followed_by(proto, "Relu", "Dropout", inputs, outputs)
    proto.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in (
        ("ratio", np.array(0.5, np.float32)), ("inference", np.array(False))) if name in inputs)
    path = written(tmp_path, proto)
    model = gb.load(path, device="cpu")
    assert [layer.activation for layer in model] == ["leaky_relu", "relu", "softmax"]
    x = np.random.default_rng(8).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x), run_onnxruntime(path, x), rtol=1e-5)


TORCH_ACTIVATIONS = [("ReLU", {}, "relu"), ("LeakyReLU", {}, "leaky_relu"), ("Tanh", {}, "tanh"), ("GELU", {}, "gelu"),
                     ("Sigmoid", {}, "sigmoid"), ("SiLU", {}, "silu"),
                     ("GELU", {"approximate": "tanh"}, "gelu_tanh")]


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
@pytest.mark.parametrize("exporter", ["dynamo", "dynamo, opset 18", "torchscript, opset 17"])
def test_a_pytorch_export_of_linear_layers_and_activations(tmp_path, exporter):
    torch = pytest.importorskip("torch")
    if exporter.startswith("dynamo"):
        pytest.importorskip("onnxscript", reason="torch.onnx.export's dynamo exporter needs onnxscript")
    torch.manual_seed(0)
    modules = []
    for name, kwargs, _ in TORCH_ACTIVATIONS:
        modules += [torch.nn.Linear(8 if modules else 5, 8), getattr(torch.nn, name)(**kwargs)]
    modules += [torch.nn.Dropout(0.3), torch.nn.Linear(8, 8), torch.nn.Linear(8, 4), torch.nn.Softmax(dim=1)]
    mlp = torch.nn.Sequential(*modules).eval()
    path = tmp_path / "torch.onnx"
    if exporter == "dynamo":
        torch.onnx.export(mlp, (torch.randn(2, 5),), path, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
    elif exporter == "dynamo, opset 18":  # the gelus as formulas in another order: x^3 a Pow, the half before the x
        torch.onnx.export(mlp, (torch.randn(2, 5),), path, dynamo=True, opset_version=18,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
        assert {"Pow", "Erf"} <= {node.op_type for node in onnx.load(path).graph.node}
    else:  # writes opset 17's formulas for the two gelus, where the dynamo exporter writes opset 20's Gelu
        torch.onnx.export(mlp, (torch.randn(2, 5),), path, dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    model = gb.load(path, device="cpu")
    assert [layer.activation for layer in model] == [act for *_, act in TORCH_ACTIVATIONS] + ["identity", "softmax"]
    x = torch.randn(7, 5)
    with torch.no_grad():
        expected = mlp(x).numpy()
    np.testing.assert_allclose(model.predict(x.numpy()), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
def test_a_legacy_pytorch_export_without_constant_folding_of_a_linear_without_bias(tmp_path):
    """torch.onnx.export(dynamo=False, do_constant_folding=False) writes a bias-free Linear as
    Transpose(weight) then MatMul: the Transpose of a constant is read as the transposed constant."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 4, bias=False), torch.nn.ReLU(), torch.nn.Linear(4, 3)).eval()
    path = tmp_path / "torch.onnx"
    torch.onnx.export(mlp, (torch.randn(2, 5),), path, dynamo=False, opset_version=17, do_constant_folding=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    assert [node.op_type for node in onnx.load(path).graph.node][:2] == ["Transpose", "MatMul"]
    model = gb.load(path, device="cpu")
    x = torch.randn(7, 5)
    with torch.no_grad():
        expected = mlp(x).numpy()
    np.testing.assert_allclose(model.predict(x.numpy()), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(model.get_weights()[1], np.zeros(4, np.float32))


def test_a_transpose_of_a_constant_with_a_perm_that_is_no_permutation(tmp_path):
    proto = valid_proto()
    gemm = node(proto, "Gemm")
    proto.graph.node.insert(0, helper.make_node("Transpose", [gemm.input[1]], ["w_t"], name="t", perm=[0, 0]))
    gemm.input[1] = "w_t"
    expect_rejected(written(tmp_path, proto), r"a Transpose of .layers.0.weight. with "
                                              r"perm=\[0, 0\]")


# ----------------------------------------------------------------------------- broken and forged files


def valid_proto(precision: str = "fp32") -> onnx.ModelProto:
    """Gemm, LeakyRelu, Gemm, Relu, Gemm, Softmax (each Gemm's input cast to bfloat16 and back for
    ``precision="bf16"``): the graph each test spoils."""
    model = gb.Sequential([gb.Dense(4, 6, "leaky_relu"), gb.Dense(6, 5, "relu"), gb.Dense(5, 3, "softmax")],
                          device="cpu", precision=precision)
    return gpubp_onnx.model_proto(model)


def written(tmp_path, proto) -> str:
    path = tmp_path / "spoiled.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def expect_rejected(path, problem: str) -> None:
    """A ValueError naming ``path`` and matching ``problem``, with the random state untouched."""
    state = _random.get_state()
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": (node .*: )?(" + problem + ")"):
        gb.load(path, device="cpu")
    assert _random.get_state() == state


def node(proto, op_type: str):
    return next(n for n in proto.graph.node if n.op_type == op_type)


def initializer(proto, name: str):
    return next(t for t in proto.graph.initializer if t.name == name)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_a_truncated_file(tmp_path, keep):
    path = written(tmp_path, valid_proto())
    blob = path.read_bytes()
    path.write_bytes(blob[:int(len(blob) * keep)])
    expect_rejected(path, "not a readable ONNX model, truncated or corrupt|not a valid ONNX model")


@pytest.mark.parametrize("blob, problem", [(b"", r"not an ONNX model \(no graph\)"),
                                           (b"\x0a\xff\xff\xff\xff\x0f", "not a readable ONNX model")])
def test_a_file_that_is_not_a_model(tmp_path, blob, problem):
    path = tmp_path / "m.onnx"
    path.write_bytes(blob)
    expect_rejected(path, problem)


def test_weights_kept_in_another_file(tmp_path):
    proto = valid_proto()
    weight = initializer(proto, "layers.0.weight")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../../../etc/passwd")
    expect_rejected(written(tmp_path, proto), "tensor 'layers.0.weight' keeps its data in another file")


@pytest.mark.parametrize("dims", [[4, 7], [10 ** 12, 10 ** 12]])
def test_tensor_data_that_does_not_match_its_shape(tmp_path, dims):
    proto = valid_proto()
    weight = initializer(proto, "layers.0.weight")
    del weight.dims[:]
    weight.dims.extend(dims)
    expect_rejected(written(tmp_path, proto), rf"tensor 'layers.0.weight': its shape \({dims[0]}, {dims[1]}\) of "
                                              r"float32 needs \d+ bytes of data, it holds 96")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights(tmp_path, bad):
    proto = valid_proto()
    weight = initializer(proto, "layers.1.weight")
    values = numpy_helper.to_array(weight).copy()
    values[2, 1] = bad
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    expect_rejected(written(tmp_path, proto), "'layers.1.weight' contains NaN or inf")


@pytest.mark.parametrize("tensor", ["weight", "bias"])
def test_errors_name_the_files_own_tensors(tmp_path, tensor):
    """A file's tensors named as PyTorch's exports name them: errors say '2.weight', not gpubp's keys."""
    proto = valid_proto()
    for i, gemm in enumerate(n for n in proto.graph.node if n.op_type == "Gemm"):
        for k, part in ((1, "weight"), (2, "bias")):
            initializer(proto, gemm.input[k]).name = f"{2 * i}.{part}"
            gemm.input[k] = f"{2 * i}.{part}"
    spoiled = initializer(proto, f"2.{tensor}")
    values = numpy_helper.to_array(spoiled).copy()
    values.flat[0] = np.nan
    spoiled.CopyFrom(numpy_helper.from_array(values, spoiled.name))
    expect_rejected(written(tmp_path, proto), rf"'2\.{tensor}' contains NaN or inf")


def test_a_tensor_that_is_a_segment_of_a_larger_one(tmp_path):
    proto = valid_proto()
    initializer(proto, "layers.0.weight").segment.CopyFrom(TensorProto.Segment(begin=0, end=24))
    expect_rejected(written(tmp_path, proto), "tensor 'layers.0.weight' is a segment of a larger tensor, which gpubp "
                                              "does not read")


@pytest.mark.parametrize("dtype", [np.float16, np.int64, np.float64])
def test_a_weight_of_another_type(tmp_path, dtype):
    proto = valid_proto()
    bias = initializer(proto, "layers.2.bias")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias).astype(dtype), bias.name))
    expect_rejected(written(tmp_path, proto), "'layers.2.bias' has dtype .*, expected float32, as the other weights"
                                              "|not a valid ONNX model")


@pytest.mark.parametrize("code", [29, 1000])
def test_a_weight_of_a_data_type_onnx_does_not_name(tmp_path, code):
    """A corrupt byte can leave a type code that is no ONNX type; the error still names the file."""
    proto = valid_proto()
    initializer(proto, "layers.2.bias").data_type = code
    expect_rejected(written(tmp_path, proto), rf"tensor 'layers.2.bias' has data type {code} \(not an ONNX data type\), "
                                              "expected numbers")


@pytest.mark.parametrize("spoil, problem", [
    (lambda p: setattr(node(p, "Relu"), "op_type", "Selu"), r"node 'layers.1.relu' \(Selu\): not a linear layer or an "
                                                            "activation gpubp can represent"),
    (lambda p: node(p, "LeakyRelu").attribute[0].__setattr__("f", 0.2), r"alpha=0.2\d*; gpubp's leaky_relu has the "
                                                                        "slope 0.01"),
    (lambda p: node(p, "Gemm").attribute.append(helper.make_attribute("transA", 1)), "transA=1; gpubp represents Gemm"),
    (lambda p: node(p, "Gemm").attribute.append(helper.make_attribute("alpha", 2.0)), "alpha=2.0; gpubp represents"),
    (lambda p: p.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "extra")),
     r"tensors \['extra'\] are not used by the layers"),
    (lambda p: p.graph.output.append(helper.make_tensor_value_info("layers.0.z", TensorProto.FLOAT, ["b", 6])),
     "the graph has 1 inputs and 2 outputs"),
    (lambda p: (setattr(node(p, "Relu"), "domain", "com.example"), p.opset_import.append(
        helper.make_opsetid("com.example", 1))), "an operator outside standard ONNX"),
    (lambda p: node(p, "Relu").input.__setitem__(0, "nowhere"), "not a valid ONNX model"),
    (lambda p: node(p, "Relu").input.__setitem__(0, "input"), r"reads \['input'\], not the tensor the step before"),
    (lambda p: p.graph.input[0].type.tensor_type.__setattr__("elem_type", TensorProto.DOUBLE),
     "not a valid ONNX model|the graph's input 'input' is of type DOUBLE, expected FLOAT"),
    (lambda p: p.graph.input[0].type.tensor_type.shape.dim[1].__setattr__("dim_value", 5),
     r"the graph's input 'input' has the shape \[None, 5\], expected \(batch, 4\)"),
])
def test_a_graph_gpubp_cannot_represent(tmp_path, spoil, problem):
    proto = valid_proto()
    spoil(proto)
    expect_rejected(written(tmp_path, proto), problem)


def test_a_formula_with_another_constant_is_no_gelu(tmp_path):
    proto = gpubp_onnx.model_proto(model_with("gelu_tanh", "identity"))
    constant = initializer(proto, f"constant.{activations.GELU_TANH_A!r}")
    constant.CopyFrom(numpy_helper.from_array(np.array(0.05, np.float32), constant.name))
    expect_rejected(written(tmp_path, proto), "not a linear layer or an activation gpubp can represent")


def test_a_max_formula_with_another_slope_is_no_leaky_relu(tmp_path):
    proto = gpubp_onnx.model_proto(model_with("leaky_relu", "identity", dtype=np.float64))
    constant = initializer(proto, f"constant.{activations.LEAKY_SLOPE!r}")
    constant.CopyFrom(numpy_helper.from_array(np.array(0.2), constant.name))
    expect_rejected(written(tmp_path, proto), "not a linear layer or an activation gpubp can represent")


def retyped(proto, dtype, names=None) -> onnx.ModelProto:
    """``proto``'s initializers ``names`` in ``dtype``; all of them, and the graph's input and output, where None."""
    for tensor in proto.graph.initializer:
        if names is None or tensor.name in names:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(dtype), tensor.name))
    if names is None:
        for value in (proto.graph.input[0], proto.graph.output[0]):
            value.type.tensor_type.elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return proto


@pytest.mark.parametrize("proto, problem", [
    (lambda: retyped(gpubp_onnx.model_proto(model_with("gelu_tanh", "identity")), np.float64, ["constant.0.5"]),
     "the constant 'constant.0.5' is of type DOUBLE, expected FLOAT, the type of the tensor it meets"),
    (lambda: retyped(gpubp_onnx.model_proto(model_with("leaky_relu", "identity", dtype=np.float64)), np.float32,
                     ["constant.0.01"]), "the constant 'constant.0.01' is of type FLOAT, expected DOUBLE"),
    (lambda: retyped(retyped(gpubp_onnx.model_proto(model_with("leaky_relu", "identity", dtype=np.float64)),
                             np.float32), np.float64, ["constant.0.01"]),
     "the constant 'constant.0.01' is of type DOUBLE, expected FLOAT"),
    (lambda: retyped(gpubp_onnx.model_proto(model_with("gelu", "identity", dtype=np.float64)), np.float32,
                     ["constant.1.0"]), "the constant 'constant.1.0' is of type FLOAT, expected DOUBLE"),
    (lambda: retyped(retyped(gpubp_onnx.model_proto(model_with("gelu", "identity", dtype=np.float64)), np.float32),
                     np.float64, ["constant.1.0", "constant.0.5"]),
     "not a linear layer or an activation gpubp can represent"),
], ids=["double half in float32", "float slope in float64", "double slope in float32", "float one after Erf's cast",
        "a float32 gelu cast back to double"])
def test_a_formula_of_mixed_types(tmp_path, proto, problem):
    """ONNX binds an Add's or Mul's operands to one type (onnxruntime refuses such a file; onnx.checker looks
    only with full_check): a formula's constants are of the type of the tensor they meet."""
    proto = proto()
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.checker.check_model(proto, full_check=True)
    expect_rejected(written(tmp_path, proto), problem)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float64])
def test_a_pow_exponent_of_another_numeric_type_loads(tmp_path, dtype):
    """ONNX gives Pow's exponent a type of its own (T1, any numeric type): ``Pow(z, 3)`` with an int64
    3 is valid (onnx.checker with full_check, onnxruntime), unlike an Add's or Mul's operand of another type."""
    model = model_with("gelu_tanh", "identity")
    proto = retyped(gpubp_onnx.model_proto(model), dtype, ["constant.3.0"])
    onnx.checker.check_model(proto, full_check=True)
    loaded = gb.load(written(tmp_path, proto), device="cpu")
    x = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


def test_a_step_that_reads_the_layer_below_second_says_so(tmp_path):
    """1 - p (a Sub whose second operand is the output below): the error says it reads that tensor,
    but not first, instead of that it does not read it."""
    proto = valid_proto()
    relu = node(proto, "Relu")
    relu.op_type, relu.input[:] = "Sub", ["one", relu.input[0]]
    proto.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), "one"))
    expect_rejected(written(tmp_path, proto), r"reads the tensor the step before wrote \('layers.1.z'\) as its input "
                                              "2 of 2, not its first: not an activation gpubp can represent")


def test_loading_a_path_that_is_no_path_or_a_directory_names_the_argument(tmp_path):
    with pytest.raises(TypeError, match="path: expected a str or os.PathLike, got int"):
        gpubp_onnx.load(123)
    (tmp_path / "model.onnx").mkdir()
    with pytest.raises(IsADirectoryError, match="path: .*model.onnx' is a directory, not an .onnx file"):
        gb.load(tmp_path / "model.onnx")


def test_a_dropout_in_training_mode(tmp_path):
    proto = valid_proto()
    followed_by(proto, "Relu", "Dropout", ["ratio", "training"], ["mask"])
    proto.graph.initializer.extend([numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
                                    numpy_helper.from_array(np.array(True), "training")])
    expect_rejected(written(tmp_path, proto), r"node 'dropout' \(Dropout\): a Dropout in training mode \(its "
                                              r"training_mode input is true\), which drops at random; gpubp reads "
                                              "inference Dropout only")


def test_a_softmax_before_the_end(tmp_path):
    proto = valid_proto()
    relu = node(proto, "Relu")
    relu.op_type = "Softmax"
    relu.attribute.append(helper.make_attribute("axis", -1))
    expect_rejected(written(tmp_path, proto), "Softmax must be the graph's last step")


def test_an_activation_before_the_first_layer(tmp_path):
    proto = valid_proto()
    gemm = node(proto, "Gemm")
    gemm.input[0] = "pre"
    proto.graph.node.insert(0, helper.make_node("Tanh", ["input"], ["pre"], name="pre"))
    expect_rejected(written(tmp_path, proto), "an activation where gpubp needs a linear layer first")


def test_inputs_rounded_to_bfloat16_in_some_layers_only(tmp_path):
    proto = valid_proto("bf16")
    gemm = node(proto, "Gemm")
    casts = [n for n in proto.graph.node if n.op_type == "Cast"][:2]
    gemm.input[0] = "input"
    for cast in casts:
        proto.graph.node.remove(cast)
    expect_rejected(written(tmp_path, proto), "the linear layers' inputs are cast BFLOAT16 -> FLOAT or not cast; "
                                              r"gpubp represents each cast BFLOAT16 -> FLOAT \(a bf16 model\), or none")


def test_a_bfloat16_input_multiplied_by_a_weight_that_is_not(tmp_path):
    proto = valid_proto("bf16")
    weight = initializer(proto, "layers.1.weight")
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1 + 2 ** -12), weight.name))
    expect_rejected(written(tmp_path, proto), "layer 1 rounds its input to bfloat16 but its weight holds other values")


def test_a_width_mismatch_after_bfloat16_casts_names_the_linear_layer(tmp_path):
    """The error names the Gemm whose weight does not fit, not the first Cast that rounds its input."""
    proto = valid_proto("bf16")
    weight = initializer(proto, "layers.1.weight")
    weight.CopyFrom(numpy_helper.from_array(np.zeros((5, 5), np.float32), weight.name))
    expect_rejected(written(tmp_path, proto), r"node 'layers\.1\.gemm' \(Gemm\): takes 5 inputs, but the layer "
                                              "before gives 6")


def test_a_rounding_to_bfloat16_that_no_linear_layer_reads(tmp_path):
    proto = valid_proto()
    relu = node(proto, "Relu")
    position = list(proto.graph.node).index(relu)
    casts = []
    relu.input[0] = gpubp_onnx._cast_nodes(relu.input[0], gpubp_onnx.BF16_CASTS[TensorProto.FLOAT], "round", casts)
    for k, cast in enumerate(casts):
        proto.graph.node.insert(position + k, cast)
    expect_rejected(written(tmp_path, proto), r"node 'round.bfloat16' \(Cast\): rounds to bfloat16 and back where no "
                                              "linear layer reads the result")


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def valid_blob(request):
    return valid_proto(request.param).SerializeToString()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_corrupted_byte_loads_or_is_a_value_error_naming_the_file(tmp_path, valid_blob, data):
    blob = bytearray(valid_blob)
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / "fuzzed.onnx"
    path.write_bytes(bytes(blob))
    try:
        gb.load(path, device="cpu")
    except ValueError as exc:
        assert str(exc).startswith(f"{path}: ")
