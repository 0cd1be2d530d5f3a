"""Compiled CPU kernels for the NumPy backend: one pass over memory where NumPy needs several.

Loaded by ``numpy_backend`` on first use, only when Numba is installed; without it the
backend runs its pure-NumPy path, which computes the same values up to rounding (the bias
gradient and softmax cross-entropy's row sums add in another order there; the rest is the same
operations in the same order). Each kernel fuses the elementwise work around a matrix product
that NumPy would run as separate passes, each reading and writing the whole array:

- ``bias_act``: ``y = act(y + b)`` in place on the matmul output (NumPy: two passes);
- ``act_grad_sum``: ``dz = dy * act'(y)`` and the column sums of dz (``db``) in one pass
  (NumPy: a boolean temporary, a mixed-type multiply and a separate reduction), without the
  sums for a frozen layer; the sums are taken per fixed chunk of rows and the chunks added in
  order (``add_rows_in_order``), so db is the same whatever the thread count;
- ``bias_act_dropout`` / ``act_grad_sum(..., mask)``: the same two passes with a dropout mask
  generated inside them (``gpubp.philox``), never stored: forward keeps ``act(y + b) * scale``
  or 0, backward regenerates the mask from the key and forms ``dz = dy * scale * act'(.)`` or 0;
  ``apply_mask`` is the mask alone (a dropout on the model's input, its backward, and the
  activations these kernels do not fuse). Each row's mask goes to a row of booleans first
  (``_row_mask``): with Philox inlined and no branch in its loop, LLVM vectorizes the calls
  across groups of columns (0.2 ms for a (1024, 512) mask, against 2.4 ms for the pass that
  applies it, on the 2-core development machine);
- ``sgd_update`` / ``adam_update`` / ``rmsprop_update``: the whole optimizer step per element
  (NumPy: four to twelve passes through temporaries);
- ``shift_by_row_max`` and ``softmax_cross_entropy_grad``: the row max, row sums, loss and
  gradient of softmax cross-entropy around NumPy's vectorized ``exp`` (the kernels' own
  ``exp`` is scalar), for short rows, where NumPy reduces one short row per call;
  ``shift_by_row_max_smoothed`` also takes a label-smoothed target's part of the loss.

Only the activations whose derivative reads ``y`` cheaply are fused here (``ACTS``); the
others keep the NumPy path. Arrays are C-contiguous and of one float dtype; scalars are
passed already cast to that dtype, so the arithmetic runs at the array's precision as
NumPy's does. ``cache=True`` keeps the machine code next to this file (or in Numba's cache
directory), so only the first run on a machine compiles; ``nogil=True`` lets the backend's
worker threads run a kernel on row blocks of a large array in parallel (each kernel is
elementwise along rows, or sums per chunk of rows, for that).
``error_model="numpy"``: a float division follows IEEE 754 instead of checking its divisor
for zero to raise ZeroDivisionError, as Python does. That check keeps LLVM from vectorizing a
loop that divides: Adam's update ran 8x slower with it (no divisor here can be zero: Adam's has
``eps`` added, the cross-entropy's is a row sum that includes exp(0) = 1).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from numba import njit
from numba.core.caching import NullCache
from numba.core.registry import CPUDispatcher

from gpubp import activations, philox
from gpubp.activations import ACT_ID


def _jit(**options):
    """``njit`` with its machine code cached on disk (``cache=True``) where Numba finds a place to
    write it, and compiled in each process where it finds none (a read-only install whose user
    has no writable home or cache directory), where ``cache=True`` alone raises at import."""
    def decorate(fn):
        try:
            return njit(cache=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return njit(**options)(fn)
    return decorate


# activation name -> the code the kernels branch on (a loop invariant, hoisted by LLVM)
ACTS = {name: ACT_ID[name] for name in ("identity", "relu", "leaky_relu")}
_IDENTITY, _RELU = ACT_ID["identity"], ACT_ID["relu"]

_philox = _jit(nogil=True, inline="always")(philox.philox4x32_10)
_GROUP = philox.COLUMNS_PER_CALL
_NO_COUNTER = np.uint64(0)


@_jit(nogil=True, error_model="numpy")
def bias_act(y, b, act, slope):
    """``y[i, j] = act(y[i, j] + b[j])`` in place; y (B, out), b (out,); act a code of ``ACTS``."""
    rows, cols = y.shape
    zero = slope * 0
    for i in range(rows):
        for j in range(cols):
            v = y[i, j] + b[j]
            if act != _IDENTITY and v < 0:
                v = zero if act == _RELU else v * slope
            y[i, j] = v


@_jit(nogil=True, error_model="numpy")
def act_grad_sum(dy, y, act, slope, dz, partials, chunk_rows, mask):
    """``dz = dy * act'(y)``, and the column sums of each ``chunk_rows`` rows of dz into a row of
    ``partials``; dy, y, dz (rows, out), partials (ceil(rows / chunk_rows), out). ``dz`` may be ``dy``.

    db is ``add_rows_in_order(partials)``: the sums depend on the chunk size alone, never on how
    many threads ran row blocks of one call (each block a whole number of chunks).
    ``partials=None`` (a frozen layer, whose dX still needs dz) sums nothing: Numba compiles
    that call separately, with the sums pruned away.

    ``mask``: None, or the dropout mask the forward applied, ``(key, threshold, first_row, scale,
    keep_prob)`` (rows counted from ``first_row``; ``gpubp.philox``): then ``dz = dy * scale *
    act'(y * keep_prob)`` where it kept the element, else 0 (``y`` is the masked output, so
    ``y * keep_prob`` is the activation's own output where kept; identity never reads it). As for
    ``partials``, None compiles a version without the mask."""
    rows, cols = dy.shape
    # dz's type, not slope * 0's float64: a float64 zero widens g where the mask drops, and
    # g * slope would then reach the sums unrounded to dz's precision
    zero = dz.dtype.type(0)
    if mask is not None:
        keep = np.empty(cols, np.bool_)
    for first in range(0, rows, chunk_rows):
        chunk = first // chunk_rows
        if partials is not None:
            partials[chunk, :] = 0
        for i in range(first, min(first + chunk_rows, rows)):
            if mask is not None:
                _row_mask(keep, mask[0], mask[2] + i, mask[1])
            for j in range(cols):
                g = dy[i, j]
                own = y[i, j]
                if mask is not None:
                    g = g * mask[3] if keep[j] else zero
                    own = own * mask[4]
                if act != _IDENTITY and not own > 0:
                    g = zero if act == _RELU else g * slope
                dz[i, j] = g
                if partials is not None:
                    partials[chunk, j] += g


@_jit(nogil=True, error_model="numpy")
def add_rows_in_order(partials, out):
    """``out = partials[0] + partials[1] + ...``, added in that order; partials (n, cols), out (cols,)."""
    out[:] = partials[0]
    for c in range(1, partials.shape[0]):
        for j in range(partials.shape[1]):
            out[j] += partials[c, j]


@_jit(nogil=True, boundscheck=False)
def _row_mask(keep, key, row, threshold):
    """``keep[j]``: whether the mask of ``key`` keeps element ``j`` of global row ``row``; one
    Philox call per group of four columns, into a row buffer the element loops then read (so they
    stay simple loops the compiler vectorizes)."""
    cols = keep.size
    k0, k1, keep_from = np.uint64(key[0]), np.uint64(key[1]), np.uint64(threshold)
    full = cols // _GROUP
    for group in range(full):  # no branch inside: LLVM vectorizes the calls across groups
        w0, w1, w2, w3 = _philox(np.uint64(group), np.uint64(row), _NO_COUNTER, _NO_COUNTER, k0, k1)
        keep[_GROUP * group] = w0 >= keep_from
        keep[_GROUP * group + 1] = w1 >= keep_from
        keep[_GROUP * group + 2] = w2 >= keep_from
        keep[_GROUP * group + 3] = w3 >= keep_from
    if cols % _GROUP:
        words = _philox(np.uint64(full), np.uint64(row), _NO_COUNTER, _NO_COUNTER, k0, k1)
        for j in range(_GROUP * full, cols):
            keep[j] = words[j - _GROUP * full] >= keep_from


@_jit(nogil=True, error_model="numpy")
def bias_act_dropout(y, b, act, slope, key, threshold, first_row, scale):
    """``y[i, j] = act(y[i, j] + b[j]) * scale`` where the mask of ``key`` keeps (i, j), else 0;
    in place, y (B, out), its rows counted from ``first_row`` (``gpubp.philox``)."""
    rows, cols = y.shape
    keep = np.empty(cols, np.bool_)
    zero = slope * 0
    for i in range(rows):
        _row_mask(keep, key, first_row + i, threshold)
        for j in range(cols):
            v = y[i, j] + b[j]
            if act != _IDENTITY and v < 0:
                v = zero if act == _RELU else v * slope
            y[i, j] = v * scale if keep[j] else zero


@_jit(nogil=True, error_model="numpy")
def apply_mask(src, dst, key, threshold, first_row, scale):
    """``dst = src * scale`` where the mask of ``key`` keeps the element, else 0; (B, n) each,
    ``dst`` may be ``src``. A dropout's forward and, on the gradient, its backward."""
    rows, cols = src.shape
    keep = np.empty(cols, np.bool_)
    zero = scale * 0
    for i in range(rows):
        _row_mask(keep, key, first_row + i, threshold)
        for j in range(cols):
            dst[i, j] = src[i, j] * scale if keep[j] else zero


