"""gpubp.optim.lr_scheduler against torch.optim.lr_scheduler: the same rates after every step,
group by group, with the same arguments; state_dict round trips; bad arguments."""

import json
import math

import numpy as np
import pytest

import gpubp as gb
from gpubp import finetune
from gpubp.optim import lr_scheduler as ours

torch = pytest.importorskip("torch", reason="the oracle is PyTorch: pip install 'gpubp[torch]'")
theirs = torch.optim.lr_scheduler

STEPS = 24

# name -> (optimizer kind, scheduler class name, arguments); the same for both libraries.
CASES = {
    "step": ("sgd", "StepLR", dict(step_size=3, gamma=0.5)),
    "multistep_repeated_milestone": ("sgd", "MultiStepLR", dict(milestones=[2, 5, 5, 9], gamma=0.3)),
    "exponential": ("adam", "ExponentialLR", dict(gamma=0.9)),
    "cosine_past_t_max": ("sgd", "CosineAnnealingLR", dict(T_max=5, eta_min=0.001)),
    "linear_warmup": ("adam", "LinearLR", dict(start_factor=0.25, end_factor=1.0, total_iters=4)),
    "linear_decay": ("sgd", "LinearLR", dict(start_factor=1.0, end_factor=0.1, total_iters=7)),
    "one_cycle_sgd_momentum": ("sgd_momentum", "OneCycleLR", dict(max_lr=[0.2, 0.4, 0.8], total_steps=STEPS)),
    "one_cycle_adam_beta1": ("adam", "OneCycleLR", dict(max_lr=0.5, epochs=4, steps_per_epoch=6)),
    "one_cycle_three_phase_linear": ("sgd_momentum", "OneCycleLR",
                                     dict(max_lr=0.3, total_steps=STEPS, three_phase=True, anneal_strategy="linear",
                                          pct_start=0.25, div_factor=10.0, final_div_factor=100.0)),
    "one_cycle_no_momentum": ("sgd", "OneCycleLR", dict(max_lr=0.3, total_steps=STEPS, cycle_momentum=False)),
    "one_cycle_rmsprop_momentum": ("rmsprop", "OneCycleLR", dict(max_lr=0.05, total_steps=STEPS)),
}


def optimizers(kind):
    """A gpubp optimizer with discriminative rates (three groups) and the torch one with the same groups."""
    model = gb.Sequential([gb.Dense(3, 4, "relu"), gb.Dense(4, 4, "relu"), gb.Dense(4, 2)], device="cpu")
    groups = finetune.param_groups(model, lr=0.1, decay=0.5)
    torch_groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": group["lr"]} for group in groups]
    if kind == "adam":
        return gb.optim.Adam(groups), torch.optim.Adam(torch_groups)
    if kind == "rmsprop":
        return gb.optim.RMSprop(groups), torch.optim.RMSprop(torch_groups)
    momentum = 0.9 if kind == "sgd_momentum" else 0.0
    return gb.optim.SGD(groups, momentum=momentum), torch.optim.SGD(torch_groups, lr=0.1, momentum=momentum)


def momenta(optimizer):
    return [group["betas"][0] if "betas" in group else group["momentum"] for group in optimizer.param_groups]


def run_both(ours_scheduler, theirs_scheduler, ours_opt, theirs_opt, steps=STEPS, metrics=None):
    """Step both schedulers in lock step; after every step the rates and momenta must be equal, bit for bit."""
    assert [g["lr"] for g in ours_opt.param_groups] == [g["lr"] for g in theirs_opt.param_groups]
    for i in range(steps):
        theirs_opt.step()
        if metrics is None:
            ours_scheduler.step()
            theirs_scheduler.step()
        else:
            ours_scheduler.step(metrics[i])
            theirs_scheduler.step(metrics[i])
        assert ours_scheduler.get_last_lr() == theirs_scheduler.get_last_lr(), f"step {i + 1}"
        assert [g["lr"] for g in ours_opt.param_groups] == [g["lr"] for g in theirs_opt.param_groups]
        assert momenta(ours_opt) == momenta(theirs_opt), f"step {i + 1}"


@pytest.mark.parametrize("case", CASES)
def test_every_rate_equals_pytorchs_after_every_step(case):
    kind, name, kwargs = CASES[case]
    ours_opt, theirs_opt = optimizers(kind)
    run_both(getattr(ours, name)(ours_opt, **kwargs), getattr(theirs, name)(theirs_opt, **kwargs), ours_opt, theirs_opt)


