"""Activation registry: names, kernel ids, and the NumPy reference forward/derivative.

Every backend accepts the same nine names (``NAMES``). The GPU kernels select an
elementwise activation by its integer id (``ACT_ID``) at compile time; the NumPy functions here are the
reference those kernels are tested against.

=============  ===================================  ===============================
name           y = act(z)                           act'(.) computed from
=============  ===================================  ===============================
identity       z                                    (none)
relu           max(z, 0)                            y: 1 if y > 0 else 0
leaky_relu     z if z > 0 else 0.01 z               y: 1 if y > 0 else 0.01
sigmoid        1 / (1 + exp(-z))                    y: y (1 - y)
tanh           tanh(z)                              y: 1 - y^2
gelu           z Phi(z), Phi via erf (exact)        z: Phi(z) + z phi(z)
gelu_tanh      0.5 z (1 + tanh(c (z + a z^3)))      z: see ``_gelu_tanh_grad``
silu           z sigmoid(z) (swish)                 z: s (1 + z (1 - s)), s = sigmoid(z)
softmax        exp(z_c) / sum_k exp(z_k), per row   y: dz = y (dy - sum_k dy_k y_k)
=============  ===================================  ===============================

softmax is not elementwise: it normalises each row, so its backward is the
Jacobian-vector product above rather than ``dy * act'``. It is an output activation
(``OUTPUT_ONLY``): a model may use it on its last layer only. The GPU kernels know the
eight elementwise activations (``ACTIVATIONS``); the backends run softmax as an identity
dense layer followed by their row-wise ``softmax_`` (and ``softmax_backward``).

Only gelu, gelu_tanh and silu need the pre-activation ``z`` in backward (``NEEDS_Z``);
the others derive their derivative from the output ``y``, so ``z`` is never stored.

>>> import numpy as np
>>> z = np.array([-1e4, -1.0, 0.0, 2.0, 1e4], dtype=np.float32)
>>> y = np.empty_like(z); forward("sigmoid", z, y); y.tolist()
[0.0, 0.2689414322376251, 0.5, 0.8807970285415649, 1.0]
"""

from __future__ import annotations

import math

import numpy as np

from gpubp import _special

ACTIVATIONS = ("identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu")
ACT_ID = {name: i for i, name in enumerate(ACTIVATIONS)}
OUTPUT_ONLY = ("softmax",)
# Output activations that give probabilities: the classification losses take their layer's logits
# (losses.FUSED_ACTIVATION), and nothing may stand above such an output layer.
PROBABILITY_HEADS = ("sigmoid", "softmax")
NAMES = ACTIVATIONS + OUTPUT_ONLY
NEEDS_Z = frozenset({"gelu", "gelu_tanh", "silu"})
RELU_FAMILY = frozenset({"relu", "leaky_relu"})
LEAKY_SLOPE = 0.01
GELU_TANH_C = math.sqrt(2.0 / math.pi)
GELU_TANH_A = 0.044715
# Past |z| = GELU_SATURATION gelu and gelu_tanh have reached their limits exactly, in float32
# and in float64: exp(-z^2 / 2) underflows to 0 (past |z| = 38.6) and tanh(c (z + a z^3)) is
# +-1 (tanh(u) rounds to 1 past u = 9 in float32 and 19.1 in float64; u(40) = 2316). Their
# derivatives and gelu_tanh's tanh argument are computed from z clamped there, which changes
# no result and keeps z^2 finite: unclamped, it overflows float32 past |z| = 1.8e19 and the
# derivative became 0 * inf = NaN.
GELU_SATURATION = 40.0
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_ALIASES = {None: "identity", "linear": "identity", "none": "identity", "swish": "silu"}

# Read-only arrays of one value, keyed by (value, shape, dtype); see ``constant``.
_constants: dict[tuple, np.ndarray] = {}


