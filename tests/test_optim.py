"""Optimizers: PyTorch's semantics step for step, param groups, clipping, frozen parameters."""

import inspect
import math

import numpy as np
import pytest

import gpubp as gb
from gpubp import optim
from gpubp.parameter import Parameter

SHAPES = [(3, 4), (4,), (1, 1)]
STEPS = 6


def torch_or_skip():
    return pytest.importorskip("torch", reason="PyTorch is the oracle here: pip install 'gpubp[torch]'")


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return [Parameter(rng.normal(size=shape), name=f"p{i}") for i, shape in enumerate(SHAPES)]


def gradient_sequence(seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=shape) for shape in SHAPES] for _ in range(STEPS)]


def run_ours(make_optimizer, groups_of):
    params = make_params()
    opt = make_optimizer(groups_of(params))
    for grads in gradient_sequence():
        for p, g in zip(params, grads):
            p.grad = g.copy()
        opt.step()
    return [p.data for p in params]


def run_torch(make_optimizer, groups_of):
    torch = torch_or_skip()
    params = [torch.tensor(p.data, requires_grad=True) for p in make_params()]
    opt = make_optimizer(groups_of(params))
    for grads in gradient_sequence():
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g)
        opt.step()
    return [p.detach().numpy() for p in params]


def all_in_one(params):
    return params


CONFIGS = {
    "sgd": dict(lr=0.1),
    "sgd_momentum": dict(lr=0.1, momentum=0.9),
    "sgd_nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "sgd_weight_decay": dict(lr=0.1, weight_decay=0.05),
    "sgd_momentum_weight_decay": dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
    "sgd_momentum_1": dict(lr=0.05, momentum=1.0, nesterov=True),  # the velocity never decays: valid in torch
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_sgd_matches_pytorch(config):
    torch = torch_or_skip()
    ours = run_ours(lambda p: optim.SGD(p, **config), all_in_one)
    theirs = run_torch(lambda p: torch.optim.SGD(p, **config), all_in_one)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("config", [dict(lr=0.01), dict(lr=0.02, weight_decay=0.1),
                                    dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6)], ids=["plain", "decay", "betas"])
def test_adam_and_adamw_match_pytorch(name, config):
    torch = torch_or_skip()
    ours = run_ours(lambda p: getattr(optim, name)(p, **config), all_in_one)
    theirs = run_torch(lambda p: getattr(torch.optim, name)(p, **config), all_in_one)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_adam_with_decoupled_weight_decay_matches_pytorchs_and_is_adamw():
    torch = torch_or_skip()
    config = dict(lr=0.02, weight_decay=0.1, decoupled_weight_decay=True)
    ours = run_ours(lambda p: optim.Adam(p, **config), all_in_one)
    theirs = run_torch(lambda p: torch.optim.Adam(p, **config), all_in_one)
    adamw = run_ours(lambda p: optim.AdamW(p, lr=0.02, weight_decay=0.1), all_in_one)
    plain = run_ours(lambda p: optim.Adam(p, lr=0.02, weight_decay=0.1), all_in_one)
    for a, b, c, d in zip(ours, theirs, adamw, plain):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(a, c)
        assert not np.allclose(a, d, rtol=1e-6, atol=0)  # L2 in the gradient steps otherwise


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_decoupled_weight_decay_is_an_option_of_each_param_group_as_in_pytorch(name):
    """One group decays its weights as AdamW, the other as Adam, whichever class holds them; the
    groups hold the option as torch's do (AdamW's True)."""
    torch = torch_or_skip()

    def groups(params):
        return [{"params": params[:1], "decoupled_weight_decay": name == "Adam"}, {"params": params[1:]}]

    config = dict(lr=0.02, weight_decay=0.1)
    ours = run_ours(lambda p: getattr(optim, name)(p, **config), groups)
    theirs = run_torch(lambda p: getattr(torch.optim, name)(p, **config), groups)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    held = [group["decoupled_weight_decay"] for group in getattr(optim, name)(groups(make_params())).param_groups]
    assert held == [group["decoupled_weight_decay"]
                    for group in getattr(torch.optim, name)(groups([torch.zeros(1, requires_grad=True)
                                                                    for _ in SHAPES]), **config).param_groups]


@pytest.mark.parametrize("name, default", [("Adam", False), ("AdamW", True)])
def test_a_state_dict_saved_before_decoupled_weight_decay_was_an_option_loads_with_the_classs_default(name, default):
    params = make_params()
    opt = getattr(optim, name)(params, lr=0.01, weight_decay=0.1)
    for p, g in zip(params, gradient_sequence()[0]):
        p.grad = g
    opt.step()
    saved = opt.state_dict()
    assert [group["decoupled_weight_decay"] for group in saved["param_groups"]] == [default]
    older = {"state": saved["state"], "param_groups": [{k: v for k, v in group.items() if k != "decoupled_weight_decay"}
                                                       for group in saved["param_groups"]]}
    other = getattr(optim, name)(params, lr=0.5)
    other.param_groups[0]["decoupled_weight_decay"] = not default
    other.load_state_dict(older)
    assert other.param_groups[0]["decoupled_weight_decay"] is default and other.param_groups[0]["lr"] == 0.01


def test_decoupled_weight_decay_must_be_a_bool_naming_it():
    with pytest.raises(TypeError, match="^decoupled_weight_decay: expected True or False, got 'yes'"):
        optim.Adam(make_params(), decoupled_weight_decay="yes")
    with pytest.raises(TypeError, match="^decoupled_weight_decay: expected True or False, got 1"):
        optim.Adam([{"params": make_params(), "decoupled_weight_decay": 1}])


