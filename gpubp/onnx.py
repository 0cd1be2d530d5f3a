"""ONNX: a model's inference graph as an ``.onnx`` file, and such files read back as models.

``model.save("m.onnx")`` writes what ``model.predict`` computes, for any batch size: one
``Gemm`` per layer (weights (in, out) as ``B``, the bias as ``C``), then its activation, the
sigmoid or softmax head included, in the model's float type (float32, or float64 as ONNX
``double``). A Dropout is the identity in ``predict`` and writes no node. A ``precision="bf16"``
model's products multiply what ``predict``'s do: each Gemm's input goes through ``Cast`` to
``BFLOAT16`` and back (float64 by way of float32, as ``round_bf16`` goes), which rounds to nearest,
ties to even, bit for bit as ``round_bf16`` does (in onnxruntime and in ONNX's reference
implementation), and its weights are written already so rounded, in the float type; the bias and
the sums stay in the float type. onnxruntime before 1.17 removes a Cast to bfloat16 and back
(its issue 9915: 1.16.3 does, 1.17.0 does not), so runs such a file's inputs unrounded. Where
onnxruntime's float32 results differ from predict's in the last bit (its Exp, Tanh and Erf, sums
added in another order) next to a bfloat16 rounding boundary, the next layer's input rounds to the
neighbouring bfloat16 value, one bfloat16 step away: such a sample's outputs differ from predict's
by about bfloat16's precision (1e-3 of the largest output), where the others agree within 1e-5.
"tf32" is written as fp32: the tensor cores round its operands in ways no ONNX type holds, and
gpubp's CPU backends compute it as fp32. The batch axis is named
``"batch"`` and left free. Opset 17, which every current
runtime reads: the exact gelu is written as its erf form ``x * (0.5 * (1 + erf(x / sqrt 2)))``,
gelu_tanh as its formula ``x * (0.5 * (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))))`` (``x^3`` a
``Pow``), each node for node as PyTorch's dynamo exporter writes them (below opset 20); halving
before the last product keeps the gelus finite up to the largest float, as ``predict`` does.
sigmoid is written as ``1 / (1 + exp(-x))`` (``Reciprocal``) and silu as ``x / (1 + exp(-x))``:
onnxruntime's float32 ``Sigmoid`` is accurate to about 2e-7 absolute, not relative (2e-4 off at
x = -8, 0 from -16 on), where predict's keeps its relative precision; written out, both stay
within 3e-7 of predict's relative to each output. A ``Sigmoid`` and ``x * Sigmoid(x)`` are read.
onnxruntime's CPU build has no double kernel for ``Erf``, so a float64 model's gelu computes its erf
in float32, between a ``Cast`` to ``FLOAT`` and one back to ``DOUBLE``: its output is within about
1e-7 of ``|x|`` of ``predict``'s (1e-7 relative for x > 0, more where gelu's small negative values
cancel), and everything else stays in double. leaky_relu is a ``LeakyRelu`` in a float32 model,
and ``Max(x, Mul(x, 0.01))`` with 0.01 a double constant in a float64 one: ``LeakyRelu``'s ``alpha`` is a float attribute, which holds
the slope rounded to float32, and that Max is ``x if x > 0 else 0.01 x`` for every x, -0.0, inf and
NaN included. Reading, the gelus' formulas are also taken in the order PyTorch's TorchScript
exporter writes them (the half taken after the last product, ``x^3`` as ``x * (x * x)``), as gpubp
wrote them before. Protobuf holds a file of at most 2 GiB (``MAX_BYTES``), so a model whose file would
take more, its weights with the graph and names around them, is a ValueError: save it as ``.safetensors``.

A fitted :mod:`gpubp.sklearn` estimator's ``save("m.onnx")`` (or ``model_proto(estimator)``) writes
the graph of its ``predict`` (a regressor) or ``predict_proba`` (a classifier): its ``model_``'s, then
``Exp`` of a Poisson regressor's log mean, or ``Concat(1 - p, p)`` of a binary classifier's one
probability (``ESTIMATOR_OUTPUTS``). ``load`` does not read those last steps back.

``gb.load("m.onnx")`` reads a file gpubp wrote, or a plain MLP written by others such as
``torch.onnx.export`` of an ``nn.Sequential`` of ``nn.Linear`` and activations (``Gemm``, or
``MatMul`` and ``Add``; ``Relu``, ``LeakyRelu`` with slope 0.01, ``Sigmoid``, ``Tanh``, ``Gelu``,
the formulas above (leaky_relu's Max among them), ``Softmax`` over the last axis at the end;
``Identity`` and inference ``Dropout``, its training_mode absent or false, pass through; a weight
may be a ``Transpose`` of a constant, as the TorchScript exporter writes a bias-free Linear without
constant folding). A file
whose every linear layer casts its input to bfloat16 and back, as above, and holds bfloat16 values
as weights is a bf16 model. As for gpubp's other
formats the whole file is checked before anything is built: weights kept outside the file, tensors
whose data does not match their shape, NaN or inf weights, mixed or non-float types (a formula's
constants included, but ``Pow``'s exponent, whose type ONNX leaves free), unused tensors, inputs
rounded to bfloat16 in some layers only or multiplied by weights that are not, a Dropout in
training mode, and any graph that is not such a chain are a
ValueError naming the file, its tensor or node, and the problem. What ONNX
does not hold is not restored: layer names, frozen layers and tf32 (read as fp32).

Needs the onnx package (``pip install "gpubp[onnx]"``, which brings onnxruntime to run the files).

>>> import os, tempfile, numpy as np, gpubp as gb
>>> model = gb.Sequential([gb.Dense(3, 4, "gelu"), gb.Dense(4, 2, "softmax")], device="cpu")
>>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
>>> model.save(path)
>>> np.allclose(gb.load(path).predict(np.ones((5, 3), np.float32)), model.predict(np.ones((5, 3), np.float32)))
True
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

try:
    import onnx
    from google.protobuf import message
    from onnx import TensorProto, helper, numpy_helper
except ImportError as exc:
    raise ImportError(f'reading and writing .onnx files needs the onnx package: pip install "gpubp[onnx]" ({exc})'
                      ) from exc

import gpubp
from gpubp import activations, io
from gpubp.backends.numpy_backend import round_bf16
from gpubp.layers import Dense, Dropout, Sequential, checked_model

OPSET = 17
IR_VERSION = 8  # the IR version of opset 17 (onnx 1.12), so that older runtimes read the files
INPUT, OUTPUT = "input", "output"
ELEMENT_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}
# Whether a precision's products multiply operands rounded to bfloat16 (round_bf16), per precision written.
# tf32 rounds as the tensor cores do (truncated per layer, ties away fused), which no ONNX type holds;
# gpubp's CPU backends compute it as fp32, and so does its file.
ROUNDS_TO_BF16 = {"fp32": False, "tf32": False, "bf16": True}
# The Casts that round a tensor of each float type to bfloat16 and back, as round_bf16 does: float64 by way
# of float32 (onnxruntime casts double to bfloat16 so too; ONNX's reference implementation rounds it once).
BF16_CASTS = {TensorProto.FLOAT: (TensorProto.BFLOAT16, TensorProto.FLOAT),
              TensorProto.DOUBLE: (TensorProto.FLOAT, TensorProto.BFLOAT16, TensorProto.DOUBLE)}
CONSTANT_RTOL = 1e-6  # how close a formula's constant must be: float32 rounds sqrt(2 / pi) by 5e-8
# The most bytes protobuf serializes one message into (onnx.checker's MAXIMUM_PROTOBUF), so the largest .onnx file
# that holds its weights inside.
MAX_BYTES = 2 ** 31 - 1

# One ONNX operator per activation, with its attributes, as the reader takes them; gelu, gelu_tanh, silu and
# (in the files gpubp writes) sigmoid are formulas.
SINGLE_OPS = {"relu": ("Relu", {}), "leaky_relu": ("LeakyRelu", {"alpha": activations.LEAKY_SLOPE}),
              "sigmoid": ("Sigmoid", {}), "tanh": ("Tanh", {}), "softmax": ("Softmax", {"axis": -1})}
# A formula is a chain of steps (operator, operands[, attributes]): "x" is the activation's input, "prev" the
# step before, a number a scalar constant. Add and Mul match their operands in either order. The gelus are
# written as PyTorch's dynamo exporter writes them below opset 20: halving before the last product keeps
# them finite up to the largest float, as predict is (x (1 + erf) overflows past half of it).
FORMULAS = {
    "gelu": (("Div", "x", math.sqrt(2.0)), ("Erf", "prev"), ("Add", "prev", 1.0), ("Mul", 0.5, "prev"),
             ("Mul", "x", "prev")),
    "gelu_tanh": (("Pow", "x", 3.0), ("Mul", activations.GELU_TANH_A, "prev"), ("Add", "x", "prev"),
                  ("Mul", activations.GELU_TANH_C, "prev"), ("Tanh", "prev"), ("Add", 1.0, "prev"),
                  ("Mul", 0.5, "prev"), ("Mul", "x", "prev")),
    # onnxruntime's float32 Sigmoid is accurate to about 2e-7 absolute, not relative: 2e-4 off at -8 and 0 from
    # -16 on, where predict's sigmoid (1 / (1 + exp(-z)), as here) keeps its relative precision. So sigmoid and
    # silu are written as that arithmetic, within 3e-7 of predict's relative to each output in onnxruntime.
    "sigmoid": (("Neg", "x"), ("Exp", "prev"), ("Add", 1.0, "prev"), ("Reciprocal", "prev")),
    "silu": (("Neg", "x"), ("Exp", "prev"), ("Add", 1.0, "prev"), ("Div", "x", "prev")),
}
# Activations the writer writes as their formula, though one operator (SINGLE_OPS) is read for them too.
WRITTEN_AS_FORMULA = ("sigmoid",)
# Other orders of the same arithmetic, read as well: PyTorch's TorchScript exporter (and gpubp's earlier
# files) halve after the last product, and cube with two Muls.
READ_ALSO = {
    "gelu": ((("Div", "x", math.sqrt(2.0)), ("Erf", "prev"), ("Add", "prev", 1.0), ("Mul", "x", "prev"),
              ("Mul", "prev", 0.5)),),
    "gelu_tanh": ((("Mul", "x", "x"), ("Mul", "x", "prev"), ("Mul", activations.GELU_TANH_A, "prev"),
                   ("Add", "x", "prev"), ("Mul", activations.GELU_TANH_C, "prev"), ("Tanh", "prev"),
                   ("Add", 1.0, "prev"), ("Mul", "x", "prev"), ("Mul", 0.5, "prev")),),
    # PyTorch's exporters, and gpubp's earlier files
    "silu": ((("Sigmoid", "x"), ("Mul", "x", "prev")),),
}
# Activations written as a formula in float64 models only. leaky_relu: the one operator would round a constant
# to float32, LeakyRelu's alpha being a FLOAT attribute. Max(x, 0.01 x) is leaky_relu exactly for any slope
# in (0, 1): 0.01 x > x for x < 0, <= x otherwise, both sides equal at +-0.0 and +-inf, both NaN for NaN.
# gelu: onnxruntime's CPU build has no double kernel for Erf, which is computed in float32 between Casts.
FLOAT64_FORMULAS = {
    "leaky_relu": (("Mul", "x", activations.LEAKY_SLOPE), ("Max", "x", "prev")),
    "gelu": (("Div", "x", math.sqrt(2.0)), ("Cast", "prev", {"to": TensorProto.FLOAT}), ("Erf", "prev"),
             ("Cast", "prev", {"to": TensorProto.DOUBLE}), ("Add", "prev", 1.0), ("Mul", 0.5, "prev"),
             ("Mul", "x", "prev")),
}
# What a fitted gpubp.sklearn estimator's predict (a regressor) or predict_proba (a classifier) applies to its model's
# output, by its _onnx_output(): formula steps written after the model, and the columns they give (None: the model's).
# A Poisson regressor's model gives the log of the mean; a binary classifier's its one sigmoid output, the probability
# of classes_[1], which predict_proba puts after 1 - p, that of classes_[0] (the same subtraction, bit for bit).
ESTIMATOR_OUTPUTS = {"exp": ((("Exp", "x"),), None),
                     "both_classes": ((("Sub", 1.0, "x"), ("Concat", "prev", "x", {"axis": 1})), 2)}
COMMUTATIVE = ("Add", "Mul", "Max")
PASS_THROUGH = ("Identity", "Dropout")  # the identity at inference (a Dropout as _passes_through checks)
# Tensors gpubp reads: numbers NumPy holds as they are (not bfloat16 or float8), and where each keeps its data.
_NUMBER_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.INT16,
                 TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32,
                 TensorProto.UINT64, TensorProto.BOOL)
_DATA_FIELDS = ("raw_data", "float_data", "double_data", "int32_data", "int64_data", "uint64_data")


# ----------------------------------------------------------------------------- writing


def model_proto(model) -> onnx.ModelProto:
    """The ONNX model of what ``model.predict`` computes, checked by ``onnx.checker``. ``model`` may also be a
    fitted :mod:`gpubp.sklearn` estimator: the graph then computes its ``predict`` (a regressor) or
    ``predict_proba`` (a classifier), its ``model_``'s followed by the ``exp`` of a Poisson regressor's log mean
    or the ``1 - p`` a binary classifier's ``predict_proba`` puts before ``p`` (``ESTIMATOR_OUTPUTS``)."""
    name, after = "gpubp.Sequential", None
    estimators = sys.modules.get("gpubp.sklearn")  # imported wherever one of its estimators exists
    if estimators is not None and isinstance(model, estimators._BaseMLP):
        after = model._onnx_output()  # scikit-learn's NotFittedError for an unfitted one
        name, model = f"gpubp.sklearn.{type(model).__name__}", model.model_
    checked_model(model, "a gpubp.Sequential or a fitted gpubp.sklearn estimator")
    if model.precision not in ROUNDS_TO_BF16:
        raise ValueError(f"model: precision={model.precision!r}, which gpubp cannot write to ONNX")
    dtype = np.dtype(model.dtype)
    element = ELEMENT_TYPES[dtype]
    rounds = ROUNDS_TO_BF16[model.precision]
    nodes, tensors, constants = [], [], {}
    current = INPUT
    for i, layer in enumerate(model):
        if not isinstance(layer, (Dense, Dropout)):
            raise TypeError(f"model: layers[{i}] is a {type(layer).__name__}; the file format holds Dense and "
                            "Dropout layers only")
    dense = [(i, layer) for i, layer in enumerate(model) if isinstance(layer, Dense)]
    if not dense:
        raise ValueError("model: expected at least one Dense layer")
    size = sum(p.data.nbytes for p in model.parameters())  # as written: the float type, bf16 rounded in it
    if size > MAX_BYTES:  # refused before the weights are copied into a message; the message is checked below
        raise ValueError(f"model: its weights take {size} bytes, over the 2 GiB that protobuf allows a single "
                         ".onnx file; save it as .safetensors")
    for i, layer in dense:
        weight, bias = (p.backend.to_host(p.data) for p in (layer.weight, layer.bias))
        if rounds:  # the weights the products multiply; the bias is added in the float type
            weight = round_bf16(weight)
            current = _cast_nodes(current, BF16_CASTS[element], f"layers.{i}.input", nodes)
        names = (f"layers.{i}.weight", f"layers.{i}.bias")
        tensors += [numpy_helper.from_array(np.ascontiguousarray(array, dtype), name)
                    for array, name in zip((weight, bias), names)]
        y = OUTPUT if i == dense[-1][0] and after is None else f"layers.{i}.y"  # what the layer gives the next one
        z = y if layer.activation == "identity" else f"layers.{i}.z"
        nodes.append(helper.make_node("Gemm", [current, *names], [z], name=f"layers.{i}.gemm"))
        if layer.activation != "identity":
            nodes += _activation_nodes(layer.activation, z, y, f"layers.{i}.{layer.activation}", dtype, constants)
        current = y
    out_features = model.out_features
    if after is not None:
        steps, columns = ESTIMATOR_OUTPUTS[after]
        nodes += _formula_nodes(steps, current, OUTPUT, f"output.{after}", dtype, constants)
        out_features = columns or out_features
    tensors += constants.values()
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info(INPUT, element, ["batch", model.in_features])],
        [helper.make_tensor_value_info(OUTPUT, element, ["batch", out_features])], initializer=tensors)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="gpubp", producer_version=gpubp.__version__)
    # The whole message counts, the graph and the tensors' names and framing with the weights: weights a few bytes
    # under the limit pass the check above, and past it protobuf fails to serialize the message (upb's ByteSize
    # serializes it too) or onnx.checker refuses it, neither saying what to do. The checker takes the bytes, which
    # it would otherwise serialize itself.
    try:
        data = proto.SerializeToString()
    except message.EncodeError:  # upb's, past the limit
        data = None
    if data is None or len(data) > MAX_BYTES:
        took = f"more than {MAX_BYTES}" if data is None else len(data)
        raise ValueError(f"model: its .onnx file would take {took} bytes, over the 2 GiB that protobuf allows a "
                         "single .onnx file; save it as .safetensors")
    onnx.checker.check_model(data)
    return proto