def canonical(name: str | None, argname: str = "activation") -> str:
    """Return the registered name for ``name`` (``None`` and ``"linear"`` mean identity).

    Raises ``ValueError`` naming ``argname`` for an unknown activation, and ``TypeError`` for
    anything but a str or None (a list of names, say).
    """
    if name is not None and not isinstance(name, str):  # before the lookup: a list is not hashable
        raise TypeError(f"{argname} must be a str or None, got {type(name).__name__} {name!r}")
    if name in _ALIASES:
        return _ALIASES[name]
    if name not in NAMES:
        raise ValueError(f"{argname}: unknown activation {name!r}; expected one of {NAMES}")
    return name


def constant(value: float, shape: tuple, dtype) -> np.ndarray:
    """A read-only C-contiguous array of ``shape`` filled with ``value``, shared between calls.

    NumPy's SIMD loops for ``maximum`` and friends run only when every operand is a
    contiguous array; a Python scalar operand (stride 0) falls back to a loop about four
    times slower, so ``np.maximum(z, constant(0, z.shape, z.dtype))`` beats ``np.maximum(z, 0)``
    even though it reads one more array. Holds at most 32 arrays (emptied when full).
    """
    key = (value, shape, dtype)
    array = _constants.get(key)
    if array is None:
        if len(_constants) >= 32:
            _constants.clear()
        array = _constants[key] = np.full(shape, value, dtype)
        array.flags.writeable = False
    return array


def forward(name: str, z: np.ndarray, out: np.ndarray) -> None:
    """Write ``act(z)`` into ``out``; ``out`` may be ``z`` itself except for ``NEEDS_Z``'s."""
    if name == "identity":
        if out is not z:
            np.copyto(out, z)
    elif name == "relu":
        np.maximum(z, constant(0, z.shape, z.dtype), out=out)
    elif name == "leaky_relu":
        # max(z, slope*z) is z for z > 0 and slope*z otherwise, since 0 < slope < 1.
        np.maximum(z, z * z.dtype.type(LEAKY_SLOPE), out=out)
    elif name == "sigmoid":
        _special.expit(z, out=out)
    elif name == "tanh":
        np.tanh(z, out=out)
    elif name == "gelu":
        # Halving before the multiply by z keeps z Phi(z) finite up to the largest float.
        np.multiply(z, _INV_SQRT2, out=out)
        _special.erf(out, out=out)
        out += 1
        out *= 0.5
        out *= z
    elif name == "gelu_tanh":
        clamped = _saturate(z)
        np.multiply(clamped, clamped, out=out)
        out *= GELU_TANH_A * GELU_TANH_C
        out += GELU_TANH_C
        out *= clamped
        np.tanh(out, out=out)
        out += 1
        out *= 0.5
        out *= z
    elif name == "silu":
        _special.expit(z, out=out)  # exp(-|z|) inside: 0 or 1 at |z| = 1e4, so z s is -0.0 or z
        out *= z
    elif name == "softmax":
        # Shifting each row by its max keeps exp() finite for logits of any size.
        np.subtract(z, z.max(axis=1, keepdims=True), out=out)
        np.exp(out, out=out)
        out /= out.sum(axis=1, keepdims=True)
    else:
        raise ValueError(f"activation: unknown activation {name!r}; expected one of {NAMES}")