RMSPROP_CONFIGS = {
    "plain": dict(lr=0.01),
    "momentum": dict(lr=0.01, momentum=0.9),
    "centered": dict(lr=0.01, centered=True),
    "centered_momentum": dict(lr=0.02, alpha=0.9, momentum=0.5, centered=True),
    "weight_decay": dict(lr=0.01, weight_decay=0.1, eps=1e-6),
    "everything": dict(lr=0.005, alpha=0.95, eps=1e-4, weight_decay=0.05, momentum=0.8, centered=True),
}


@pytest.mark.parametrize("config", RMSPROP_CONFIGS.values(), ids=RMSPROP_CONFIGS.keys())
def test_rmsprop_matches_pytorch(config):
    torch = torch_or_skip()
    ours = run_ours(lambda p: optim.RMSprop(p, **config), all_in_one)
    theirs = run_torch(lambda p: torch.optim.RMSprop(p, **config), all_in_one)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


CLASSES = ["SGD", "Adam", "AdamW", "RMSprop"]


@pytest.mark.parametrize("name", CLASSES)
def test_each_optimizers_defaults_are_pytorchs(name):
    """Ported code that leaves an option out trains as it did under torch (SGD's lr was 0.01 here)."""
    torch = torch_or_skip()
    ours = getattr(optim, name)(make_params()).defaults
    theirs = getattr(torch.optim, name)([torch.zeros(1, requires_grad=True)]).defaults
    assert ours == {key: theirs[key] for key in ours}


@pytest.mark.parametrize("name", CLASSES)
def test_each_optimizer_at_its_defaults_steps_as_pytorchs_does(name):
    torch = torch_or_skip()
    ours = run_ours(getattr(optim, name), all_in_one)
    theirs = run_torch(getattr(torch.optim, name), all_in_one)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", CLASSES)
def test_each_optimizer_takes_pytorchs_signature(name):
    """The same arguments, in the same order, positional or keyword-only as torch's, at the same
    defaults: a call written for torch.optim binds here as it does there."""
    torch = torch_or_skip()

    def signature(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls.__init__).parameters.values()]

    assert signature(getattr(optim, name)) == signature(getattr(torch.optim, name))


def test_sgd_takes_pytorchs_positional_arguments_in_its_order():
    torch = torch_or_skip()
    ours = run_ours(lambda p: optim.SGD(p, 0.05, 0.8, 0, 0.01, True), all_in_one)
    theirs = run_torch(lambda p: torch.optim.SGD(p, 0.05, 0.8, 0, 0.01, True), all_in_one)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


# torch's options that change nothing in gpubp, at values torch takes: each optimizer steps as without them.
NO_EFFECT = {
    "SGD": dict(dampening=0.0, maximize=False, foreach=True, differentiable=False, fused=None),
    "Adam": dict(amsgrad=False, foreach=False, maximize=False, capturable=True, differentiable=False, fused=True),
    "AdamW": dict(amsgrad=False, maximize=False, foreach=None, capturable=True, differentiable=False, fused=False),
    "RMSprop": dict(capturable=True, foreach=True, maximize=False, differentiable=False),
}


@pytest.mark.parametrize("name", NO_EFFECT)
def test_pytorchs_performance_flags_and_default_only_options_are_taken_and_change_nothing(name):
    cls, flags = getattr(optim, name), NO_EFFECT[name]
    plain = run_ours(lambda p: cls(p, lr=0.01), all_in_one)
    flagged = run_ours(lambda p: cls(p, lr=0.01, **flags), lambda p: [{"params": p[:1], **flags}, {"params": p[1:]}])
    for a, b in zip(flagged, plain):
        np.testing.assert_array_equal(a, b)
    opt = cls(make_params(), lr=0.01, **flags)
    assert opt.defaults == cls(make_params(), lr=0.01).defaults
    assert not set(flags) & set(opt.param_groups[0])


# torch's options that gpubp does not implement, at a value other than their default.
UNSUPPORTED = [
    ("SGD", "dampening", 0.1, "dampening: 0.1 is not supported"),
    ("SGD", "maximize", True, "maximize: True is not supported"),
    ("Adam", "amsgrad", True, "amsgrad: True is not supported"),
    ("AdamW", "amsgrad", True, "amsgrad: True is not supported"),
    ("RMSprop", "maximize", True, "maximize: True is not supported"),
    ("Adam", "differentiable", True, "differentiable: True is not supported: gpubp has no autograd"),
    ("SGD", "foreach", "yes", "foreach: expected None, True or False, got 'yes'"),
    ("RMSprop", "capturable", None, "capturable: expected True or False, got None"),
]


@pytest.mark.parametrize("name, option, value, message", UNSUPPORTED)
def test_a_pytorch_option_gpubp_does_not_implement_is_refused_at_any_other_value_naming_it(name, option, value,
                                                                                          message):
    cls, params = getattr(optim, name), make_params()
    before = [p.data.copy() for p in params]
    with pytest.raises((ValueError, TypeError), match=f"^{message}"):
        cls(params, **{option: value})
    opt = cls(params[:1])
    with pytest.raises((ValueError, TypeError), match=f"^param group: {message}"):
        opt.add_param_group({"params": params[1:], option: value})
    assert len(opt.param_groups) == 1 and opt.state == {}
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p.data, b)


