"""Layer, Dense and Sequential: the layer API over the backend kernels.

Layers own parameters and call backend functions; they never touch an array library
directly, so the same model runs on the NumPy, CuPy and Numba backends.

>>> import numpy as np, gpubp as gb
>>> gb.seed(0)
>>> model = gb.Sequential([gb.Dense(4, 8, activation="relu"), gb.Dense(8, 3)], device="cpu")
>>> out = model.forward(np.ones((2, 4), np.float32))
>>> out.shape
(2, 3)
>>> loss, dout = gb.losses.cross_entropy(out, np.array([0, 2]))
>>> model.backward(dout)
>>> model[0].weight.grad.shape
(4, 8)
"""

from __future__ import annotations

import contextvars
import gc
import itertools
import threading
import math
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import ModuleType

import numpy as np

from gpubp import _checks, _random, activations, backends, batches, philox
from gpubp.backends import _contract, numpy_backend
from gpubp.parameter import Parameter, clear_grads

INITS = ("auto", "he_normal", "he_uniform", "glorot_uniform", "glorot_normal")

# Numbers each training forward of any model; layers keep the one that wrote what they saved.
_training_forwards = itertools.count(1)
# What a Sequential sets on its layers while it checks them: put back when it refuses them.
_SET_BY_A_MODEL = ("name", "in_features", "out_features")


class _Buffers:
    """Arrays reused from call to call, keyed by (role, shape). Keeps the newest few,
    so a varying last batch or an occasional predict() does not grow memory without bound.
    Each thread has its own: two threads predicting with one model at once must not write
    each other's intermediate outputs (a thread's go when it ends)."""

    def __init__(self, capacity: int = 8) -> None:
        self._local = threading.local()
        self._capacity = capacity

    @property
    def _arrays(self) -> OrderedDict:
        arrays = getattr(self._local, "arrays", None)
        if arrays is None:
            arrays = self._local.arrays = OrderedDict()
        return arrays

    def get(self, backend: ModuleType, role, shape: tuple, dtype) -> object:
        arrays, key = self._arrays, (role, shape)
        array = arrays.get(key)
        if array is None:
            array = backend.empty(shape, dtype)
            arrays[key] = array
            if len(arrays) > self._capacity:
                arrays.popitem(last=False)
        else:
            arrays.move_to_end(key)
        return array

    def drop(self, role, shape: tuple) -> None:
        self._arrays.pop((role, shape), None)

    def clear(self) -> None:
        """Drop every thread's arrays."""
        self._local = threading.local()


def _init_weight(init, activation: str, fan_in: int, fan_out: int, dtype) -> np.ndarray:
    rng = _random.generator()
    if callable(init):
        try:
            weight = init(rng, (fan_in, fan_out))
        except TypeError as error:  # one that takes the shape alone, say: its own message names neither
            raise TypeError(f"init: a callable init is called as init(rng, shape) with a NumPy Generator and "
                            f"the weight's shape {(fan_in, fan_out)}, and this one raised TypeError: {error}") from error
        return _checks.weight_values(weight, (fan_in, fan_out), dtype, "init",
                                     "the weight (what the callable returns)", "the layer")
    if init not in INITS:
        raise ValueError(f"init: expected one of {INITS} or a callable(rng, shape), got {init!r}")
    if init == "auto":
        init = "he_normal" if activation in activations.RELU_FAMILY else "glorot_uniform"
    if init == "he_normal":
        weight = rng.normal(0.0, math.sqrt(2.0 / fan_in), (fan_in, fan_out))
    elif init == "he_uniform":
        limit = math.sqrt(6.0 / fan_in)
        weight = rng.uniform(-limit, limit, (fan_in, fan_out))
    elif init == "glorot_normal":
        weight = rng.normal(0.0, math.sqrt(2.0 / (fan_in + fan_out)), (fan_in, fan_out))
    else:
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        weight = rng.uniform(-limit, limit, (fan_in, fan_out))
    return weight.astype(dtype)


class Layer:
    """What ``Sequential`` asks of a layer, so that it holds any kind without asking which.

    A layer maps ``x`` (B, in_features) to (B, out_features) on its backend. ``Sequential``
    calls ``connect`` with the width the layer below gives it, ``_bind`` to move it to the
    model's backend, and per batch ``forward`` (told by ``keeps`` what the following backward
    reads) and ``backward``; ``backward_kernels`` names what that backward launches, for
    ``backward_plan``. A subclass sets ``kind`` (default names are ``f"{kind}_{position}"``),
    ``in_features`` and ``out_features``, and lists its Parameters in ``parameters()``;
    one without Parameters is never trainable, and backward then only passes dX through.
    """

    kind = "layer"
    activation = "identity"  # what the layer applies last (a loss may fuse a sigmoid or softmax)
    in_features: int
    out_features: int
    # Whether forward can apply the mask of a Dropout right above it in its own epilogue (and
    # backward regenerate it): Sequential then runs the two as one step.
    takes_dropout = False
    # Whether the layer's widths are its neighbour's, set by the model that holds it (a Dropout's),
    # rather than its own: such a layer does not fix a model's input width.
    width_from_model = False
    # Whether, on a backend with the FOLDS_DX_ACT capability, backward can form the dz of a layer
    # of this kind below in its dX kernel's epilogue (``below=``), and take from the layer above a
    # dy that is already its own dz (``folded=True``): see ``Sequential.folded``.
    folds_act = False

    def __init__(self, name: str | None = None) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name: expected a str or None, got {type(name).__name__}")
        self.name = name
        self.backend: ModuleType = numpy_backend
        self._buffers = _Buffers()
        # The live Sequentials that hold this layer: while one does, its backend and dtype are that
        # model's, and another model may share it (a slice, a rebuilt model) only as they are.
        self._holders: weakref.WeakSet = weakref.WeakSet()
        # The training forward (a number from _training_forwards) whose arrays this layer keeps for
        # backward: a model's backward checks it is its own, not a slice's that ran since.
        self._saved_by = None

    def connect(self, width: int, where: str, below: str) -> None:
        """Check (or, for a layer that keeps its width, adopt) the input width ``width`` that
        layer ``below`` gives this one, which sits at ``where``."""
        if self.in_features != width:
            raise ValueError(f"{where}: in_features={self.in_features} does not match {below}.out_features={width}")

    def parameters(self) -> list[Parameter]:
        return []

    def get_weights(self) -> list[np.ndarray]:
        """NumPy copies of this layer's parameters, as Keras's ``layer.get_weights()``: ``[W, b]``
        for a Dense (W as (in, out)), ``[]`` for a layer without parameters."""
        return [np.array(p.backend.to_host(p.data), copy=True) for p in self.parameters()]

    def set_weights(self, weights: Sequence) -> None:
        """Load ``weights`` as :meth:`get_weights` returns them (Keras's ``layer.set_weights``);
        every array is checked before any weight changes."""
        _assign(self.parameters(), weights, self.dtype, "[W, b]", "the layer")
        for model in self._holders:
            model._stored_plan = None

    @property
    def dtype(self) -> np.dtype | None:
        """The parameters' dtype; None for a layer without parameters (it computes in its input's)."""
        params = self.parameters()
        return np.dtype(params[0].data.dtype) if params else None

    @property
    def trainable(self) -> bool:
        return any(param.trainable for param in self.parameters())

    @trainable.setter
    def trainable(self, value: bool) -> None:
        value = _checks.boolean(value, "trainable")
        for param in self.parameters():
            param.trainable = value  # freezing clears its .grad
        if not value:  # and nothing fills the gradient buffers any more: give the memory back
            self.drop_grad_buffers()

    def drop_grad_buffers(self) -> None:
        """Give back the arrays backward fills with the parameters' gradients (a frozen layer's: the
        model calls this for every layer its backward does not train, frozen one Parameter at a time too)."""
        for param in self.parameters():
            self._buffers.drop(("grad", param.name), param.shape)

    def trainable_flags(self) -> tuple[bool, ...]:
        """Whether each Parameter trains, in ``parameters()`` order: what decides this layer's backward."""
        return tuple(param.trainable for param in self.parameters())

    def _grad_buffer(self, param: Parameter):
        """The array backward fills with ``param``'s gradient, reused from step to step; freezing
        the layer (``trainable = False``) gives it back."""
        return self._buffers.get(self.backend, ("grad", param.name), param.shape, param.data.dtype)

    def freeze(self) -> Layer:
        """Stop training this layer: backward launches no dW/db kernel for it."""
        self.trainable = False
        return self

    def unfreeze(self) -> Layer:
        self.trainable = True
        return self

    def _bind(self, backend: ModuleType, dtype=None) -> None:
        """Move the parameters to ``backend`` (and ``dtype``), dropping cached buffers."""
        for param in self.parameters():
            host = param.backend.to_host(param.data)
            param.data = backend.asarray(host, dtype or host.dtype)
            param.grad = None
            param.backend = backend
        self.backend = backend
        self._buffers.clear()
        self.forget()

    def keeps(self, act: str, need_dx: bool, need_dw: bool) -> tuple[bool, bool]:
        """(input, output): what a backward with these needs reads, so a training forward keeps it."""
        raise NotImplementedError

    def forward(self, x, out=None, keep_input: bool = False, keep_output: bool = False, training: bool = True,
                logits: bool = False, precision: str = "fp32"):
        """``x`` (B, in) -> (B, out). A layer that ``takes_dropout`` also takes ``dropout=``, the
        Dropout above it, whose mask it applies to its output in training."""
        raise NotImplementedError

    def backward(self, dy, need_dx: bool, out_dx=None, precision: str = "fp32"):
        raise NotImplementedError

    def backward_kernels(self, act: str, need_dx: bool, need_dw: bool, precision: str = "fp32") -> list[str]:
        """The kernels ``backward`` launches in ``precision`` after a forward that applied ``act``
        (and, for a layer that ``takes_dropout``, ``dropout=True``: a Dropout's mask)."""
        raise NotImplementedError

    def next_key(self) -> None:
        """Draw what the next training forward's randomness comes from (a Dropout's key) from the
        library's random stream; the model calls it for every layer, in order, per training forward."""

    @property
    def detail(self) -> str:
        """What ``summary`` shows after the widths."""
        return self.activation

    def saved_for_backward(self) -> tuple:
        """What the last training forward kept for backward, as a value ``restore_saved`` puts
        back (a replayed CUDA graph does, after its kernels wrote into the same arrays)."""
        return ()

    def restore_saved(self, saved: tuple) -> None:
        """Put back what ``saved_for_backward`` returned."""

    def forget(self) -> None:
        """Drop what the last training forward kept for backward."""

    def stored_arrays(self) -> list:
        """The arrays the last training forward kept for backward (``activation_bytes`` counts them)."""
        return []

    # What a copy leaves out (``copy.deepcopy``, ``pickle``): what the next forward makes again.
    _transient = ("_buffers", "_holders", "_saved_by")

    def __getstate__(self) -> dict:
        """The layer without its backend module (kept by name), its buffers, its holders or what a
        forward kept: the Parameters carry the weights (on the host, see ``Parameter``)."""
        state = {key: value for key, value in vars(self).items() if key not in self._transient}
        state["backend"] = self.backend.NAME
        return state

    def __setstate__(self, state: dict) -> None:
        """A layer that no model holds yet: the copied model registers itself (``Sequential.__setstate__``)."""
        self.__dict__.update(state, backend=backends.get(state["backend"]), _buffers=_Buffers(),
                             _holders=weakref.WeakSet(), _saved_by=None)
        self.forget()


