"""Checkpoints: what the file holds, when ModelCheckpoint writes, and resuming bit-identically on the CPU."""

import json

import numpy as np
import pytest

import gpubp as gb
from gpubp import _random, finetune, io
from gpubp.optim import lr_scheduler
from gpubp.checkpoint import save_checkpoint
from child_process import run_python
from test_bad_input import assert_weights_equal

SUFFIXES = [".npz", ".safetensors"]
EPOCHS, STOP = 5, 2

OPTIMIZERS = {
    "sgd_momentum": lambda model: gb.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True),
    "adam_groups": lambda model: gb.optim.Adam(finetune.param_groups(model, lr=0.01, decay=0.5)),
    "adamw": lambda model: gb.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05),
    "adam_head_only": lambda model: gb.optim.Adam(model[2].parameters(), lr=0.01),
    "rmsprop_centered_momentum": lambda model: gb.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.9,
                                                                centered=True),
}


@pytest.fixture(params=SUFFIXES)
def suffix(request):
    return request.param


def dataset(n=45):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 3, n)


def new_model(frozen_first=False):
    gb.seed(21)
    model = gb.Sequential([gb.Dense(6, 12, "gelu"), gb.Dense(12, 8, "tanh"), gb.Dense(8, 3)], device="cpu")
    if frozen_first:
        model[0].freeze()
    return model


def train(model, optimizer, epochs, callbacks=(), **kwargs):
    x, y = dataset()
    return model.fit(x, y, optimizer=optimizer, epochs=epochs, batch_size=8, validation_split=0.2,
                     metrics=["accuracy"], callbacks=list(callbacks), verbose=0, **kwargs)


# ----------------------------------------------------------------------------- the file


