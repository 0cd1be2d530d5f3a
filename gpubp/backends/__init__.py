"""Backends: one module per kernel family, all implementing the same contract.

A backend is a module exposing exactly these functions (same names, same argument
order in ``numpy_backend.py``, ``cupy_backend.py`` and ``numba_backend.py``, so the
three read side by side). Arrays are the backend's own array type; shapes are
row-major and C-contiguous; the GPU backends compute in float32 only. Every function
checks its operands' shapes against each other (``_contract``: an ``out`` buffer, a
gradient, a label vector of another shape is a ValueError naming it) before it launches
anything, since the kernels index flat memory.

Array helpers
    ``empty(shape, dtype)``, ``zeros(shape, dtype)``
    ``asarray(a, dtype=None)``   host NumPy array (or the backend's own array) -> backend array
    ``to_host(a)``               backend array -> NumPy array (a copy where the data is on a GPU)
    ``synchronize()``            wait for all queued kernels
    ``is_array(a)``              True if ``a`` is an array this backend computes on
    ``sumsq(*arrays)``           float: sum of squares of every element of ``arrays`` (gradient
                                 clipping passes all of a model's gradients at once). Records ``sumsq``
                                 per launch: per array, or once (cupy).
    ``scale_(a, s)``             ``a *= s`` in place. Records ``scale``.

Module attributes: ``NAME``, ``DEVICE`` ("cpu" or "cuda"), ``DTYPES`` (the float dtypes it
computes in), and ``unavailable_reason()``: None when the backend can run here, else why not
(never raises).

Dense layer
    ``dense_forward(x, w, b, act, out=None, out_z=None, precision="fp32", dropout=None) -> (y, z_or_None)``
        ``z = x @ w + b; y = act(z)`` as one fused kernel. ``x`` (B, in), ``w`` (in, out),
        ``b`` (out,). ``z`` is returned (and stored) only for ``act in NEEDS_Z``
        (gelu, gelu_tanh, silu); otherwise ``None``. ``out`` and ``out_z`` are optional (B, out)
        buffers for ``y`` and ``z``. Records ``dense_fwd`` (after ``round_bf16`` for x and w in "bf16").
        ``precision``: one of ``dense_precisions()``; "tf32" runs the products on TF32 tensor
        cores where a backend has them (cupy, compute capability 8.0+); the NumPy and Numba
        backends compute fp32 for it. "bf16" rounds the products' operands (x, w; in the
        backward dz, x and w) to bf16 once (``round_bf16``) and multiplies them with fp32
        accumulation: on bf16 tensor cores (cupy), emulated by NumPy, fp32 on Numba. ``dropout`` (a ``philox.Mask``): ``y`` is then
        ``act(z) * scale`` where the mask keeps the element and 0 elsewhere; ``z`` stays unmasked.
        A softmax layer takes no mask (ValueError): its gradient would need the unmasked row.
    ``dense_precisions() -> tuple[str, ...]``
        the ``precision`` values ``dense_forward``/``dense_backward`` take on this device.
    ``dense_backward(dy, x, w, y, z, act, need_dx, need_dw, out_dx=None, out_dw=None, out_db=None,
      precision="fp32", dropout=None, need_db=None) -> (dx, dw, db)``
        ``dz = dy * act'(y or z)`` fused into the gradient kernels; ``dx = dz @ w.T``,
        ``dw = x.T @ dz``, ``db = dz.sum(0)`` with db fused into the dW kernel.
        ``need_dw=False``: no dW/db kernel is launched, ``dw``/``db`` are None, unless
        ``need_db`` (a bias that trains under a frozen weight): db alone, from dz, with no dW
        kernel (``dw`` None). With ``need_dw``, db comes with dW unless ``need_db`` is False (a
        frozen bias): NumPy, whose db is a product of its own, then skips it and returns None; a
        backend that sums db in its dW kernel at no extra cost may still write it to ``out_db``.
        ``need_dx=False``: no dX kernel is launched, ``dx`` is None. ``x`` may be None
        when ``need_dw`` is False. ``dy`` is never modified. The ``out_*`` buffers, when
        given, receive the results. Records exactly
        ``backward_kernels(act, need_dx, need_dw, precision, dropout is not None, need_db)``. ``dropout``:
        the mask the forward applied (``y`` holds the masked output); it is regenerated, never read.
    ``backward_kernels(act, need_dx, need_dw, precision="fp32", dropout=False, need_db=None) -> list[str]``
        the names of the kernels ``dense_backward`` launches for these arguments, in order.
    ``dropout_forward(x, dropout, out=None)`` / ``dropout_backward(dy, dropout, out=None)``
        a dropout on its own (on the model's input): the mask of ``dropout`` applied to ``x``,
        and regenerated for ``dy``. Record ``dropout_fwd`` / ``dropout_bwd``.
    ``act="softmax"`` (output layers only) runs as ``act="identity"`` followed by ``softmax_``
    in forward, and ``softmax_backward`` before the identity gradient kernels in backward;
    ``y`` must then be given to ``dense_backward``.
    ``softmax_(y)``
        row softmax of ``y`` (B, C) in place, stable for any magnitude. Records ``softmax_fwd``.
    ``softmax_backward(dy, y, out) -> out``
        the Jacobian-vector product ``out = y * (dy - sum(dy * y, axis=1))``, with ``y`` the
        softmax output; ``out`` may be ``dy``. Records ``softmax_bwd``.
        ``Sequential.backward_plan`` is built from it, so plan and trace agree by construction
        and the trace tests check that the backend really launches what it says.

Losses (each a mean, as in PyTorch and Keras; the gradient returned is that of the mean)
    ``softmax_cross_entropy(logits, labels, sample_weight=None, label_smoothing=0.0) -> (loss: float, dlogits)``
        ``logits`` (B, C) float, ``labels`` (B,) int32/int64 in [0, C). Mean over the batch.
        Softmax, loss and gradient fused in one pass per row. ``label_smoothing`` eps in [0, 1)
        (checked by ``gpubp.losses``): each row's target is (1 - eps) onehot + eps / C, its loss
        logsumexp(z) - (1 - eps) z[label] - eps / C sum(z), dlogits (softmax(z) - target) / B;
        eps = 0 gives exactly the one-hot results. Records ``ce_fwd_bwd``.
    ``mse(pred, target, sample_weight=None) -> (loss, dpred)``     mean over all elements.
        Records ``mse_fwd_bwd``.
    ``mae(pred, target, sample_weight=None) -> (loss, dpred)``     mean of |pred - target| over all
        elements; dpred = sign(pred - target) / n (0 where equal). Records ``mae_fwd_bwd``.
    ``huber(pred, target, sample_weight=None, delta=1.0) -> (loss, dpred)`` mean over all
        elements of c (d - c/2), d = pred - target, c = clip(d, -delta, delta); dpred = c / n.
        Records ``huber_fwd_bwd``.
    ``bce(logits, target, sample_weight=None) -> (loss, dlogits)`` binary cross-entropy on
        logits, mean over all elements, stable for any logit. Records ``bce_fwd_bwd``.
    ``poisson(log_rate, target, sample_weight=None) -> (loss, dlog_rate)`` Poisson negative
        log-likelihood on log rates z, mean over all elements of exp(z) - t z; dz = (exp(z) - t) / n.
        Records ``poisson_fwd_bwd``.
    ``sample_weight``: None, or (B,) float weights >= 0 (checked by ``gpubp.losses``): each
        row's loss terms and gradient are multiplied by its weight, and the sum is divided by
        the same count as unweighted (Keras's ``sample_weight``), in the same kernel.

Optimizer updates (fused, in place, one launch per parameter)
    ``sgd_update(param, grad, velocity, lr, momentum, nesterov, weight_decay)``
        ``g = grad + weight_decay * param``; with momentum: ``v = momentum * v + g`` and the
        step is ``g + momentum * v`` (Nesterov) or ``v``; without: the step is ``g`` and
        ``velocity`` is None. ``param -= lr * step``. PyTorch's SGD semantics. Records ``sgd_update``.
    ``adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, decoupled)``
        ``step`` counts from 1. ``decoupled=False`` (Adam): ``g = grad + weight_decay * param``.
        ``decoupled=True`` (AdamW): ``param *= 1 - lr * weight_decay`` first, ``g = grad``.
        ``m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
        param -= lr * (m / (1-b1^step)) / (sqrt(v / (1-b2^step)) + eps)``. PyTorch's semantics.
        Records ``adam_update``.
    ``rmsprop_update(param, grad, square_avg, grad_avg, momentum_buffer, lr, alpha, eps,
    weight_decay, momentum, centered)``
        ``g = grad + weight_decay * param; square_avg = alpha square_avg + (1-alpha) g^2``;
        ``centered``: ``grad_avg = alpha grad_avg + (1-alpha) g`` and
        ``avg = sqrt(square_avg - grad_avg^2) + eps``, else ``avg = sqrt(square_avg) + eps``
        and ``grad_avg`` is None; with momentum: ``momentum_buffer = momentum momentum_buffer
        + g / avg; param -= lr * momentum_buffer``; without: ``param -= lr * g / avg`` and
        ``momentum_buffer`` is None. PyTorch's RMSprop semantics. Records ``rmsprop_update``.

Optional capability: the fused MLP (the cupy backend; the others do not have it)
    A backend with ``FUSED_MLP_MAX_WIDTH`` (and ``FUSED_MLP_MAX_LAYERS``) runs a whole model
    whose layers are all at most that many outputs wide through three functions;
    ``Sequential`` looks for the attribute, never at the backend's name.
    ``fused_mlp_forward(x, weights, biases, acts, keep_input, keep_output) -> (y, inputs, act_inputs)``
        every layer in one launch; per layer, ``keep_input`` keeps its input (for dW) and
        ``keep_output`` what act' reads (the output, or z for gelu, gelu_tanh, silu); the kept arrays
        come back per layer, None where not kept. Records ``fused_mlp_fwd`` (and
        ``softmax_fwd`` for a softmax head).
    ``fused_mlp_backward(dy, weights, acts, inputs, act_inputs, need_dx, need_dw, out_dw, out_db,
      precision="fp32", need_db=None) -> dx``
        ``need_dx``/``need_dw`` (and ``need_db``) per layer as for ``dense_backward``; fills
        ``out_dw[l]``, ``out_db[l]`` of layers with ``need_dw[l]``, and ``out_db[l]`` alone of
        those with ``need_db[l]`` only; returns dX of the input when ``need_dx[0]``, else None.
        Records exactly ``fused_backward_kernels(acts[-1], need_dw, need_db)``: ``fused_mlp_bwd``
        (the dX chain), ``fused_mlp_dw`` (every dW/db) when any weight trains, and a db pass
        per bias that trains alone.
    ``fused_precisions()`` the ``precision`` values both take on this device, for inputs of
        up to ``FUSED_MLP_MAX_WIDTH`` features ("tf32" and "bf16" on tensor cores where the GPU
        has them; each where its kernels fit the GPU's shared memory per block).
    ``why_not_fused_here(precision, in_features) -> str | None`` (optional)
        why this device cannot run the fused kernels for such a model (tensor cores, shared
        memory per block), or None; ``Sequential.why_not_fused`` reports it.
    ``why_not_precision(precision, fused) -> str`` (optional)
        why ``precision`` is missing from ``fused_precisions()`` (``dense_precisions()``), for errors.

Optional capability: CUDA graphs (the cupy backend; the others do not have it)
    A backend with ``capture`` lets ``gpubp.step.TrainStep`` record a whole training step once
    and replay it; ``TrainStep`` looks for the attribute, never at the backend's name.
    ``capture(fn) -> graph``
        runs ``fn()`` with its kernel launches recorded, not run; ``graph.launch()`` replays
        them on the current stream. The graph keeps every array its kernels touch alive.
        ``fn`` may launch kernels and allocate, nothing else: no copy between host and device,
        no synchronization, and no kernel's first launch (warm up first).
    ``copy_into(dst, src)``        ``dst[...] = src`` from a host or device array, on the current stream.
    ``clip_(arrays, max_norm, norm_sq, guard)``  the gradient clipping of ``gpubp.optim.clip_grad_norm``
        on the device, the same bits: ``norm_sq`` (a (1,) float32 array) receives the sum of
        squares, and the arrays are scaled unless ``guard``'s loss is not finite. Records
        ``sumsq`` and ``scale``.
    ``softmax_cross_entropy``, ``mse``, ``mae``, ``huber``, ``bce`` and ``poisson`` take ``out_loss`` (a keyword): a
        (1,) float32 array that receives the loss, which is then returned in place of the float
        (nothing is read back).
    ``sgd_update``/``adam_update``/``rmsprop_update`` take ``hyper`` and ``guard``: with
        ``hyper``, a (1,) (SGD, RMSprop: lr) or (3,) (Adam: lr, step_size, inv_sqrt_bias2)
        float32 array that ``sgd_hyper(lr)`` / ``adam_hyper(lr, beta1, beta2, step)`` /
        ``rmsprop_hyper(lr)`` fill, the kernel reads those at run time (``lr`` and ``step`` are
        then None); ``guard``, the (1,) loss array, skips the update when the loss is not finite.

Optional capability: act' in the dX epilogue (the cupy and numba backends; numpy does not have it)
    A backend with ``FOLDS_DX_ACT`` (the set of activations it does this for; every one on both GPU
    backends) takes more keywords in ``dense_backward``: ``dx_act`` (default "identity"), one of
    them, and ``dx_act_in``, the activation of the layer below and what its act' reads (its
    output, or its z for ``NEEDS_Z``'s). The dX kernel then multiplies dx by that derivative in its epilogue, so dx comes back as the lower layer's dz,
    bit for bit what that layer's own pass would form, and the lower layer's ``dense_backward``
    runs with ``act="identity"``: its dz costs no pass of its own (a tensor-core layer that trains
    still sums db in one). ``dx_dropout``: the ``philox.Mask`` the lower layer's forward applied
    to its output (``dx_act_in`` the masked output); the epilogue regenerates it as that layer's
    ``dropout_dz`` pass would, for identity too, and the lower layer runs unmasked. Records
    nothing more. ``Sequential.folded`` says where it applies (a Dense with one of those
    activations whose output, masked or not, is the input of a Dense that computes dX; not an
    unmasked identity layer), and ``backward_plan`` shows it.

Optional capability: sparse input (the numpy backend; the GPU backends do not have it)
    A backend with ``SPARSE_INPUT`` takes, as ``x`` of ``dense_forward`` and ``dense_backward``,
    a SciPy CSR batch of w's dtype: the forward's product and dW skip its zeros, and dX (which
    reads no x) is as for a dense x. ``multiplies_sparse(x, width) -> bool`` says whether a batch
    into a layer of ``width`` outputs should go sparse (few stored entries, a product large enough
    to pay). ``Sequential.takes_sparse`` hands such a batch to the first layer where it is a Dense;
    every other backend, and every batch turned down, gets it dense. Records the same names.

Optional capability: multi-tensor updates (the cupy backend; the others do not have it)
    A backend with ``MULTI_TENSOR_UPDATES`` updates several tensors in one launch; the
    optimizers look for the attribute and hand it each run of parameters that share a param
    group, a device, a dtype and (Adam) a step count (``Optimizer.batches``).
    ``sgd_update_many(tensors, lr, momentum, nesterov, weight_decay)``,
    ``adam_update_many(tensors, lr, beta1, beta2, eps, weight_decay, step, decoupled)``,
    ``rmsprop_update_many(tensors, lr, alpha, eps, weight_decay, momentum, centered)``
        ``tensors`` a list of the single update's array arguments, one tuple per tensor
        ((param, grad, velocity); (param, grad, m, v); (param, grad, square_avg, grad_avg,
        momentum_buffer)); each tensor ends with the bits its single update gives it. With the
        CUDA-graph capability, ``hyper`` is a (len(tensors), >= width) float32 array whose row t
        tensor t reads, and ``guard`` as for the single updates. Records ``sgd_update_many``,
        ``adam_update_many`` or ``rmsprop_update_many``, once.
    ``scale_many(arrays, s)``  ``scale_(a, s)`` of each array, in one launch. Records ``scale``.

Every kernel launch calls ``gpubp.trace.record(name)`` with the names above.
Layers, losses and optimizers reach arrays only through these functions, never an
array library directly, so one model runs unchanged on every backend.

Choosing a backend
    ``get(name)`` imports and returns a backend module; ``available()`` reports, for each
    backend, whether it can run here and why not; ``resolve(device, backend)`` turns the
    user's ``device=``/``backend=`` (and ``GPUBP_DEVICE``/``GPUBP_BACKEND``) into a backend name.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

log = logging.getLogger("gpubp")

BACKENDS = ("numpy", "cupy", "numba")
# fp32: full-precision products everywhere. tf32: products on TF32 tensor cores where the
# backend has them (inputs rounded to 10 mantissa bits, fp32 accumulation, ~1e-3 relative).
# bf16: products of operands rounded to bfloat16, fp32 accumulation, ~1e-2 relative (fused and
# per-layer kernels on cupy; emulated by the NumPy backend; fp32 on the Numba backend).
PRECISIONS = ("fp32", "tf32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
GPU_BACKENDS = ("cupy", "numba")
INSTALL_HINT = (
    'install CUDA support with  pip install "gpubp[cuda12]"  (CUDA 12 driver) '
    'or  pip install "gpubp[cuda13]"  (CUDA 13 driver)'
)

_modules: dict[str, ModuleType] = {}
_unavailable: dict[str, str] = {}


def get(name: str) -> ModuleType:
    """Return the backend module ``name``, importing it on first use.

    Raises ``RuntimeError`` saying why when the backend cannot run on this machine.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {BACKENDS}")
    if name in _modules:
        return _modules[name]
    if name in _unavailable:
        raise RuntimeError(f"backend {name!r} is not available: {_unavailable[name]}")
    try:
        module = importlib.import_module(f"gpubp.backends.{name}_backend")
        reason = module.unavailable_reason()
    except ImportError as exc:
        reason = f"{exc}; {INSTALL_HINT}"
    if reason:
        _unavailable[name] = reason
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    _modules[name] = module
    return module


