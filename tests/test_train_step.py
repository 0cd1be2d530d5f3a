"""TrainStep: one batch of fit as a callable, and its CUDA-graph option's checks.

The capture and replay themselves run on the CuPy backend: on the CPU kernel harness in
``test_kernels_on_cpu.py`` (bitwise against eager steps), and on a real GPU below.
"""

import numpy as np
import pytest

import gpubp as gb
from gpubp import losses
from test_bad_input import assert_arrays_equal, assert_weights_equal


def small_model(backend="numpy", seed=3, head=None):
    gb.seed(seed)
    return gb.Sequential([gb.Dense(5, 12, "relu"), gb.Dense(12, 3, head)], backend=backend)


def batch(rng, n=16):
    return rng.standard_normal((n, 5)).astype(np.float32), rng.integers(0, 3, n)


def test_a_step_is_forward_loss_backward_and_update(rng, backend):
    x, y = batch(rng)
    stepped, by_hand = small_model(backend), small_model(backend)
    step = stepped.train_step("cross_entropy", gb.optim.SGD(stepped.parameters(), lr=0.1, momentum=0.9))
    opt = gb.optim.SGD(by_hand.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        value = step(x, y)
        expected, dout = losses.cross_entropy(by_hand.forward(x), y)
        by_hand.backward(dout)
        opt.step()
        assert value == expected
    assert_weights_equal(by_hand.get_weights(), stepped)


def test_fit_and_a_step_share_the_models_named_optimizer(rng):
    x, y = batch(rng)
    model = small_model()
    model.fit(x, y, optimizer="adam", epochs=1, batch_size=16, verbose=0)
    step = model.train_step(optimizer="adam")
    step(x, y)
    assert step.optimizer is model._named_optimizers["adam"][1]
    assert {s["step"] for s in step.optimizer.state.values()} == {2}


def test_a_step_of_the_compiled_optimizer_trains_at_the_compiled_rate_as_a_batch_of_fit_does(rng):
    x, y = batch(rng)
    fitted, stepped = small_model(), small_model()
    for model in (fitted, stepped):
        model.compile(optimizer="sgd", learning_rate=0.5)
    fitted.fit(x, y, epochs=1, batch_size=len(x), shuffle=False, verbose=0)
    stepped.train_step()(x, y)
    assert_weights_equal(fitted.get_weights(), stepped)


def test_a_step_at_the_compiled_rate_puts_the_optimizers_own_rate_back_as_fit_does(rng):
    model = small_model()
    model.compile(optimizer="sgd", learning_rate=0.5)
    step = model.train_step()
    own = step.optimizer.param_groups[0]["lr"]
    step(*batch(rng))
    assert step.optimizer.param_groups[0]["lr"] == own != 0.5


@pytest.mark.parametrize("given", ["adam", "an instance"])
def test_compile_sets_model_optimizer_to_the_one_fit_and_a_step_then_train_with(rng, given):
    """As Keras's compile: ``model.optimizer`` is the compiled optimizer before any fit, the very
    one fit and train_step() then update (its state kept), and a name is built afresh by each compile."""
    x, y = batch(rng)
    model = small_model()
    optimizer = gb.optim.Adam(model.parameters(), lr=0.01) if given == "an instance" else given
    model.compile(optimizer=optimizer)
    compiled = model.optimizer
    assert isinstance(compiled, gb.optim.Adam) and (compiled is optimizer or given == "adam")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert model.optimizer is compiled and {s["step"] for s in compiled.state.values()} == {2}
    model.train_step()(x, y)
    assert model.optimizer is compiled and {s["step"] for s in compiled.state.values()} == {3}
    model.compile(optimizer=optimizer)
    assert (model.optimizer is compiled) == (given == "an instance")


def test_a_step_given_an_optimizer_trains_at_its_rate_not_the_compiled_one(rng):
    x, y = batch(rng)
    compiled, plain = small_model(), small_model()
    compiled.compile(optimizer="sgd", learning_rate=0.5)
    compiled.train_step(optimizer=gb.optim.SGD(compiled.parameters(), lr=0.1))(x, y)
    plain.train_step(optimizer=gb.optim.SGD(plain.parameters(), lr=0.1))(x, y)
    assert_weights_equal(plain.get_weights(), compiled)


@pytest.mark.parametrize("bad, name", [
    (lambda x, y: (x[:, :4], y), "x"),
    (lambda x, y: (x, y[:-1]), "y"),
    (lambda x, y: (x, y + 3), "y"),
    (lambda x, y: (np.where(x > 1, np.nan, x), y), "x"),
])
def test_a_step_on_bad_input_names_it_and_changes_no_weight(rng, bad, name):
    model = small_model()
    step = model.train_step()
    before = model.get_weights()
    with pytest.raises((ValueError, TypeError), match=rf"^{name}\b"):
        step(*bad(*batch(rng)))
    assert_weights_equal(before, model)


def test_a_step_refuses_a_sample_weight_past_the_models_float_range_by_name(rng):
    """As fit does: weighed in float32, 1e39 is inf, and the step's loss with it."""
    model = small_model()
    step = model.train_step()
    x, y = batch(rng)
    weights = np.ones(len(x))
    weights[5] = 1e39
    before = model.get_weights()
    with pytest.raises(ValueError, match=r"^sample_weight: 1e\+39 at sample 5"):
        step(x, y, sample_weight=weights)
    assert_weights_equal(before, model)


def test_a_step_whose_loss_overflows_raises_and_changes_no_weight(rng):
    model = small_model()
    step = model.train_step("mse", "sgd")
    before = model.get_weights()
    with np.errstate(over="ignore"), pytest.raises(FloatingPointError, match="not updated"):
        step(batch(rng)[0], np.full((16, 3), 3e38, np.float32))  # finite targets whose squared error overflows
    assert_weights_equal(before, model)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_cuda_graph_takes_true_false_or_auto(value):
    with pytest.raises(ValueError, match="cuda_graph: expected True, False or 'auto'"):
        small_model().train_step(cuda_graph=value)


def test_cuda_graph_takes_numpys_bools_as_bools():
    assert small_model().train_step(cuda_graph=np.False_).cuda_graph is False
    with pytest.raises(ValueError, match="cuda_graph=True: the 'numpy' backend has no CUDA graphs"):
        small_model().train_step(cuda_graph=np.True_)


def test_clip_grad_norm_must_not_be_negative():
    with pytest.raises(ValueError, match="clip_grad_norm"):
        small_model().train_step(clip_grad_norm=-1.0)


def test_clip_grad_norm_clips_the_parameters_the_optimizer_updates_and_no_others(rng):
    """As torch's clip_grad_norm_(the optimizer's parameters) before opt.step(): the parameters
    the optimizer leaves alone neither count in the norm nor are scaled."""
    x, y = batch(rng)
    stepped, by_hand = small_model(), small_model()
    step = stepped.train_step("cross_entropy", gb.optim.SGD(stepped[1].parameters(), lr=0.1), clip_grad_norm=0.05)
    opt = gb.optim.SGD(by_hand[1].parameters(), lr=0.1)
    step(x, y)
    _, dout = losses.cross_entropy(by_hand.forward(x), y)
    by_hand.backward(dout)
    unclipped = [p.grad.copy() for p in by_hand[0].parameters()]
    norm = gb.optim.clip_grad_norm(opt.parameters(), 0.05)
    assert norm > 0.05  # it clips
    opt.step()
    assert_weights_equal(by_hand.get_weights(), stepped)
    assert_arrays_equal([param.grad for param in stepped[0].parameters()], unclipped)


def test_a_step_with_adam_betas_given_as_a_list_can_take_the_graph_path(rng, monkeypatch):
    """The graph path hashes the step's signature, which holds the optimizer's options: a list of
    betas made it unhashable, after the first (eager) update had changed the weights. A stand-in
    ``capture`` lets the numpy backend take that path as far as its first, eager, call."""
    from gpubp.backends import numpy_backend

    monkeypatch.setattr(numpy_backend, "capture", lambda fn: None, raising=False)
    model = small_model()
    step = model.train_step("cross_entropy", gb.optim.Adam(model.parameters(), betas=[0.9, 0.999]),
                            cuda_graph="auto")
    assert step.why_not_graphed() is None
    step(*batch(rng))
    assert not step.graphed


def test_a_backend_without_graphs_refuses_cuda_graph_true_and_auto_runs_eagerly(rng):
    model = small_model()
    with pytest.raises(ValueError, match="cuda_graph=True: the 'numpy' backend has no CUDA graphs"):
        model.train_step(cuda_graph=True)
    step = model.train_step(cuda_graph="auto")
    assert "no CUDA graphs" in step.why_not_graphed()
    step(*batch(rng))
    assert not step.graphed and step.launches_per_step is None


def test_fit_refuses_cuda_graph_where_it_cannot_before_any_weight_changes(rng):
    model = small_model()
    before = model.get_weights()
    with pytest.raises(ValueError, match="cuda_graph=True: the 'numpy' backend"):
        model.fit(*batch(rng), epochs=1, verbose=0, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph: a distributed step"):
        model.fit(*batch(rng), epochs=1, verbose=0, cuda_graph=True, distributed=True)
    assert_weights_equal(before, model)


# ----------------------------------------------------------------------------- on a real GPU


@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["cross_entropy", losses.CrossEntropy(0.1)], ids=["one-hot", "label-smoothing"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per_layer"])
def test_fit_replaying_cuda_graphs_on_the_gpu_gives_the_eager_fit_bitwise(rng, fused, loss):
    x = rng.standard_normal((300, 5)).astype(np.float32)  # 2 batches of 128 and one of 44
    y = rng.integers(0, 3, 300)
    runs = {}
    for cuda_graph in (False, True):
        gb.seed(3)
        model = gb.Sequential([gb.Dense(5, 12, "gelu"), gb.Dense(12, 3, "softmax")], backend="cupy", fused=fused)
        history = model.fit(x, y, loss=loss, optimizer="adam", epochs=4, batch_size=128, verbose=0,
                            cuda_graph=cuda_graph)
        runs[cuda_graph] = history.history["loss"], model.get_weights()
    assert runs[True][0] == runs[False][0]
    assert_arrays_equal(runs[True][1], runs[False][1])


@pytest.mark.gpu
def test_a_replayed_step_on_the_gpu_launches_one_graph_for_the_whole_step(rng):
    model = small_model("cupy")
    step = model.train_step(optimizer="adam", cuda_graph=True)
    x, y = batch(rng, 64)
    with gb.trace() as eager:
        step(x, y)
    step(x, y)
    assert step.graphed and step.launches_per_step == len(eager.launches)
