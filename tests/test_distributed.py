"""Data-parallel training on torch.distributed, on the CPU (gloo over 127.0.0.1).

One torchrun launch of two processes (``torchrun_worker.py``) serves every test that needs
two ranks; each test compares what the ranks saved with a single process. The launch has a
time limit, so a hang fails the test instead of blocking the run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import gpubp as gb
from gpubp import distributed

torch = pytest.importorskip("torch")

import torchrun_worker as worker  # noqa: E402  (tests/ is on sys.path under pytest)
from child_process import child_env  # noqa: E402

WORLD_SIZE = 2
LAUNCH_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env() -> dict:
    """The environment for the ranks: this gpubp first on the path, gloo bound to the loopback interface."""
    env = child_env()
    loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    if loopback:
        env["GLOO_SOCKET_IFNAME"] = loopback
    env["OMP_NUM_THREADS"] = "1"
    return env


def kill_leftover_ranks(out: Path) -> None:
    """Kill the worker processes of this launch that are still running (each wrote its pid; its argv names ``out``)."""
    for pid_file in out.glob("pid.rank*"):
        pid = int(pid_file.read_text())
        with contextlib.suppress(OSError):
            if str(out) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                os.kill(pid, signal.SIGKILL)


def launch(out: Path, world_size: int, device: str = "cpu") -> dict:
    """Run the worker under torchrun: the arrays each rank saved (by rank), the output, the folder.

    The output goes to a file, not a pipe, so a rank that outlives the launcher cannot keep the
    test waiting; past the time limit the launcher and every rank (by the pid each one wrote) are killed.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(world_size),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(Path(worker.__file__)), str(out)]
    env = {**loopback_env(), "GPUBP_WORKER_DEVICE": device}
    log_path = out / "torchrun.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:  # past the limit, or this test was stopped (a SIGINT, which its new session misses)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            kill_leftover_ranks(out)
    log = log_path.read_text()
    assert proc.returncode == 0, f"torchrun failed or ran past {LAUNCH_TIMEOUT_S} s ({proc.returncode}):\n{log[-4000:]}"
    saved = [dict(np.load(out / f"rank{r}.npz")) for r in range(world_size)]
    return {"saved": saved, "log": log, "dir": out}


def test_a_launch_stopped_by_a_signal_kills_its_launcher_too(tmp_path, monkeypatch):
    """The launcher runs in a session of its own, which a step's SIGINT (gpu_check.sh's budget) does
    not reach: stopped so, the launch killed the ranks it found but left torchrun running."""
    started = []

    class Launcher(subprocess.Popen):  # runs on, in the session of its own the launch gives torchrun
        def __init__(self, command, **kwargs):
            super().__init__([sys.executable, "-c", "import time; time.sleep(120)"], **kwargs)
            started.append(self)

        def wait(self, timeout=None):
            if timeout is not None:  # the launch's wait, when the SIGINT comes
                raise KeyboardInterrupt
            return super().wait()

    monkeypatch.setattr(subprocess, "Popen", Launcher)
    try:
        with pytest.raises(KeyboardInterrupt):
            launch(tmp_path, WORLD_SIZE)
        assert started[0].poll() is not None
    finally:
        for proc in started:
            with contextlib.suppress(OSError):
                proc.kill()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The worker's results from 2 CPU processes, launched once for every test below."""
    return launch(tmp_path_factory.mktemp("torchrun"), WORLD_SIZE)


def weights(saved: dict) -> list[np.ndarray]:
    return [saved[f"arr_{i}"] for i in range(sum(k.startswith("arr_") for k in saved))]


@pytest.fixture(scope="module")
def single_process_fit():
    x, y = worker.fit_data()
    gb.seed(worker.FIT_SEED)
    model = worker.fit_model()
    history = model.fit(x, y, optimizer=worker.fit_optimizer(model), **worker.FIT_KWARGS)
    return model, history


def test_distributed_fit_matches_one_process_with_the_global_batch(ranks, single_process_fit):
    model, _ = single_process_fit
    for saved in ranks["saved"]:
        for got, want in zip(weights(saved), model.get_weights()):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_distributed_fit_leaves_the_same_weights_on_every_rank(ranks):
    for got, want in zip(weights(ranks["saved"][1]), weights(ranks["saved"][0])):
        np.testing.assert_array_equal(got, want)