def test_lambda_lr_with_one_function_per_group_equals_pytorch():
    functions = [lambda epoch: 0.95 ** epoch, lambda epoch: 1.0 / (1 + epoch), lambda epoch: epoch // 3 + 1]
    ours_opt, theirs_opt = optimizers("sgd")
    run_both(ours.LambdaLR(ours_opt, functions), theirs.LambdaLR(theirs_opt, functions), ours_opt, theirs_opt)


SEQUENCES = {
    "warmup_then_cosine": (lambda lib, opt: [lib.LinearLR(opt, start_factor=0.1, total_iters=3),
                                             lib.CosineAnnealingLR(opt, T_max=8, eta_min=0.01)], [3]),
    "three_phases": (lambda lib, opt: [lib.ExponentialLR(opt, gamma=0.8), lib.StepLR(opt, step_size=2, gamma=0.5),
                                       lib.MultiStepLR(opt, milestones=[3, 4], gamma=0.2)], [4, 11]),
    # PyTorch undoes the construction step of a nested SequentialLR's own schedulers, not its counter.
    "nested_sequential_first": (lambda lib, opt: [lib.SequentialLR(opt, [lib.LinearLR(opt, start_factor=0.5,
                                                                                      total_iters=2),
                                                                         lib.ExponentialLR(opt, gamma=0.9)], [2]),
                                                  lib.StepLR(opt, step_size=2, gamma=0.5)], [5]),
}


@pytest.mark.parametrize("sequence", SEQUENCES)
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")  # torch, nested
def test_sequential_lr_equals_pytorch(sequence):
    make, milestones = SEQUENCES[sequence]
    ours_opt, theirs_opt = optimizers("sgd")
    ours_scheduler = ours.SequentialLR(ours_opt, make(ours, ours_opt), milestones)
    theirs_scheduler = theirs.SequentialLR(theirs_opt, make(theirs, theirs_opt), milestones)
    run_both(ours_scheduler, theirs_scheduler, ours_opt, theirs_opt)


PLATEAU = {
    "rel_min": dict(factor=0.5, patience=1, cooldown=1, min_lr=[0.01, 0.02, 0.0]),
    "abs_max": dict(mode="max", factor=0.2, patience=0, threshold=0.05, threshold_mode="abs", min_lr=0.004),
}


@pytest.mark.parametrize("case", PLATEAU)
def test_reduce_lr_on_plateau_equals_pytorch(case):
    values = [1.0, 0.9, 0.95, 0.95, 0.8, 0.85, 0.84, 0.86, 0.7, 0.71, 0.72, 0.73, 0.74, 0.6, 0.61, 0.62, 0.63, 0.64]
    if PLATEAU[case].get("mode") == "max":
        values = [-v for v in values]
    ours_opt, theirs_opt = optimizers("sgd")
    run_both(ours.ReduceLROnPlateau(ours_opt, **PLATEAU[case]), theirs.ReduceLROnPlateau(theirs_opt, **PLATEAU[case]),
             ours_opt, theirs_opt, steps=len(values), metrics=values)
    assert ours_opt.param_groups[0]["lr"] < 0.025  # it did reduce


def added_group(optimizer, torch_optimizer):
    optimizer.add_param_group({"params": [gb.Parameter(np.zeros(2), name="added")], "lr": 0.5})
    torch_optimizer.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "lr": 0.5})


def test_reduce_lr_on_plateau_reduces_a_group_added_after_it_was_built_as_pytorch():
    ours_opt, theirs_opt = optimizers("sgd")
    ours_scheduler = ours.ReduceLROnPlateau(ours_opt, patience=0, min_lr=0.01)
    theirs_scheduler = theirs.ReduceLROnPlateau(theirs_opt, patience=0, min_lr=0.01)
    added_group(ours_opt, theirs_opt)
    run_both(ours_scheduler, theirs_scheduler, ours_opt, theirs_opt, steps=6, metrics=[1.0] * 6)
    assert ours_opt.param_groups[3]["lr"] < 0.5  # the added group was reduced


