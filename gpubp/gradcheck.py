"""Gradient checking: backward against central differences, and the model against PyTorch.

``check_gradients`` runs a float64 NumPy model forward and backward once, then moves
every weight, bias and input element by +-eps and compares ``(L(+eps) - L(-eps)) / 2eps``
with what backward computed. ``compare_with_torch`` builds the equivalent
``torch.nn.Sequential`` and compares outputs, loss and gradients. torch is imported
inside that function only; the library itself never needs it.

Gradients are reported under the names the model files use: ``layers.{i}.weight`` (in, out),
``layers.{i}.bias`` (out,) (``i`` counting Dense layers, as :mod:`gpubp.io` does) and ``input``
(B, in). Frozen parameters get no gradient and are not checked. A model with Dropout layers
is differentiated through the masks of one key: every probe of ``check_gradients`` runs a
training forward that draws its keys from the library's random stream as it stood before the
analytic forward, so all see the same masks.

The objective checked is the one ``fit`` trains. Where the loss applies the last layer's
activation itself (``losses.fuses``: a softmax head with a cross-entropy, a sigmoid head with
``binary_cross_entropy``), the loss is given the logits, which is the loss of the
probabilities, and backward starts from the logits' gradient; the PyTorch twin gives its loss
the logits too. Any other pairing (a sigmoid head with ``mse``) checks the loss of the output.

>>> import numpy as np, gpubp as gb
>>> gb.seed(0)
>>> model = gb.Sequential([gb.Dense(3, 4, "tanh"), gb.Dense(4, 2)], dtype="float64", device="cpu")
>>> x = np.random.default_rng(0).normal(size=(5, 3))
>>> errors = check_gradients(model, x, np.array([0, 1, 1, 0, 1]), loss="cross_entropy")
>>> sorted(errors), max(errors.values()) < 1e-8
(['input', 'layers.0.bias', 'layers.0.weight', 'layers.1.bias', 'layers.1.weight'], True)
"""

from __future__ import annotations

import numpy as np

from gpubp import _checks, _random
from gpubp.batches import loss_and_grad
from gpubp import io as _io
from gpubp import losses as _losses
from gpubp.layers import Dropout, Sequential


def _param_names(model: Sequential) -> list[str]:
    """The model file's name of each of ``model.parameters()``, in order."""
    return _io.tensor_names(model)


def _fuses_head(model: Sequential, loss_fn) -> bool:
    """Whether ``fit`` gives ``loss_fn`` the logits: it applies the last layer's activation itself."""
    return _losses.fuses(loss_fn, model.layers[-1].activation)


def _host(array, backend) -> np.ndarray:
    return np.array(backend.to_host(array), copy=True)


def _dense(x):
    """``x``, a SciPy sparse one as its dense form: what the differences probe and the PyTorch twin
    reads (the model's own forward takes it sparse)."""
    return x.toarray() if _checks.is_sparse(x) else x


def _check_differentiable(model: Sequential) -> None:
    """Raise unless central differences of ``model``'s loss measure its gradient: a float64 model
    on the NumPy backend (float32 differences are too coarse to check anything) that does not round
    its products' operands to bfloat16 (its loss is then a step function of every weight: a probe
    of +-eps mostly lands on the same step, and its difference is 0). tf32 computes fp32 there."""
    if model.backend_name != "numpy" or model.dtype != np.float64:
        raise ValueError(f"model: numerical gradients need a float64 model on the numpy backend, got "
                         f"{model.dtype} on {model.backend_name!r}")
    if model.precision == "bf16":
        raise ValueError("model: precision='bf16' rounds the products' operands to bfloat16, which makes the "
                         "loss piecewise constant and its central differences 0; set model.precision = 'fp32' "
                         "to check the gradients")


def analytic_gradients(model: Sequential, x, target, loss="mse") -> tuple[float, dict[str, np.ndarray]]:
    """One training forward and backward, as ``fit`` runs them: ``(loss, {name: gradient})`` as NumPy copies.

    Only trainable parameters appear, plus ``"input"`` (backward runs with ``need_input_grad=True``).
    A loss that fuses the last layer's activation is given the logits.
    """
    loss_fn = _losses.get(loss)
    out = model.forward(x, training=True, need_input_grad=True, logits=_fuses_head(model, loss_fn))
    value, dout = loss_and_grad(loss_fn, out, target, None, model.backend)
    dx = model.backward(dout, need_input_grad=True)
    grads = {name: _host(p.grad, p.backend) for name, p in zip(_param_names(model), model.parameters())
             if p.trainable}
    grads["input"] = _host(dx, model.backend)
    return value, grads