def _cast_nodes(x: str, types: tuple[int, ...], prefix: str, nodes: list) -> str:
    """Append to ``nodes`` the Casts of ``x`` to each of ``types`` in turn; the last one's output."""
    for to in types:
        output = f"{prefix}.{_type_name(to).lower()}"
        nodes.append(helper.make_node("Cast", [x], [output], name=output, to=to))
        x = output
    return x


def _activation_nodes(act: str, x: str, y: str, prefix: str, dtype: np.dtype, constants: dict) -> list:
    """The nodes computing ``y = act(x)``; scalar constants go into ``constants``, shared by name."""
    steps = FLOAT64_FORMULAS.get(act) if dtype == np.float64 else None
    if steps is None and act in SINGLE_OPS and act not in WRITTEN_AS_FORMULA:
        op, attributes = SINGLE_OPS[act]
        return [helper.make_node(op, [x], [y], name=prefix, **attributes)]
    return _formula_nodes(steps or FORMULAS[act], x, y, prefix, dtype, constants)


def _formula_nodes(steps: tuple, x: str, y: str, prefix: str, dtype: np.dtype, constants: dict) -> list:
    """The nodes computing ``y`` from ``x`` by the formula ``steps``; scalar constants go into ``constants``."""
    nodes, prev = [], x
    for k, step in enumerate(steps):
        op, operands, attributes = _step(step)
        inputs = []
        for operand in operands:
            if operand == "x" or operand == "prev":
                inputs.append(x if operand == "x" else prev)
            else:
                name = f"constant.{operand!r}"
                constants.setdefault(name, numpy_helper.from_array(np.array(operand, dtype), name))
                inputs.append(name)
        prev = y if k == len(steps) - 1 else f"{prefix}.{k}"
        nodes.append(helper.make_node(op, inputs, [prev], name=f"{prefix}.{k}", **attributes))
    return nodes