# name -> (scheduler of either library, the class whose step PyTorch refuses the added group at, or
# None where every rate comes from the groups' current rates and the added group is scheduled too).
LATE_GROUP = {
    "lambda": (lambda lib, opt: lib.LambdaLR(opt, lambda epoch: 0.5 ** epoch), "LambdaLR"),
    "cosine": (lambda lib, opt: lib.CosineAnnealingLR(opt, T_max=2), "CosineAnnealingLR"),
    "sequential_cosine_second": (lambda lib, opt: lib.SequentialLR(opt, [lib.LinearLR(opt, start_factor=0.5,
                                                                                      total_iters=2),
                                                                         lib.CosineAnnealingLR(opt, T_max=4)], [3]),
                                 "CosineAnnealingLR"),
    "exponential": (lambda lib, opt: lib.ExponentialLR(opt, gamma=0.9), None),
    "step": (lambda lib, opt: lib.StepLR(opt, step_size=2, gamma=0.5), None),
}


@pytest.mark.parametrize("case", LATE_GROUP)
def test_a_group_added_after_the_scheduler_was_built_is_scheduled_or_refused_where_pytorch_refuses_it(case):
    make, refusing = LATE_GROUP[case]
    ours_opt, theirs_opt = optimizers("sgd")
    ours_scheduler, theirs_scheduler = make(ours, ours_opt), make(theirs, theirs_opt)
    added_group(ours_opt, theirs_opt)
    for i in range(STEPS):
        theirs_opt.step()
        try:
            theirs_scheduler.step()
        except ValueError:
            break
        ours_scheduler.step()
        assert ours_scheduler.get_last_lr() == theirs_scheduler.get_last_lr(), f"step {i + 1}"
    else:
        assert refusing is None, "PyTorch scheduled the added group at every step"
        return
    assert refusing is not None, f"PyTorch refused the added group at step {i + 1}"
    before = [group["lr"] for group in ours_opt.param_groups]
    with pytest.raises(ValueError, match=rf"^optimizer: param_groups\[3\] has no rate from the {refusing}: the group "
                                         r"was added to the optimizer after the scheduler was built; add every "
                                         r"group first$"):
        ours_scheduler.step()
    assert [group["lr"] for group in ours_opt.param_groups] == before  # no rate was set


def test_reduce_lr_on_plateau_with_one_min_lr_per_group_refuses_a_group_added_later():
    ours_opt, theirs_opt = optimizers("sgd")
    scheduler = ours.ReduceLROnPlateau(ours_opt, patience=0, min_lr=[0.0, 0.0, 0.0])
    added_group(ours_opt, theirs_opt)
    scheduler.step(1.0)
    with pytest.raises(RuntimeError, match=r"min_lr: one rate per param group was given for 3 groups, but the "
                                           r"optimizer now has 4"):
        scheduler.step(1.0)


# ----------------------------------------------------------------------------- saving and resuming


RESUMABLE = {
    **{case: (lambda opt, name=name, kwargs=kwargs: getattr(ours, name)(opt, **kwargs), kind)
       for case, (kind, name, kwargs) in CASES.items()},
    "lambda": (lambda opt: ours.LambdaLR(opt, lambda epoch: 0.9 ** epoch), "sgd"),
    "sequential": (lambda opt: ours.SequentialLR(opt, [ours.LinearLR(opt, start_factor=0.1, total_iters=3),
                                                       ours.CosineAnnealingLR(opt, T_max=8)], [3]), "sgd"),
    "plateau": (lambda opt: ours.ReduceLROnPlateau(opt, patience=1), "sgd"),
    "sequential_nested": (lambda opt: ours.SequentialLR(opt, [
        ours.SequentialLR(opt, [ours.LinearLR(opt, start_factor=0.5, total_iters=2), ours.ExponentialLR(opt, 0.9)],
                          [2]),
        ours.StepLR(opt, step_size=2, gamma=0.5)], [7]), "sgd"),
    # Saved while the OneCycleLR has not started: its momentum must stay the one it set when built.
    "sequential_then_one_cycle": (lambda opt: ours.SequentialLR(opt, [
        ours.LinearLR(opt, start_factor=0.5, total_iters=3),
        ours.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS, anneal_strategy="linear")], [12]), "sgd_momentum"),
    "sequential_one_cycle_then_linear": (lambda opt: ours.SequentialLR(opt, [
        ours.OneCycleLR(opt, max_lr=0.1, total_steps=6),
        ours.LinearLR(opt, start_factor=0.5, total_iters=3)], [5]), "adam"),
}


def step(scheduler, i):
    if isinstance(scheduler, ours.ReduceLROnPlateau):
        scheduler.step([1.0, 0.9, 0.95, 0.96, 0.97][i % 5])
    else:
        scheduler.step()


