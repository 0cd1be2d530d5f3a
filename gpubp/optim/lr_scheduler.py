"""Learning-rate schedules with PyTorch's classes, arguments and semantics.

Each scheduler sets ``group["lr"]`` in its optimizer's param groups, group by group, so
discriminative rates (``gpubp.finetune.param_groups``) keep their ratios under a schedule.
``step()`` advances it (after the optimizer's step, as in PyTorch; ``ReduceLROnPlateau``
takes the monitored value), ``get_last_lr()`` returns the rates it set last, and
``state_dict()`` / ``load_state_dict()`` save and restore it. The rates equal PyTorch's after
every step: the multiplicative schedules update the current rate step by step
(PyTorch's "chainable" form) with the same floating-point operations in the same order.

Two differences: ``step()`` takes no epoch (PyTorch deprecated it), and ``load_state_dict``
also puts the saved rates (and OneCycleLR's momentum) back into the optimizer, so a scheduler
built on a restored optimizer, whose first step at construction moved the rates, continues
exactly. Functions (``LambdaLR``'s) are not part of a state: build the scheduler with them
again and load the rest.

>>> import gpubp as gb
>>> opt = gb.optim.SGD(gb.Dense(3, 2).parameters(), lr=1.0)
>>> scheduler = MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
>>> rates = []
>>> for epoch in range(5):
...     rates.append(scheduler.get_last_lr()[0])   # the rate this epoch trains with
...     scheduler.step()
>>> [round(r, 6) for r in rates]
[1.0, 1.0, 0.1, 0.1, 0.01]

``fit(..., scheduler=...)`` steps one for you, per epoch or per batch (see ``gpubp.train.fit``).
"""

from __future__ import annotations

import math
import numbers
from bisect import bisect_right
from collections import Counter

from gpubp import _checks
from gpubp.optim.optimizers import Optimizer

__all__ = ["LRScheduler", "StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR", "LinearLR", "OneCycleLR",
           "LambdaLR", "SequentialLR", "ReduceLROnPlateau"]


def _optimizer(optimizer) -> Optimizer:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer: expected a gpubp optimizer (gpubp.optim.SGD, Adam, AdamW, RMSprop), "
                        f"got {type(optimizer).__name__}")
    return optimizer


def _per_group(value, name: str, optimizer: Optimizer) -> list:
    """``value`` for every param group: one number for all, or a list with one per group."""
    if isinstance(value, (list, tuple)):
        if len(value) != len(optimizer.param_groups):
            raise ValueError(f"{name}: expected one value per param group ({len(optimizer.param_groups)}), "
                             f"got {len(value)}")
        return list(value)
    return [value] * len(optimizer.param_groups)


def _checked_per_group(value, name: str, optimizer: Optimizer, check) -> list:
    """``_per_group`` with every value passed through ``check``, named by its group's index
    where ``value`` was a list with one per group."""
    per_group = isinstance(value, (list, tuple))
    return [check(item, f"{name}[{i}]" if per_group else name)
            for i, item in enumerate(_per_group(value, name, optimizer))]


