"""gpubp.torch: the MLP as a torch.nn.Module over gpubp's kernels, on the CPU (NumPy backend).

The reference is the same computation in plain torch ops (``x @ W + b`` and torch's
activation functions), and float64 finite differences through ``torch.autograd.gradcheck``.
The CUDA path (CuPy through DLPack on torch's current stream) runs on the CPU stand-in for CuPy in
tests/test_cupy_paths_on_cpu.py, and on a GPU in the test marked ``gpu`` below.
"""

from __future__ import annotations

import gc
import re
import weakref
from collections import Counter

import numpy as np
import pytest

import gpubp as gb
from gpubp import activations, io, philox
from gpubp.backends import cupy_backend
from gpubp.activations import ACTIVATIONS, NEEDS_Z
from child_process import run_python

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from gpubp.torch import MLP, Dense, from_torch  # noqa: E402

TORCH_ACTIVATIONS = {
    "identity": lambda z: z,
    "relu": F.relu,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.01),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
}


def plain_torch(mlp: MLP, x):
    """The MLP's computation written in torch ops, on the MLP's own parameters."""
    h = x
    for layer in mlp.layers:
        h = TORCH_ACTIVATIONS[layer.activation](h @ layer.weight + layer.bias)
    return h


def grads_of(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def allocated_by_torch(tensor) -> bool:
    """Whether torch's allocator made the tensor's memory: only such storage is resizable; storage
    over memory torch was handed (DLPack, NumPy) is not, and torch's stream bookkeeping
    (``record_stream``) does not cover it."""
    return tensor.untyped_storage().resizable()


@pytest.fixture
def mlp():
    gb.seed(0)
    return MLP([7, 9, 8, 5], activation="tanh")


def random_input(rows=6, features=7, dtype=torch.float32, requires_grad=True):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(rows, features, generator=generator, dtype=dtype).requires_grad_(requires_grad)


# ----------------------------------------------------------------------------- parity and gradcheck


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_input_grad_and_every_parameter_grad_match_plain_torch(activation):
    gb.seed(1)
    mlp = MLP([7, 9, 8, 5], activation=activation, output_activation=activation)
    x = random_input()
    inputs = [x, *mlp.parameters()]
    out, want = mlp(x), plain_torch(mlp, x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    grad_out = torch.randn_like(out)
    for got, expected in zip(grads_of(out, inputs, grad_out), grads_of(want, inputs, grad_out)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_in_float64_for_the_input_and_every_parameter(activation):
    gb.seed(2)
    mlp = MLP([4, 5, 3], activation=activation, output_activation="sigmoid", precision="fp64")
    names = [name for name, _ in mlp.named_parameters()]

    def run(x, *params):
        return torch.func.functional_call(mlp, dict(zip(names, params)), (x,))

    params = tuple(p.detach().clone().requires_grad_(True) for p in mlp.parameters())
    assert torch.autograd.gradcheck(run, (random_input(3, 4, torch.float64), *params))


def test_a_second_derivative_through_the_mlp_raises_rather_than_counting_as_zero(mlp):
    """A gradient penalty (create_graph=True, then backward through the input gradient) must not
    silently give the parameters zero gradient: the backward is once_differentiable."""
    x = random_input()
    (grad_x,) = torch.autograd.grad(mlp(x).sum(), x, create_graph=True)
    penalty = (grad_x.norm(dim=1) - 1).pow(2).mean()
    with pytest.raises(RuntimeError, match="gpubp.torch.MLP computes first derivatives only"):
        penalty.backward()
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.functional.hessian(lambda v: mlp(v).sum(), x.detach()[:1])
    first = torch.autograd.grad(mlp(x).sum(), x)[0]  # without create_graph, first derivatives as before
    torch.testing.assert_close(first, grad_x.detach())


def test_a_second_derivative_through_the_incoming_gradient_raises_rather_than_giving_none():
    """The weights' gradient of (theta * mlp(x))^2 depends on theta through the gradient the MLP
    receives alone (neither x nor the weights lead to theta): the guard took only those as inputs,
    so backward to theta never reached it and theta.grad stayed None, with no error."""
    gb.seed(0)
    mlp = MLP([3, 4, 2], activation="tanh", precision="fp64")
    x = random_input(5, 3, torch.float64, requires_grad=False)

    def weight_grad_norm(model, forward):
        theta = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad((theta * forward(x)).pow(2).sum(), model.layers[0].weight, create_graph=True)
        return grad.pow(2).sum(), theta

    norm, theta = weight_grad_norm(mlp, lambda v: plain_torch(mlp, v))
    norm.backward(inputs=[theta])
    assert theta.grad is not None and theta.grad != 0  # what the MLP would owe
    norm, theta = weight_grad_norm(mlp, mlp)
    with pytest.raises(RuntimeError, match="gpubp.torch.MLP computes first derivatives only"):
        norm.backward(inputs=[theta])


def test_the_repr_shows_every_dropout():
    text = repr(MLP([4, 8, 3], dropout=0.1, input_dropout=0.25))
    assert text.startswith("MLP(\n  input_dropout=0.25\n") and "Dense(4, 8, activation='relu', dropout=0.1)" in text
    assert "input_dropout" not in repr(MLP([4, 8, 3]))


def test_float64_module_computes_in_float64():
    gb.seed(3)
    mlp = MLP([4, 6, 2], precision="fp64")
    x = random_input(5, 4, torch.float64)
    out = mlp(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, plain_torch(mlp, x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_float64_parameters_compute_in_float64_whatever_the_precision(precision):
    """As documented (so gradcheck works): .double() on a bf16 MLP kept its bf16 rounding, 6e-3 off
    float64 and failing gradcheck, and to_sequential wrote a float64 model with bf16 products.
    .float() brings the precision back; the backward plan and the Sequential follow the dtype."""
    gb.seed(0)
    mlp = MLP([6, 8, 3], activation="tanh", precision=precision).double()
    x = random_input(5, 6, torch.float64)
    torch.testing.assert_close(mlp(x), plain_torch(mlp, x), rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(mlp, (x,))
    assert "round_bf16" not in str(mlp.backward_plan())
    model = mlp.to_sequential()
    assert model.precision == "fp32" and np.dtype(model.dtype) == np.float64
    np.testing.assert_allclose(model.predict(x.detach().numpy()), mlp(x).detach().numpy(), rtol=1e-12, atol=1e-14)
    assert MLP.from_sequential(model).math == "fp32"
    mlp.float()
    assert mlp.math == precision
    gb.seed(0)
    again = MLP([6, 8, 3], activation="tanh", precision=precision)
    assert torch.equal(mlp(x.detach().float()), again(x.detach().float()))
    if precision == "bf16":  # the NumPy backend rounds a float64 Sequential's bf16 products: refused
        model.precision = "bf16"
        with pytest.raises(ValueError, match="model: a float64 Sequential with precision='bf16' .* float64 MLP"):
            MLP.from_sequential(model)


def test_single_layer_runs_alone(mlp):
    layer = mlp.layers[0]
    x = random_input()
    torch.testing.assert_close(layer(x), torch.tanh(x @ layer.weight + layer.bias), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- each call owns its activations


@pytest.mark.parametrize("order", ["second_first", "first_second"])
def test_two_forwards_then_two_backwards_give_each_call_its_gradients(mlp, order):
    x1, x2 = random_input(), random_input() * 3 + 1
    out1, out2 = mlp(x1), mlp(x2)
    params = list(mlp.parameters())
    calls = [(out1, x1), (out2, x2)]
    if order == "second_first":
        calls.reverse()
    for out, x in calls:
        grad_out = torch.ones_like(out)
        got = grads_of(out, [x, *params], grad_out)
        want = grads_of(plain_torch(mlp, x), [x, *params], grad_out)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_every_activation_backward_reads_passes_saved_tensors_hooks_and_backward_frees_it():
    """The hidden activations are saved tensors, as nn.Linear's inputs are: saved_tensors_hooks (what
    save_on_cpu is built on) pack and unpack them, and torch frees them after backward, while the
    output lives on."""
    gb.seed(0)
    mlp = MLP([7, 9, 8, 5], activation="tanh", output_activation="sigmoid")
    x = random_input()
    packed, unpacked = [], []

    def pack(tensor):
        packed.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: unpacked.append(tensor) or tensor):
        out = mlp(x)
    hidden = [ref for ref in packed if tuple(ref().shape) in ((6, 9), (6, 8))]
    assert len(hidden) == 2  # tanh's derivative reads each hidden layer's output
    grad_out = torch.randn_like(out)
    for got, want in zip(grads_of(out, [x, *mlp.parameters()], grad_out),
                         grads_of(plain_torch(mlp, x), [x, *mlp.parameters()], grad_out)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert len(unpacked) == len(packed)
    del unpacked[:]
    assert all(ref() is None for ref in hidden)


@pytest.mark.parametrize("backward", [False, True])
def test_dropping_the_output_frees_it_at_once_without_the_garbage_collector(backward):
    """No reference cycle through the output's grad_fn keeps it (and its graph) alive until gc runs:
    a sigmoid output is among what backward reads."""
    gb.seed(0)
    mlp = MLP([7, 9, 5], output_activation="sigmoid")
    x = random_input()
    gc.disable()
    try:
        out = mlp(x)
        if backward:
            out.sum().backward()
        ref = weakref.ref(out)
        del out
        assert ref() is None
    finally:
        gc.enable()


def test_changing_the_output_in_place_before_backward_raises():
    out = MLP([7, 4, 3], output_activation="sigmoid")(random_input())
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


# ----------------------------------------------------------------------------- freezing and the plan


@pytest.mark.parametrize("frozen, input_grad", [
    ((), False), ((), True), ((0,), False), ((0, 1), False), ((1,), False), ((2,), False), ((0, 1, 2), True),
])
def test_backward_launches_the_plan_of_sequential_for_the_same_frozen_layers(mlp, frozen, input_grad):
    for i in frozen:
        mlp.layers[i].requires_grad_(False)
    sequential = mlp.to_sequential()
    plan = mlp.backward_plan(need_input_grad=input_grad)
    assert plan == sequential.backward_plan(need_input_grad=input_grad)
    x = random_input(requires_grad=input_grad)
    with gb.trace() as t:
        mlp(x).sum().backward()
    want = {name: sum(kernels.count(name) for _, kernels in plan) for name in ("dense_dw", "dense_dx")}
    assert {name: t.counts[name] for name in want} == want
    for i, layer in enumerate(mlp.layers):
        assert (layer.weight.grad is None) == (i in frozen)


def fold_on_numpy(monkeypatch, broken=False):
    """The NumPy backend given the FOLDS_DX_ACT capability the CuPy kernels have: dX multiplied by
    the act' of the layer below after its product, standing in for the kernel's epilogue
    (``broken``: a planted bug, the capability claimed and dx_act ignored)."""
    nb = gb.backends.get("numpy")
    plain = nb.dense_backward

    def dense_backward(*args, dx_act="identity", dx_act_in=None, dx_dropout=None, **kwargs):
        dx, dw, db = plain(*args, **kwargs)
        if dx is None or broken:
            return dx, dw, db
        y, z = (None, dx_act_in) if dx_act in NEEDS_Z else (dx_act_in, None)
        if dx_dropout is not None:  # the masked output's own activation where kept, dy scaled there
            keep = philox.keep_mask(dx_dropout.key, *dx.shape, dx_dropout.threshold, dx_dropout.first_row)
            dx[...] = np.where(keep, dx * dx_dropout.scale, 0)
            y = None if y is None else y * dx_dropout.keep_prob
        if dx_act != "identity":
            activations.backward(dx_act, dx.copy(), y, z, dx)
        return dx, dw, db

    monkeypatch.setattr(nb, "FOLDS_DX_ACT", cupy_backend.FOLDS_DX_ACT, raising=False)
    monkeypatch.setattr(nb, "dense_backward", dense_backward)


@pytest.mark.parametrize("frozen, input_grad", [((), False), ((), True), ((1,), False), ((0,), False)])
@pytest.mark.parametrize("activation, dropout", [("tanh", None), ("gelu", None), ("relu", 0.3), ("identity", 0.3)])
def test_on_a_backend_whose_dx_applies_the_act_below_the_grads_are_the_same_and_the_plan_says_so(
        monkeypatch, activation, dropout, frozen, input_grad):
    grads, plans = {}, {}
    for fold in (False, True):
        gb.seed(0)
        torch.manual_seed(0)  # the dropout masks' keys
        mlp = MLP([7, 9, 8, 5], activation=activation, dropout=dropout)
        for i in frozen:
            mlp.layers[i].requires_grad_(False)
        x = random_input(requires_grad=input_grad)
        with monkeypatch.context() as patch:
            if fold:
                fold_on_numpy(patch)
            plans[fold] = mlp.backward_plan(need_input_grad=input_grad)
            with gb.trace() as t:
                mlp(x).square().sum().backward()
        assert t.launches[len(mlp.layers):] == [k for _, kernels in reversed(plans[fold]) for k in kernels]
        grads[fold] = [p.grad for p in [x, *mlp.parameters()]]
    for got, want in zip(grads[True], grads[False]):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    lowest = 0 if input_grad else min(i for i in range(3) if i not in frozen)
    what = "act' is" if dropout is None else "act' and its dropout's mask are"
    folded = range(lowest, 2) if activation in cupy_backend.FOLDS_DX_ACT else ()
    assert plans[True].notes == {f"dense_{i}": f"(its {what} applied by dense_{i + 1}'s dX)" for i in folded}
    assert plans[False].notes == {}
    if dropout is not None:
        assert not any("dropout_dz" in kernels for _, kernels in plans[True])


def test_a_backend_that_claims_the_capability_and_ignores_dx_act_gives_other_grads(monkeypatch, mlp):
    """A planted bug for the test above: with no act' applied anywhere the hidden layers' grads change."""
    x = random_input()
    want = grads_of(mlp(x).square().sum(), [x, *mlp.parameters()], torch.tensor(1.0))
    fold_on_numpy(monkeypatch, broken=True)
    got = grads_of(mlp(x).square().sum(), [x, *mlp.parameters()], torch.tensor(1.0))
    assert not torch.allclose(got[0], want[0]) and torch.equal(got[-1], want[-1])  # the head's db is untouched


def test_frozen_bottom_layer_with_input_not_needing_grad_launches_no_dx_below_the_lowest_trainable(mlp):
    mlp.layers[0].requires_grad_(False)
    with gb.trace() as t:
        mlp(random_input(requires_grad=False)).sum().backward()
    assert t.counts["dense_dw"] == 2 and t.counts["dense_dx"] == 1


def test_frozen_bias_alone_gets_no_grad_and_the_weight_still_does(mlp):
    mlp.layers[1].bias.requires_grad_(False)
    mlp(random_input()).sum().backward()
    assert mlp.layers[1].bias.grad is None and mlp.layers[1].weight.grad is not None


@pytest.mark.parametrize("frozen_weights", [(0, 1, 2), (1,)], ids=["bitfit", "middle_weight"])
def test_a_frozen_weight_under_a_bias_that_trains_launches_no_dw_and_keeps_no_input(mlp, frozen_weights):
    """BitFit: the bias's gradient equals plain torch's, the weight gets none and no dW kernel
    runs for it; the plan says so, as Sequential's does for the same flags."""
    for i in frozen_weights:
        mlp.layers[i].weight.requires_grad_(False)
    x = random_input(requires_grad=False)
    plan = mlp.backward_plan()
    assert plan == mlp.to_sequential().backward_plan()
    with gb.trace() as t:
        out = mlp(x)
        out.square().sum().backward()
    assert t.counts["dense_dw"] == 3 - len(frozen_weights) and t.counts["dense_db"] == len(frozen_weights)
    assert t.counts == Counter(["dense_fwd"] * 3 + [k for _, kernels in plan for k in kernels])
    want = grads_of(plain_torch(mlp, x).square().sum(), [layer.bias for layer in mlp.layers], torch.tensor(1.0))
    for layer, expected in zip(mlp.layers, want):
        torch.testing.assert_close(layer.bias.grad, expected, rtol=1e-5, atol=1e-6)
    for i, layer in enumerate(mlp.layers):
        assert (layer.weight.grad is None) == (i in frozen_weights)


def test_a_second_derivative_raises_for_a_non_contiguous_input_too():
    """The input the MLP copies to a contiguous one is still the one a second derivative reaches,
    whether the MLP's layers train or not."""
    for frozen in (False, True):
        gb.seed(0)
        mlp = MLP([7, 9, 5], activation="tanh").requires_grad_(not frozen)
        base = random_input(7, 6).detach().requires_grad_(True)
        x = base.t()
        assert not x.is_contiguous()
        (grad_x,) = torch.autograd.grad(mlp(x).sum(), base, create_graph=True)
        with pytest.raises(RuntimeError, match="first derivatives only"):
            torch.autograd.grad(grad_x.pow(2).sum() + base.pow(2).sum(), base)


# ----------------------------------------------------------------------------- torch integration


def test_state_dict_round_trip_uses_gpubp_layout_and_restores_outputs(mlp, tmp_path):
    path = tmp_path / "mlp.pt"
    torch.save(mlp.state_dict(), path)
    gb.seed(99)
    other = MLP([7, 9, 8, 5], activation="tanh")
    other.load_state_dict(torch.load(path))
    assert tuple(other.state_dict()["layers.0.weight"].shape) == (7, 9)
    x = random_input(requires_grad=False)
    torch.testing.assert_close(other(x), mlp(x), rtol=0, atol=0)


def test_a_state_dict_saved_through_torch_save_keeps_its_layout_mark(mlp, tmp_path):
    torch.save(mlp.state_dict(), tmp_path / "mlp.pt")
    assert io.TORCH_MLP_LAYOUT in torch.load(tmp_path / "mlp.pt")._metadata[""]


@pytest.mark.parametrize("widths", [[6, 6, 6], [7, 9, 5]])
def test_load_state_dict_refuses_another_modules_linear_weights(widths):
    """nn.Linear's (out, in) weights at the MLP's keys: transposed where square, so refused, with the
    MLP unchanged; a plain dict of (in, out) tensors, which names no module, loads."""

    class Linears(torch.nn.Module):  # the same keys as the MLP's: layers.0.weight, ...
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    gb.seed(0)
    mlp = MLP(widths, activation="tanh")
    before = {name: tensor.clone() for name, tensor in mlp.state_dict().items()}
    foreign = Linears().state_dict()
    with pytest.raises(RuntimeError, match="another torch module's.*from_torch"):
        mlp.load_state_dict(foreign)
    for name, tensor in mlp.state_dict().items():
        assert torch.equal(tensor, before[name])
    plain = {name: tensor.t().contiguous() if name.endswith("weight") else tensor for name, tensor in foreign.items()}
    mlp.load_state_dict(plain)
    torch.testing.assert_close(mlp.layers[0].weight, foreign["layers.0.weight"].t(), rtol=0, atol=0)


@pytest.mark.parametrize("assign", [False, True])
def test_a_plain_dict_loads_with_or_without_assign_alone_and_inside_another_module(assign):
    """load_state_dict(assign=True) adds an entry of its own to each module's metadata; only what
    state_dict() wrote says the state is another module's, so another module's is still refused."""
    gb.seed(0)
    mlp, outer = MLP([6, 4, 3]), torch.nn.Sequential(torch.nn.Linear(6, 6), MLP([6, 4, 3]))
    for module in (mlp, outer):
        plain = {name: tensor.detach() + 1 for name, tensor in module.state_dict().items()}
        module.load_state_dict(plain, assign=assign)
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor, plain[name])
    foreign = torch.nn.Module()  # the MLP's keys, nn.Linear's (out, in) weights
    foreign.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in ((6, 4), (4, 3)))
    with pytest.raises(RuntimeError, match="another torch module's"):
        mlp.load_state_dict(foreign.state_dict(), assign=assign)


def test_an_mlp_inside_another_module_loads_its_own_state():
    gb.seed(0)
    outer = torch.nn.Sequential(torch.nn.Identity(), MLP([4, 5, 3]))
    gb.seed(1)
    twin = torch.nn.Sequential(torch.nn.Identity(), MLP([4, 5, 3]))
    twin.load_state_dict(outer.state_dict())
    torch.testing.assert_close(twin[1].layers[0].weight, outer[1].layers[0].weight, rtol=0, atol=0)


@pytest.mark.parametrize("where", ["alone", "an_mlp_layer", "in_another_module"])
def test_a_dense_refuses_an_nn_linear_state_and_loads_its_own(where):
    """Dense is public and holds (in, out) weights under nn.Linear's keys: an nn.Linear's square
    state loaded into it transposed, with no error, alone, as an MLP's layer or inside a module."""
    torch.manual_seed(0)
    gb.seed(0)
    linear = torch.nn.Linear(4, 4)
    if where == "in_another_module":
        target, foreign = torch.nn.Sequential(Dense(4, 4, "relu")), torch.nn.Sequential(linear).state_dict()
        dense = target[0]
    else:
        target = Dense(4, 4, "relu") if where == "alone" else MLP([4, 4, 3]).layers[0]
        dense, foreign = target, linear.state_dict()
    before = {name: tensor.clone() for name, tensor in target.state_dict().items()}
    with pytest.raises(RuntimeError, match="another torch module's, not a gpubp.torch.Dense's.*plain dict"):
        target.load_state_dict(foreign)
    assert all(torch.equal(tensor, before[name]) for name, tensor in target.state_dict().items())
    target.load_state_dict({name: t.t() if name.endswith("weight") else t for name, t in foreign.items()})
    x = random_input(3, 4, requires_grad=False)
    torch.testing.assert_close(dense(x), torch.relu(linear(x)), rtol=1e-6, atol=1e-6)
    gb.seed(1)
    twin = torch.nn.Sequential(Dense(4, 4, "relu")) if where == "in_another_module" else Dense(4, 4, "relu")
    twin.load_state_dict(target.state_dict())  # its own state, marked, loads
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), target.state_dict().values()))


def test_the_state_dict_of_a_dense_inside_a_torch_module_is_refused_by_from_torch_state_dict():
    """Imported as nn.Linear layers, its (in, out) weights were transposed once more."""
    net = torch.nn.Sequential(Dense(4, 4, "relu"))
    with pytest.raises(ValueError, match=r"the state of a gpubp.torch.MLP \(the module at '0'\)"):
        io.from_torch_state_dict(net.state_dict(), activations=["relu"], device="cpu")


def layout_mark_before_dense_had_one(state, mlps):
    """``state`` with the ``_metadata`` that MLP.state_dict() wrote while only the MLP was marked:
    each MLP's entry (at the prefixes ``mlps``) marked, its ModuleList's and its layers' not."""
    metadata = type(state._metadata)()
    for name, entry in state._metadata.items():
        entry = {"version": entry["version"]}  # what nn.Module.state_dict() writes for any module
        if name in mlps:
            entry[io.TORCH_MLP_LAYOUT] = "(in, out)"
        metadata[name] = entry
    state._metadata = metadata
    return state


@pytest.mark.parametrize("how", ["state_dict", "torch_save", "nested"])
def test_an_mlp_saved_before_its_layers_were_marked_still_loads(how, tmp_path):
    """Checkpoints written by the MLP that marked only its own entry: its Dense layers' entries,
    unmarked but with a version, read as nn.Linear's, yet the MLP's mark vouches for them."""
    gb.seed(0)
    source = MLP([6, 6, 6, 3], activation="tanh")
    module = torch.nn.Sequential(torch.nn.Linear(6, 6), source) if how == "nested" else source
    state = layout_mark_before_dense_had_one(module.state_dict(), {"1"} if how == "nested" else {""})
    if how == "nested":
        assert state._metadata["1.layers.0"] == {"version": 1}
    else:  # as MLP.state_dict() wrote it, byte for byte
        assert state._metadata == {"": {"version": 1, io.TORCH_MLP_LAYOUT: "(in, out)"}, "layers": {"version": 1},
                                   **{f"layers.{i}": {"version": 1} for i in range(3)}}
    if how == "torch_save":
        torch.save(state, tmp_path / "mlp.pt")
        state = torch.load(tmp_path / "mlp.pt")
    gb.seed(1)
    loaded = MLP([6, 6, 6, 3], activation="tanh")
    target = torch.nn.Sequential(torch.nn.Linear(6, 6), loaded) if how == "nested" else loaded
    target.load_state_dict(state)
    x = random_input(4, 6, requires_grad=False)
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_a_dense_saved_alone_before_it_was_marked_loads_as_the_error_says():
    """Its state says no more than an nn.Linear's (the same keys and version, and the same shapes
    where square), so it is refused as one; dict(state), which names no module, loads."""
    gb.seed(0)
    source, target = Dense(5, 5, "tanh"), Dense(5, 5, "tanh")
    unmarked = layout_mark_before_dense_had_one(source.state_dict(), set())
    assert unmarked._metadata == {"": {"version": 1}}
    with pytest.raises(RuntimeError, match=r"not a gpubp.torch.Dense's.*loads as dict\(state\)"):
        target.load_state_dict(unmarked)
    target.load_state_dict(dict(unmarked))
    assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)


def test_optimizer_step_matches_plain_torch_step(mlp):
    twin = MLP([7, 9, 8, 5], activation="tanh")
    twin.load_state_dict(mlp.state_dict())
    x, labels = random_input(requires_grad=False), torch.tensor([0, 1, 2, 3, 4, 0])
    for module, forward in ((mlp, mlp), (twin, lambda x: plain_torch(twin, x))):
        opt = torch.optim.SGD(module.parameters(), lr=0.5, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(forward(x), labels).backward()
            opt.step()
    for got, want in zip(mlp.parameters(), twin.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_digits_train_with_torch_adam():
    x, y = gb.data.load_digits()
    x_train, x_test, y_train, y_test = gb.data.train_test_split(x, y, test_size=0.25, seed=0)
    gb.seed(0)
    torch.manual_seed(0)
    mlp = MLP([64, 64, 10])
    opt = torch.optim.Adam(mlp.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(10):
        for batch in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            F.cross_entropy(mlp(xt[batch]), yt[batch]).backward()
            opt.step()
    with torch.no_grad():
        accuracy = (mlp(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    assert accuracy > 0.93


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_autocast_casts_the_input_to_the_module_precision(mlp, input_dtype):
    x = random_input(requires_grad=False)
    want = mlp(x.to(input_dtype).float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mlp(x.to(input_dtype))
        out.float().sum().backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert mlp.layers[0].weight.grad.dtype == torch.float32


def test_under_autocast_a_second_derivative_through_a_frozen_mlp_raises(mlp):
    """The input autocast casts is still the one a second derivative reaches, with no parameter
    requiring grad to lead it to the MLP."""
    mlp.requires_grad_(False)
    x = random_input()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mlp(x.bfloat16())
    (grad_x,) = torch.autograd.grad(out.float().pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        (grad_x.pow(2).sum() + x.sum()).backward()


def test_non_contiguous_input_is_copied_and_gives_the_contiguous_result(mlp):
    x = random_input(7, 6, requires_grad=False).t()
    assert not x.is_contiguous()
    torch.testing.assert_close(mlp(x), mlp(x.contiguous()), rtol=0, atol=0)


def test_dropout_keys_come_from_torchs_stream():
    """torch.manual_seed decides the MLP's masks, as nn.Dropout's; gpubp's stream does not."""
    gb.seed(0)
    mlp = MLP([7, 16, 5], dropout=0.5)
    x = random_input(requires_grad=False)
    outs = []
    for torch_seed, gpubp_seed in [(3, 0), (3, 1), (4, 0)]:
        torch.manual_seed(torch_seed)
        gb.seed(gpubp_seed)
        outs.append(mlp(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.equal(outs[0], outs[2])


def test_a_float64_mlp_scales_the_kept_elements_by_the_float64_factor():
    """1 / (1 - rate) in float64, as nn.Dropout's in float64, not float32's rounding of it; and
    the gradients are those of that factor."""
    rate = 0.1
    torch.manual_seed(0)  # the mask's key
    mlp = MLP([4, 4], activation="identity", precision="fp64", input_dropout=rate)
    with torch.no_grad():
        mlp.layers[0].weight.copy_(torch.eye(4, dtype=torch.float64))
        mlp.layers[0].bias.zero_()
    x = torch.ones(50, 4, dtype=torch.float64, requires_grad=True)
    out = mlp(x)
    kept = out != 0
    assert kept.any() and not kept.all()
    assert set(out[kept].tolist()) == {1 / (1 - rate)}
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept.double() / (1 - rate), rtol=0, atol=0)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_recomputes_the_same_dropout_masks(use_reentrant):
    """torch.utils.checkpoint recomputes the forward in backward with torch's random state as it
    was: the same masks, so the same gradients as without checkpointing, and the masks of the
    forwards after it are those they would have been."""
    gb.seed(0)
    mlp = MLP([7, 16, 16, 5], dropout=0.5, input_dropout=0.2)
    x = random_input()
    runs = []
    for checkpointed in (False, True):
        torch.manual_seed(11)
        mlp.zero_grad()
        x.grad = None
        if checkpointed:
            out = torch.utils.checkpoint.checkpoint(mlp, x, use_reentrant=use_reentrant)
        else:
            out = mlp(x)
        out.pow(2).sum().backward()
        runs.append((out.detach(), x.grad.clone(), [p.grad.clone() for p in mlp.parameters()], mlp(x).detach()))
    (out, dx, grads, after), (out_c, dx_c, grads_c, after_c) = runs
    torch.testing.assert_close(out_c, out, rtol=0, atol=0)
    torch.testing.assert_close(dx_c, dx, rtol=0, atol=0)
    for got, want in zip(grads_c, grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(after_c, after, rtol=0, atol=0)  # the next forward's masks


def test_hooks_on_a_layer_run_in_the_mlps_forward_and_backward():
    """layers is an nn.ModuleList of nn.Modules: their hooks ran only when a layer was called alone,
    never inside mlp(x)."""
    gb.seed(0)
    mlp, seen = MLP([7, 9, 5]), []
    mlp.layers[0].register_forward_pre_hook(lambda module, args: seen.append("pre"))
    mlp.layers[0].register_forward_hook(lambda module, args, out: seen.append(("fwd", tuple(out.shape))))
    mlp.layers[1].register_full_backward_hook(lambda module, grad_in, grad_out: seen.append("bwd"))
    mlp(random_input()).sum().backward()
    assert seen == ["pre", ("fwd", (6, 9)), "bwd"]
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append(
        type(module).__name__))
    try:
        seen.clear()
        MLP([7, 9, 5])(random_input())
    finally:
        handle.remove()
    assert seen == ["Dense", "Dense", "MLP"]  # a global hook runs on the layers, as on nn.Sequential's


def _reference_of(mlp: MLP) -> torch.nn.Sequential:
    """nn.Modules computing ``x @ weight + bias`` then the activation, with copies of the MLP's parameters."""
    class Affine(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.weight = torch.nn.Parameter(layer.weight.detach().clone())
            self.bias = torch.nn.Parameter(layer.bias.detach().clone())
            self.activation = layer.activation

        def forward(self, x):
            return TORCH_ACTIVATIONS[self.activation](x @ self.weight + self.bias)

    return torch.nn.Sequential(*(Affine(layer) for layer in mlp.layers))


@pytest.mark.parametrize("utility", ["spectral_norm", "prune", "weight_norm"])
def test_torch_utilities_that_hook_a_layer_train_it_as_on_torch_modules(utility):
    """spectral_norm left the layer untrained with no error (its hook, which recomputes the weight, never
    ran), and prune and the older weight_norm failed at the second backward."""
    from torch.nn.utils import prune
    gb.seed(0)
    mlp = MLP([7, 9, 5], activation="tanh", precision="fp64")
    reference = _reference_of(mlp)
    for model in (mlp, reference):
        if utility == "spectral_norm":
            torch.manual_seed(1)  # the same power-iteration start
            torch.nn.utils.spectral_norm(model[0] if model is reference else model.layers[0])
        elif utility == "prune":
            prune.random_unstructured(model[0] if model is reference else model.layers[0], "weight",
                                                     amount=0.5)
        else:
            torch.nn.utils.weight_norm(model[0] if model is reference else model.layers[0])
    if utility == "prune":
        reference[0].weight_mask.copy_(mlp.layers[0].weight_mask)
    x = random_input(dtype=torch.float64, requires_grad=False)
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1) for model in (mlp, reference)]
    for _ in range(3):
        for model, optimizer in zip((mlp, reference), optimizers):
            optimizer.zero_grad()
            model(x).pow(2).sum().backward()
            optimizer.step()
    ours, theirs = dict(mlp.named_parameters()), dict(reference.named_parameters())
    assert len(ours) == len(theirs) == 4 + (utility == "weight_norm")
    for name, param in ours.items():
        torch.testing.assert_close(param, theirs[name.removeprefix("layers.")], rtol=1e-12, atol=1e-12)
    assert all(param.grad.abs().sum() > 0 for param in ours.values())  # the hooked layer trained too


def test_a_hooked_layer_leaves_the_outputs_gradients_and_dropout_masks_as_they_were():
    gb.seed(0)
    plain = MLP([7, 9, 8, 5], dropout=0.3, input_dropout=0.2)
    hooked = MLP([7, 9, 8, 5], dropout=0.3, input_dropout=0.2)
    hooked.load_state_dict(plain.state_dict())
    hooked.layers[2].register_forward_hook(lambda *args: None)
    results = []
    for model in (plain, hooked):
        torch.manual_seed(3)
        x = random_input()
        out = model(x)
        results.append((out, *grads_of(out, [x, *model.parameters()], torch.ones_like(out))))
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)
    assert (results[0][1] == 0).any()  # the input masks dropped something: those inputs' gradients are 0


@pytest.mark.parametrize("hooked", [False, True])
def test_a_layer_in_eval_mode_drops_nothing_on_either_path(hooked):
    """Each torch module's own ``training`` flag decides its dropout: the whole-stack path read the
    MLP's and the one-layer-at-a-time path (a hook on a layer) each layer's, so attaching a hook
    changed the outputs of an MLP training with a layer in eval mode."""
    gb.seed(0)
    mlp = MLP([7, 9, 8, 5], dropout=0.5, input_dropout=0.2)
    reference = MLP([7, 9, 8, 5], dropout=0.5, input_dropout=0.2)
    reference.load_state_dict(mlp.state_dict())
    reference.layers[0].dropout = None  # what layers[0] in eval mode drops: nothing
    mlp.layers[0].eval()
    if hooked:
        mlp.layers[2].register_forward_hook(lambda *args: None)
    x = random_input(requires_grad=False)
    torch.manual_seed(3)
    out = mlp(x)
    torch.manual_seed(3)
    assert torch.equal(out, reference(x))


def test_reset_parameters_initialises_a_module_built_on_the_meta_device():
    """torch's deferred initialisation (FSDP's too): build on the meta device, materialise with
    to_empty, call every module's reset_parameters. Dense had none, so training started from
    uninitialised memory."""
    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Linear(4, 5), MLP([5, 6, 3]))
    net.to_empty(device="cpu")
    gb.seed(1)
    for module in net.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    gb.seed(1)
    fresh = MLP([5, 6, 3])
    for ours, theirs in zip(net[1].parameters(), fresh.parameters()):
        assert torch.equal(ours, theirs)


def test_a_half_or_bfloat16_module_says_to_convert_it_back_not_to_convert_the_input():
    """After module.half(), the first error asked for a float16 input, and the next refused it."""
    for module in (MLP([4, 3]).half(), MLP([4, 3]).to(torch.bfloat16)):
        dtype = module.layers[0].weight.dtype
        with pytest.raises(TypeError, match=rf"parameters: .* got {dtype}; convert the module back with \.float\(\)"):
            module(torch.randn(2, 4))
        with pytest.raises(TypeError, match=rf"parameters: a gpubp Sequential holds float32 or float64 weights, "
                                            rf"got {dtype}"):
            module.to_sequential()


def test_torch_jit_trace_says_the_mlp_cannot_be_traced(mlp):
    with pytest.raises(RuntimeError, match="cannot be traced by torch.jit.*to ONNX"):
        torch.jit.trace(mlp, random_input(requires_grad=False))


def test_torch_compile_with_fullgraph_says_why_the_mlp_breaks_the_graph(mlp):
    compiled = torch.compile(mlp, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="runs gpubp's kernels eagerly"):
        compiled(random_input(requires_grad=False))


def test_under_torch_compile_the_mlp_runs_gpubp_kernels_in_a_graph_break(mlp):
    compiled = torch.compile(lambda x: torch.relu(mlp(x)) * 2, backend="eager")
    x = random_input(requires_grad=False)
    with gb.trace() as t:
        out = compiled(x)
    assert t.counts["dense_fwd"] == len(mlp.layers)
    torch.testing.assert_close(out, torch.relu(mlp(x)) * 2, rtol=0, atol=0)


def _forward_mode(mlp, x):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        return mlp(fwAD.make_dual(x, torch.ones_like(x)))


def _traced_by_make_fx(mlp, x):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(mlp)(x)


def _under_fake_tensors(mlp, x):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        return mlp(mode.from_tensor(x))


@pytest.mark.parametrize("call, match", [
    (lambda mlp, x: torch.vmap(mlp)(x.expand(2, *x.shape)), "does not support torch.func's transforms"),
    (lambda mlp, x: torch.func.grad(lambda v: mlp(v).sum())(x), "does not support torch.func's transforms"),
    (lambda mlp, x: torch.func.jacrev(mlp)(x), "does not support torch.func's transforms"),
    (lambda mlp, x: torch.func.jvp(mlp, (x,), (torch.ones_like(x),)), "does not support torch.func's transforms"),
    (_forward_mode, "does not support forward-mode AD"),
    (lambda mlp, x: torch.autograd.functional.jacobian(mlp, x, vectorize=True), "takes one incoming gradient at a time"),
    (lambda mlp, x: torch.export.export(mlp, (x,)), "cannot be traced by torch.export"),
    (_traced_by_make_fx, r"cannot be traced by torch.export, torch.fx \(symbolic_trace, make_fx\)"),
    (lambda mlp, x: torch.fx.symbolic_trace(mlp), r"torch.fx \(symbolic_trace"),
    (_under_fake_tensors, "with fake tensors"),
], ids=["vmap", "func.grad", "jacrev", "jvp", "forward_ad", "jacobian_vectorize", "export", "make_fx", "symbolic_trace",
        "fake"])
def test_torch_transforms_and_tracers_the_kernels_cannot_take_part_in_are_refused_by_name(mlp, call, match):
    """torch's own errors named setup_context, a batching rule for aten::detach or .numpy() on a
    tensor subclass; make_fx with real tensors gave a graph returning torch.empty, with no error."""
    with pytest.raises(RuntimeError, match=rf"^gpubp.torch.MLP.*{match}"):
        call(mlp, random_input(3, 7, requires_grad=False))
    x = random_input(3, 7, requires_grad=False)  # outside them, as before
    assert torch.autograd.functional.jacobian(mlp, x).shape == (3, 5, 3, 7)


def test_a_cuda_graph_capture_around_the_forward_or_the_backward_is_refused_by_name(mlp, monkeypatch):
    """torch.cuda.graph would record the kernels with scratch from CuPy's pool that nothing keeps
    for the replays (and a CPU MLP's work not at all); the capture is what torch's stream reports."""
    x = random_input()
    out = mlp(x)  # the backward's graph, made before the capture
    before = [p.detach().clone() for p in mlp.parameters()]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    for call in (lambda: mlp(x), lambda: out.sum().backward()):
        with pytest.raises(RuntimeError, match=r"^gpubp.torch.MLP cannot run inside a CUDA graph capture"):
            call()
    assert all(p.grad is None for p in mlp.parameters())
    assert all(torch.equal(p, b) for p, b in zip(mlp.parameters(), before))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    out.sum().backward()  # outside a capture, as before
    assert all(p.grad is not None for p in mlp.parameters())


@pytest.mark.gpu
def test_cuda_tensors_run_the_cupy_kernels_on_torchs_current_stream():
    pytest.importorskip("cupy")
    gb.seed(0)
    mlp = MLP([7, 9, 5], activation="gelu").cuda()
    x = random_input().cuda().detach().requires_grad_(True)
    inputs = [x, *mlp.parameters()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), gb.trace() as t:
        out = mlp(x)
        grad_out = torch.ones_like(out)
        got = grads_of(out, inputs, grad_out)
    torch.cuda.synchronize()
    assert t.counts["dense_fwd"] == 2 and t.counts["dense_dw"] == 2 and t.counts["dense_dx"] == 2
    want = plain_torch(mlp, x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    for g, w in zip(got, grads_of(want, inputs, grad_out)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert all(allocated_by_torch(tensor) for tensor in (out, *got))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("x, error, match", [
    (lambda: torch.ones(4, 7, dtype=torch.float64), TypeError, "x: expected dtype torch.float32"),
    (lambda: torch.ones(4, 7, dtype=torch.int64), TypeError, "x: expected dtype torch.float32"),
    (lambda: torch.ones(4, 6), ValueError, r"x: expected shape \(batch, 7\)"),
    (lambda: torch.ones(7), ValueError, "x: expected a 2-D array"),
    (lambda: torch.ones(0, 7), ValueError, r"x: expected at least one row, got shape \(0, 7\)"),  # as documented
    (lambda: torch.ones(4, 7, device="meta"), ValueError, "x: the input is on meta but the MLP is on cpu"),
    (lambda: np.ones((4, 7), np.float32), TypeError, "x: expected a torch.Tensor"),
])
def test_bad_input_raises_a_clear_error_and_leaves_weights_unchanged(mlp, x, error, match):
    before = [p.detach().clone() for p in mlp.parameters()]
    with pytest.raises(error, match=match):
        mlp(x())
    for got, want in zip(mlp.parameters(), before):
        assert torch.equal(got, want)


def test_the_parameters_are_made_on_torchs_default_device_and_another_than_cpu_or_cuda_is_refused():
    """As nn.Linear's; the bridge's own error, naming the parameters, comes before torch.amp's."""
    with torch.device("meta"):
        made_there = MLP([5, 4, 3])
    assert {p.device.type for p in made_there.parameters()} == {"meta"}
    moved = MLP([5, 4, 3]).to("meta")
    for mlp in (made_there, moved):
        with pytest.raises(ValueError, match="parameters: gpubp runs on CPU and CUDA tensors, .* on meta"):
            mlp(torch.empty(2, 5, device="meta"))


def test_mixed_dtypes_inside_the_mlp_raise_naming_the_parameter(mlp):
    mlp.layers[1].double()
    with pytest.raises(ValueError, match=r"parameters: layers\[1\].weight is torch.float64 .* layers\[0\].weight is "
                                         "torch.float32"):
        mlp(random_input())
    mlp.layers[1].float()
    mlp.layers[0].bias.data = mlp.layers[0].bias.data.double()
    with pytest.raises(ValueError, match=r"parameters: layers\[0\].bias is torch.float64"):
        mlp(random_input())


def test_attributes_set_after_construction_are_checked_at_the_forward(mlp):
    """``math`` and ``layers`` are plain attributes: a bad math ran silently, a foreign layer failed
    with a bare AttributeError."""
    before = [p.detach().clone() for p in mlp.parameters()]
    mlp.math = "bogus"
    with pytest.raises(ValueError, match=r"math: expected one of \('fp32', 'tf32', 'bf16'\), got 'bogus'"):
        mlp(random_input())
    assert all(torch.equal(got, want) for got, want in zip(mlp.parameters(), before))
    mlp.math = "fp32"
    mlp.layers[1] = torch.nn.Linear(9, 8)
    before = [p.detach().clone() for p in mlp.parameters()]
    with pytest.raises(TypeError, match=r"layers\[1\]: expected a gpubp.torch.Dense, got Linear"):
        mlp(random_input())
    ran = []
    mlp.layers[0].register_forward_hook(lambda *args: ran.append(1))  # the layer-by-layer path checks it too
    with pytest.raises(TypeError, match=r"layers\[1\]: expected a gpubp.torch.Dense, got Linear"):
        mlp(random_input())
    assert not ran  # before any layer runs
    assert all(torch.equal(got, want) for got, want in zip(mlp.parameters(), before))


def test_bfloat16_parameters_on_the_cpu_raise_naming_the_parameters_and_the_precision_to_use(mlp):
    mlp.bfloat16()
    before = [p.detach().clone() for p in mlp.parameters()]
    with pytest.raises(TypeError, match="parameters: .* got torch.bfloat16; .* precision='bf16'"):
        mlp(random_input(dtype=torch.bfloat16))
    assert all(torch.equal(got, want) for got, want in zip(mlp.parameters(), before))


@pytest.mark.parametrize("kwargs, match", [
    (dict(sizes=[4]), "sizes"), (dict(sizes=[4, 0]), r"sizes\[1\]"), (dict(sizes=[4, 2], precision="fp16"), "precision"),
    (dict(sizes=[4, 3, 2], activation="mish"), "activation"),
    (dict(sizes=[4, 3, 2], activation="softmax"), "activation: 'softmax' .* output layer only"),
    # With two sizes no layer uses activation: it went unchecked. output_activation was named "activation".
    (dict(sizes=[4, 3], activation="bogus"), "^activation: unknown activation 'bogus'"),
    (dict(sizes=[4, 3, 2], output_activation="bogus"), "^output_activation: unknown activation 'bogus'"),
])
def test_bad_constructor_arguments_raise(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MLP(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int32, "float32"])
def test_a_dense_in_a_dtype_the_kernels_lack_is_refused_where_it_is_built_naming_dtype(dtype):
    """float16 was built and then refused every input; int32 raised torch's "Only Tensors of
    floating point ... can require gradients", naming no argument."""
    with pytest.raises(TypeError, match=rf"^dtype: expected torch.float32 or torch.float64 .*, got {re.escape(repr(dtype))}"):
        Dense(3, 3, dtype=dtype)


# ----------------------------------------------------------------------------- conversions


def test_from_sequential_names_what_it_refuses():
    with pytest.raises(ValueError, match="model: the Sequential has no layers"):
        MLP.from_sequential(gb.Sequential([]))
    with pytest.raises(TypeError, match="model: expected a gpubp.Sequential with at least one layer, got list"):
        MLP.from_sequential([gb.Dense(3, 2)])


def test_from_sequential_computes_what_the_sequential_computes_and_keeps_frozen_layers():
    gb.seed(4)
    model = gb.Sequential([gb.Dense(5, 6, "gelu"), gb.Dense(6, 3, "sigmoid")], device="cpu")
    model[0].freeze()
    mlp = MLP.from_sequential(model)
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    np.testing.assert_allclose(mlp(torch.from_numpy(x)).detach().numpy(), model.predict(x), rtol=1e-6, atol=1e-7)
    assert [p.requires_grad for p in mlp.parameters()] == [False, False, True, True]


def test_to_sequential_round_trip_keeps_weights_activations_and_frozen_layers(mlp):
    mlp.layers[2].requires_grad_(False)
    model = mlp.to_sequential()
    assert [layer.activation for layer in model] == ["tanh", "tanh", "identity"]
    assert [layer.trainable for layer in model] == [True, True, False]
    back = MLP.from_sequential(model)
    for got, want in zip(back.state_dict().values(), mlp.state_dict().values()):
        assert torch.equal(got, want)


def test_from_torch_computes_what_the_torch_sequential_computes():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(8, 8),
                                 torch.nn.LeakyReLU(0.01), torch.nn.Linear(8, 6), torch.nn.SiLU(), torch.nn.Linear(6, 2))
    mlp = from_torch(module)
    assert [layer.activation for layer in mlp.layers] == ["gelu_tanh", "leaky_relu", "silu", "identity"]
    x = random_input(3, 5, requires_grad=False)
    torch.testing.assert_close(mlp(x), module(x), rtol=1e-5, atol=1e-6)


def test_a_softmax_head_converts_to_torch_and_back():
    """gpubp.gradcheck.to_torch writes a softmax head as nn.Softmax(dim=1); from_torch reads it."""
    from gpubp.gradcheck import to_torch

    gb.seed(5)
    model = gb.Sequential([gb.Dense(4, 6, "tanh"), gb.Dense(6, 3, "softmax")], dtype=np.float64)
    mlp = from_torch(to_torch(model))
    assert [layer.activation for layer in mlp.layers] == ["tanh", "softmax"]
    x = random_input(5, 4, torch.float64, requires_grad=False)
    np.testing.assert_allclose(mlp(x).detach().numpy(), model.predict(x.numpy()), rtol=1e-12)


@pytest.mark.parametrize("module, match", [
    (lambda: torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Softmax(dim=0)), r"module\[1\].*not supported"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Softmax(dim=1), torch.nn.Linear(2, 2)),
     "runs on the output layer only"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LeakyReLU(0.2)), r"module\[1\].*not supported"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False)), "without a bias"),
    (lambda: torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(3, 2)), "must directly follow an nn.Linear"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(4, 2)), "Linear 1 takes 4 inputs"),
    (lambda: torch.nn.Linear(3, 2), "expected a torch.nn.Sequential"),
    # One dtype per MLP: the float64 layer was copied into a float32 one with no word.
    (lambda: torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2).double()),
     r"^module\[2\]: expected torch.float32 weights and bias, as module\[0\]'s .* got torch.float64 and torch.float64"),
    (lambda: torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(3, 2).double(), torch.nn.Linear(2, 2)),
     r"^module\[2\]: expected torch.float64 weights and bias, as module\[1\]'s"),
    # nn.Dropout takes p=1.0, gpubp's Dropout does not: the error named no module.
    (lambda: torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Dropout(1.0), torch.nn.Linear(2, 2)),
     r"^module\[2\]: nn.Dropout's p: expected a number in \[0, 1\)"),
    (lambda: torch.nn.Sequential(torch.nn.Dropout(1.0), torch.nn.Linear(3, 2)), r"^module\[0\]: nn.Dropout's p"),
])
def test_from_torch_rejects_what_it_cannot_convert(module, match):
    with pytest.raises((ValueError, TypeError), match=match):
        from_torch(module())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_from_torch_refuses_low_precision_weights_and_names_the_precision_to_use(dtype):
    """Copied into a float32 MLP, they would make one that refuses the module's own inputs."""
    module = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)).to(dtype)
    with pytest.raises(TypeError, match=rf"module\[0\]: expected float32 or float64 weights, got {dtype}; .*"
                                        "precision='bf16'"):
        from_torch(module)


