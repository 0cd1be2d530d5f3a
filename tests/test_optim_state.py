"""Optimizer state_dict / load_state_dict: PyTorch's layout, exact round trips, any device, clear errors."""

import copy
import pickle

import numpy as np
import pytest

import gpubp as gb
from gpubp import backends, optim
from gpubp.layers import Parameter

SHAPES = [(3, 4), (4,), (4, 2), (2,)]

MAKERS = {
    "sgd": lambda groups: optim.SGD(groups, lr=0.1),
    "sgd_momentum": lambda groups: optim.SGD(groups, lr=0.1, momentum=0.9),
    "sgd_nesterov": lambda groups: optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda groups: optim.Adam(groups, lr=0.01, weight_decay=0.1),
    "adamw": lambda groups: optim.AdamW(groups, lr=0.01),
    "rmsprop": lambda groups: optim.RMSprop(groups, lr=0.01),
    "rmsprop_centered_momentum": lambda groups: optim.RMSprop(groups, lr=0.01, momentum=0.9, centered=True,
                                                              weight_decay=0.01),
}


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return [Parameter(rng.normal(size=shape).astype(np.float32), name=f"p{i}") for i, shape in enumerate(SHAPES)]


def two_groups(params):
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.05}]


def steps(opt, params, seed, count=3):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        for p in params:
            p.grad = rng.normal(size=p.shape).astype(np.float32)
        opt.step()


def snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def assert_same_state(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert a["state"][key].keys() == b["state"][key].keys()
        for name, value in a["state"][key].items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(value, b["state"][key][name])
            else:
                assert value == b["state"][key][name]


# ----------------------------------------------------------------------------- layout


def test_state_dict_numbers_parameters_across_groups_as_pytorch_does():
    params = make_params()
    opt = optim.Adam(two_groups(params))
    steps(opt, params, seed=1)
    sd = opt.state_dict()
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
    assert [g["lr"] for g in sd["param_groups"]] == [1e-3, 0.05]
    assert sorted(sd["state"]) == [0, 1, 2, 3]
    assert sd["state"][2]["step"] == 3 and sd["state"][2]["m"].shape == SHAPES[2]


def test_the_layout_matches_pytorchs_numbering():
    torch = pytest.importorskip("torch", reason="PyTorch is the oracle here: pip install 'gpubp[torch]'")
    ours, theirs = make_params(), [torch.zeros(s, requires_grad=True) for s in SHAPES]
    opt_ours, opt_theirs = optim.Adam(two_groups(ours)), torch.optim.Adam(two_groups(theirs))
    steps(opt_ours, ours, seed=1, count=1)
    for p in theirs:
        p.grad = torch.ones(p.shape)
    opt_theirs.step()
    sd_ours, sd_theirs = opt_ours.state_dict(), opt_theirs.state_dict()
    assert [g["params"] for g in sd_ours["param_groups"]] == [g["params"] for g in sd_theirs["param_groups"]]
    assert sorted(sd_ours["state"]) == sorted(sd_theirs["state"])


def test_only_parameters_that_stepped_have_state():
    params = make_params()
    opt = optim.Adam(params)
    params[1].grad = np.ones(SHAPES[1], np.float32)
    opt.step()
    assert list(opt.state_dict()["state"]) == [1]


def test_state_dict_arrays_are_numpy_copies_unaffected_by_later_steps():
    params = make_params()
    opt = optim.SGD(params, lr=0.1, momentum=0.9)
    steps(opt, params, seed=1, count=1)
    sd = opt.state_dict()
    before = sd["state"][0]["velocity"].copy()
    steps(opt, params, seed=2, count=1)
    assert type(sd["state"][0]["velocity"]) is np.ndarray
    np.testing.assert_array_equal(sd["state"][0]["velocity"], before)


def test_a_loaded_state_dict_is_unaffected_by_later_steps():
    params = make_params()
    opt = optim.Adam(params, lr=0.01)
    steps(opt, params, seed=1, count=1)
    sd = opt.state_dict()
    before = copy.deepcopy(sd)
    opt.load_state_dict(sd)
    steps(opt, params, seed=2, count=2)
    assert_same_state(sd, before)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
def test_a_loaded_state_continues_bit_identically(make):
    params, twin = make_params(), make_params()
    opt = make(two_groups(params))
    steps(opt, params, seed=1)
    for p, q in zip(params, twin):
        q.data = p.data.copy()
    resumed = make(two_groups(twin))
    resumed.load_state_dict(opt.state_dict())
    steps(opt, params, seed=2)
    steps(resumed, twin, seed=2)
    for p, q in zip(params, twin):
        np.testing.assert_array_equal(p.data, q.data)


def test_load_state_dict_takes_the_options_and_keeps_its_own_parameters():
    params, others = make_params(), make_params(seed=5)
    opt = optim.SGD(params, lr=0.1, momentum=0.9)
    opt.param_groups[0]["lr"] = 0.003  # as a schedule would
    target = optim.SGD(others, lr=0.5, momentum=0.5)
    target.load_state_dict(opt.state_dict())
    assert target.param_groups[0]["lr"] == 0.003 and target.param_groups[0]["momentum"] == 0.9
    assert target.param_groups[0]["params"] == others


def test_numpy_scalar_options_of_a_state_dict_load_as_python_numbers():
    """As the optimizer keeps options it is given: a float32 rate would make a schedule's rates
    float32 where a run resumed from a checkpoint (Python floats) computes them in float64."""
    opt = optim.Adam(two_groups(make_params()), lr=0.01, weight_decay=0.1)
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        for key in ("lr", "eps", "weight_decay"):
            group[key] = np.float32(group[key])
        group["betas"] = tuple(np.float32(beta) for beta in group["betas"])
    target = optim.Adam(two_groups(make_params(seed=5)))
    target.load_state_dict(sd)
    for saved, group in zip(sd["param_groups"], target.param_groups):
        for key in ("lr", "eps", "weight_decay"):
            assert type(group[key]) is float and group[key] == saved[key].item()
        assert group["betas"] == tuple(beta.item() for beta in saved["betas"])
        assert all(type(beta) is float for beta in group["betas"])


def test_a_state_saved_on_one_backend_loads_on_another_and_back(backend):
    gb.seed(0)
    model = gb.Sequential([gb.Dense(5, 7, "relu"), gb.Dense(7, 3)], backend=backend)
    opt = optim.Adam(model.parameters(), lr=0.01)
    x, y = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32), np.arange(16) % 3
    model.fit(x, y, optimizer=opt, epochs=1, batch_size=8, verbose=0)
    saved = opt.state_dict()
    assert all(type(v) is np.ndarray for entry in saved["state"].values() for k, v in entry.items() if k != "step")
    on_cpu = gb.Sequential([gb.Dense(5, 7, "relu"), gb.Dense(7, 3)], device="cpu")
    cpu_opt = optim.Adam(on_cpu.parameters())
    cpu_opt.load_state_dict(saved)
    back = optim.Adam(model.parameters())
    back.load_state_dict(cpu_opt.state_dict())
    assert all(backends.get(model.backend_name).is_array(back.state[p]["m"]) for p in model.parameters())
    assert_same_state(back.state_dict(), saved)