def test_the_file_holds_model_optimizer_epoch_random_state_and_history(tmp_path, suffix):
    model = new_model()
    path = tmp_path / f"run{suffix}"
    history = train(model, gb.optim.Adam(model.parameters()), 2, [gb.ModelCheckpoint(path)])
    header, tensors = io.read_file(path)
    section = header["checkpoint"]
    assert section["epoch"] == 2
    assert section["optimizer"]["class"] == "Adam" and section["optimizer"]["state"]["0"]["step"] == 10  # 36 samples, batches of 8: 5 steps an epoch
    assert section["random_state"] == _random.get_state()
    assert section["history"]["history"] == history.history
    assert {f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")} < set(tensors)
    assert set(section["tensors"]) == {f"optimizer.state.{i}.{n}" for i in range(6) for n in ("m", "v")}


def test_an_npz_checkpoint_reads_without_pickle(tmp_path):
    model = new_model()
    train(model, "adam", 1, [gb.ModelCheckpoint(tmp_path / "run.npz")])
    with np.load(tmp_path / "run.npz", allow_pickle=False) as data:
        assert all(data[key].dtype != object for key in data.files)


def test_a_safetensors_checkpoint_reads_with_the_safetensors_package(tmp_path):
    safetensors = pytest.importorskip("safetensors.numpy", reason="the reference reader: pip install safetensors")
    model = new_model()
    train(model, "adam", 1, [gb.ModelCheckpoint(tmp_path / "run.safetensors")])
    tensors = safetensors.load_file(str(tmp_path / "run.safetensors"))
    np.testing.assert_array_equal(tensors["layers.2.weight"], model.get_weights()[4])


def test_gb_load_reads_the_model_of_a_checkpoint(tmp_path, suffix):
    model = new_model()
    train(model, "sgd", 1, [gb.ModelCheckpoint(tmp_path / f"run{suffix}")])
    assert_weights_equal(model.get_weights(), gb.load(tmp_path / f"run{suffix}", device="cpu"))


def test_every_n_epochs_and_the_epoch_in_the_name(tmp_path):
    model = new_model()
    train(model, "adam", 5, [gb.ModelCheckpoint(tmp_path / "run-{epoch:02d}.npz", every=2)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-02.npz", "run-04.npz"]
    assert gb.load_checkpoint(tmp_path / "run-04.npz", device="cpu").epoch == 4


def run_callback(cb, model, values, monitor):
    cb.on_train_begin(model)
    saved = []
    for epoch, value in enumerate(values):
        model.history.append(epoch, {monitor: value}, 0.0)
        cb.on_epoch_end(model, epoch, {monitor: value})
        saved.append(gb.load_checkpoint(cb.path, device="cpu").epoch)
    return saved


@pytest.mark.parametrize("monitor, values, saved", [
    ("val_loss", [1.0, 2.0, 0.5, 0.7], [1, 1, 3, 3]),
    ("val_accuracy", [0.5, 0.4, 0.9, 0.9], [1, 1, 3, 3]),
], ids=["min", "max"])
def test_save_best_only_writes_when_the_monitored_value_improves(tmp_path, monitor, values, saved):
    model = new_model()
    train(model, "adam", 1)
    model.history = gb.History()
    cb = gb.ModelCheckpoint(tmp_path / "best.npz", monitor=monitor, save_best_only=True)
    assert run_callback(cb, model, values, monitor) == saved
    assert cb.best == (max(values) if monitor == "val_accuracy" else min(values))


def test_a_resumed_run_remembers_the_best_value_so_far(tmp_path):
    model = new_model()
    train(model, "adam", 1)
    model.history = gb.History()
    model.history.append(0, {"val_loss": 0.25}, 0.0)
    cb = gb.ModelCheckpoint(tmp_path / "best.npz", monitor="val_loss", save_best_only=True)
    cb.on_train_begin(model)
    cb.on_epoch_end(model, 1, {"val_loss": 0.5})
    assert cb.best == 0.25 and not (tmp_path / "best.npz").exists()


def scripted_metric(values):
    """A metric ``score`` that returns ``values`` in turn, one per epoch: fit scores the epoch's
    training outputs, then the validation data, so each value is returned for both."""
    values = iter([value for value in values for _ in ("training", "validation")])

    def score(scores, y):
        return next(values)
    return score


def test_save_best_only_every_n_epochs_resumes_saving_what_the_uninterrupted_run_saves(tmp_path):
    """A resumed run's best comes from the epochs the callback checks (every 2nd), not from epoch 1's 0.5."""
    values = [0.5, 0.9, 0.8, 0.7, 0.6, 0.65]

    def run(folder, model, optimizer, epochs, score, **kwargs):
        checkpoint = gb.ModelCheckpoint(folder / "best-{epoch}.npz", monitor="val_score", mode="min",
                                        save_best_only=True, every=2)
        x, y = dataset()
        model.fit(x, y, optimizer=optimizer, epochs=epochs, batch_size=8, validation_split=0.2, metrics=[score],
                  callbacks=[checkpoint], verbose=0, **kwargs)
        return sorted(p.name for p in folder.iterdir())

    for folder in ("full", "resumed"):
        (tmp_path / folder).mkdir()
    full = run(tmp_path / "full", new_model(), "sgd", 6, scripted_metric(values))
    score = scripted_metric(values)  # the resumed run goes on with the values the first part left
    run(tmp_path / "resumed", new_model(), "sgd", 2, score)
    ckpt = gb.load_checkpoint(tmp_path / "resumed" / "best-2.npz", device="cpu")
    resumed = run(tmp_path / "resumed", ckpt.model, ckpt.optimizer, 6, score, initial_epoch=ckpt.epoch)
    assert full == resumed == ["best-2.npz", "best-4.npz", "best-6.npz"]


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(save_best_only=True), ValueError, "save_best_only: needs a monitor"),
    (dict(every=0), ValueError, "every: expected a positive int, got 0"),
    (dict(mode="best"), ValueError, "mode: expected 'auto', 'min' or 'max', got 'best'"),
    (dict(monitor=3), TypeError, "monitor: expected the name of a logged value"),
])
def test_bad_model_checkpoint_arguments(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        gb.ModelCheckpoint(tmp_path / "run.npz", **kwargs)


def test_a_checkpoint_path_needs_a_known_suffix(tmp_path):
    with pytest.raises(ValueError, match="path: expected a file ending in .npz or .safetensors"):
        gb.ModelCheckpoint(tmp_path / "run.pt")


@pytest.mark.parametrize("kwargs, unlogged", [({"monitor": "val_f1"}, "val_f1"),
                                              ({"path": "run-{epoch}-{val_f1:.3f}.npz"}, "val_f1")])
def test_an_unlogged_monitor_or_path_value_fails_before_the_first_step(tmp_path, kwargs, unlogged):
    model = new_model()
    before = model.get_weights()
    checkpoint = gb.ModelCheckpoint(**{"path": tmp_path / "run.npz", **kwargs})
    with pytest.raises(ValueError, match=rf"callbacks\[0\]: ModelCheckpoint reads '{unlogged}', which this fit "
                                         r"does not log; it logs \['loss', 'accuracy', 'val_loss', 'val_accuracy'\]$"):
        train(model, "adam", 1, [checkpoint])
    assert_weights_equal(before, model)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", ["run-{}.npz", "run-{0}.npz", "run-{epoch.real}.npz", "run-{epoch.npz", "run}.npz"])
def test_a_path_that_names_no_logged_value_is_refused(path):
    with pytest.raises(ValueError, match=r"^path: "):
        gb.ModelCheckpoint(path)


@pytest.mark.parametrize("path", ["m-{val_loss:03d}.npz", "m-{epoch:s}.npz", "m-{epoch!z}.npz",
                                  "m-{val_loss:{width}}.npz"])
def test_a_path_that_cannot_format_an_epoch_or_a_logged_value_fails_before_the_first_step(tmp_path, path):
    model = new_model()
    before = model.get_weights()
    with pytest.raises(ValueError, match=r"^path: .*the epoch is an int and logged values are floats"):
        train(model, "adam", 1, [gb.ModelCheckpoint(tmp_path / path)])
    assert_weights_equal(before, model)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path, logged, written", [
    ("m-{epoch:02d}.npz", None, "m-02.npz"),
    ("m-{epoch}-{val_loss:.2f}.npz", "val_loss", "m-2-{:.2f}.npz"),
    ("m-{loss}.npz", "loss", "m-{}.npz"),
    ("m-{epoch:.1f}-{val_accuracy:03.0%}.npz", "val_accuracy", "m-2.0-{:03.0%}.npz"),
], ids=["epoch_02d", "val_loss_2f", "loss", "float_spec_on_epoch"])
def test_a_path_that_formats_its_values_names_the_file(tmp_path, path, logged, written):
    model = new_model()
    history = train(model, "adam", 2, [gb.ModelCheckpoint(tmp_path / path, every=2)])
    expected = written.format(history[logged][-1]) if logged else written
    assert [p.name for p in tmp_path.iterdir()] == [expected]


