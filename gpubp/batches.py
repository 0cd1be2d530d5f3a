"""What ``fit``, the training step and the data-parallel wrapper share, one floor below them.

``gpubp.train`` (the loop), ``gpubp.step`` (one batch, optionally a CUDA graph) and
``gpubp.distributed`` (one batch over several processes) all check a dataset the same way,
train with the model's named optimizer, run one batch's forward, loss and backward, and
evaluate; those live here, and none of the three imports another's private helpers.

>>> import numpy as np, gpubp as gb
>>> from gpubp import batches
>>> model = gb.Sequential([gb.Dense(2, 3)], device="cpu")
>>> result = batches.evaluate(model, np.zeros((4, 2), np.float32), np.array([0, 1, 2, 0]), loss="cross_entropy")
>>> round(result["loss"], 4)
1.0986
"""

from __future__ import annotations

import contextvars
import numbers
from collections.abc import Mapping
from contextlib import contextmanager

import numpy as np

from gpubp import _checks, activations, losses, metrics as metric_fns, optim


# ----------------------------------------------------------------------------- data checks


# predict (and evaluate) take at most this many bytes of x a batch, so that a sparse x made dense
# a batch at a time stays small (1024 rows of 100,000 float32 features would be 410 MB).
CHUNK_BYTES = 32 << 20


class SparseRows:
    """The rows of a SciPy sparse matrix or array, as fit, evaluate and predict read them: held
    as CSR, and dense only a batch at a time, if at all. ``rows[index]`` (a slice or an index
    array) is those rows as a dense array, what a step on a GPU takes; ``rows.take(index)`` the
    same rows, still sparse, what a forward takes as they are where the model ``takes_sparse``
    (see ``rows``). A TF-IDF or hashed feature matrix whose dense form would not fit in memory
    so trains as it is."""

    ndim = 2

    def __init__(self, matrix) -> None:
        matrix = matrix.tocsr()  # rows are cheap to take from CSR; a CSR matrix is not copied
        # Canonical, on a copy where it is not already: each entry stored once (duplicates summed,
        # as the dense form sums them, so the value checks see what a batch holds) and no stored
        # zeros (so equal matrices store, and fingerprint, alike).
        if not matrix.has_canonical_format or not np.all(matrix.data):
            matrix = matrix.copy()
            matrix.sum_duplicates()
            matrix.eliminate_zeros()
        self.matrix = matrix

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape

    @property
    def dtype(self) -> np.dtype:
        return self.matrix.dtype

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        return self.matrix[index].toarray()

    def take(self, index) -> "SparseRows":
        return SparseRows(self.matrix[index])


def sparse_rows(x, name: str, in_features: int) -> SparseRows:
    """SciPy sparse ``x`` as :class:`SparseRows`, its shape checked as a dense batch's."""
    _checks.batch_shape(x.shape, in_features, name)
    return SparseRows(x)


def take(x, index):
    """The rows ``index`` of checked data ``x``, a sparse one's still sparse."""
    return x.take(index) if isinstance(x, SparseRows) else x[index]


def rows(model, x, index):
    """The rows ``index`` of checked data ``x`` as ``model``'s forward takes them: a sparse x's
    still sparse where the model multiplies sparse batches (``Sequential.takes_sparse``), else
    dense."""
    if isinstance(x, SparseRows):
        return x.take(index) if model.takes_sparse else x[index]
    return x[index]


