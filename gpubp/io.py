"""Save and load models (.npz, .safetensors) and import PyTorch / Keras weights.

Both file formats hold the architecture (layer sizes, activations, which layers are
frozen) and the weights under the keys ``layers.{i}.weight`` (in, out) and
``layers.{i}.bias``, so :func:`load` rebuilds the model. ``.npz`` files are written and
read without pickle. Writes are atomic: a temporary file in the same folder, then a rename.

>>> import os, tempfile, numpy as np, gpubp as gb
>>> model = gb.Sequential([gb.Dense(3, 4, "relu"), gb.Dense(4, 2)], device="cpu")
>>> path = os.path.join(tempfile.mkdtemp(), "m.npz")
>>> model.save(path)
>>> all(np.array_equal(a, b) for a, b in zip(gb.load(path).get_weights(), model.get_weights()))
True
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from gpubp import activations as _activations
from gpubp.layers import Dense, Sequential

FORMAT_VERSION = 1
SUFFIXES = (".npz", ".safetensors")


def _suffix(path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"path: expected a file ending in {' or '.join(SUFFIXES)}, got {str(path)!r}")
    return suffix


def _architecture(model: Sequential) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "sizes": [model.in_features] + [layer.out_features for layer in model],
        "activations": [layer.activation for layer in model],
        "names": [layer.name for layer in model],
        "trainable": [layer.trainable for layer in model],
    }


def _tensors(model: Sequential) -> dict[str, np.ndarray]:
    weights = model.get_weights()
    return {f"layers.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}": w for i, w in enumerate(weights)}


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(model: Sequential, path) -> None:
    """Write ``model`` to ``path`` (.npz or .safetensors), atomically."""
    if not isinstance(model, Sequential) or not len(model):
        raise ValueError("model: expected a Sequential with at least one layer")
    path = Path(path)
    suffix = _suffix(path)
    arch = _architecture(model)
    tensors = _tensors(model)
    if suffix == ".npz":
        header = {"__architecture__": np.array(json.dumps(arch))}
        _atomic_write(path, lambda f: np.savez(f, **header, **tensors))
    else:
        from safetensors.numpy import save as st_save

        blob = st_save(tensors, metadata={"gpubp": json.dumps(arch)})
        _atomic_write(path, lambda f: f.write(blob))


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    if not path.exists():
        raise FileNotFoundError(f"path: no such file {str(path)!r}")
    if _suffix(path) == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "__architecture__" not in data.files:
                raise ValueError(f"{path}: not a gpubp model file (no '__architecture__' entry)")
            arch = json.loads(str(data["__architecture__"]))
            tensors = {k: data[k] for k in data.files if k != "__architecture__"}
        return arch, tensors
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise ImportError('loading .safetensors needs the safetensors package: pip install safetensors') from exc
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if "gpubp" not in meta:
            raise ValueError(f"{path}: not a gpubp model file (no 'gpubp' metadata)")
        arch = json.loads(meta["gpubp"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return arch, tensors


def load(path, device: str = "auto", backend: str = "auto") -> Sequential:
    """Rebuild a model saved by :meth:`Sequential.save`; missing keys or wrong shapes raise ValueError."""
    path = Path(path)
    arch, tensors = _read(path)
    if arch.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {arch.get('format_version')!r}, expected {FORMAT_VERSION}")
    sizes, acts = arch["sizes"], arch["activations"]
    if len(sizes) != len(acts) + 1:
        raise ValueError(f"{path}: inconsistent architecture ({len(sizes)} sizes for {len(acts)} layers)")
    weights = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        for key, shape in ((f"layers.{i}.weight", (fan_in, fan_out)), (f"layers.{i}.bias", (fan_out,))):
            if key not in tensors:
                raise ValueError(f"{path}: missing key {key!r}")
            if tensors[key].shape != shape:
                raise ValueError(f"{path}: {key!r} has shape {tensors[key].shape}, expected {shape}")
            weights.append(tensors[key])
    extra = set(tensors) - {f"layers.{i}.{p}" for i in range(len(acts)) for p in ("weight", "bias")}
    if extra:
        raise ValueError(f"{path}: unexpected keys {sorted(extra)}")
    dtype = weights[0].dtype if weights[0].dtype.kind == "f" else np.float32
    layers = [Dense(sizes[i], sizes[i + 1], acts[i], name=arch["names"][i], dtype=dtype) for i in range(len(acts))]
    model = Sequential(layers, device=device, backend=backend, dtype=dtype)
    model.set_weights(weights)
    for layer, trainable in zip(model, arch.get("trainable", [True] * len(acts))):
        layer.trainable = trainable
    return model


# ----------------------------------------------------------------------------- importing weights


def _numpy(value, key: str) -> np.ndarray:
    """A NumPy copy of a torch tensor (on any device) or array-like, without importing torch."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"state dict: {key!r} is not numeric (dtype {array.dtype})")
    return array


