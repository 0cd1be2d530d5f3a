"""Data-parallel training over torch.distributed: ``model.fit(..., distributed=True)``.

Launch one process per device with ``torchrun`` (gloo on CPUs, NCCL on GPUs); every process
builds the same model and calls ``fit`` on the whole dataset. Then:

- the process group is the one already initialized, else :func:`init` makes one from
  torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``);
- rank 0's weights, optimizer state (moments, step counts) and random state are broadcast, so
  every rank starts from the same weights and state and draws the same permutation each epoch
  (as ``DistributedSampler`` does);
- ``batch_size`` is the global batch: each step, rank ``r`` of ``W`` takes the ``r``-th of ``W``
  contiguous parts of the global batch, runs forward and backward on it, and the trainable
  gradients (frozen layers send nothing) plus the loss are summed with ONE all-reduce over one
  flat bucket. Each rank's share is weighted by its size, so the result is the gradient of the
  global batch's mean loss, also for a short last batch;
- validation runs on each rank's part of the validation data: the loss is averaged over the
  ranks, weighted by part size (exact; with fewer validation samples than ranks some parts are
  empty and weigh 0), and every rank scores the metrics on the predictions of the whole set,
  gathered from the ranks (so f1, precision, recall and auc are the whole set's, not a mean of
  the parts');
- only rank 0 shows progress and runs the callbacks that write files
  (``Callback.main_process_only``), and only rank 0's callbacks print.

Every rank must pass the whole dataset, in the same order: gpubp splits each global batch over
the ranks itself, so no ``DistributedSampler`` or per-rank shard is needed (a shard per rank
would train on part of the data). Before the first step the ranks compare their setups and all
raise the same error, naming the item and the ranks, where they differ: the device, the model's
parameters and what its layers compute (activations, Dropout rates, precision), the arguments of ``fit`` that every rank must pass alike (batch_size, epochs,
shuffle, loss, metrics, optimizer, learning_rate, clip_grad_norm, scheduler), and a
:func:`fingerprint` of the data (x, y, the training weights of sample_weight and class_weight,
the validation data), computed once per ``fit`` (its cost: see there). The callbacks may differ
(a rank-0-only logger, say): a stop that any rank's callback asks for (``model.stop_training``)
stops every rank after the same batch or epoch, as the ranks agree on it after each epoch's
callbacks and, where some rank's callbacks run at each batch, each batch's
(:meth:`DataParallel.any_rank`, a one-value all-reduce; the one after an
epoch also keeps the other ranks from going on while rank 0 writes a checkpoint, and ``fit``
returns on every rank once rank 0's callbacks have finished). A callback that changes what the
ranks compute (a learning rate set on one rank only) must run on every rank alike. The model
and the optimizer live on each rank as usual; after ``fit`` every rank has the same weights.

``import gpubp`` does not import torch: ``fit(distributed=True)`` does when it first runs, and
:func:`rank` (which the callbacks ask before they print) never does.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import sys

import numpy as np

from gpubp import _random, batches, losses
from gpubp import metrics as metric_fns
from gpubp.backends import INSTALL_HINT
from gpubp.layers import Dropout

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 300
# 8 bytes: two different datasets share a fingerprint with probability 2^-64.
FINGERPRINT_BYTES = 8


def _dist():
    try:
        import torch.distributed as dist
    except ImportError as exc:
        raise ImportError('fit(distributed=True) runs on torch.distributed: pip install "gpubp[torch]"') from exc
    return dist


def init(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group torchrun describes in the environment, if none is initialized.

    ``device`` "cpu" uses gloo; "cuda" uses NCCL and also makes GPU ``LOCAL_RANK`` current for
    gpubp's GPU arrays (:func:`_select_gpu`) and torch, so call ``init("cuda")`` before building
    the model when a node has several GPUs. A collective that waits longer than ``timeout_s``
    fails instead of hanging.
    """
    dist = _dist()
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        import torch

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        _select_gpu(local_rank)
        torch.cuda.set_device(local_rank)
    if dist.is_initialized():
        return
    missing = [var for var in TORCHRUN_VARS if var not in os.environ]
    if missing:
        raise RuntimeError(
            f"distributed: no process group is initialized and {', '.join(missing)} are not set; launch with "
            "torchrun (e.g. torchrun --nproc_per_node 2 train.py) or call torch.distributed.init_process_group first")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s))