def test_an_option_pytorchs_class_does_not_take_is_refused_as_torch_refuses_it():
    """torch.optim.AdamW has no decoupled_weight_decay (it is Adam's), SGD no capturable."""
    with pytest.raises(TypeError, match="decoupled_weight_decay"):
        optim.AdamW(make_params(), decoupled_weight_decay=False)
    with pytest.raises(TypeError, match="capturable"):
        optim.SGD(make_params(), capturable=True)
    with pytest.raises(ValueError, match=r"param group: unknown options \['capturable'\]"):
        optim.SGD([{"params": make_params(), "capturable": True}])


def test_fused_and_foreach_both_true_are_refused_as_torch_refuses_them():
    with pytest.raises(ValueError, match="fused: torch refuses fused=True with foreach=True"):
        optim.Adam(make_params(), fused=True, foreach=True)


DEFAULTS_OVERRIDDEN = [
    ("SGD", dict(lr=-5), dict(lr=0.1), "lr: expected a finite number >= 0, got -5"),
    ("SGD", dict(nesterov=True), dict(momentum=0.9), "nesterov: Nesterov momentum needs momentum > 0"),
    ("Adam", dict(betas=(0.9, 1.5)), dict(betas=(0.9, 0.99)), r"betas\[1\]: expected a number in \[0, 1\)"),
    ("RMSprop", dict(eps=0.0), dict(eps=1e-6), "eps: expected a finite number > 0, got 0.0"),
]


@pytest.mark.parametrize("name, defaults, override, message", DEFAULTS_OVERRIDDEN)
def test_a_bad_default_is_refused_even_where_every_group_overrides_it(name, defaults, override, message):
    """It would otherwise pass unseen, and a group added later that uses it be blamed for it."""
    params = make_params()
    with pytest.raises(ValueError, match=f"^{message}"):
        getattr(optim, name)([{"params": params, **override}], **defaults)


def test_rmsprop_first_step_moves_each_element_by_lr_over_sqrt_one_minus_alpha():
    param = Parameter(np.zeros(3))
    param.grad = np.array([2.0, -0.5, 1e3])
    optim.RMSprop([param], lr=0.1, alpha=0.75).step()
    # v = (1 - alpha) g^2, so g / sqrt(v) = sign(g) / sqrt(1 - alpha) = 2 sign(g)
    np.testing.assert_allclose(param.data, [-0.2, 0.2, -0.2], rtol=1e-7)


def test_rmsprop_momentum_turned_on_later_starts_from_a_zero_buffer():
    # As OneCycleLR's cycle_momentum may: the first step with momentum then moves as one without.
    runs = []
    for later in (0.0, 0.9):
        params = make_params()
        opt = optim.RMSprop(params, lr=0.01)
        for step, grads in enumerate(gradient_sequence()[:4]):
            if step == 2:
                opt.param_groups[0]["momentum"] = later
            for p, g in zip(params, grads):
                p.grad = g.copy()
            opt.step()
            runs.append([p.data.copy() for p in params])
    without, switched = runs[:4], runs[4:]
    for a, b in zip(without[2], switched[2]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(without[3][0], switched[3][0])


@pytest.mark.parametrize("option, value, message", [
    ("lr", -0.1, "lr: expected a finite number >= 0"),
    ("alpha", 1.0, r"alpha: expected a number in \[0, 1\)"),
    ("alpha", -0.5, "alpha: expected a finite number >= 0"),
    ("eps", 0.0, "eps: expected a finite number > 0"),
    ("weight_decay", float("nan"), "weight_decay: expected a finite number >= 0"),
    ("momentum", 1.5, r"momentum: expected a number in \[0, 1\)"),
    ("centered", "yes", "centered: expected a bool"),
])
def test_rmsprop_rejects_a_bad_option_naming_it_and_leaves_the_weights(option, value, message):
    params = make_params()
    before = [p.data.copy() for p in params]
    with pytest.raises((ValueError, TypeError), match=message):
        optim.RMSprop(params, **{option: value})
    opt = optim.RMSprop(params)
    with pytest.raises((ValueError, TypeError), match=message):
        opt.add_param_group({"params": [Parameter(np.ones(2))], option: value})
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p.data, b)


GROUP_OPTIONS = {
    "SGD": (dict(lr=0.05, momentum=0.9), {}),
    "Adam": (dict(lr=0.05), {}),
    "RMSprop": (dict(lr=0.05, momentum=0.9), dict(centered=True, momentum=0.0, alpha=0.9)),
}


@pytest.mark.parametrize("name", GROUP_OPTIONS)
def test_param_groups_each_use_their_own_options(name):
    torch = torch_or_skip()
    options, second_group = GROUP_OPTIONS[name]

    def groups(params):
        return [{"params": params[:1], "lr": 0.3},
                {"params": params[1:], "lr": 0.01, "weight_decay": 0.1, **second_group}]

    ours = run_ours(lambda p: getattr(optim, name)(p, **options), groups)
    theirs = run_torch(lambda p: getattr(torch.optim, name)(p, **options), groups)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clips", "leaves"])
def test_clip_grad_norm_matches_pytorch(max_norm):
    torch = torch_or_skip()
    params = make_params()
    grads = gradient_sequence()[0]
    for p, g in zip(params, grads):
        p.grad = g.copy()
    tensors = [torch.tensor(p.data, requires_grad=True) for p in params]
    for t, g in zip(tensors, grads):
        t.grad = torch.tensor(g)
    norm = optim.clip_grad_norm(params, max_norm)
    torch_norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    assert norm == pytest.approx(float(torch_norm), rel=1e-12)
    for p, t in zip(params, tensors):
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-12)