@_jit(nogil=True, error_model="numpy")
def sgd_update(param, grad, velocity, lr, momentum, nesterov, weight_decay):
    """PyTorch's SGD on flat C-contiguous arrays; ``velocity`` is ignored when ``momentum`` is 0."""
    p, g, v = param.reshape(-1), grad.reshape(-1), velocity.reshape(-1)
    for i in range(p.size):
        step = g[i]
        if weight_decay != 0:
            step = p[i] * weight_decay + step
        if momentum != 0:
            vi = v[i] * momentum + step
            v[i] = vi
            step = vi * momentum + step if nesterov else vi
        p[i] += step * -lr


@_jit(nogil=True, error_model="numpy")
def adam_update(param, grad, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, l2, keep, inv_sqrt_bias2,
                step_scale):
    """Adam / AdamW on flat C-contiguous arrays, in the order of operations of the NumPy path.

    ``l2``: weight decay added to the gradient (Adam); ``keep``: ``1 - lr * weight_decay``
    (AdamW, else 1); ``inv_sqrt_bias2``: ``1 / sqrt(1 - beta2**step)``; ``step_scale``:
    ``-lr / (1 - beta1**step)``.
    """
    p, g, mf, vf = param.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1)
    for i in range(p.size):
        pi = p[i] * keep
        gi = pi * l2 + g[i] if l2 != 0 else g[i]  # 0 * p is NaN for an infinite p
        mi = mf[i] * beta1 + gi * one_minus_beta1
        vi = vf[i] * beta2 + gi * one_minus_beta2 * gi  # (1-b2) g first: g * g overflows sooner
        mf[i] = mi
        vf[i] = vi
        p[i] = pi + mi / (np.sqrt(vi) * inv_sqrt_bias2 + eps) * step_scale