def test_an_optimizer_of_other_parameters_cannot_be_checkpointed(tmp_path):
    model, other = new_model(), new_model()
    with pytest.raises(ValueError, match="optimizer: it updates parameters that are not the model's"):
        save_checkpoint(tmp_path / "run.npz", model, gb.optim.SGD(other.parameters()), epoch=1)


class LoggingAdam(gb.optim.Adam):
    """A user's subclass of a built-in optimizer: load_checkpoint could build only the Adam it extends."""


class Adam(gb.optim.Adam):
    """A user's subclass under the built-in's own name."""


class NotifyingStepLR(lr_scheduler.StepLR):
    """A user's scheduler holding a function, which its state_dict() (all its attributes) then holds."""

    def __init__(self, optimizer, step_size, notify=print):
        self.notify = notify
        super().__init__(optimizer, step_size)


UNSAVABLE = {
    "optimizer_subclass": (LoggingAdam, None, r"optimizer: checkpoints hold the built-in optimizers \['Adam', 'AdamW', "
                           r"'RMSprop', 'SGD'\], which load_checkpoint builds again; got test_checkpoint.LoggingAdam"),
    "optimizer_subclass_named_as_a_built_in": (Adam, None, "optimizer: .*; got test_checkpoint.Adam"),
    "scheduler_state_a_header_cannot_hold": (gb.optim.Adam, lambda opt: NotifyingStepLR(opt, step_size=1),
                                             r"scheduler: the state_dict\(\) of the NotifyingStepLR holds what a "
                                             r"checkpoint's header cannot \(.*function"),
}


@pytest.mark.parametrize("make_optimizer, make_scheduler, message", UNSAVABLE.values(), ids=UNSAVABLE.keys())
def test_a_run_that_cannot_be_checkpointed_fails_before_the_first_step(tmp_path, make_optimizer, make_scheduler,
                                                                       message):
    """save_checkpoint would refuse it at the first epoch's end, an epoch of training lost: fit
    checks the callback's needs first, as it checks the values a callback reads."""
    model = new_model()
    before = model.get_weights()
    optimizer = make_optimizer(model.parameters())
    scheduled = {} if make_scheduler is None else {"scheduler": make_scheduler(optimizer)}
    with pytest.raises(TypeError, match="^ModelCheckpoint: " + message):
        train(model, optimizer, 2, [gb.ModelCheckpoint(tmp_path / "run.npz")], **scheduled)
    assert_weights_equal(before, model)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- resuming


def test_resuming_with_the_optimizer_of_the_run_that_wrote_the_checkpoint_is_refused(tmp_path):
    model = new_model()
    optimizer = gb.optim.Adam(model.parameters(), lr=0.01)
    train(model, optimizer, 2, [gb.ModelCheckpoint(tmp_path / "run.npz")])
    ckpt = gb.load_checkpoint(tmp_path / "run.npz", device="cpu")
    before, old_before = ckpt.model.get_weights(), model.get_weights()
    with pytest.raises(ValueError, match=r"^optimizer: it updates parameters that are not the model's; .*"
                                         r"use the optimizer the checkpoint loaded, ckpt.optimizer"):
        train(ckpt.model, optimizer, 4, initial_epoch=ckpt.epoch)
    assert_weights_equal(before, ckpt.model)
    assert_weights_equal(old_before, model)


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, suffix, make_optimizer):
    model = new_model(frozen_first=True)
    full = train(model, make_optimizer(model), EPOCHS, [gb.ModelCheckpoint(tmp_path / ("run-{epoch}" + suffix))])
    ckpt = gb.load_checkpoint(tmp_path / f"run-{STOP}{suffix}", device="cpu")
    assert ckpt.epoch == STOP and ckpt.history.epoch == [0, 1]
    resumed = train(ckpt.model, ckpt.optimizer, EPOCHS, initial_epoch=ckpt.epoch)
    assert_weights_equal(model.get_weights(), ckpt.model)
    assert resumed.history == full.history and resumed.epoch == full.epoch
    assert not ckpt.model[0].trainable


def test_a_checkpoint_resumes_its_optimizer_in_a_fit_given_none(tmp_path, suffix):
    """Keras's resume: load, then fit without optimizer=. The restored optimizer is the model's
    compiled one, so the run ends as the uninterrupted one, not with a fresh optimizer."""
    x, y = dataset()
    model = new_model()
    model.compile(optimizer=gb.optim.Adam(model.parameters(), lr=0.01))
    model.fit(x, y, epochs=EPOCHS, batch_size=8, verbose=0,
              callbacks=[gb.ModelCheckpoint(tmp_path / ("run-{epoch}" + suffix))])
    ckpt = gb.load_checkpoint(tmp_path / f"run-{STOP}{suffix}", device="cpu")
    assert ckpt.model.optimizer is ckpt.optimizer
    ckpt.model.fit(x, y, epochs=EPOCHS, initial_epoch=ckpt.epoch, batch_size=8, verbose=0)
    assert ckpt.model.optimizer is ckpt.optimizer
    assert_weights_equal(model.get_weights(), ckpt.model)