def test_reloading_its_own_state_moves_it_with_a_model_that_changed_device(backend):
    gb.seed(0)
    model = gb.Sequential([gb.Dense(5, 7, "relu"), gb.Dense(7, 3)], backend=backend)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32), np.arange(8) % 3
    model.fit(x, y, optimizer=opt, epochs=1, batch_size=8, verbose=0)
    saved = opt.state_dict()
    model.to("cpu")
    opt.load_state_dict(opt.state_dict())
    assert all(type(opt.state[p]["velocity"]) is np.ndarray for p in model.parameters())
    assert_same_state(opt.state_dict(), saved)


# ----------------------------------------------------------------------------- copies

CLONES = {"deepcopy": copy.deepcopy, "pickle": lambda obj: pickle.loads(pickle.dumps(obj))}


@pytest.mark.parametrize("clone", CLONES.values(), ids=CLONES.keys())
@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
def test_a_copied_optimizer_steps_its_own_parameters_on_from_the_originals_state(make, clone):
    params = make_params()
    opt = make(two_groups(params))
    steps(opt, params, seed=1)
    copied = clone(opt)
    twin = copied.parameters()
    assert all(p is not q for p, q in zip(params, twin))
    steps(opt, params, seed=2)
    steps(copied, twin, seed=2)
    for p, q in zip(params, twin):
        np.testing.assert_array_equal(p.data, q.data)


def trained_with_adam():
    """A small model, the Adam that trained it one epoch (its state made for every parameter) and
    the data, (x, y)."""
    gb.seed(0)
    model = gb.Sequential([gb.Dense(5, 7, "relu"), gb.Dense(7, 3)], device="cpu")
    opt = optim.Adam(model.parameters(), lr=0.01)
    x, y = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32), np.arange(16) % 3
    model.fit(x, y, optimizer=opt, epochs=1, batch_size=8, shuffle=False, verbose=0)
    return model, opt, (x, y)


@pytest.mark.parametrize("clone", CLONES.values(), ids=CLONES.keys())
def test_a_copied_optimizers_state_is_keyed_by_its_own_parameters(clone):
    """``copied.state[p]`` for the copy's (and a model copied with it) parameters, as before the copy."""
    model, opt, _ = trained_with_adam()
    copied_model, copied_opt = clone((model, opt))
    assert list(copied_opt.state) == copied_model.parameters()
    for p, q in zip(model.parameters(), copied_model.parameters()):
        assert copied_opt.state[q] is not opt.state[p]
        np.testing.assert_array_equal(copied_opt.state[q]["m"], opt.state[p]["m"])