NONFINITE_GRADIENTS = {"nan": [[1.0, np.nan], [2.0]], "inf": [[1.0, np.inf], [2.0]]}


@pytest.mark.parametrize("max_norm", [1.0, float("inf")], ids=["clips", "measures"])
@pytest.mark.parametrize("grads", NONFINITE_GRADIENTS.values(), ids=NONFINITE_GRADIENTS.keys())
def test_clip_grad_norm_of_a_nonfinite_norm_scales_as_pytorchs_does(grads, max_norm):
    """torch scales by clamp(max_norm / (norm + 1e-6), max=1), which keeps a NaN: every gradient
    becomes NaN (an infinite norm: 0 and NaN)."""
    torch = torch_or_skip()
    params = [Parameter(np.zeros(len(g))) for g in grads]
    tensors = [torch.zeros(len(g), dtype=torch.float64, requires_grad=True) for g in grads]
    for p, t, g in zip(params, tensors, grads):
        p.grad, t.grad = np.array(g), torch.tensor(g, dtype=torch.float64)
    with np.errstate(invalid="ignore"):  # inf * 0
        norm = optim.clip_grad_norm(params, max_norm)
    torch_norm = float(torch.nn.utils.clip_grad_norm_(tensors, max_norm))
    assert norm == torch_norm or (math.isnan(norm) and math.isnan(torch_norm))
    for p, t in zip(params, tensors):
        np.testing.assert_array_equal(p.grad, t.grad.numpy())


# ----------------------------------------------------------------------------- without PyTorch


def test_plain_sgd_step_is_param_minus_lr_times_grad():
    param = Parameter(np.array([1.0, -2.0]))
    param.grad = np.array([0.5, 0.25])
    optim.SGD([param], lr=0.1).step()
    np.testing.assert_allclose(param.data, [1.0 - 0.05, -2.0 - 0.025], rtol=1e-15)


def test_adam_first_step_moves_each_element_by_lr_against_its_gradient_sign():
    param = Parameter(np.zeros(3))
    param.grad = np.array([2.0, -0.001, 30.0])
    optim.Adam([param], lr=0.01, eps=1e-12).step()  # m_hat = g, v_hat = g^2
    np.testing.assert_allclose(param.data, [-0.01, 0.01, -0.01], rtol=1e-6)


def test_adamw_decays_the_weights_by_lr_times_weight_decay_when_the_gradient_is_zero():
    param = Parameter(np.array([2.0, -4.0]))
    param.grad = np.zeros(2)
    optim.AdamW([param], lr=0.1, weight_decay=0.5).step()
    np.testing.assert_allclose(param.data, [2.0 * 0.95, -4.0 * 0.95], rtol=1e-12)


def test_clip_grad_norm_scales_to_max_norm_and_returns_the_norm_before():
    param = Parameter(np.zeros(2))
    param.grad = np.array([3.0, 4.0])
    assert optim.clip_grad_norm([param], 1.0) == pytest.approx(5.0)
    assert np.linalg.norm(param.grad) == pytest.approx(1.0, rel=1e-6)


def test_clip_grad_norm_with_an_infinite_max_norm_measures_the_norm_and_scales_nothing():
    param = Parameter(np.zeros(2))
    param.grad = np.array([3.0, 4.0])
    assert optim.clip_grad_norm([param], float("inf")) == 5.0
    np.testing.assert_array_equal(param.grad, [3.0, 4.0])


@pytest.mark.parametrize("max_norm, error", [(-1.0, ValueError), (float("nan"), ValueError), ("1", TypeError),
                                             (True, TypeError)])
def test_clip_grad_norm_refuses_a_bad_max_norm_naming_it(max_norm, error):
    param = Parameter(np.zeros(2))
    param.grad = np.array([3.0, 4.0])
    with pytest.raises(error, match="max_norm"):
        optim.clip_grad_norm([param], max_norm)
    np.testing.assert_array_equal(param.grad, [3.0, 4.0])


def test_clip_grad_norm_takes_one_parameter_as_torch_takes_one_tensor():
    param = Parameter(np.zeros(2))
    param.grad = np.array([3.0, 4.0])
    assert optim.clip_grad_norm(param, 1.0) == pytest.approx(5.0)
    assert np.linalg.norm(param.grad) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("params, message", [(3, "got int"), ([np.zeros(2)], "expected Parameters, got ndarray")])
def test_clip_grad_norm_refuses_what_is_not_parameters_naming_params(params, message):
    with pytest.raises(TypeError, match=f"params: .*{message}"):
        optim.clip_grad_norm(params, 1.0)


def test_clip_grad_norm_ignores_frozen_parameters():
    trainable, frozen = Parameter(np.zeros(2)), Parameter(np.zeros(2), trainable=False)
    trainable.grad, frozen.grad = np.array([3.0, 4.0]), np.array([100.0, 100.0])
    assert optim.clip_grad_norm([trainable, frozen], 10.0) == pytest.approx(5.0)
    np.testing.assert_array_equal(frozen.grad, [100.0, 100.0])


@pytest.mark.parametrize("make", [lambda p: optim.SGD(p, lr=0.1, momentum=0.9), lambda p: optim.Adam(p),
                                  lambda p: optim.AdamW(p), lambda p: optim.RMSprop(p, momentum=0.9, centered=True)],
                         ids=["SGD", "Adam", "AdamW", "RMSprop"])