def parameter_names(count: int) -> list[str]:
    """The names of a model's ``count`` parameters in order, Dense layers' weight and bias pairs:
    ``layers.{i}.weight``, ``layers.{i}.bias``, as its files and ``named_parameters`` give them."""
    return [f"layers.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(count)]


def _assign(params: list[Parameter], weights, dtype, order: str, owner: str) -> None:
    """``set_weights`` of a model or a layer (``owner``): ``weights`` into ``params``, in ``order``;
    every array checked (count, shape, finite values in ``dtype``'s range) before any changes."""
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights: expected a list of arrays, got {type(weights).__name__}")
    if len(weights) != len(params):
        raise ValueError(f"weights: expected {len(params)} arrays {order}, got {len(weights)}")
    hosts = [_checks.weight_values(array, param.shape, dtype, f"weights[{i}]", param.name, owner)
             for i, (param, array) in enumerate(zip(params, weights))]
    for param, array in zip(params, hosts):
        param.data = param.backend.asarray(array, dtype)


# Set while Sequential.__getitem__ builds a slice of a model, whose layers that model has placed.
_SLICING: contextvars.ContextVar[bool] = contextvars.ContextVar("gpubp_slicing", default=False)


class Layers(tuple):
    """A model's layers (``model.layers``): a tuple, read as a list is, whose list methods that would
    change it (``append``, ``pop``, ``insert``, item assignment, ...) raise a TypeError pointing to
    ``model.add`` and ``model.pop``, which check the layers together as the constructor does."""

    HOW = "model.layers + [layer]) or gb.Sequential(model.layers[:-1])"

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"model.layers is read-only: a model checks its layers together; use model.add(layer) and "
                        f"model.pop(), as in Keras, or build a new model, gb.Sequential({self.HOW}")

    append = extend = insert = pop = remove = clear = sort = reverse = _refuse
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse

    def __getitem__(self, index):
        """A layer; a slice is a list of them, to edit and build a model of."""
        got = tuple.__getitem__(self, index)
        return list(got) if isinstance(index, slice) else got

    def __add__(self, other):
        """A list of these layers and ``other``'s (a list or tuple): ``model.layers + [layer]``."""
        return list(self) + list(other) if isinstance(other, (list, tuple)) else NotImplemented

    def __radd__(self, other):
        return list(other) + list(self) if isinstance(other, (list, tuple)) else NotImplemented


class Dense(Layer):
    """A fully connected layer ``y = act(x @ W + b)`` with ``W`` (in, out) and ``b`` (out,).

    ``init="auto"`` is He-normal for relu/leaky_relu and Glorot-uniform otherwise; also
    ``"he_uniform"``, ``"glorot_normal"``, or a callable ``(rng, shape) -> array`` of finite real
    numbers (checked as ``Sequential.set_weights`` checks weights). The bias starts at zero.
    ``dtype``: float32 (None means it too) or float64; a model converts its layers to its own.
    """

    kind = "dense"
    takes_dropout = True
    folds_act = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: str | None = None,
        init: str | Callable = "auto",
        name: str | None = None,
        dtype="float32",
    ) -> None:
        super().__init__(name)
        self.in_features = _checks.positive_int(in_features, "in_features")
        self.out_features = _checks.positive_int(out_features, "out_features")
        self.activation = activations.canonical(activation)
        # None is the default, as for Sequential (NumPy would read it as float64)
        dtype = _checks.parameter_dtype(np.float32 if dtype is None else dtype, "dtype")
        weight = _init_weight(init, self.activation, self.in_features, self.out_features, dtype)
        self.weight = Parameter(weight, "weight")
        self.bias = Parameter(np.zeros(self.out_features, dtype), "bias")
        self._input = self._output = self._preact = None
        self._applied = self.activation  # the activation the last training forward applied
        self._dropout = None  # the philox.Mask the last training forward applied to its output, if any

    @property
    def activation(self) -> str:
        """The activation's registered name. Setting it changes what the layer applies, checked as
        the constructor checks it (an alias such as "linear" or None becomes its name), and one that
        normalises a whole row (softmax) only where this layer is the top of every model holding it,
        as a model's constructor refuses it elsewhere (a model saved so would not load)."""
        return self._activation

    @activation.setter
    def activation(self, name) -> None:
        name = activations.canonical(name)
        if name in activations.OUTPUT_ONLY:
            for model in self._holders:
                if model.layers[-1] is not self:
                    raise ValueError(f"activation: {name!r} is allowed on a model's last layer only (it normalises "
                                     f"a whole row), and this layer is layers[{model.layers.index(self)}] of a "
                                     f"{len(model)}-layer model")
        self._activation = name

    def __setstate__(self, state: dict) -> None:
        if "activation" in state:  # pickled before the activation was a checked property
            state = {**state, "_activation": state["activation"]}
            del state["activation"]
        super().__setstate__(state)

    # --------------------------------------------------------------------- state

    def parameters(self) -> list[Parameter]:
        return [self.weight, self.bias]

    # read several times per training step: without building the parameter list
    trainable = property(lambda self: self.weight.trainable or self.bias.trainable, Layer.trainable.fset,
                         doc="True when the weight or the bias trains.")

    def trainable_flags(self) -> tuple[bool, bool]:
        return self.weight.trainable, self.bias.trainable

    def needs_z(self) -> bool:
        return self.activation in activations.NEEDS_Z

    def keeps(self, act: str, need_dx: bool, need_dw: bool) -> tuple[bool, bool]:
        # dW reads the input (a bias that trains alone does not: db is dz's column sums); act'
        # reads the output (or z, for gelu), and identity's needs neither.
        return need_dw and self.weight.trainable, (need_dx or need_dw) and act != "identity"

    # --------------------------------------------------------------------- compute

    def forward(self, x, out=None, keep_input: bool = False, keep_output: bool = False, training: bool = True,
                logits: bool = False, precision: str = "fp32", dropout: Dropout | None = None):
        """``act(x @ W + b)`` on the layer's backend; ``x`` (B, in) is a backend array (or, as the
        first layer of a model that ``takes_sparse``, a SciPy CSR batch).

        In training, ``keep_input``/``keep_output`` store what backward will read (the input
        for dW; the output or, for gelu, the pre-activation for act') and nothing else.
        ``training=False`` stores nothing and leaves what an earlier training forward stored.
        ``logits=True`` returns ``x @ W + b`` without the activation (for a loss that fuses it),
        and a following backward takes the gradient of those logits. ``precision``: the
        ``Sequential``'s, one of the backend's ``dense_precisions()``.
        ``dropout``: the Dropout above this layer; in training its mask (from the key it drew last)
        multiplies the output inside the forward kernel, and backward regenerates it for dz.
        The output this layer keeps is then the masked one.
        """
        act = "identity" if logits else self.activation
        z_out, z_shape = None, (x.shape[0], self.out_features)
        if training and keep_output and act in activations.NEEDS_Z:
            z_out = self._buffers.get(self.backend, "z", z_shape, self.dtype)
        elif training:
            # z is no longer kept (the layer was frozen, say): give its buffer back, as the model does the output's.
            self._buffers.drop("z", z_shape)
        mask = dropout.mask(self.dtype) if training and dropout is not None else None
        kwargs = {} if mask is None else {"dropout": mask}
        y, z = self.backend.dense_forward(x, self.weight.data, self.bias.data, act, out, z_out, precision, **kwargs)
        if training:
            self._applied = act
            self._dropout = mask
            self._input = x if keep_input else None
            self._output = y if keep_output and act not in activations.NEEDS_Z else None
            self._preact = z if keep_output else None
        return y

    def backward_kernels(self, act: str, need_dx: bool, need_dw: bool, precision: str = "fp32",
                         dropout: bool = False) -> list[str]:
        """``need_dw``: the layer trains; a frozen weight under a bias that trains needs db alone (no
        dW kernel). ``precision``: the model's, which is the one its last training forward ran in."""
        return self.backend.backward_kernels(act, need_dx, need_dw and self.weight.trainable, precision,
                                             dropout=dropout, need_db=need_dw and self.bias.trainable)

    def backward(self, dy, need_dx: bool, out_dx=None, precision: str = "fp32", below: Dense | None = None,
                 folded: bool = False):
        """Fill the trainable parameters' ``.grad`` and return ``dx`` (or None if not needed);
        ``precision`` as for the forward. ``dy`` is the gradient of the output the forward returned
        (masked, when it applied a Dropout's mask).

        On a backend with ``FOLDS_DX_ACT``: ``below``, the Dense whose output (masked by a Dropout's,
        when it applied one) this layer's input is; the dX kernel applies its act' (and regenerates
        its mask) in its epilogue and returns its dz. ``folded``: ``dy`` is this layer's dz already
        (the layer above formed it), so no kernel forms it. A frozen weight launches no dW kernel,
        even when the bias trains (db alone, from dz). A frozen bias under a weight that trains still
        gets a db buffer: the GPU backends' dW kernels sum db beside dW whatever ``need_db`` says."""
        need_dw, need_db = self.weight.trainable, self.bias.trainable
        out_dw, out_db = self.grad_buffers(need_dw) if need_dw or need_db else (None, None)
        kwargs = {} if self._dropout is None or folded else {"dropout": self._dropout}
        if below is not None:
            kwargs.update(dx_act=below._applied, dx_act_in=below.act_input())
            if below._dropout is not None:
                kwargs["dx_dropout"] = below._dropout
        dx, dw, db = self.backend.dense_backward(
            dy, self._input, self.weight.data, self._output, self._preact, "identity" if folded else self._applied,
            need_dx, need_dw, out_dx, out_dw, out_db, precision, need_db=need_db, **kwargs,
        )
        if need_dw or need_db:
            self.take_grads(dw, db)
        return dx

    def act_input(self):
        """What act' reads, as the last training forward kept it: the output, or z (``NEEDS_Z``)."""
        return self._preact if self._applied in activations.NEEDS_Z else self._output

    def grad_buffers(self, with_dw: bool = True):
        """(dW, db) buffers on the layer's backend, reused from step to step, for backward to fill;
        dW None unless ``with_dw`` (a frozen weight under a bias that trains), whose buffer, if an
        earlier step made one, is given back: freezing the weight alone does not reach the layer."""
        if not with_dw:
            self._buffers.drop(("grad", self.weight.name), self.weight.shape)
        return self._grad_buffer(self.weight) if with_dw else None, self._grad_buffer(self.bias)

    def take_grads(self, dw, db) -> None:
        """Set ``.grad`` of the trainable parameters from a backward that computed them (db, and dW
        where the weight trains)."""
        self.weight.grad = dw if self.weight.trainable else None
        self.bias.grad = db if self.bias.trainable else None

    def stored_arrays(self) -> list:
        return [a for a in (self._input, self._output, self._preact) if a is not None]

    def saved_for_backward(self) -> tuple:
        return self._input, self._output, self._preact, self._applied, self._dropout, self._saved_by

    def restore_saved(self, saved: tuple) -> None:
        self._input, self._output, self._preact, self._applied, self._dropout, self._saved_by = saved

    def forget(self) -> None:
        self._input = self._output = self._preact = self._dropout = None

    _transient = Layer._transient + ("_input", "_output", "_preact", "_dropout")

    def __repr__(self) -> str:
        frozen = "" if self.trainable else ", frozen"
        return f"Dense({self.in_features}, {self.out_features}, activation={self.activation!r}{frozen})"


