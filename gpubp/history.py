"""The History ``fit`` returns: per-epoch logged values, as Keras's ``History``.

It sits below the callbacks and the checkpoints, which both read and write it.

>>> from gpubp.history import History
>>> h = History()
>>> h.append(0, {"loss": 0.5}, seconds=0.1)
>>> h["loss"]
[0.5]
>>> "val_loss" in h, list(h), dict(h)
(False, ['loss'], {'loss': [0.5]})
>>> h.params  # what fit ran with, which fit fills in
{}
"""

from __future__ import annotations

import math
from collections.abc import Mapping


class History(Mapping):
    """Per-epoch metrics, as Keras's ``History``: ``history["loss"]``, ``history["val_loss"]``, ...

    A read-only mapping of the logged names to their per-epoch lists, as ``history.history`` is
    (``"val_loss" in history``, ``list(history)``, ``history.items()``, ``len``: the names). As
    before it was a mapping, a History equals only itself and is hashable: compare
    ``history.history`` for the values.

    ``params``: as Keras's, the run's settings: ``{"verbose": ..., "epochs": ..., "steps": ...}``,
    ``steps`` being the batches of one epoch (on each rank, in a data-parallel fit); ``{}`` for a
    History no ``fit`` has run (one a checkpoint restored, until the resumed ``fit``)."""

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}
        self.params: dict = {}
        self.epoch: list[int] = []
        self.epoch_times: list[float] = []

    def append(self, epoch: int, logs: dict, seconds: float) -> None:
        """Add an epoch's logs. Every list keeps one entry per epoch: a value an epoch did not
        log is NaN (a resumed run that validates where the earlier one did not, say)."""
        done = len(self.epoch)
        for key, value in logs.items():
            self.history.setdefault(key, [math.nan] * done).append(value)
        for values in self.history.values():
            if len(values) == done:
                values.append(math.nan)
        self.epoch.append(epoch)
        self.epoch_times.append(seconds)

    def _take(self, other: History) -> History:
        """This History, emptied and then holding ``other``'s epochs and ``params`` (``other`` is
        left as it was): how a History passed in ``fit(callbacks=[...])`` becomes that fit's."""
        self.history = {key: list(values) for key, values in other.history.items()}
        self.params = dict(other.params)
        self.epoch = list(other.epoch)
        self.epoch_times = list(other.epoch_times)
        return self

    def __getitem__(self, key: str) -> list[float]:
        return self.history[key]

    def __iter__(self):
        return iter(self.history)

    def __len__(self) -> int:
        return len(self.history)

    def until(self, epoch: int) -> History:
        """A copy holding the epochs before ``epoch``: where a run resumed at ``epoch`` continues."""
        kept = History()
        for i, number in enumerate(self.epoch):
            if number < epoch:
                kept.append(number, {key: values[i] for key, values in self.history.items()}, self.epoch_times[i])
        return kept

    def __repr__(self) -> str:
        last = {k: round(v[-1], 5) for k, v in self.history.items()}
        return f"History({len(self.epoch)} epochs, last={last})"