def test_optimizers_skip_frozen_parameters_and_keep_no_state_for_them(make):
    gb.seed(0)
    model = gb.Sequential([gb.Dense(3, 4, "relu"), gb.Dense(4, 2)], device="cpu")
    model[0].freeze()
    frozen_before = [p.data.copy() for p in model[0].parameters()]
    opt = make(model.parameters())
    for p in model.parameters():  # even a stray gradient on a frozen parameter is ignored
        p.grad = np.ones(p.shape, np.float32)
    opt.step()
    for p, before in zip(model[0].parameters(), frozen_before):
        np.testing.assert_array_equal(p.data, before)
        assert p not in opt.state
    assert all(p in opt.state for p in model[1].parameters())


def test_parameters_without_a_gradient_are_skipped_and_get_no_state():
    with_grad, without = Parameter(np.ones(2)), Parameter(np.ones(2))
    with_grad.grad = np.ones(2)
    opt = optim.Adam([with_grad, without])
    opt.step()
    np.testing.assert_array_equal(without.data, [1.0, 1.0])
    assert list(opt.state) == [with_grad]


def test_adam_state_counts_its_steps():
    param = Parameter(np.ones(2))
    opt = optim.Adam([param])
    for _ in range(3):
        param.grad = np.ones(2)
        opt.step()
    assert opt.state[param]["step"] == 3


@pytest.mark.parametrize("name, options, ours, theirs", [
    ("SGD", dict(momentum=0.9), "velocity", "momentum_buffer"),
    ("Adam", {}, "m", "exp_avg"),
    ("Adam", {}, "v", "exp_avg_sq"),
    ("RMSprop", {}, "square_avg", "square_avg"),
], ids=["SGD-velocity", "Adam-m", "Adam-v", "RMSprop-square_avg"])
def test_state_is_keyed_by_the_parameter_as_pytorchs_is(name, options, ours, theirs):
    """``opt.state[p][...]``, torch's way to read a buffer; a parameter of equal data is another key."""
    torch = torch_or_skip()
    params = make_params()
    tensors = [torch.tensor(p.data, requires_grad=True) for p in params]
    opt, their_opt = getattr(optim, name)(params, **options), getattr(torch.optim, name)(tensors, **options)
    for p, t, g in zip(params, tensors, gradient_sequence()[0]):
        p.grad, t.grad = g.copy(), torch.tensor(g)
    opt.step()
    their_opt.step()
    assert list(opt.state) == params
    for p, t in zip(params, tensors):
        np.testing.assert_allclose(opt.state[p][ours], their_opt.state[t][theirs].numpy(), rtol=1e-12)
    assert Parameter(params[0].data.copy()) not in opt.state


def test_an_optimizer_accepts_a_model_as_its_params():
    model = gb.Sequential([gb.Dense(2, 3), gb.Dense(3, 1)], device="cpu")
    assert optim.SGD(model).parameters() == model.parameters()


def test_optimizer_zero_grad_sets_gradients_to_none():
    param = Parameter(np.ones(2))
    param.grad = np.ones(2)
    opt = optim.SGD([param], lr=0.1)
    opt.zero_grad()
    assert param.grad is None


@pytest.mark.parametrize("owner", ["optimizer", "model"])
def test_zero_grad_without_set_to_none_zeroes_each_gradient_in_place_and_keeps_none(backend, owner):
    """torch's zero_grad(set_to_none=False), an optimizer's and a module's: a NaN gradient too,
    which scaling by 0 would keep."""
    model = gb.Sequential([gb.Dense(3, 2)], backend=backend)
    weight, bias = model.parameters()
    grad = weight.backend.asarray(np.array([[1.0, np.nan], [np.inf, -2.0], [3.0, 4.0]], np.float32))
    weight.grad = grad
    (optim.SGD(model, lr=0.1) if owner == "optimizer" else model).zero_grad(set_to_none=False)
    assert weight.grad is grad and bias.grad is None
    np.testing.assert_array_equal(weight.backend.to_host(grad), np.zeros((3, 2), np.float32))
    model.zero_grad()
    assert weight.grad is None


def test_zero_grad_refuses_a_set_to_none_that_is_not_a_bool_and_leaves_the_gradients():
    param = Parameter(np.ones(2))
    param.grad = np.ones(2)
    with pytest.raises(TypeError, match="set_to_none: expected True or False, got 'no'"):
        optim.SGD([param]).zero_grad(set_to_none="no")
    np.testing.assert_array_equal(param.grad, [1.0, 1.0])


def steps_with_closures(opt, params, as_grad):
    """Step ``opt`` once for each gradient of ``gradient_sequence()``, given by a closure that
    returns the step's number plus a half as its loss; the values ``step`` returned."""
    def closure_of(step, grads):
        def closure():
            for p, g in zip(params, grads):
                p.grad = as_grad(g)
            return step + 0.5
        return closure

    return [opt.step(closure_of(step, grads)) for step, grads in enumerate(gradient_sequence())]