class Dropout(Layer):
    """Inverted dropout: in training each element is zeroed with probability ``rate`` (Keras's
    meaning: the fraction dropped) and the rest are scaled by ``1 / (1 - rate)``; in ``predict``,
    ``evaluate`` and validation it is the identity.

    The mask is never stored. It is a function of a key and each element's position
    (``gpubp.philox``: Philox4x32-10, the same on every backend); every training forward draws a
    fresh key from the library's random stream, so ``gb.seed(s)`` and the same calls give the
    same masks, and a resumed checkpoint goes on with the same sequence. Right above a ``Dense``
    its mask is applied by that layer's kernels, never by a pass of its own: in the forward's
    epilogue (on CuPy, the GEMM kernel's ``_dropout`` variant), and regenerated by the backward's
    dz pass, ahead of the gradient GEMMs. Standing first (a dropout on the input) or above another
    Dropout it runs its own elementwise kernel.

    >>> import numpy as np, gpubp as gb
    >>> gb.seed(0)
    >>> model = gb.Sequential([gb.Dense(4, 64, "relu"), gb.Dropout(0.5), gb.Dense(64, 2)], device="cpu")
    >>> x = np.ones((3, 4), np.float32)
    >>> bool(np.array_equal(model.predict(x), model.predict(x)))  # identity outside training
    True
    """

    kind = "dropout"
    width_from_model = True

    def __init__(self, rate: float, name: str | None = None) -> None:
        super().__init__(name)
        self.rate = rate
        # The width is the layer's below (or, standing first, the layer's above): set by Sequential.
        self.in_features = self.out_features = None
        self._key = None  # the backend array (2,) uint32 of the last drawn key
        self._mask = None  # the mask of the last training forward run by this layer itself
        # Where the batch's rows start in the global batch of a data-parallel step (gpubp.distributed
        # sets it): the mask's row counters start there, so the processes draw one process's masks.
        self.rows_from = 0

    @property
    def rate(self) -> float:
        """The fraction of inputs dropped, in [0, 1); checked when set, as by the constructor (a
        rate set out of range would train on outputs scaled by a negative factor)."""
        return self._rate

    @rate.setter
    def rate(self, rate) -> None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)):
            raise TypeError(f"rate: expected a number in [0, 1) (the fraction of inputs dropped), "
                            f"got {type(rate).__name__} {rate!r}")
        if not 0 <= rate < 1:
            raise ValueError(f"rate: expected a number in [0, 1) (the fraction of inputs dropped), got {rate}")
        self._rate = float(rate)

    def connect(self, width: int, where: str, below: str) -> None:
        # A Dropout another live model holds keeps that model's width: a second model may share
        # it at the same width, and one that needs another width takes a Dropout of its own.
        held = self.in_features is not None and width != self.in_features and len(self._holders) > 0
        if held:
            raise ValueError(f"{where}: this Dropout stands in another model at width {self.in_features}, "
                             f"and {below} gives it {width}; give this model a Dropout({self.rate:g}) of its own")
        self.in_features = self.out_features = width

    def _bind(self, backend: ModuleType, dtype=None) -> None:
        super()._bind(backend, dtype)
        self._key = None

    def keeps(self, act: str, need_dx: bool, need_dw: bool) -> tuple[bool, bool]:
        return False, False  # its backward regenerates the mask from the key

    def next_key(self) -> None:
        host = philox.draw_key(_random.generator())
        if self._key is None or not hasattr(self.backend, "copy_into"):
            self._key = self.backend.asarray(host, np.uint32)
        else:
            # The same device array each time: a replayed CUDA graph reads the key from it.
            self.backend.copy_into(self._key, host)

    def mask(self, dtype=np.float32) -> philox.Mask:
        """The mask of the key drawn last, as the kernels take it, its factors in ``dtype``: the
        masked array's (float64 on NumPy; the GPU kernels take float32)."""
        if self._key is None:
            self.next_key()
        return philox.Mask(self._key, *philox.mask_constants(self.rate, dtype), self.rows_from)

    def forward(self, x, out=None, keep_input: bool = False, keep_output: bool = False, training: bool = True,
                logits: bool = False, precision: str = "fp32"):
        """``x`` masked and scaled in training (into ``out``), ``x`` itself otherwise."""
        if not training:
            return x
        self._mask = self.mask(x.dtype)
        return self.backend.dropout_forward(x, self._mask, out)

    def backward(self, dy, need_dx: bool, out_dx=None, precision: str = "fp32"):
        return self.backend.dropout_backward(dy, self._mask, out_dx) if need_dx else None

    def backward_kernels(self, act: str, need_dx: bool, need_dw: bool, precision: str = "fp32") -> list[str]:
        return ["dropout_bwd"] if need_dx else []

    def saved_for_backward(self) -> tuple:
        return self._mask, self._saved_by

    def restore_saved(self, saved: tuple) -> None:
        self._mask, self._saved_by = saved

    def forget(self) -> None:
        self._mask = None

    _transient = Layer._transient + ("_key", "_mask")  # the next training forward draws a key

    def __setstate__(self, state: dict) -> None:
        if "rate" in state:  # pickled before the rate was a checked property
            state = {**state, "_rate": state["rate"]}
            del state["rate"]
        super().__setstate__(state)
        self._key = None

    @property
    def detail(self) -> str:
        return f"rate {self.rate:g}"

    def __repr__(self) -> str:
        return f"Dropout({self.rate:g})"


def plan_backward(trainable: Sequence[bool], need_input_grad: bool) -> list[tuple[bool, bool]]:
    """(need_dx, need_dw) per layer, bottom to top, for layers with these ``trainable`` flags.

    A layer needs dX only if some layer below it is trainable (or the caller wants
    the input gradient); it needs dW/db only if it is trainable itself.
    """
    plan = []
    below_trainable = need_input_grad
    for layer_trainable in trainable:
        plan.append((below_trainable, layer_trainable))
        below_trainable = below_trainable or layer_trainable
    return plan


def dz_formed_above(backend, act: str, masked: bool) -> bool:
    """Whether, on ``backend``, the dX kernel of the dense layer above forms the dz of a layer that
    applied ``act`` (and a Dropout's mask, when ``masked``) to its output: the backend's
    ``FOLDS_DX_ACT`` serves ``act``, and there is something to apply (not an unmasked identity).
    ``Sequential.folded`` and the torch bridge's backward both decide by it."""
    return act in getattr(backend, "FOLDS_DX_ACT", ()) and (masked or act != "identity")


def folded_note(above: str, mask: str | None = None) -> str:
    """A ``BackwardPlan`` note: the dX of the layer named ``above`` applies this layer's act' (and the
    mask of the dropout named ``mask``). ``Sequential.backward_plan`` and the torch bridge's write it."""
    what = "act' is" if mask is None else f"act' and {mask}'s mask are"
    return f"(its {what} applied by {above}'s dX)"