@_jit(nogil=True, error_model="numpy")
def rmsprop_update(param, grad, square_avg, grad_avg, momentum_buffer, neg_lr, alpha, one_minus_alpha, eps,
                   weight_decay, momentum, centered):
    """RMSprop on flat C-contiguous arrays, in the order of operations of the NumPy path;
    ``grad_avg`` is ignored unless ``centered``, ``momentum_buffer`` when ``momentum`` is 0."""
    p, g, v = param.reshape(-1), grad.reshape(-1), square_avg.reshape(-1)
    gm, b = grad_avg.reshape(-1), momentum_buffer.reshape(-1)
    for i in range(p.size):
        gi = g[i]
        if weight_decay != 0:
            gi = p[i] * weight_decay + gi
        vi = v[i] * alpha + gi * one_minus_alpha * gi
        v[i] = vi
        if centered:
            gmi = gm[i] * alpha + gi * one_minus_alpha
            gm[i] = gmi
            avg = np.sqrt(vi - gmi * gmi) + eps
        else:
            avg = np.sqrt(vi) + eps
        step = gi / avg
        if momentum != 0:
            step = b[i] * momentum + step
            b[i] = step
        p[i] += step * neg_lr


@_jit(nogil=True, error_model="numpy")
def shift_by_row_max(logits, labels, shifted, picked):
    """``shifted = logits - max over each row``; ``picked[i] = shifted[i, labels[i]]``. Logits (B, C)."""
    rows, cols = logits.shape
    for i in range(rows):
        top = logits[i, 0]
        for j in range(1, cols):
            top = max(top, logits[i, j])
        for j in range(cols):
            shifted[i, j] = logits[i, j] - top
        picked[i] = shifted[i, labels[i]]