def test_a_dropout_after_a_softmax_is_refused_wherever_it_is_set():
    """Backward sees only the masked probabilities, and a dropped one's gradient is not 0 (its logit
    still moves the row's other outputs): accepted, the gradients were wrong with no error."""
    with pytest.raises(ValueError, match="dropout: a Dropout after a softmax is not supported"):
        Dense(4, 5, "softmax", dropout=0.5)
    module = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Softmax(dim=1), torch.nn.Dropout(0.5))
    with pytest.raises(ValueError, match=r"module\[2\]: a Dropout after a softmax"):
        from_torch(module)
    mlp = MLP([4, 6, 5], output_activation="softmax")
    mlp.layers[-1].dropout = 0.5  # set after construction, as from_torch sets its layers'
    with pytest.raises(ValueError, match=r"layers\[1\]: a Dropout after a softmax"):
        mlp(torch.randn(3, 4))
    assert MLP([4, 6, 5], output_activation="sigmoid", dropout=0.5)(torch.randn(3, 4)).shape == (3, 5)


@pytest.mark.parametrize("attr, value, error", [
    ("layers[0].dropout", 1.5, ValueError), ("layers[0].dropout", 1.0, ValueError), ("layers[0].dropout", -0.5, ValueError),
    ("layers[0].dropout", float("nan"), ValueError), ("layers[0].dropout", "0.5", TypeError),
    ("input_dropout", -1.0, ValueError), ("input_dropout", 1.0, ValueError), ("dense.dropout", 1.0, ValueError),
])
def test_a_dropout_rate_set_after_construction_is_checked_as_the_constructor_checks_it(attr, value, error):
    """The rates are attributes (from_torch and from_sequential set them): unchecked, 1.5 or -0.5
    zeroed every output, 1.0 raised a ZeroDivisionError and "0.5" a TypeError naming nothing."""
    gb.seed(0)
    mlp, dense = MLP([5, 6, 3]), Dense(5, 6)
    if attr == "input_dropout":
        module, mlp.input_dropout = mlp, value
    elif attr == "dense.dropout":
        module, dense.dropout = dense, value
    else:
        module, mlp.layers[0].dropout = mlp, value
    name = re.escape(attr.removeprefix("dense."))
    with pytest.raises(error, match=rf"^{name}: expected a number in \[0, 1\) \(the fraction of inputs dropped\)"):
        module(random_input(4, 5))
    module.eval()  # a bad rate is refused in evaluation mode too, where no mask is drawn
    with pytest.raises(error, match=rf"^{name}: "):
        module(random_input(4, 5))