def _select_gpu(index: int) -> None:
    """Make GPU ``index`` current for the library gpubp's GPU arrays come from: CuPy where it is
    installed (the numba backend then allocates CuPy arrays too), else Numba."""
    try:
        import cupy
    except ImportError:
        try:
            from numba import cuda
        except ImportError as exc:
            raise ImportError(f"init('cuda'): neither CuPy nor Numba is installed; {INSTALL_HINT}") from exc
        cuda.select_device(index)
    else:
        cupy.cuda.runtime.setDevice(index)


def rank() -> int:
    """This process's rank, 0 when no process group is initialized (or torch is not installed)."""
    # A process group needs torch.distributed imported: where it is not, there is none, and a
    # callback's message need not wait seconds for torch to import.
    dist = sys.modules.get("torch.distributed")
    return dist.get_rank() if dist is not None and dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0 and outside distributed training: the process that prints and writes files."""
    return rank() == 0


def _device_label(model) -> str:
    if model.device == "cpu":
        return "cpu"
    data = model.parameters()[0].data
    # A Numba device array does not say which GPU holds it; the numba backend knows.
    index = model.backend._device_id(data) if model.backend_name == "numba" else data.device.id
    return f"cuda:{index}"


def fingerprint(*arrays) -> str:
    """A short hash (blake2b, ``FINGERPRINT_BYTES``) of ``arrays``' dtypes, shapes and bytes, None
    included: ranks passing the same data get the same one. It reads every byte once, on one core:
    2.6 to 3.8 s per GiB measured on a 2-core VM shared with other jobs, less on a free core.
    ``fit(distributed=True)`` computes it once per fit, before the first step."""
    digest = hashlib.blake2b(digest_size=FINGERPRINT_BYTES)
    for array in arrays:
        if array is None:
            digest.update(b"None;")
        elif isinstance(array, batches.SparseRows):  # sparse x: its CSR arrays, never made dense
            digest.update(f"csr{array.shape};".encode())
            for part in (array.matrix.indptr, array.matrix.indices, array.matrix.data):
                _update(digest, part)
        else:
            _update(digest, array)
    return digest.hexdigest()


def _update(digest, array) -> None:
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype.str}{array.shape};".encode())
    digest.update(array)


def _loss_name(loss_fn) -> str:
    """Which loss ``loss_fn`` computes, named alike in every process: its function's qualified
    name (an instance's class's: its repr may hold its address) and its options."""
    function = losses.base(loss_fn)
    name = f"{function.__module__}.{getattr(function, '__qualname__', type(function).__qualname__)}"
    options = losses.options(loss_fn)
    return f"{name}{options}" if options else name


def _layer_label(layer) -> str:
    """What a layer computes beside its parameters: a Dense's activation, a Dropout's rate."""
    if isinstance(layer, Dropout):
        return f"Dropout({layer.rate!r})"
    activation = getattr(layer, "activation", None)
    return type(layer).__name__ if activation is None else f"{type(layer).__name__}({activation!r})"


def check_setups(setups: list[dict]) -> None:
    """Raise if the ranks' ``setups`` (one dict per rank: host, device, n_train, n_val, and where
    given model, ``arguments`` {name: value} and ``data`` {name: fingerprint}) cannot train
    together. Every rank sees every setup, so all raise the same error: a rank that ran other
    steps would wait in a collective until the timeout instead, and one given other data or
    arguments would train silently on something else."""
    first = setups[0]
    whole = ("every rank must pass the whole dataset, in the same order: gpubp splits each global batch over the "
             "ranks itself, so no DistributedSampler or per-rank shard is needed")
    for r, setup in enumerate(setups):
        if setup["device"].split(":")[0] != first["device"].split(":")[0]:
            raise RuntimeError(f"distributed: ranks are on different devices: rank 0 on {first['device']}, "
                               f"rank {r} on {setup['device']}; put every rank's model on the same kind of device")
        for key, name in (("n_train", "x"), ("n_val", "validation data")):
            if setup[key] != first[key]:
                raise ValueError(f"{name}: rank 0 has {first[key]} samples, rank {r} has {setup[key]}; {whole}")
        for key, value in setup.get("arguments", {}).items():
            if value != first["arguments"][key]:
                what = "(initial_epoch, epochs)" if key == "epochs" else key
                raise ValueError(f"{key}: rank 0 trains with {what} {first['arguments'][key]}, rank {r} with "
                                 f"{value}; every rank must call fit with the same arguments")
        if setup.get("model") != first.get("model"):
            raise ValueError(f"model: rank {r}'s parameters (shapes, dtype, trainable flags) differ from rank 0's; "
                             "every rank must build and freeze the same model")
        if setup.get("layers") != first.get("layers"):
            raise ValueError(f"model: rank {r}'s layers compute otherwise than rank 0's (rank 0: {first.get('layers')}, "
                             f"rank {r}: {setup.get('layers')}); every rank must build the same model")
        for name, digest in setup.get("data", {}).items():
            if digest != first["data"][name]:
                raise ValueError(f"{name}: rank 0 and rank {r} pass different data (fingerprints "
                                 f"{first['data'][name]} and {digest}); {whole}")
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


def _scheduler_label(scheduler) -> str | None:
    """The scheduler's class and state (its settings, step count and rates), which every rank's
    must match: a StepLR of another gamma would move the rates apart. A LambdaLR's functions are
    not part of its state and go uncompared, as in PyTorch's ``state_dict``."""
    if scheduler is None:
        return None
    state = json.dumps(scheduler.state_dict(), sort_keys=True, default=repr)
    return f"{type(scheduler).__name__}({state})"


