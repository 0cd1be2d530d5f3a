"""Fine-tuning: freezing that skips kernels, new heads, discriminative learning rates.

A frozen layer costs nothing in backward: no dW/db kernel is launched for it, its
Parameters' ``.grad`` stays None, its gradient buffers are given back, and an optimizer
makes no state for it (state made before it was frozen is kept, as in PyTorch). Below the
lowest trainable layer no backward work happens at all, and forward keeps no
activations there (see ``Sequential.backward_plan`` and ``gb.trace``). Freezing a weight
alone (the biases training, as in BitFit) skips its dW kernel and gives its buffer back;
freezing a bias alone under a weight that trains skips nothing on the GPU backends, whose dW
kernels sum db beside dW.

>>> import gpubp as gb
>>> from gpubp import finetune as ft
>>> model = gb.Sequential([gb.Dense(4, 8, "relu"), gb.Dense(8, 8, "relu"), gb.Dense(8, 3)], device="cpu")
>>> ft.freeze(model[:2])
>>> model.backward_plan()
[('dense_0', []), ('dense_1', []), ('dense_2', ['dense_dw'])]
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

from gpubp import _checks
from gpubp.layers import Dense, Layer, Sequential, checked_model
from gpubp.callbacks import Callback


def _layers(layers, name: str = "layers") -> list[Layer]:
    if isinstance(layers, Layer):
        return [layers]
    if not isinstance(layers, Iterable):
        raise TypeError(f"{name}: expected a layer, a Sequential or a list of layers, got {type(layers).__name__}")
    layers = list(layers)
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"{name}[{i}]: expected a gpubp layer such as gpubp.Dense, got {type(layer).__name__}")
    return layers


def freeze(layers) -> None:
    """Freeze a layer, a model slice (``model[:2]``) or a list of layers."""
    for layer in _layers(layers):
        layer.freeze()


def unfreeze(layers) -> None:
    for layer in _layers(layers):
        layer.unfreeze()


def replace_head(model: Sequential, out_features: int, activation: str | None = None) -> Sequential:
    """A new model: copies of ``model``'s layers but the last, then a freshly initialised head.

    The backbone keeps its weights and frozen state; the head Dense(in, out_features,
    activation) takes the old head's name and input width. The original model is not changed.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"model: expected a gpubp.Sequential, got {type(model).__name__}")
    if not len(model):
        raise ValueError("model: replace_head needs a model with at least one layer, got an empty Sequential")
    if not isinstance(model.layers[-1], Dense):
        raise ValueError(f"model: its last layer, {model.layers[-1].name!r}, is a {type(model.layers[-1]).__name__}, "
                         "not the Dense head replace_head replaces")
    out_features = _checks.positive_int(out_features, "out_features")
    # Copies of any kind of layer, with their weights (through the host) and frozen flags, so training
    # the new model never changes the original; copying draws nothing, so the random stream is the head's alone.
    backbone = copy.deepcopy(model.layers[:-1])
    # The old head's name: a slice keeps its parent's names, so one made from the position could be a
    # backbone layer's (model[1:] of dense_0..dense_2 has dense_1 at position 0).
    head = Dense(model.layers[-1].in_features, out_features, activation, name=model.layers[-1].name,
                 dtype=model.dtype)
    return Sequential(backbone + [head], backend=model.backend_name, dtype=model.dtype, fused=model.fused,
                      precision=model.precision)


def _with_parameters(model: Sequential) -> list[Layer]:
    """The layers that count as depth, bottom to top: a Dropout has no parameters, and no depth of its own."""
    return [layer for layer in model if layer.parameters()]


def param_groups(model: Sequential, lr: float, decay: float = 0.5) -> list[dict]:
    """Discriminative learning rates: the top layer gets ``lr``, the layer ``d`` below it ``lr * decay**d``
    (counting layers with parameters: a Dropout is passed over).

    Returns PyTorch-style param groups for any gpubp optimizer. Frozen layers are included,
    so unfreezing later (e.g. :class:`GradualUnfreezing`) needs no new optimizer.
    """
    checked_model(model)
    lr = _checks.non_negative(lr, "lr")
    decay = _checks.non_negative(decay, "decay")
    layers = _with_parameters(model)
    top = len(layers) - 1
    return [{"params": layer.parameters(), "lr": lr * decay ** (top - i)} for i, layer in enumerate(layers)]


class GradualUnfreezing(Callback):
    """ULMFiT-style gradual unfreezing: train the top ``initial`` layers in the first epoch,
    then unfreeze one more layer from the top every ``every`` epochs.

    Layers are counted as :func:`param_groups` counts them: a Dropout is passed over, so each
    step unfreezes one more Dense layer. What is trainable depends on the epoch alone, so a
    run resumed with ``fit(..., initial_epoch=...)`` unfreezes as the uninterrupted one did.
    It sets each whole layer's ``trainable`` at every epoch's start: a layer frozen by hand, or
    only its bias or weight frozen (``layer.bias.trainable = False``), is frozen or unfrozen
    as a whole by the schedule instead.
    """

    def __init__(self, initial: int = 1, every: int = 1) -> None:
        self.initial = _checks.positive_int(initial, "initial")
        self.every = _checks.positive_int(every, "every")
        self._warned = False

    def on_epoch_begin(self, model, epoch: int) -> None:
        trainable = self.initial + epoch // self.every
        layers = _with_parameters(model)
        for depth, layer in enumerate(reversed(layers)):
            layer.trainable = depth < trainable
        self._warn_if_not_updated(model, layers)

    def _warn_if_not_updated(self, model, layers: list[Layer]) -> None:
        """Warn (once) where a layer the schedule trains is not the optimizer's to update: an optimizer
        built over the trainable parameters while the backbone was frozen, which would compute those
        layers' gradients and never apply them."""
        optimizer = getattr(model, "optimizer", None)
        if self._warned or optimizer is None or not hasattr(optimizer, "param_groups"):
            return
        updated = {id(param) for group in optimizer.param_groups for param in group["params"]}
        missing = [layer.name for layer in layers
                   if any(param.trainable and id(param) not in updated for param in layer.parameters())]
        if missing:
            self._warned = True
            warnings.warn(f"GradualUnfreezing: the optimizer does not update {missing}, which this epoch trains: "
                          "their gradients are computed and never applied; build the optimizer over every layer "
                          "it will unfreeze (ft.param_groups(model, lr), or model.parameters())", RuntimeWarning,
                          stacklevel=2)