def test_import_gpubp_does_not_import_torch():
    code = "import sys, gpubp, gpubp.distributed; assert 'torch' not in sys.modules, 'torch was imported'"
    run_python(code, timeout=60)


@pytest.mark.parametrize("threads, policy, warns", [(2, None, True), (2, "passive", False), (1, None, False)])
def test_cpu_thread_setting_that_slows_the_bridge_is_reported_once(mlp, monkeypatch, caplog, threads, policy, warns):
    import gpubp.torch as gt

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    gt._check_cpu_threads.cache_clear()
    with caplog.at_level("WARNING", logger="gpubp"):
        mlp(random_input())
        mlp(random_input())
    gt._check_cpu_threads.cache_clear()
    assert sum("OMP_WAIT_POLICY=PASSIVE" in r.getMessage() for r in caplog.records) == int(warns)


def test_tf32_precision_keeps_fp32_parameters_and_converts_with_sequential(rng):
    """precision="tf32" is Sequential's: fp32 weights, tensor-core products on CUDA tensors only."""
    mlp = MLP([6, 5, 3], precision="tf32")
    assert mlp.layers[0].weight.dtype == torch.float32
    model = mlp.to_sequential()
    assert model.precision == "tf32"
    assert MLP.from_sequential(model).math == "tf32"
    x = torch.from_numpy(rng.standard_normal((4, 6)).astype(np.float32))
    fp32 = MLP.from_sequential(model)
    fp32.math = "fp32"
    assert torch.equal(MLP.from_sequential(model)(x), fp32(x))  # CPU tensors compute fp32


