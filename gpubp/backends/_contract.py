"""What the backend contract's functions take (shapes; no mask on a softmax layer), checked
before anything is launched.

The GPU kernels index flat memory with sizes read from some of their operands and trust the
others to match: an ``out`` buffer a row short would be written past its end, a gradient
smaller than its parameter or a label vector shorter than the batch read past theirs. The
layers, losses and optimizers never pass such arrays (they check what users give them), but
the backends are called directly too, by benchmarks, custom layers and the gradient checker,
so every backend checks its operands here, with the same errors. An output buffer that overlaps
an input the call reads after writing that output (``overlap``) is refused too. Each check is one
expression of tuple compares on the arrays' own shapes and, for such an output, a compare of its
memory's bounds with the input's (about 1 us a call); only an operand that fails it goes through
the checks that say what is wrong.
"""
from __future__ import annotations

import math

import numpy as np

from gpubp.activations import ACTIVATIONS, NAMES, NEEDS_Z


# A dropped softmax output still depends on its logit through the row's sum, so its gradient is
# not 0 where the mask is; backward, which sees only the masked output, cannot form it. The torch
# bridge and the backends refuse such a mask (gpubp's Sequential refuses any layer above a
# probability head, for this reason and more).
SOFTMAX_DROPOUT = ("a Dropout after a softmax is not supported: the gradient of a dropped probability needs the "
                   "unmasked row, which backward does not keep; drop before the softmax layer instead")


def _shape(a) -> tuple:
    shape = getattr(a, "shape", None)  # an array's own tuple: np.shape costs a dispatch (~1 us)
    return tuple(np.shape(a) if shape is None else shape)


def require(name: str, a, shape: tuple) -> None:
    """``a`` (None passes) has exactly ``shape``, else a ValueError naming ``name``."""
    if a is not None and getattr(a, "shape", None) != shape and _shape(a) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {_shape(a)}")


def matrix(name: str, a) -> tuple[int, int]:
    """The (rows, columns) of ``a``, which must be 2-D."""
    shape = _shape(a)
    if len(shape) != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {shape}")
    return shape


def present(**operands) -> None:
    """Every array of ``operands`` is given: a GPU backend would read None as a one-element array."""
    for name, a in operands.items():
        if a is None:
            raise ValueError(f"{name}: expected an array, got None")


def batch_rows(name: str, a) -> int:
    """The rows of the 2-D ``a``, at least one (a GPU launch of no blocks is an invalid one)."""
    batch, _ = matrix(name, a)
    if batch == 0:
        raise ValueError(f"{name}: expected at least one row, got shape {_shape(a)}")
    return batch


def some_features(name: str, w) -> None:
    """The weight ``w`` (in, out) of a layer of at least one input and one output feature: a GPU
    launch over no columns is an invalid one, and the dW split divides by the width."""
    if 0 in _shape(w):
        raise ValueError(f"{name}: expected at least one input and one output feature, got shape {_shape(w)}")


def _span(a) -> tuple[int, int] | None:
    """The bytes [first, end) that ``a``'s elements lie within, from its CUDA array interface or
    its host one (an empty array spans nothing); None for what has neither. A contiguous CuPy
    array answers from its pointer and size, without building its interface's dict."""
    pointer = getattr(getattr(a, "data", None), "ptr", None)
    if pointer is not None and a.flags.c_contiguous:
        return (pointer, pointer + a.nbytes) if a.size else (0, 0)
    face = getattr(a, "__cuda_array_interface__", None)
    if face is None:
        face = getattr(a, "__array_interface__", None)
        if face is None:
            return None
    shape, strides = face["shape"], face.get("strides")
    if 0 in shape:
        return 0, 0  # (and its pointer may be 0 or None)
    first = face["data"][0]
    itemsize = np.dtype(face["typestr"]).itemsize
    if strides is None:  # C-contiguous
        return first, first + itemsize * math.prod(shape)
    low = first + sum(stride * (n - 1) for stride, n in zip(strides, shape) if stride < 0)
    high = first + sum(stride * (n - 1) for stride, n in zip(strides, shape) if stride > 0)
    return low, high + itemsize