@_jit(nogil=True, error_model="numpy")
def shift_by_row_max_smoothed(logits, labels, shifted, picked, keep, off):
    """``shift_by_row_max`` for a smoothed target: ``picked[i] = keep * shifted[i, labels[i]] +
    off * sum(shifted[i])`` (keep = 1 - eps, off = eps / C), the target's part of the loss."""
    rows, cols = logits.shape
    for i in range(rows):
        top = logits[i, 0]
        for j in range(1, cols):
            top = max(top, logits[i, j])
        total = keep * 0  # a zero of the arrays' dtype (shifted is not written yet; a logit may be -inf)
        for j in range(cols):
            v = logits[i, j] - top
            shifted[i, j] = v
            total += v
        picked[i] = keep * shifted[i, labels[i]] + off * total


@_jit(nogil=True, error_model="numpy")
def softmax_cross_entropy_grad(exp, labels, picked, inv_batch, off_scaled, on_scaled):
    """From ``exp = exp(shifted)`` (B, C): write the mean cross-entropy's gradient over it, return the loss.

    Per row: ``total = sum(exp)``, loss ``log(total) - picked`` (``shift_by_row_max``'s, or its
    smoothed twin's), gradient ``exp / (B total)`` minus ``off_scaled`` everywhere and
    ``on_scaled`` more at the label: 0 and 1 / B for the one-hot target (x - 0 is x, so the
    one-hot gradient is the same bits as without the term), eps / (C B) and (1 - eps) / B for a
    smoothed one. The loss accumulates in float64.
    """
    rows, cols = exp.shape
    loss = 0.0
    for i in range(rows):
        total = exp[i, 0] * 0
        for j in range(cols):
            total += exp[i, j]
        loss += np.log(total) - picked[i]
        scale = inv_batch / total
        for j in range(cols):
            exp[i, j] = exp[i, j] * scale - off_scaled
        exp[i, labels[i]] -= on_scaled
    return loss / rows


# Numba keys each function's cached machine code on its own file's contents alone (a sha256 of
# this file here), but these kernels compile in code and constants of other modules: Philox's
# rounds (inlined) and the activation codes. Where those change (an editable install after a
# pull, say), the cached code would run, silently wrong. So each function's index is keyed on
# those modules' sources too, as this process loaded them: an index another process saved from
# other sources reads as empty here, and is written again.
DEPENDS_ON = (philox, activations)
_DEPENDENCIES = hashlib.sha256(b"".join(Path(module.__file__).read_bytes() for module in DEPENDS_ON)).hexdigest()


def _key_the_caches_on_the_modules_compiled_in() -> None:
    for value in list(globals().values()):
        if not isinstance(value, CPUDispatcher):
            continue
        cache_file = getattr(getattr(value, "_cache", None), "_cache_file", None)
        if cache_file is None:  # not cached (no place to write it: see _jit)
            continue
        if not hasattr(cache_file, "_source_stamp"):  # a Numba whose cache is laid out otherwise
            value._cache = NullCache()  # compiled in each process rather than risk stale code
            continue
        cache_file._source_stamp = (cache_file._source_stamp, _DEPENDENCIES)


_key_the_caches_on_the_modules_compiled_in()