def test_distributed_fit_frozen_layer_is_not_trained(ranks):
    gb.seed(worker.FIT_SEED)
    initial = worker.fit_model().get_weights()
    for saved in ranks["saved"]:
        np.testing.assert_array_equal(weights(saved)[2], initial[2])
        np.testing.assert_array_equal(weights(saved)[3], initial[3])


# val_f1: the ranks score the whole validation set's gathered predictions, not a mean of their parts' F1;
# accuracy and f1, the training metrics, every rank's outputs of the epoch, gathered at its end
@pytest.mark.parametrize("key", ["loss", "accuracy", "f1", "val_loss", "val_accuracy", "val_f1"])
def test_distributed_fit_history_matches_one_process(ranks, single_process_fit, key):
    _, history = single_process_fit
    for saved in ranks["saved"]:
        np.testing.assert_allclose(saved[key], history[key], rtol=1e-5, atol=1e-6)


def test_distributed_fit_rejects_a_batch_the_world_size_does_not_divide(ranks):
    for saved in ranks["saved"]:
        message = str(saved["batch_error"])
        assert "batch_size" in message and "15" in message and "world size 2" in message


def test_distributed_fit_refuses_a_shard_per_rank_saying_every_rank_passes_the_whole_dataset(ranks):
    for saved in ranks["saved"]:
        message = str(saved["shard_error"])
        assert message.startswith("x: rank 0 and rank 1 pass different data (fingerprints ")
        assert "every rank must pass the whole dataset" in message and "no DistributedSampler" in message


def test_distributed_fit_refuses_ranks_whose_schedulers_would_set_other_rates(ranks):
    """A StepLR of another gamma, or the same one stepped per batch on one rank and per epoch on
    the other, would train the ranks to other weights: refused on both, naming what differs."""
    for saved in ranks["saved"]:
        gamma, interval = (str(error) for error in saved["scheduler_errors"])
        assert gamma.startswith("scheduler: rank 0 trains with scheduler StepLR(") and "0.9" in gamma
        assert interval.startswith("scheduler_interval/scheduler_monitor: rank 0 trains with "
                                   "scheduler_interval/scheduler_monitor ['epoch', None], rank 1 with ['batch', None]")


@pytest.mark.parametrize("key", ["loss", "val_loss", "val_accuracy"])
def test_distributed_fit_with_fewer_validation_samples_than_ranks_matches_one_process(ranks, key):
    want = worker.small_validation_fit(distributed=False)[key]
    for saved in ranks["saved"]:
        np.testing.assert_allclose(saved[f"small_{key}"], want, rtol=1e-5, atol=1e-6)


def test_a_stop_that_one_ranks_callback_asks_for_stops_every_rank_after_the_same_batch(ranks):
    """Rank 0's callback stops the fit after batch 2 of its second epoch (7 batches an epoch);
    rank 1, which has no callback that runs at each batch, stops there too (the same weights)
    instead of waiting in the next step's all-reduce until the timeout, and both return once
    rank 0 wrote the epoch's checkpoint."""
    r0, r1 = ranks["saved"]
    assert int(r0["stopped_batches"]) == 7 + 3
    assert int(r0["stopped_epochs"]) == int(r1["stopped_epochs"]) == 2
    np.testing.assert_array_equal(r1["stopped_weights"], r0["stopped_weights"])
    assert bool(r0["last_checkpoint_there"]) and bool(r1["last_checkpoint_there"])


def test_rank_0s_optimizer_state_is_broadcast_with_its_weights(ranks):
    """Adam's moments, which each rank trained apart before fit, would move the weights apart."""
    np.testing.assert_array_equal(ranks["saved"][1]["adam_weights"], ranks["saved"][0]["adam_weights"])


def test_distributed_fit_prints_progress_on_rank_0_only(ranks):
    assert ranks["log"].count("epoch 1/3 - ") == 1


def test_distributed_fit_prints_callback_messages_on_rank_0_only(ranks):
    assert ranks["log"].count("Epoch 2: early stopping") == 1


def test_distributed_fit_runs_file_writing_callbacks_on_rank_0_only(ranks):
    assert sorted(p.name for p in ranks["dir"].glob("*.rank*") if not p.name.startswith("pid.")) == [
        "every.rank0", "every.rank1", "writer.rank0"]