@pytest.mark.parametrize("name", CLASSES)
def test_step_calls_the_closure_first_and_returns_its_loss_as_pytorchs_does(name):
    torch = torch_or_skip()
    params = make_params()
    tensors = [torch.tensor(p.data, requires_grad=True) for p in params]
    our_losses = steps_with_closures(getattr(optim, name)(params, lr=0.01), params, np.copy)
    their_losses = steps_with_closures(getattr(torch.optim, name)(tensors, lr=0.01), tensors, torch.tensor)
    assert our_losses == their_losses == [step + 0.5 for step in range(STEPS)]
    for p, t in zip(params, tensors):
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_step_refuses_a_closure_that_is_not_callable_and_leaves_the_weights():
    param = Parameter(np.ones(2))
    param.grad = np.ones(2)
    opt = optim.Adam([param])
    with pytest.raises(TypeError, match="closure: expected a function that returns the loss, or None, got float"):
        opt.step(0.5)
    np.testing.assert_array_equal(param.data, [1.0, 1.0])
    assert opt.state == {}


def test_a_parameter_in_two_groups_is_rejected():
    param = Parameter(np.ones(2))
    with pytest.raises(ValueError, match="params: a parameter appears in more than one param group"):
        optim.SGD([{"params": [param]}, {"params": [param]}], lr=0.1)


def test_a_parameter_listed_twice_in_one_group_is_rejected_naming_both_places():
    weight, bias = Parameter(np.ones(2), name="w"), Parameter(np.ones(2), name="b")
    message = r"params\[2\]: the parameter 'w' is listed twice in one param group \(also params\[0\]\)"
    with pytest.raises(ValueError, match=message):
        optim.Adam([weight, bias, weight])
    opt = optim.Adam([bias])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [weight, Parameter(np.ones(2)), weight]})
    assert len(opt.param_groups) == 1


def test_sgd_nesterov_must_be_a_bool():
    with pytest.raises(TypeError, match="nesterov: expected a bool, got str 'no'"):
        optim.SGD([Parameter(np.ones(2))], lr=0.1, momentum=0.9, nesterov="no")
    assert optim.SGD([Parameter(np.ones(2))], lr=0.1, momentum=0.9, nesterov=np.bool_(True)).param_groups[0]["nesterov"]


def test_sgd_momentum_is_in_the_closed_unit_interval():
    """1 keeps the velocity undecayed (torch and scikit-learn take it); more than 1 is refused."""
    assert optim.SGD([Parameter(np.ones(2))], lr=0.1, momentum=1.0).param_groups[0]["momentum"] == 1.0
    with pytest.raises(ValueError, match=r"momentum: expected a number in \[0, 1\], got 1.5"):
        optim.SGD([Parameter(np.ones(2))], lr=0.1, momentum=1.5)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_betas_given_as_a_list_are_kept_as_a_tuple_that_a_captured_step_can_hash(name):
    param = Parameter(np.ones(2))
    opt = getattr(optim, name)([param], betas=[0.8, 0.99])
    param.grad = np.ones(2)
    opt.step()
    group = opt.param_groups[0]
    assert group["betas"] == (0.8, 0.99) and isinstance(group["betas"], tuple)
    hash(opt.graph_options(group, opt.state[param]))  # what gpubp.step's graph signature holds


# Every float option of each optimizer, as NumPy float32 scalars, and its bool options as NumPy bools.
NUMPY_OPTIONS = {
    "SGD": dict(lr=np.float32(0.1), momentum=np.float32(0.9), weight_decay=np.float32(0.01), nesterov=np.bool_(True)),
    "Adam": dict(lr=np.float32(0.01), betas=(np.float32(0.8), np.float32(0.99)), eps=np.float32(1e-6),
                 weight_decay=np.float32(0.01)),
    "AdamW": dict(lr=np.float32(0.01), betas=[np.float32(0.8), np.float32(0.99)], eps=np.float32(1e-6),
                  weight_decay=np.float32(0.05)),
    "RMSprop": dict(lr=np.float32(0.01), alpha=np.float32(0.9), eps=np.float32(1e-6), weight_decay=np.float32(0.01),
                    momentum=np.float32(0.5), centered=np.bool_(True)),
}


def python_scalars(value):
    """``value`` as the Python numbers (and tuples of them) that a checkpoint's JSON gives back."""
    return tuple(python_scalars(v) for v in value) if isinstance(value, (tuple, list)) else value.item()


@pytest.mark.parametrize("name", NUMPY_OPTIONS)
def test_numpy_scalar_options_are_kept_as_the_python_numbers_a_checkpoint_restores(name):
    """A float32 lr kept as given would make a schedule's rates float32, where the run resumed from a
    checkpoint (which holds Python floats) computes them in float64, and the two runs would part."""
    options = NUMPY_OPTIONS[name]
    opt = getattr(optim, name)([Parameter(np.ones(2))], **options)
    opt.add_param_group({"params": [Parameter(np.ones(2))], **options})
    expected = {key: python_scalars(value) for key, value in options.items()}
    for group in opt.param_groups:
        kept = {key: group[key] for key in options}
        assert kept == expected
        assert {key: type(value) for key, value in kept.items()} == {key: type(value) for key, value in expected.items()}
        if "betas" in kept:
            assert all(type(beta) is float for beta in kept["betas"])


def test_an_unknown_param_group_option_is_rejected():
    with pytest.raises(ValueError, match=r"param group: unknown options \['betas'\]"):
        optim.SGD([{"params": [Parameter(np.ones(2))], "betas": (0.9, 0.99)}], lr=0.1)


