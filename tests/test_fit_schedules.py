"""fit(scheduler=...) steps a PyTorch-style scheduler as a PyTorch loop does: the same weights,
bit for bit, as a loop of training steps that calls scheduler.step() itself."""

import numpy as np
import pytest

import gpubp as gb
from gpubp import finetune
from gpubp.optim import lr_scheduler
from test_bad_input import assert_weights_equal

EPOCHS, BATCH = 4, 8


def data(n=36):
    rng = np.random.default_rng(7)
    return rng.standard_normal((n, 5)).astype(np.float32), rng.integers(0, 3, n)


def new_model():
    gb.seed(2)
    return gb.Sequential([gb.Dense(5, 8, "relu"), gb.Dense(8, 8, "tanh"), gb.Dense(8, 3)], device="cpu")


def new_optimizer(model):
    return gb.optim.SGD(finetune.param_groups(model, lr=0.2, decay=0.5), momentum=0.9)


# name -> (the scheduler, how the loop by hand steps it, fit's scheduler_interval)
SCHEDULERS = {
    "step_per_epoch": (lambda opt: lr_scheduler.StepLR(opt, step_size=2, gamma=0.5), "epoch", "auto"),
    "one_cycle_per_batch_by_default": (
        lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.3, epochs=EPOCHS, steps_per_epoch=4), "batch", "auto"),
    "cosine_per_batch": (lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=10), "batch", "batch"),
    "one_cycle_per_epoch_over_every_epoch": (
        lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.3, total_steps=EPOCHS), "epoch", "epoch"),
    "plateau_on_val_loss": (lambda opt: lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5), "plateau",
                            "auto"),
}


def loop_by_hand(make, kind, x, y):
    """The PyTorch way: a training step per batch, scheduler.step() after it or after the epoch."""
    model = new_model()
    optimizer = new_optimizer(model)
    scheduler = make(optimizer)
    step = model.train_step("cross_entropy", optimizer)
    x_train, y_train, x_val, y_val = x[:-4], y[:-4], x[-4:], y[-4:]
    rates = []
    for _ in range(EPOCHS):
        for start in range(0, len(x_train), BATCH):
            rate = max(group["lr"] for group in optimizer.param_groups)
            step(x_train[start:start + BATCH], y_train[start:start + BATCH])
            if kind == "batch":
                scheduler.step()
        rates.append(rate)
        if kind == "epoch":
            scheduler.step()
        elif kind == "plateau":
            scheduler.step(model.evaluate(x_val, y_val, loss="cross_entropy", metrics=[])["loss"])
    return model, rates


@pytest.mark.parametrize("case", SCHEDULERS)
def test_fit_steps_the_scheduler_as_a_pytorch_loop_does(case):
    make, kind, interval = SCHEDULERS[case]
    x, y = data()
    model = new_model()
    optimizer = new_optimizer(model)
    scheduler = make(optimizer)
    history = model.fit(x, y, optimizer=optimizer, scheduler=scheduler, scheduler_interval=interval, epochs=EPOCHS,
                        batch_size=BATCH, shuffle=False, validation_split=4 / 36, metrics=[], verbose=0)
    by_hand, rates = loop_by_hand(make, kind, x, y)
    assert_weights_equal(by_hand.get_weights(), model)
    assert history["learning_rate"] == rates
    assert model.scheduler is scheduler
    assert len(set(rates)) > 1  # the schedule did change the rate


def test_discriminative_rates_keep_their_ratios_under_a_schedule():
    x, y = data()
    model = new_model()
    optimizer = new_optimizer(model)
    model.fit(x, y, optimizer=optimizer, scheduler=lr_scheduler.ExponentialLR(optimizer, gamma=0.5), epochs=3,
              batch_size=BATCH, verbose=0)
    assert [group["lr"] for group in optimizer.param_groups] == [0.05 * 0.5 ** 3, 0.1 * 0.5 ** 3, 0.2 * 0.5 ** 3]


def test_the_rates_a_scheduler_set_stay_after_fit():
    x, y = data()
    model = new_model()
    optimizer = new_optimizer(model)
    model.fit(x, y, optimizer=optimizer, scheduler=lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1), epochs=2,
              batch_size=BATCH, verbose=0)
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(0.002)


BAD = [
    (dict(learning_rate=0.1), ValueError, "learning_rate: the scheduler sets the rates"),
    (dict(scheduler_interval="step"), ValueError, "scheduler_interval: expected 'auto', 'epoch' or 'batch'"),
    (dict(scheduler="plateau", scheduler_interval="batch"), ValueError,
     "scheduler_interval: ReduceLROnPlateau steps once per epoch"),
    (dict(scheduler="plateau", scheduler_monitor="val_accuracy"), ValueError,
     r"scheduler_monitor: 'val_accuracy' is not logged; logged: \['loss', 'val_loss'\]"),
    (dict(scheduler_monitor="val_loss"), ValueError, "scheduler_monitor: only a ReduceLROnPlateau scheduler"),
    (dict(scheduler="short_cycle"), ValueError, "scheduler: OneCycleLR has 5 of its total_steps=5 left, but this fit "
                                                "runs 8 batches"),
    (dict(scheduler="one_step_cycle", scheduler_interval="epoch"), ValueError,
     "scheduler: OneCycleLR has 1 of its total_steps=1 left, but this fit runs 2 epochs"),
    (dict(scheduler="other_optimizer"), ValueError, "scheduler: it schedules another optimizer"),
    (dict(scheduler="cycling_momentum", cuda_graph=True), ValueError,
     "cuda_graph=True: OneCycleLR changes the momentum every step"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_a_scheduler_fit_cannot_step_is_refused_before_the_first_step(kwargs, error, message):
    x, y = data()
    model = new_model()
    optimizer = new_optimizer(model)
    schedulers = {
        None: lambda: lr_scheduler.StepLR(optimizer, step_size=1),
        "plateau": lambda: lr_scheduler.ReduceLROnPlateau(optimizer),
        "short_cycle": lambda: lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=5),
        "one_step_cycle": lambda: lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=1),
        "other_optimizer": lambda: lr_scheduler.StepLR(new_optimizer(new_model()), step_size=1),
        "cycling_momentum": lambda: lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=8),
    }
    kwargs = {**kwargs, "scheduler": schedulers[kwargs.get("scheduler")]()}
    before = model.get_weights()
    with pytest.raises(error, match=message):
        model.fit(x, y, optimizer=optimizer, epochs=2, batch_size=BATCH, validation_split=4 / 36, metrics=[],
                  verbose=0, **kwargs)
    assert_weights_equal(before, model)