@pytest.mark.parametrize("case", RESUMABLE)
def test_a_scheduler_rebuilt_from_its_state_continues_as_the_uninterrupted_one(case):
    make, kind = RESUMABLE[case]
    optimizer = optimizers(kind)[0]
    scheduler = make(optimizer)
    for i in range(9):
        step(scheduler, i)
    # What a checkpoint holds: the optimizer's and the scheduler's states, through JSON.
    saved_optimizer = json.loads(json.dumps(optimizer.state_dict()))
    saved = json.loads(json.dumps(scheduler.state_dict()))
    restored_optimizer = optimizers(kind)[0]
    restored_optimizer.load_state_dict(saved_optimizer)
    restored = make(restored_optimizer)  # its first step at construction moves the rates...
    restored.load_state_dict(saved)  # ...and loading puts the saved ones back
    for i in range(9, STEPS):
        assert restored_optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"], f"step {i}"
        step(scheduler, i)
        step(restored, i)
        assert restored.get_last_lr() == scheduler.get_last_lr()


def test_loading_the_state_of_another_scheduler_class_is_refused_naming_both():
    optimizer = optimizers("sgd")[0]
    state = ours.StepLR(optimizer, step_size=2).state_dict()
    with pytest.raises(ValueError, match="state_dict: expected the entries .* of a ExponentialLR"):
        ours.ExponentialLR(optimizer, gamma=0.9).load_state_dict(state)


def group_options(optimizer):
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


def stepped(make, kind="sgd", count=6):
    """A scheduler built by ``make`` on a fresh optimizer of three groups, stepped ``count`` times."""
    scheduler = make(optimizers(kind)[0])
    for _ in range(count):
        scheduler.step()
    return scheduler


@pytest.mark.parametrize("key, rate, error, message", [
    ("_last_lr", math.nan, ValueError, r"state_dict\['_last_lr'\]\[1\]: expected a finite number >= 0, got nan"),
    ("_last_lr", -5.0, ValueError, r"state_dict\['_last_lr'\]\[1\]: expected a finite number >= 0, got -5.0"),
    ("_last_lr", "0.1", TypeError, r"state_dict\['_last_lr'\]\[1\]: expected a number >= 0, got str '0.1'"),
    ("base_lrs", math.inf, ValueError, r"state_dict\['base_lrs'\]\[1\]: expected a finite number >= 0, got inf"),
], ids=["nan", "negative", "str", "base_lrs_inf"])
def test_a_state_with_a_rate_the_optimizer_would_refuse_is_refused_before_anything_changes(key, rate, error, message):
    """Loading puts ``_last_lr`` into the optimizer, so it is held to the optimizer's rule for ``lr``."""
    scheduler = stepped(lambda opt: ours.StepLR(opt, step_size=2))
    state = scheduler.state_dict()
    state[key][1] = rate
    before = group_options(scheduler.optimizer), scheduler.state_dict()
    with pytest.raises(error, match=message):
        scheduler.load_state_dict(state)
    assert (group_options(scheduler.optimizer), scheduler.state_dict()) == before


def test_multistep_lr_refuses_milestones_that_are_no_epochs_before_anything_changes():
    scheduler = stepped(lambda opt: ours.MultiStepLR(opt, milestones=[2, 4]))
    state = scheduler.state_dict()
    state["milestones"], state["last_epoch"] = [2, [4]], 9
    before = group_options(scheduler.optimizer), scheduler.state_dict()
    with pytest.raises(TypeError, match=r"state_dict\['milestones'\]\[1\]: expected a positive int, got list \[4\]"):
        scheduler.load_state_dict(state)
    assert (group_options(scheduler.optimizer), scheduler.state_dict()) == before


@pytest.mark.parametrize("key, value, error, message", [
    ("last_epoch", 7, ValueError, r"state_dict\['last_epoch'\]: expected an int from -1 to total_steps=6, got 7"),
    ("last_epoch", 2.0, ValueError, r"state_dict\['last_epoch'\]: expected an int from -1 to total_steps=6, got 2.0"),
    ("total_steps", "6", TypeError, r"state_dict\['total_steps'\]: expected a positive int, got '6'"),
], ids=["past_the_cycle", "float_step", "str_total"])
def test_one_cycle_refuses_a_step_outside_its_cycle_before_anything_changes(key, value, error, message):
    """Loading computes the saved step's rates and momentum: one past total_steps raised from
    there, after the state and the optimizer's momentum had changed."""
    scheduler = stepped(lambda opt: ours.OneCycleLR(opt, max_lr=0.1, total_steps=6), kind="sgd_momentum")
    state = scheduler.state_dict()
    state[key] = value
    before = group_options(scheduler.optimizer), scheduler.state_dict()
    with pytest.raises(error, match=message):
        scheduler.load_state_dict(state)
    assert (group_options(scheduler.optimizer), scheduler.state_dict()) == before


