"""Optimizers: SGD (momentum, Nesterov), Adam and AdamW, with PyTorch's semantics.

Each step is one fused backend kernel per parameter. Parameters that are not
trainable (frozen) are skipped and get no state, so freezing costs no optimizer
memory. Param groups work as in PyTorch: pass a list of dicts, each with its own
``params`` and any of the optimizer's options (``lr``, ``weight_decay``, ...).

>>> import numpy as np, gpubp as gb
>>> layer = gb.Dense(3, 2)
>>> opt = gb.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
>>> opt.param_groups[0]["lr"]
0.1
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from gpubp import _checks
from gpubp.parameter import Parameter


class Optimizer:
    """Base class: holds param groups and per-parameter state; subclasses define ``_update``."""

    def __init__(self, params, defaults: dict) -> None:
        self.defaults = defaults
        self.param_groups: list[dict] = []
        self.state: dict[int, dict] = {}
        if hasattr(params, "parameters"):
            params = params.parameters()
        groups = list(params) if isinstance(params, Iterable) else params
        if not groups:
            raise ValueError("params: expected a non-empty list of Parameters or of param-group dicts")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group: dict) -> None:
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("params: a param group must be a dict with a 'params' key")
        params = group["params"]
        params = list(params.parameters() if hasattr(params, "parameters") else params)
        for i, param in enumerate(params):
            if not isinstance(param, Parameter):
                raise TypeError(f"params[{i}]: expected a gpubp Parameter, got {type(param).__name__}")
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise ValueError(f"param group: unknown options {sorted(unknown)}; expected {sorted(self.defaults)}")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params):
            raise ValueError("params: a parameter appears in more than one param group")
        full = {**self.defaults, **{k: v for k, v in group.items() if k != "params"}}
        self._validate(full)
        full["params"] = params
        self.param_groups.append(full)

    def _validate(self, options: dict) -> None:
        _checks.non_negative(options["lr"], "lr")
        _checks.non_negative(options["weight_decay"], "weight_decay")

    def parameters(self) -> list[Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self) -> None:
        for param in self.parameters():
            param.grad = None

    def step(self) -> None:
        """Update every trainable parameter that has a gradient; frozen ones are not touched."""
        for group in self.param_groups:
            for param in group["params"]:
                if not param.trainable or param.grad is None:
                    continue
                state = self.state.get(id(param))
                if state is None:
                    state = self.state[id(param)] = self._new_state(param, group)
                self._update(param, group, state)

    def _new_state(self, param: Parameter, group: dict) -> dict:
        raise NotImplementedError

    def _update(self, param: Parameter, group: dict, state: dict) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        groups = ", ".join(
            f"{{{len(g['params'])} params, " + ", ".join(f"{k}={g[k]}" for k in self.defaults) + "}"
            for g in self.param_groups
        )
        return f"{type(self).__name__}([{groups}])"


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum and L2 weight decay."""

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))

    def _validate(self, options: dict) -> None:
        super()._validate(options)
        _checks.in_unit_interval(options["momentum"], "momentum")
        if options["nesterov"] and options["momentum"] == 0:
            raise ValueError("nesterov: Nesterov momentum needs momentum > 0, got momentum=0")

    def _new_state(self, param: Parameter, group: dict) -> dict:
        return {"velocity": None}

    def _update(self, param: Parameter, group: dict, state: dict) -> None:
        # Made on first use with momentum, so a schedule that turns momentum on later works too.
        if group["momentum"] and state["velocity"] is None:
            state["velocity"] = param.backend.zeros(param.shape, param.data.dtype)
        param.backend.sgd_update(param.data, param.grad, state["velocity"], group["lr"], group["momentum"],
                                 group["nesterov"], group["weight_decay"])


class Adam(Optimizer):
    """Adam (Kingma and Ba). ``weight_decay`` here is L2 added to the gradient, as in torch.optim.Adam."""

    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _validate(self, options: dict) -> None:
        super()._validate(options)
        betas = options["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        _checks.in_unit_interval(betas[0], "betas[0]")
        _checks.in_unit_interval(betas[1], "betas[1]")
        if not _checks.non_negative(options["eps"], "eps") > 0:
            raise ValueError(f"eps: expected a number > 0, got {options['eps']}")

    def _new_state(self, param: Parameter, group: dict) -> dict:
        zeros = param.backend.zeros
        return {"step": 0, "m": zeros(param.shape, param.data.dtype), "v": zeros(param.shape, param.data.dtype)}

    def _update(self, param: Parameter, group: dict, state: dict) -> None:
        state["step"] += 1
        beta1, beta2 = group["betas"]
        param.backend.adam_update(param.data, param.grad, state["m"], state["v"], group["lr"], beta1, beta2,
                                  group["eps"], group["weight_decay"], state["step"], self.decoupled)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov and Hutter): ``param *= 1 - lr * weight_decay``."""

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def get(optimizer, params) -> Optimizer:
    """An optimizer instance from an instance, or a name ("sgd", "adam", "adamw") with defaults."""
    if isinstance(optimizer, Optimizer):
        return optimizer
    if not isinstance(optimizer, str):
        raise TypeError(f"optimizer: expected an Optimizer or a name, got {type(optimizer).__name__}")
    if optimizer.lower() not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown optimizer {optimizer!r}; expected one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[optimizer.lower()](params)


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale the gradients of ``params`` in place so their global L2 norm is at most ``max_norm``.

    Returns the norm before clipping, as ``torch.nn.utils.clip_grad_norm_`` does.
    """
    max_norm = _checks.non_negative(max_norm, "max_norm")
    params = list(params.parameters() if hasattr(params, "parameters") else params)
    grads = [(p.backend, p.grad) for p in params if p.trainable and p.grad is not None]
    total = math.sqrt(sum(backend.sumsq(grad) for backend, grad in grads))
    scale = max_norm / (total + 1e-6)
    if scale < 1:
        for backend, grad in grads:
            backend.scale_(grad, scale)
    return total
