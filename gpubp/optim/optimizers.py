"""Optimizers: SGD (momentum, Nesterov), Adam, AdamW and RMSprop, with PyTorch's semantics.

Each step is one fused backend kernel per parameter, or, on a backend with multi-tensor
updates (cupy), one per run of parameters that ``Optimizer.batches`` groups. Parameters that are not
trainable (frozen) are skipped: one frozen before its first step gets no state, so costs no
optimizer memory, while the state of one frozen after it is kept, as in PyTorch, so unfreezing
resumes it. Param groups work as in PyTorch: pass a list of dicts, each with its own
``params`` and any of the optimizer's options (``lr``, ``weight_decay``, ...).
``opt.state`` is keyed by the Parameter, as torch's is (``opt.state[p]["m"]``), and holds only
the parameters that have taken a step. ``state_dict()`` / ``load_state_dict()`` save and restore
the options and the per-parameter state in PyTorch's structure (``state`` keyed by the
parameter's index across the groups, and ``param_groups`` listing those indices with the
options), with NumPy arrays, so a state taken on one device loads on another. The entries of a
parameter's state are named by gpubp, not all as torch names them: SGD's ``velocity`` (torch:
``momentum_buffer``), Adam's ``m`` and ``v`` (torch: ``exp_avg`` and ``exp_avg_sq``), and
``step`` is a Python int (torch: a tensor), so the two libraries' state_dicts are not
interchangeable. ``copy.deepcopy`` and ``pickle`` keep the state, on the copied parameters (copy
a model with its optimizer in one call for an optimizer of the copied model's parameters).

The classes' defaults are torch.optim's (``SGD``'s ``lr`` is 1e-3), and they take torch's
signatures: its performance switches (``foreach``, ``fused``, ``capturable``), which change
nothing here, and the options gpubp does not implement (``dampening``, ``amsgrad``,
``maximize``, ...) at their default value only. A name (``get("rmsprop")``, as
``compile(optimizer="rmsprop")`` takes one) is Keras's convention, so it builds Keras's optimizer
of that name: see :func:`get`.

>>> import numpy as np, gpubp as gb
>>> layer = gb.Dense(3, 2)
>>> opt = gb.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
>>> opt.param_groups[0]["lr"]
0.1
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import numpy as np

from gpubp import _checks
from gpubp.parameter import Parameter, clear_grads

# What PyTorch's learning-rate schedulers (gpubp.optim.lr_scheduler) keep in a param group
# beside the optimizer's options; a state_dict saves and restores them with the options.
SCHEDULE_KEYS = ("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum")

# torch.optim's switches between its implementations of one update: a loop over the parameters,
# ``foreach`` (multi-tensor) or ``fused`` kernels, ``capturable`` (steps a CUDA graph can capture)
# and ``differentiable`` (autograd through the step). gpubp has one implementation, its own fused
# multi-tensor kernels, which gpubp.step captures in a CUDA graph: each switch is taken where torch
# takes it and changes nothing, but ``differentiable=True``, as gpubp has no autograd.
PERFORMANCE_FLAGS = ("foreach", "fused", "capturable", "differentiable")

# torch.optim's options that gpubp does not implement: each is taken at torch's default, which is
# the update gpubp computes, and refused at any other value, with what to do instead.
UNSUPPORTED = {
    "dampening": (0, "gpubp's SGD momentum has no dampening"),
    "amsgrad": (False, "gpubp's Adam keeps no running maximum of the second moment"),
    "maximize": (False, "negate the loss to maximize it"),
}


def _hashable(value):
    """``value`` for a signature: lists (and tuples) as tuples of their values, dicts as sorted
    (key, value) pairs, anything else unhashable as its repr."""
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _check_torch_option(name: str, value, where: str = "") -> None:
    """``value`` of torch's option ``name``, one of ``PERFORMANCE_FLAGS`` or ``UNSUPPORTED``, is one
    that changes nothing here; else an error naming it (after ``where``)."""
    if name in ("foreach", "fused"):
        if value is not None and not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{where}{name}: expected None, True or False, got {value!r}")
    elif name in PERFORMANCE_FLAGS:
        if _checks.boolean(value, f"{where}{name}") and name == "differentiable":
            raise ValueError(f"{where}differentiable: True is not supported: gpubp has no autograd to differentiate "
                             "an update through; expected False")
    else:
        default, instead = UNSUPPORTED[name]
        if not (isinstance(value, (numbers.Real, np.bool_)) and value == default):
            raise ValueError(f"{where}{name}: {value!r} is not supported ({instead}); expected {default!r}, "
                             "torch's default")


def _is_named(item) -> bool:
    """Whether ``item`` is a ``(name, Parameter)`` pair, as ``named_parameters()`` yields them."""
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], Parameter)


class Optimizer:
    """Base class: holds param groups and per-parameter state; subclasses define ``_update``.

    Subclasses name the entries of a parameter's state: arrays shaped like the parameter
    (``_state_arrays``, of which ``_state_lazy`` may still be None) and int counters; and the
    options of torch's signature that they take without effect (``_torch_options``): those are
    checked (``_check_torch_option``), in the constructor and in a param group, and not kept.
    """

    _state_arrays: tuple[str, ...] = ()
    _state_lazy: tuple[str, ...] = ()
    _state_counters: tuple[str, ...] = ()
    _torch_options: tuple[str, ...] = ()
    _options_added_later: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict, torch_options: dict | None = None) -> None:
        # Checked here as well as with each group: a default that every group overrides would
        # otherwise pass unseen, and the first group added later to use it be blamed for it.
        self.defaults = dict(defaults)
        self._validate(self.defaults)
        torch_options = torch_options or {}
        for name, value in torch_options.items():
            _check_torch_option(name, value)
        if torch_options.get("fused") and torch_options.get("foreach"):
            raise ValueError("fused: torch refuses fused=True with foreach=True; pass one of them")
        self.param_groups: list[dict] = []
        self.state: dict[Parameter, dict] = {}
        if hasattr(params, "parameters"):
            params = params.parameters()
        if isinstance(params, (Parameter, dict)) or not isinstance(params, Iterable):
            hint = ""
            if isinstance(params, (Parameter, dict)):
                single = "parameter" if isinstance(params, Parameter) else "param-group dict"
                hint = f"; wrap a single {single} in a list"
            raise TypeError("params: expected an iterable of Parameters or of param-group dicts (or a model), got "
                            f"{type(params).__name__}{hint}")
        groups = list(params)
        if not groups:
            raise ValueError("params: expected a non-empty list of Parameters or of param-group dicts")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    @property
    def learning_rate(self) -> float:
        """Keras's name for the rate (``model.optimizer.learning_rate``): the param group's ``lr``,
        the largest one under several groups' discriminative rates, as ``fit`` logs it."""
        return max(group["lr"] for group in self.param_groups)

    @learning_rate.setter
    def learning_rate(self, value) -> None:
        """Sets every group's ``lr``, checked as ``lr`` is; refused where the groups' rates differ,
        which one number would flatten (set each group's ``lr``, or scale them with a scheduler)."""
        value = _checks.non_negative(value, "learning_rate")
        rates = sorted({group["lr"] for group in self.param_groups})
        if len(rates) > 1:
            raise ValueError(f"learning_rate: the param groups have different rates {rates}, which one rate would "
                             "replace; set each group's 'lr' in optimizer.param_groups instead")
        for group in self.param_groups:
            group["lr"] = value

    def add_param_group(self, group: dict) -> None:
        """Add ``group``, a dict of ``params`` (Parameters, a model, one Parameter, or the ``(name,
        Parameter)`` pairs of ``named_parameters()``, as torch takes them) and any of the
        optimizer's options, the others from ``defaults``. Torch's
        options that change nothing here (``_torch_options``) are checked and not kept."""
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("params: a param group must be a dict with a 'params' key")
        params = group["params"]
        if isinstance(params, Parameter):
            params = [params]
        elif hasattr(params, "parameters"):
            params = params.parameters()
        elif not isinstance(params, Iterable):
            raise TypeError("params: a param group's 'params' must be an iterable of Parameters (or a model), got "
                            f"{type(params).__name__}")
        # torch takes model.named_parameters() too: (name, parameter) pairs, whose names are not kept
        params = [item[1] if _is_named(item) else item for item in params]
        first: dict[int, int] = {}  # id -> its first index in this group
        for i, param in enumerate(params):
            if not isinstance(param, Parameter):
                raise TypeError(f"params[{i}]: expected a gpubp Parameter, got {type(param).__name__}")
            # Listed twice, it would be stepped twice per step (torch warns and will refuse).
            if id(param) in first:
                raise ValueError(f"params[{i}]: the parameter {param.name!r} is listed twice in one param group "
                                 f"(also params[{first[id(param)]}])")
            first[id(param)] = i
        unknown = set(group) - set(self.defaults) - set(self._torch_options) - {"params"}
        if unknown:
            raise ValueError(f"param group: unknown options {sorted(unknown)}; expected {sorted(self.defaults)}")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params):
            raise ValueError("params: a parameter appears in more than one param group")
        for name in self._torch_options:
            if name in group:
                _check_torch_option(name, group[name], "param group: ")
        full = {**self.defaults, **{k: v for k, v in group.items() if k in self.defaults}}
        self._validate(full)
        full["params"] = params
        self.param_groups.append(full)

    def _validate(self, options: dict, where: str = "") -> None:
        """Check ``options`` and keep each as the Python number (or tuple, bool) the check returns:
        a NumPy float32 ``lr`` kept as given would make a schedule's rates float32 where the run
        resumed from a checkpoint (whose JSON holds Python floats) computes them in float64.
        An error names the option after ``where`` (a state_dict's group, when loading one)."""
        options["lr"] = _checks.non_negative(options["lr"], f"{where}lr")
        options["weight_decay"] = _checks.non_negative(options["weight_decay"], f"{where}weight_decay")

    def parameters(self) -> list[Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every parameter's gradient: to None (torch's default), or, with
        ``set_to_none=False``, to zeros in place (:func:`gpubp.parameter.clear_grads`)."""
        clear_grads(self.parameters(), set_to_none)

    def step(self, closure=None):
        """Update every trainable parameter that has a gradient; frozen ones are not touched. On a
        backend with multi-tensor updates, each of ``batches`` takes one launch.

        ``closure``, as torch's: a function that computes the loss and its gradients (forward and
        backward), called before the update; ``step`` returns what it returns (else None).
        """
        if closure is not None and not callable(closure):
            raise TypeError(f"closure: expected a function that returns the loss, or None, got "
                            f"{type(closure).__name__}")
        loss = None if closure is None else closure()
        for batch in self.batches(self.updates()):
            if len(batch) > 1:
                self._update_many(batch)
            else:
                self._update(*batch[0])
        return loss

    def batches(self, updates: list[tuple[Parameter, dict, dict]]) -> list[list[tuple[Parameter, dict, dict]]]:
        """``updates`` in runs that one launch updates: consecutive parameters of one group, on one
        device of a backend with ``MULTI_TENSOR_UPDATES``, in one dtype and, where the update reads
        the step count (Adam's bias corrections), at one step count; elsewhere one parameter a run."""
        runs, previous = [], None
        for update in updates:
            param, group, state = update
            key = None
            if getattr(param.backend, "MULTI_TENSOR_UPDATES", False):
                device = getattr(getattr(param.data, "device", None), "id", None)
                key = (id(param.backend), id(group), device, param.data.dtype,
                       state["step"] if self._update_reads_step else None)
            if key is not None and key == previous:
                runs[-1].append(update)
            else:
                runs.append([update])
            previous = key
        return runs

    def updates(self) -> list[tuple[Parameter, dict, dict]]:
        """(parameter, its group, its state) for each parameter the next ``step`` updates: the
        trainable ones with a gradient, in group order. Makes the state of a first update.

        Every gradient is checked first, before any state is made (and so before any update):
        each backend's update kernels (and the captured step of ``gpubp.step``, which calls this
        too) read ``param.size`` elements of the parameter's dtype from the gradient, so one of
        another shape or dtype would be read past its end, broadcast, or reinterpreted.
        """
        updates, states, fresh = [], self.state, False
        for group in self.param_groups:
            for param in group["params"]:
                grad = param.grad
                if grad is not None and param.trainable:
                    data = param.data
                    # The common case in two comparisons: this runs for every parameter every step.
                    try:
                        matches = grad.shape == data.shape and (grad.dtype is data.dtype or grad.dtype == data.dtype)
                    except AttributeError:  # not an array
                        matches = False
                    if not matches:
                        _check_grad(param, self._where(param))
                    state = states.get(param)
                    fresh = fresh or state is None
                    updates.append((param, group, state))
        if fresh:  # a first update: its state, once every gradient has passed
            updates = [(param, group, state if state is not None else self._made_state(param, group))
                       for param, group, state in updates]
        return updates

    def _where(self, param: Parameter) -> str:
        """Where ``param`` stands in the param groups, for an error message."""
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p is param:
                    return f"param_groups[{g}]['params'][{i}]"
        return "a parameter"

    def _made_state(self, param: Parameter, group: dict) -> dict:
        state = self.state[param] = self._new_state(param, group)
        return state

    _update_reads_step = False  # Adam: parameters at different steps update in separate launches

    def _new_state(self, param: Parameter, group: dict) -> dict:
        raise NotImplementedError

    def _update(self, param: Parameter, group: dict, state: dict) -> None:
        raise NotImplementedError

    def _update_many(self, batch: list[tuple[Parameter, dict, dict]]) -> None:
        """``_update`` of each parameter of one of ``batches``, in one launch."""
        raise NotImplementedError

    # --------------------------------------------------------------------- replayed steps
    #
    # A step captured in a CUDA graph (gpubp.step.TrainStep) bakes each kernel's scalar
    # arguments in at capture. What changes from step to step (the learning rate, Adam's bias
    # corrections) is read from a small device array instead, written before every replay.

    def graph_options(self, group: dict, state: dict) -> tuple:
        """Everything a captured update bakes in: a change needs a new capture. Hashable, as a
        signature's part: a list a script assigned (``group["betas"] = [0.9, 0.99]``, which eager
        steps take) counts as the tuple of its values."""
        return tuple(_hashable(value) for key, value in group.items() if key not in ("params", "lr"))

    def graph_hyper(self, param: Parameter, group: dict, state: dict) -> tuple[float, ...]:
        """The values the next replayed update of ``param`` reads from its device array."""
        raise NotImplementedError

    def graph_update(self, param: Parameter, group: dict, state: dict, hyper, guard) -> None:
        """Launch the update of ``param`` reading ``graph_hyper`` from ``hyper`` on the device,
        skipped when the loss in ``guard`` is not finite."""
        raise NotImplementedError

    def graph_update_many(self, batch: list[tuple[Parameter, dict, dict]], hyper, guard) -> None:
        """``graph_update`` of each parameter of one of ``batches`` in one launch, parameter t
        reading row t of ``hyper``."""
        raise NotImplementedError

    def graph_advance(self, state: dict) -> None:
        """Count a replayed update that ran (its loss was finite)."""

    # --------------------------------------------------------------------- saving and restoring

    def state_dict(self) -> dict:
        """``{"state": {i: {name: value}}, "param_groups": [{option: value, "params": [i, ...]}]}``.

        The structure is PyTorch's: ``i`` numbers the parameters across the groups in order,
        and only parameters that have taken a step have state. The state's entries are named
        by this library (``_state_arrays``, ``_state_counters``), not always as torch names them:
        SGD keeps ``velocity`` (torch: ``momentum_buffer``), Adam and AdamW ``m`` and ``v``
        (torch: ``exp_avg``, ``exp_avg_sq``), RMSprop the names torch gives; ``step`` is an int
        (torch: a tensor). Arrays are NumPy copies, so the dict is independent of the device and
        of later steps.
        """
        params = self.parameters()
        state = {}
        for i, param in enumerate(params):
            entries = self.state.get(param)
            if entries is not None:
                state[i] = {name: self._host_copy(param, value) if name in self._state_arrays else value
                            for name, value in entries.items()}
        groups, first = [], 0
        for group in self.param_groups:
            count = len(group["params"])
            options = {key: value for key, value in group.items() if key != "params"}
            groups.append({**options, "params": list(range(first, first + count))})
            first += count
        return {"state": state, "param_groups": groups}

    @staticmethod
    def _host_copy(param: Parameter, value):
        # By the array's own kind, not the parameter's backend: after model.to() the two differ.
        return None if value is None else np.array(_checks.to_numpy(value, param.name), copy=True)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore options and state from :meth:`state_dict`, onto this optimizer's parameters.

        The groups must hold as many parameters as when the dict was taken; the options and
        the state come from the dict, the parameters stay this optimizer's (PyTorch's rule).
        Arrays may be NumPy or any backend's; each moves to its parameter's device and dtype.
        Everything is checked before anything changes.
        """
        if not isinstance(state_dict, dict) or set(state_dict) != {"state", "param_groups"}:
            raise ValueError("state_dict: expected a dict with the keys 'state' and 'param_groups', "
                             f"got {sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved_groups, (list, tuple)):
            raise ValueError(f"state_dict: 'param_groups' must be a list of dicts, got {type(saved_groups).__name__}")
        if not isinstance(saved_state, dict):
            raise ValueError("state_dict: 'state' must be a dict of parameter index -> state, got "
                             f"{type(saved_state).__name__}")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict: {len(saved_groups)} param groups, but the optimizer has "
                             f"{len(self.param_groups)}")
        options, numbering = [], {}
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
                raise ValueError(f"state_dict: param group {g} must be a dict with a 'params' list")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict: param group {g} holds {len(saved['params'])} parameters, "
                                 f"but the optimizer's holds {len(group['params'])}")
            numbering.update(zip(saved["params"], group["params"]))
            options.append(self._saved_options(saved, g))
        state = {}
        for key, entries in saved_state.items():
            if key not in numbering:
                raise ValueError(f"state_dict: state for parameter {key!r}, which no param group lists")
            param = numbering[key]
            state[param] = self._saved_state(entries, param, key)
        for group, saved in zip(self.param_groups, options):
            for key in SCHEDULE_KEYS:
                group.pop(key, None)
            group.update(saved)
        self.state = state

    def _saved_options(self, saved: dict, g: int) -> dict:
        found = {key: value for key, value in saved.items() if key not in ("params", *SCHEDULE_KEYS)}
        for key in self._options_added_later:  # a dict saved before the option was
            found.setdefault(key, self.defaults[key])
        if set(found) != set(self.defaults):
            raise ValueError(f"state_dict: param group {g} has the options {sorted(found)}, but "
                             f"{type(self).__name__} takes {sorted(self.defaults)}")
        found = {key: tuple(value) if isinstance(self.defaults[key], tuple) else value for key, value in found.items()}
        where = f"state_dict: param group {g}'s "
        self._validate(found, where)
        for key in SCHEDULE_KEYS:
            if key in saved:
                found[key] = _checks.non_negative(saved[key], f"{where}{key}")
        return found

    def _saved_state(self, entries: dict, param: Parameter, key) -> dict:
        expected = set(self._state_arrays) | set(self._state_counters)
        if not isinstance(entries, dict) or set(entries) != expected:
            raise ValueError(f"state_dict: state[{key!r}] has the entries "
                             f"{sorted(entries) if isinstance(entries, dict) else entries!r}, but "
                             f"{type(self).__name__} keeps {sorted(expected)}")
        state = {}
        for name in self._state_counters:
            count = entries[name]
            if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
                raise ValueError(f"state_dict: state[{key!r}][{name!r}] must be an int >= 0, got {count!r}")
            state[name] = int(count)
        for name in self._state_arrays:
            value = entries[name]
            where = f"state_dict: state[{key!r}][{name!r}]"
            if value is None and name in self._state_lazy:
                state[name] = None
                continue
            host = _checks.to_numpy(value, where)
            if host.shape != param.shape:
                raise ValueError(f"{where} has shape {host.shape}, but the parameter {param.name!r} has {param.shape}")
            if host.dtype.kind != "f":
                raise TypeError(f"{where} has dtype {host.dtype}, expected a floating-point array")
            # Always a copy: the NumPy backend would otherwise keep the caller's array as the state,
            # and later steps would rewrite the dict it was loaded from.
            with np.errstate(over="ignore"):  # a float64 value too large for float32 becomes inf: caught below
                host = host.astype(param.data.dtype, copy=True)
            if not np.all(np.isfinite(host)):
                raise ValueError(f"{where} contains NaN or inf (in the parameter's dtype {host.dtype})")
            state[name] = param.backend.asarray(host, param.data.dtype)
        return state

    # --------------------------------------------------------------------- copies

    def __getstate__(self) -> dict:
        """What ``copy.deepcopy`` and ``pickle`` take: the state keyed by each parameter's position
        in :meth:`parameters`, the form pickles made before the state was keyed by the parameter
        hold too (it was keyed by the parameter's id), so that they still load."""
        state = dict(vars(self))
        positions = {param: i for i, param in enumerate(self.parameters())}
        state["state"] = {positions[param]: entries for param, entries in self.state.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        """The state keyed again by the copied parameters (those a model copied in the same
        ``deepcopy`` or ``pickle`` call holds too)."""
        self.__dict__.update(state)
        params = self.parameters()
        self.state = {params[i]: entries for i, entries in state["state"].items()}

    def __repr__(self) -> str:
        groups = ", ".join(
            f"{{{len(g['params'])} params, " + ", ".join(f"{k}={g[k]}" for k in self.defaults) + "}"
            for g in self.param_groups
        )
        return f"{type(self).__name__}([{groups}])"


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum and L2 weight decay.

    torch.optim.SGD's signature and defaults (``lr=1e-3``, its arguments in its order);
    ``dampening`` and ``maximize`` are taken at their defaults only, and ``foreach``, ``fused``
    and ``differentiable=False`` change nothing (see ``PERFORMANCE_FLAGS``). The name ``"sgd"``
    builds Keras's SGD instead: ``lr=0.01`` (:func:`get`).
    """

    _torch_options = ("dampening", "maximize", "foreach", "differentiable", "fused")

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay),
                         dict(dampening=dampening, maximize=maximize, foreach=foreach, differentiable=differentiable,
                              fused=fused))

    def _validate(self, options: dict, where: str = "") -> None:
        super()._validate(options, where)
        options["momentum"] = _checks.in_unit_interval(options["momentum"], f"{where}momentum", closed=True)
        if not isinstance(options["nesterov"], (bool, np.bool_)):
            raise TypeError(f"{where}nesterov: expected a bool, got {type(options['nesterov']).__name__} "
                            f"{options['nesterov']!r}")
        options["nesterov"] = bool(options["nesterov"])
        if options["nesterov"] and options["momentum"] == 0:
            raise ValueError(f"{where}nesterov: Nesterov momentum needs momentum > 0, got momentum=0")

    _state_arrays = _state_lazy = ("velocity",)

    def _new_state(self, param: Parameter, group: dict) -> dict:
        return {"velocity": None}

    def _update(self, param: Parameter, group: dict, state: dict) -> None:
        self._make_velocity(param, group, state)
        param.backend.sgd_update(param.data, param.grad, state["velocity"], group["lr"], group["momentum"],
                                 group["nesterov"], group["weight_decay"])

    def _update_many(self, batch: list[tuple[Parameter, dict, dict]]) -> None:
        for param, group, state in batch:
            self._make_velocity(param, group, state)
        self._sgd_many(batch, batch[0][1]["lr"])

    @staticmethod
    def _make_velocity(param: Parameter, group: dict, state: dict) -> None:
        # Made on first use with momentum, so a schedule that turns momentum on later works too.
        if group["momentum"] and state["velocity"] is None:
            state["velocity"] = param.backend.zeros(param.shape, param.data.dtype)

    @staticmethod
    def _sgd_many(batch: list, lr, hyper=None, guard=None) -> None:
        group = batch[0][1]
        batch[0][0].backend.sgd_update_many([(p.data, p.grad, s["velocity"]) for p, _, s in batch], lr,
                                            group["momentum"], group["nesterov"], group["weight_decay"],
                                            hyper=hyper, guard=guard)

    def graph_options(self, group: dict, state: dict) -> tuple:
        return super().graph_options(group, state) + (state["velocity"] is None,)

    def graph_hyper(self, param: Parameter, group: dict, state: dict) -> tuple[float, ...]:
        return param.backend.sgd_hyper(group["lr"])

    def graph_update(self, param: Parameter, group: dict, state: dict, hyper, guard) -> None:
        param.backend.sgd_update(param.data, param.grad, state["velocity"], None, group["momentum"],
                                 group["nesterov"], group["weight_decay"], hyper=hyper, guard=guard)

    def graph_update_many(self, batch: list[tuple[Parameter, dict, dict]], hyper, guard) -> None:
        self._sgd_many(batch, None, hyper, guard)


class Adam(Optimizer):
    """Adam (Kingma and Ba). ``weight_decay`` here is L2 added to the gradient, as in torch.optim.Adam;
    with ``decoupled_weight_decay=True`` (an option of each param group, as in torch) it is
    AdamW's decay instead, ``param *= 1 - lr * weight_decay`` before the step.

    torch.optim.Adam's signature and defaults (``lr=1e-3``, ``betas=(0.9, 0.999)``, ``eps=1e-8``);
    ``amsgrad`` and ``maximize`` are taken at their defaults only, and ``foreach``, ``fused``,
    ``capturable`` and ``differentiable=False`` change nothing (see ``PERFORMANCE_FLAGS``). The
    name ``"adam"`` builds Keras's Adam, whose rate and betas are these.
    """

    _update_reads_step = True
    _state_arrays = ("m", "v")
    _state_counters = ("step",)
    _torch_options = ("amsgrad", "foreach", "maximize", "capturable", "differentiable", "fused")
    # Saved without it before it was an option: such a state_dict's groups take the class's default.
    _options_added_later = ("decoupled_weight_decay",)

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled_weight_decay),
                         dict(amsgrad=amsgrad, foreach=foreach, maximize=maximize, capturable=capturable,
                              differentiable=differentiable, fused=fused))

    def _validate(self, options: dict, where: str = "") -> None:
        super()._validate(options, where)
        betas = options["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{where}betas: expected a pair (beta1, beta2), got {betas!r}")
        # A tuple, as torch keeps it: a captured step's signature (gpubp.step) hashes the options.
        options["betas"] = (_checks.in_unit_interval(betas[0], f"{where}betas[0]"),
                            _checks.in_unit_interval(betas[1], f"{where}betas[1]"))
        options["eps"] = _checks.positive(options["eps"], f"{where}eps")
        options["decoupled_weight_decay"] = _checks.boolean(options["decoupled_weight_decay"],
                                                            f"{where}decoupled_weight_decay")

    def _new_state(self, param: Parameter, group: dict) -> dict:
        zeros = param.backend.zeros
        return {"step": 0, "m": zeros(param.shape, param.data.dtype), "v": zeros(param.shape, param.data.dtype)}

    def _update(self, param: Parameter, group: dict, state: dict) -> None:
        state["step"] += 1
        beta1, beta2 = group["betas"]
        param.backend.adam_update(param.data, param.grad, state["m"], state["v"], group["lr"], beta1, beta2,
                                  group["eps"], group["weight_decay"], state["step"], group["decoupled_weight_decay"])

    def _update_many(self, batch: list[tuple[Parameter, dict, dict]]) -> None:
        for _, _, state in batch:
            state["step"] += 1
        group, state = batch[0][1], batch[0][2]
        self._adam_many(batch, group["lr"], state["step"])

    def _adam_many(self, batch: list, lr, step, hyper=None, guard=None) -> None:
        group = batch[0][1]
        batch[0][0].backend.adam_update_many([(p.data, p.grad, s["m"], s["v"]) for p, _, s in batch], lr,
                                             *group["betas"], group["eps"], group["weight_decay"], step,
                                             group["decoupled_weight_decay"], hyper=hyper, guard=guard)

    def graph_hyper(self, param: Parameter, group: dict, state: dict) -> tuple[float, ...]:
        return param.backend.adam_hyper(group["lr"], *group["betas"], state["step"] + 1)

    def graph_update(self, param: Parameter, group: dict, state: dict, hyper, guard) -> None:
        beta1, beta2 = group["betas"]
        param.backend.adam_update(param.data, param.grad, state["m"], state["v"], None, beta1, beta2, group["eps"],
                                  group["weight_decay"], None, group["decoupled_weight_decay"], hyper=hyper,
                                  guard=guard)

    def graph_update_many(self, batch: list[tuple[Parameter, dict, dict]], hyper, guard) -> None:
        self._adam_many(batch, None, None, hyper, guard)

    def graph_advance(self, state: dict) -> None:
        state["step"] += 1


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov and Hutter): ``param *= 1 - lr * weight_decay``.

    torch.optim.AdamW's signature and defaults (Adam's, and ``weight_decay=0.01``), its options
    taken as :class:`Adam` takes them. As torch's, its signature has no ``decoupled_weight_decay``
    and its param groups hold it, True. The name ``"adamw"`` builds Keras's AdamW instead:
    ``weight_decay=0.004``.
    """

    _torch_options = ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach, maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=True)


class RMSprop(Optimizer):
    """RMSprop (Hinton): divide the gradient by a running root mean square of its recent values.

    As torch.optim.RMSprop: ``g = grad + weight_decay * p; v = alpha v + (1 - alpha) g^2``;
    ``centered`` also keeps the mean gradient ``gm`` and divides by ``sqrt(v - gm^2) + eps``
    (an estimate of the variance) instead of ``sqrt(v) + eps``; with ``momentum`` the scaled
    step accumulates in a buffer ``b = momentum b + g / avg`` and ``p -= lr b``.

    torch.optim.RMSprop's signature and defaults (``lr=0.01``, ``alpha=0.99``, ``eps=1e-8``);
    ``maximize`` is taken at its default only, and ``capturable``, ``foreach`` and
    ``differentiable=False`` change nothing (see ``PERFORMANCE_FLAGS``). The name ``"rmsprop"``
    builds Keras's RMSprop instead: ``lr=1e-3`` and its ``rho=0.9`` as ``alpha``.
    """

    _state_arrays = ("square_avg", "momentum_buffer", "grad_avg")
    _state_lazy = ("momentum_buffer", "grad_avg")
    _state_counters = ("step",)
    _torch_options = ("capturable", "foreach", "maximize", "differentiable")

    def __init__(self, params, lr: float = 0.01, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.0, centered: bool = False, capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False, differentiable: bool = False) -> None:
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      centered=centered),
                         dict(capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable))

    def _validate(self, options: dict, where: str = "") -> None:
        super()._validate(options, where)
        options["alpha"] = _checks.in_unit_interval(options["alpha"], f"{where}alpha")
        options["eps"] = _checks.positive(options["eps"], f"{where}eps")
        options["momentum"] = _checks.in_unit_interval(options["momentum"], f"{where}momentum")
        if not isinstance(options["centered"], (bool, np.bool_)):
            raise TypeError(f"{where}centered: expected a bool, got {type(options['centered']).__name__} "
                            f"{options['centered']!r}")
        options["centered"] = bool(options["centered"])

    def _new_state(self, param: Parameter, group: dict) -> dict:
        return {"step": 0, "square_avg": param.backend.zeros(param.shape, param.data.dtype), "momentum_buffer": None,
                "grad_avg": None}

    def _update(self, param: Parameter, group: dict, state: dict) -> None:
        self._make_buffers(param, group, state)
        state["step"] += 1
        param.backend.rmsprop_update(param.data, param.grad, state["square_avg"], state["grad_avg"],
                                     state["momentum_buffer"], group["lr"], group["alpha"], group["eps"],
                                     group["weight_decay"], group["momentum"], group["centered"])

    def _update_many(self, batch: list[tuple[Parameter, dict, dict]]) -> None:
        for param, group, state in batch:
            self._make_buffers(param, group, state)
            state["step"] += 1
        self._rmsprop_many(batch, batch[0][1]["lr"])

    @staticmethod
    def _rmsprop_many(batch: list, lr, hyper=None, guard=None) -> None:
        group = batch[0][1]
        batch[0][0].backend.rmsprop_update_many(
            [(p.data, p.grad, s["square_avg"], s["grad_avg"], s["momentum_buffer"]) for p, _, s in batch], lr,
            group["alpha"], group["eps"], group["weight_decay"], group["momentum"], group["centered"], hyper=hyper,
            guard=guard)

    @staticmethod
    def _make_buffers(param: Parameter, group: dict, state: dict) -> None:
        # Made on first use, as SGD's velocity, so a schedule that turns momentum on later works
        # too (OneCycleLR's cycle_momentum moves "momentum").
        for name, used in (("momentum_buffer", group["momentum"]), ("grad_avg", group["centered"])):
            if used and state[name] is None:
                state[name] = param.backend.zeros(param.shape, param.data.dtype)

    def graph_options(self, group: dict, state: dict) -> tuple:
        return super().graph_options(group, state) + (state["momentum_buffer"] is None, state["grad_avg"] is None)

    def graph_hyper(self, param: Parameter, group: dict, state: dict) -> tuple[float, ...]:
        return param.backend.rmsprop_hyper(group["lr"])

    def graph_update(self, param: Parameter, group: dict, state: dict, hyper, guard) -> None:
        param.backend.rmsprop_update(param.data, param.grad, state["square_avg"], state["grad_avg"],
                                     state["momentum_buffer"], None, group["alpha"], group["eps"],
                                     group["weight_decay"], group["momentum"], group["centered"], hyper=hyper,
                                     guard=guard)

    def graph_update_many(self, batch: list[tuple[Parameter, dict, dict]], hyper, guard) -> None:
        self._rmsprop_many(batch, None, hyper, guard)

    def graph_advance(self, state: dict) -> None:
        state["step"] += 1


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop}

