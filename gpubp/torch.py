"""gpubp inside PyTorch: an MLP ``nn.Module`` whose forward and backward are gpubp's kernels.

Needs the ``torch`` extra (``pip install "gpubp[torch]"``); ``import gpubp`` never imports
torch, only ``import gpubp.torch`` does.

:class:`MLP` holds its weights as ``torch.nn.Parameter`` (``layers[i].weight`` is (in, out),
as everywhere in gpubp; ``layers[i].bias`` is (out,)), so ``torch.optim``, ``state_dict``,
``DistributedDataParallel`` and ``requires_grad_`` work as on any module. Its forward runs the
whole stack through ONE ``torch.autograd.Function`` that calls the backend contract:

- CPU tensors run on the NumPy backend, zero-copy (``Tensor.numpy()``); float64 parameters
  compute in float64, so ``torch.autograd.gradcheck`` works;
- CUDA tensors run on the CuPy backend, zero-copy through DLPack, launched on
  ``torch.cuda.current_stream()`` under the tensor's device, with no synchronization added.

The outputs, the activations kept for backward and the gradients are allocated by torch
(``torch.empty`` on the current stream) and written by the kernels through DLPack views, so
torch's caching allocator owns them and ``Tensor.record_stream`` works on them as on any tensor.

Each call keeps its own activations in the autograd context (never in reused module buffers),
so two forwards followed by their backwards, in any order, get their own gradients. The
backward launches what ``Sequential.backward_plan`` would for the same frozen layers: a layer
whose parameters do not require grad launches no dW/db kernel, and no dX is computed below the
lowest layer that needs one (unless the input requires grad). ``MLP.backward_plan`` says which,
and ``gb.trace()`` counts them.

CPU threads: PyTorch's OpenMP workers busy-wait between ops and compete with NumPy's BLAS
threads for the same cores, which made a step through the bridge 2x to over 100x slower on a
2-core machine. Start Python with ``OMP_WAIT_POLICY=PASSIVE`` (or ``torch.set_num_threads(1)``);
the bridge logs a warning once when neither is in effect.

Inputs: ``x`` (B, in) on the parameters' device, in their dtype (under autocast it is cast to
the module's precision first). A non-contiguous ``x`` is copied to a contiguous one (the kernels
read row-major memory); a wrong device, dtype or shape raises before any kernel runs.

``torch.compile``: the MLP's forward is excluded from compilation (``torch.compiler.disable``),
so a compiled model that contains an MLP gets a graph break around it: the MLP runs gpubp's
kernels eagerly, forward and backward, and the code before and after it compiles as usual.
(Left to itself, Dynamo would trace the NumPy calls inside the Function and replace gpubp's
kernels with its own ops.) A ``torch.library.custom_op`` would avoid the break; it is not
registered here.

>>> import torch, gpubp as gb
>>> from gpubp.torch import MLP
>>> gb.seed(0)
>>> mlp = MLP([4, 8, 3])
>>> out = mlp(torch.ones(2, 4))
>>> out.sum().backward()
>>> tuple(mlp.layers[0].weight.grad.shape)
(4, 8)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import numpy as np

try:
    import torch
    from torch import nn
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise ImportError('gpubp.torch needs PyTorch: pip install "gpubp[torch]"') from _exc

from gpubp import _checks, activations, backends
from gpubp.layers import BackwardPlan, Dense as _GpubpDense, Sequential, plan_backward

# The parameters' dtype, and the products' math: "tf32" keeps fp32 parameters and runs the
# products on TF32 tensor cores on CUDA tensors (as Sequential(precision="tf32") does).
PRECISIONS = {"fp32": torch.float32, "tf32": torch.float32, "fp64": torch.float64}
log = logging.getLogger("gpubp")


class Dense(nn.Module):
    """One layer of an :class:`MLP`: ``act(x @ weight + bias)``, weight (in, out), bias (out,).

    Initialised as :class:`gpubp.Dense` is (``gb.seed`` makes it reproducible). Calling it
    alone runs a one-layer stack through the same autograd Function as the MLP.
    """

    def __init__(self, in_features: int, out_features: int, activation: str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features = _checks.positive_int(in_features, "in_features")
        self.out_features = _checks.positive_int(out_features, "out_features")
        self.activation = activations.canonical(activation)
        init = _GpubpDense(self.in_features, self.out_features, self.activation)
        self.weight = nn.Parameter(torch.from_numpy(init.weight.data).to(dtype))
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run([self], x, "fp32")

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, activation={self.activation!r}"


class MLP(nn.Module):
    """A stack of dense layers ``sizes[0] -> sizes[1] -> ... -> sizes[-1]`` as a ``torch.nn.Module``.

    ``activation`` is used between layers and ``output_activation`` (default identity) on the
    last one. ``precision``: "fp32" or "fp64" (CPU only), the dtype the parameters are made in
    and the one autocast casts inputs to; ``.double()``/``.float()`` change it later. "tf32"
    makes fp32 parameters and runs the products on TF32 tensor cores for CUDA tensors (inputs
    rounded to 10 mantissa bits, fp32 accumulation); CPU tensors compute fp32.
    """

    def __init__(self, sizes, activation: str | None = "relu", output_activation: str | None = None,
                 precision: str = "fp32") -> None:
        super().__init__()
        if not isinstance(sizes, (list, tuple)) or len(sizes) < 2:
            raise ValueError(f"sizes: expected a list of at least two layer widths, got {sizes!r}")
        sizes = [_checks.positive_int(s, f"sizes[{i}]") for i, s in enumerate(sizes)]
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {sorted(PRECISIONS)}, got {precision!r}")
        acts = [activation] * (len(sizes) - 2) + [output_activation]
        self.math = "tf32" if precision == "tf32" else "fp32"
        self.layers = nn.ModuleList(
            Dense(fan_in, fan_out, act, dtype=PRECISIONS[precision])
            for fan_in, fan_out, act in zip(sizes[:-1], sizes[1:], acts)
        )

    @property
    def sizes(self) -> list[int]:
        return [self.layers[0].in_features] + [layer.out_features for layer in self.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run(list(self.layers), x, self.math)

    def backward_plan(self, need_input_grad: bool = False) -> BackwardPlan:
        """Per layer, bottom to top, the kernels backward will launch with the current ``requires_grad`` flags."""
        backend = _backend_for(self.layers[0].weight)
        plan = plan_backward([_trainable(layer) for layer in self.layers], need_input_grad)
        return BackwardPlan(
            (f"dense_{i}", backend.backward_kernels(layer.activation, need_dx, need_dw, self.math))
            for i, (layer, (need_dx, need_dw)) in enumerate(zip(self.layers, plan))
        )

    # --------------------------------------------------------------------- conversions

    @classmethod
    def from_sequential(cls, model: Sequential) -> MLP:
        """A CPU MLP with ``model``'s layers, activations, weights (copied) and frozen layers."""
        if not isinstance(model, Sequential) or not len(model):
            raise TypeError(f"model: expected a gpubp.Sequential with at least one layer, got {type(model).__name__}")
        dtype = np.dtype(model.dtype)
        precision = "fp64" if dtype == np.float64 else model.precision
        mlp = cls([model.in_features] + [layer.out_features for layer in model], precision=precision)
        with torch.no_grad():
            for layer, source in zip(mlp.layers, model):
                layer.activation = source.activation
                layer.weight.copy_(torch.from_numpy(source.backend.to_host(source.weight.data)))
                layer.bias.copy_(torch.from_numpy(source.backend.to_host(source.bias.data)))
                layer.weight.requires_grad_(source.weight.trainable)
                layer.bias.requires_grad_(source.bias.trainable)
        return mlp

    def to_sequential(self, device: str = "cpu", backend: str = "auto") -> Sequential:
        """A gpubp Sequential with this MLP's layers, weights (copied) and frozen parameters."""
        dtype = np.dtype(str(self.layers[0].weight.dtype).removeprefix("torch."))
        layers = [_GpubpDense(layer.in_features, layer.out_features, layer.activation, dtype=dtype)
                  for layer in self.layers]
        model = Sequential(layers, device=device, backend=backend, dtype=dtype, precision=self.math)
        model.set_weights([p.detach().cpu().numpy() for layer in self.layers for p in (layer.weight, layer.bias)])
        for source, target in zip(self.layers, model):
            target.weight.trainable = source.weight.requires_grad
            target.bias.trainable = source.bias.requires_grad
        return model