class BackwardPlan(list):
    """``[(layer_name, [kernel, ...]), ...]`` bottom to top: what backward will launch.
    ``notes``: for a layer whose work another layer's kernels do (a Dropout above a Dense, a
    Dense's act' in the dX of the Dense above), where."""

    def __init__(self, entries=(), notes: dict | None = None) -> None:
        super().__init__(entries)
        self.notes = dict(notes or {})

    def __str__(self) -> str:
        if not any(kernels for _, kernels in self):
            return "backward plan: every layer is frozen, so backward launches no kernel"
        width = max(len(name) for name, _ in self)
        lines = ["backward plan (bottom to top):"]
        for name, kernels in self:
            done = ', '.join(kernels) if kernels else self.notes.get(name, '(nothing: skipped)')
            if kernels and name in self.notes:
                done += f"  {self.notes[name]}"
            lines.append(f"  {name:<{width}}  {done}")
        return "\n".join(lines)


def _checked_precision(value) -> str:
    if value not in backends.PRECISIONS:
        raise ValueError(f"precision: expected one of {backends.PRECISIONS}, got {value!r}")
    return value


def _why_not_precision(backend: ModuleType, precision: str, fused: bool) -> str:
    """Why ``backend`` does not run ``precision`` on this device (its ``why_not_precision``)."""
    explain = getattr(backend, "why_not_precision", None)
    return explain(precision, fused) if explain is not None else "tf32 and bf16 need compute capability 8.0 or newer"


def checked_model(model, expected: str = "a gpubp.Sequential") -> Sequential:
    """``model``, a Sequential with at least one layer: else a TypeError saying what it is
    instead (``expected``: what the caller takes), or a ValueError for an empty one."""
    if not isinstance(model, Sequential):
        raise TypeError(f"model: expected {expected}, got {type(model).__name__}")
    if not len(model):
        raise ValueError("model: expected a Sequential with at least one layer")
    return model