# What a name builds beside its class's (torch's) defaults: Keras 3's defaults for the optimizer
# of that name, as far as gpubp's has the option. Keras's epsilon (1e-7, and in RMSprop added
# under the root) is not taken: ``eps`` stays torch's default and formulation.
KERAS_DEFAULTS = {
    "sgd": dict(lr=0.01),
    "adam": dict(lr=1e-3),
    "adamw": dict(lr=1e-3, weight_decay=0.004),
    "rmsprop": dict(lr=1e-3, alpha=0.9),  # Keras's rho
}


def get(optimizer, params) -> Optimizer:
    """An optimizer instance from an instance (returned as it is) or a name: "sgd", "adam",
    "adamw" or "rmsprop", in any case.

    A name is Keras's convention (``compile(optimizer="rmsprop")``), so it builds Keras 3's
    optimizer of that name as far as gpubp's has the option (``KERAS_DEFAULTS``): "sgd" at
    ``lr=0.01``; "adam" at ``lr=1e-3``; "adamw" at ``lr=1e-3`` with ``weight_decay=0.004``;
    "rmsprop" at ``lr=1e-3`` with ``alpha=0.9`` (Keras's ``rho``). ``eps`` stays torch's
    (1e-8, added to the root), where Keras's is 1e-7. The classes themselves take torch's
    defaults: ``gb.optim.SGD(params)`` is at ``lr=1e-3``, as ``torch.optim.SGD(params)`` is.

    >>> import gpubp as gb
    >>> params = gb.Dense(3, 2).parameters()
    >>> get("sgd", params).param_groups[0]["lr"], gb.optim.SGD(params).param_groups[0]["lr"]
    (0.01, 0.001)
    """
    if isinstance(optimizer, Optimizer):
        return optimizer
    if not isinstance(optimizer, str):
        raise TypeError(f"optimizer: expected an Optimizer or a name, got {type(optimizer).__name__}")
    name = optimizer.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown optimizer {optimizer!r}; expected one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, **KERAS_DEFAULTS[name])


