"""One training step as an object, optionally captured in a CUDA graph and replayed.

``model.train_step(loss, optimizer)`` returns a :class:`TrainStep`; ``step(x, y)`` runs the
forward pass, the loss, the backward pass and the optimizer update of one batch and returns
the loss, exactly as one batch of ``fit`` does (``fit`` runs its batches through one).

>>> import numpy as np, gpubp as gb
>>> gb.seed(0)
>>> model = gb.Sequential([gb.Dense(4, 8, "relu"), gb.Dense(8, 3)], device="cpu")
>>> step = model.train_step("cross_entropy", gb.optim.SGD(model.parameters(), lr=0.1))
>>> x, y = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32), np.arange(16) % 3
>>> first = step(x, y)
>>> all(step(x, y) < first for _ in range(5))
True

With ``cuda_graph=True`` (the cupy backend) a small batch stops paying one Python call and
one kernel launch per kernel: the whole step (about three kernels per layer, the loss, one
update per parameter) is recorded once into a CUDA graph and then replayed with one launch.

- The first call with a new signature (batch size, frozen layers, precision, the arrays of
  the parameters and of the optimizer state, the optimizer's options other than the learning
  rate) runs eagerly: it loads every kernel and makes every buffer and the optimizer state.
- The next call with that signature captures the step on static input buffers, then replays
  it. Later calls copy the batch into those buffers and replay.
- What changes from step to step, the learning rate and Adam's bias corrections, is written
  to a small device array before each replay, where the update kernels read it. A learning
  rate schedule therefore needs no new capture. So are the keys of the Dropout masks: each
  replay draws new ones from the library's random stream, as an eager step does, and copies
  them to the device arrays the mask kernels read, so a replay drops other elements than the
  last and the same seed gives the same masks with graphs or without.
- The loss is written on the device and read back once per step. An update whose loss is not
  finite is skipped on the device, so the weights stay those of the previous step, as in an
  eager ``fit``.
- Another batch size (``fit``'s last, shorter batch) or signature runs eagerly once and is
  captured on its next call; the newest few graphs are kept. A schedule that changes the
  momentum too (OneCycleLR's ``cycle_momentum``) changes the signature every step, so those
  steps run eagerly.
- ``clip_grad_norm`` (of the gradients of the parameters the optimizer updates) is captured too:
  the norm is summed on the device and the gradients scaled there (``clip_``), the scale
  computed in double as the eager step computes it on the host.
- A capture that fails (a CUDA error) raises under ``cuda_graph=True``; under ``"auto"`` a
  RuntimeWarning says why, and steps with that signature run eagerly.
- Not captured (the step runs eagerly, and ``cuda_graph=True`` says why): a backend without
  graphs, a loss function of your own, and a softmax output layer trained with a loss that
  does not take its logits (its softmax runs as CuPy array operations, whose temporaries a
  graph cannot keep).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import numpy as np

from gpubp import _checks, batches, losses, optim
from gpubp.optim.optimizers import clipped_parameters
from gpubp.trace import isolated, replay

GRAPHS_KEPT = 4
_HYPER_WIDTH = 3  # the most values an update reads from its device array (Adam's)
_DEVICE_LOSSES = {
    losses.cross_entropy: "softmax_cross_entropy",
    losses.categorical_cross_entropy: "softmax_cross_entropy",
    losses.mse: "mse",
    losses.mae: "mae",
    losses.huber: "huber",
    losses.binary_cross_entropy: "bce",
    losses.poisson: "poisson",
}


class _Captured:
    """One captured step: the graph, its static buffers, and what a replay puts back."""

    def __init__(self, x, y, loss, weights) -> None:
        self.x, self.y, self.loss, self.weights = x, y, loss, weights
        self.out = None  # the model's output, which each replay writes
        self.graph = None
        self.names: list[str] = []
        self.updates: list = []
        self.hyper = None
        self.host_hyper = None
        self.norm_sq = None  # the squared gradient norm, when the step clips
        self.references: list = []
        self.layer_state: list = []
        self.model_state: tuple = ()


class TrainStep:
    """Forward, loss, backward and optimizer update of one batch: ``step(x, y) -> loss``.

    ``loss`` and ``optimizer`` are as for ``fit`` (names or objects; by default the compiled
    ones, else ``"cross_entropy"`` and ``"adam"``; a named optimizer is the model's, kept
    across ``fit`` calls and steps, and an Optimizer must update only the model's parameters).
    As in ``fit``, the compiled optimizer (``optimizer`` not given) trains at ``compile``'s
    ``learning_rate`` when one was given: each call sets every group's rate to it and puts the
    groups' own rates back after.
    ``clip_grad_norm`` clips the gradients before each update: those of the parameters the
    optimizer updates (its trainable ones with a gradient), scaled together so that their global
    L2 norm is at most ``clip_grad_norm``, as ``torch.nn.utils.clip_grad_norm_`` over the
    optimizer's parameters and Keras's ``global_clipnorm`` do; the model's other parameters
    neither count in the norm nor are scaled. ``cuda_graph``: False (the
    default) launches every kernel from Python; True captures the step in a CUDA graph and
    replays it (a ValueError says why it cannot); "auto" does so where it can. See the module
    documentation for how and when.
    """

    def __init__(self, model, loss=None, optimizer=None, cuda_graph=False, clip_grad_norm: float | None = None):
        compiled = getattr(model, "_compiled", {})
        self.model = model
        self.loss_fn = losses.get(loss) if loss is not None else compiled.get("loss", losses.cross_entropy)
        losses.options(self.loss_fn)  # a loss class's options, checked before any step
        # fit's rule: the compiled rate goes with the compiled optimizer only.
        rate = compiled.get("learning_rate") if optimizer is None else None
        self.learning_rate = None if rate is None else _checks.non_negative(rate, "learning_rate")
        optimizer = compiled.get("optimizer", "adam") if optimizer is None else optimizer
        self.optimizer = batches.optimizer_for(model, optimizer)
        if clip_grad_norm is not None:
            clip_grad_norm = _checks.non_negative(clip_grad_norm, "clip_grad_norm")
        self.clip_grad_norm = clip_grad_norm
        self.cuda_graph = _checks.switch(cuda_graph, "cuda_graph")
        self._refuse_if_cannot_graph()
        losses.warn_if_another_head(self.loss_fn, model._end(-1).activation, "loss")
        self._graphs: OrderedDict = OrderedDict()
        self._warm: OrderedDict = OrderedDict()  # signatures that ran eagerly once: captured next time
        self._failed: OrderedDict = OrderedDict()  # signatures whose capture failed under "auto": eager
        self.graphed = False  # whether the last call replayed a graph
        # The last call's model output on the device (the logits, where the loss fuses the last
        # activation): a replay's is the graph's own buffer, which the next replay writes.
        self.output = None

    # --------------------------------------------------------------------- when a graph is used

    def why_not_graphed(self) -> str | None:
        """None when the step can be captured in a CUDA graph, else why not (as ``cuda_graph=False``)."""
        model = self.model
        if self.cuda_graph is False:
            return "cuda_graph=False"
        if not hasattr(model.backend, "capture"):
            return f"the {model.backend_name!r} backend has no CUDA graphs (the 'cupy' backend does)"
        if losses.base(self.loss_fn) not in _DEVICE_LOSSES:
            return f"the loss {getattr(self.loss_fn, '__name__', self.loss_fn)!r} is not one of gpubp's"
        if self.clip_grad_norm is not None and not hasattr(model.backend, "clip_"):
            return f"the {model.backend_name!r} backend cannot clip gradients in a graph"
        head = model.layers[-1].activation if model.layers else None
        if head == "softmax" and not losses.fuses(self.loss_fn, head):
            return (f"a softmax output layer trained with {self.loss_fn.__name__} runs its softmax as CuPy array "
                    "operations, whose temporaries a graph cannot keep")
        return None

    def _refuse_if_cannot_graph(self) -> str | None:
        why = self.why_not_graphed()
        if self.cuda_graph is True and why is not None:
            raise ValueError(f"cuda_graph=True: {why}; pass cuda_graph='auto' to run the step eagerly instead")
        return why

    # --------------------------------------------------------------------- running a step

    def __call__(self, x, y, sample_weight=None) -> float:
        """Train on one batch (x, y) and return its loss; checked as ``fit`` checks its data (a
        SciPy sparse ``x`` is multiplied sparse where the model ``takes_sparse``, else made
        dense). ``sample_weight`` (B,) weights each sample's loss, as in ``fit``.

        A non-finite loss raises FloatingPointError and leaves the weights unchanged."""
        x, y = batches.check_dataset(self.model, x, y, self.loss_fn)
        if isinstance(x, batches.SparseRows) and not self.model.takes_sparse:  # a SciPy sparse batch, made dense
            x = x[:]
        if sample_weight is not None:
            sample_weight = batches.check_sample_weight(sample_weight, len(x), dtype=self.model.dtype)
        with batches.at_rate(self.optimizer, self.learning_rate):
            value = self.run(x, y, sample_weight)
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss is {value}; the weights were not updated "
                                     "(try a lower learning rate or clip_grad_norm)")
        return value

    def run(self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
        """One step on data (and weights) already checked as ``fit`` checks them; returns the
        loss, and skips the update (leaving the weights as they were) when it is not finite."""
        if self._refuse_if_cannot_graph() is not None:
            self.graphed = False
            return self._eager(x, y, sample_weight)
        weighted = sample_weight is not None
        key = self._signature(len(x), weighted)
        captured = self._graphs.get(key)
        if captured is None and (key not in self._warm or key in self._failed):
            self.graphed = False
            value = self._eager(x, y, sample_weight)
            if math.isfinite(value):
                # The update ran: every kernel is loaded and the optimizer state made, so the
                # signature (which holds that state's arrays) is taken again, after the step.
                _remember(self._warm, self._signature(len(x), weighted), True)
            return value
        if captured is None:
            try:
                captured = self._capture(len(x), y, weighted)
            # CUDA's errors and a capture's refusals are RuntimeErrors; CuPy's OutOfMemoryError is a
            # MemoryError (a capture allocates buffers of its own, where an eager step may fit).
            except (RuntimeError, MemoryError) as exc:
                if self.cuda_graph is True:
                    raise
                # What the capture recorded never ran; the eager step makes everything again.
                _remember(self._failed, key, True)
                warnings.warn(f"cuda_graph='auto': the step could not be captured ({exc}); steps with this batch "
                              "size and settings run eagerly", RuntimeWarning, stacklevel=2)
                self.graphed = False
                return self._eager(x, y, sample_weight)
            _remember(self._graphs, key, captured)
        self._graphs.move_to_end(key)
        self.graphed = True
        return self._replay(captured, x, y, sample_weight)

    def _eager(self, x, y, sample_weight) -> float:
        model = self.model
        logits = losses.fuses(self.loss_fn, model.layers[-1].activation)
        self.output = model.forward(x, logits=logits)
        value, dout = batches.loss_and_grad(self.loss_fn, self.output, y, sample_weight, model.backend)
        if math.isfinite(value):
            model.backward(dout)
        self.update_if_finite(value)
        return value

    def update_if_finite(self, value: float) -> None:
        """After a backward whose loss was ``value``: clip the gradients (if asked) and update,
        or, when the loss is not finite, do nothing (the weights stay as they were)."""
        if math.isfinite(value):
            if self.clip_grad_norm is not None:
                optim.clip_grad_norm(self.optimizer.parameters(), self.clip_grad_norm)
            self.optimizer.step()

    # --------------------------------------------------------------------- capture and replay

    def _signature(self, batch: int, weighted: bool) -> tuple:
        """What a captured step bakes in; a call whose signature differs needs its own graph."""
        model, opt = self.model, self.optimizer
        layers = tuple((layer.activation, getattr(layer, "rate", None),
                        *((param.trainable, id(param.data)) for param in layer.parameters()))
                       for layer in model.layers)
        states = []
        for group in opt.param_groups:
            for param in group["params"]:
                state = opt.state.get(param)
                arrays = None if state is None else tuple(id(state.get(name)) for name in opt._state_arrays)
                states.append((id(param), arrays, None if state is None else opt.graph_options(group, state)))
        return (batch, weighted, id(model.backend), model.uses_fused, model.precision, self.loss_fn, layers,
                tuple(states), self.clip_grad_norm)

    def _targets(self, y: np.ndarray) -> np.ndarray:
        """``y`` as the loss kernel reads it: int64 class indices, or float32 targets."""
        base = losses.base(self.loss_fn)
        if base is losses.categorical_cross_entropy:
            return y.argmax(axis=1).astype(np.int64)
        if base is losses.cross_entropy:
            return y.astype(np.int64, copy=False)
        return y.reshape(len(y), self.model.out_features).astype(np.float32, copy=False)

    def _capture(self, batch: int, y: np.ndarray, weighted: bool) -> _Captured:
        model, backend, opt = self.model, self.model.backend, self.optimizer
        targets = self._targets(y)
        captured = _Captured(backend.empty((batch, model.in_features), np.float32),
                             backend.empty(targets.shape, targets.dtype), backend.empty((1,), np.float32),
                             backend.empty((batch,), np.float32) if weighted else None)
        if self.clip_grad_norm is not None:
            captured.norm_sq = backend.empty((1,), np.float32)
        device_loss = getattr(backend, _DEVICE_LOSSES[losses.base(self.loss_fn)])
        options = losses.options(self.loss_fn)
        logits = losses.fuses(self.loss_fn, model.layers[-1].activation)

        def step() -> None:
            out = captured.out = model.forward(captured.x, logits=logits)
            _, dout = device_loss(out, captured.y, captured.weights, out_loss=captured.loss, **options)
            model.backward(dout)
            if self.clip_grad_norm is not None:
                backend.clip_([p.grad for p in clipped_parameters(opt)], self.clip_grad_norm, captured.norm_sq,
                              captured.loss)
            captured.updates = opt.updates()
            captured.hyper = backend.empty((max(len(captured.updates), 1), _HYPER_WIDTH), np.float32)
            i = 0  # the row of the batch's first update: the updates' rows are in their order
            for batch in opt.batches(captured.updates):
                if len(batch) > 1:
                    opt.graph_update_many(batch, captured.hyper[i:i + len(batch)], captured.loss)
                else:
                    param, group, state = batch[0]
                    width = len(opt.graph_hyper(param, group, state))
                    opt.graph_update(param, group, state, captured.hyper[i, :width], captured.loss)
                i += len(batch)

        # The Dropout keys the captured kernels read are drawn before each replay, not in the capture.
        model._draw_keys = False
        try:
            with isolated() as launched:
                captured.graph = backend.capture(step)
        finally:
            model._draw_keys = True
        captured.names = launched.launches
        captured.host_hyper = np.zeros(captured.hyper.shape, np.float32)
        # What the Python side of the model points at after the step: put back after each replay.
        captured.references = [(param, param.grad) for param in model.parameters()]
        captured.layer_state = [(layer, layer.saved_for_backward()) for layer in model.layers]
        captured.model_state = (model._stored_plan, model._fused_saved)
        return captured

    def _replay(self, captured: _Captured, x: np.ndarray, y: np.ndarray, sample_weight) -> float:
        model, backend, opt = self.model, self.model.backend, self.optimizer
        model.draw_keys()
        backend.copy_into(captured.x, x)
        backend.copy_into(captured.y, self._targets(y))
        if sample_weight is not None:
            backend.copy_into(captured.weights, sample_weight)
        for i, (param, group, state) in enumerate(captured.updates):
            values = opt.graph_hyper(param, group, state)
            captured.host_hyper[i, :len(values)] = values
        backend.copy_into(captured.hyper, captured.host_hyper)
        captured.graph.launch()
        replay(captured.names)
        value = float(backend.to_host(captured.loss)[0])
        if math.isfinite(value):
            for _, _, state in captured.updates:
                opt.graph_advance(state)
        for param, grad in captured.references:
            param.grad = grad
        for layer, saved in captured.layer_state:
            layer.restore_saved(saved)
        model._stored_plan, model._fused_saved = captured.model_state
        self.output = captured.out
        return value

    @property
    def launches_per_step(self) -> int | None:
        """Kernels in the newest captured graph (one graph launch runs them all), or None."""
        return len(next(reversed(self._graphs.values())).names) if self._graphs else None

    def __repr__(self) -> str:
        return (f"TrainStep({self.loss_fn.__name__}, {type(self.optimizer).__name__}, cuda_graph={self.cuda_graph!r}, "
                f"{len(self._graphs)} graphs)")


def _remember(cache: OrderedDict, key, value) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > GRAPHS_KEPT:
        cache.popitem(last=False)