# Keras 3's defaults of each name, as far as gpubp's optimizer has the option (RMSprop's rho is alpha).
KERAS_NAMES = {
    "sgd": (optim.SGD, dict(lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0)),
    "adam": (optim.Adam, dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)),
    "AdamW": (optim.AdamW, dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.004)),
    "rmsprop": (optim.RMSprop, dict(lr=1e-3, alpha=0.9, momentum=0.0, centered=False, weight_decay=0.0)),
}


@pytest.mark.parametrize("name", KERAS_NAMES)
def test_an_optimizer_name_builds_keras_optimizer_of_that_name(name):
    """A name is Keras's convention (compile(optimizer="rmsprop")); eps stays torch's."""
    cls, expected = KERAS_NAMES[name]
    opt = optim.get(name, make_params())
    assert type(opt) is cls
    assert {key: opt.param_groups[0][key] for key in expected} == expected
    assert opt.param_groups[0].get("eps", 1e-8) == 1e-8


@pytest.mark.parametrize("params, got", [
    (Parameter(np.ones(2), name="w"), "Parameter; wrap a single parameter in a list"),
    ({"params": [Parameter(np.ones(2), name="w")]}, "dict; wrap a single param-group dict in a list"),
    (3, "int$"),
], ids=["parameter", "group", "number"])
def test_params_that_are_not_an_iterable_of_them_are_a_type_error_naming_params(params, got):
    with pytest.raises(TypeError, match=r"params: expected an iterable of Parameters or of param-group dicts "
                                        rf"\(or a model\), got {got}"):
        optim.SGD(params, lr=0.1)


def test_a_group_whose_params_are_not_an_iterable_of_them_is_a_type_error_naming_params():
    message = r"^params: a param group's 'params' must be an iterable of Parameters \(or a model\), got int$"
    with pytest.raises(TypeError, match=message):
        optim.SGD([{"params": 3}], lr=0.1)
    opt = optim.SGD([Parameter(np.ones(2))], lr=0.1)
    with pytest.raises(TypeError, match=message):
        opt.add_param_group({"params": 3})
    assert len(opt.param_groups) == 1


def test_a_group_of_one_parameter_takes_it_as_a_list_of_it_as_pytorch_does():
    """torch wraps a tensor given as a group's 'params'; ``params`` itself must still be an iterable."""
    first, second = Parameter(np.ones(2)), Parameter(np.ones(2))
    opt = optim.SGD([{"params": first}], lr=0.1)
    opt.add_param_group({"params": second, "lr": 0.5})
    assert [group["params"] for group in opt.param_groups] == [[first], [second]]
    first.grad = second.grad = np.ones(2)
    opt.step()
    np.testing.assert_allclose([first.data, second.data], [[0.9, 0.9], [0.5, 0.5]])


def test_named_parameters_are_taken_as_torch_2_takes_them():
    """torch.optim.SGD(model.named_parameters()) and groups of named pairs: the same optimizer as
    of the parameters; a pair that is not (str, Parameter) is still refused by position."""
    model = gb.Sequential([gb.Dense(3, 4, "relu"), gb.Dense(4, 2)], device="cpu")
    named = optim.Adam(model.named_parameters(), lr=0.1)
    assert named.param_groups[0]["params"] == model.parameters()
    bottom, top = list(model.named_parameters())[:2], list(model.named_parameters())[2:]
    grouped = optim.SGD([{"params": bottom, "lr": 0.1}, {"params": top}], lr=0.5)
    assert [group["params"] for group in grouped.param_groups] == [model.parameters()[:2], model.parameters()[2:]]
    with pytest.raises(TypeError, match=r"params\[0\]: expected a gpubp Parameter, got tuple"):
        optim.SGD([(0, model.parameters()[0])], lr=0.1)


# ----------------------------------------------------------------------------- gradients that do not fit

# A (4, 2) float32 weight's gradient, and what the error says of it.
BAD_GRADIENTS = {
    "short": (lambda zeros: zeros((4,), np.float32),  # a kernel would read past its end
              r"shape \(4,\), but the parameter has \(4, 2\)"),
    "broadcastable": (lambda zeros: zeros((2,), np.float32), r"shape \(2,\), but the parameter has \(4, 2\)"),
    "transposed": (lambda zeros: zeros((2, 4), np.float32), r"shape \(2, 4\), but the parameter has \(4, 2\)"),
    "other_dtype": (lambda zeros: zeros((4, 2), np.float64),  # a float32 kernel would misread it
                    "dtype float64, but the parameter has float32"),
}


@pytest.mark.parametrize("make", [lambda p: optim.SGD(p, lr=0.1, momentum=0.9), lambda p: optim.Adam(p),
                                  lambda p: optim.RMSprop(p, momentum=0.9, centered=True)],
                         ids=["SGD", "Adam", "RMSprop"])
@pytest.mark.parametrize("bad, got", BAD_GRADIENTS.values(), ids=BAD_GRADIENTS.keys())
def test_a_gradient_not_shaped_and_typed_as_its_parameter_is_refused_before_any_update(backend, make, bad, got):
    gb.seed(0)
    model = gb.Sequential([gb.Dense(3, 4, "relu"), gb.Dense(4, 2)], backend=backend)
    opt = make([{"params": model[0].parameters()}, {"params": model[1].parameters()}])
    for p in model.parameters():
        p.grad = p.backend.zeros(p.shape, p.data.dtype)
    model[1].weight.grad = bad(model[1].backend.zeros)
    before = model.get_weights()
    with pytest.raises(ValueError, match=rf"param_groups\[1\]\['params'\]\[0\] \('weight'\): its grad has {got}$"):
        opt.step()
    for got_weights, want in zip(model.get_weights(), before):  # not even the first group's, checked first
        np.testing.assert_array_equal(got_weights, want)
    assert opt.state == {}


