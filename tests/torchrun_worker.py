"""One rank of the 2-process CPU runs in ``test_distributed.py``, launched by torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/torchrun_worker.py OUT_DIR

Each rank runs, and saves to ``OUT_DIR/rank{r}.npz``:

1. ``fit(distributed=True)`` (which joins the process group from torchrun's environment);
   the ranks are seeded differently on purpose, since fit broadcasts rank 0's weights and
   random state; with ``verbose=2`` and two callbacks, one ``main_process_only``; with class
   and sample weights, which each rank applies to its part of every batch and of the
   validation data;
2. ``fit(distributed=True)`` with a global batch the world size does not divide (the error);
3. ``fit(distributed=True)`` on this rank's half of the data, the ``DistributedSampler`` habit
   (the error);
4. ``fit(distributed=True)`` with a validation_split that leaves fewer validation samples
   than ranks (:func:`small_validation_fit`);
5. ``fit(distributed=True)`` with an ``EarlyStopping(verbose=1)`` that stops it (what it prints);
6. ``fit(distributed=True)`` twice with schedulers the ranks set apart: another StepLR gamma,
   then the same StepLR stepped per epoch on one rank and per batch on the other (the errors);
7. a ``gpubp.torch.MLP`` wrapped in ``DistributedDataParallel``, a few SGD steps on this
   rank's half of a global batch;
8. ``fit(distributed=True)`` that a callback on rank 0 alone stops mid-epoch (:class:`StopAt`),
   with a ModelCheckpoint (rank 0 writes): whether the last checkpoint is there when fit returns;
9. ``fit(distributed=True)`` with an Adam whose state the ranks left apart (each trained it on
   other data before, as a run resumed on rank 0 alone would): the weights it ends with.

The test computes the single-process references with the functions below. With
``GPUBP_WORKER_DEVICE=cuda`` the same runs go through NCCL and the CUDA kernels (one GPU per rank).
"""

from __future__ import annotations

import os
import sys

import numpy as np

import gpubp as gb

DEVICE = os.environ.get("GPUBP_WORKER_DEVICE", "cpu")
FIT_SEED = 3
DDP_SEED = 5
DDP_STEPS = 3
FIT_KWARGS = dict(loss="cross_entropy", epochs=3, batch_size=16, validation_split=0.2, metrics=["accuracy", "f1"],
                  verbose=2, class_weight={0: 1.0, 1: 2.5, 2: 0.5}, sample_weight=np.linspace(0.5, 1.5, 101))


def fit_data():
    """101 samples: with the 20% validation split, 81 train, so the last global batch (1) leaves one rank empty."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((101, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    return x, y


def fit_model(device: str = "cpu") -> gb.Sequential:
    """Three Dense layers with the middle one frozen: its gradient is neither computed nor sent.
    Dropout on the input and after the first layer: each rank masks its part of the global batch
    with the rows counted from the part's first, so the ranks together draw one process's masks."""
    model = gb.Sequential([gb.Dropout(0.1), gb.Dense(6, 12, "relu"), gb.Dropout(0.3), gb.Dense(12, 12, "tanh"),
                           gb.Dense(12, 3)], device=device)
    model[3].freeze()
    return model


def fit_optimizer(model):
    return gb.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def small_validation_fit(distributed: bool, device: str = "cpu"):
    """10 samples with validation_split=0.1: 1 validation sample, fewer than the ranks. The History."""
    x, y = fit_data()
    gb.seed(FIT_SEED)
    model = gb.Sequential([gb.Dense(6, 3)], device=device)
    return model.fit(x[:10], y[:10], epochs=2, batch_size=4, validation_split=0.1, metrics=["accuracy"], verbose=0,
                     distributed=distributed)


def scheduler_fit_error(x, y, gamma: float, interval: str) -> str:
    """The error of a distributed fit with a StepLR(step_size=1, gamma) stepped per ``interval``
    ('' if it trained): ranks whose rates would move apart must be refused before the first step."""
    model = gb.Sequential([gb.Dense(6, 3)], device=DEVICE)
    optimizer = gb.optim.SGD(model.parameters(), lr=0.1)
    scheduler = gb.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=gamma)
    try:
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, distributed=True, optimizer=optimizer,
                  scheduler=scheduler, scheduler_interval=interval)
    except ValueError as exc:
        return str(exc)
    return ""


def ddp_data():
    rng = np.random.default_rng(1)
    return rng.standard_normal((12, 6)).astype(np.float32), rng.integers(0, 3, 12)


def ddp_steps(module, x, labels) -> None:
    """SGD steps of the mean cross-entropy of ``module`` on (x, labels)."""
    import torch

    device = next(module.parameters()).device
    x, labels = torch.from_numpy(x).to(device), torch.from_numpy(labels).to(device)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(DDP_STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(x), labels)
        loss.backward()
        opt.step()


class TouchAtEnd(gb.Callback):
    """Writes ``OUT_DIR/<tag>.rank<r>`` when training ends: shows which ranks ran the callback."""

    def __init__(self, out_dir: str, tag: str, main_process_only: bool) -> None:
        self.path = f"{out_dir}/{tag}.rank{os.environ['RANK']}"
        self.main_process_only = main_process_only

    def on_train_end(self, model) -> None:
        open(self.path, "w").close()


class StopAt(gb.Callback):
    """Stops training after batch ``batch`` of epoch ``epoch`` (from 0), as a time budget that each
    rank measures for itself may stop one rank's fit."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.stop, self.epoch = (epoch, batch), None

    def on_epoch_begin(self, model, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, model, batch: int, logs: dict) -> None:
        if (self.epoch, batch) == self.stop:
            model.stop_training = True