def check_dataset(model, x, y, loss_fn, name: str = "x"):
    """Host copies of (x, y), checked against the model and the loss before any step runs; a
    SciPy sparse ``x`` as :class:`SparseRows`, its values checked where they are stored."""
    yname = "y" if name == "x" else f"{name}_y"
    if _checks.is_sparse(x):
        x = sparse_rows(x, name, model.in_features)
    elif not isinstance(x, SparseRows):  # fit's validation rows, checked again as evaluate's
        x = _checks.to_numpy(x, name, f"a 2-D array of shape (batch, {model.in_features})")
    targets, y = y, _checks.to_numpy(y, yname, f"an array of targets, one per row of {name}")
    if y.ndim == 0:
        raise TypeError(f"{yname}: expected an array of targets, one per row of {name}, "
                        f"got {type(targets).__name__} {targets!r}")
    _checks.batch_shape(x.shape, model.in_features, name)
    _checks.float_dtype(x.dtype, name)
    if isinstance(x, SparseRows):
        _stored_values_finite(x.matrix, name, model.dtype)
    else:
        all_finite(x, name, model.dtype)
    if len(y) != len(x):
        raise ValueError(f"{yname}: expected {len(x)} targets to match {name}, got {len(y)}")
    width = model.out_features
    base = losses.base(loss_fn)  # the function of a loss with options (Huber(0.5), CrossEntropy(0.1))
    if base is losses.cross_entropy:
        if y.ndim != 1 or y.dtype.kind not in "iu":
            hint = (f" (labels in a column: pass {yname}.ravel())" if y.ndim == 2 and y.shape[1] == 1
                    and y.dtype.kind in "iu" else "")
            raise TypeError(f"{yname}: cross_entropy expects 1-D integer class labels, got dtype {y.dtype}, "
                            f"shape {y.shape}{hint}")
        _check_class_labels(y, width, yname)
    elif base in (losses.mse, losses.mae, losses.huber, losses.binary_cross_entropy,
                  losses.categorical_cross_entropy, losses.poisson):
        if y.ndim == 1 and width == 1:
            y = y.reshape(-1, 1)
        if y.shape[1:] != (width,):
            raise ValueError(f"{yname}: expected shape ({len(x)}, {width}), got {y.shape}")
        if y.dtype.kind not in "fiub":
            raise TypeError(f"{yname}: expected numeric targets, got dtype {y.dtype}")
        if base is losses.binary_cross_entropy and (y.min() < 0 or y.max() > 1):
            raise ValueError(f"{yname}: binary_cross_entropy expects targets in [0, 1], got {y.min()} to {y.max()}")
        if base is losses.poisson and y.min() < 0:
            raise ValueError(f"{yname}: poisson expects counts >= 0, got values from {y.min()} to {y.max()}")
        if base is losses.categorical_cross_entropy and not losses.is_one_hot(y):
            raise ValueError(f"{yname}: categorical_cross_entropy expects one-hot rows (a single 1 in each row); "
                             "for class indices use sparse_categorical_crossentropy")
        all_finite(y, yname, model.dtype)
        y = y.astype(model.dtype, copy=False)
    elif loss_fn is None:
        # No loss to say what y is, but rows of targets need a column per output (one-hot,
        # multi-label) or one (labels), and labels for several outputs can only be classes,
        # integer or float: whole numbers (the metrics refuse 2.7), each a class of the model.
        # (For a single output they may as well be regression targets.)
        if y.ndim == 2 and y.shape[1] not in (1, width):
            raise ValueError(f"{yname}: expected class labels ({len(x)},) or one target per output "
                             f"({len(x)}, {width}), got shape {y.shape}")
        if width > 1 and y.shape[1:] in ((), (1,)) and y.dtype.kind in "iuf" and len(y):
            if y.dtype.kind == "f":
                whole = np.isfinite(y) & (y == np.round(y))
                if not np.all(whole):
                    row = int(np.argwhere(~whole)[0][0])
                    raise ValueError(f"{yname}: expected class labels (whole numbers), got {y[row].item()} "
                                     f"in row {row}")
            _check_class_labels(y, width, yname)
    return x, y


def _check_class_labels(y: np.ndarray, classes: int, yname: str) -> None:
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"{yname}: expected class labels in [0, {classes}), got values from {y.min()} to {y.max()}")


def all_finite(a: np.ndarray, name: str, dtype=None) -> None:
    """Refuse NaN and inf in ``a``, and values past ``dtype``'s range, which are inf once cast
    to it (float64 data for a float32 model). fit checks the whole dataset up front, so a bad
    row late in an epoch cannot leave half-trained weights. The smallest and largest values say
    whether all is well (NaN carries through both) with no array the size of ``a`` made, which a
    memory-mapped dataset larger than memory could not afford; the bad row is found only then."""
    if a.dtype.kind in "iub" or (a.size and _checks.within(a, dtype)):
        return
    finite = np.isfinite(a)
    if not np.all(finite):
        raise _non_finite(name, int(np.argwhere(~finite)[0][0]))
    if dtype is not None:
        _checks.in_range(a, name, dtype)