def overlap(a, b) -> bool:
    """Whether the memory the arrays ``a`` and ``b`` span overlaps: views of one buffer whose
    elements interleave count as overlapping. NumPy arrays take NumPy's own bounds check (a C call,
    no dicts); others, CuPy's and Numba's device arrays, compare their array interfaces' spans."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.may_share_memory(a, b)
    a_span, b_span = _span(a), _span(b)
    return a_span is not None and b_span is not None and a_span[0] < b_span[1] and b_span[0] < a_span[1]


def apart(name: str, a, other: str, b, why: str) -> None:
    """``a`` (None passes) shares no memory with ``b``, else a ValueError naming ``name``."""
    if a is not None and b is not None and overlap(a, b):
        raise ValueError(f"{name}: expected memory apart from {other}'s ({why}), got an array that overlaps it")


# Aliasings every backend refuses: an output over an input of the call. The NumPy backend's
# dense_backward wrote dW into w and then formed dX from it; NumPy's products copy an input
# their output overlaps, so there out=x or out_dx=dy gave what separate buffers give, but a GPU
# kernel's blocks write their output tiles while other blocks still read the input's rows and
# columns (and the dX and dW kernels of one backward run one after the other), so each such
# pair races there. (The weights and bias an output overlaps are left unchecked: a forward
# writing into w is no mistake anyone makes, and each check costs a bounds compare.)
OUT_Z_READ = "the activation reads z while y is written"
W_READ = "dX reads w after dW is written"
INPUT_READ = "the kernels read it while the output is written"


def _over_any(out, *inputs) -> bool:
    """Whether ``out`` overlaps one of ``inputs`` (None entries pass)."""
    return any(a is not None and overlap(out, a) for a in inputs)


def _apart_from_inputs(name: str, out, **inputs) -> None:
    for other, a in inputs.items():
        apart(name, out, other, a, INPUT_READ)


def activation(name: str, act, allowed=NAMES) -> None:
    """``act`` is one of ``allowed`` (the activations' own error wording)."""
    if act not in allowed:
        raise ValueError(f"{name}: unknown activation {act!r}; expected one of {allowed}")


def no_mask_on_softmax(act: str, dropout) -> None:
    """A softmax layer's ``dropout`` is None (``SOFTMAX_DROPOUT``)."""
    if act == "softmax" and dropout is not None:
        raise ValueError(f"dropout: {SOFTMAX_DROPOUT}")


def dense_forward(x, w, b, out=None, out_z=None, act="identity", dropout=None) -> None:
    """x (B, in) with B >= 1, w (in, out) with in, out >= 1, b (out,); ``out`` and ``out_z`` (B,
    out), apart from x, and from each other where ``act`` stores z (``NEEDS_Z``; elsewhere out_z is
    never written); ``act`` one of the activations, and no mask on a softmax layer."""
    try:
        batch, n_in = x.shape
        rows, n_out = w.shape
        if (batch and n_in and n_out and rows == n_in and b.shape == (n_out,) and act in NAMES
                and (out is None or out.shape == (batch, n_out)) and (out_z is None or out_z.shape == (batch, n_out))
                and (dropout is None or act != "softmax")
                and (out_z is None or out is None or act not in NEEDS_Z or not overlap(out, out_z))
                and (out is None or not overlap(out, x)) and (out_z is None or not overlap(out_z, x))):
            return
    except (AttributeError, TypeError, ValueError):  # not an array, or not 2-D: said below
        pass
    _dense_forward_in_full(x, w, b, out, out_z, act, dropout)


def _dense_forward_in_full(x, w, b, out, out_z, act, dropout) -> None:
    present(x=x, w=w, b=b)
    activation("activation", act)
    no_mask_on_softmax(act, dropout)
    batch, n_in = batch_rows("x", x), matrix("x", x)[1]
    rows, n_out = matrix("w", w)
    if rows != n_in:
        raise ValueError(f"w: expected {n_in} rows, one per input feature of x {_shape(x)}, got shape {_shape(w)}")
    some_features("w", w)
    require("b", b, (n_out,))
    require("out", out, (batch, n_out))
    require("out_z", out_z, (batch, n_out))
    if act in NEEDS_Z:
        apart("out_z", out_z, "out", out, OUT_Z_READ)
    _apart_from_inputs("out", out, x=x)
    _apart_from_inputs("out_z", out_z, x=x)


def dense_backward(dy, x, w, y=None, z=None, out_dx=None, out_dw=None, out_db=None, dx_act_in=None, act="identity",
                   need_dw=False, dropout=None, dx_act="identity") -> None:
    """dy (B, out) with B >= 1, w (in, out) with in, out >= 1; x (B, in), given when ``need_dw``;
    what act' reads, given (z for NEEDS_Z's activations, else y, identity neither); y, z (B, out)
    where given; ``out_dx`` and ``dx_act_in`` (B, in), ``dx_act_in`` given for a ``dx_act`` but
    identity; ``out_dw`` (in, out); ``out_db`` (out,); each output apart from the inputs; no mask
    on a softmax layer."""
    try:
        batch, n_out = dy.shape
        n_in, cols = w.shape
        if (batch and n_in and n_out and cols == n_out and act in NAMES and dx_act in ACTIVATIONS
                and (dropout is None or act != "softmax")
                and (x.shape == (batch, n_in) if x is not None else not need_dw)
                and (y.shape == (batch, n_out) if y is not None else act == "identity" or act in NEEDS_Z)
                and (z.shape == (batch, n_out) if z is not None else act not in NEEDS_Z)
                and (dx_act_in.shape == (batch, n_in) if dx_act_in is not None else dx_act == "identity")
                and (out_dx is None or out_dx.shape == (batch, n_in) and not _over_any(out_dx, dy, x, y, z, dx_act_in, w))
                and (out_dw is None or out_dw.shape == (n_in, n_out) and not _over_any(out_dw, w, dy, x))
                and (out_db is None or out_db.shape == (n_out,) and not overlap(out_db, dy))):
            return
    except (AttributeError, TypeError, ValueError):
        pass
    _dense_backward_in_full(dy, x, w, y, z, out_dx, out_dw, out_db, dx_act_in, act, need_dw, dropout, dx_act)


def _dense_backward_in_full(dy, x, w, y, z, out_dx, out_dw, out_db, dx_act_in, act, need_dw, dropout, dx_act) -> None:
    present(dy=dy, w=w)
    activation("activation", act)
    activation("dx_act", dx_act, ACTIVATIONS)
    no_mask_on_softmax(act, dropout)
    if need_dw:
        present(x=x)
    if act in NEEDS_Z:
        present(z=z)
    elif act != "identity":
        present(y=y)
    if dx_act != "identity" and dx_act_in is None:
        raise ValueError(f"dx_act_in: what act' of the layer below reads (its output, or z for "
                         f"{', '.join(sorted(NEEDS_Z))}) is needed for dx_act={dx_act!r}")
    batch, n_out = batch_rows("dy", dy), matrix("dy", dy)[1]
    n_in, cols = matrix("w", w)
    if cols != n_out:
        raise ValueError(f"w: expected {n_out} columns, one per output of dy {_shape(dy)}, got shape {_shape(w)}")
    some_features("w", w)
    require("x", x, (batch, n_in))
    require("y", y, (batch, n_out))
    require("z", z, (batch, n_out))
    require("out_dx", out_dx, (batch, n_in))
    require("dx_act_in", dx_act_in, (batch, n_in))
    require("out_dw", out_dw, (n_in, n_out))
    require("out_db", out_db, (n_out,))
    apart("out_dw", out_dw, "w", w, W_READ)
    _apart_from_inputs("out_dx", out_dx, dy=dy, x=x, y=y, z=z, dx_act_in=dx_act_in, w=w)
    _apart_from_inputs("out_dw", out_dw, dy=dy, x=x)
    _apart_from_inputs("out_db", out_db, dy=dy)


def same(reference: str, a, **others) -> None:
    """Every array of ``others`` (None passes) has the shape of ``a``, named ``reference``."""
    shape = _shape(a)
    for name, other in others.items():
        if other is not None and _shape(other) != shape:
            raise ValueError(f"{name}: expected shape {shape}, that of {reference}, got {_shape(other)}")


def loss(pred_name: str, pred, target, sample_weight=None) -> None:
    """``target`` of ``pred``'s shape; with ``sample_weight``, which is (B,), pred is (B, C), a row per
    sample (an unweighted elementwise loss takes any shape)."""
    try:
        shape = pred.shape
        if target.shape == shape and (sample_weight is None or (len(shape) == 2 and shape[0]
                                                                and sample_weight.shape == (shape[0],))):
            return
    except AttributeError:
        pass
    present(**{pred_name: pred}, target=target)
    same(pred_name, pred, target=target)
    if sample_weight is not None:
        require("sample_weight", sample_weight, (batch_rows(pred_name, pred),))


def labelled_loss(logits, labels, sample_weight=None) -> None:
    """logits (B, C) with B >= 1; labels (B,) of an integer dtype (a TypeError otherwise: a GPU
    kernel would read floats' bits as class indices, or cast them), and ``sample_weight`` (B,).
    The dtype is the array's own (a list's, NumPy's reading of it); its values are not read."""
    try:
        batch, _ = logits.shape
        if (batch and labels.shape == (batch,) and labels.dtype.kind in "iu"
                and (sample_weight is None or sample_weight.shape == (batch,))):
            return
    except (AttributeError, TypeError, ValueError):
        pass
    present(logits=logits, labels=labels)
    batch = batch_rows("logits", logits)
    require("labels", labels, (batch,))
    require("sample_weight", sample_weight, (batch,))
    dtype = getattr(labels, "dtype", None)
    dtype = np.asarray(labels).dtype if dtype is None else np.dtype(dtype)
    if dtype.kind not in "iu":
        raise TypeError(f"labels: expected integer class indices, got dtype {dtype}")


def update(param, grad, needed: tuple = (), **state) -> None:
    """``grad`` and every state array given (None: one the update does not keep) of ``param``'s
    shape, and those named in ``needed`` (what the options chosen read and write: a velocity with
    momentum, Adam's moments, a centered RMSprop's mean gradient) given: a GPU backend would stand
    another array in for None, and the NumPy backend's compiled update the gradient."""
    try:
        shape = param.shape
        if grad.shape == shape:
            for name, a in state.items():
                if a is None:
                    if name in needed:
                        break
                elif a.shape != shape:
                    break
            else:
                return
    except AttributeError:
        pass
    present(param=param, grad=grad, **{name: state[name] for name in needed})
    same("param", param, grad=grad, **state)


# What each update reads and writes (``update``'s ``needed``), by its options.
ADAM_STATE = ("m", "v")


def sgd_state(momentum) -> tuple:
    """The state arrays an SGD update with this momentum reads and writes: the velocity, or none."""
    return ("velocity",) if momentum else ()


def rmsprop_state(momentum, centered) -> tuple:
    """The state arrays an RMSprop update with these options reads and writes."""
    if momentum:
        return ("square_avg", "grad_avg", "momentum_buffer") if centered else ("square_avg", "momentum_buffer")
    return ("square_avg", "grad_avg") if centered else ("square_avg",)


def mlp(x, weights, biases=None, dy=None, inputs=None, act_inputs=None, out_dw=None, out_db=None) -> None:
    """A chain of layers on x (B, in_0) (or, x None, on what ``weights[0]`` takes), B >= 1:
    ``weights[l]`` (in_l, out_l) with in_l the width below, in_l, out_l >= 1; ``biases[l]``,
    ``out_db[l]`` (out_l,); ``out_dw[l]`` (in_l, out_l); ``inputs[l]`` (B, in_l) and
    ``act_inputs[l]`` (B, out_l) where kept; dy (B, out_last) with B >= 1. Entries that are None
    pass (``mlp_backward`` says which a backward needs)."""
    batch, width = ((batch_rows("x", x), matrix("x", x)[1]) if x is not None
                    else (None, matrix("weights[0]", weights[0])[0]))
    if dy is not None:
        batch = batch_rows("dy", dy)
    for layer, w in enumerate(weights):
        rows, n_out = matrix(f"weights[{layer}]", w)
        if rows != width:
            raise ValueError(f"weights[{layer}]: expected {width} rows, the width below it, got shape {_shape(w)}")
        some_features(f"weights[{layer}]", w)
        for name, arrays, shape in (("biases", biases, (n_out,)), ("out_db", out_db, (n_out,)),
                                    ("out_dw", out_dw, (rows, n_out)), ("inputs", inputs, (batch, rows)),
                                    ("act_inputs", act_inputs, (batch, n_out))):
            if arrays is not None:
                require(f"{name}[{layer}]", arrays[layer], shape)
        width = n_out
    if dy is not None:
        require("dy", dy, (batch, width))


def _given(name: str, arrays, layer: int) -> None:
    """``arrays[layer]`` is given (``arrays`` itself may be None: none given)."""
    if arrays is None or arrays[layer] is None:
        raise ValueError(f"{name}[{layer}]: expected an array, got None")


def mlp_backward(acts, need_dx, need_dw, need_db, inputs, act_inputs, out_dw, out_db) -> None:
    """What a fused backward reads and writes is given (a kernel's slot of an absent array gets
    another array, which it would read, or write a dW or db into): for each layer with
    ``need_dw[l]``, ``inputs[l]`` (dW reads it), ``out_dw[l]`` and ``out_db[l]``; for one whose bias
    trains alone (``need_db[l]``), ``out_db[l]``; and from the lowest layer that needs anything up,
    ``act_inputs[l]`` where ``acts[l]`` is not identity (act' reads it; a softmax head's backward
    too). At least one layer needs something. Per layer a few truth tests, no array read."""
    lowest = None
    for layer in range(len(acts)):
        trains = need_dw[layer]
        if trains:
            _given("inputs", inputs, layer)
            _given("out_dw", out_dw, layer)
        if trains or need_db is not None and need_db[layer]:
            _given("out_db", out_db, layer)
            if lowest is None:
                lowest = layer
        elif need_dx[layer] and lowest is None:
            lowest = layer
        if lowest is not None and acts[layer] != "identity":
            _given("act_inputs", act_inputs, layer)
    if lowest is None:
        raise ValueError("need_dx: expected a layer that needs dX, dW or db (need_dx, need_dw, need_db), got none")