def numerical_gradients(model: Sequential, x, target, loss="mse", eps: float = 1e-6,
                        random_state: dict | None = None) -> dict[str, np.ndarray]:
    """Central differences of the loss for every trainable parameter element and every input element.

    Needs a float64 model on the NumPy backend in precision "fp32" or "tf32" (float32 differences
    are too coarse to check anything, and bf16's rounding makes them 0). Each parameter is restored
    exactly after its element is probed. ``random_state`` (``gpubp._random.get_state()``): each
    probe runs a training forward whose Dropout keys come from the library's stream restarted at
    that state (the stream is left as it was); without it the probes run inference forwards. A
    loss that fuses the last layer's activation is given the logits.
    """
    _check_differentiable(model)
    loss_fn = _losses.get(loss)
    logits = _fuses_head(model, loss_fn)
    x = np.array(_dense(x), dtype=np.float64, copy=True)

    def loss_at(inputs) -> float:
        if random_state is None:
            return loss_and_grad(loss_fn, model.forward(inputs, training=False, logits=logits), target, None,
                                 model.backend)[0]
        with _random.using(_random.generator_from_state(random_state)):
            return loss_and_grad(loss_fn, model.forward(inputs, training=True, logits=logits), target, None,
                                 model.backend)[0]

    def probe(array: np.ndarray) -> np.ndarray:
        grad = np.zeros_like(array)
        flat, flat_grad = array.reshape(-1), grad.reshape(-1)
        for i in range(flat.size):
            saved = flat[i]
            try:
                flat[i] = saved + eps
                plus = loss_at(x)
                flat[i] = saved - eps
                minus = loss_at(x)
            finally:  # a loss that raises, or a KeyboardInterrupt, leaves the weight as it was too
                flat[i] = saved
            flat_grad[i] = (plus - minus) / (2 * eps)
        return grad

    grads = {name: probe(p.data) for name, p in zip(_param_names(model), model.parameters()) if p.trainable}
    grads["input"] = probe(x)
    return grads


# A central difference subtracts two losses that each carry their float64 rounding, a few ulps
# of the loss that grow with the ops behind it; over 2 eps that is the floor of its error.
ROUNDING_ULPS = 32


def rounding_floor(loss_value: float, eps: float) -> float:
    """The rounding error of a float64 central difference at this loss and step:
    ``ROUNDING_ULPS`` ulps of the loss over ``2 eps``."""
    return ROUNDING_ULPS * float(np.finfo(np.float64).eps) * abs(loss_value) / (2 * eps)