def _stored_values_finite(csr, name: str, dtype) -> None:
    """``all_finite`` for a CSR matrix: its stored values (the rest are zeros), a bad one named
    by its row, as a dense array's are."""
    values = csr.data
    if values.dtype.kind in "iub" or not values.size or _checks.within(values, dtype):
        return
    bad = ~np.isfinite(values)
    if not np.any(bad):
        bad = np.abs(values) > np.finfo(dtype).max
    first = int(np.argmax(bad))
    row = int(np.searchsorted(csr.indptr, first, side="right")) - 1
    if not np.isfinite(values[first]):
        raise _non_finite(name, row)
    raise _checks.beyond_range(name, values[first], f"in row {row}", dtype)


def _non_finite(name: str, row: int) -> ValueError:
    return ValueError(f"{name}: non-finite values (NaN or inf), first in row {row}")


def check_sample_weight(sample_weight, n: int, name: str = "sample_weight", of: str = "x",
                        dtype=None) -> np.ndarray:
    """``sample_weight`` as a float64 host array (n,), checked: one finite weight >= 0 per sample of
    ``of``, each within ``dtype``'s range (the model's, which the loss weighs them in) where given."""
    weights = _checks.to_numpy(sample_weight, name, f"{n} weights (one per sample of {of})")
    if weights.ndim == 2 and weights.shape[1] == 1:
        weights = weights.reshape(-1)
    if weights.shape != (n,):
        raise ValueError(f"{name}: expected {n} weights (one per sample of {of}), got shape {weights.shape}")
    if weights.dtype.kind not in "fiub":
        raise TypeError(f"{name}: expected numeric weights, got dtype {weights.dtype}")
    weights = weights.astype(np.float64)
    losses.check_weights(weights, name)
    if dtype is not None:
        _checks.in_range(weights, name, dtype, "at sample")
    return weights


def class_weights(model, y: np.ndarray, loss_fn, class_weight) -> np.ndarray:
    """Per-sample weights from ``class_weight`` {class: weight} for targets ``y`` as
    :func:`check_dataset` returns them, with Keras's rule for a sample's class: the label, the
    argmax of a row of several targets, or a single target rounded. Classes not named weigh 1;
    a weight past the range of the model's dtype, which the loss weighs in, is refused."""
    if not isinstance(class_weight, Mapping):
        raise TypeError(f"class_weight: expected a dict {{class: weight}}, got {type(class_weight).__name__}")
    classes = model.out_features if model.out_features > 1 else 2
    table = np.ones(classes)
    for key, weight in class_weight.items():
        if isinstance(key, bool) or not isinstance(key, numbers.Integral) or not 0 <= key < classes:
            raise ValueError(f"class_weight: key {key!r} is not a class; the model's {model.out_features} "
                             f"output(s) give the classes 0 to {classes - 1}")
        table[key] = _checks.non_negative(weight, f"class_weight[{key}]")
    _checks.in_range(table, "class_weight", model.dtype, "for class")
    if y.ndim == 2 and y.shape[1] > 1:
        labels = y.argmax(axis=1)
    else:
        labels = np.rint(y.reshape(-1)).astype(np.int64)
    outside = (labels < 0) | (labels >= classes)
    if np.any(outside):
        i = int(np.argmax(outside))
        raise ValueError(f"class_weight: the target of sample {i} ({y[i]}) names no class in 0 to {classes - 1}; "
                         f"class weights need class targets ({getattr(loss_fn, '__name__', 'this loss')} was given "
                         "others)")
    return table[labels]


def sample_weights(model, y, loss_fn, sample_weight=None, class_weight=None, name: str = "sample_weight"):
    """The weights of each sample of (checked) ``y``: ``sample_weight`` times the ``class_weight``
    of its class, as tf.keras 2 did (Keras 3 refuses the pair with a ValueError), or None when
    neither is given; each within the range of the model's dtype."""
    weights = None if sample_weight is None else check_sample_weight(sample_weight, len(y), name,
                                                                     dtype=model.dtype)
    if class_weight is not None:
        per_class = class_weights(model, y, loss_fn, class_weight)
        if weights is None:
            weights = per_class
        else:
            with np.errstate(over="ignore"):  # a product past float64's too: inf, refused below
                weights = weights * per_class
            all_finite(weights, f"{name} times class_weight", model.dtype)
    return weights


# ----------------------------------------------------------------------------- one batch