def _step(step: tuple) -> tuple[str, list, dict]:
    """A formula step's (operator, operands, attributes): its last item where that is a dict, else none."""
    op, *operands = step
    attributes = operands.pop() if isinstance(operands[-1], dict) else {}
    return op, operands, attributes


# ----------------------------------------------------------------------------- reading


def load(path, device: str = "auto", backend: str = "auto") -> Sequential:
    """The model an .onnx file holds; see the module documentation for what it may hold."""
    path = io._path(path)
    if not path.exists():
        raise FileNotFoundError(f"path: no such file {str(path)!r}")
    if path.is_dir():
        raise IsADirectoryError(f"path: {str(path)!r} is a directory, not an .onnx file")
    graph = _Graph(path, _parse(path))
    layers = graph.layers()
    sizes = [layers[0][0].shape[0]] + [bias.shape[0] for _, bias, *_ in layers]
    tensors, named = {}, {}  # under gpubp's keys, and the file's names (errors name what the file holds)
    for i, (weight, bias, _, _, names) in enumerate(layers):
        tensors[f"layers.{i}.weight"], tensors[f"layers.{i}.bias"] = weight, bias
        named.update((name, array) for name, array in zip(names, (weight, bias)) if name is not None)
    dtype = io.check_weights(path, named)
    graph.check_types(dtype, sizes[0], sizes[-1])
    header = {"format_version": io.FORMAT_VERSION, "sizes": sizes, "activations": [act for _, _, act, *_ in layers],
              "precision": graph.precision(layers, dtype)}
    return io.model_from(path, header, tensors, device=device, backend=backend)