class WarmStepLR(lr_scheduler.StepLR):
    """A user's own schedule, subclassing a built-in one as one subclasses PyTorch's: StepLR's
    rates, at a tenth of them for the first ``warmup`` epochs (an attribute of its state)."""

    def __init__(self, optimizer, step_size, warmup=2, **kwargs):
        self.warmup = warmup
        super().__init__(optimizer, step_size, **kwargs)

    def get_lr(self):
        scale = 0.1 if self.last_epoch < self.warmup else 1.0
        return [scale * rate for rate in self._closed_form()]


SCHEDULED = {
    "step_lr": (lambda opt: lr_scheduler.StepLR(opt, step_size=2, gamma=0.5), {}),
    # Built again by the user, it loads the state of its own class: the checkpoint names it and loads.
    "user_subclass": (lambda opt: WarmStepLR(opt, step_size=2, gamma=0.5), {}),
    "one_cycle_per_batch": (lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.05, epochs=EPOCHS, steps_per_epoch=5),
                            {}),
    "linear_warmup": (lambda opt: lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=3), {}),
    "plateau": (lambda opt: lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5), {}),
    # The scheduler steps first at an epoch's end, then the callback lowers the rate: the
    # checkpoint must resume from the lowered rate, not from the one the scheduler set.
    "step_lr_then_plateau_callback": (lambda opt: lr_scheduler.StepLR(opt, step_size=100, gamma=0.5),
                                      {"callbacks": [gb.callbacks.ReduceLROnPlateau("val_loss", factor=0.5,
                                                                                    patience=0, min_delta=10)]}),
    "keras_callbacks": (None, {"callbacks": [gb.callbacks.ReduceLROnPlateau("val_loss", factor=0.5, patience=0,
                                                                            cooldown=1),
                                             gb.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.9)]}),
}


@pytest.mark.parametrize("case", SCHEDULED)
def test_a_run_with_a_schedule_resumes_bit_identical(tmp_path, case):
    make, extra = SCHEDULED[case]
    model = new_model()
    optimizer = OPTIMIZERS["adam_groups"](model)
    scheduled = {} if make is None else {"scheduler": make(optimizer)}
    callbacks = [*extra.get("callbacks", []), gb.ModelCheckpoint(tmp_path / "run-{epoch}.safetensors")]
    full = train(model, optimizer, EPOCHS, callbacks, **scheduled)
    assert len(set(full.history["learning_rate"])) > 1
    ckpt = gb.load_checkpoint(tmp_path / f"run-{STOP}.safetensors", device="cpu")
    resumed_scheduler = {}
    if make is not None:
        resumed_scheduler = {"scheduler": make(ckpt.optimizer)}  # built again, as in PyTorch...
        resumed_scheduler["scheduler"].load_state_dict(ckpt.scheduler_state)  # ...then its state loaded
    else:
        assert ckpt.scheduler_state is None
    resumed = train(ckpt.model, ckpt.optimizer, EPOCHS, extra.get("callbacks", []), initial_epoch=ckpt.epoch,
                    **resumed_scheduler)
    assert_weights_equal(model.get_weights(), ckpt.model)
    assert resumed.history == full.history


FLOAT32_OPTIONS = {
    "sgd": lambda model: gb.optim.SGD(model.parameters(), lr=np.float32(0.05), momentum=np.float32(0.9),
                                      weight_decay=np.float32(0.01)),
    "adam": lambda model: gb.optim.Adam(model.parameters(), lr=np.float32(0.01), eps=np.float32(1e-7),
                                        betas=(np.float32(0.8), np.float32(0.99)), weight_decay=np.float32(0.01)),
    "rmsprop": lambda model: gb.optim.RMSprop(model.parameters(), lr=np.float32(0.01), alpha=np.float32(0.9),
                                              momentum=np.float32(0.5), eps=np.float32(1e-7)),
}


@pytest.mark.parametrize("make_optimizer", FLOAT32_OPTIONS.values(), ids=FLOAT32_OPTIONS.keys())
def test_a_run_with_numpy_float32_options_and_a_schedule_resumes_bit_identical(tmp_path, suffix, make_optimizer):
    """The file holds the options as Python floats: the optimizer must hold them so from the start."""
    model = new_model()
    optimizer = make_optimizer(model)
    full = train(model, optimizer, EPOCHS, [gb.ModelCheckpoint(tmp_path / ("run-{epoch}" + suffix))],
                 scheduler=lr_scheduler.ExponentialLR(optimizer, gamma=0.9))
    ckpt = gb.load_checkpoint(tmp_path / f"run-{STOP}{suffix}", device="cpu")
    scheduler = lr_scheduler.ExponentialLR(ckpt.optimizer, gamma=0.9)
    scheduler.load_state_dict(ckpt.scheduler_state)
    resumed = train(ckpt.model, ckpt.optimizer, EPOCHS, initial_epoch=ckpt.epoch, scheduler=scheduler)
    assert_weights_equal(model.get_weights(), ckpt.model)
    assert resumed.history == full.history