class DataParallel:
    """What ``fit`` needs to train ``model`` data-parallel on the process group.

    Made once per ``fit``: checks the setup on every rank, broadcasts rank 0's weights and
    random state, and then provides the per-step :meth:`forward_backward` and the per-epoch
    :meth:`evaluate`.
    """

    def __init__(self, model, batch_size: int, data: tuple, validation: tuple | None = None, *,
                 epochs: tuple[int, int] | None = None, shuffle: bool = True, loss=losses.cross_entropy,
                 metrics=(), optimizer=None, learning_rate: float | None = None,
                 clip_grad_norm: float | None = None, scheduler=None, scheduler_steps: tuple = ("epoch", None),
                 batch_callbacks: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S):
        """``data`` (x, y, training weights or None) and ``validation`` (x_val, y_val, weights or
        None) are fit's checked host arrays; they and the keyword arguments, fit's, are what every
        rank must pass alike (:func:`check_setups`). ``scheduler_steps``: when fit steps the
        scheduler ("epoch" or "batch") and the logged value it passes (None: none), as resolved
        from ``scheduler_interval`` and ``scheduler_monitor``. ``batch_callbacks``: whether this
        rank's callbacks run code at each batch; where any rank's do, the ranks agree on a stop
        after each batch (:attr:`batch_callbacks`), else after each epoch only."""
        import torch

        init(model.device, timeout_s)
        self.dist = _dist()
        self.torch = torch
        self.model, self.optimizer = model, optimizer
        self.rank = self.dist.get_rank()
        self.world_size = self.dist.get_world_size()
        self.part, self.output = slice(0, 0), None  # the last batch's: this rank's rows, its model output
        if batch_size % self.world_size:
            raise ValueError(f"batch_size: the global batch {batch_size} must be a multiple of the world size "
                             f"{self.world_size}, so that every rank gets an equal part")
        arguments = {"batch_size": batch_size, "epochs": None if epochs is None else tuple(int(e) for e in epochs),
                     "shuffle": bool(shuffle), "loss": _loss_name(loss),
                     "metrics": [metric_fns.get(m)[0] for m in metrics],
                     "optimizer": None if optimizer is None else repr(optimizer),
                     # which parameters: two optimizers of as many (repr gives each group's count)
                     # may update other layers
                     "optimizer's parameters": None if optimizer is None else batches.param_positions(model,
                                                                                                      optimizer),
                     "learning_rate": learning_rate, "clip_grad_norm": clip_grad_norm,
                     "scheduler": _scheduler_label(scheduler),
                     "scheduler_interval/scheduler_monitor": None if scheduler is None else list(scheduler_steps)}
        x, y, weights = data
        fingerprints = {"x": fingerprint(x), "y": fingerprint(y), "sample_weight/class_weight": fingerprint(weights)}
        if validation is not None:
            fingerprints["validation data"] = fingerprint(*validation)
        setup = {"host": socket.gethostname(), "device": _device_label(model), "n_train": len(x),
                 "n_val": None if validation is None else len(validation[0]), "arguments": arguments,
                 "model": [[list(p.shape), str(p.data.dtype), bool(p.trainable)] for p in model.parameters()],
                 "layers": {"precision": model.precision,
                            "layers": [_layer_label(layer) for layer in model]},
                 "data": fingerprints, "batch_callbacks": bool(batch_callbacks)}
        setups = [None] * self.world_size
        self.dist.all_gather_object(setups, setup)
        check_setups(setups)
        # Whether fit agrees on a stop after each batch: one all-reduce more a step (some hundred
        # microseconds with gloo), so only where some rank has a callback that could ask for one.
        self.batch_callbacks = any(s.get("batch_callbacks") for s in setups)
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
        state = [_random.get_state(), None if self.optimizer is None else self.optimizer.state_dict()]
        self.dist.broadcast_object_list(state, src=0)
        _random.generator().bit_generator.state = state[0]
        if self.optimizer is not None and self.rank != 0:
            # Rank 0's moments and step counts too, as its weights: a run resumed on rank 0 alone
            # (Horovod's habit) would otherwise update each rank's weights apart.
            self.optimizer.load_state_dict(state[1])

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
        self.part, self.output = part, None  # fit's training metrics score this rank's part
        if count:
            # Each Dropout's mask rows count from this part's first row of the global batch.
            dropouts = [layer for layer in model if isinstance(layer, Dropout)]
            for layer in dropouts:
                layer.rows_from = part.start
            try:
                out = self.output = model.forward(batches.take(xb, part), logits=logits)
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

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (one all-reduce, so also a barrier): fit asks it of
        ``model.stop_training`` after each epoch's callbacks and, where a rank's callbacks run at
        each batch (:attr:`batch_callbacks`), after each batch's, so a stop that one
        rank's callback asks for (a rank-0-only EarlyStopping, a time budget each rank measures)
        stops every rank at the same step, where the others would wait in the next step's
        all-reduce until the timeout."""
        value = self.model.backend.asarray(np.array([1.0 if flag else 0.0]), self.model.dtype)
        self.dist.all_reduce(self._tensor(value), op=self.dist.ReduceOp.MAX)
        return bool(self.model.backend.to_host(value)[0] > 0)

    def evaluate(self, x_val, y_val, loss_fn, metrics, sample_weight: np.ndarray | None = None) -> dict:
        """``batches.evaluate`` on this rank's part of the validation data (and weights): the loss
        averaged over ranks by part size, the metrics scored on every rank's predictions, gathered
        in rank order (the parts are contiguous), against the whole ``y_val``. With fewer samples
        than ranks some parts are empty: those ranks send no predictions and weigh 0."""
        part = _shard(len(x_val), self.rank, self.world_size)
        count = part.stop - part.start
        # batches.evaluate takes no empty set: a rank without samples evaluates the first one,
        # for its collectives' sake, and sends none of it.
        rows = part if count else slice(0, 1)
        weights = None if sample_weight is None else sample_weight[rows]

        def whole(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            parts = [None] * self.world_size
            self.dist.all_gather_object(parts, scores[:count])
            return np.concatenate(parts), y_val

        result = batches.evaluate(self.model, batches.take(x_val, rows), y_val[rows], loss=loss_fn, metrics=metrics,
                                  sample_weight=weights, gather=whole)
        if "loss" in result:
            share = result["loss"] * (count / len(x_val)) if count else 0.0  # not 0 * a non-finite loss
            device = "cpu" if self.model.device == "cpu" else "cuda"
            total = self.torch.tensor([share], dtype=self.torch.float64, device=device)
            self.dist.all_reduce(total)
            result["loss"] = total.item()
        return result
