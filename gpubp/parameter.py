"""Parameter: a trainable array and its gradient, shared by layers and optimizers.

It lives apart from the layers so the optimizers can depend on it alone: the layer
module then imports the training loop (and through it the optimizers) without a circle.

>>> import numpy as np
>>> from gpubp.parameter import Parameter
>>> p = Parameter(np.zeros((3, 2), np.float32), "weight")
>>> p
Parameter('weight', shape=(3, 2), trainable)
"""

from __future__ import annotations

from types import ModuleType

from gpubp.backends import numpy_backend


class Parameter:
    """A trainable array: ``.data`` on the model's device, ``.grad`` filled by backward.

    ``backward`` overwrites ``.grad`` (it does not accumulate across calls). A parameter
    with ``trainable=False`` never gets a gradient: its ``.grad`` stays ``None`` and no
    kernel computes one.
    """

    def __init__(self, data, name: str = "", trainable: bool = True) -> None:
        self.data = data
        self.grad = None
        self.trainable = trainable
        self.name = name
        self.backend: ModuleType = numpy_backend

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    def __repr__(self) -> str:
        state = "trainable" if self.trainable else "frozen"
        return f"Parameter({self.name!r}, shape={self.shape}, {state})"
