"""Data-parallel training over torch.distributed: ``model.fit(..., distributed=True)``.

Launch one process per device with ``torchrun`` (gloo on CPUs, NCCL on GPUs); every process
builds the same model and calls ``fit`` on the whole dataset. Then:

- the process group is the one already initialized, else :func:`init` makes one from
  torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``);
- rank 0's weights and random state are broadcast, so every rank starts from the same weights
  and draws the same permutation each epoch (as ``DistributedSampler`` does);
- ``batch_size`` is the global batch: each step, rank ``r`` of ``W`` takes the ``r``-th of ``W``
  contiguous parts of the global batch, runs forward and backward on it, and the trainable
  gradients (frozen layers send nothing) plus the loss are summed with ONE all-reduce over one
  flat bucket. Each rank's share is weighted by its size, so the result is the gradient of the
  global batch's mean loss, also for a short last batch;
- validation runs on each rank's part of the validation data: the loss is averaged over the
  ranks, weighted by part size (exact), and every rank scores the metrics on the predictions of
  the whole set, gathered from the ranks (so f1, precision, recall and auc are the whole set's,
  not a mean of the parts');
- only rank 0 shows progress and runs the callbacks that write files
  (``Callback.main_process_only``).

Every rank must hold the whole dataset, in the same order. The model and the optimizer live on
each rank as usual; after ``fit`` every rank has the same weights.

Nothing here is imported by ``import gpubp``; torch is imported when ``fit(distributed=True)``
first runs.
"""

from __future__ import annotations

import datetime
import os
import socket

import numpy as np

from gpubp import _random, batches
from gpubp.layers import Dropout

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 300


def _dist():
    try:
        import torch.distributed as dist
    except ImportError as exc:
        raise ImportError('fit(distributed=True) runs on torch.distributed: pip install "gpubp[torch]"') from exc
    return dist


def init(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group torchrun describes in the environment, if none is initialized.

    ``device`` "cpu" uses gloo; "cuda" uses NCCL and also makes GPU ``LOCAL_RANK`` current for
    CuPy and torch, so call ``init("cuda")`` before building the model when a node has several
    GPUs. A collective that waits longer than ``timeout_s`` fails instead of hanging.
    """
    dist = _dist()
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        import cupy
        import torch

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cupy.cuda.runtime.setDevice(local_rank)
        torch.cuda.set_device(local_rank)
    if dist.is_initialized():
        return
    missing = [var for var in TORCHRUN_VARS if var not in os.environ]
    if missing:
        raise RuntimeError(
            f"distributed: no process group is initialized and {', '.join(missing)} are not set; launch with "
            "torchrun (e.g. torchrun --nproc_per_node 2 train.py) or call torch.distributed.init_process_group first")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s))


def rank() -> int:
    """This process's rank, 0 when no process group is initialized (or torch is not installed)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return 0
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0 and outside distributed training: the process that prints and writes files."""
    return rank() == 0


def _device_label(model) -> str:
    if model.device == "cpu":
        return "cpu"
    data = model.parameters()[0].data
    index = getattr(getattr(data, "device", None), "id", None)
    return "cuda" if index is None else f"cuda:{index}"


def check_setups(setups: list[dict]) -> None:
    """Raise if the ranks' ``setups`` (one dict per rank: host, device, n_train, n_val, and where
    given batch_size, epochs, model) cannot train together. Every rank sees every setup, so all
    raise the same error: a rank that ran other steps would wait in a collective until the
    timeout instead."""
    first = setups[0]
    for r, setup in enumerate(setups):
        if setup["device"].split(":")[0] != first["device"].split(":")[0]:
            raise RuntimeError(f"distributed: ranks are on different devices: rank 0 on {first['device']}, "
                               f"rank {r} on {setup['device']}; put every rank's model on the same kind of device")
        for key, name in (("n_train", "x"), ("n_val", "validation data")):
            if setup[key] != first[key]:
                raise ValueError(f"{name}: rank 0 has {first[key]} samples, rank {r} has {setup[key]}; "
                                 "every rank must be given the whole dataset")
        for key, what in (("batch_size", "batch_size"), ("epochs", "(initial_epoch, epochs)")):
            if setup.get(key) != first.get(key):
                raise ValueError(f"{key}: rank 0 trains with {what} {first.get(key)}, rank {r} with "
                                 f"{setup.get(key)}; every rank must call fit with the same arguments")
        if setup.get("model") != first.get("model"):
            raise ValueError(f"model: rank {r}'s parameters (shapes, dtype, trainable flags) differ from rank 0's; "
                             "every rank must build and freeze the same model")
    seen = {}
    for r, setup in enumerate(setups):
        if setup["device"] == "cpu":
            continue
        where = (setup["host"], setup["device"])
        if where in seen:
            raise RuntimeError(f"distributed: ranks {seen[where]} and {r} both use {setup['device']} on "
                               f"{setup['host']}; call gpubp.distributed.init('cuda') before building the model "
                               "so that each process takes GPU LOCAL_RANK")
        seen[where] = r


def _shard(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous part of ``n`` items; sizes differ by at most one."""
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