class CountBatches(gb.Callback):
    def __init__(self) -> None:
        self.count = 0

    def on_train_batch_end(self, model, batch: int, logs: dict) -> None:
        self.count += 1


def main(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from gpubp import distributed
    from gpubp.torch import MLP

    with open(f"{out_dir}/pid.rank{os.environ['RANK']}", "w") as f:
        f.write(str(os.getpid()))
    if DEVICE == "cuda":
        distributed.init("cuda")
    x, y = fit_data()
    gb.seed(FIT_SEED if os.environ["RANK"] == "0" else FIT_SEED + 100)
    model = fit_model(DEVICE)
    callbacks = [TouchAtEnd(out_dir, "writer", main_process_only=True), TouchAtEnd(out_dir, "every", False)]
    history = model.fit(x, y, optimizer=fit_optimizer(model), distributed=True, callbacks=callbacks, **FIT_KWARGS)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        model.fit(x, y, batch_size=15, epochs=1, verbose=0, distributed=True)
        batch_error = ""
    except ValueError as exc:
        batch_error = str(exc)
    half = slice(rank * 50, (rank + 1) * 50)  # of the first 100 samples: the sizes agree, the data does not
    try:
        gb.Sequential([gb.Dense(6, 3)], device=DEVICE).fit(x[half], y[half], batch_size=16, verbose=0, distributed=True)
        shard_error = ""
    except ValueError as exc:
        shard_error = str(exc)
    small = small_validation_fit(distributed=True, device=DEVICE)
    # Rate 0 and no shuffle: the second epoch's loss equals the first's, and EarlyStopping stops there.
    still = gb.Sequential([gb.Dense(6, 3)], device=DEVICE)
    still.fit(x, y, epochs=3, batch_size=16, shuffle=False, learning_rate=0.0, verbose=0, distributed=True,
              callbacks=[gb.EarlyStopping("loss", verbose=1)])

    # Stopped by rank 0's callback alone, in the second epoch: every rank stops after the same batch.
    # Rank 1 has no callback that runs at each batch: only rank 0's ask for the ranks to agree there.
    stopped, counted = gb.Sequential([gb.Dense(6, 3)], device=DEVICE), CountBatches()
    stop_callbacks = [gb.ModelCheckpoint(f"{out_dir}/stopped-{{epoch}}.npz")]
    stopped_history = stopped.fit(x, y, epochs=3, batch_size=16, verbose=0, distributed=True,
                                  callbacks=stop_callbacks + ([counted, StopAt(epoch=1, batch=2)] if rank == 0 else []))
    last_checkpoint_there = os.path.exists(f"{out_dir}/stopped-{len(stopped_history['loss'])}.npz")

    # Adam's moments and step count apart on the ranks before fit; fit broadcasts rank 0's.
    adam_model = gb.Sequential([gb.Dense(6, 3)], device=DEVICE)
    adam = gb.optim.Adam(adam_model.parameters(), lr=0.01)
    adam_model.fit(x[rank * 50:(rank + 1) * 50], y[rank * 50:(rank + 1) * 50], batch_size=10, verbose=0, optimizer=adam)
    adam_model.fit(x, y, batch_size=16, epochs=2, verbose=0, distributed=True, optimizer=adam)

    scheduler_errors = [scheduler_fit_error(x, y, gamma=0.5 if rank == 0 else 0.9, interval="epoch"),
                        scheduler_fit_error(x, y, gamma=0.5, interval="epoch" if rank == 0 else "batch")]

    gb.seed(DDP_SEED)
    mlp = MLP([6, 10, 3]).to(DEVICE)
    ddp = DistributedDataParallel(mlp)
    xd, labels = ddp_data()
    part = slice(rank * len(xd) // world_size, (rank + 1) * len(xd) // world_size)
    ddp_steps(ddp, xd[part], labels[part])

    np.savez(f"{out_dir}/rank{rank}.npz", *model.get_weights(),
             loss=np.array(history["loss"]), val_loss=np.array(history["val_loss"]),
             val_accuracy=np.array(history["val_accuracy"]), val_f1=np.array(history["val_f1"]),
             accuracy=np.array(history["accuracy"]), f1=np.array(history["f1"]),
             batch_error=np.array(batch_error), shard_error=np.array(shard_error),
             scheduler_errors=np.array(scheduler_errors),
             small_loss=np.array(small["loss"]), small_val_loss=np.array(small["val_loss"]),
             small_val_accuracy=np.array(small["val_accuracy"]),
             stopped_batches=np.array(counted.count), stopped_epochs=np.array(len(stopped_history["loss"])),
             stopped_weights=np.concatenate([w.ravel() for w in stopped.get_weights()]),
             last_checkpoint_there=np.array(last_checkpoint_there),
             adam_weights=np.concatenate([w.ravel() for w in adam_model.get_weights()]),
             ddp=np.concatenate([p.detach().cpu().numpy().ravel() for p in mlp.parameters()]))
    # DDP's reducer holds the gloo group; freed after the peer has gone, its destructor can wait forever.
    dist.barrier()
    del ddp
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: torch.distributed's background threads can block it after the work is saved.
    os._exit(0)