def _build_or_load(weights: list[np.ndarray], model, activations, source: str, **model_kwargs) -> Sequential:
    if model is not None:
        if not isinstance(model, Sequential):
            raise TypeError(f"model: expected a gpubp.Sequential, got {type(model).__name__}")
        model.set_weights(weights)
        return model
    n_layers = len(weights) // 2
    if activations is None:
        activations = ["relu"] * (n_layers - 1) + [None]
    if len(activations) != n_layers:
        raise ValueError(f"activations: expected {n_layers} entries (one per layer in the {source}), got {len(activations)}")
    acts = [_activations.canonical(a, f"activations[{i}]") for i, a in enumerate(activations)]
    for i in range(1, n_layers):
        if weights[2 * i].shape[0] != weights[2 * i - 2].shape[1]:
            raise ValueError(f"{source}: layer {i} takes {weights[2 * i].shape[0]} inputs but layer {i - 1} "
                             f"gives {weights[2 * i - 2].shape[1]}")
    layers = [Dense(*weights[2 * i].shape, activation=acts[i]) for i in range(n_layers)]
    built = Sequential(layers, **model_kwargs)
    built.set_weights(weights)
    return built


def from_torch_state_dict(state_dict, model: Sequential | None = None, activations=None,
                          **model_kwargs) -> Sequential:
    """Import the nn.Linear layers of a PyTorch ``state_dict`` (tensors or NumPy arrays).

    Linear weights are (out, in) in PyTorch and are transposed to our (in, out). Layers are
    taken in the state dict's order, each ``<prefix>.weight`` with its ``<prefix>.bias``.
    With ``model``, its weights are replaced (every shape checked first, the model unchanged
    on error); otherwise a new Sequential is built with ``activations`` (default: relu between
    layers, identity at the top) and ``model_kwargs`` (device, backend).
    """
    if not hasattr(state_dict, "keys"):
        raise TypeError(f"state_dict: expected a mapping of names to tensors, got {type(state_dict).__name__}")
    prefixes = [key[: -len(".weight")] for key in state_dict.keys() if key.endswith(".weight")]
    if not prefixes:
        raise ValueError("state_dict: no '<name>.weight' entries found")
    orphans = [key for key in state_dict.keys() if key.endswith(".bias") and key[: -len(".bias")] not in prefixes]
    if orphans:
        raise ValueError(f"state_dict: missing key {orphans[0][: -len('.bias')] + '.weight'!r} (for {orphans[0]!r})")
    # With a model, check against its layers here, so errors name the state dict's keys and (out, in) shapes.
    layers = list(model) if isinstance(model, Sequential) else None
    if layers is not None and len(layers) != len(prefixes):
        raise ValueError(f"state_dict: {len(prefixes)} Linear layers {prefixes}, but the model has {len(layers)} layers")
    weights = []
    for i, prefix in enumerate(prefixes):
        w = _numpy(state_dict[f"{prefix}.weight"], f"{prefix}.weight")
        if w.ndim != 2:
            raise ValueError(f"state_dict: {prefix + '.weight'!r} has shape {w.shape}; expected a 2-D nn.Linear weight")
        if layers is not None and w.shape != (layers[i].out_features, layers[i].in_features):
            raise ValueError(f"state_dict: {prefix + '.weight'!r} has shape {w.shape}, expected (out, in) = "
                             f"{(layers[i].out_features, layers[i].in_features)} for the model's layer {i}")
        if f"{prefix}.bias" not in state_dict:
            raise ValueError(f"state_dict: missing key {prefix + '.bias'!r} (gpubp Dense layers always have a bias)")
        b = _numpy(state_dict[f"{prefix}.bias"], f"{prefix}.bias")
        if b.shape != (w.shape[0],):
            raise ValueError(f"state_dict: {prefix + '.bias'!r} has shape {b.shape}, expected ({w.shape[0]},)")
        weights += [np.ascontiguousarray(w.T), b]
    return _build_or_load(weights, model, activations, "state dict", **model_kwargs)


def from_keras_weights(weights, model: Sequential | None = None, activations=None, **model_kwargs) -> Sequential:
    """Import Keras Dense weights ``[kernel0 (in, units), bias0, kernel1, bias1, ...]`` (``model.get_weights()``).

    Keras kernels already have our (in, out) layout. ``model``/``activations`` as in
    :func:`from_torch_state_dict`.
    """
    if not isinstance(weights, (list, tuple)) or not weights or len(weights) % 2:
        raise ValueError("weights: expected a non-empty list [kernel0, bias0, kernel1, bias1, ...]")
    arrays = [_numpy(w, f"weights[{i}]") for i, w in enumerate(weights)]
    for i in range(0, len(arrays), 2):
        kernel, bias = arrays[i], arrays[i + 1]
        if kernel.ndim != 2:
            raise ValueError(f"weights[{i}]: expected a 2-D kernel (in, units), got shape {kernel.shape}")
        if bias.shape != (kernel.shape[1],):
            raise ValueError(f"weights[{i + 1}]: expected bias shape ({kernel.shape[1]},), got {bias.shape}")
    return _build_or_load(arrays, model, activations, "Keras weights", **model_kwargs)