class Sequential:
    """A stack of layers (``Dense``, or any :class:`Layer`) on one device.

    ``device``: "auto" (CUDA when CuPy sees a GPU, else the CPU), "cpu" or "cuda";
    ``backend``: "auto", "numpy", "cupy" or "numba". ``GPUBP_DEVICE``/``GPUBP_BACKEND``
    replace an "auto". ``dtype`` is float32 (float64 runs on the NumPy backend only).
    ``fused``: "auto" runs the whole model as one fused forward kernel and two backward
    kernels where the backend has them (cupy) and every layer fits them (at most 8 layers,
    each at most 128 outputs wide); True insists (a ValueError says why it cannot); False
    always runs one layer at a time.
    ``precision``: "fp32" (the default); "tf32", which runs the products on TF32 tensor cores on
    the cupy backend, fused or per layer (inputs rounded to 10 mantissa bits, fp32 accumulation
    and fp32 weights; within 2e-3 of float64 relative to the largest output per layer on N(0, 1)
    data), while the NumPy and Numba backends compute fp32 for it; or "bf16", the products' operands
    rounded to bfloat16 with fp32 accumulation (within 1e-2 relative per layer), fused or per layer
    on the cupy backend, emulated by the NumPy backend (the same rounding, fp32 products) and fp32
    on the Numba backend. Weights, optimizer state, the loss and the updates stay fp32 throughout.
    Tensor-core precisions need compute capability 8.0 or newer (kernels/fused_mlp.cu,
    kernels/gemm_tf32.cuh).
    """

    def __init__(
        self,
        layers: Iterable[Layer] = (),
        device: str = "auto",
        backend: str = "auto",
        dtype=None,
        fused="auto",
        precision: str = "fp32",
    ) -> None:
        if isinstance(layers, Layer) or not isinstance(layers, Iterable):
            hint = " (pass the layers in one list, not one by one)" if isinstance(layers, Layer) else ""
            raise TypeError(f"layers: expected a list of layers, e.g. Sequential([Dense(4, 3), Dense(3, 2)]), "
                            f"got {type(layers).__name__}{hint}")
        self._layers = Layers(layers)
        self._dtype_given = dtype  # what an empty model's add() builds with (None: the first layer's)
        first_index: dict[int, int] = {}  # id(layer) -> where it first stands
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layers[{i}]: expected a gpubp layer such as gpubp.Dense, got {type(layer).__name__}")
            first = first_index.setdefault(id(layer), i)
            if first != i:
                # A layer keeps one input, one output and one gradient for backward: a second
                # position would overwrite the first's, and the gradients would be wrong.
                raise ValueError(f"layers: layers[{first}] and layers[{i}] are the same {type(layer).__name__} "
                                 f"object {layer!r}; give each position a layer of its own")
        # Everything that can refuse the model runs before any layer moves; what the checks set on
        # the layers on the way (a Dropout's width, default names) is put back if one refuses.
        before = [{key: vars(layer)[key] for key in _SET_BY_A_MODEL if key in vars(layer)} for layer in self.layers]
        try:
            moved = self._check_layers(device, backend, dtype, fused, precision)
        except BaseException:
            for layer, state in zip(self.layers, before):
                for key in _SET_BY_A_MODEL:
                    if key in state:
                        vars(layer)[key] = state[key]
                    else:
                        vars(layer).pop(key, None)
            raise
        for i in moved:
            self.layers[i]._bind(self.backend, self.dtype)
        self._scratch = _Buffers()
        self._needs_cache: dict = {}  # (trainable flags, activations, need_input_grad) -> _needs()
        self._stored_plan = None
        self._fused_saved = None  # what the last fused training forward kept for backward
        self._warned_all_frozen = False
        # A training forward draws each Dropout's key first; a CUDA-graph capture turns this off
        # and draws them itself before each replay (gpubp.step).
        self._draw_keys = True
        for layer in self.layers:  # only once the model exists: a refused one holds no layer
            layer._holders.add(self)

    @property
    def layers(self) -> Layers:
        """The layers, bottom to top, read-only (:class:`Layers`): the constructor checks them
        together (widths, names, dtype, where a softmax stands), which an edited list would skip."""
        return self._layers

    @layers.setter
    def layers(self, value) -> None:
        raise AttributeError(f"layers: a model's layers are checked together; use model.add(layer) and "
                             f"model.pop(), as in Keras, or build a new model, gb.Sequential({Layers.HOW})")

    @property
    def dtype(self) -> np.dtype:
        """The weights' dtype, fixed when the model is built (as Keras's ``layer.dtype`` is read-only)."""
        return self._dtype

    @dtype.setter
    def dtype(self, value) -> None:
        raise AttributeError("dtype: a model's dtype is fixed when it is built, and setting it would leave the "
                             "weights in the old one; build a model of the other dtype, gb.Sequential(layers, "
                             "dtype=...) of new layers, and copy the weights over with set_weights(model.get_weights())")

    def _check_layers(self, device, backend, dtype, fused, precision) -> list[int]:
        """Connect and name the layers, pick the backend, dtype, precision and path, and return the
        positions of the layers that must move to this model's backend and dtype; raises (before
        any layer moves) where the model cannot be built."""
        self._adopt_input_width()
        for i, layer in enumerate(self.layers):
            if i:
                layer.connect(self.layers[i - 1].out_features, f"layers[{i}]", f"layers[{i - 1}]")
            if layer.activation in activations.OUTPUT_ONLY and i != len(self.layers) - 1:
                raise ValueError(
                    f"layers[{i}]: activation {layer.activation!r} is allowed on the last layer only "
                    f"(it normalises a whole row); use it on layers[{len(self.layers) - 1}] or pick another"
                )
        self._check_nothing_above_a_probability_head()
        for i, layer in enumerate(self.layers):
            if layer.name is None:
                layer.name = f"{layer.kind}_{i}"
        self.backend_name = backends.resolve(device, backend)
        self.backend = backends.get(self.backend_name)
        if dtype is None:
            dtype = next((layer.dtype for layer in self.layers if layer.dtype is not None), np.float32)
        self._dtype = _checks.parameter_dtype(dtype, "dtype")
        self._check_dtype(self.backend_name)
        # (not `layer.dtype not in (None, self.dtype)`: NumPy takes None for float64, so a
        # float64 layer would stay float64 in a float32 model)
        moved = [i for i, layer in enumerate(self.layers)
                 if layer.backend is not self.backend or (layer.dtype is not None and layer.dtype != self.dtype)]
        for i in moved:
            self._check_movable(i)
        self._precision = _checked_precision(precision)
        self.fused = fused  # picks the path for that precision, or says why it cannot
        return moved

    def _check_movable(self, i: int) -> None:
        """Raise unless ``layers[i]``, which this model would move to its backend and dtype, is
        held by no other live model: moving it would change that model's weights under it (a slice
        or a rebuilt model shares layers on the same backend, in the same dtype, and moves none)."""
        layer = self.layers[i]
        if self._held_elsewhere(layer):
            where = layer.backend.NAME if layer.dtype is None else f"{layer.backend.NAME}, {layer.dtype}"
            raise ValueError(
                f"layers[{i}]: {layer.name!r} belongs to another model ({where}), which this one "
                f"({self.backend_name}, {self.dtype}) would convert under it; build new layers for this model "
                "and copy the weights over with set_weights(other.get_weights())"
            )

    def _held_elsewhere(self, layer: Layer) -> bool:
        """Whether a live model other than this one holds ``layer``. Garbage is collected before
        saying so: a dropped model that a reference cycle keeps (its history, its callbacks) holds none."""
        if not any(model is not self for model in layer._holders):
            return False
        gc.collect()
        return any(model is not self for model in layer._holders)

    def _check_nothing_above_a_probability_head(self) -> None:
        """A Dropout above a sigmoid output layer would scale its probabilities past 1 in training,
        and the losses that take that layer's logits (binary cross-entropy) would be given
        probabilities. (Above a softmax, the loop before this refuses it already.) Not for a slice
        of a model (``model[:2]``): its top may be a hidden sigmoid layer with the model's Dropout
        above it, placed by a model that is not refused, and freezing or predicting through the
        slice is what it is for."""
        if _SLICING.get():
            return
        dense = [i for i, layer in enumerate(self.layers) if isinstance(layer, Dense)]
        if dense and dense[-1] != len(self.layers) - 1:
            head = self.layers[dense[-1]]
            if head.activation in activations.PROBABILITY_HEADS:
                raise ValueError(
                    f"layers[{dense[-1] + 1}]: a {type(self.layers[dense[-1] + 1]).__name__} cannot stand above the "
                    f"{head.activation} output layer layers[{dense[-1]}] (it would scale probabilities past 1 in "
                    "training, and the classification losses take that layer's logits); put it below the output layer"
                )

    def _adopt_input_width(self) -> None:
        """Layers that take their width from the layer below (Dropout) and stand first take it
        from the first layer above them that has one."""
        known = next((layer.in_features for layer in self.layers if not layer.width_from_model), None)
        if self.layers and known is None:
            raise ValueError("layers: no layer fixes the input width (a model of Dropout layers alone); "
                             "add a Dense")
        for i, layer in enumerate(self.layers):
            if not layer.width_from_model:
                break
            layer.connect(known, f"layers[{i}]", "the first layer with a width")

    def _steps(self) -> list[tuple[int, Layer | None]]:
        """(index, Dropout or None) per forward step, bottom to top: a layer that ``takes_dropout``
        and the Dropout right above it run as one step, the layer's kernels applying the mask."""
        steps, i = [], 0
        while i < len(self.layers):
            layer = self.layers[i]
            above = self.layers[i + 1] if i + 1 < len(self.layers) else None
            if layer.takes_dropout and isinstance(above, Dropout):
                steps.append((i, above))
                i += 2
            else:
                steps.append((i, None))
                i += 1
        return steps

    # --------------------------------------------------------------------- container

    def add(self, layer: Layer) -> None:
        """Keras's ``model.add``: ``layer`` on top, checked as the constructor checks the layers
        (widths, dtype, where a softmax stands), the model unchanged where it is refused. The model
        keeps its backend, precision and fused setting, and its dtype once it has a layer (an empty
        model takes the dtype it was given, else the first layer's, as the constructor does). As Keras asks for ``compile``
        again after ``add``, a compiled or trained model is refused: its optimizer would not hold
        the new layer's parameters."""
        if not isinstance(layer, Layer):
            raise TypeError(f"layer: expected a gpubp layer such as gpubp.Dense, got {type(layer).__name__}")
        self._rebuild([*self.layers, layer], "add")

    def pop(self) -> Layer:
        """Keras's ``model.pop``: remove the top layer and return it (its weights as they are),
        the rest checked as a model of them; refused on a compiled or trained model, as ``add``."""
        if not self.layers:
            raise IndexError("pop: the model has no layers")
        top = self.layers[-1]
        self._rebuild(self.layers[:-1], "pop")
        top._holders.discard(self)
        return top

    def _rebuild(self, layers: list, what: str) -> None:
        """This model, built again of ``layers`` with its own settings (``add`` and ``pop``)."""
        if any(key in vars(self) for key in ("_compiled", "optimizer", "history")):
            raise RuntimeError(f"{what}: this model has been compiled or trained, and its optimizer holds the "
                               "parameters it had; change the layers before compile and fit, or build the model "
                               f"wanted, gb.Sequential({Layers.HOW})")
        dtype = self.dtype if self.layers else getattr(self, "_dtype_given", None)
        settings = dict(backend=self.backend_name, dtype=dtype, fused=self.fused, precision=self.precision)
        Sequential(layers, **settings)  # refuses, if anything does, before this model changes
        self.__init__(layers, **settings)

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, index):
        """A layer, or for a slice a Sequential sharing these layers (no copies)."""
        if isinstance(index, slice):
            token = _SLICING.set(True)
            try:
                return Sequential(self.layers[index], backend=self.backend_name, dtype=self.dtype, fused=self.fused,
                                  precision=self.precision)
            finally:
                _SLICING.reset(token)
        return self.layers[index]

    @property
    def precision(self) -> str:
        """What forward and backward compute their products in (see the class). Setting another one
        drops what the last training forward kept: backward runs in the precision of the forward
        whose arrays it reads, so it needs a forward in the new one first."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        previous, self._precision = self._precision, _checked_precision(value)
        try:
            self.uses_fused = self._fused_choice(self._fused, self.backend, self.backend_name)
        except ValueError:
            self._precision = previous
            raise
        if self._precision != previous:
            self._stored_plan = self._fused_saved = None

    @property
    def device(self) -> str:
        return backends.device_of(self.backend_name)

    @property
    def in_features(self) -> int:
        return self._end(0).in_features

    @property
    def out_features(self) -> int:
        return self._end(-1).out_features

    def _end(self, index: int) -> Layer:
        if not self.layers:
            raise ValueError("the model has no layers: give Sequential a list of layers, e.g. [Dense(4, 2)]")
        return self.layers[index]

    def parameters(self) -> list[Parameter]:
        """Every Parameter, trainable and frozen, in Keras order [W0, b0, W1, b1, ...]."""
        return [p for layer in self.layers for p in layer.parameters()]

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        """``(name, Parameter)`` for every parameter, as torch's ``named_parameters()``, named as
        gpubp's files and state dicts name them: ``layers.{i}.weight`` and ``layers.{i}.bias``,
        ``i`` counting the layers that hold weights (a Dropout holds none)."""
        params = self.parameters()
        return zip(parameter_names(len(params)), params)

    def count_params(self) -> int:
        """How many numbers the parameters hold, trainable and frozen, as Keras's ``count_params()``
        (the total that :meth:`summary` ends with)."""
        return sum(math.prod(p.shape) for p in self.parameters())

    def trainable_parameters(self) -> list[Parameter]:
        return [p for p in self.parameters() if p.trainable]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every parameter's gradient, as torch's ``Module.zero_grad``: to None (the default),
        or, with ``set_to_none=False``, to zeros in place (:func:`gpubp.parameter.clear_grads`)."""
        clear_grads(self.parameters(), set_to_none)

    def freeze_to(self, n: int) -> Sequential:
        """Freeze layers [:n] and unfreeze the rest (fastai semantics; negative n counts from the top).
        ``n`` counts positions, Dropouts included, as ``model[:n]`` does."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"n: expected an int, got {type(n).__name__}")
        if not -len(self) <= n <= len(self):
            raise ValueError(f"n: expected an int in [{-len(self)}, {len(self)}] for a {len(self)}-layer model, got {n}")
        cut = n % len(self) if n < 0 else n
        for i, layer in enumerate(self.layers):
            layer.trainable = i >= cut
        return self

    @property
    def trainable(self) -> bool:
        """Whether any layer trains. Setting it freezes (False) or unfreezes (True) every layer, as
        Keras's ``model.trainable = False`` does; a slice (``model[:2].trainable = False``) shares
        the model's layers, so it freezes those."""
        return any(layer.trainable for layer in self.layers)

    @trainable.setter
    def trainable(self, value: bool) -> None:
        if _checks.boolean(value, "trainable"):
            self.unfreeze()
        else:
            self.freeze()

    def freeze(self) -> Sequential:
        """Freeze every layer, the top one too, as ``model.trainable = False`` does (Keras). fastai's
        ``Learner.freeze()``, which keeps the head training, is ``freeze_to(-1)`` here."""
        for layer in self.layers:
            layer.freeze()
        return self

    def unfreeze(self) -> Sequential:
        """Unfreeze every layer (fastai's ``unfreeze``; Keras's ``model.trainable = True``)."""
        for layer in self.layers:
            layer.unfreeze()
        return self

    def summary(self, print_fn: Callable[[str], object] | None = None) -> str:
        """The layers, one a line, then Keras's totals; returns the text (it prints nothing), and
        calls ``print_fn`` with it when given (``model.summary(print)``). Trainable params count per
        Parameter: a frozen weight under a bias that trains is non-trainable."""
        lines = [f"Sequential on {self.device} (backend {self.backend_name!r}, {self.dtype})"]
        for layer in self.layers:
            count = sum(int(np.prod(param.shape)) for param in layer.parameters())
            state = "" if not layer.parameters() else "trainable" if layer.trainable else "frozen"
            lines.append(f"  {layer.name:<10} {layer.in_features:>6} -> {layer.out_features:<6} "
                         f"{layer.detail:<11} {count:>10,} params  {state}")
        sizes = [(int(np.prod(param.shape)), param.trainable) for param in self.parameters()]
        total, trainable = sum(size for size, _ in sizes), sum(size for size, trains in sizes if trains)
        lines += [f"Total params: {total:,}", f"Trainable params: {trainable:,}",
                  f"Non-trainable params: {total - trainable:,}"]
        text = "\n".join(lines)
        if print_fn is not None:
            print_fn(text)
        return text

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"Sequential([\n  {inner}\n], backend={self.backend_name!r})"

    # --------------------------------------------------------------------- copies

    # What fit sets that a copy leaves out (fit sets them again for the copy): the optimizer
    # updates the original's Parameters, and a scheduler steps that optimizer (copy an optimizer
    # with its model in one deepcopy for one of the copy's). ``compile`` settings are kept.
    _not_copied = ("_scratch", "_needs_cache", "_stored_plan", "_fused_saved", "optimizer", "scheduler",
                   "_named_optimizers")

    def __getstate__(self) -> dict:
        """What ``copy.deepcopy(model)`` and ``pickle`` take: the layers (their weights on the host), the
        settings, ``compile``'s loss, metrics and rate, and ``history``. The backend goes by name; buffers and
        what a forward kept for backward are left out, and so are ``optimizer`` and ``scheduler`` (fit sets
        them again). An optimizer given to ``compile`` as an instance is rebuilt afresh over the copy's
        Parameters, with its param groups' options but without its state (moments, step counts)."""
        state = {key: value for key, value in vars(self).items() if key not in self._not_copied}
        state["backend"] = self.backend_name
        compiled = state.get("_compiled")
        if compiled is not None and not isinstance(compiled.get("optimizer", ""), str):
            state["_compiled"] = {**compiled, "optimizer": self._optimizer_recipe(compiled["optimizer"])}
        return state

    def __setstate__(self, state: dict) -> None:
        """A model on the same backend as the original, holding the copied layers."""
        state = dict(state)
        for name in ("layers", "dtype"):  # pickled before they were read-only properties
            if name in state:
                state[f"_{name}"] = state.pop(name)
        state["_layers"] = Layers(state["_layers"])
        self.__dict__.update(state, backend=backends.get(state["backend"]), _scratch=_Buffers(), _needs_cache={},
                             _stored_plan=None, _fused_saved=None)
        self.uses_fused = self._fused_choice(self._fused, self.backend, self.backend_name)  # this machine's GPU
        for layer in self.layers:
            layer._holders.add(self)
        compiled = state.get("_compiled")
        if compiled is not None and not isinstance(compiled.get("optimizer", ""), str):
            optimizer = None if compiled["optimizer"] is None else self._from_recipe(compiled["optimizer"])
            self._compiled = {key: value for key, value in compiled.items() if key != "optimizer"}
            if optimizer is not None:
                self._compiled["optimizer"] = optimizer

    def _optimizer_recipe(self, optimizer) -> tuple | None:
        """(class, the positions in ``parameters()`` of the Parameters it updates, its
        ``state_dict()``'s param groups): ``optimizer`` without its Parameters or state, as a
        checkpoint keeps it; None when it updates Parameters this model does not have."""
        positions = {id(param): i for i, param in enumerate(self.parameters())}
        updated = getattr(optimizer, "parameters", list)()
        if not updated or any(id(param) not in positions for param in updated):
            return None
        return type(optimizer), [positions[id(param)] for param in updated], optimizer.state_dict()["param_groups"]

    def _from_recipe(self, recipe):
        """A fresh optimizer of ``_optimizer_recipe``'s over this model's Parameters, its groups'
        options loaded as a checkpoint's are (``gpubp.checkpoint``) with no state; None where its
        class cannot be built so (``fit`` then uses its default)."""
        optimizer_class, positions, groups = recipe
        params = self.parameters()
        try:
            optimizer = optimizer_class([{"params": [params[positions[i]] for i in group["params"]]}
                                         for group in groups])
            optimizer.load_state_dict({"state": {}, "param_groups": groups})
        except (TypeError, ValueError):
            return None
        return optimizer

    # --------------------------------------------------------------------- devices

    def _check_dtype(self, backend_name: str) -> None:
        if not backends.computes_in(backend_name, self.dtype):
            raise ValueError(f"dtype: the {backend_name!r} backend computes in float32, got {self.dtype}")

    def to(self, device: str = "auto", backend: str = "auto") -> Sequential:
        """Move the parameters to another device/backend; returns self.

        Optimizer state lives with the arrays it was made for: build the optimizer after ``to``,
        or move its state along with ``opt.load_state_dict(opt.state_dict())``. A ValueError refuses
        to move layers that another live model holds too (a slice, ``model[:2]``, holds its model's),
        since that model would find them on a backend it is not on.
        """
        name = backends.resolve(device, backend)
        self._check_dtype(name)
        target = backends.get(name)
        uses_fused = self._fused_choice(self._fused, target, name)  # raises before anything moves
        moved = [layer for layer in self.layers if layer.backend is not target]  # none onto its own backend
        for layer in moved:
            if self._held_elsewhere(layer):
                raise ValueError(
                    f"to: layer {layer.name!r} is also held by another model (a slice of this one, or a model built "
                    f"from its layers), which moving it to {name!r} would break; drop that model first, or build new "
                    "layers for this one and copy the weights over with set_weights(other.get_weights())"
                )
        for layer in moved:
            layer._bind(target, self.dtype)
        self.backend_name, self.backend = name, target
        self._scratch.clear()
        self._stored_plan = self._fused_saved = None
        self.uses_fused = uses_fused
        return self

    # --------------------------------------------------------------------- fused kernels

    @property
    def fused(self):
        """"auto", True or False, as given; ``uses_fused`` says whether the fused kernels run."""
        return self._fused

    @fused.setter
    def fused(self, value) -> None:
        value = _checks.switch(value, "fused")
        self.uses_fused = self._fused_choice(value, self.backend, self.backend_name)
        self._fused = value

    def _fused_choice(self, value, backend: ModuleType, backend_name: str) -> bool:
        """Whether ``fused=value`` runs the fused kernels on ``backend``; raises where it must and cannot."""
        why_not = self.why_not_fused(backend, backend_name)
        if value is True and why_not is not None:
            raise ValueError(f"fused=True: {why_not}; pass fused='auto' to run one layer at a time instead")
        uses_fused = value is not False and why_not is None
        if not uses_fused and self.precision not in backend.dense_precisions():
            why = _why_not_precision(backend, self.precision, False)
            raise ValueError(f"precision={self.precision!r}: this GPU runs the dense kernels in "
                             f"{backend.dense_precisions()} only ({why})")
        if uses_fused and self.precision not in backend.fused_precisions():
            why = _why_not_precision(backend, self.precision, True)
            raise ValueError(f"precision={self.precision!r}: this GPU runs the fused MLP kernels in "
                             f"{backend.fused_precisions()} only ({why})")
        return uses_fused

    def why_not_fused(self, backend: ModuleType | None = None, backend_name: str | None = None) -> str | None:
        """None when this model fits the fused MLP kernels of its backend (or of ``backend``), else why not."""
        backend, backend_name = backend or self.backend, backend_name or self.backend_name
        max_width = getattr(backend, "FUSED_MLP_MAX_WIDTH", 0)
        if not max_width:
            return f"the {backend_name!r} backend has no fused MLP kernels (the 'cupy' backend does)"
        if not self.layers:
            return "the model has no layers"
        if len(self) > backend.FUSED_MLP_MAX_LAYERS:
            return f"the model has {len(self)} layers; the fused kernels take at most {backend.FUSED_MLP_MAX_LAYERS}"
        for layer in self.layers:
            if isinstance(layer, Dropout):
                return (f"layer {layer.name!r} is a Dropout; the fused kernels apply no dropout mask yet "
                        "(the per-layer kernels apply it)")
            if not isinstance(layer, Dense):
                return f"layer {layer.name!r} is a {type(layer).__name__}; the fused kernels run Dense layers only"
            if layer.out_features > max_width:
                return (f"layer {layer.name!r} has out_features={layer.out_features}; "
                        f"the fused kernels take at most {max_width}")
        here = getattr(backend, "why_not_fused_here", None)  # this GPU: its tensor cores, its shared memory
        return here(self.precision, self.in_features) if here is not None else None

    @property
    def takes_sparse(self) -> bool:
        """Whether a SciPy sparse batch reaches the first layer as it is, its zeros skipped in the
        forward's product and in dW: on the NumPy backend (``SPARSE_INPUT``), under a first layer
        that is a Dense (or a subclass with Dense's own forward and backward). Elsewhere, and for a
        batch the backend's ``multiplies_sparse`` turns down (one that stores more than
        ``SPARSE_MAX_DENSITY`` of its entries, or a small one), it is made dense first."""
        first = self.layers[0] if self.layers else None
        # A subclass of Dense with a forward or backward of its own is written for an array x.
        return (getattr(self.backend, "SPARSE_INPUT", False) and not self.uses_fused and isinstance(first, Dense)
                and type(first).forward is Dense.forward and type(first).backward is Dense.backward)

    def as_input(self, x, name: str = "x"):
        """Validate ``x`` (B, in_features) and return it as this model's backend array; a SciPy
        sparse ``x`` (or ``batches.SparseRows``) as CSR in the model's dtype where ``takes_sparse``
        and the backend multiplies it sparse (``multiplies_sparse``), else made dense."""
        if isinstance(x, batches.SparseRows) or _checks.is_sparse(x):
            rows = x if isinstance(x, batches.SparseRows) else batches.sparse_rows(x, name, self.in_features)
            _checks.batch_shape(rows.shape, self.in_features, name)
            _checks.float_dtype(rows.dtype, name)
            if self.takes_sparse and self.backend.multiplies_sparse(rows.matrix, self.layers[0].out_features):
                return rows.matrix.astype(self.dtype, copy=False)
            x = rows[:]
        if _checks.array_kind(x) == "other" or _checks.is_bfloat16(x.dtype):
            x = _checks.to_numpy(x, name, f"a 2-D array of shape (batch, {self.in_features})")
        _checks.batch_shape(x.shape, self.in_features, name)
        _checks.float_dtype(x.dtype, name)
        return self._on_backend(x, name)

    # --------------------------------------------------------------------- forward / backward

    def _plan(self, need_input_grad: bool) -> list[tuple[bool, bool]]:
        return plan_backward([layer.trainable for layer in self.layers], need_input_grad)

    def _grads_wanted(self, plan) -> tuple[list[bool], list[bool]]:
        """(need_dw, need_db) per layer for the fused kernels, from ``plan``: a layer that trains
        needs dW where its weight trains and db where its bias does."""
        flags = [layer.trainable_flags() if trains else (False, False)
                 for layer, (_, trains) in zip(self.layers, plan)]
        return [weight for weight, _ in flags], [bias for _, bias in flags]

    def _needs(self, need_input_grad: bool, logits: bool) -> tuple[list, list[bool], list[bool]]:
        """(backward plan, whether each layer keeps its input, its output) for the layers as they
        are now; a training step asks twice, so it is kept per freezing state (a few entries)."""
        flags = tuple(layer.trainable_flags() for layer in self.layers)
        acts = self._applied(logits)
        key = (flags, tuple(acts), need_input_grad)
        needs = self._needs_cache.get(key)
        if needs is None:
            plan = plan_backward([any(layer_flags) for layer_flags in flags], need_input_grad)
            keeps = [layer.keeps(act, dx, dw) for layer, act, (dx, dw) in zip(self.layers, acts, plan)]
            needs = plan, [kept for kept, _ in keeps], [kept for _, kept in keeps]
            if len(self._needs_cache) > 16:
                self._needs_cache.clear()
            self._needs_cache[key] = needs
        return needs

    def _head(self) -> int:
        """The index of the layer whose output is the model's logits: the last layer, or with
        Dropouts on top the one below them (they pass its output through outside training)."""
        head = len(self) - 1
        while isinstance(self.layers[head], Dropout):
            head -= 1
        return head

    def _applied(self, logits: bool) -> list[str]:
        """The activation each layer applies; ``logits=True`` leaves the head's (``_head``) out."""
        acts = [layer.activation for layer in self.layers]
        if logits:
            acts[self._head()] = "identity"
        return acts

    def backward_plan(self, need_input_grad: bool = False, logits: bool = False) -> BackwardPlan:
        """Per layer, bottom to top, exactly the kernels ``backward`` will launch
        (after a ``forward`` with the same ``logits``, in the model's ``precision``). With the fused
        kernels, one entry names the span of layers the fused backward covers and its launches."""
        need_input_grad = _checks.boolean(need_input_grad, "need_input_grad")
        logits = _checks.boolean(logits, "logits")
        plan = self._plan(need_input_grad)
        if self.uses_fused and any(dx or dw for dx, dw in plan):
            lowest = min(i for i, (dx, dw) in enumerate(plan) if dx or dw)
            span = f"{self.layers[lowest].name}..{self.layers[-1].name} (fused)"
            need_dw, need_db = self._grads_wanted(plan)
            return BackwardPlan([(span, self.backend.fused_backward_kernels(self._applied(logits)[-1], need_dw,
                                                                             need_db))])
        acts, entries, notes = self._applied(logits), [None] * len(self), {}
        folds = self.folded(plan, acts)
        for i, dropout in self._steps():
            layer, (need_dx, need_dw) = self.layers[i], plan[i]
            if i in folds:  # its dz comes from the dX above: it runs as an unmasked identity layer
                above = self.layers[folds[i]].name
                entries[i] = (layer.name, layer.backward_kernels("identity", need_dx, need_dw, self.precision))
                notes[layer.name] = folded_note(above, None if dropout is None else dropout.name)
                if dropout is not None:
                    entries[i + 1] = (dropout.name, [])
                    notes[dropout.name] = f"(its mask is regenerated by {above}'s dX)"
            elif dropout is None:
                entries[i] = (layer.name, layer.backward_kernels(acts[i], need_dx, need_dw, self.precision))
            else:
                entries[i] = (layer.name, layer.backward_kernels(acts[i], need_dx, need_dw, self.precision,
                                                                 dropout=True))
                entries[i + 1] = (dropout.name, [])
                if entries[i][1]:  # a frozen layer below the lowest trainable one runs nothing to regenerate it in
                    notes[dropout.name] = f"(its mask is regenerated by {layer.name}'s kernels)"
        return BackwardPlan(entries, notes)

    def forward(self, x, training: bool = True, need_input_grad: bool = False, logits: bool = False):
        """Run the model on ``x`` (B, in_features); returns (B, out_features) on the model's device.
        A SciPy sparse ``x`` reaches the first layer sparse where the model ``takes_sparse``.

        ``training=True`` keeps what the following ``backward`` will read, and no more:
        a layer that computes nothing in backward keeps nothing, so a frozen prefix
        costs no activation memory. ``training=False`` (predict/evaluate) keeps nothing.
        ``logits=True`` returns the last layer's pre-activation (the logits of a sigmoid or
        softmax head) for a loss that applies the activation itself, fused and stable;
        the following ``backward`` then takes the gradient of the logits. With Dropouts on top,
        it is the pre-activation of the layer below them (masked by them in training).
        The returned array is a new one each call (intermediate buffers are reused call to call),
        but it may be the very array the last layer keeps for backward: it is the model's until the
        next forward, so copy it before changing it in place, or the gradients change with it.
        """
        if not self.layers:
            raise ValueError("forward: the model has no layers")
        training = _checks.boolean(training, "training")
        need_input_grad = _checks.boolean(need_input_grad, "need_input_grad")
        logits = _checks.boolean(logits, "logits")
        h = self.as_input(x)
        batch = h.shape[0]
        if training and self._draw_keys:
            self.draw_keys()
        if training:
            _, keeps_input, keeps_output = self._needs(need_input_grad, logits)
        else:
            keeps_input = keeps_output = [False] * len(self)
        if self.uses_fused:
            h = self._fused_forward(h, keeps_input, keeps_output, training, logits)
        else:
            h = self._layer_forward(h, keeps_input, keeps_output, training, logits)
        if training:
            # A slice or a model sharing these layers overwrites what they keep: backward checks this.
            forward_call = next(_training_forwards)
            for layer in self.layers:
                layer._saved_by = forward_call
            self._stored_plan = (keeps_input, keeps_output, logits, batch, self.out_features, forward_call)
        return h

    def draw_keys(self) -> None:
        """Draw each layer's randomness for the next training forward (a Dropout's key) from the
        library's stream, bottom to top: what every training forward does first."""
        for layer in self.layers:
            layer.next_key()

    def _layer_forward(self, h, keeps_input, keeps_output, training: bool, logits: bool):
        """One dense_forward per layer, each keeping its own arrays for backward."""
        batch = h.shape[0]
        if training:
            self._fused_saved = None
        head = self._head()
        # The step that writes the model's output gives a fresh array (out=None). Outside
        # training a Dropout passes its input through, so with Dropouts on top that is the step
        # below them; a later step writing into a scratch buffer would return that buffer.
        output_from = len(self) - 1 if training else head
        # The scratch buffer (of two per shape) the next step may write into: never the one that
        # holds its input. Only a step that wrote into it moves on to the other; one that passes
        # its input through (a Dropout outside training) leaves the step above reading the same.
        slot = 0
        for i, dropout in self._steps():
            layer = self.layers[i]
            top = i if dropout is None else i + 1  # the last layer whose output this step writes
            shape = (batch, layer.out_features)
            scratch = None
            if top >= output_from:
                out = None
            # What act' reads is the output, or z (NEEDS_Z), which the layer keeps in a buffer of its own.
            elif keeps_input[top + 1] or (keeps_output[i] and layer.activation not in activations.NEEDS_Z):
                out = layer._buffers.get(self.backend, "y", shape, self.dtype)
            else:
                if training:
                    # This layer's output is no longer kept: give its buffer back.
                    layer._buffers.drop("y", shape)
                out = scratch = self._scratch.get(self.backend, ("y", "train" if training else "infer", slot), shape,
                                                  self.dtype)
            fused = {} if dropout is None else {"dropout": dropout}
            h = layer.forward(h, out, keeps_input[i], keeps_output[i], training, logits and i == head, self.precision,
                              **fused)
            if scratch is not None and _contract.overlap(h, scratch):
                slot ^= 1
        return h

    def _fused_forward(self, h, keeps_input, keeps_output, training: bool, logits: bool):
        """The whole model in one fused launch; the model keeps what the fused backward reads."""
        acts = self._applied(logits)
        y, inputs, act_inputs = self.backend.fused_mlp_forward(
            h, [layer.weight.data for layer in self.layers], [layer.bias.data for layer in self.layers], acts,
            keeps_input, keeps_output, self.precision)
        if training:
            self._fused_saved = (acts, inputs, act_inputs)
            for layer in self.layers:  # nothing of an earlier per-layer forward stays alive
                layer.forget()
        return y

    __call__ = forward

    def backward(self, dout, need_input_grad: bool = False):
        """Backpropagate ``dout`` (B, out_features), the gradient of the loss w.r.t. the output.

        Fills ``.grad`` of trainable Parameters only. Layers below the lowest trainable
        layer do no work; frozen layers launch no dW/db kernel (a frozen weight under a bias that
        trains, no dW kernel); a frozen layer between trainable ones launches only dX. Returns dX
        of the input if ``need_input_grad``, which works after any training forward that kept
        what dX reads (every layer's output when the first layer is trainable);
        ``forward(x, need_input_grad=True)`` keeps it in every case.
        """
        if not self.layers:
            raise ValueError("backward: the model has no layers")
        need_input_grad = _checks.boolean(need_input_grad, "need_input_grad")
        kept_logits = self._stored_plan[2] if self._stored_plan is not None else False
        plan, needs_input, needs_output = self._needs(need_input_grad, kept_logits)
        for layer, (_, trains) in zip(self.layers, plan):
            if not trains:  # frozen, perhaps a Parameter at a time, which does not reach the layer
                layer.drop_grad_buffers()
        if not any(dx or dw for dx, dw in plan):
            self._check_unread_grad(dout)
            if not self._warned_all_frozen:
                warnings.warn("backward: every layer is frozen, so no kernel is launched", stacklevel=2)
                self._warned_all_frozen = True
            return None
        if self._stored_plan is None:
            raise RuntimeError("backward: run forward(x) in training mode first (none has run since the model "
                               "was built, moved, given weights or set to another precision)")
        kept_input, kept_output, logits, batch, width, forward_call = self._stored_plan
        if not all(has or not needs for has, needs in zip(kept_input + kept_output, needs_input + needs_output)):
            self._check_kept(plan, kept_input, kept_output, logits, need_input_grad)
        lowest = min(i for i, (dx, dw) in enumerate(plan) if dx or dw)
        if self._fused_saved is None:  # (a fused forward's arrays are the model's own)
            self._check_saved_by(forward_call, lowest, kept_input[lowest])
        dy = self._as_grad(dout, (batch, width))
        if self._fused_saved is not None:
            return self._fused_backward(dy, plan, need_input_grad)
        applied_below = {i + 1 for i, dropout in self._steps() if dropout is not None}
        folds = self.folded(plan, self._applied(logits))
        below = {upper: lower for lower, upper in folds.items()}
        # The two dX buffers alternate by the layers that wrote into them, not by position: with a
        # Dropout skipped between them, two Dense layers two apart would share one, and the lower
        # one's dX kernel would write over the dz (its dy) it is still reading; a layer of your own
        # that returns its dy as its dX leaves the layer below reading the same buffer.
        parity = 0
        for i in range(len(self) - 1, lowest - 1, -1):
            if i in applied_below:
                continue  # the layer below regenerates this Dropout's mask in its own backward
            layer = self.layers[i]
            need_dx = plan[i][0]
            out_dx = None
            if need_dx and i > 0:
                out_dx = self._scratch.get(self.backend, ("dx", parity), (batch, layer.in_features), self.dtype)
            fold = {}
            if i in below:
                fold["below"] = self.layers[below[i]]
            if i in folds:
                fold["folded"] = True
            dy = layer.backward(dy, need_dx, out_dx, self.precision, **fold)
            if out_dx is not None and _contract.overlap(dy, out_dx):
                parity ^= 1
        return dy if need_input_grad else None

    def _check_saved_by(self, forward_call: int, lowest: int, input_kept: bool) -> None:
        """Raise unless what the layers this backward reads keep is from this model's last training
        forward (``forward_call``): a slice or another model sharing them overwrites it when it runs
        its own. The layers from ``lowest`` up, and the step below them whose buffer holds their input."""
        first = lowest
        if input_kept and lowest:
            first = max(i for i, _ in self._steps() if i < lowest)
        for layer in self.layers[first:]:
            if layer._saved_by != forward_call:
                raise RuntimeError(
                    f"backward: layer {layer.name!r} now keeps what another model's forward (a slice of this "
                    "model, or a model sharing its layers) stored, which ran since this model's forward; "
                    "run forward(x) on this model again first"
                )

    def folded(self, plan, acts) -> dict[int, int]:
        """{layer: the layer above whose dX kernel forms its dz}, given the backward ``plan`` and the
        activations ``acts`` the forward applied: on a backend with ``FOLDS_DX_ACT`` (the
        activations it does this for), each layer with one of them that ``folds_act`` whose output
        is the input of another that does and computes dX, right above it or above the Dropout it
        runs with; that dX's epilogue applies its act' (and regenerates the Dropout's mask), so its
        dz costs no pass of its own. An identity layer without a Dropout has nothing to apply."""
        if not getattr(self.backend, "FOLDS_DX_ACT", ()):
            return {}
        layers, folds = self.layers, {}
        for i, dropout in self._steps():
            upper = i + (1 if dropout is None else 2)
            if (upper < len(layers) and layers[i].folds_act and layers[upper].folds_act and plan[upper][0]
                    and dz_formed_above(self.backend, acts[i], dropout is not None)):
                folds[i] = upper
        return folds

    def _fused_backward(self, dy, plan, need_input_grad: bool):
        """Backward of a fused forward: the dX chain and every dW/db in two launches."""
        acts, inputs, act_inputs = self._fused_saved
        need_dx = [dx for dx, _ in plan]
        need_dw, need_db = self._grads_wanted(plan)
        buffers = [layer.grad_buffers(dw) if trains else (None, None)
                   for layer, dw, (_, trains) in zip(self.layers, need_dw, plan)]
        out_dw, out_db = [dw for dw, _ in buffers], [db for _, db in buffers]
        dx = self.backend.fused_mlp_backward(dy, [layer.weight.data for layer in self.layers], acts, inputs,
                                             act_inputs, need_dx, need_dw, out_dw, out_db, self.precision,
                                             need_db=need_db)
        for layer, (dw, db) in zip(self.layers, buffers):
            if db is not None:
                layer.take_grads(dw, db)
        return dx if need_input_grad else None

    def _check_kept(self, plan, kept_input, kept_output, logits: bool, need_input_grad: bool) -> None:
        """Raise unless the last training forward kept every array this backward reads."""
        for layer, act, (dx, dw), has_input, has_output in zip(
                self.layers, self._applied(logits), plan, kept_input, kept_output):
            needs_input, needs_output = layer.keeps(act, dx, dw)
            missing = "output" if needs_output and not has_output else None
            if needs_input and not has_input:
                missing = "input"
            if missing is None:
                continue
            if need_input_grad:
                hint = "pass need_input_grad=True to forward, so that layers that train nothing keep what dX reads"
            else:
                hint = "with the layers frozen as they are now"
            raise RuntimeError(
                f"backward: run forward(x) in training mode again first ({hint}): layer {layer.name!r} "
                f"needs its {missing}, which the last training forward did not keep"
            )

    def _check_unread_grad(self, dout) -> None:
        """Refuse the ``dout`` of a backward that reads none (every layer frozen) where one that reads
        it would: a wrong shape, or no float array, is the caller's mistake either way."""
        stored = self._stored_plan
        batch = stored[3] if stored is not None else None
        if _checks.array_kind(dout) == "other":  # as _as_grad takes it
            dout = _checks.to_numpy(dout, "dout", f"an array of shape ({batch if batch is not None else 'batch'}, "
                                                  f"{self.out_features}) (the last forward's output)")
        if dout.ndim != 2 or dout.shape[1] != self.out_features or batch not in (None, dout.shape[0]):
            expected = (batch if batch is not None else "batch", self.out_features)
            raise ValueError(f"dout: expected shape ({expected[0]}, {expected[1]}) (the last forward's output), "
                             f"got {tuple(dout.shape)}")
        _checks.float_dtype(dout.dtype, "dout")

    def _as_grad(self, dout, shape: tuple):
        if _checks.array_kind(dout) == "other":
            dout = _checks.to_numpy(dout, "dout", f"an array of shape {shape} (the last forward's output)")
        if tuple(dout.shape) != shape:
            raise ValueError(f"dout: expected shape {shape} (the last forward's output), got {tuple(dout.shape)}")
        _checks.float_dtype(dout.dtype, "dout")
        return self._on_backend(dout, "dout")

    def _on_backend(self, array, name: str):
        """``array`` as this model's backend array in the model's dtype (a copy only if needed)."""
        if self.backend.is_array(array):
            return array if array.dtype == self.dtype else self.backend.asarray(array, self.dtype)
        if _checks.array_kind(array) == "numpy":
            return self.backend.asarray(array, self.dtype)
        raise TypeError(
            f"{name}: got a {type(array).__module__}.{type(array).__name__} (GPU memory) but the model is on "
            f"{self.device} (backend {self.backend_name!r}); pass a NumPy array or move the model with model.to('cuda')"
        )

    def activation_bytes(self) -> int:
        """Bytes of activations kept by the last training forward for backward to read."""
        seen = {}
        stored = [array for layer in self.layers for array in layer.stored_arrays()]
        if self._fused_saved is not None:
            stored += [array for arrays in self._fused_saved[1:] for array in arrays if array is not None]
        for array in stored:  # a CSR batch of input (``takes_sparse``): its three arrays
            seen[id(array)] = (array.nbytes if hasattr(array, "nbytes")
                               else array.data.nbytes + array.indices.nbytes + array.indptr.nbytes)
        return sum(seen.values())

    # --------------------------------------------------------------------- weights

    def get_weights(self) -> list[np.ndarray]:
        """NumPy copies in Keras order [W0, b0, W1, b1, ...], W as (in, out)."""
        return [np.array(p.backend.to_host(p.data), copy=True) for p in self.parameters()]

    def set_weights(self, weights: Sequence) -> None:
        """Load [W0, b0, W1, b1, ...]; every shape is checked before any weight changes."""
        _assign(self.parameters(), weights, self.dtype, "[W0, b0, W1, b1, ...]", "the model")
        self._stored_plan = None

    # --------------------------------------------------------------------- training (see train.py)
    #
    # The training loop sits above the layers (its callbacks save checkpoints, which rebuild
    # models), so these methods reach it when called, not when this module loads.

    def compile(self, optimizer="adam", loss="cross_entropy", metrics=None, learning_rate: float | None = None) -> None:
        """Keras-style defaults for ``fit``/``evaluate``; see :func:`gpubp.train.compile`."""
        from gpubp import train

        self._end(-1)  # a model without layers says so, not that there are no parameters to optimize
        train.compile(self, optimizer=optimizer, loss=loss, metrics=metrics, learning_rate=learning_rate)

    def fit(self, x, y, **kwargs):
        """Train; see :func:`gpubp.train.fit` for the arguments. Returns a History."""
        from gpubp import train

        return train.fit(self, x, y, **kwargs)

    def train_step(self, loss=None, optimizer=None, cuda_graph=False, clip_grad_norm: float | None = None):
        """One training step as a callable, ``step(x, y) -> loss``, optionally replayed from a
        CUDA graph; see :class:`gpubp.step.TrainStep`."""
        from gpubp.step import TrainStep

        self._end(-1)  # a model without layers says so, not that there are no parameters to optimize
        return TrainStep(self, loss=loss, optimizer=optimizer, cuda_graph=cuda_graph, clip_grad_norm=clip_grad_norm)

    def evaluate(self, x, y, *, verbose: int = 0, **kwargs) -> dict:
        """``{"loss": ..., metric: ...}`` on (x, y); see :func:`gpubp.batches.evaluate`.
        ``verbose`` is checked as ``fit``'s (0, 1 or 2): 0, the default, prints nothing; 1 and 2
        print one line of the results once computed, as ``fit(verbose=2)`` prints an epoch's
        (``evaluate - 0.01s - loss: 0.1398 - accuracy: 0.9700``), where Keras also draws a bar."""
        from gpubp import train

        return train.evaluate_verbosely(self, x, y, verbose, **kwargs)

    def predict(self, x, batch_size: int = 1024, logits: bool = False, *, verbose: int = 0) -> np.ndarray:
        """Outputs for ``x`` as a NumPy array; see :func:`gpubp.batches.predict`. ``verbose`` is
        checked as ``fit``'s (0, 1 or 2), so Keras's ``predict(x, verbose=0)`` runs; predict prints
        nothing at any level (Keras's progress bar only times the batches; the outputs are returned)."""
        from gpubp import train

        train.check_verbose(verbose)
        return batches.predict(self, x, batch_size=batch_size, logits=logits)

    def save(self, path) -> None:
        """Write the architecture and weights to ``.npz`` or ``.safetensors``, or the inference graph to
        ``.onnx`` (atomically)."""
        from gpubp import io

        io.save(self, path)
