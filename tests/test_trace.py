"""gb.trace on the NumPy backend: one record per kernel launch, under the contract's names.
(The fine-tuning tests cover frozen layers in depth; here, the counting itself.)"""

import numpy as np
import pytest

import gpubp as gb


def model(activations=("relu", "tanh", None)):
    gb.seed(0)
    sizes = [4, 6, 5, 3]
    return gb.Sequential([gb.Dense(a, b, act) for a, b, act in zip(sizes[:-1], sizes[1:], activations)],
                         device="cpu")


X = np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32)
LABELS = np.array([0, 1, 2, 0, 1, 2, 0])


def test_an_empty_trace_counts_zero_for_any_kernel():
    with gb.trace() as t:
        pass
    assert t.total == 0 and t.counts["dense_fwd"] == 0 and t.launches == []


def test_forward_launches_one_fused_kernel_per_layer():
    m = model()
    with gb.trace() as t:
        m.forward(X)
    assert dict(t.counts) == {"dense_fwd": 3}


def test_backward_launches_dw_for_every_layer_and_dx_for_all_but_the_first():
    m = model()
    _, dout = gb.losses.cross_entropy(m.forward(X), LABELS)
    with gb.trace() as t:
        m.backward(dout)
    assert dict(t.counts) == {"dense_dw": 3, "dense_dx": 2}
    assert t.launches == ["dense_dw", "dense_dx", "dense_dw", "dense_dx", "dense_dw"]


def test_asking_for_the_input_gradient_adds_the_first_layers_dx():
    m = model()
    _, dout = gb.losses.cross_entropy(m.forward(X, need_input_grad=True), LABELS)
    with gb.trace() as t:
        m.backward(dout, need_input_grad=True)
    assert dict(t.counts) == {"dense_dw": 3, "dense_dx": 3}


@pytest.mark.parametrize("loss, target, kernel", [
    ("cross_entropy", LABELS, "ce_fwd_bwd"),
    ("mse", np.zeros((7, 3), np.float32), "mse_fwd_bwd"),
    ("huber", np.zeros((7, 3), np.float32), "huber_fwd_bwd"),
    ("mae", np.zeros((7, 3), np.float32), "mae_fwd_bwd"),
    ("binary_cross_entropy", np.zeros((7, 3), np.float32), "bce_fwd_bwd"),
    ("poisson", np.zeros((7, 3), np.float32), "poisson_fwd_bwd"),
])
def test_each_loss_is_one_fused_kernel(loss, target, kernel):
    out = model().forward(X)
    with gb.trace() as t:
        gb.losses.get(loss)(out, target)
    assert dict(t.counts) == {kernel: 1}


@pytest.mark.parametrize("make, kernel", [
    (lambda p: gb.optim.SGD(p, lr=0.1, momentum=0.9), "sgd_update"),
    (lambda p: gb.optim.Adam(p), "adam_update"),
    (lambda p: gb.optim.AdamW(p), "adam_update"),
    (lambda p: gb.optim.RMSprop(p, momentum=0.9, centered=True), "rmsprop_update"),
])
def test_an_optimizer_step_is_one_kernel_per_trainable_parameter(make, kernel):
    m = model()
    m[0].freeze()
    opt = make(m.parameters())
    _, dout = gb.losses.cross_entropy(m.forward(X), LABELS)
    m.backward(dout)
    with gb.trace() as t:
        opt.step()
    assert dict(t.counts) == {kernel: 4}


def test_one_training_step_in_fit_launches_forward_loss_backward_and_update():
    m = model()
    with gb.trace() as t:
        m.fit(X, LABELS, optimizer=gb.optim.Adam(m.parameters()), epochs=1, batch_size=7, verbose=0)
    assert dict(t.counts) == {"dense_fwd": 3, "ce_fwd_bwd": 1, "dense_dw": 3, "dense_dx": 2, "adam_update": 6}


def test_nested_traces_both_count():
    m = model()
    with gb.trace() as outer:
        m.forward(X)
        with gb.trace() as inner:
            m.forward(X)
    assert inner.counts["dense_fwd"] == 3 and outer.counts["dense_fwd"] == 6


def test_a_trace_left_twice_is_refused_and_other_traces_keep_counting():
    m = model()
    with gb.trace() as outer:
        t = gb.trace()
        with t:
            pass
        with pytest.raises(RuntimeError, match=r"trace: this Trace is not open here \(in this thread or task\)"):
            t.__exit__(None, None, None)
        m.forward(X)  # the refused exit closed nothing: the outer trace still counts
    assert outer.counts["dense_fwd"] == 3 and t.total == 0


def test_a_trace_opened_inside_itself_is_refused_and_keeps_counting_once():
    m = model()
    with gb.trace() as t:
        with pytest.raises(RuntimeError, match=r"trace: this Trace is already open here \(in this thread or task\)"):
            with t:
                pass
        m.forward(X)
    assert t.counts["dense_fwd"] == 3
    m.forward(X)
    assert t.total == 3  # closed by its own block: the refused entry left nothing open