def _within(got: np.ndarray, expected: np.ndarray, rtol: float, atol: float) -> np.ndarray:
    """Where ``expected`` is finite and ``|got - expected| <= atol + rtol * |expected|``, a test
    that NaN fails: a NaN or inf is never within a tolerance, whatever ``>`` would say of it (an
    inf ``expected`` would make its relative tolerance inf)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.isfinite(expected) & (np.abs(got - expected) <= atol + rtol * np.abs(expected))


def _worst(got: np.ndarray, expected: np.ndarray, failed: np.ndarray) -> tuple[int, ...]:
    """The index of the largest error among ``failed`` elements, a non-finite one first."""
    with np.errstate(invalid="ignore", over="ignore"):
        error = np.nan_to_num(np.abs(got - expected), nan=np.inf)
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(np.where(failed, error, -1.0))), error.shape))


def check_gradients(model: Sequential, x, target, loss="mse", eps: float = 1e-6, rtol: float = 1e-5,
                    atol: float | None = None) -> dict[str, float]:
    """Compare backward with central differences; return ``{name: max abs error}``.

    Raises ``AssertionError`` naming the gradient and the worst element where
    ``|analytic - numerical| <= atol + rtol * |numerical|`` does not hold (a NaN or inf gradient
    included). ``atol=None`` is 1e-8 plus ``rounding_floor(loss, eps)``, the rounding the
    differences carry at this loss: a loss in the hundreds puts about 1e-8 of noise on every
    numerical gradient element, which a fixed 1e-8 would report as a wrong gradient wherever an
    element is small. Raises ``ValueError`` for a loss that is not finite at ``x``, whose
    differences check nothing (and would make that atol inf), and, before any work, for a model
    ``numerical_gradients`` cannot difference. Its backward leaves the gradients it checked in the
    parameters' ``.grad``, as a training step's would.
    """
    _checks.positive(eps, "eps")
    _checks.non_negative(rtol, "rtol")
    if atol is not None:
        _checks.non_negative(atol, "atol")
    _check_differentiable(model)
    keys_from = _random.get_state() if any(isinstance(layer, Dropout) for layer in model) else None
    value, analytic = analytic_gradients(model, x, target, loss)
    if not np.isfinite(value):
        raise ValueError(f"loss: its value here is {float(value)}; central differences of a non-finite loss "
                         "check nothing")
    if atol is None:
        atol = 1e-8 + rounding_floor(float(value), eps)
        if not np.isfinite(atol):
            raise ValueError(f"atol: the default, 1e-8 + rounding_floor(loss={float(value)}, eps={eps}), is {atol}; "
                             "pass a larger eps or an atol")
    numerical = numerical_gradients(model, x, target, loss, eps, keys_from)
    errors = {}
    for name, expected in numerical.items():
        got = analytic[name]
        with np.errstate(invalid="ignore", over="ignore"):
            errors[name] = float(np.abs(got - expected).max(initial=0.0))
        failed = ~_within(got, expected, rtol, atol)
        if np.any(failed):
            worst = _worst(got, expected, failed)
            raise AssertionError(
                f"{name}: backward gives {float(got[worst])!r} at {worst}, central differences give "
                f"{float(expected[worst])!r} (max abs error {errors[name]:.3g}, rtol={rtol}, atol={atol})"
            )
    return errors


# ----------------------------------------------------------------------------- PyTorch


def to_torch(model: Sequential):
    """The equivalent ``torch.nn.Sequential`` (nn.Linear + activation modules, nn.Dropout for a
    Dropout), same weights and dtype."""
    import torch

    dtype = torch.float64 if model.dtype == np.float64 else torch.float32
    modules = {
        "identity": torch.nn.Identity,
        "relu": torch.nn.ReLU,
        "leaky_relu": lambda: torch.nn.LeakyReLU(0.01),
        "sigmoid": torch.nn.Sigmoid,
        "tanh": torch.nn.Tanh,
        "gelu": lambda: torch.nn.GELU(approximate="none"),
        "gelu_tanh": lambda: torch.nn.GELU(approximate="tanh"),
        "silu": torch.nn.SiLU,
        "softmax": lambda: torch.nn.Softmax(dim=1),
    }
    stack = []
    for layer in model:
        if isinstance(layer, Dropout):
            stack.append(torch.nn.Dropout(layer.rate))
            continue
        linear = torch.nn.Linear(layer.in_features, layer.out_features, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(_host(layer.weight.data, layer.backend).T.copy()))
            linear.bias.copy_(torch.from_numpy(_host(layer.bias.data, layer.backend)))
        linear.weight.requires_grad_(layer.weight.trainable)
        linear.bias.requires_grad_(layer.bias.trainable)
        stack += [linear, modules[layer.activation]()]
    return torch.nn.Sequential(*stack)


# The loss classes compare_with_torch takes (a loss with options: PyTorch's loss gets them too).
_LOSS_CLASSES = (_losses.Huber, _losses.CrossEntropy, _losses.CategoricalCrossEntropy)


def _torch_loss(loss, out, target):
    import torch
    import torch.nn.functional as F

    name = _losses.base(loss).__name__ if isinstance(loss, _LOSS_CLASSES) else _losses.ALIASES.get(loss, loss)
    options = _losses.options(loss)
    target = np.asarray(target)
    if name == "cross_entropy":
        return F.cross_entropy(out, torch.from_numpy(target.astype(np.int64)),
                               label_smoothing=options.get("label_smoothing", 0.0))
    if name == "categorical_cross_entropy":
        return F.cross_entropy(out, torch.from_numpy(target.astype(np.float64)).to(out.dtype),
                               label_smoothing=options.get("label_smoothing", 0.0))
    target = torch.from_numpy(target.reshape(tuple(out.shape)).astype(np.float64)).to(out.dtype)
    if name == "mse":
        return F.mse_loss(out, target)
    if name == "mae":
        return F.l1_loss(out, target)
    if name == "huber":
        return F.huber_loss(out, target, delta=options.get("delta", 1.0))
    if name == "binary_cross_entropy":
        return F.binary_cross_entropy_with_logits(out, target)
    if name == "poisson":
        return F.poisson_nll_loss(out, target, log_input=True, full=False)
    raise ValueError(f"loss: compare_with_torch knows {sorted(_losses.LOSSES)}, got {name!r}")


# compare_with_torch's default tolerances per dtype: (rtol, atol as a fraction of the largest finite
# |value| PyTorch gives for the quantity compared: the output, the loss, each gradient). Each side
# sums its products in its own order (BLAS blocking), which moves a float32 result by a few ulps of
# the quantity's scale (1.7e-6 on outputs of magnitude 5 in a 64-512-10 relu model, where each side
# is that close to float64): 1e-4 leaves room for wider models and still fails a gradient 1% off.
# An element that a sum cancels to near 0 keeps the error of its terms, hence an atol relative to
# the scale, not to the element. float64 sums agree far below 1e-6.
DEFAULT_TOLERANCES = {np.dtype(np.float32): (1e-4, 1e-4), np.dtype(np.float64): (1e-6, 1e-6)}


def compare_with_torch(model: Sequential, x, target, loss: str | _losses.Huber | _losses.CrossEntropy = "mse",
                       rtol: float | None = None, atol: float | None = None) -> dict[str, float]:
    """Run ``model`` and its PyTorch twin on (x, target); compare outputs, loss and gradients.
    ``loss``: a loss's name, or a ``losses.Huber``, ``losses.CrossEntropy`` or
    ``losses.CategoricalCrossEntropy`` (its options go to PyTorch's loss).

    Returns ``{"output": err, "loss": err, name: err, ...}`` (max abs errors, weight gradients
    compared in our (in, out) layout). The output compared is what ``predict`` returns; a loss
    that fuses the last layer's activation is given the logits on both sides, as ``fit`` does.
    Raises ``AssertionError`` naming the first quantity where ``|gpubp - torch| <= atol + rtol *
    |torch|`` does not hold; a NaN counts as equal only to a NaN of PyTorch's in the same place
    (an inf only to the same inf). ``rtol=None``/``atol=None`` take the model's dtype's
    ``DEFAULT_TOLERANCES``: rtol 1e-4 and an atol of 1e-4 times the largest finite |value| PyTorch
    gives for the quantity compared in float32; 1e-6 and 1e-6 times it in float64. Raises
    ``ValueError`` for a bf16 model, whose rounding the twin does not do.
    """
    default_rtol, default_atol = DEFAULT_TOLERANCES[np.dtype(model.dtype)]
    rtol = default_rtol if rtol is None else _checks.non_negative(rtol, "rtol")
    if atol is not None:
        _checks.non_negative(atol, "atol")
    if model.precision == "bf16":
        raise ValueError("model: precision='bf16' rounds the products' operands to bfloat16, which its PyTorch "
                         "twin does not; set model.precision = 'fp32' to compare them")
    import torch

    if not isinstance(loss, (str, *_LOSS_CLASSES)):
        raise TypeError(f"loss: compare_with_torch needs a loss name, a Huber, a CrossEntropy or a "
                        f"CategoricalCrossEntropy, got {type(loss).__name__}")
    if any(isinstance(layer, Dropout) and layer.rate > 0 for layer in model):
        raise ValueError("model: has a Dropout, and PyTorch would draw masks of its own; compare the layers "
                         "around it with the mask given to both (gpubp.philox.keep_mask)")
    value, ours = analytic_gradients(model, x, target, loss)
    out = model.backend.to_host(model.forward(x, training=False))

    twin = to_torch(model)
    x_torch = torch.from_numpy(np.array(_dense(x), dtype=np.float64)).to(next(twin.parameters()).dtype)
    x_torch.requires_grad_(True)
    if _fuses_head(model, _losses.get(loss)):
        logits = twin[:-1](x_torch)  # twin[-1] is the head's nn.Softmax or nn.Sigmoid
        out_torch = twin[-1](logits)
        loss_torch = _torch_loss(loss, logits, target)
    else:
        out_torch = twin(x_torch)
        loss_torch = _torch_loss(loss, out_torch, target)
    loss_torch.backward()

    theirs = {"output": out_torch.detach().numpy(), "loss": np.array(loss_torch.item()), "input": x_torch.grad.numpy()}
    mine = {"output": out, "loss": np.array(value), **ours}
    # twin.parameters() are the Linears' weight and bias, in the order of model.parameters()
    for name, param, twin_param in zip(_param_names(model), model.parameters(), twin.parameters()):
        if param.trainable:
            grad = twin_param.grad.numpy()
            theirs[name] = grad.T if grad.ndim == 2 else grad  # nn.Linear's weight is (out, in)
    errors = {}
    for name, expected in theirs.items():
        got = np.asarray(mine[name], dtype=np.float64)
        expected = np.asarray(expected, dtype=np.float64)
        if got.shape != expected.shape:
            raise AssertionError(f"{name}: gpubp gives shape {got.shape}, PyTorch {expected.shape}")
        # NaN where PyTorch has NaN, or the same inf, is what PyTorch computes; elsewhere a
        # non-finite value fails (and a finite one against PyTorch's non-finite one).
        same = (got == expected) | (np.isnan(got) & np.isnan(expected))
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.where(same, 0.0, np.abs(got - expected))
        errors[name] = float(diff.max(initial=0.0))
        scale = np.abs(expected[np.isfinite(expected)]).max(initial=0.0)
        tolerance = default_atol * scale if atol is None else atol
        if not np.all(same | _within(got, expected, rtol, tolerance)):
            raise AssertionError(f"{name}: gpubp and PyTorch differ by up to {errors[name]:.3g} "
                                 f"(rtol={rtol}, atol={tolerance:.3g})")
    return errors