def _parse(path: Path) -> onnx.ModelProto:
    """The file's ModelProto, every tensor's data inside it and as long as its shape says, valid by
    ``onnx.checker``."""
    try:
        proto = onnx.ModelProto.FromString(path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError, and whatever else a corrupt message raises
        raise ValueError(f"{path}: not a readable ONNX model, truncated or corrupt ({exc})") from None
    if not proto.HasField("graph"):
        raise ValueError(f"{path}: not an ONNX model (no graph)")
    for tensor in _tensors_in(proto.graph):
        _check_data(path, tensor)
    if len(proto.graph.sparse_initializer):
        raise ValueError(f"{path}: sparse initializers are not something gpubp can represent")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # onnx.checker.ValidationError, and errors of the checker's own parsing
        raise ValueError(f"{path}: not a valid ONNX model ({str(exc).strip().splitlines()[0]})") from None
    return proto


def _type_name(code: int) -> str:
    """ONNX's name of a tensor data type, or the number of one it has no name for (a corrupt file's)."""
    try:
        return TensorProto.DataType.Name(code)
    except ValueError:
        return f"{code} (not an ONNX data type)"


def _check_data(path: Path, tensor) -> None:
    """A tensor of numbers whose data is in the file and as long as its shape and type say."""
    where = f"{path}: tensor {tensor.name!r}"
    if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data):
        raise ValueError(f"{where} keeps its data in another file, which gpubp does not read; save the model "
                         "with its data inside")
    if tensor.HasField("segment"):
        raise ValueError(f"{where} is a segment of a larger tensor, which gpubp does not read")
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type) if tensor.data_type in _NUMBER_TYPES else None
    if dtype is None:
        raise ValueError(f"{where} has data type {_type_name(tensor.data_type)}, expected numbers")
    if any(d < 0 for d in tensor.dims):
        raise ValueError(f"{where} has negative dimensions {list(tensor.dims)}")
    fields = [f for f in _DATA_FIELDS if len(getattr(tensor, f))]
    if len(fields) > 1:
        raise ValueError(f"{where} holds its data in {len(fields)} fields, {fields}, where ONNX allows one")
    count = math.prod(tensor.dims)
    if fields == ["raw_data"]:
        found, expected, unit = len(tensor.raw_data), count * dtype.itemsize, "bytes"
    else:
        found, expected, unit = len(getattr(tensor, fields[0])) if fields else 0, count, "values"
    if found != expected:
        raise ValueError(f"{where}: its shape {tuple(tensor.dims)} of {dtype} needs {expected} {unit} of data, "
                         f"it holds {found}")