def _check_grad(param: Parameter, where: str) -> None:
    """``param.grad`` is an array of the parameter's shape and dtype; ``where`` names the parameter."""
    grad = param.grad
    where = f"{where} ({param.name!r})" if param.name else where
    shape, dtype = getattr(grad, "shape", None), getattr(grad, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"{where}: its grad must be an array like the parameter's data, got {type(grad).__name__}")
    if tuple(shape) != param.shape:
        raise ValueError(f"{where}: its grad has shape {tuple(shape)}, but the parameter has {param.shape}")
    if dtype != param.data.dtype:
        raise ValueError(f"{where}: its grad has dtype {dtype}, but the parameter has {param.data.dtype}")


def clipped_parameters(params) -> list[Parameter]:
    """The parameters whose gradients ``clip_grad_norm`` clips: the trainable ones with a gradient
    (also what a captured step's clipping takes, gpubp.step)."""
    if isinstance(params, Parameter):  # one parameter, as torch takes one tensor
        params = [params]
    elif hasattr(params, "parameters"):
        params = params.parameters()
    elif not isinstance(params, Iterable):
        raise TypeError(f"params: expected a model, a Parameter or an iterable of them, got {type(params).__name__}")
    params = list(params)
    strays = [type(p).__name__ for p in params if not isinstance(p, Parameter)]
    if strays:
        raise TypeError(f"params: expected Parameters, got {strays[0]}")
    return [p for p in params if p.trainable and p.grad is not None]


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale the gradients of ``params`` (a model, one Parameter, or an iterable of them) in place
    so their global L2 norm is at most ``max_norm``.

    Returns the norm before clipping, as ``torch.nn.utils.clip_grad_norm_`` does, and scales as
    it does (with its default ``error_if_nonfinite=False``): by ``max_norm / (norm + 1e-6)``
    where that is below 1 or NaN. So a NaN norm makes every gradient NaN, and an infinite one
    scales them by 0 (NaN where a gradient was infinite). ``max_norm=float("inf")``, torch's
    idiom, measures the norm and scales nothing while the norm is finite.
    """
    if not (isinstance(max_norm, numbers.Real) and max_norm == math.inf):
        max_norm = _checks.non_negative(max_norm, "max_norm")
    by_backend: dict = {}
    for p in clipped_parameters(params):
        by_backend.setdefault(p.backend, []).append(p.grad)
    # One sumsq call per backend: a GPU backend then reads the norm back once, not once per gradient.
    total = math.sqrt(sum(backend.sumsq(*arrays) for backend, arrays in by_backend.items()))
    scale = max_norm / (total + 1e-6)  # NaN for a NaN norm, and for inf / inf
    if scale < 1 or math.isnan(scale):  # torch's clamp(scale, max=1) keeps a NaN
        for backend, arrays in by_backend.items():
            if getattr(backend, "MULTI_TENSOR_UPDATES", False):
                backend.scale_many(arrays, scale)
            else:
                for grad in arrays:
                    backend.scale_(grad, scale)
    return total