def test_ddp_of_mlp_matches_one_process_with_the_global_batch(ranks):
    from gpubp.torch import MLP

    gb.seed(worker.DDP_SEED)
    mlp = MLP([6, 10, 3])
    worker.ddp_steps(mlp, *worker.ddp_data())
    want = np.concatenate([p.detach().numpy().ravel() for p in mlp.parameters()])
    for saved in ranks["saved"]:
        np.testing.assert_allclose(saved["ddp"], want, rtol=0, atol=1e-6)


@pytest.mark.gpu
def test_nccl_at_world_size_1_matches_one_cpu_process(tmp_path, single_process_fit):
    pytest.importorskip("cupy")
    saved = launch(tmp_path, 1, device="cuda")["saved"][0]
    for got, want in zip(weights(saved), single_process_fit[0].get_weights()):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- one rank, in this process


@pytest.fixture
def one_rank_group(monkeypatch):
    """A gloo process group of this process alone, over 127.0.0.1."""
    import datetime

    for name, value in loopback_env().items():
        if name.startswith("GLOO"):
            monkeypatch.setenv(name, value)
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


class _EveryBatch(gb.Callback):
    def on_train_batch_end(self, model, batch, logs):
        pass


class _EveryBatchByKerasAlias(gb.Callback):  # Keras's older name, which on_train_batch_end calls
    def on_batch_end(self, model, batch, logs):
        pass


@pytest.mark.parametrize("callbacks, per_batch", [([], False), ([gb.callbacks.CSVLogger], False), ([_EveryBatch], True),
                                                  ([_EveryBatchByKerasAlias], True)],
                         ids=["none", "epoch-only", "batch hook", "batch hook by its alias"])
def test_the_ranks_agree_on_a_stop_each_epoch_and_each_batch_only_where_a_callback_runs_there(
        one_rank_group, monkeypatch, tmp_path, callbacks, per_batch):
    """Each step all-reduces its bucket; each epoch's end, and fit's, one value more; each batch's
    end one more only where some rank's callback runs code there (an all-reduce costs a step some
    hundred microseconds with gloo)."""
    calls = []
    all_reduce = torch.distributed.all_reduce
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *a, **k: (calls.append(tensor.numel()),
                                                                                 all_reduce(tensor, *a, **k))[1])
    x, y = worker.fit_data()
    made = [cb(str(tmp_path / "log.csv")) if cb is gb.callbacks.CSVLogger else cb() for cb in callbacks]
    gb.Sequential([gb.Dense(6, 3)]).fit(x, y, epochs=2, batch_size=16, verbose=0, distributed=True, callbacks=made)
    steps = 2 * 7  # 101 samples in batches of 16
    assert calls.count(6 * 3 + 3 + 1) == steps
    assert calls.count(1) == 2 + 1 + (steps if per_batch else 0)


def test_each_step_sends_the_trainable_gradients_and_the_loss_only(one_rank_group):
    model = worker.fit_model()
    x, y = worker.fit_data()
    parallel = distributed.DataParallel(model, batch_size=8, data=(x[:8], y[:8], None))
    parallel.forward_backward(gb.losses.cross_entropy, x[:8], y[:8])
    trainable = sum(p.data.size for p in model.trainable_parameters())
    assert trainable < sum(p.data.size for p in model.parameters())
    assert parallel.bucket_size == trainable + 1


def test_fit_on_one_rank_equals_fit_without_distributed(one_rank_group, single_process_fit):
    x, y = worker.fit_data()
    gb.seed(worker.FIT_SEED)
    model = worker.fit_model()
    model.fit(x, y, optimizer=worker.fit_optimizer(model), distributed=True, **worker.FIT_KWARGS)
    for got, want in zip(model.get_weights(), single_process_fit[0].get_weights()):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_cuda_graph_auto_runs_a_distributed_fit_eagerly_and_true_is_refused(one_rank_group, single_process_fit):
    """'auto' captures where it can, and a distributed step it cannot: it trains as False does."""
    x, y = worker.fit_data()
    gb.seed(worker.FIT_SEED)
    model = worker.fit_model()
    model.fit(x, y, optimizer=worker.fit_optimizer(model), distributed=True, cuda_graph="auto", **worker.FIT_KWARGS)
    for got, want in zip(model.get_weights(), single_process_fit[0].get_weights()):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    before = model.get_weights()
    with pytest.raises(ValueError, match="^cuda_graph: a distributed step all-reduces"):
        model.fit(x, y, distributed=True, cuda_graph=True, **worker.FIT_KWARGS)
    for got, want in zip(model.get_weights(), before):
        np.testing.assert_array_equal(got, want)