def _tensors_in(graph):
    """Every tensor of ``graph``: initializers, and tensors in node attributes and their subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            yield from ([attribute.t] if attribute.HasField("t") else []) + list(attribute.tensors)
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors_in(subgraph)


class _Graph:
    """A parsed graph read as a chain of layers: each step takes the tensor the step before wrote."""

    def __init__(self, path: Path, proto: onnx.ModelProto) -> None:
        self.path, self.graph = path, proto.graph
        # None only where no standard operator is used: the checker refuses one without its import.
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        self.constants = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}  # checked by _parse
        self.used: set[str] = set()
        self.nodes = []
        for node in self.graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise ValueError(f"{path}: node {node.name!r} ({node.domain}::{node.op_type}): an operator outside "
                                 "standard ONNX, which gpubp cannot represent")
            if node.op_type == "Constant":
                self._constant_node(node)
            elif node.op_type == "Transpose" and len(node.input) == 1 and node.input[0] in self.constants:
                self._transposed_constant(node)
            else:
                self.nodes.append(node)
        inputs = [value for value in self.graph.input if value.name not in self.constants]
        if len(inputs) != 1 or len(self.graph.output) != 1:
            raise ValueError(f"{path}: the graph has {len(inputs)} inputs and {len(self.graph.output)} outputs; "
                             "a gpubp model has one of each")
        self.input, self.output = inputs[0], self.graph.output[0]
        self.element = self.input.type.tensor_type.elem_type  # the float type: check_types holds the weights to it

    def _constant_node(self, node) -> None:
        value = [a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR]
        if len(node.output) != 1 or len(node.attribute) != 1 or not value:
            raise ValueError(f"{self.path}: Constant node {node.name!r} holds something other than one tensor "
                             "'value', which gpubp cannot represent")
        self.constants[node.output[0]] = numpy_helper.to_array(value[0].t)

    def _transposed_constant(self, node) -> None:
        """A Transpose of a constant (torch.onnx.export's legacy exporter writes one before a bias-free
        Linear's MatMul where constant folding is off): the transposed constant, under its output's name."""
        value = self.constants[node.input[0]]
        perm = self._attribute(node, "perm", None)
        if len(node.output) != 1 or (perm is not None and sorted(perm) != list(range(value.ndim))):
            raise self._error(node, f"a Transpose of {node.input[0]!r} with perm={perm}, which gpubp cannot represent")
        self.constants[node.output[0]] = np.transpose(value, perm)
        self.used.add(node.input[0])

    # ------------------------------------------------------------------------- the chain

    def layers(self) -> list[tuple[np.ndarray, np.ndarray, str, tuple[int, ...] | None, tuple[str, str | None]]]:
        """(weight (in, out), bias (out,), activation, the types its input is cast to first or None, the file's
        names of the weight and bias (None where it has none)) per layer, in order."""
        layers, current, position = [], self.input.name, 0
        while position < len(self.nodes):
            node = self.nodes[position]
            if not node.input or not node.output:
                raise self._error(node, "a node without inputs or outputs")
            casts, rounding = None, self._bf16_rounding(position, current)
            if rounding is not None:
                casts, current, position = rounding
                if position == len(self.nodes) or self.nodes[position].op_type not in ("Gemm", "MatMul"):
                    raise self._error(node, "rounds to bfloat16 and back where no linear layer reads the result")
            linear_node, linear = self.nodes[position], self._linear(position, current)
            if linear is not None:
                weight, bias, names, current, position = linear
                if layers and layers[-1][0].shape[1] != weight.shape[0]:
                    raise self._error(linear_node, f"takes {weight.shape[0]} inputs, but the layer before gives "
                                            f"{layers[-1][0].shape[1]}")
                layers.append([weight, bias, "identity", casts, names])
                continue
            if node.op_type in PASS_THROUGH and self._passes_through(node, current):
                current, position = node.output[0], position + 1
                continue
            act, output, end = self._activation(position, current)
            if not layers or layers[-1][2] != "identity":
                raise self._error(node, "an activation where gpubp needs a linear layer first (a model is Dense "
                                        "layers, each with at most one activation)")
            if layers[-1][2] == "softmax" or (act == "softmax" and any(n.op_type not in PASS_THROUGH
                                                                           for n in self.nodes[end:])):
                raise self._error(node, "Softmax must be the graph's last step")
            layers[-1][2], current, position = act, output, end
        if not layers:
            raise ValueError(f"{self.path}: the graph holds no linear layer")
        if current != self.output.name:
            raise ValueError(f"{self.path}: the graph's output {self.output.name!r} is not the end of its chain of "
                             f"layers ({current!r})")
        unused = sorted(set(self.constants) - self.used)
        if unused:
            raise ValueError(f"{self.path}: tensors {unused} are not used by the layers")
        return [tuple(layer) for layer in layers]

    def _error(self, node, problem: str) -> ValueError:
        return ValueError(f"{self.path}: node {node.name!r} ({node.op_type}): {problem}")

    def _take(self, name: str, node, ndims: tuple[int, ...]) -> np.ndarray:
        """The constant ``name`` that ``node`` reads, of one of the numbers of dimensions ``ndims``."""
        if name not in self.constants:
            raise self._error(node, f"reads {name!r} where gpubp needs a constant tensor")
        array = self.constants[name]
        if array.ndim not in ndims:
            raise self._error(node, f"{name!r} has shape {array.shape}, expected {' or '.join(map(str, ndims))} "
                                    "dimensions")
        self.used.add(name)
        return array

    def _attribute(self, node, name: str, default):
        found = [a for a in node.attribute if a.name == name]
        return helper.get_attribute_value(found[0]) if found else default

    def _linear(self, position: int, current: str):
        """(weight (in, out), bias, the file's names of both, output, next position) for a Gemm, or MatMul
        (+ Add), reading ``current``; None when the node is neither."""
        node = self.nodes[position]
        if node.op_type not in ("Gemm", "MatMul"):
            return None
        if node.input[0] != current or len(node.output) != 1:
            raise self._error(node, f"reads {node.input[0]!r}, not the tensor the step before wrote ({current!r})")
        weight = self._take(node.input[1], node, (2,))
        if node.op_type == "Gemm":
            for name, allowed in (("alpha", (1.0,)), ("beta", (1.0,)), ("transA", (0,)), ("transB", (0, 1))):
                if self._attribute(node, name, allowed[0]) not in allowed:
                    raise self._error(node, f"{name}={self._attribute(node, name, None)}; gpubp represents Gemm "
                                            "with alpha = beta = 1 and an untransposed input")
            if self._attribute(node, "transB", 0):
                weight = weight.T
            bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
            output, end = node.output[0], position + 1
        else:
            following = self.nodes[position + 1] if position + 1 < len(self.nodes) else None
            bias_name = None
            output, end = node.output[0], position + 1
            if following is not None and following.op_type == "Add" and node.output[0] in following.input:
                others = [name for name in following.input if name != node.output[0]]
                if len(others) != 1:
                    raise self._error(following, "adds the layer's output to itself, where gpubp needs a bias")
                bias_name, output, end = others[0], following.output[0], position + 2
        if bias_name is None:
            bias = np.zeros(weight.shape[1], weight.dtype)
        else:
            bias = self._take(bias_name, node, (1, 2))
            if bias.shape not in ((weight.shape[1],), (1, weight.shape[1])):
                raise self._error(node, f"the bias {bias_name!r} has shape {bias.shape}, expected "
                                        f"({weight.shape[1]},) for {weight.shape[1]} outputs")
            bias = bias.reshape(-1)
        return np.ascontiguousarray(weight), bias, (node.input[1], bias_name), output, end

    def _bf16_rounding(self, position: int, current: str) -> tuple[tuple[int, ...], str, int] | None:
        """(the types, the last Cast's output, the position after it) for the Casts of one of BF16_CASTS
        that start at ``position`` and read ``current``; None when the nodes there are not such Casts."""
        for types in BF16_CASTS.values():
            casts, x = self.nodes[position:position + len(types)], current
            for node, to in zip(casts, types):
                if (node.op_type != "Cast" or list(node.input) != [x] or len(node.output) != 1
                        or self._attribute(node, "to", None) != to):
                    break
                x = node.output[0]
            else:
                if len(casts) == len(types):
                    return types, x, position + len(types)
        return None

    def _passes_through(self, node, current: str) -> bool:
        """An Identity, or a Dropout as inference runs it (training_mode absent or a constant false), reading
        ``current``. A Dropout's mask, where it writes one, no step reads: each reads the step before's output."""
        if node.input[0] != current:
            return False
        if node.op_type == "Dropout":
            ratio, training = (*node.input[1:], "", "")[:2]  # optional inputs: absent, or named ""
            if ratio:
                self._take(ratio, node, (0,))  # which inference ignores
            if training and self._take(training, node, (0,)):
                raise self._error(node, "a Dropout in training mode (its training_mode input is true), which drops "
                                        "at random; gpubp reads inference Dropout only")
        return True

    def _activation(self, position: int, current: str) -> tuple[str, str, int]:
        """(activation, its output, the position after it) for the activation that starts at ``position``."""
        node = self.nodes[position]
        if node.input[0] != current and not (node.op_type in COMMUTATIVE and current in node.input):
            if current in node.input:  # 1 - p, say: the output below is not this step's first operand
                raise self._error(node, f"reads the tensor the step before wrote ({current!r}) as its input "
                                        f"{list(node.input).index(current) + 1} of {len(node.input)}, not its "
                                        "first: not an activation gpubp can represent")
            raise self._error(node, f"reads {list(node.input)}, not the tensor the step before wrote ({current!r})")
        # the formulas before the single operators: silu's starts with a Sigmoid
        formulas = [(act, chain) for act, steps in FORMULAS.items() for chain in (steps, *READ_ALSO.get(act, ()))]
        for act, chain in formulas + list(FLOAT64_FORMULAS.items()):
            output = self._formula(position, current, chain)
            if output is not None:
                return act, output, position + len(chain)
        single = {op: act for act, (op, _) in SINGLE_OPS.items()}
        if node.op_type in single and len(node.input) == 1:
            act = single[node.op_type]
            if act == "leaky_relu":
                alpha = self._attribute(node, "alpha", 0.01)
                if not math.isclose(alpha, activations.LEAKY_SLOPE, rel_tol=CONSTANT_RTOL):
                    raise self._error(node, f"alpha={alpha}; gpubp's leaky_relu has the slope "
                                            f"{activations.LEAKY_SLOPE}")
            if act == "softmax" and self._attribute(node, "axis", -1 if self.opset >= 13 else 1) not in (-1, 1):
                raise self._error(node, "a softmax over another axis than the last")
            return act, node.output[0], position + 1
        if node.op_type == "Gelu" and len(node.input) == 1:
            approximate = self._attribute(node, "approximate", b"none")
            approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
            if approximate not in ("none", "tanh"):
                raise self._error(node, f"approximate={approximate!r}, expected 'none' or 'tanh'")
            return ("gelu" if approximate == "none" else "gelu_tanh"), node.output[0], position + 1
        raise self._error(node, "not a linear layer or an activation gpubp can represent (Gemm, MatMul with Add, "
                                "Relu, LeakyRelu or Max(x, 0.01 x), Sigmoid, Tanh, Gelu or its formulas, "
                                "x * Sigmoid(x), Softmax, Identity, Dropout, a Cast to bfloat16 and back before a "
                                "linear layer)")

    def _formula(self, position: int, x: str, steps) -> str | None:
        """The output of ``steps`` applied to ``x`` when the nodes from ``position`` on are those steps, else None."""
        nodes = self.nodes[position:position + len(steps)]
        if len(nodes) < len(steps):
            return None
        prev, constants, element = None, [], self.element
        for node, step in zip(nodes, steps):
            op, operands, attributes = _step(step)
            if (node.op_type != op or len(node.input) != len(operands) or len(node.output) != 1
                    or any(self._attribute(node, name, None) != value for name, value in attributes.items())):
                return None
            orders = [list(node.input), list(reversed(node.input))] if op in COMMUTATIVE else [list(node.input)]
            matched = next((order for order in orders
                            if all(self._operand_is(node, name, operand, x, prev, element)
                                   for name, operand in zip(order, operands))), None)
            if matched is None:
                return None
            constants += [name for name, operand in zip(matched, operands) if operand not in ("x", "prev")]
            element = attributes.get("to", element)  # a Cast's output is of the type it casts to
            prev = node.output[0]
        if element != self.element:  # a Cast back to another type than the graph's
            return None
        self.used.update(constants)
        return prev

    def _operand_is(self, node, name: str, operand, x: str, prev: str | None, element: int) -> bool:
        """Whether ``node``'s input ``name`` is the step's ``operand``; a constant of that value must be of
        ``element``, the type of the tensor it meets, as ONNX requires (onnx.checker does not look), but
        for Pow's exponent, whose type ONNX leaves free (its T1: an int64 3 is as valid as a float 3)."""
        if operand == "x":
            return name == x
        if operand == "prev":
            return name == prev
        value = self.constants.get(name)
        if value is None or value.size != 1 or not math.isclose(float(value.reshape(())), operand,
                                                                 rel_tol=CONSTANT_RTOL):
            return False
        if node.op_type == "Pow" and name == node.input[1]:
            return True
        found = helper.np_dtype_to_tensor_dtype(value.dtype)
        if found != element:
            raise self._error(node, f"the constant {name!r} is of type {_type_name(found)}, expected "
                                    f"{_type_name(element)}, the type of the tensor it meets")
        return True

    # ------------------------------------------------------------------------- types

    def precision(self, layers, dtype: np.dtype) -> str:
        """"bf16" where every layer's input is cast to bfloat16 and back (``BF16_CASTS`` of the weights'
        type) and its weights are bfloat16 values, as predict rounds them; "fp32" where no input is cast."""
        casts = {layer[3] for layer in layers}
        if casts == {None}:
            return "fp32"
        expected = BF16_CASTS[ELEMENT_TYPES[np.dtype(dtype)]]
        if casts != {expected}:
            found = sorted(f"cast {' -> '.join(map(_type_name, types))}" if types else "not cast" for types in casts)
            raise ValueError(f"{self.path}: the linear layers' inputs are {' or '.join(found)}; gpubp represents "
                             f"each cast {' -> '.join(map(_type_name, expected))} (a bf16 model), or none")
        for i, (weight, *_rest) in enumerate(layers):
            if not np.array_equal(round_bf16(weight), weight):
                raise ValueError(f"{self.path}: layer {i} rounds its input to bfloat16 but its weight holds other "
                                 "values; gpubp's bf16 precision rounds both")
        return "bf16"

    def check_types(self, dtype: np.dtype, in_features: int, out_features: int) -> None:
        """The graph's input and output: (batch, features) tensors of the weights' float type."""
        element = ELEMENT_TYPES[np.dtype(dtype)]
        for role, value, features in (("input", self.input, in_features), ("output", self.output, out_features)):
            tensor = value.type.tensor_type
            if not value.type.HasField("tensor_type") or tensor.elem_type != element:
                found = _type_name(tensor.elem_type) if value.type.HasField("tensor_type") else "?"
                raise ValueError(f"{self.path}: the graph's {role} {value.name!r} is of type {found}, expected "
                                 f"{_type_name(element)}, the weights' type")
            if not tensor.HasField("shape"):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
            if len(dims) != 2 or dims[1] not in (None, features):
                raise ValueError(f"{self.path}: the graph's {role} {value.name!r} has the shape {dims}, expected "
                                 f"(batch, {features})")
