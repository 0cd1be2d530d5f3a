"""scipy.special's ufuncs, imported on first use.

``import scipy.special`` costs about as much as the rest of ``import gpubp`` together (it pulls
in scipy's array-API layer and ``numpy.testing``), and only the sigmoid, gelu, silu and
binary cross-entropy paths of the NumPy backend need it. Modules call ``_special.expit(...)``
rather than importing the name, so the import happens at the first such call:

>>> import numpy as np
>>> from gpubp import _special
>>> float(_special.expit(np.float64(0.0)))
0.5
"""

from __future__ import annotations

# The names this module forwards; anything else is an AttributeError, as for a plain module.
NAMES = frozenset({"erf", "expit"})


def __getattr__(name: str):
    if name not in NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import scipy.special

    value = getattr(scipy.special, name)
    globals()[name] = value  # later lookups are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | NAMES)