def two_phases(optimizer):
    return ours.SequentialLR(optimizer, [ours.LinearLR(optimizer, start_factor=0.5, total_iters=4),
                                         ours.ExponentialLR(optimizer, gamma=0.5)], [4])


@pytest.mark.parametrize("spoil, message", [
    (lambda state: state.__setitem__("_last_lr", state["_last_lr"] * 2),
     r"state_dict: '_last_lr' must hold one rate per param group \(3\)"),
    (lambda state: state["_schedulers"][1].pop("gamma"), r"state_dict: expected the entries .* of a ExponentialLR"),
    (lambda state: state["_schedulers"][1]["_last_lr"].__setitem__(0, -1.0),
     r"state_dict\['_schedulers'\]\[1\]\['_last_lr'\]\[0\]: expected a finite number >= 0, got -1.0"),
], ids=["its_own_rates", "second_schedulers_entries", "second_schedulers_rate"])
def test_sequential_lr_refuses_a_bad_state_before_loading_any_of_its_schedulers(spoil, message):
    """Saved in the second phase: a load that set the first scheduler's state, or the optimizer's
    rates, before it reached the bad entry would leave them changed."""
    state = stepped(two_phases).state_dict()
    spoil(state)
    scheduler = stepped(two_phases, count=1)
    before = group_options(scheduler.optimizer), scheduler.state_dict()
    with pytest.raises(ValueError, match=message):
        scheduler.load_state_dict(state)
    assert (group_options(scheduler.optimizer), scheduler.state_dict()) == before


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("make, error, message", [
    (lambda opt: ours.StepLR(opt, step_size=0), ValueError, "step_size: expected a positive int, got 0"),
    (lambda opt: ours.StepLR("sgd", step_size=2), TypeError, "optimizer: expected a gpubp optimizer"),
    (lambda opt: ours.ReduceLROnPlateau(opt, factor=1.0), ValueError, r"factor: expected a number < 1.0, got 1.0"),
    (lambda opt: ours.ReduceLROnPlateau(opt, mode="up"), ValueError, "mode: expected 'min' or 'max'"),
    (lambda opt: ours.LinearLR(opt, start_factor=0.0), ValueError, r"start_factor: expected a number in \(0, 1\]"),
    (lambda opt: ours.OneCycleLR(opt, max_lr=0.1), ValueError, "total_steps: give total_steps, or epochs and"),
    (lambda opt: ours.OneCycleLR(opt, max_lr=[0.1, 0.2], total_steps=5), ValueError,
     r"max_lr: expected one value per param group \(3\), got 2"),
    (lambda opt: ours.LambdaLR(opt, [lambda e: 1.0] * 2), ValueError, "lr_lambda: expected one value per param group"),
    (lambda opt: ours.SequentialLR(opt, [ours.ReduceLROnPlateau(opt)], []), ValueError,
     r"schedulers\[0\]: ReduceLROnPlateau steps with a metric"),
    (lambda opt: ours.SequentialLR(opt, [ours.StepLR(opt, 2), ours.StepLR(opt, 3)], []), ValueError,
     "milestones: expected 1"),
    (lambda opt: ours.StepLR(opt, step_size=2, last_epoch=4), ValueError, r"param_groups\[0\] has no 'initial_lr'"),
    # a truthy "False" turned these on
    (lambda opt: ours.OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum="False"), TypeError,
     "cycle_momentum: expected True or False, got 'False'"),
    (lambda opt: ours.OneCycleLR(opt, max_lr=0.1, total_steps=10, three_phase="False"), TypeError,
     "three_phase: expected True or False, got 'False'"),
    (lambda opt: ours.ReduceLROnPlateau(opt, min_lr=[0.0, -1.0, 0.0]), ValueError,
     r"min_lr\[1\]: expected a finite number >= 0, got -1.0"),
])
def test_bad_arguments_are_named(make, error, message):
    optimizer = optimizers("sgd")[0]
    with pytest.raises(error, match=message):
        make(optimizer)