def computes_in(name: str, dtype) -> bool:
    """Whether backend ``name`` (one :func:`resolve` gave, so loaded) computes in the NumPy dtype
    ``dtype``: one of its ``DTYPES``."""
    return dtype in get(name).DTYPES


def available() -> dict[str, str | None]:
    """For each backend, None if it runs here, else the reason it does not."""
    status = {}
    for name in BACKENDS:
        try:
            get(name)
            status[name] = None
        except RuntimeError:
            status[name] = _unavailable[name]
    return status


def device_of(backend: str) -> str:
    return "cpu" if backend == "numpy" else "cuda"


def resolve(device: str = "auto", backend: str = "auto") -> str:
    """Pick the backend name for ``device`` and ``backend``.

    An explicit argument wins: ``GPUBP_DEVICE``/``GPUBP_BACKEND`` fill an ``"auto"`` only where
    they agree with the other argument, and one that contradicts an explicit argument is ignored
    (and logged), so ``GPUBP_DEVICE=cuda`` set for a whole run leaves ``backend="numpy"`` working.
    Two explicit arguments that contradict each other raise ``ValueError``, and so do the two
    variables (neither outranks the other). An unknown value raises ``ValueError`` wherever it is from.
    ``"auto"`` picks cupy when CuPy sees a GPU, else numpy, and logs the choice once.
    ``device="cuda"`` with no usable GPU backend raises ``RuntimeError`` with the
    install hint. The CPU path never imports CuPy or Numba.
    """
    device_from_env = backend_from_env = False
    if device == "auto":
        device = os.environ.get("GPUBP_DEVICE", "auto") or "auto"
        device_from_env = device != "auto"
    if backend == "auto":
        backend = os.environ.get("GPUBP_BACKEND", "auto") or "auto"
        backend_from_env = backend != "auto"
    if device not in DEVICES:
        raise ValueError(f"device: expected one of {DEVICES}, got {device!r}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend != "auto" and device != "auto" and device != device_of(backend):
        if device_from_env and backend_from_env:
            raise ValueError(
                f"GPUBP_BACKEND={backend!r} runs on device {device_of(backend)!r}, "
                f"but GPUBP_DEVICE={device!r} asks for another; unset one of them"
            )
        if device_from_env:
            log.info("gpubp: GPUBP_DEVICE=%r ignored: backend=%r runs on device %r", device, backend,
                     device_of(backend))
            device = "auto"
        elif backend_from_env:
            log.info("gpubp: GPUBP_BACKEND=%r ignored: it runs on device %r, device=%r was asked for",
                     backend, device_of(backend), device)
            backend = "auto"

    if backend != "auto":
        if device != "auto" and device != device_of(backend):
            raise ValueError(
                f"backend: {backend!r} runs on device {device_of(backend)!r}, "
                f"but device={device!r} was asked for"
            )
        get(backend)
        return backend
    if device == "cpu":
        return "numpy"
    candidates = ("cupy", "numba") if device == "cuda" else ("cupy",)
    reasons = []
    for name in candidates:
        try:
            get(name)
        except RuntimeError as exc:
            reasons.append(str(exc).replace(f"; {INSTALL_HINT}", ""))  # said once, at the end
            continue
        if device == "auto":
            log.info("gpubp: device='auto' chose the GPU (backend %r)", name)
        return name
    if device == "cuda":
        raise RuntimeError(
            "device='cuda' was asked for, but no CUDA GPU backend can run here ("
            + "; ".join(reasons) + f"). To {INSTALL_HINT}; or use device='cpu'."
        )
    log.info("gpubp: device='auto' chose the CPU (backend 'numpy'); no GPU backend: %s", "; ".join(reasons))
    return "numpy"


def for_array(a) -> ModuleType:
    """The backend that computes on arrays like ``a``: chosen by the array's type, as Chainer's
    ``get_array_module`` does (NumPy -> numpy, CuPy -> cupy, other CUDA arrays -> numba)."""
    from gpubp._checks import array_kind

    kind = array_kind(a)
    return get({"numpy": "numpy", "other": "numpy", "cupy": "cupy", "device": "numba"}[kind])