def test_a_parameter_frozen_alone_stays_frozen_in_the_resumed_run(tmp_path):
    model = new_model()
    model[1].bias.trainable = False
    frozen = model[1].bias.data.copy()
    full = train(model, gb.optim.SGD(model.trainable_parameters(), lr=0.1, momentum=0.9), EPOCHS,
                 [gb.ModelCheckpoint(tmp_path / "run-{epoch}.npz")])
    ckpt = gb.load_checkpoint(tmp_path / f"run-{STOP}.npz", device="cpu")
    assert (ckpt.model[1].weight.trainable, ckpt.model[1].bias.trainable) == (True, False)
    resumed = train(ckpt.model, ckpt.optimizer, EPOCHS, initial_epoch=ckpt.epoch)
    np.testing.assert_array_equal(ckpt.model[1].bias.data, frozen)
    assert_weights_equal(model.get_weights(), ckpt.model)
    assert resumed.history == full.history


def test_a_checkpoint_listed_before_a_rate_callback_saves_the_rate_it_set(tmp_path):
    """ModelCheckpoint's on_epoch_end runs after the other callbacks' wherever it is listed, so the
    checkpoint holds the rate ReduceLROnPlateau lowered at that epoch's end, and the run resumes
    bit-identical (listed first, it used to save the rate from before the reduction)."""
    def plateau():
        return gb.callbacks.ReduceLROnPlateau("val_loss", factor=0.5, patience=0)

    model = new_model()
    optimizer = OPTIMIZERS["adam_groups"](model)
    full = train(model, optimizer, EPOCHS, [gb.ModelCheckpoint(tmp_path / "run-{epoch}.npz"), plateau()])
    rates = full.history["learning_rate"]
    assert rates[STOP] < rates[STOP - 1], "no reduction at the end of the epoch the checkpoint saves"
    ckpt = gb.load_checkpoint(tmp_path / f"run-{STOP}.npz", device="cpu")
    resumed = train(ckpt.model, ckpt.optimizer, EPOCHS, [plateau()], initial_epoch=ckpt.epoch)
    assert_weights_equal(model.get_weights(), ckpt.model)
    assert resumed.history == full.history


def never_improving(restore_best_weights=False):
    """Stops at epoch 3 of 5: epoch 0 is the best (no later one improves by 10), then 3 to wait."""
    return gb.EarlyStopping("val_loss", patience=3, min_delta=10, restore_best_weights=restore_best_weights)


def test_a_resumed_run_stops_early_where_the_uninterrupted_one_did(tmp_path):
    model = new_model()
    full = train(model, OPTIMIZERS["adamw"](model), EPOCHS,
                 [never_improving(), gb.ModelCheckpoint(tmp_path / "run-{epoch}.npz")])
    assert full.epoch == [0, 1, 2, 3]
    ckpt = gb.load_checkpoint(tmp_path / f"run-{STOP}.npz", device="cpu")
    resumed = train(ckpt.model, ckpt.optimizer, EPOCHS, [never_improving()], initial_epoch=ckpt.epoch)
    assert resumed.epoch == full.epoch
    assert_weights_equal(model.get_weights(), ckpt.model)


def test_restore_best_weights_warns_when_the_best_epoch_came_before_the_resumed_run(tmp_path):
    model = new_model()
    train(model, OPTIMIZERS["adamw"](model), EPOCHS, [gb.ModelCheckpoint(tmp_path / "run-{epoch}.npz")])
    first_epoch = gb.load_checkpoint(tmp_path / f"run-{STOP}.npz", device="cpu")
    train(first_epoch.model, first_epoch.optimizer, STOP + 1, initial_epoch=first_epoch.epoch)
    ckpt = gb.load_checkpoint(tmp_path / f"run-{STOP}.npz", device="cpu")  # restores the random state again
    with pytest.warns(UserWarning, match=r"best val_loss so far was at epoch 1, before this resumed run"):
        resumed = train(ckpt.model, ckpt.optimizer, EPOCHS, [never_improving(restore_best_weights=True)],
                        initial_epoch=ckpt.epoch)
    assert resumed.epoch == [0, 1, 2, 3]
    # No epoch of this run improves on its first by min_delta=10, so its first is the best of this
    # run's epochs, which it restores (see test_callbacks for a later one).
    assert_weights_equal(first_epoch.model.get_weights(), ckpt.model)


def dropout_model():
    gb.seed(21)
    return gb.Sequential([gb.Dropout(0.1), gb.Dense(6, 12, "gelu"), gb.Dropout(0.3, name="drop"),
                          gb.Dense(12, 8, "relu"), gb.Dense(8, 3)], device="cpu")