def test_bf16_precision_keeps_fp32_parameters_rounds_the_products_and_converts_with_sequential(rng):
    """precision="bf16" is Sequential's: fp32 weights and gradients; CPU tensors get the NumPy
    backend's emulation of the bf16 kernels' rounding, so they differ from fp32 within its bound."""
    mlp = MLP([6, 5, 3], precision="bf16")
    assert mlp.layers[0].weight.dtype == torch.float32
    model = mlp.to_sequential()
    assert model.precision == "bf16"
    assert MLP.from_sequential(model).math == "bf16"
    x = torch.from_numpy(rng.standard_normal((4, 6)).astype(np.float32))
    fp32 = MLP.from_sequential(model)
    fp32.math = "fp32"
    out, reference = mlp(x), fp32(x).detach()
    assert not torch.equal(out, reference)
    torch.testing.assert_close(out, reference, rtol=0, atol=3e-2 * float(reference.abs().max()))
    assert torch.equal(out.detach(), torch.from_numpy(model.forward(x.numpy())))
    out.sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in mlp.parameters())


# ----------------------------------------------------------------------------- layers edited by hand


def _edit(mlp: MLP, edit: str) -> None:
    if edit == "weight (in, other out)":  # the bias below it is untouched: it was blamed ("b: expected shape (7,)")
        mlp.layers[1].weight = torch.nn.Parameter(torch.randn(9, 7))
    elif edit == "weight (out, in)":  # an nn.Linear's layout: "w: expected 9 rows ... of x (6, 9)"
        mlp.layers[1].weight = torch.nn.Parameter(torch.randn(8, 9))
    elif edit == "weight 1-D":  # a bare IndexError
        mlp.layers[1].weight = torch.nn.Parameter(torch.randn(72))
    elif edit == "bias (7,)":  # "b: expected shape (8,), got (7,)", naming no layer
        mlp.layers[1].bias = torch.nn.Parameter(torch.randn(7))
    elif edit == "bias None":  # "'NoneType' object has no attribute 'device'"
        mlp.layers[1].bias = None