class DataParallel:
    """What ``fit`` needs to train ``model`` data-parallel on the process group.

    Made once per ``fit``: checks the setup on every rank, broadcasts rank 0's weights and
    random state, and then provides the per-step :meth:`forward_backward` and the per-epoch
    :meth:`evaluate`.
    """

    def __init__(self, model, batch_size: int, n_train: int, n_val: int | None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 epochs: tuple[int, int] | None = None):
        import torch

        init(model.device, timeout_s)
        self.dist = _dist()
        self.torch = torch
        self.model = model
        self.rank = self.dist.get_rank()
        self.world_size = self.dist.get_world_size()
        if batch_size % self.world_size:
            raise ValueError(f"batch_size: the global batch {batch_size} must be a multiple of the world size "
                             f"{self.world_size}, so that every rank gets an equal part")
        if n_val is not None and n_val < self.world_size:
            raise ValueError(f"validation data: {n_val} samples cannot be split over {self.world_size} ranks")
        setup = {"host": socket.gethostname(), "device": _device_label(model), "n_train": n_train, "n_val": n_val,
                 "batch_size": batch_size, "epochs": None if epochs is None else [int(e) for e in epochs],
                 "model": [[list(p.shape), str(p.data.dtype), bool(p.trainable)] for p in model.parameters()]}
        setups = [None] * self.world_size
        self.dist.all_gather_object(setups, setup)
        check_setups(setups)
        self._broadcast_start()
        self._layout = None

    def _tensor(self, array):
        """A torch tensor sharing ``array``'s memory, for the collectives."""
        if isinstance(array, np.ndarray):
            return self.torch.from_numpy(array)
        if hasattr(array, "__dlpack__"):
            return self.torch.from_dlpack(array)
        return self.torch.as_tensor(array, device="cuda")

    def _broadcast_start(self) -> None:
        params = self.model.parameters()
        bucket, spans = self._pack(params, extra=0)
        for param, span in zip(params, spans):
            bucket[span] = param.data.reshape(-1)
        self.dist.broadcast(self._tensor(bucket), src=0)
        for param, span in zip(params, spans):
            param.data[...] = bucket[span].reshape(param.shape)
        state = [_random.get_state()]
        self.dist.broadcast_object_list(state, src=0)
        _random.generator().bit_generator.state = state[0]

    def _pack(self, params, extra: int):
        """One flat buffer for ``params`` plus ``extra`` trailing values, and each parameter's span in it."""
        spans, start = [], 0
        for param in params:
            size = int(np.prod(param.shape))
            spans.append(slice(start, start + size))
            start += size
        return self.model.backend.empty((start + extra,), self.model.dtype), spans

    @property
    def bucket_size(self) -> int:
        """Values each step's all-reduce sends: the trainable parameters' sizes plus one for the loss (0 before the first step)."""
        return 0 if self._layout is None else int(self._layout[1].size)

    def forward_backward(self, loss_fn, xb: np.ndarray, yb: np.ndarray, logits: bool = False,
                         sample_weight: np.ndarray | None = None) -> float:
        """Forward and backward of this rank's part of the global batch, then the one all-reduce.

        Leaves the global batch's mean-loss gradient in every trainable parameter's ``.grad``
        and returns the global batch's mean loss (weighted by ``sample_weight``, if given: each
        rank's weighted sum over its part, scaled by its share, adds up to the global batch's).
        """
        model = self.model
        params = model.trainable_parameters()
        if self._layout is None or self._layout[0] != [id(p) for p in params]:
            self._layout = ([id(p) for p in params], *self._pack(params, extra=1))
        _, bucket, spans = self._layout
        part = _shard(len(xb), self.rank, self.world_size)
        count = part.stop - part.start
        if count:
            # Each Dropout's mask rows count from this part's first row of the global batch.
            dropouts = [layer for layer in model if isinstance(layer, Dropout)]
            for layer in dropouts:
                layer.rows_from = part.start
            try:
                out = model.forward(xb[part], logits=logits)
            finally:
                for layer in dropouts:
                    layer.rows_from = 0
            weights = None if sample_weight is None else sample_weight[part]
            value, dout = batches.loss_and_grad(loss_fn, out, yb[part], weights, model.backend)
            share = count / len(xb)
            model.backend.scale_(dout, share)
            model.backward(dout)
            for param, span in zip(params, spans):
                bucket[span] = param.grad.reshape(-1)
            bucket[-1] = value * share
        else:
            model.draw_keys()  # as the other ranks' forwards do, so every rank's random stream stays the same
            bucket[...] = 0
        self.dist.all_reduce(self._tensor(bucket))
        for param, span in zip(params, spans):
            param.grad = bucket[span].reshape(param.shape)
        return float(bucket[-1])

    def evaluate(self, x_val, y_val, loss_fn, metrics, sample_weight: np.ndarray | None = None) -> dict:
        """``batches.evaluate`` on this rank's part of the validation data (and weights): the loss
        averaged over ranks by part size, the metrics scored on every rank's predictions, gathered
        in rank order (the parts are contiguous), against the whole ``y_val``."""
        part = _shard(len(x_val), self.rank, self.world_size)
        weights = None if sample_weight is None else sample_weight[part]

        def whole(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            parts = [None] * self.world_size
            self.dist.all_gather_object(parts, scores)
            return np.concatenate(parts), y_val

        result = batches.evaluate(self.model, x_val[part], y_val[part], loss=loss_fn, metrics=metrics,
                                  sample_weight=weights, gather=whole)
        if "loss" in result:
            weight = (part.stop - part.start) / len(x_val)
            device = "cpu" if self.model.device == "cpu" else "cuda"
            total = self.torch.tensor([result["loss"] * weight], dtype=self.torch.float64, device=device)
            self.dist.all_reduce(total)
            result["loss"] = total.item()
        return result