# torch module -> gpubp activation name, for from_torch.
def _activation_of(module) -> str | None:
    if isinstance(module, nn.Identity):
        return "identity"
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.LeakyReLU) and module.negative_slope == activations.LEAKY_SLOPE:
        return "leaky_relu"
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    if isinstance(module, nn.Tanh):
        return "tanh"
    if isinstance(module, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}[module.approximate]
    return None


def from_torch(module: nn.Sequential) -> MLP:
    """An MLP with the same computation as ``module``, an ``nn.Sequential`` of ``nn.Linear``
    layers each followed by at most one activation (ReLU, LeakyReLU(0.01), Sigmoid, Tanh, GELU,
    Identity). Weights are copied and transposed to (in, out); ``requires_grad`` flags are kept."""
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"module: expected a torch.nn.Sequential, got {type(module).__name__}")
    linears, acts = [], []
    for i, child in enumerate(module):
        if isinstance(child, nn.Linear):
            if child.bias is None:
                raise ValueError(f"module[{i}]: nn.Linear without a bias is not supported (gpubp layers always have one)")
            linears.append(child)
            acts.append("identity")
            continue
        act = _activation_of(child)
        if act is None:
            raise ValueError(f"module[{i}]: {child!r} is not supported; expected nn.Linear, ReLU, LeakyReLU(0.01), "
                             "Sigmoid, Tanh, GELU or Identity")
        if not linears or acts[-1] != "identity":
            raise ValueError(f"module[{i}]: {child!r} must directly follow an nn.Linear")
        acts[-1] = act
    if not linears:
        raise ValueError("module: no nn.Linear layer found")
    sizes = [linears[0].in_features] + [linear.out_features for linear in linears]
    for i in range(1, len(linears)):
        if linears[i].in_features != sizes[i]:
            raise ValueError(f"module: Linear {i} takes {linears[i].in_features} inputs but Linear {i - 1} gives {sizes[i]}")
    dtype = linears[0].weight.dtype
    mlp = MLP(sizes, precision="fp64" if dtype == torch.float64 else "fp32").to(linears[0].weight.device)
    with torch.no_grad():
        for layer, linear, act in zip(mlp.layers, linears, acts):
            layer.activation = act
            layer.weight.copy_(linear.weight.t())
            layer.bias.copy_(linear.bias)
            layer.weight.requires_grad_(linear.weight.requires_grad)
            layer.bias.requires_grad_(linear.bias.requires_grad)
    return mlp