@pytest.mark.parametrize("hooked", [False, True])
@pytest.mark.parametrize("edit, name", [
    ("weight (in, other out)", "weight"), ("weight (out, in)", "weight"), ("weight 1-D", "weight"),
    ("bias (7,)", "bias"), ("bias None", "bias"),
])
def test_a_parameter_replaced_by_hand_with_a_wrong_one_is_named_by_its_layer(mlp, edit, name, hooked):
    """The kernels' own checks named their arguments ``w``, ``b`` and ``x`` (the hidden activation
    fed to the layer), and one blamed the bias below a replaced weight; the MLP's own check of the
    parameters' dtypes names ``layers[i].weight``, and so should this one, on either path."""
    _edit(mlp, edit)
    ran = []
    if hooked:  # the layer-by-layer path, where each layer's errors came out as a lone Dense's
        mlp.layers[0].register_forward_hook(lambda *args: ran.append(1))
    with pytest.raises((TypeError, ValueError), match=rf"^layers\[1\]\.{name}\b"):
        mlp(random_input())
    assert not ran  # refused before any layer runs


@pytest.mark.parametrize("edit, match", [
    ("double", r"layers\[1\]\.weight is torch.float64"),  # was "x: expected dtype torch.float64", blaming the input
    ("dropout", r"^layers\[1\]\.dropout: expected a number in \[0, 1\)"),  # was "dropout: ...", after layer 0 ran
])
def test_a_hooked_mlp_checks_every_layer_as_the_whole_stack_does_before_any_layer_runs(mlp, edit, match):
    if edit == "double":
        mlp.layers[1].double()
    else:
        mlp.layers[1].dropout = 2.0
    ran = []
    mlp.layers[0].register_forward_hook(lambda *args: ran.append(1))
    with pytest.raises((TypeError, ValueError), match=match):
        mlp(random_input())
    assert not ran