def test_a_loaded_state_is_keyed_by_the_optimizers_own_parameters():
    params, others = make_params(), make_params(seed=5)
    opt = optim.Adam(two_groups(params))
    steps(opt, params, seed=1)
    target = optim.Adam(two_groups(others))
    target.load_state_dict(opt.state_dict())
    assert list(target.state) == others
    for p, q in zip(params, others):
        np.testing.assert_array_equal(target.state[q]["v"], opt.state[p]["v"])


@pytest.mark.parametrize("clone", CLONES.values(), ids=CLONES.keys())
def test_a_model_and_its_optimizer_copied_together_train_on_as_after_a_state_dict_round_trip(clone):
    model, opt, (x, y) = trained_with_adam()
    copied_model, copied_opt = clone((model, opt))
    assert all(p is q for p, q in zip(copied_opt.parameters(), copied_model.parameters()))
    reference = copy.deepcopy(model)
    reference_opt = optim.Adam(reference.parameters(), lr=0.01)
    reference_opt.load_state_dict(opt.state_dict())
    for m, o in ((copied_model, copied_opt), (reference, reference_opt)):
        m.fit(x, y, optimizer=o, epochs=1, batch_size=8, shuffle=False, verbose=0)
    for a, b in zip(copied_model.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- errors leave the optimizer as it was


def loaded_adam():
    params = make_params()
    opt = optim.Adam(two_groups(params))
    steps(opt, params, seed=1)
    return opt


def spoil_group_count(sd):
    sd["param_groups"] = sd["param_groups"][:1]


def spoil_group_size(sd):
    sd["param_groups"][1]["params"] = [2]


def spoil_shape(sd):
    sd["state"][0]["m"] = np.zeros((4, 3), np.float32)


def spoil_finite(sd):
    sd["state"][1]["v"][0] = np.nan


def spoil_entries(sd):
    sd["state"][0] = {"velocity": np.zeros(SHAPES[0], np.float32)}


def spoil_options(sd):
    sd["param_groups"][0]["momentum"] = 0.9


def spoil_value(sd):
    sd["param_groups"][1]["lr"] = -1.0


def spoil_betas(sd):
    sd["param_groups"][0]["betas"] = [0.9, 1.0]


def spoil_step(sd):
    sd["state"][3]["step"] = -2


def spoil_stray_key(sd):
    sd["state"][7] = sd["state"][0]


def spoil_state_list(sd):
    sd["state"] = [sd["state"][0]]


def spoil_state_none(sd):
    sd["state"] = None


def spoil_groups_dict(sd):
    sd["param_groups"] = {"a": 1, "b": 2}


SPOILERS = {
    spoil_group_count: r"state_dict: 1 param groups, but the optimizer has 2",
    spoil_group_size: r"state_dict: param group 1 holds 1 parameters, but the optimizer's holds 2",
    spoil_shape: r"state_dict: state\[0\]\['m'\] has shape \(4, 3\), but the parameter 'p0' has \(3, 4\)",
    spoil_finite: r"state_dict: state\[1\]\['v'\] contains NaN or inf",
    spoil_entries: r"state_dict: state\[0\] has the entries \['velocity'\], but Adam keeps \['m', 'step', 'v'\]",
    spoil_options: r"state_dict: param group 0 has the options .*'momentum'.*, but Adam takes",
    spoil_value: r"^state_dict: param group 1's lr: expected a finite number >= 0, got -1.0$",
    spoil_betas: r"^state_dict: param group 0's betas\[1\]: expected a number in \[0, 1\), got 1.0$",
    spoil_step: r"state_dict: state\[3\]\['step'\] must be an int >= 0, got -2",
    spoil_stray_key: r"state_dict: state for parameter 7, which no param group lists",
    spoil_state_list: r"state_dict: 'state' must be a dict of parameter index -> state, got list",
    spoil_state_none: r"state_dict: 'state' must be a dict of parameter index -> state, got NoneType",
    spoil_groups_dict: r"state_dict: 'param_groups' must be a list of dicts, got dict",
}


@pytest.mark.parametrize("spoil, message", SPOILERS.items(), ids=[f.__name__ for f in SPOILERS])
def test_a_bad_state_dict_is_a_value_error_and_changes_nothing(spoil, message):
    opt = loaded_adam()
    before = snapshot(opt)
    sd = snapshot(opt)
    spoil(sd)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    assert_same_state(opt.state_dict(), before)


def test_a_bad_option_type_in_a_state_dict_is_a_type_error_naming_its_group_and_changes_nothing():
    params = make_params()
    opt = optim.SGD(two_groups(params), lr=0.1, momentum=0.9)
    steps(opt, params, seed=1)
    before = snapshot(opt)
    sd = snapshot(opt)
    sd["param_groups"][1]["nesterov"] = "yes"
    with pytest.raises(TypeError, match=r"^state_dict: param group 1's nesterov: expected a bool, got str 'yes'$"):
        opt.load_state_dict(sd)
    assert_same_state(opt.state_dict(), before)


def test_a_state_dict_that_is_not_a_dict_is_rejected():
    with pytest.raises(ValueError, match="state_dict: expected a dict with the keys 'state' and 'param_groups'"):
        loaded_adam().load_state_dict([1, 2])