def loss_and_grad(loss_fn, out, y, sample_weight, backend):
    """``loss_fn``'s (loss, gradient), weighted when ``sample_weight`` is given (a loss of your
    own is then called with ``sample_weight=`` too, and only then). gpubp's losses are told the
    ``backend``; a loss of your own is called as :func:`gpubp.losses.get` says, without it."""
    builtin = losses.is_builtin(loss_fn)
    kwargs = {"backend": backend} if builtin else {}
    if sample_weight is not None:
        kwargs["sample_weight"] = sample_weight
    result = loss_fn(out, y, **kwargs)
    return result if builtin else _checked_own_loss(result)


def _checked_own_loss(result) -> tuple[float, object]:
    """A loss of your own's ``(loss, gradient)``, the loss as a float; TypeError naming ``loss``
    for anything else (a loss per sample, say), before the gradient is used."""
    if not isinstance(result, tuple) or len(result) != 2:
        raise TypeError(f"loss: a loss of your own returns (loss, gradient), got {type(result).__name__}")
    value, grad = result
    if getattr(value, "ndim", 0) != 0 or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"loss: a loss of your own returns the batch's loss as one number (a mean), got "
                        f"{type(value).__name__} of shape {getattr(value, 'shape', None)}")
    try:
        return float(value), grad
    except (TypeError, ValueError):
        raise TypeError(f"loss: a loss of your own returns the batch's loss as one number, got "
                        f"{type(value).__name__} {value!r}") from None


def optimizer_for(model, optimizer, fresh: bool = False):
    """The optimizer to train ``model`` with: an instance as given; a name built once per model
    and name, and reused (state included) while the model keeps the same parameters on the same
    backend, whatever other names were used in between; ``fresh`` builds it again (``compile``,
    as Keras's builds a new optimizer). An instance must update only the model's parameters
    (:func:`check_optimizer_params`)."""
    if not isinstance(optimizer, str):
        optimizer = optim.get(optimizer, model.parameters())
        check_optimizer_params(model, optimizer)
        return optimizer
    params = model.parameters()
    name = optimizer.lower()
    key = (model.backend_name, tuple(id(p) for p in params))
    named = getattr(model, "_named_optimizers", None)
    if named is None:
        named = model._named_optimizers = {}
    if fresh or name not in named or named[name][0] != key:
        named[name] = (key, optim.get(optimizer, params))
    return named[name][1]


def check_optimizer_params(model, optimizer) -> None:
    """Every parameter ``optimizer`` updates is one of ``model``'s Parameters (the same objects:
    a subset, such as ``model.trainable_parameters()`` or ``gpubp.finetune.param_groups``, is
    fine). An optimizer of other parameters would train nothing here and step the weights of
    the model it was built on, whose gradients it reads."""
    own = {id(param) for param in model.parameters()}
    if any(id(param) not in own for param in optimizer.parameters()):
        raise ValueError("optimizer: it updates parameters that are not the model's; build it on this model's "
                         "parameters (resuming from gb.load_checkpoint, use the optimizer the checkpoint loaded, "
                         "ckpt.optimizer, not the one of the run that wrote it)")


def param_positions(model, optimizer) -> list[int]:
    """Where each parameter ``optimizer`` updates, in its order across the groups, stands in
    ``model.parameters()`` (-1: not the model's, which :func:`check_optimizer_params` refuses)."""
    positions = {id(param): i for i, param in enumerate(model.parameters())}
    return [positions.get(id(param), -1) for param in optimizer.parameters()]


# ----------------------------------------------------------------------------- predict / evaluate