def test_ranks_whose_layers_compute_otherwise_with_the_same_parameters_are_refused(one_rank_group, monkeypatch):
    """Another activation, Dropout rate or precision leaves the parameters' shapes alike, and each
    rank computed another function: the setups fit gathers now say what each layer computes."""
    check, setups = distributed.check_setups, []
    monkeypatch.setattr(distributed, "check_setups", setups.extend)
    x, y = worker.fit_data()
    for activation, rate, precision in (("relu", 0.1, "fp32"), ("tanh", 0.1, "fp32"), ("relu", 0.6, "fp32"),
                                        ("relu", 0.1, "bf16")):
        model = gb.Sequential([gb.Dense(6, 8, activation), gb.Dropout(rate), gb.Dense(8, 3)], precision=precision)
        model.fit(x, y, epochs=1, batch_size=16, verbose=0, distributed=True)
    same, *others = setups
    check([same, same])
    for other in others:
        with pytest.raises(ValueError, match=r"^model: rank 1's layers compute otherwise than rank 0's"):
            check([same, other])


def test_fit_gives_the_setup_check_its_arguments_and_the_fingerprints_of_its_data(one_rank_group, monkeypatch):
    setups = []
    monkeypatch.setattr(distributed, "check_setups", setups.extend)
    x, y = worker.fit_data()
    model = worker.fit_model()
    model.fit(x, y, loss="sparse_categorical_crossentropy", epochs=1, batch_size=16, validation_split=0.2,
              shuffle=False, metrics=["f1"], clip_grad_norm=1.0, verbose=0, distributed=True)
    (setup,) = setups
    assert {key: setup["arguments"][key] for key in ("shuffle", "loss", "metrics", "clip_grad_norm")} == {
        "shuffle": False, "loss": "gpubp.losses.cross_entropy", "metrics": ["f1"], "clip_grad_norm": 1.0}
    assert setup["data"] == {"x": distributed.fingerprint(x[:80]), "y": distributed.fingerprint(y[:80]),
                             "sample_weight/class_weight": distributed.fingerprint(None),
                             "validation data": distributed.fingerprint(x[80:], y[80:], None)}


def test_a_distributed_fit_on_sparse_x_trains_as_on_its_dense_form_a_batch_dense_at_a_time(one_rank_group,
                                                                                             monkeypatch):
    """Sparse x and validation data: the same History and weights as their dense forms, and no
    more rows made dense at once than a batch of predict's (CHUNK_BYTES, shrunk here to 8 rows)."""
    from scipy import sparse

    from gpubp import batches

    x, y = worker.fit_data()
    x[np.abs(x) < 0.8] = 0.0
    monkeypatch.setattr(batches, "CHUNK_BYTES", 8 * 6 * 4)
    densified = []
    rows_of = batches.SparseRows.__getitem__
    monkeypatch.setattr(batches.SparseRows, "__getitem__",
                        lambda self, index: (densified.append(len(rows_of(self, index))), rows_of(self, index))[1])
    runs = []
    for data in (sparse.csr_matrix(x), x):
        gb.seed(0)
        model = worker.fit_model()
        history = model.fit(data[:80], y[:80], validation_data=(data[80:], y[80:]), epochs=2, batch_size=16,
                            verbose=0, distributed=True)
        runs.append((history.history, model.get_weights()))
    assert runs[0][0] == runs[1][0]
    for got, want in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(got, want)
    assert densified and max(densified) <= 16


