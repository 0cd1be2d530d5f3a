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

import numpy as np

from gpubp import _checks, backends
from gpubp.backends import numpy_backend


class Parameter:
    """A trainable array: ``.data`` on the model's device, ``.grad`` filled by backward.

    ``backward`` overwrites ``.grad`` (it does not accumulate across calls). A parameter
    with ``trainable=False`` never gets a gradient: freezing it clears ``.grad``, which then
    stays ``None``, and no kernel is launched for it. (A bias frozen under a weight that trains
    launches nothing of its own, but the GPU backends' dW kernels sum its db beside dW anyway,
    into a buffer nothing reads: see ``Dense.backward``.)
    """

    def __init__(self, data, name: str = "", trainable: bool = True) -> None:
        self.data = data
        self.grad = None
        self.trainable = trainable
        self.name = name
        self.backend: ModuleType = numpy_backend

    @property
    def trainable(self) -> bool:
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        # A bool only: "False" would train, and a 0 was saved into a file that load() refuses.
        value = self._trainable = _checks.boolean(value, "trainable")
        if not value:  # backward no longer writes .grad: the last gradient would stay there
            self.grad = None

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    def __getstate__(self) -> dict:
        """The array on the host and the backend by name (a module does not pickle); the gradient,
        which the next backward writes, is left out. ``copy.deepcopy`` and ``pickle`` both take this."""
        state = dict(vars(self))
        state["data"] = self.backend.to_host(self.data)
        state["grad"] = None
        state["backend"] = self.backend.NAME
        return state

    def __setstate__(self, state: dict) -> None:
        backend = backends.get(state["backend"])
        host = state["data"]
        if isinstance(host, np.ndarray) and not host.flags.writeable:  # optimizers update it in place
            host = host.copy()
        self.__dict__.update(state, backend=backend, data=backend.asarray(host, host.dtype))

    def __repr__(self) -> str:
        state = "trainable" if self.trainable else "frozen"
        return f"Parameter({self.name!r}, shape={self.shape}, {state})"


def clear_grads(params, set_to_none=True) -> None:
    """``zero_grad`` of an optimizer and of a model, as torch's: every gradient of ``params`` to
    None (torch's default), or, with ``set_to_none=False``, to zeros in place, each by its array's
    own fill on its device (a gradient that is None stays None), for code that holds the arrays."""
    if _checks.boolean(set_to_none, "set_to_none"):
        for param in params:
            param.grad = None
        return
    for param in params:
        if param.grad is not None:
            param.grad[...] = 0