@pytest.mark.parametrize("kwargs, message", [
    (dict(div_factor=0.0), r"div_factor: expected a finite number > 0, got 0.0"),
    (dict(final_div_factor=0.0), r"final_div_factor: expected a finite number > 0, got 0.0"),
    (dict(pct_start=0.1), r"pct_start: 0.1 of total_steps=10 leaves phase 1 of 2 \(warm-up\) with no steps"),
    (dict(pct_start=1.0), r"pct_start: 1.0 of total_steps=10 leaves phase 2 of 2 \(annealing\) with no steps"),
    (dict(pct_start=0.55, three_phase=True), r"pct_start: 0.55 of total_steps=10 leaves phase 3 of 3 "
                                             r"\(annihilation\) with no steps"),
    (dict(base_momentum=1.5), r"base_momentum: expected a number in \[0, 1\), got 1.5"),
    (dict(max_momentum=[0.95, 0.95, 1.2]), r"max_momentum\[2\]: expected a number in \[0, 1\), got 1.2"),
    (dict(max_lr=[0.1, 0.2, -1.0]), r"max_lr\[2\]: expected a finite number >= 0, got -1.0"),
    (dict(anneal_strategy="step"), r"anneal_strategy: expected 'cos' or 'linear', got 'step'"),
    (dict(last_epoch=-2), r"last_epoch: expected an int >= -1, got -2"),
], ids=["div_factor", "final_div_factor", "empty_warm_up", "empty_annealing", "empty_annihilation", "base_momentum",
        "max_momentum", "max_lr", "anneal_strategy", "last_epoch"])
def test_one_cycle_refuses_a_bad_argument_before_changing_the_optimizer(kwargs, message):
    optimizer = optimizers("sgd_momentum")[0]
    before = group_options(optimizer)
    with pytest.raises(ValueError, match=message):
        ours.OneCycleLR(optimizer, **{"max_lr": 0.1, "total_steps": 10, **kwargs})
    assert group_options(optimizer) == before


@pytest.mark.parametrize("milestones, group_added_late, message", [
    ([3], True, r"schedulers: param_groups\[3\] has no 'initial_lr': the group was added to the optimizer after"),
    (["3"], False, r"milestones\[0\]: expected an int >= 0, got '3'"),
], ids=["group_added_after_the_schedulers", "milestone_not_an_int"])
def test_sequential_lr_refuses_a_bad_argument_before_changing_the_optimizer_or_its_schedulers(
        milestones, group_added_late, message):
    optimizer, torch_optimizer = optimizers("sgd")
    schedulers = [ours.LinearLR(optimizer, start_factor=0.5, total_iters=2), ours.ExponentialLR(optimizer, 0.9)]
    if group_added_late:
        added_group(optimizer, torch_optimizer)
    before = group_options(optimizer), [scheduler.state_dict() for scheduler in schedulers]
    with pytest.raises(ValueError, match=message):
        ours.SequentialLR(optimizer, schedulers, milestones)
    assert (group_options(optimizer), [scheduler.state_dict() for scheduler in schedulers]) == before


@pytest.mark.parametrize("rate", [-0.1, math.nan, math.inf])
def test_a_lambda_giving_a_rate_no_optimizer_takes_is_refused_before_any_group_changes(rate):
    """It set the rate, trained on it (SGD steps uphill at -0.1), and its saved state failed to load."""
    optimizer = optimizers("sgd")[0]
    scheduler = ours.LambdaLR(optimizer, lambda epoch: 1.0 if epoch < 2 else rate / 0.1)
    scheduler.step()
    before, state = group_options(optimizer), scheduler.state_dict()
    with pytest.raises(ValueError, match=r"LambdaLR: the rate for param_groups\[0\] at step 2 is"):
        scheduler.step()
    assert group_options(optimizer) == before and scheduler.state_dict() == state


def test_one_cycle_refuses_a_step_past_its_total():
    optimizer = optimizers("sgd")[0]
    scheduler = ours.OneCycleLR(optimizer, max_lr=0.1, total_steps=3)
    for _ in range(3):
        scheduler.step()
    with pytest.raises(ValueError, match="OneCycleLR: stepped 4 times, but total_steps is 3"):
        scheduler.step()


def test_pytorchs_import_path_works():
    from gpubp.optim.lr_scheduler import StepLR

    assert StepLR is gb.optim.lr_scheduler.StepLR