def backward(name: str, dy: np.ndarray, y: np.ndarray, z: np.ndarray | None, out: np.ndarray) -> None:
    """Write ``dz = dy * act'(.)`` (for softmax, the Jacobian-vector product) into ``out`` (``out`` may be ``dy``)."""
    if name == "identity":
        if out is not dy:
            np.copyto(out, dy)
    elif name == "relu":
        # a select, not dy * (y > 0): an inf or NaN dy where the unit is off gives 0, as in PyTorch
        mask = _on_mask(y)
        if dy.dtype == out.dtype == y.dtype:
            np.bitwise_and(dy.view(mask.dtype), mask, out=out.view(mask.dtype))
        else:  # mixed dtypes (the loss's gradient called on its own, say)
            np.copyto(out, np.where(mask.astype(bool), dy, 0))
    elif name == "leaky_relu":
        # dy times a factor of exactly 1 or the slope, built on the bits: slope ^ ((1 ^ slope) & on)
        one, slope = y.dtype.type(1), y.dtype.type(LEAKY_SLOPE)
        factor = _on_mask(y)
        bits = factor.dtype.type
        np.bitwise_and(factor, bits(one.view(bits) ^ slope.view(bits)), out=factor)
        np.bitwise_xor(factor, slope.view(bits), out=factor)
        np.multiply(dy, factor.view(y.dtype), out=out)
    elif name == "sigmoid":
        grad = np.subtract(1, y, dtype=y.dtype)
        grad *= y
        np.multiply(dy, grad, out=out)
    elif name == "tanh":
        grad = np.multiply(y, y)
        np.subtract(1, grad, out=grad)
        np.multiply(dy, grad, out=out)
    elif name == "gelu":
        np.multiply(dy, _gelu_grad(z), out=out)
    elif name == "gelu_tanh":
        np.multiply(dy, _gelu_tanh_grad(z), out=out)
    elif name == "silu":
        np.multiply(dy, _silu_grad(z), out=out)
    elif name == "softmax":
        # The Jacobian of row softmax is diag(y) - y y^T, so J^T dy = y * (dy - <dy, y>).
        dot = np.einsum("ij,ij->i", dy, y)[:, None]
        np.subtract(dy, dot, out=out)
        out *= y
    else:
        raise ValueError(f"activation: unknown activation {name!r}; expected one of {NAMES}")


def _on_mask(y: np.ndarray) -> np.ndarray:
    """Unsigned ints of ``y``'s width: all ones where ``y > 0`` (the unit is on), else 0.

    relu's and leaky_relu's derivatives select with it on the bits: a masked copy or
    ``np.where`` branches per element, and the on/off pattern of a layer's units is random
    enough that the mispredictions make those about ten times slower than a few streaming
    passes over the bits."""
    mask = np.greater(y, 0).astype(f"u{y.dtype.itemsize}")
    np.negative(mask, out=mask)  # 1 -> all ones
    return mask


def _saturate(z: np.ndarray) -> np.ndarray:
    """z clamped to [-GELU_SATURATION, GELU_SATURATION], a new array; NaN stays NaN."""
    return np.clip(z, -GELU_SATURATION, GELU_SATURATION)


def _gelu_grad(z: np.ndarray) -> np.ndarray:
    # d/dz [z Phi(z)] = Phi(z) + z phi(z)
    z = _saturate(z)
    grad = np.multiply(z, z)
    grad *= -0.5
    np.exp(grad, out=grad)
    grad *= z
    grad *= _INV_SQRT_2PI
    phi = np.multiply(z, _INV_SQRT2, out=z)  # the clamped copy is not read again
    _special.erf(phi, out=phi)
    phi += 1
    phi *= 0.5
    grad += phi
    return grad


def _gelu_tanh_grad(z: np.ndarray) -> np.ndarray:
    # y = 0.5 z (1 + t), t = tanh(u), u = c (z + a z^3)
    # dy/dz = 0.5 (1 + t) + 0.5 z (1 - t^2) c (1 + 3 a z^2)
    z = _saturate(z)
    z2 = np.multiply(z, z)
    t = z2 * (GELU_TANH_A * GELU_TANH_C)
    t += GELU_TANH_C
    t *= z
    np.tanh(t, out=t)
    du = z2
    du *= 3 * GELU_TANH_A * GELU_TANH_C
    du += GELU_TANH_C
    du *= z
    sech2 = np.multiply(t, t, out=z)  # the clamped copy is not read again
    np.subtract(1, sech2, out=sech2)
    du *= sech2
    du *= 0.5
    t += 1
    t *= 0.5
    du += t
    return du


def _silu_grad(z: np.ndarray) -> np.ndarray:
    # d/dz [z s(z)] = s + z s (1 - s) = s (1 + z (1 - s)); s is exactly 0 or 1 far out, so the
    # product stays finite (0 for a large negative z, 1 for a large positive one).
    s = _special.expit(z)
    grad = np.subtract(1, s, dtype=s.dtype)
    grad *= z
    grad += 1
    grad *= s
    return grad