def test_a_trace_can_be_opened_again_after_it_closed():
    m = model()
    t = gb.trace()
    for _ in range(2):
        with t:
            m.forward(X)
    assert t.counts["dense_fwd"] == 6


def test_nothing_is_recorded_after_the_trace_closes():
    m = model()
    with gb.trace() as t:
        m.forward(X)
    m.forward(X)
    assert t.total == 3


def test_a_trace_counts_its_own_asyncio_task_and_the_tasks_it_starts_not_another_tasks():
    """The open traces were per thread: a trace in one task counted another task's launches."""
    import asyncio

    async def traced(started, other_ran):
        with gb.trace() as t:
            started.set()
            await other_ran.wait()  # another task runs a forward while this trace is open
            await asyncio.create_task(forward())  # a task started inside counts, as it inherits the trace
        return t

    async def forward():
        model().forward(X)

    async def other(started, other_ran):
        await started.wait()
        await forward()
        other_ran.set()

    async def main():
        started, other_ran = asyncio.Event(), asyncio.Event()
        t, _ = await asyncio.gather(traced(started, other_ran), other(started, other_ran))
        return t

    assert asyncio.run(main()).counts["dense_fwd"] == 3


def test_a_task_started_inside_a_trace_records_nothing_there_after_the_block_ends():
    """The task keeps the context it inherited, which holds the trace, after the block ended."""
    import asyncio

    async def main():
        go_on = asyncio.Event()

        async def later():
            await go_on.wait()
            model().forward(X)

        with gb.trace() as closed:
            task = asyncio.create_task(later())
        with gb.trace() as other:  # a trace open elsewhere: record() does not return at once
            go_on.set()
            await task
        return closed, other

    closed, other = asyncio.run(main())
    assert closed.total == 0 and other.total == 0  # the task's context holds the closed trace alone


def test_a_trace_counts_in_its_own_thread_only():
    import threading

    counted = []

    def run(traced):
        if traced:
            with gb.trace() as t:
                barrier.wait()  # both forwards run while this trace is open
                model().forward(X)
                barrier.wait()
            counted.append(t.counts["dense_fwd"])
        else:
            barrier.wait()
            model().forward(X)
            barrier.wait()

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=run, args=(traced,)) for traced in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counted == [3]


FREEZE_PATTERNS = {
    "none": [],
    "bottom_one": [0],
    "middle": [1],
    "all_but_head": [0, 1],
    "head_only": [2],
}


@pytest.mark.parametrize("need_input_grad", [False, True])
@pytest.mark.parametrize("frozen", FREEZE_PATTERNS.values(), ids=FREEZE_PATTERNS.keys())
def test_backward_launches_exactly_its_backward_plan(frozen, need_input_grad):
    m = model()
    for i in frozen:
        m[i].freeze()
    _, dout = gb.losses.cross_entropy(m.forward(X, need_input_grad=need_input_grad), LABELS)
    with gb.trace() as t:
        m.backward(dout, need_input_grad=need_input_grad)
    planned = [kernel for _, kernels in reversed(m.backward_plan(need_input_grad)) for kernel in kernels]
    assert t.launches == planned


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize("case", ["dropout above", "softmax head"])
def test_a_bias_that_trains_under_a_frozen_weight_launches_its_db_after_the_dz_pass_as_planned(case, compiled):
    """BitFit: db alone follows the pass that forms dz (the mask's or the softmax's), in the
    order backward_plan lists it; the NumPy backend recorded it before that pass."""
    gb.seed(0)
    if case == "dropout above":
        m = gb.Sequential([gb.Dense(4, 6, "relu"), gb.Dropout(0.3), gb.Dense(6, 3)], device="cpu")
        loss, target = gb.losses.cross_entropy, LABELS
    else:
        m = gb.Sequential([gb.Dense(4, 6, "relu"), gb.Dense(6, 3, "softmax")], device="cpu")
        loss, target = gb.losses.mse, np.eye(3, dtype=np.float32)[LABELS]
    for layer in m:
        if isinstance(layer, gb.Dense):
            layer.weight.trainable = False
    with gb.backends.numpy_backend.compiled_kernels(compiled):
        _, dout = loss(m.forward(X, training=True), target)
        with gb.trace() as t:
            m.backward(dout)
    planned = [kernel for _, kernels in reversed(m.backward_plan()) for kernel in kernels]
    assert "dense_db" in planned and t.launches == planned


def test_backward_with_every_layer_frozen_launches_nothing_and_warns():
    m = model()
    m.freeze()
    _, dout = gb.losses.cross_entropy(m.forward(X), LABELS)
    with gb.trace() as t, pytest.warns(UserWarning, match="every layer is frozen, so no kernel is launched"):
        assert m.backward(dout) is None
    assert t.total == 0
    assert all(kernels == [] for _, kernels in m.backward_plan())