def test_a_run_with_dropout_and_a_schedule_resumes_bit_identical(tmp_path, suffix):
    """The masks come from the library's random stream, which the checkpoint saves: the resumed run
    draws the keys the uninterrupted one drew."""
    model = dropout_model()
    model[1].freeze()
    optimizer = gb.optim.Adam(model.parameters(), lr=0.01)
    full = train(model, optimizer, EPOCHS, [gb.ModelCheckpoint(tmp_path / ("run-{epoch}" + suffix))],
                 scheduler=lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5))
    ckpt = gb.load_checkpoint(tmp_path / f"run-{STOP}{suffix}", device="cpu")
    assert [type(layer).__name__ for layer in ckpt.model] == ["Dropout", "Dense", "Dropout", "Dense", "Dense"]
    assert [layer.rate for layer in ckpt.model if isinstance(layer, gb.Dropout)] == [0.1, 0.3]
    assert ckpt.model[2].name == "drop" and not ckpt.model[1].trainable
    scheduler = lr_scheduler.StepLR(ckpt.optimizer, step_size=2, gamma=0.5)
    scheduler.load_state_dict(ckpt.scheduler_state)
    resumed = train(ckpt.model, ckpt.optimizer, EPOCHS, initial_epoch=ckpt.epoch, scheduler=scheduler)
    assert_weights_equal(model.get_weights(), ckpt.model)
    assert resumed.history == full.history


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy"], indirect=True)
def test_a_run_resumed_on_the_gpu_ends_within_float_tolerance(tmp_path, backend):
    """Not run on the Numba backend: in the CUDA simulator these few steps take ~10 s.
    (It passes there; test_a_checkpoint_resumes_on_another_backend covers loading onto it.)"""
    x, y = dataset(8)

    def run(**kwargs):
        gb.seed(21)
        model = gb.Sequential([gb.Dense(6, 5, "relu"), gb.Dense(5, 3)], backend=backend)
        return model, model.fit(x, y, optimizer=gb.optim.Adam(model.parameters(), lr=0.01), batch_size=4,
                                verbose=0, **kwargs)

    full, _ = run(epochs=2, callbacks=[gb.ModelCheckpoint(tmp_path / "run-{epoch}.safetensors")])
    ckpt = gb.load_checkpoint(tmp_path / "run-1.safetensors", backend=backend)
    ckpt.model.fit(x, y, optimizer=ckpt.optimizer, epochs=2, initial_epoch=ckpt.epoch, batch_size=4, verbose=0)
    for a, b in zip(full.get_weights(), ckpt.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_load_checkpoint_restores_the_random_state_of_the_save(tmp_path):
    model = new_model()
    train(model, "adam", 1, [gb.ModelCheckpoint(tmp_path / "run.npz")])
    expected = _random.generator().random(3)
    gb.seed(999)
    gb.load_checkpoint(tmp_path / "run.npz", device="cpu")
    np.testing.assert_array_equal(_random.generator().random(3), expected)


def test_a_resumed_run_keeps_checkpointing_its_whole_history(tmp_path):
    model = new_model()
    train(model, "adam", 3, [gb.ModelCheckpoint(tmp_path / "run.npz")])
    ckpt = gb.load_checkpoint(tmp_path / "run.npz", device="cpu")
    train(ckpt.model, ckpt.optimizer, 5, [gb.ModelCheckpoint(tmp_path / "run.npz")], initial_epoch=ckpt.epoch)
    again = gb.load_checkpoint(tmp_path / "run.npz", device="cpu")
    assert again.epoch == 5 and again.history.epoch == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("first, then", [({}, {"validation_split": 0.2}), ({"validation_split": 0.2}, {})],
                         ids=["validation_added", "validation_dropped"])
def test_a_resumed_run_that_logs_other_values_keeps_one_entry_per_epoch(tmp_path, first, then):
    """A value an epoch did not log is NaN, so the History still lines up with its epochs, its
    checkpoint loads, and a further resume works."""
    x, y = dataset()
    model = new_model()
    model.fit(x, y, optimizer="adam", epochs=2, batch_size=8, verbose=0, **first)
    history = model.fit(x, y, epochs=4, initial_epoch=2, batch_size=8, verbose=0,
                        callbacks=[gb.ModelCheckpoint(tmp_path / "run.npz")], **then)
    assert history.epoch == [0, 1, 2, 3] and set(history.history) == {"loss", "val_loss"}
    assert all(len(values) == 4 for values in history.history.values())
    logged = [0, 1] if first else [2, 3]
    assert [i for i, value in enumerate(history["val_loss"]) if not np.isnan(value)] == logged
    ckpt = gb.load_checkpoint(tmp_path / "run.npz", device="cpu")
    np.testing.assert_array_equal(ckpt.history["val_loss"], history["val_loss"])
    resumed = ckpt.model.fit(x, y, optimizer=ckpt.optimizer, epochs=5, initial_epoch=4, batch_size=8, verbose=0)
    assert resumed.epoch == [0, 1, 2, 3, 4] and len(resumed["val_loss"]) == 5 and np.isnan(resumed["val_loss"][4])


def test_a_run_resumed_from_its_last_checkpoint_trains_nothing_and_keeps_its_history(tmp_path):
    """Keras runs range(initial_epoch, epochs): nothing when they are equal."""
    model = new_model()
    full = train(model, "adam", 3, [gb.ModelCheckpoint(tmp_path / "run.npz")])
    ckpt = gb.load_checkpoint(tmp_path / "run.npz", device="cpu")
    before = ckpt.model.get_weights()
    resumed = train(ckpt.model, ckpt.optimizer, 3, initial_epoch=ckpt.epoch)
    assert resumed.history == full.history and resumed.epoch == [0, 1, 2]
    assert_weights_equal(before, ckpt.model)


@pytest.mark.parametrize("initial_epoch", [6, 7, -1])
def test_an_initial_epoch_outside_the_run_is_rejected_before_training(initial_epoch):
    model = new_model()
    before = model.get_weights()
    with pytest.raises(ValueError, match=r"initial_epoch: expected an int in \[0, epochs=5\]"):
        train(model, "adam", 5, initial_epoch=initial_epoch)
    assert_weights_equal(before, model)


def test_an_initial_epoch_that_is_not_an_int_is_a_type_error():
    with pytest.raises(TypeError, match="initial_epoch: expected an int, got float"):
        train(new_model(), "adam", 5, initial_epoch=2.0)


@pytest.mark.parametrize("backend", ["numba"], indirect=True)
def test_a_checkpoint_resumes_on_another_backend(tmp_path, backend):
    model = new_model()
    train(model, "adam", 1, [gb.ModelCheckpoint(tmp_path / "run.safetensors")])
    ckpt = gb.load_checkpoint(tmp_path / "run.safetensors", backend=backend)
    assert ckpt.model.backend_name == backend
    x, y = dataset(16)
    ckpt.model.fit(x, y, optimizer=ckpt.optimizer, epochs=2, initial_epoch=1, batch_size=16, verbose=0)
    assert all(np.all(np.isfinite(w)) for w in ckpt.model.get_weights())


RESUME_IN_A_CHILD = """
import sys
import numpy as np
import gpubp as gb

ckpt = gb.load_checkpoint(sys.argv[1], device="cpu")
rng = np.random.default_rng(0)
x, y = rng.normal(size=(45, 6)).astype(np.float32), rng.integers(0, 3, 45)
ckpt.model.fit(x, y, optimizer=ckpt.optimizer, epochs=int(sys.argv[3]), initial_epoch=ckpt.epoch, batch_size=8,
               validation_split=0.2, metrics=["accuracy"], verbose=0)
ckpt.model.save(sys.argv[2])
"""


def test_a_run_resumed_in_a_fresh_process_ends_bit_identical(tmp_path, suffix):
    model = new_model()
    optimizer = OPTIMIZERS["adam_groups"](model)
    train(model, optimizer, EPOCHS, [gb.ModelCheckpoint(tmp_path / ("run-{epoch}" + suffix))])
    run_python(RESUME_IN_A_CHILD, tmp_path / f"run-{STOP}{suffix}", tmp_path / "resumed.npz", EPOCHS)
    assert_weights_equal(model.get_weights(), gb.load(tmp_path / "resumed.npz", device="cpu"))


def test_the_header_is_plain_json(tmp_path):
    model = new_model()
    train(model, "adam", 1, [gb.ModelCheckpoint(tmp_path / "run.npz")])
    with np.load(tmp_path / "run.npz", allow_pickle=False) as data:
        assert json.loads(str(data["__architecture__"]))["checkpoint"]["epoch"] == 1


def header_text(path):
    """The JSON text of a gpubp file's header, as it was written."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return str(data["__architecture__"])
    with open(path, "rb") as f:  # safetensors: an 8-byte little-endian length, then its JSON header
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size))["__metadata__"]["gpubp"]


def plain_json(text):
    """``text`` parsed as JSON proper, which has no NaN, Infinity or -Infinity."""
    def refuse(constant):
        raise ValueError(f"{constant} is not plain JSON")

    return json.loads(text, parse_constant=refuse)


def test_the_header_stays_plain_json_where_the_history_pads_an_unlogged_value_with_nan(tmp_path, suffix):
    x, y = dataset()
    model = new_model()
    model.fit(x, y, optimizer="adam", epochs=1, batch_size=8, verbose=0)
    path = tmp_path / f"run{suffix}"
    history = model.fit(x, y, epochs=3, initial_epoch=1, batch_size=8, verbose=0, validation_split=0.2,
                        callbacks=[gb.ModelCheckpoint(path)])
    assert np.isnan(history["val_loss"][0])  # epoch 0 did not validate
    assert plain_json(header_text(path))["checkpoint"]["epoch"] == 3
    ckpt = gb.load_checkpoint(path, device="cpu")
    assert ckpt.history.history.keys() == history.history.keys()
    for key, values in history.history.items():
        np.testing.assert_array_equal(ckpt.history[key], values)  # NaN where it was NaN


def test_non_finite_history_values_round_trip_through_a_plain_json_header(tmp_path, suffix):
    history = gb.history.History()
    history.append(0, {"loss": float("inf"), "val_loss": -float("inf")}, seconds=0.5)
    history.append(1, {"loss": np.float32("nan")}, seconds=0.25)  # val_loss: not logged, NaN
    model = new_model()
    path = tmp_path / f"run{suffix}"
    save_checkpoint(path, model, gb.optim.SGD(model.parameters()), epoch=2, history=history)
    plain_json(header_text(path))
    loaded = gb.load_checkpoint(path, device="cpu").history
    assert loaded.epoch == history.epoch and loaded.epoch_times == history.epoch_times
    assert loaded.history.keys() == history.history.keys()
    for key, values in history.history.items():
        np.testing.assert_array_equal(loaded[key], values)
        assert all(type(value) is float for value in loaded[key])


# ----------------------------------------------------------------------------- refused before writing


def logging_fit(path, log, epochs=2):
    """A fit of ``new_model()`` whose callback logs ``log(epoch)`` as ``"extra"`` at each epoch's end,
    checkpointed to ``path`` after every epoch."""
    def add(epoch, logs):
        logs["extra"] = log(epoch)

    x, y = dataset()
    model = new_model()
    model.fit(x, y, optimizer="adam", epochs=epochs, batch_size=8, verbose=0,
              callbacks=[gb.callbacks.LambdaCallback(on_epoch_end=add), gb.ModelCheckpoint(path)])
    return model


@pytest.mark.parametrize("value, loaded", [
    (np.float32(0.1), float(np.float32(0.1))),
    (np.float64(0.1), 0.1),
    (np.array(0.25, np.float32), 0.25),
    (np.array(-0.0), -0.0),
    (np.int64(7), 7),
    (np.array(2**62, np.uint64), 2**62),
    (3, 3),
], ids=["float32", "float64", "0d_float32", "0d_negative_zero", "int64", "0d_uint64", "int"])
def test_numpy_numbers_a_callback_logs_are_checkpointed_as_the_python_numbers_they_hold(tmp_path, suffix, value,
                                                                                        loaded):
    path = tmp_path / f"run{suffix}"
    model = logging_fit(path, lambda epoch: value)
    history = gb.load_checkpoint(path, device="cpu").history
    assert [type(v) for v in history["extra"]] == [type(loaded)] * 2
    assert np.array_equal(np.array(history["extra"]).view(np.uint8), np.array([loaded] * 2).view(np.uint8))
    assert history["loss"] == model.history["loss"]


@pytest.mark.parametrize("value, shown", [
    (True, r"a bool \(True\)"),
    (np.bool_(False), r"a bool_? \((np\.)?False_?\)"),
    (np.array(True), r"a bool_? \((np\.)?True_?\)"),
    ("better", r"a str \('better'\)"),
    (None, r"a NoneType \(None\)"),
    (1 + 2j, r"a complex \(\(1\+2j\)\)"),
    (np.ones(2), r"an array of shape \(2,\) and dtype float64"),
], ids=["bool", "numpy_bool", "0d_bool", "str", "none", "complex", "array"])
def test_a_logged_value_that_is_no_number_is_refused_and_the_last_checkpoint_stays(tmp_path, suffix, value, shown):
    """The History loads back numbers only; a bool would come back as 1 or 0, not as the bool logged, so it
    is refused too, naming the key and the epoch (counted from 1, as fit's messages count them)."""
    path = tmp_path / f"run{suffix}"
    with pytest.raises(TypeError, match=rf"^history: 'extra' logged in epoch 2 is {shown}; a checkpoint holds "
                                        "numbers only"):
        logging_fit(path, lambda epoch: 0.5 if epoch == 0 else value)
    assert gb.load_checkpoint(path, device="cpu").epoch == 1


def test_save_checkpoint_refuses_a_history_that_is_no_history(tmp_path):
    model = new_model()
    with pytest.raises(TypeError, match="^history: expected a gpubp History or None, got dict"):
        save_checkpoint(tmp_path / "run.npz", model, gb.optim.SGD(model.parameters()), epoch=1, history={"loss": [1.0]})
    assert not (tmp_path / "run.npz").exists()


@pytest.mark.parametrize("where, key", [("weights", "model: 'layers.1.bias'"),
                                        ("optimizer_state", "optimizer: 'optimizer.state.0.m'")])
def test_non_finite_weights_or_optimizer_state_are_refused_and_the_file_stays(tmp_path, suffix, where, key):
    """Loading refuses them, so a checkpoint holding them would replace a good one with one that does not load."""
    model = new_model()
    optimizer = gb.optim.Adam(model.parameters())
    train(model, optimizer, 1)
    path = tmp_path / f"run{suffix}"
    save_checkpoint(path, model, optimizer, epoch=1)
    written = path.read_bytes()
    if where == "weights":
        model[1].bias.data[2] = np.nan
    else:
        optimizer.state[model.parameters()[0]]["m"][0, 0] = np.inf
    with pytest.raises(ValueError, match=rf"^{key} contains NaN or inf, which a gpubp file cannot hold"):
        save_checkpoint(path, model, optimizer, epoch=2)
    assert path.read_bytes() == written


def test_a_run_whose_last_update_overflows_the_weights_keeps_its_last_loadable_checkpoint(tmp_path, suffix):
    """fit stops at a non-finite loss before the update; an update that overflows the weights at an epoch's
    end, its loss still finite, is caught by the checkpoint instead, which keeps the last one that loads."""
    rng = np.random.default_rng(0)
    x, y = rng.random((16, 3), np.float32) * 100, rng.random((16, 1), np.float32) * 100
    gb.seed(0)
    model = gb.Sequential([gb.Dense(3, 8, "relu"), gb.Dense(8, 1)], device="cpu")
    path = tmp_path / f"run{suffix}"
    overflow = gb.callbacks.LearningRateScheduler(lambda epoch: 1e-6 if epoch == 0 else 3e38)
    with pytest.raises(ValueError, match=r"^model: 'layers\.\d\.(weight|bias)' contains NaN or inf"):
        model.fit(x, y, loss="mse", optimizer="sgd", epochs=3, batch_size=16, verbose=0,
                  callbacks=[overflow, gb.ModelCheckpoint(path)])
    assert np.isfinite(model.history["loss"]).all()
    assert gb.load_checkpoint(path, device="cpu").epoch == 1