# ----------------------------------------------------------------------------- the autograd Function


def _trainable(layer: Dense) -> bool:
    return layer.weight.requires_grad or layer.bias.requires_grad


# torch device type -> the gpubp backend that runs its tensors
BACKEND_OF_DEVICE = {"cpu": "numpy", "cuda": "cupy"}


def _backend_for(tensor: torch.Tensor):
    name = BACKEND_OF_DEVICE.get(tensor.device.type)
    if name is None:
        raise ValueError(f"device: gpubp runs on CPU and CUDA tensors, got a tensor on {tensor.device}")
    return backends.get(name)


# Dynamo would otherwise trace into the Function and rewrite its NumPy calls as torch ops, so
# gpubp's kernels would not run at all; disabling it here makes the graph break explicit.
@torch.compiler.disable
def _run(layers: list[Dense], x, math: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    params = [p for layer in layers for p in (layer.weight, layer.bias)]
    function = _function(params[0].device.type, params[0].dtype)
    acts = tuple(layer.activation for layer in layers)
    return function.apply(acts, math, torch.is_grad_enabled(), x, *params)


@functools.cache
def _function(device_type: str, dtype: torch.dtype):
    """The autograd Function for parameters on ``device_type`` in ``dtype``.

    One class per (device type, dtype) because autocast's ``custom_fwd`` takes both when the
    class is made: under autocast the input is cast to the module's dtype and the kernels run
    with autocast off, and backward runs under the same autocast state as forward.
    """

    class MLPFunction(torch.autograd.Function):
        @staticmethod
        @torch.amp.custom_fwd(device_type=device_type, cast_inputs=dtype)
        def forward(ctx, acts, math, grad_enabled, x, *params):
            return _forward(ctx, acts, math, grad_enabled, x, params)

        @staticmethod
        @torch.amp.custom_bwd(device_type=device_type)
        def backward(ctx, grad_out):
            return (None, None, None, *_backward(ctx, grad_out))

    MLPFunction.__name__ = MLPFunction.__qualname__ = f"MLPFunction_{device_type}_{str(dtype).removeprefix('torch.')}"
    return MLPFunction


def _check_input(x: torch.Tensor, params: tuple) -> None:
    weight = params[0]
    for i, param in enumerate(params):
        if param.device != weight.device or param.dtype != weight.dtype:
            raise ValueError(f"parameters: layer {i // 2} is {param.dtype} on {param.device}, "
                             f"layer 0 is {weight.dtype} on {weight.device}; keep the whole MLP on one device and dtype")
    if x.device != weight.device:
        raise ValueError(f"x: the input is on {x.device} but the MLP is on {weight.device}; move one with .to()")
    if x.dtype != weight.dtype:
        raise TypeError(f"x: expected dtype {weight.dtype} (the MLP's), got {x.dtype}")
    if weight.device.type == "cuda" and weight.dtype != torch.float32:
        raise TypeError(f"parameters: the CUDA kernels compute in float32, got {weight.dtype}")
    _checks.batch_shape(tuple(x.shape), weight.shape[0], "x")


@functools.cache
def _check_cpu_threads() -> None:
    """Say once when PyTorch's OpenMP threads will spin against NumPy's BLAS threads.

    After each parallel op, PyTorch's OpenMP workers busy-wait for the next one; NumPy's BLAS
    threads then compete with them for the same cores. On a 2-core machine a training step
    through the bridge ran 2x to over 100x slower that way (``bench/test_torch_bridge.py``).
    """
    if torch.get_num_threads() > 1 and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        log.warning("gpubp.torch on the CPU: PyTorch's OpenMP threads busy-wait between ops and slow down "
                    "NumPy's BLAS threads; set OMP_WAIT_POLICY=PASSIVE before starting Python, or call "
                    "torch.set_num_threads(1)")


class _CudaStream:
    """torch's current stream as the CUDA stream protocol presents it (``__cuda_stream__``), which
    CuPy 14's ``Stream.from_external`` takes; older torch releases lack the method."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def __cuda_stream__(self) -> tuple[int, int]:
        return 0, self.stream.cuda_stream


class _Device:
    """Array conversion, allocation and the kernel launch scope for tensors on one device.

    Every tensor the bridge returns or keeps (outputs, activations, gradients) comes from
    torch's allocator (``empty``), on torch's current stream; the kernels write into it through
    a backend view. So torch owns all of that memory: ``Tensor.record_stream`` and the caching
    allocator's stream bookkeeping cover it, as they could not cover memory from CuPy's pool."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.device = tensor.device
        self.backend = _backend_for(tensor)
        if self.backend.DEVICE == "cpu":
            _check_cpu_threads()

    def scope(self):
        """Where the kernels launch: torch's current stream of the device (CuPy's current stream
        inside the scope), so they order with the torch work around them without a sync."""
        if self.backend.DEVICE == "cpu":
            return contextlib.nullcontext()
        cupy = self.backend.cupy  # the CuPy the backend launches with
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        current = torch.cuda.current_stream(self.device)
        if hasattr(cupy.cuda.Stream, "from_external"):  # CuPy 14 and newer
            stream = cupy.cuda.Stream.from_external(_CudaStream(current))
        else:
            stream = cupy.cuda.ExternalStream(current.cuda_stream, index)
        scope = contextlib.ExitStack()
        scope.enter_context(cupy.cuda.Device(index))
        scope.enter_context(stream)
        return scope

    def empty(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def array(self, tensor: torch.Tensor | None):
        """The backend array sharing ``tensor``'s memory (None for None)."""
        if tensor is None:
            return None
        tensor = tensor.detach()
        if self.backend.DEVICE == "cpu":
            return tensor.numpy()
        return self.backend.cupy.from_dlpack(tensor)


def _forward(ctx, acts: tuple, math: str, grad_enabled: bool, x: torch.Tensor, params: tuple) -> torch.Tensor:
    _check_input(x, params)
    x = x.contiguous()
    device = _Device(params[0])
    # Which of (x, W0, b0, W1, b1, ...) need a gradient; none under torch.no_grad(), so inference keeps nothing.
    wants = ctx.needs_input_grad[3:] if grad_enabled else (False,) * (1 + len(params))
    trainable = [wants[1 + 2 * i] or wants[2 + 2 * i] for i in range(len(acts))]
    plan = plan_backward(trainable, wants[0])
    # Per layer, what its backward reads, and nothing for a layer that computes nothing.
    kept = []
    h = x
    with device.scope():
        for i, act in enumerate(acts):
            need_dx, need_dw = plan[i]
            weight = params[2 * i]
            y = device.empty((len(x), weight.shape[1]), weight.dtype)
            z = device.empty(y.shape, weight.dtype) if act in activations.NEEDS_Z else None
            device.backend.dense_forward(device.array(h), device.array(weight), device.array(params[2 * i + 1]), act,
                                         out=device.array(y), out_z=device.array(z), precision=math)
            reads_y = (need_dx or need_dw) and act != "identity" and act not in activations.NEEDS_Z
            kept.append((h if need_dw else None, y if reads_y else None, z if need_dx or need_dw else None))
            h = y
    # The input, the output and the weights go through save_for_backward, so an in-place change
    # to any of them before backward raises instead of giving wrong gradients.
    last_reads_y = kept[-1][1] is not None
    ctx.save_for_backward(x if plan[0][1] else None, h if last_reads_y else None, *params)
    ctx.kept, ctx.plan, ctx.acts, ctx.math, ctx.device = kept, plan, acts, math, device
    return h


def _backward(ctx, grad_out: torch.Tensor) -> list:
    x, out, *params = ctx.saved_tensors
    device, plan, acts, kept = ctx.device, ctx.plan, ctx.acts, ctx.kept
    wants = ctx.needs_input_grad[3:]
    grads = [None] * (1 + len(params))
    active = [i for i, (need_dx, need_dw) in enumerate(plan) if need_dx or need_dw]
    if not active:
        return grads
    with device.scope():
        dy = grad_out.contiguous()
        for i in range(len(acts) - 1, active[0] - 1, -1):
            need_dx, need_dw = plan[i]
            inputs, y, z = kept[i]
            if i == 0 and x is not None:
                inputs = x
            if i == len(acts) - 1 and out is not None:
                y = out
            weight, bias = params[2 * i], params[2 * i + 1]
            dx = device.empty((len(dy), weight.shape[0]), weight.dtype) if need_dx else None
            dw = device.empty(weight.shape, weight.dtype) if need_dw else None
            db = device.empty(bias.shape, bias.dtype) if need_dw else None
            device.backend.dense_backward(
                device.array(dy), device.array(inputs), device.array(weight), device.array(y), device.array(z),
                acts[i], need_dx, need_dw, device.array(dx), device.array(dw), device.array(db), precision=ctx.math)
            if need_dw:
                grads[1 + 2 * i] = dw if wants[1 + 2 * i] else None
                grads[2 + 2 * i] = db if wants[2 + 2 * i] else None
            dy = dx
        if wants[0]:
            grads[0] = dy
    return grads
