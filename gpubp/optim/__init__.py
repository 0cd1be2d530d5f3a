"""Optimizers and learning-rate schedules, laid out as ``torch.optim``.

``gpubp.optim.SGD``, ``Adam``, ``AdamW`` and ``RMSprop`` (in ``optimizers.py``) update the parameters;
``gpubp.optim.lr_scheduler`` holds PyTorch's schedulers, which set each param group's rate.

>>> import gpubp as gb
>>> from gpubp.optim.lr_scheduler import StepLR
>>> opt = gb.optim.SGD(gb.Dense(3, 2).parameters(), lr=0.1)
>>> scheduler = StepLR(opt, step_size=2, gamma=0.5)
>>> for epoch in range(4):
...     scheduler.step()
>>> scheduler.get_last_lr()
[0.025]
"""

from gpubp.optim.optimizers import (OPTIMIZERS, SCHEDULE_KEYS, SGD, Adam, AdamW, Optimizer,  # noqa: F401
                                    RMSprop, clip_grad_norm, get)
from gpubp.optim import lr_scheduler  # noqa: E402

__all__ = ["OPTIMIZERS", "SCHEDULE_KEYS", "SGD", "Adam", "AdamW", "Optimizer", "RMSprop", "clip_grad_norm", "get",
           "lr_scheduler"]