def test_a_gradient_that_is_not_an_array_is_a_type_error_naming_its_parameter():
    param = Parameter(np.ones(3), name="w")
    param.grad = [1.0, 2.0, 3.0]
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] \('w'\): its grad must be an "
                                        "array like the parameter's data, got list"):
        optim.SGD([param], lr=0.1).step()
    np.testing.assert_array_equal(param.data, [1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------- huge gradients

# g * g overflows float32 from g ~ 1.9e19; (1 - beta2) g * g, PyTorch's order, only from 5.8e20 for
# Adam's 1 - beta2 = 0.001 and 1.8e20 for RMSprop's 1 - alpha = 0.01.
HUGE_GRADIENTS = np.array([1e19, 2e19, 1e20, 1.5e20], np.float32)
HUGE_CASES = {
    "adam": lambda be, p, g, m, v: be.adam_update(p, g, m, v, 0.1, 0.9, 0.999, 1e-8, 0.0, 1, False),
    "rmsprop": lambda be, p, g, m, v: be.rmsprop_update(p, g, v, None, None, 0.1, 0.99, 1e-8, 0.0, 0.0, False),
    "rmsprop_momentum": lambda be, p, g, m, v: be.rmsprop_update(p, g, v, None, m, 0.1, 0.99, 1e-8, 0.0, 0.5, False),
}
TORCH_HUGE_CASES = {
    "adam": lambda torch, p: torch.optim.Adam([p], lr=0.1),
    "rmsprop": lambda torch, p: torch.optim.RMSprop([p], lr=0.1),
    "rmsprop_momentum": lambda torch, p: torch.optim.RMSprop([p], lr=0.1, momentum=0.5),
}


@pytest.mark.parametrize("path", ["numpy-compiled", "numpy", "numba"])
@pytest.mark.parametrize("case", HUGE_CASES)
def test_a_huge_gradient_moves_the_weights_as_pytorchs_does(path, case):
    """The second moment is (1 - beta2) g times g: g * g first made it inf, and the step m / inf left
    the weight where it was."""
    torch = torch_or_skip()
    name = path.split("-")[0]
    reason = gb.backends.available()[name]
    if reason:
        pytest.skip(f"backend {name!r} is not available here: {reason}")
    be = gb.backends.get(name)
    p, g, m, v = (be.asarray(a) for a in (np.ones(4, np.float32), HUGE_GRADIENTS, np.zeros(4, np.float32),
                                           np.zeros(4, np.float32)))
    with gb.backends.numpy_backend.compiled_kernels(path != "numpy"):
        HUGE_CASES[case](be, p, g, m, v)
    theirs = torch.ones(4, requires_grad=True)
    theirs.grad = torch.tensor(HUGE_GRADIENTS)
    TORCH_HUGE_CASES[case](torch, theirs).step()
    np.testing.assert_allclose(be.to_host(p), theirs.detach().numpy(), rtol=1e-6, atol=1e-6)  # a step to ~0


def test_a_captured_steps_options_are_hashable_where_a_script_assigned_a_list():
    """torch-style code assigns ``group["betas"] = [0.9, 0.99]``, which eager steps take; the CUDA
    graph path hashes the options into its signature, and raised TypeError there alone."""
    model = gb.Sequential([gb.Dense(3, 2)], device="cpu")
    opt = gb.optim.Adam(model.parameters())
    group = opt.param_groups[0]
    group["betas"] = [0.9, 0.99]
    as_tuple = dict(group, betas=(0.9, 0.99))
    options = opt.graph_options(group, {})
    assert hash(options) == hash(opt.graph_options(as_tuple, {}))
    group["betas"] = [0.9, 0.95]
    assert opt.graph_options(group, {}) != options  # another value, another capture


def test_learning_rate_is_keras_name_for_the_rate_and_setting_it_sets_what_fit_trains_at():
    """Keras code sets model.optimizer.learning_rate; a plain attribute there trained on at the old rate."""
    gb.seed(0)
    model = gb.Sequential([gb.Dense(3, 2)], device="cpu")
    x, y = np.ones((4, 3), np.float32), np.array([0, 1, 0, 1])
    model.fit(x, y, optimizer="sgd", epochs=1, verbose=0)
    assert model.optimizer.learning_rate == model.optimizer.param_groups[0]["lr"] == 0.01
    model.optimizer.learning_rate = 0.0
    before = model.get_weights()
    model.fit(x, y, optimizer=model.optimizer, epochs=1, verbose=0)
    for now, then in zip(model.get_weights(), before):
        np.testing.assert_array_equal(now, then)


def test_learning_rate_refuses_a_bad_rate_and_flattening_discriminative_rates():
    params = make_params()
    opt = optim.Adam([{"params": params[:1], "lr": 1e-4}, {"params": params[1:]}], lr=1e-3)
    assert opt.learning_rate == 1e-3
    with pytest.raises(ValueError, match=r"learning_rate: the param groups have different rates \[0.0001, 0.001\]"):
        opt.learning_rate = 0.1
    with pytest.raises(ValueError, match="learning_rate: expected a finite number >= 0, got -1"):
        optim.SGD(params, lr=0.1).learning_rate = -1
    assert [group["lr"] for group in opt.param_groups] == [1e-4, 1e-3]