def _last_epoch(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < -1:
        raise ValueError(f"last_epoch: expected an int >= -1, got {value!r}")
    return int(value)


class LRScheduler:
    """Base class: ``get_lr()`` gives the next rates; ``step()`` sets them in the param groups.

    At construction (``last_epoch=-1``) each group's current rate is kept as its
    ``"initial_lr"`` and becomes ``base_lrs``; then one step sets the rates of epoch 0.
    """

    _transient = ("optimizer", "_is_initial")  # not part of a state
    _nested = ()  # entries holding other schedulers' states, which a subclass loads itself
    _rates_from_functions = False  # the rates come from the user's functions: checked as they are set

    @property
    def varies_momentum(self) -> bool:
        """Whether a step changes options other than the rates (OneCycleLR's momentum), which a
        training step replayed from a CUDA graph bakes in (``fit(cuda_graph=True)`` refuses it)."""
        return False

    def __init__(self, optimizer, last_epoch: int = -1) -> None:
        self.optimizer = _optimizer(optimizer)
        last_epoch = _last_epoch(last_epoch)
        for i, group in enumerate(self.optimizer.param_groups):
            if last_epoch == -1:
                group.setdefault("initial_lr", group["lr"])
            elif "initial_lr" not in group:
                raise ValueError(f"last_epoch={last_epoch}: param_groups[{i}] has no 'initial_lr'; a scheduler "
                                 "resumes (last_epoch >= 0) only on an optimizer that ran one before")
        self.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        self.last_epoch = last_epoch
        self._initial_step()

    def _initial_step(self) -> None:
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def get_lr(self) -> list[float]:
        """The rates for ``self.last_epoch``, one per param group."""
        raise NotImplementedError

    def _closed_form(self) -> list[float] | None:
        """The rates for ``self.last_epoch`` from ``base_lrs`` alone, where the schedule has such a
        form (SequentialLR uses it to start a scheduler at epoch 0); None otherwise."""
        return None

    def step(self) -> None:
        """Advance one epoch (or batch) and set the new rates in the param groups; a rate the
        optimizer would refuse (from LambdaLR's function) raises with the scheduler as it was."""
        before = self._step_count, self.last_epoch
        self._step_count += 1
        try:
            self._update_lr()
        except ValueError:
            self._step_count, self.last_epoch = before
            raise

    def _update_lr(self, epoch: int | None = None) -> None:
        if epoch is None:
            self.last_epoch += 1
            rates = self.get_lr()
        else:
            self.last_epoch = epoch
            rates = self._closed_form()
            if rates is None:
                rates = self.get_lr()
        self._set_rates(rates)

    def _set_rates(self, rates: list[float]) -> None:
        # One rate per group, checked before any is set. A group added to the optimizer after the
        # scheduler was built has no base rate (nor a function of LambdaLR's): the rates computed
        # from those are one short, where PyTorch's strict zip raises too.
        groups = self.optimizer.param_groups
        if len(rates) < len(groups):
            raise ValueError(f"optimizer: param_groups[{len(rates)}] has no rate from the {type(self).__name__}: the "
                             "group was added to the optimizer after the scheduler was built; add every group first")
        if len(rates) > len(groups):
            raise ValueError(f"optimizer: {len(groups)} param groups, but the {type(self).__name__} was built for "
                             f"{len(rates)}: a group was removed from the optimizer after the scheduler was built")
        for i, rate in enumerate(rates if self._rates_from_functions else ()):
            # A function of the user's may give any number: optimizers take none of these. (A built-in
            # schedule's are PyTorch's, which OneCycleLR's last allowed step can take below 0.)
            if not (isinstance(rate, numbers.Real) and math.isfinite(rate) and rate >= 0):
                raise ValueError(f"{type(self).__name__}: the rate for param_groups[{i}] at step {self.last_epoch} is "
                                 f"{rate!r}; a learning rate is a finite number >= 0 (the optimizer, and the "
                                 "scheduler's saved state, would refuse it)")
        for group, rate in zip(groups, rates):
            group["lr"] = rate
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _current(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        """The rates the last ``step()`` set, one per param group."""
        return list(self._last_lr)

    def state_dict(self) -> dict:
        """Every attribute but the optimizer, as PyTorch's ``state_dict``: numbers, strings and
        lists, so a checkpoint can hold it as JSON."""
        return {key: _copy(value) for key, value in vars(self).items() if key not in self._transient}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` of the same class, and put its rates back into the optimizer.
        Everything is checked before anything changes."""
        self._check_state(state_dict)
        self._load_checked(state_dict)

    def _check_state(self, state_dict) -> None:
        """Refuse a state this scheduler cannot load: its entries must be this class's, and its
        rates fit for the optimizer (:func:`check_rates`)."""
        expected = set(self.state_dict())
        if not isinstance(state_dict, dict) or set(state_dict) != expected:
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"state_dict: expected the entries {sorted(expected)} of a {type(self).__name__}, "
                             f"got {got}")
        check_rates(state_dict, len(self.optimizer.param_groups))

    def _load_checked(self, state_dict: dict) -> None:
        """Take a state that :meth:`_check_state` passed."""
        self.__dict__.update({key: _copy(value) for key, value in state_dict.items() if key not in self._nested})
        self._restore_rates()

    def _restore_rates(self) -> None:
        self._set_rates(self._last_lr)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(last_epoch={self.last_epoch}, last_lr={self._last_lr})"


def check_rates(state: dict, groups: int, where: str = "state_dict") -> None:
    """The learning rates in a scheduler's ``state``, ``where`` it is, for an optimizer of ``groups``
    param groups: its ``_last_lr`` (which loading puts into the optimizer) and, where it has them,
    its ``base_lrs``, one per group, each a finite number >= 0 as the optimizer's ``lr`` must be;
    and the same in the states of the schedulers a SequentialLR runs."""
    for key in ("_last_lr", "base_lrs"):
        if key == "base_lrs" and key not in state:
            continue
        rates = state.get(key)
        if not isinstance(rates, list) or len(rates) != groups:
            raise ValueError(f"{where}: {key!r} must hold one rate per param group ({groups}), got {rates!r}")
        for i, rate in enumerate(rates):
            _checks.non_negative(rate, f"{where}[{key!r}][{i}]")
    nested = state.get("_schedulers")
    for i, inner in enumerate(nested if isinstance(nested, list) else []):
        if isinstance(inner, dict):
            check_rates(inner, groups, f"{where}['_schedulers'][{i}]")


def _copy(value):
    """A copy of a state value deep enough that later steps do not change it."""
    if isinstance(value, dict):
        return {key: _copy(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


class StepLR(LRScheduler):
    """Multiply each group's rate by ``gamma`` every ``step_size`` epochs."""

    def __init__(self, optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1) -> None:
        self.step_size = _checks.positive_int(step_size, "step_size")
        self.gamma = _checks.non_negative(gamma, "gamma")
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self._current()
        return [rate * self.gamma for rate in self._current()]

    def _closed_form(self) -> list[float]:
        return [base * self.gamma ** (self.last_epoch // self.step_size) for base in self.base_lrs]


class MultiStepLR(LRScheduler):
    """Multiply each group's rate by ``gamma`` at each epoch in ``milestones`` (by ``gamma**n`` at
    one listed ``n`` times)."""

    def __init__(self, optimizer, milestones, gamma: float = 0.1, last_epoch: int = -1) -> None:
        milestones = list(milestones)
        for i, milestone in enumerate(milestones):
            _checks.positive_int(milestone, f"milestones[{i}]")
        self.milestones = Counter(milestones)
        self.gamma = _checks.non_negative(gamma, "gamma")
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        if self.last_epoch not in self.milestones:
            return self._current()
        return [rate * self.gamma ** self.milestones[self.last_epoch] for rate in self._current()]

    def _closed_form(self) -> list[float]:
        passed = bisect_right(sorted(self.milestones.elements()), self.last_epoch)
        return [base * self.gamma ** passed for base in self.base_lrs]

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["milestones"] = sorted(self.milestones.elements())  # a list, for JSON
        return state

    def _check_state(self, state_dict) -> None:
        super()._check_state(state_dict)
        milestones = state_dict["milestones"]
        if not isinstance(milestones, list):
            raise ValueError(f"state_dict: 'milestones' must list epochs, got {milestones!r}")
        for i, milestone in enumerate(milestones):
            _checks.positive_int(milestone, f"state_dict['milestones'][{i}]")

    def _load_checked(self, state_dict: dict) -> None:
        super()._load_checked(state_dict)
        self.milestones = Counter(self.milestones)


class ExponentialLR(LRScheduler):
    """Multiply each group's rate by ``gamma`` every epoch."""

    def __init__(self, optimizer, gamma: float, last_epoch: int = -1) -> None:
        self.gamma = _checks.non_negative(gamma, "gamma")
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        if self._is_initial:
            return self._current()
        return [rate * self.gamma for rate in self._current()]

    def _closed_form(self) -> list[float]:
        return [base * self.gamma ** self.last_epoch for base in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    """Anneal each group's rate from its initial rate to ``eta_min`` along half a cosine over
    ``T_max`` epochs, ``eta_min + (base - eta_min) (1 + cos(pi t / T_max)) / 2``, updated step
    by step as PyTorch does (past ``T_max`` it rises again)."""

    def __init__(self, optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1) -> None:  # noqa: N803
        self.T_max = _checks.positive_int(T_max, "T_max")
        self.eta_min = _checks.non_negative(eta_min, "eta_min")
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        t, period, floor = self.last_epoch, self.T_max, self.eta_min
        if self._is_initial:
            return self._current()
        if self._step_count == 1 and t > 0:
            return [floor + (base - floor) * (1 + math.cos(t * math.pi / period)) / 2 for base in self.base_lrs]
        if (t - 1 - period) % (2 * period) == 0:
            return [rate + (base - floor) * (1 - math.cos(math.pi / period)) / 2
                    for base, rate in zip(self.base_lrs, self._current())]
        ratio = (1 + math.cos(math.pi * t / period)) / (1 + math.cos(math.pi * (t - 1) / period))
        return [ratio * (rate - floor) + floor for rate in self._current()]

    def _closed_form(self) -> list[float]:
        return [self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2
                for base in self.base_lrs]


class LinearLR(LRScheduler):
    """Scale each group's rate by a factor going linearly from ``start_factor`` to ``end_factor``
    over ``total_iters`` epochs, then keep it."""

    def __init__(self, optimizer, start_factor: float = 1.0 / 3, end_factor: float = 1.0, total_iters: int = 5,
                 last_epoch: int = -1) -> None:
        if not 0 < _checks.non_negative(start_factor, "start_factor") <= 1:
            raise ValueError(f"start_factor: expected a number in (0, 1], got {start_factor}")
        if not _checks.non_negative(end_factor, "end_factor") <= 1:
            raise ValueError(f"end_factor: expected a number in [0, 1], got {end_factor}")
        self.start_factor, self.end_factor = float(start_factor), float(end_factor)
        self.total_iters = _checks.positive_int(total_iters, "total_iters")
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        start, end, t = self.start_factor, self.end_factor, self.last_epoch
        if t == 0:
            return [rate * start for rate in self._current()]
        if self._is_initial or t > self.total_iters:
            return self._current()
        ratio = 1.0 + (end - start) / (self.total_iters * start + (t - 1) * (end - start))
        return [rate * ratio for rate in self._current()]

    def _closed_form(self) -> list[float]:
        start, end = self.start_factor, self.end_factor
        return [base * (start + (end - start) * min(self.total_iters, self.last_epoch) / self.total_iters)
                for base in self.base_lrs]


class LambdaLR(LRScheduler):
    """Each group's rate is its initial rate times ``lr_lambda(epoch)``; ``lr_lambda`` is one
    function for every group or a list with one per group. The functions are not saved in
    ``state_dict`` (build the scheduler with them again, then load the state)."""

    _transient = LRScheduler._transient + ("lr_lambdas",)
    _rates_from_functions = True

    def __init__(self, optimizer, lr_lambda, last_epoch: int = -1) -> None:
        optimizer = _optimizer(optimizer)
        functions = _per_group(lr_lambda, "lr_lambda", optimizer)
        for i, fn in enumerate(functions):
            if not callable(fn):
                raise TypeError(f"lr_lambda: expected a function of the epoch, got {type(fn).__name__} for group {i}")
        self.lr_lambdas = functions
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [base * fn(self.last_epoch) for fn, base in zip(self.lr_lambdas, self.base_lrs)]


class OneCycleLR(LRScheduler):
    """The 1cycle policy (Smith and Topin), stepped after every batch: the rate warms up from
    ``max_lr / div_factor`` to ``max_lr`` over the first ``pct_start`` of ``total_steps``
    (or ``epochs * steps_per_epoch``), then anneals to ``initial_lr / final_div_factor``
    (``three_phase`` as in PyTorch). With ``cycle_momentum`` the momentum (SGD, RMSprop) or
    beta1 (Adam, AdamW) moves the other way, between ``max_momentum`` and ``base_momentum``."""

    def __init__(self, optimizer, max_lr, total_steps: int | None = None, epochs: int | None = None,
                 steps_per_epoch: int | None = None, pct_start: float = 0.3, anneal_strategy: str = "cos",
                 cycle_momentum: bool = True, base_momentum=0.85, max_momentum=0.95, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, three_phase: bool = False, last_epoch: int = -1) -> None:
        # Every argument is checked before a param group changes, so a refused one leaves the
        # optimizer as it was.
        optimizer = _optimizer(optimizer)
        last_epoch = _last_epoch(last_epoch)
        if total_steps is not None:
            total_steps = _checks.positive_int(total_steps, "total_steps")
        elif epochs is not None and steps_per_epoch is not None:
            total_steps = _checks.positive_int(epochs, "epochs") * _checks.positive_int(steps_per_epoch,
                                                                                       "steps_per_epoch")
        else:
            raise ValueError("total_steps: give total_steps, or epochs and steps_per_epoch")
        pct_start = _checks.non_negative(pct_start, "pct_start")
        if pct_start > 1:
            raise ValueError(f"pct_start: expected a number in [0, 1], got {pct_start}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy: expected 'cos' or 'linear', got {anneal_strategy!r}")
        max_lrs = _checked_per_group(max_lr, "max_lr", optimizer, _checks.non_negative)
        div_factor = _checks.positive(div_factor, "div_factor")
        final_div_factor = _checks.positive(final_div_factor, "final_div_factor")
        cycle_momentum = _checks.boolean(cycle_momentum, "cycle_momentum")
        three_phase = _checks.boolean(three_phase, "three_phase")
        if cycle_momentum:
            if "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults:
                raise ValueError(f"cycle_momentum: {type(optimizer).__name__} has no momentum or betas to cycle")
            highs = _checked_per_group(max_momentum, "max_momentum", optimizer, _checks.in_unit_interval)
            lows = _checked_per_group(base_momentum, "base_momentum", optimizer, _checks.in_unit_interval)
        warmup_end = float(pct_start * total_steps) - 1
        if three_phase:
            names = ("warm-up", "cool-down", "annihilation")
            phases = [(warmup_end, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                      (float(2 * pct_start * total_steps) - 2, "max_lr", "initial_lr", "base_momentum",
                       "max_momentum"),
                      (total_steps - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum")]
        else:
            names = ("warm-up", "annealing")
            phases = [(warmup_end, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                      (total_steps - 1, "max_lr", "min_lr", "base_momentum", "max_momentum")]
        start = 0.0
        for i, ((end, *_), name) in enumerate(zip(phases, names)):
            if end == start:  # get_lr divides by the phase's length
                raise ValueError(f"pct_start: {pct_start} of total_steps={total_steps} leaves phase {i + 1} of "
                                 f"{len(phases)} ({name}) with no steps; change pct_start or total_steps so "
                                 "that every phase has at least one")
            start = end

        self.total_steps = total_steps
        self._anneal_func_type = anneal_strategy
        self._schedule_phases = [dict(zip(("end_step", "start_lr", "end_lr", "start_momentum", "end_momentum"), phase))
                                 for phase in phases]
        if last_epoch == -1:
            for group, peak in zip(optimizer.param_groups, max_lrs):
                group["initial_lr"] = peak / div_factor
                group["max_lr"] = peak
                group["min_lr"] = group["initial_lr"] / final_div_factor
        self.cycle_momentum = cycle_momentum
        if cycle_momentum:
            self.use_beta1 = "betas" in optimizer.defaults
            if last_epoch == -1:
                for group, high, low in zip(optimizer.param_groups, highs, lows):
                    self._set_momentum(group, high)
                    group["max_momentum"] = high
                    group["base_momentum"] = low
        super().__init__(optimizer, last_epoch)

    @property
    def varies_momentum(self) -> bool:
        return self.cycle_momentum

    def _set_momentum(self, group: dict, momentum: float) -> None:
        if self.use_beta1:
            group["betas"] = (momentum, *group["betas"][1:])
        else:
            group["momentum"] = momentum

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self._anneal_func_type == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def get_lr(self) -> list[float]:
        """The rates of step ``last_epoch``; with ``cycle_momentum`` it also sets the momentum."""
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(f"OneCycleLR: stepped {step} times, but total_steps is {self.total_steps}")
        rates = []
        for group in self.optimizer.param_groups:
            start = 0.0
            for i, phase in enumerate(self._schedule_phases):
                end = phase["end_step"]
                if step <= end or i == len(self._schedule_phases) - 1:
                    pct = (step - start) / (end - start)
                    rates.append(self._anneal(group[phase["start_lr"]], group[phase["end_lr"]], pct))
                    if self.cycle_momentum:
                        self._set_momentum(group, self._anneal(group[phase["start_momentum"]],
                                                               group[phase["end_momentum"]], pct))
                    break
                start = end
        return rates

    def _check_state(self, state_dict) -> None:
        """Also a step within the cycle: loading computes its rates (and momentum), which a step
        past ``total_steps`` has none of, after the state was taken."""
        super()._check_state(state_dict)
        step, total = state_dict["last_epoch"], state_dict["total_steps"]
        if not isinstance(total, int) or isinstance(total, bool) or total < 1:
            raise TypeError(f"state_dict['total_steps']: expected a positive int, got {total!r}")
        if not isinstance(step, int) or isinstance(step, bool) or not -1 <= step <= total:
            raise ValueError(f"state_dict['last_epoch']: expected an int from -1 to total_steps={total}, got {step!r}")

    def _restore_rates(self) -> None:
        # The momentum of the saved step. A scheduler that a SequentialLR has not started yet has
        # its construction step undone (last_epoch < 0): it set no momentum since it was built,
        # and building it again set the same one.
        if self.last_epoch >= 0:
            self.get_lr()
        super()._restore_rates()


class SequentialLR(LRScheduler):
    """Run ``schedulers`` one after another: the first until ``milestones[0]``, the next until
    ``milestones[1]``, ...; each starts from epoch 0 of its own schedule at its milestone."""

    _nested = ("_schedulers",)

    def __init__(self, optimizer, schedulers, milestones, last_epoch: int = -1) -> None:
        optimizer = _optimizer(optimizer)
        schedulers = list(schedulers)
        if not schedulers:
            raise ValueError("schedulers: expected at least one scheduler")
        for i, scheduler in enumerate(schedulers):
            if isinstance(scheduler, ReduceLROnPlateau):
                raise ValueError(f"schedulers[{i}]: ReduceLROnPlateau steps with a metric, which SequentialLR "
                                 "does not pass on")
            if not isinstance(scheduler, LRScheduler):
                raise TypeError(f"schedulers[{i}]: expected a scheduler, got {type(scheduler).__name__}")
            if scheduler.optimizer is not optimizer:
                raise ValueError(f"schedulers[{i}]: it schedules another optimizer than the one given")
        milestones = list(milestones)
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(f"milestones: expected {len(schedulers) - 1} (one fewer than the schedulers), "
                             f"got {len(milestones)}")
        for i, milestone in enumerate(milestones):
            _checks.non_negative_int(milestone, f"milestones[{i}]")
        for i, group in enumerate(optimizer.param_groups):
            if "initial_lr" not in group:
                raise ValueError(f"schedulers: param_groups[{i}] has no 'initial_lr': the group was added to the "
                                 "optimizer after the schedulers were built; add every group first")
        self._schedulers = schedulers
        self._milestones = milestones
        self.last_epoch = _last_epoch(last_epoch) + 1
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        for scheduler in schedulers:
            _undo_construction_step(scheduler)
        first = schedulers[bisect_right(milestones, 0)]
        first._initial_step()
        self._last_lr = first.get_last_lr()

    @property
    def varies_momentum(self) -> bool:
        return any(scheduler.varies_momentum for scheduler in self._schedulers)

    def step(self) -> None:
        self.last_epoch += 1
        index = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[index]
        if index > 0 and self._milestones[index - 1] == self.last_epoch:
            scheduler._update_lr(0)
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()

    def state_dict(self) -> dict:
        state = {key: _copy(value) for key, value in vars(self).items()
                 if key not in self._transient and key != "_schedulers"}
        state["_schedulers"] = [scheduler.state_dict() for scheduler in self._schedulers]
        return state

    def _check_state(self, state_dict) -> None:
        """Its own entries and every nested scheduler's state, so that a refused load changes none of them."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("_schedulers"), list) \
                or len(state_dict["_schedulers"]) != len(self._schedulers):
            raise ValueError(f"state_dict: expected the state of a SequentialLR of {len(self._schedulers)} schedulers")
        super()._check_state(state_dict)
        for scheduler, state in zip(self._schedulers, state_dict["_schedulers"]):
            scheduler._check_state(state)

    def _load_checked(self, state_dict: dict) -> None:
        for scheduler, state in zip(self._schedulers, state_dict["_schedulers"]):
            scheduler._load_checked(state)
        super()._load_checked(state_dict)  # the rates end as this scheduler's last ones


def _undo_construction_step(scheduler: LRScheduler) -> None:
    """Undo the step ``scheduler`` made when it was built. A nested SequentialLR's steps were its
    own schedulers' (and its counter stays as it is), as PyTorch's recursive undo does."""
    if isinstance(scheduler, SequentialLR):
        for inner in scheduler._schedulers:
            _undo_construction_step(inner)
    else:
        scheduler.last_epoch -= 1


class ReduceLROnPlateau(LRScheduler):
    """Multiply each group's rate by ``factor`` (down to ``min_lr``) when the metric given to
    ``step(metric)`` has not improved for more than ``patience`` epochs; ``threshold`` and
    ``threshold_mode`` ("rel" or "abs") say what counts as better, ``cooldown`` epochs pass
    after a reduction before counting again, and a change smaller than ``eps`` is skipped. A param
    group added to the optimizer later is reduced too, down to ``min_lr`` where that was one number
    (where it was one per group, extend ``min_lrs`` for the new group)."""

    _transient = ("optimizer",)

    def __init__(self, optimizer, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0, min_lr=0,
                 eps: float = 1e-8) -> None:
        self.optimizer = _optimizer(optimizer)
        if not _checks.non_negative(factor, "factor") < 1.0:
            raise ValueError(f"factor: expected a number < 1.0, got {factor}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode: expected 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode: expected 'rel' or 'abs', got {threshold_mode!r}")
        self.factor = float(factor)
        self.default_min_lr = None if isinstance(min_lr, (list, tuple)) else min_lr
        self.min_lrs = _checked_per_group(min_lr, "min_lr", self.optimizer, _checks.non_negative)
        self.patience = _checks.non_negative_int(patience, "patience")
        self.cooldown = _checks.non_negative_int(cooldown, "cooldown")
        self.eps = _checks.non_negative(eps, "eps")
        self.last_epoch = 0
        self._last_lr = self._current()
        self.mode, self.threshold_mode = mode, threshold_mode
        self.threshold = _checks.non_negative(threshold, "threshold")
        self.mode_worse = math.inf if mode == "min" else -math.inf
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    def step(self, metrics) -> None:  # noqa: D417 - PyTorch's argument name
        """Count an epoch whose monitored value is ``metrics`` and reduce the rates if it is time."""
        current = float(metrics)
        self.last_epoch += 1
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs in cooldown do not count
        if self.num_bad_epochs > self.patience:
            self._reduce()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = self._current()

    def _reduce(self) -> None:
        groups = self.optimizer.param_groups
        if len(self.min_lrs) != len(groups):  # a group was added to the optimizer after this was built
            if self.default_min_lr is None:
                raise RuntimeError(f"min_lr: one rate per param group was given for {len(self.min_lrs)} groups, "
                                   f"but the optimizer now has {len(groups)}; set the scheduler's min_lrs to one "
                                   "rate per group")
            self.min_lrs += [float(self.default_min_lr)] * (len(groups) - len(self.min_lrs))
        for group, floor in zip(groups, self.min_lrs):
            old = float(group["lr"])
            new = max(old * self.factor, floor)
            if old - new > self.eps:
                group["lr"] = new

    def _is_better(self, value: float, best: float) -> bool:
        if self.mode == "min":
            return value < (best * (1.0 - self.threshold) if self.threshold_mode == "rel" else best - self.threshold)
        return value > (best * (self.threshold + 1.0) if self.threshold_mode == "rel" else best + self.threshold)