def predict(model, x, batch_size: int | None = 1024, logits: bool = False) -> np.ndarray:
    """Model outputs for ``x`` as a NumPy array (N, out_features), computed in batches of
    ``batch_size`` rows (None: the default): probabilities for a sigmoid or softmax last layer, or
    with ``logits=True`` its logits. A batch has fewer rows where ``batch_size`` rows of ``x``
    would be more than ``CHUNK_BYTES`` (32 MiB): 1024 rows up to 8192 float32 features. SciPy
    sparse ``x`` is taken a batch at a time, multiplied sparse where the model ``takes_sparse``,
    else made dense. Several threads may predict with one model at once (each
    has its own intermediate buffers), though not while another trains it."""
    batch_size = 1024 if batch_size is None else _checks.positive_int(batch_size, "batch_size")
    _checks.boolean(logits, "logits")
    if _checks.is_sparse(x):  # taken a batch at a time
        x = sparse_rows(x, "x", model.in_features)
    elif not isinstance(x, SparseRows) and _checks.array_kind(x) == "other":
        x = _checks.to_numpy(x, "x", f"a 2-D array of shape (batch, {model.in_features})")
    _checks.batch_shape(x.shape, model.in_features, "x")
    # What is dense at once stays small, however wide the rows; dense x is batched alike, so that
    # the two give the same bits where sparse batches are made dense (a row's outputs can depend on
    # how many rows its batch has).
    batch_size = min(batch_size, max(1, CHUNK_BYTES // max(1, x.shape[1] * x.dtype.itemsize)))
    outputs = [model.backend.to_host(model.forward(rows(model, x, slice(i, i + batch_size)), training=False,
                                                   logits=logits))
               for i in range(0, x.shape[0], batch_size)]
    return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)


def metric_list(metrics) -> list:
    """``metrics`` as a list: a list or tuple of names and callables, or None for none."""
    if metrics is None:
        return []
    if isinstance(metrics, (str, bytes)) or not isinstance(metrics, (list, tuple)):
        raise TypeError(f"metrics: expected a list of metric names or callables, got {metrics!r}; "
                        "pass metrics=[...]")
    return list(metrics)


def named_metrics(metrics: list, probabilities: bool = False) -> list:
    """``(name, fn)`` of each metric (:func:`gpubp.metrics.get`), their names checked: each is
    logged under its name, so two of one name (two lambdas, two ``functools.partial``, "accuracy"
    and ``metrics.accuracy``) would keep one's value, and one named "loss" would take the loss's
    place. ValueError naming the name, before any work."""
    named = [metric_fns.get(m, probabilities=probabilities) for m in metrics]
    seen = set()
    for name, _ in named:
        if name == "loss":
            raise ValueError("metrics: a metric is named 'loss', the name the loss is logged under; "
                             "give it another name (a callable's name attribute or __name__)")
        if name in seen:
            raise ValueError(f"metrics: two metrics are named {name!r}, and each is logged under its name; "
                             "give each a name of its own (a callable's name attribute or __name__)")
        seen.add(name)
    return named


# Set while fit validates: its TrainStep has warned once already about a loss that does not
# match the last layer (``losses.warn_if_another_head``), and would warn again at every epoch.
_HEAD_WARNED = contextvars.ContextVar("gpubp_head_warned", default=False)


@contextmanager
def head_warned():
    """Inside the block, ``evaluate`` does not warn about a loss that does not match the last
    layer: ``fit``'s validation, whose training step has warned already."""
    token = _HEAD_WARNED.set(True)
    try:
        yield
    finally:
        _HEAD_WARNED.reset(token)


def scoring_metrics(model, loss_fn, metrics: list) -> list:
    """``named_metrics`` of ``metrics`` for scoring ``model``'s outputs under ``loss_fn``: class 1
    begins at 0.5 for probabilities and for values a regression loss fits, at 0 for logits."""
    values = (model._end(-1).activation in ("sigmoid", "softmax")
              or (loss_fn is not None and losses.fits_values(loss_fn)))
    return named_metrics(metrics, probabilities=values)


def scores_of(model, outputs: np.ndarray, fused: bool) -> np.ndarray:
    """What the metrics score: host ``outputs`` of ``model``, its last activation applied where
    they are the logits a fused loss took (``fused``)."""
    if not fused:
        return outputs
    scores = np.empty_like(outputs)
    activations.forward(model._end(-1).activation, outputs, scores)
    return scores


def check_metrics(model, metrics: list, y_val: np.ndarray) -> None:
    """Score a zero output of the model's shape against every target of ``y_val`` with each
    named metric, so a metric that cannot score these targets (``auc`` on class labels, or on one
    target past 1 in row 700, say) fails before any work (``fit``: before the first step, not at
    the first epoch's end). The zero output is one row seen N times, not an (N, out) array.
    Callables are the caller's and are not probed."""
    probabilities = model.layers[-1].activation in ("sigmoid", "softmax")
    probe = np.broadcast_to(np.zeros((1, model.layers[-1].out_features), np.float32),
                            (len(y_val), model.layers[-1].out_features))
    for metric in metrics:
        if callable(metric):
            continue
        name, fn = metric_fns.get(metric, probabilities=probabilities)
        try:
            fn(probe, y_val)
        except (ValueError, TypeError, IndexError) as error:
            raise ValueError(f"metrics: {name!r} cannot score this model's targets: {error}") from None


def evaluate(model, x, y, loss=None, metrics=None, batch_size: int = 1024, sample_weight=None, gather=None) -> dict:
    """``{"loss": ..., metric: ...}`` on (x, y): loss and metrics of what ``predict`` returns
    (SciPy sparse ``x`` a batch at a time, as there).

    The loss is the one given, else the compiled or last fit's one; ``metrics`` default to the
    compiled ones, else ``["accuracy"]`` for a classification loss (the cross-entropies,
    binary_cross_entropy) or no loss, and none for a regression loss (mse, mae, huber, poisson)
    or a loss of your own, whose targets need not be classes; ``[]`` for none. A loss that fuses
    the last layer's activation is computed on the logits, which is the same value, stably.
    Metrics: "accuracy", "f1", "precision", "recall" (macro over classes; binary for one
    output: class 1 above probability 0.5 for a sigmoid last layer, or above 0.5 for an output
    a regression loss (mse, mae, huber) fits to the targets, above logit 0 otherwise),
    "mse", "mae", Keras's names (see :mod:`gpubp.metrics`), or callables ``(scores, y) -> float``;
    each is returned under its name, so two of one name, or one named "loss", are refused.
    A loss that applies softmax to a sigmoid last layer's outputs, or sigmoid to a softmax's,
    warns as in ``fit``. Class labels (integers, or whole-number floats) are range-checked
    whether or not there is a loss. ``sample_weight`` (N,) weights the loss as in ``fit``
    (each sample's loss times its weight, summed, over N); the metrics stay unweighted.
    ``gather``: for data split across processes (``gpubp.distributed``), a callable taking the
    scores of this part and returning ``(scores, targets)`` of the whole set, which the metrics
    score (an F1 or AUC of the whole set is no mean of the parts'); the loss stays this part's.
    """
    loss_fn = losses.get(loss) if loss is not None else getattr(model, "loss", None)
    if metrics is None:
        metrics = getattr(model, "_compiled", {}).get("metrics")
    if metrics is None:
        metrics = ["accuracy"] if loss_fn is None or losses.classifies(loss_fn) else []
    head = model._end(-1).activation
    metrics = metric_list(metrics)
    named = scoring_metrics(model, loss_fn, metrics)
    if loss_fn is not None and not _HEAD_WARNED.get():  # as fit warns
        losses.warn_if_another_head(loss_fn, head, "loss")
    x, y = check_dataset(model, x, y, loss_fn)
    # The first targets only: no weights change here, and the metrics read every target below
    # anyway (fit probes every target before its first step, and its validation's too).
    check_metrics(model, metrics, y[:2])
    if sample_weight is not None:
        if loss_fn is None:
            raise ValueError("sample_weight: it weights the loss, and there is none (pass loss=, or compile first)")
        sample_weight = check_sample_weight(sample_weight, len(x), dtype=model.dtype)
    fused = loss_fn is not None and losses.fuses(loss_fn, head)
    outputs = predict(model, x, batch_size=batch_size, logits=fused)
    scores = scores_of(model, outputs, fused)
    result = {}
    if loss_fn is not None:  # the host outputs: gpubp's losses pick their backend from them (backend=None)
        result["loss"] = loss_and_grad(loss_fn, outputs, y, sample_weight, None)[0]
    if gather is not None and named:
        scores, y = gather(scores)
    for name, fn in named:
        result[name] = fn(scores, y)
    return result


@contextmanager
def at_rate(optimizer, learning_rate: float | None, restore: bool = True):
    """Every group of ``optimizer`` at ``learning_rate`` inside the block (a ``fit`` call's, or the
    compiled one of ``fit`` and ``train_step``), and, with ``restore``, their own rates after it;
    None leaves the rates alone."""
    if learning_rate is None:
        yield
        return
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    try:
        yield
    finally:
        if restore:
            for group, rate in zip(optimizer.param_groups, rates):
                group["lr"] = rate