@pytest.mark.parametrize("alias, canonical", [(None, "identity"), ("linear", "identity"), ("swish", "silu")])
def test_an_activation_alias_set_by_hand_computes_as_the_constructor_would(alias, canonical):
    """The constructors accept None, "linear" and "swish" (``activations.canonical``), and so do
    ``backward_plan`` and ``to_sequential``, but the forward passed the attribute to the kernels
    unconverted: "activation: unknown activation None"."""
    gb.seed(0)
    mlp, reference = MLP([7, 9, 8, 5], activation="tanh"), MLP([7, 9, 8, 5], activation="tanh")
    reference.load_state_dict(mlp.state_dict())
    mlp.layers[1].activation, reference.layers[1].activation = alias, canonical
    x = random_input()
    out, want = mlp(x), reference(x)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    grad_out = torch.randn_like(out)
    for got, expected in zip(grads_of(out, [x, *mlp.parameters()], grad_out),
                             grads_of(want, [x, *reference.parameters()], grad_out)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_an_unknown_activation_set_by_hand_is_named_by_its_layer(mlp):
    mlp.layers[1].activation = "ReLU"  # was "activation: unknown activation 'ReLU'", after layer 0 ran
    with pytest.raises(ValueError, match=r"^layers\[1\]\.activation: unknown activation 'ReLU'"):
        mlp(random_input())


def test_changing_a_bias_in_place_between_forward_and_backward_works_as_on_nn_linear(mlp):
    """Backward reads a bias's shape and dtype, never its values, and torch's addmm does not save it;
    the bridge saved every parameter for backward, so an in-place change of a bias (an optimizer
    step, a clamp) between forward and backward raised "modified by an inplace operation"."""
    x = random_input(requires_grad=False)
    reference = _reference_of(mlp)
    out, want = mlp(x), reference(x)
    with torch.no_grad():
        mlp.layers[0].bias.add_(1)
        reference[0].bias.add_(1)
    out.sum().backward()
    want.sum().backward()
    for got, expected in zip(mlp.parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-5, atol=1e-6)
