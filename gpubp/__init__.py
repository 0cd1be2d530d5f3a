"""gpubp: fused GPU kernels for training and fine-tuning MLPs, with a NumPy CPU fallback.

>>> import gpubp as gb
>>> model = gb.Sequential([gb.Dense(64, 128, "relu"), gb.Dense(128, 10)], device="cpu")
>>> len(model), model.device
(2, 'cpu')
"""

__version__ = "0.1.0"

from gpubp import data, losses, optim  # noqa: E402
from gpubp._random import seed  # noqa: E402
from gpubp.io import load  # noqa: E402
from gpubp.layers import BackwardPlan, Dense, Dropout, Layer, Sequential  # noqa: E402
from gpubp.parameter import Parameter  # noqa: E402
from gpubp.trace import trace  # noqa: E402
from gpubp.callbacks import Callback, EarlyStopping, History, ModelCheckpoint  # noqa: E402
from gpubp.step import TrainStep  # noqa: E402
from gpubp.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from gpubp import callbacks, checkpoint, finetune, io, metrics  # noqa: E402

__all__ = [
    "BackwardPlan", "Callback", "Checkpoint", "Dense", "Dropout", "EarlyStopping", "History", "Layer",
    "ModelCheckpoint", "Parameter", "Sequential", "TrainStep", "callbacks", "checkpoint", "data", "finetune", "io",
    "load", "load_checkpoint", "losses", "metrics", "optim", "seed", "trace", "__version__",
]