@pytest.mark.parametrize("library", ["cupy", "numba"])
def test_init_cuda_makes_gpu_local_rank_current_for_the_installed_gpu_library_and_torch(
        one_rank_group, monkeypatch, library):
    selected = []
    if library == "cupy":
        runtime = types.SimpleNamespace(setDevice=lambda index: selected.append(("cupy", index)))
        monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime)))
    else:
        numba_cuda = pytest.importorskip("numba.cuda")
        monkeypatch.setitem(sys.modules, "cupy", None)  # a numba-only install
        monkeypatch.setattr(numba_cuda, "select_device", lambda index: selected.append(("numba", index)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: selected.append(("torch", index)))
    monkeypatch.setenv("LOCAL_RANK", "1")
    distributed.init("cuda")
    assert selected == [(library, 1), ("torch", 1)]


def test_init_cuda_without_cupy_or_numba_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setitem(sys.modules, "numba", None)
    with pytest.raises(ImportError, match=r"^init\('cuda'\): neither CuPy nor Numba is installed; install CUDA"):
        distributed.init("cuda")


def test_a_numba_models_device_label_names_the_gpu_its_arrays_are_on():
    """Numba device arrays do not say where they are (CuPy's do); without the GPU's index, two
    ranks on GPUs 0 and 1 of one host would look like two ranks on one GPU. Here GPU 0: the
    simulator's only one, or the current GPU of this process."""
    pytest.importorskip("numba")
    model = gb.Sequential([gb.Dense(3, 2)], backend="numba")
    assert distributed._device_label(model) == "cuda:0"


# ----------------------------------------------------------------------------- setup checks, no processes


def test_fingerprint_is_the_same_for_the_same_data_and_differs_for_other_data():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    one_changed = x.copy()
    one_changed[3, 2] += 1
    assert distributed.fingerprint(x.copy()) == distributed.fingerprint(x)
    assert distributed.fingerprint(x[:, ::2]) == distributed.fingerprint(np.ascontiguousarray(x[:, ::2]))
    others = [one_changed, x.astype(np.float64), x.reshape(3, 4), x[:2], None]
    assert distributed.fingerprint(x) not in {distributed.fingerprint(other) for other in others}


def setup(**changes) -> dict:
    return {"host": "node0", "device": "cpu", "n_train": 100, "n_val": 20, **changes}


def test_check_setups_rejects_ranks_on_different_devices():
    with pytest.raises(RuntimeError, match="different devices: rank 0 on cpu, rank 1 on cuda:0"):
        distributed.check_setups([setup(), setup(device="cuda:0")])


def test_check_setups_rejects_two_ranks_on_one_gpu():
    with pytest.raises(RuntimeError, match="ranks 0 and 1 both use cuda:0 on node0"):
        distributed.check_setups([setup(device="cuda:0"), setup(device="cuda:0")])


def test_check_setups_accepts_one_gpu_per_rank_and_the_same_gpu_index_on_two_hosts():
    distributed.check_setups([setup(device="cuda:0"), setup(device="cuda:1"), setup(host="node1", device="cuda:0")])


@pytest.mark.parametrize("key, name", [("n_train", "x"), ("n_val", "validation data")])
def test_check_setups_rejects_different_datasets(key, name):
    with pytest.raises(ValueError, match=f"{name}: rank 0 has .* rank 1 has 7"):
        distributed.check_setups([setup(), setup(**{key: 7})])


FIT_SETUP = {
    "arguments": {"batch_size": 8, "epochs": (0, 3), "shuffle": True, "loss": "gpubp.losses.cross_entropy",
                  "metrics": ["accuracy"], "optimizer": "SGD([{2 params, lr=0.1}])", "optimizer's parameters": [0, 1],
                  "learning_rate": None,
                  "clip_grad_norm": None, "scheduler": None, "scheduler_interval/scheduler_monitor": None},
    "model": [[[3, 2], "float32", True], [[2], "float32", True]],
    "data": {"x": "0a", "y": "1b", "sample_weight/class_weight": "2c", "validation data": "3d"},
}


def fit_setup(part: str, key: str | None, value) -> dict:
    """FIT_SETUP with ``part[key]`` (or ``part`` itself, for key None) set to ``value``."""
    changed = {**FIT_SETUP[part], key: value} if key else value
    return setup(**{**FIT_SETUP, part: changed})


def test_check_setups_accepts_ranks_with_the_same_setup():
    distributed.check_setups([setup(**FIT_SETUP), setup(**FIT_SETUP)])


@pytest.mark.parametrize("part, key, value, message", [
    ("arguments", "batch_size", 16,
     r"^batch_size: rank 0 trains with batch_size 8, rank 1 with 16; every rank must call fit with the same"),
    ("arguments", "epochs", (1, 3),
     r"^epochs: rank 0 trains with \(initial_epoch, epochs\) \(0, 3\), rank 1 with \(1, 3\)"),
    ("arguments", "metrics", [], r"^metrics: rank 0 trains with metrics \['accuracy'\], rank 1 with \[\]"),
    ("model", None, [[[3, 2], "float32", False], [[2], "float32", True]],
     r"^model: rank 1's parameters \(shapes, dtype, trainable flags\) differ from rank 0's"),
    ("model", None, [[[3, 2], "float64", True], [[2], "float64", True]], r"^model: rank 1's parameters"),
], ids=["batch_size", "epochs", "metrics", "frozen weight", "dtype"])
def test_check_setups_rejects_ranks_that_would_run_other_steps(part, key, value, message):
    """Ranks that would run another number of all-reduces, reduce buckets of another layout, or
    gather validation predictions where another does not would wait in a collective until the
    timeout: refused on every rank instead."""
    with pytest.raises(ValueError, match=message):
        distributed.check_setups([setup(**FIT_SETUP), fit_setup(part, key, value)])


@pytest.mark.parametrize("key, value", [
    ("shuffle", False), ("loss", "gpubp.losses.mse"), ("optimizer", "SGD([{2 params, lr=0.2}])"),
    ("learning_rate", 0.01), ("clip_grad_norm", 1.0), ("scheduler", "StepLR"), ("optimizer's parameters", [2, 3]),
])
def test_check_setups_rejects_ranks_that_would_train_differently(key, value):
    """Ranks that shuffle apart, or compute other gradients or updates, would train silently on
    other batches or to other weights: refused on every rank, naming the argument."""
    with pytest.raises(ValueError, match=rf"^{key}: rank 0 trains with {key} .*, rank 1 with {re.escape(str(value))}; "
                                         "every rank must call fit with the same arguments"):
        distributed.check_setups([setup(**FIT_SETUP), fit_setup("arguments", key, value)])


def test_ranks_compare_a_schedulers_settings_and_state_not_just_its_class():
    def label(gamma: float, steps: int = 0) -> str:
        scheduler = gb.optim.lr_scheduler.StepLR(gb.optim.SGD(gb.Dense(3, 2).parameters(), lr=0.1), 1, gamma=gamma)
        for _ in range(steps):
            scheduler.step()
        return distributed._scheduler_label(scheduler)

    assert label(0.5) == label(0.5) and label(0.5).startswith("StepLR(")
    assert label(0.5) != label(0.9)  # another decay
    assert label(0.5) != label(0.5, steps=2)  # resumed from another epoch
    assert distributed._scheduler_label(None) is None


@pytest.mark.parametrize("name", ["x", "y", "sample_weight/class_weight", "validation data"])
def test_check_setups_rejects_ranks_given_other_data_saying_every_rank_passes_the_whole_dataset(name):
    with pytest.raises(ValueError, match=rf"^{name}: rank 0 and rank 2 pass different data \(fingerprints "
                                         r".* and ff\); every rank must pass the whole dataset, in the same "
                                         r"order: gpubp splits each global batch .* no DistributedSampler"):
        distributed.check_setups([setup(**FIT_SETUP), setup(**FIT_SETUP), fit_setup("data", name, "ff")])


def test_fit_distributed_without_torchrun_or_a_process_group_says_how_to_launch(monkeypatch):
    for var in distributed.TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    model = gb.Sequential([gb.Dense(3, 2)], device="cpu")
    before = model.get_weights()
    x, y = np.ones((4, 3), np.float32), np.zeros(4, np.int64)
    with pytest.raises(RuntimeError, match="torchrun"):
        model.fit(x, y, distributed=True, verbose=0)
    for got, want in zip(model.get_weights(), before):
        np.testing.assert_array_equal(got, want)


def test_fit_with_dropout_on_one_rank_draws_the_masks_of_fit_without_distributed(one_rank_group):
    x, y = worker.fit_data()
    runs = []
    for distributed_fit in (False, True):
        gb.seed(3)
        model = gb.Sequential([gb.Dropout(0.2), gb.Dense(x.shape[1], 16, "relu"), gb.Dropout(0.5),
                               gb.Dense(16, int(y.max()) + 1)], device="cpu")
        model.fit(x, y, optimizer=gb.optim.SGD(model.parameters(), lr=0.05), epochs=2, batch_size=8, verbose=0,
                  distributed=distributed_fit)
        runs.append(model.get_weights())
        assert all(layer.rows_from == 0 for layer in model if isinstance(layer, gb.Dropout))
    for got, want in zip(*runs):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
