"""The Numba-CUDA backend matches the NumPy reference, kernel by kernel.

With no GPU, tests/conftest.py turns on Numba's CUDA simulator, so these kernels run for
real with every thread in Python: shapes stay tiny and are chosen not to be multiples of
the 128 x 128 x 8 tile. Agreement is max|numba - numpy| <= 1e-5 * max|numpy| in float32.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import gpubp as gb
from gpubp import backends, philox
from gpubp.activations import ACTIVATIONS, NAMES, NEEDS_Z
from gpubp.backends import numpy_backend as ref
from gpubp.trace import trace
from test_cupy_backend import (assert_grads_equal, check_activations_at_special_values,
                               check_an_off_relu_unit_passes_no_gradient_even_an_infinite_one,
                               check_cross_entropy_of_a_row_with_an_infinite_logit,
                               check_cross_entropy_of_a_label_outside_the_classes,
                               check_softmax_and_cross_entropy_of_a_row_with_a_nan_logit,
                               check_dx_applies_the_activation_below, check_no_weight_decay_keeps_an_infinite_weight,
                               folded_step)
from test_gpu_check_scripts import H200_SMS, benchmark_layers, load

try:
    nb = backends.get("numba")
except RuntimeError as exc:
    pytest.skip(str(exc), allow_module_level=True)

RTOL = 1e-5

# (batch, in, out), each inside one 128 x 128 tile but ragged against it and the 8-deep K slice.
ODD_SHAPES = [(19, 13, 7), (3, 33, 17), (1, 1, 1), (37, 29, 23)]
# (133, 20, 9): forward and dX span two row tiles; dW (one tile, 133 rows) splits the batch
# four ways on the simulator's SIMULATED_SMS = 2, so the split-K finish runs.
# (3, 20, 130): forward and dW have two column tiles and one row tile, so the column tiles go
# on grid.x; the stored z and db span both.
MULTI_TILE_SHAPES = [(133, 20, 9), (3, 20, 130)]
# Every activation on one shape (softmax: its row kernels around the identity ones); every
# shape with gelu, the one that also stores z.
DENSE_CASES = [(act, ODD_SHAPES[0]) for act in NAMES] + [
    ("gelu", shape) for shape in ODD_SHAPES[1:] + MULTI_TILE_SHAPES
]
DENSE_IDS = [f"{act}-{'x'.join(map(str, shape))}" for act, shape in DENSE_CASES]


def host(a) -> np.ndarray:
    return nb.to_host(a)


def assert_matches(actual, expected, rtol=RTOL):
    """max|actual - expected| <= rtol * max|expected|; ``actual`` on the device or the host."""
    actual = host(actual) if nb.is_array(actual) else actual
    assert actual.shape == expected.shape
    assert actual.dtype == np.float32
    scale = max(float(np.abs(expected).max()), np.finfo(np.float32).tiny)
    err = float(np.abs(actual - expected).max()) / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol:g}"


def randn(rng, *shape) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def dense_inputs(rng, batch, fan_in, fan_out):
    return randn(rng, batch, fan_in), randn(rng, fan_in, fan_out), randn(rng, fan_out)


def to_device(*arrays):
    return [nb.asarray(a) for a in arrays]


def y_and_z(act, y, z):
    """What dense_backward reads: z for gelu/gelu_tanh, y for the others (the other is None)."""
    return (None, z) if act in NEEDS_Z else (y, None)


# ----------------------------------------------------------------------------- dense layer


@pytest.mark.numba_gpu  # also on the GPU, in gpu_check.sh first-contact
@pytest.mark.parametrize("act, shape", DENSE_CASES, ids=DENSE_IDS)
def test_dense_forward_matches_numpy(rng, act, shape):
    x, w, b = dense_inputs(rng, *shape)
    y_ref, z_ref = ref.dense_forward(x, w, b, act)
    with trace() as t:
        y, z = nb.dense_forward(*to_device(x, w, b), act)
    assert t.launches == ["dense_fwd"] + (["softmax_fwd"] if act == "softmax" else [])
    assert_matches(y, y_ref)
    if act in NEEDS_Z:
        assert_matches(z, z_ref)
    else:
        assert z is None


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_dense_forward_with_a_mask_matches_numpy_for_every_activation(rng, act):
    # One masked kernel serves every activation (its id passed at launch): each branch of its
    # epilogue, on a shape ragged against the tile and the mask's runs of 4 columns.
    x, w, b = dense_inputs(rng, *MULTI_TILE_SHAPES[0])
    key, constants = np.array([0x1234, 0xBEEF], np.uint32), philox.mask_constants(0.3)
    y_ref, z_ref = ref.dense_forward(x, w, b, act, dropout=philox.Mask(key, *constants, 5))
    with trace() as t:
        y, z = nb.dense_forward(*to_device(x, w, b), act, dropout=philox.Mask(nb.asarray(key), *constants, 5))
    assert t.launches == ["dense_fwd"]
    assert_matches(y, y_ref)
    if act in NEEDS_Z:
        assert_matches(z, z_ref)
    else:
        assert z is None


@pytest.mark.numba_gpu  # also on the GPU, in gpu_check.sh first-contact
@pytest.mark.parametrize("act, shape", DENSE_CASES, ids=DENSE_IDS)
def test_dense_backward_matches_numpy(rng, act, shape):
    x, w, b = dense_inputs(rng, *shape)
    dy = randn(rng, shape[0], shape[2])
    y_ref, z_ref = ref.dense_forward(x, w, b, act)
    dx_ref, dw_ref, db_ref = ref.dense_backward(dy, x, w, *y_and_z(act, y_ref, z_ref), act, True, True)
    dy_dev, x_dev, w_dev, y_dev = to_device(dy, x, w, y_ref)
    z_dev = nb.asarray(z_ref) if act in NEEDS_Z else None
    with trace() as t:
        dx, dw, db = nb.dense_backward(dy_dev, x_dev, w_dev, *y_and_z(act, y_dev, z_dev), act, True, True)
    assert t.launches == nb.backward_kernels(act, True, True)
    assert_matches(dx, dx_ref)
    assert_matches(dw, dw_ref)
    assert_matches(db, db_ref)
    np.testing.assert_array_equal(host(dy_dev), dy)


@pytest.mark.parametrize("need_dx, need_dw", [(True, False), (False, True), (False, False)])
def test_dense_backward_launches_only_the_kernels_it_needs(rng, need_dx, need_dw):
    act, (batch, fan_in, fan_out) = "gelu", ODD_SHAPES[0]
    x, w, b = dense_inputs(rng, batch, fan_in, fan_out)
    dy = randn(rng, batch, fan_out)
    _, z_ref = ref.dense_forward(x, w, b, act)
    dx_ref, dw_ref, db_ref = ref.dense_backward(dy, x, w, None, z_ref, act, True, True)
    dy_dev, w_dev, z_dev = to_device(dy, w, z_ref)
    # A frozen layer's input is not kept, so x is None whenever dW is not needed.
    x_dev = nb.asarray(x) if need_dw else None
    with trace() as t:
        dx, dw, db = nb.dense_backward(dy_dev, x_dev, w_dev, None, z_dev, act, need_dx, need_dw)
    assert t.counts == Counter(nb.backward_kernels(act, need_dx, need_dw))
    assert t.launches == nb.backward_kernels(act, need_dx, need_dw)
    if need_dx:
        assert_matches(dx, dx_ref)
    else:
        assert dx is None
    if need_dw:
        assert_matches(dw, dw_ref)
        assert_matches(db, db_ref)
    else:
        assert dw is None and db is None


def test_dense_writes_into_the_buffers_it_is_given(rng):
    act, (batch, fan_in, fan_out) = "gelu_tanh", ODD_SHAPES[0]
    x, w, b = dense_inputs(rng, batch, fan_in, fan_out)
    dy = randn(rng, batch, fan_out)
    y_ref, z_ref = ref.dense_forward(x, w, b, act)
    dx_ref, dw_ref, db_ref = ref.dense_backward(dy, x, w, None, z_ref, act, True, True)
    out, out_z, out_dx, out_dw = (nb.empty(s) for s in [dy.shape, dy.shape, x.shape, w.shape])
    out_db = nb.empty(b.shape)
    x_dev, w_dev, b_dev, dy_dev = to_device(x, w, b, dy)
    y, z = nb.dense_forward(x_dev, w_dev, b_dev, act, out, out_z)
    dx, dw, db = nb.dense_backward(dy_dev, x_dev, w_dev, None, z, act, True, True, out_dx, out_dw, out_db)
    assert all(got is given for got, given in zip((y, z, dx, dw, db), (out, out_z, out_dx, out_dw, out_db)))
    for actual, expected in [(y, y_ref), (z, z_ref), (dx, dx_ref), (dw, dw_ref), (db, db_ref)]:
        assert_matches(actual, expected)


# The dX kernel given the activation of the layer below (FOLDS_DX_ACT: every one) on a ragged shape:
# an act' applied in registers (relu, sigmoid) and one after the store (gelu); masked, the three
# kinds of act' input (none, y * keep_prob, z), also across two row tiles and two column tiles.
# The other activations take one of those two paths with their own act', which the dense_dz tests check.
FOLD_CASES = ([(act, False, ODD_SHAPES[0]) for act in ("relu", "sigmoid", "gelu")]
              + [(act, True, ODD_SHAPES[0]) for act in ("identity", "sigmoid", "gelu")]
              + [("gelu_tanh", True, (133, 20, 9)), ("relu", True, (3, 130, 9))])


@pytest.mark.parametrize("act, dropout, shape", FOLD_CASES,
                         ids=[f"{act}-{'masked' if dropout else 'plain'}-{'x'.join(map(str, shape))}"
                              for act, dropout, shape in FOLD_CASES])
def test_dx_with_the_activation_below_is_that_layers_dz_bit_for_bit(rng, act, dropout, shape):
    assert act in nb.FOLDS_DX_ACT
    check_dx_applies_the_activation_below(nb, rng, act, shape, "fp32", dropout=dropout)


def test_dx_refuses_an_unknown_activation_below_or_a_missing_output(rng):
    x, w, _ = dense_inputs(rng, 5, 7, 6)
    dy, w_dev, x_dev = to_device(randn(rng, 5, 6), w, x)
    with trace() as t:
        for act in ("softmax", "Relu"):
            with pytest.raises(ValueError, match=f"dx_act: unknown activation '{act}'; expected one of \\('identity', "):
                nb.dense_backward(dy, None, w_dev, None, None, "identity", True, False, dx_act=act, dx_act_in=x_dev)
        with pytest.raises(ValueError, match="dx_act_in: .* needed for dx_act='gelu'"):
            nb.dense_backward(dy, None, w_dev, None, None, "identity", True, False, dx_act="gelu")
    assert t.launches == []


def test_an_unknown_activation_is_refused_as_the_numpy_backend_refuses_it(rng):
    """It was a bare KeyError in the forward, and read as identity by the backward."""
    x, w, b = dense_inputs(rng, 5, 7, 6)
    dy = randn(rng, 5, 6)
    x_dev, w_dev, b_dev, dy_dev = to_device(x, w, b, dy)
    message = re.escape(f"activation: unknown activation 'relu6'; expected one of {NAMES}")
    with pytest.raises(ValueError, match=message):
        ref.dense_forward(x, w, b, "relu6")
    with trace() as t:
        with pytest.raises(ValueError, match=message):
            nb.dense_forward(x_dev, w_dev, b_dev, "relu6")
        with pytest.raises(ValueError, match=message):
            nb.dense_backward(dy_dev, x_dev, w_dev, dy_dev, None, "relu6", True, True)
    assert t.launches == []


@pytest.mark.parametrize("planted", ["identity_epilogue_for_relu", "mask_ignored"])
def test_the_fold_check_fails_on_a_planted_epilogue_bug(rng, monkeypatch, planted):
    """The check above is not blind: relu's branch running identity's epilogue (act' skipped), or
    the masked kernel running the unmasked epilogues (the mask skipped)."""
    if planted == "identity_epilogue_for_relu":
        with monkeypatch.context() as ids:
            ids.setitem(nb.ACT_ID, "identity", nb.ACT_ID["relu"])
            kernel = nb._dx_kernel(nb._dx_epilogues(("identity",), False), False)
        monkeypatch.setattr(nb, "_dense_dx_kernel", kernel)
    else:
        monkeypatch.setattr(nb, "_dense_dx_masked_kernel", nb._dx_kernel(nb._dx_epilogues(nb._DX_FROM_Y, False), True))
    with pytest.raises(AssertionError):
        check_dx_applies_the_activation_below(nb, rng, "relu", ODD_SHAPES[0], "fp32",
                                              dropout=planted == "mask_ignored")


def test_a_model_whose_dx_form_every_dz_below_gets_the_same_gradients_bit_for_bit():
    """A relu layer under a Dropout, a gelu one, a linear one under a Dropout: the dX above each
    forms its dz (act', from y or from z, and the mask), no dz or dropout_dz pass runs, and the
    gradients are bit for bit those of a pass per layer."""
    grads, launches, plan = folded_step(nb, dropout=True)
    want, unfolded_launches, unfolded_plan = folded_step(nb, fold=False, dropout=True)
    assert_grads_equal(grads, want)
    for got in ((launches, plan), (unfolded_launches, unfolded_plan)):
        assert got[0] == [kernel for _, kernels in reversed(got[1]) for kernel in kernels]
    assert not {"dense_dz", "dropout_dz"} & set(launches)
    assert Counter(unfolded_launches)["dropout_dz"] == 2 and Counter(unfolded_launches)["dense_dz"] == 1
    assert plan.notes == {"dense_0": "(its act' and dropout_1's mask are applied by dense_2's dX)",
                          "dropout_1": "(its mask is regenerated by dense_2's dX)",
                          "dense_2": "(its act' is applied by dense_3's dX)",
                          "dense_3": "(its act' and dropout_4's mask are applied by dense_5's dX)",
                          "dropout_4": "(its mask is regenerated by dense_5's dX)"}


# 1e20 squares past float32's range; the largest float32 doubles past it.
LARGE_PREACTIVATIONS = np.array(
    [[1e4], [-1e4], [1e20], [-1e20], [np.finfo(np.float32).max], [np.finfo(np.float32).min], [30.0], [-30.0],
     [0.5], [0.0]], np.float32)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_and_its_derivative_are_stable_at_large_preactivations(rng, act):
    # x (n, 1) @ [[1]] + 0 makes z = x exactly, so y = act(z) and dx = dy * act'(z): elementwise.
    x = LARGE_PREACTIVATIONS
    w = np.ones((1, 1), np.float32)
    b = np.zeros(1, np.float32)
    dy = randn(rng, len(x), 1)
    y_ref, z_ref = ref.dense_forward(x, w, b, act)
    dx_ref, _, _ = ref.dense_backward(dy, x, w, *y_and_z(act, y_ref, z_ref), act, True, False)
    x_dev, w_dev, b_dev, dy_dev = to_device(x, w, b, dy)
    y, z = nb.dense_forward(x_dev, w_dev, b_dev, act)
    # need_dw=False: the dX kernel forms dz from dy and y (or z) as it loads its tiles.
    dx, _, _ = nb.dense_backward(dy_dev, None, w_dev, *y_and_z(act, y, z), act, True, False)
    for actual, expected in [(host(y), y_ref), (host(dx), dx_ref)]:
        assert np.isfinite(actual).all()
        np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=1e-6)


# Grid limits of every CUDA device since compute capability 3.0 (programming guide, "Features
# and Technical Specifications"): 2^31 - 1 blocks along x, 65535 along y.
MAX_GRID_X = 2**31 - 1
MAX_GRID_Y = 65535


@pytest.mark.parametrize("rows, cols", [(4_194_241, 10), (10, 4_194_241), (100_000_000, 1024), (1024, 8_388_480)],
                         ids=["batch", "features", "huge-batch", "widest-with-a-batch-of-1024"])
def test_the_dense_grid_puts_the_larger_tile_count_on_x_so_either_may_be_huge(rows, cols):
    """4,194,241 = 65535 x 64 + 1 rows or features; 8,388,480 = 65535 x 128 columns."""
    (grid_x, grid_y), rows_on_x = nb.tile_grid(rows, cols)
    row_tiles, col_tiles = (grid_x, grid_y) if rows_on_x else (grid_y, grid_x)
    assert grid_x >= grid_y and grid_x <= MAX_GRID_X and grid_y <= MAX_GRID_Y
    assert row_tiles * nb.BLOCK_M >= rows and col_tiles * nb.BLOCK_N >= cols


def test_the_dense_grid_covers_every_element_with_whole_tiles():
    for rows, cols in [(1, 1), (128, 128), (129, 128), (128, 257), (3, 130)]:
        grid, rows_on_x = nb.tile_grid(rows, cols)
        row_tiles, col_tiles = grid if rows_on_x else grid[::-1]
        assert (row_tiles - 1) * nb.BLOCK_M < rows <= row_tiles * nb.BLOCK_M
        assert (col_tiles - 1) * nb.BLOCK_N < cols <= col_tiles * nb.BLOCK_N


def test_backward_kernels_names_what_dense_backward_launches():
    assert nb.backward_kernels("relu", True, True) == ["dense_dz", "dense_dw", "dense_dx"]
    assert nb.backward_kernels("gelu", False, True) == ["dense_dz", "dense_dw"]
    assert nb.backward_kernels("tanh", True, False) == ["dense_dz", "dense_dx"]
    assert nb.backward_kernels("identity", True, True) == ["dense_dw", "dense_dx"]
    assert nb.backward_kernels("relu", False, False) == []
    assert nb.backward_kernels("softmax", True, True) == ["softmax_bwd", "dense_dw", "dense_dx"]
    assert nb.backward_kernels("softmax", False, False) == []


# ----------------------------------------------------------------------------- dW split over the batch

TWO_WAVES_ON_H200 = 2 * H200_SMS  # blocks


@pytest.mark.parametrize("workload, n_in, n_out, batch", benchmark_layers(),
                         ids=lambda v: str(v) if not isinstance(v, str) else v.replace(" ", "_"))
def test_dw_launches_two_waves_of_blocks_on_an_h200_at_every_benchmark_layer(workload, n_in, n_out, batch):
    """A 64 x 64 layer is one tile, split 265 ways at a batch of 65,536; a 1024 x 1024 layer at
    8192 is 64 tiles split 5 ways; a 4096 x 4096 layer needs no split."""
    (grid_x, grid_y), _ = nb.tile_grid(n_in, n_out)
    splits, _ = nb.dw_splits(batch, grid_x * grid_y, H200_SMS)
    assert grid_x * grid_y * splits >= TWO_WAVES_ON_H200


@pytest.mark.parametrize("batch, tiles, sms", [(8192, 64, 132), (64, 14, 132), (133, 1, 2), (10**7, 1, 132),
                                               (8192, 300, 132), (31, 1, 132), (1, 1, 132), (65536, 1, 132),
                                               (65536, 1, 1000)])
def test_dw_splits_cover_the_batch_in_whole_slices_of_at_least_the_minimum_rows(batch, tiles, sms):
    splits, rows = nb.dw_splits(batch, tiles, sms)
    assert 1 <= splits <= nb.MAX_SPLITS and rows % nb.BLOCK_K == 0
    assert (splits - 1) * rows < batch <= splits * rows, "every split has rows, together all of them"
    target = nb.SPLIT_WAVES * sms
    if splits > 1:
        assert rows >= nb.MIN_ROWS_PER_SPLIT and tiles < target
    if tiles >= target:
        assert splits == 1
    else:
        assert tiles * splits >= target or splits >= min(batch // nb.MIN_ROWS_PER_SPLIT, nb.MAX_SPLITS)


@pytest.mark.parametrize("splits", [1, 2, nb.MAX_GROUP_SPLITS, nb.MAX_GROUP_SPLITS + 1, 265, nb.MAX_SPLITS])
def test_split_groups_keep_each_finishing_block_to_at_most_32_partials(splits):
    per_group = nb.dw_split_group(splits)
    groups = -(-splits // per_group)
    assert per_group <= nb.MAX_GROUP_SPLITS and groups <= nb.MAX_GROUP_SPLITS
    assert (groups - 1) * per_group < splits, "no group is empty"
    if splits <= nb.MAX_GROUP_SPLITS:
        assert groups == 1


def in_order(parts) -> np.ndarray:
    """parts[0] + parts[1] + ..., added in that order in float32."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


# Float addition is commutative, so an order shows from 3 terms on: 3 splits in one group; 6 in
# groups of 4 and 2 (the last group shorter); 6 in 3 groups of 2 (three group sums).
@pytest.mark.numba_gpu  # also on the GPU, in gpu_check.sh first-contact
@pytest.mark.parametrize("splits, group_splits", [(3, 3), (6, 4), (6, 2)],
                         ids=["3-splits", "6-splits-in-groups-of-4-and-2", "6-splits-in-3-groups"])
def test_split_dw_sums_the_partials_in_split_order_then_group_order_bit_for_bit(rng, splits, group_splits):
    """dW and db are the float32 sums of each group's split partials in split order, then of the
    group sums in group order (one group: partial[0] + partial[1] + ...), so the result
    depends on the split count and group size only, and match NumPy whatever the grouping."""
    batch, fan_in, fan_out = 45, 11, 6
    x, dz = randn(rng, batch, fan_in), randn(rng, batch, fan_out)
    x_dev, dz_dev = to_device(x, dz)
    dw, db = nb.empty((fan_in, fan_out)), nb.empty((fan_out,))
    rows = -(-batch // splits)
    rows += -rows % nb.BLOCK_K
    assert -(-batch // rows) == splits
    groups = -(-splits // group_splits)
    with trace() as t:
        nb._dense_dw(x_dev, dz_dev, dw, db, splits, rows, group_splits)
    assert t.launches == ["dense_dw"]
    assert_matches(dw, x.T.astype(np.float64) @ dz)
    assert_matches(db, dz.sum(0, dtype=np.float64))
    slots = splits + (groups if groups > 1 else 0)
    dw_parts = host(nb._scratch("dw_partials", slots * dw.size, dz_dev)).reshape(slots, fan_in, fan_out)
    db_parts = host(nb._scratch("db_partials", slots * db.size, dz_dev)).reshape(slots, fan_out)
    for begin, dw_part, db_part in zip(range(0, batch, rows), dw_parts, db_parts):
        chunk = slice(begin, begin + rows)
        assert_matches(dw_part, x[chunk].T.astype(np.float64) @ dz[chunk])
        assert_matches(db_part, dz[chunk].sum(0, dtype=np.float64))
    for total, parts in [(host(dw), dw_parts), (host(db), db_parts)]:
        group_sums = [in_order(parts[first:min(first + group_splits, splits)])
                      for first in range(0, splits, group_splits)]
        if groups > 1:
            np.testing.assert_array_equal(parts[splits:], np.stack(group_sums))
        np.testing.assert_array_equal(total, in_order(group_sums))
    tickets = host(nb._scratch("split_tickets", groups + 1, dz_dev, np.uint32))
    assert not tickets.any(), "tickets reset for the next launch"


def group_order_sums(dz: np.ndarray) -> np.ndarray:
    """dense_db's column sums of dz, in its order: each of ROWS_PER_BLOCK row groups sums every
    ROWS_PER_BLOCK-th row from its own, in float32, then the groups are added in order."""
    groups = [in_order(rows) if len(rows) else np.zeros(dz.shape[1], np.float32)
              for rows in (dz[g::nb.ROWS_PER_BLOCK] for g in range(nb.ROWS_PER_BLOCK))]
    return in_order(np.stack(groups))


@pytest.mark.parametrize("batch, splits", [(300, 5), (40, 1)])
def test_db_alone_splits_the_batch_and_adds_the_splits_in_order_bit_for_bit(rng, batch, splits):
    """A bias that trains under a frozen weight: db sums each split of the batch in its blocks,
    then the splits' sums in split order, so it depends on the shapes and SM count only."""
    n_out = 45  # two column strips
    assert nb.db_splits(batch, n_out, nb.SIMULATED_SMS)[0] == splits
    rows = nb.db_splits(batch, n_out, nb.SIMULATED_SMS)[1]
    dz = randn(rng, batch, n_out)
    (dz_dev,) = to_device(dz)
    db = nb.empty((n_out,))
    with trace() as t:
        nb._dense_db(dz_dev, db)
    assert t.launches == ["dense_db"]
    assert_matches(db, dz.sum(0, dtype=np.float64))
    split_sums = [group_order_sums(dz[begin:begin + rows]) for begin in range(0, batch, rows)]
    expected = split_sums[0] if splits == 1 else group_order_sums(np.stack(split_sums))
    np.testing.assert_array_equal(host(db), expected)


@pytest.mark.parametrize("workload, n_in, n_out, batch", benchmark_layers(),
                         ids=lambda v: str(v) if not isinstance(v, str) else v.replace(" ", "_"))
def test_db_alone_fills_an_h200_at_every_benchmark_layer(workload, n_in, n_out, batch):
    splits, rows = nb.db_splits(batch, n_out, H200_SMS)
    strips = -(-n_out // nb.ROW_LANES)
    assert 1 <= splits <= nb.DB_MAX_SPLITS and (splits - 1) * rows < batch <= splits * rows
    assert (strips * splits >= 0.9 * nb.DB_BLOCKS_PER_SM * H200_SMS or splits == nb.DB_MAX_SPLITS
            or rows < 2 * nb.DB_MIN_ROWS), (strips, splits, rows)


def test_softmax_is_stable_and_its_backward_may_overwrite_dy(rng):
    z = np.array([[1e4, 0.0, -1e4], [30.0, 30.0, 29.0], [-50.0, -60.0, -70.0]], np.float32)
    y_ref = z.copy()
    ref.softmax_(y_ref)
    y = nb.asarray(z)
    nb.softmax_(y)
    assert_matches(y, y_ref)
    dy = randn(rng, 3, 3)
    dz_ref = ref.softmax_backward(dy, y_ref, np.empty_like(dy))
    dy_dev = nb.asarray(dy)
    assert nb.softmax_backward(dy_dev, y, dy_dev) is dy_dev
    assert_matches(dy_dev, dz_ref)


class LaunchRecorder:
    """Stands in for a kernel: records each launch's (grid, block) and runs the kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, config):
        self.launches.append((config[0], config[1]))
        return self.kernel[config]


@pytest.mark.parametrize("kernel_name, run", [
    ("_softmax_kernel", lambda y: nb.softmax_(y)),
    ("_softmax_backward_kernel", lambda y: nb.softmax_backward(y, y, nb.empty(tuple(y.shape)))),
], ids=["forward", "backward"])
def test_softmax_launches_a_warp_per_row(rng, monkeypatch, kernel_name, run):
    recorder = LaunchRecorder(getattr(nb, kernel_name))
    monkeypatch.setattr(nb, kernel_name, recorder)
    run(nb.asarray(randn(rng, 11, 3)))
    assert recorder.launches == [(nb.row_blocks(11), (nb.WARP_SIZE, nb.ROWS_PER_BLOCK))]
    assert nb.row_blocks(11) == 2


def test_softmax_runs_a_warp_per_row_across_lanes_and_blocks(rng):
    """70 classes: each lane of a row's warp reads 2 or 3 of them; 11 rows: two blocks of 8."""
    z = randn(rng, 11, 70) * np.float32(5.0)
    y_ref = z.copy()
    ref.softmax_(y_ref)
    y = nb.asarray(z)
    nb.softmax_(y)
    assert_matches(y, y_ref)
    dy = randn(rng, 11, 70)
    out = nb.empty(dy.shape)
    nb.softmax_backward(nb.asarray(dy), y, out)
    assert_matches(out, ref.softmax_backward(dy, y_ref, np.empty_like(dy)))


# ----------------------------------------------------------------------------- losses


def ce_inputs(rng, batch, classes, label_dtype=np.int64, scale=1.0):
    logits = randn(rng, batch, classes) * np.float32(scale)
    return logits, rng.integers(0, classes, batch).astype(label_dtype)


def mse_inputs(rng, *shape):
    return randn(rng, *shape), randn(rng, *shape)


def bce_inputs(rng, *shape):
    logits = randn(rng, *shape) * np.float32(3.0)
    logits.flat[:2] = [1e4, -1e4]
    return logits, rng.random(shape, dtype=np.float32)


def poisson_inputs(rng, *shape):
    """Log rates of 2 N(0, 1) and Poisson counts of mean 2 (some 0)."""
    return randn(rng, *shape) * np.float32(2.0), rng.poisson(2.0, shape).astype(np.float32)


LOSS_CASES = [
    # (backend function, trace name, inputs)
    ("softmax_cross_entropy", "ce_fwd_bwd", lambda rng: ce_inputs(rng, 19, 7)),
    # C > 32 lanes per row, int32 labels
    ("softmax_cross_entropy", "ce_fwd_bwd", lambda rng: ce_inputs(rng, 3, 33, np.int32)),
    # logits ~ 1e4: the online max keeps exp in range
    ("softmax_cross_entropy", "ce_fwd_bwd", lambda rng: ce_inputs(rng, 9, 5, scale=1e4)),
    ("softmax_cross_entropy", "ce_fwd_bwd", lambda rng: ce_inputs(rng, 1, 1)),
    ("mse", "mse_fwd_bwd", lambda rng: mse_inputs(rng, 19, 7)),
    # 276 elements: two reduction blocks
    ("mse", "mse_fwd_bwd", lambda rng: mse_inputs(rng, 23, 12)),
    ("bce", "bce_fwd_bwd", lambda rng: bce_inputs(rng, 19, 7)),
    ("bce", "bce_fwd_bwd", lambda rng: bce_inputs(rng, 1, 2)),
    # errors of standard deviation 1.4: about half inside delta = 1, half past it
    ("huber", "huber_fwd_bwd", lambda rng: mse_inputs(rng, 19, 7)),
    ("huber", "huber_fwd_bwd", lambda rng: mse_inputs(rng, 23, 12)),
    ("mae", "mae_fwd_bwd", lambda rng: mse_inputs(rng, 23, 12)),
    ("poisson", "poisson_fwd_bwd", lambda rng: poisson_inputs(rng, 19, 7)),
    ("poisson", "poisson_fwd_bwd", lambda rng: poisson_inputs(rng, 23, 12)),
]


@pytest.mark.numba_gpu  # also on the GPU, in gpu_check.sh first-contact
@pytest.mark.parametrize(
    "loss_name, kernel_name, make_inputs", LOSS_CASES,
    ids=["ce-19x7", "ce-3x33-int32", "ce-large-logits", "ce-1x1", "mse-19x7", "mse-23x12", "bce-19x7", "bce-1x2",
         "huber-19x7", "huber-23x12", "mae-23x12", "poisson-19x7", "poisson-23x12"],
)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_loss_matches_numpy(rng, loss_name, kernel_name, make_inputs, weighted):
    prediction, target = make_inputs(rng)
    weights = rng.uniform(0, 2, len(prediction)).astype(np.float32) if weighted else None
    loss_ref, grad_ref = getattr(ref, loss_name)(prediction, target, weights)
    with trace() as t:
        loss, grad = getattr(nb, loss_name)(*to_device(prediction, target), *to_device(weights) if weighted else ())
    assert t.launches == [kernel_name]
    assert isinstance(loss, float)
    assert abs(loss - loss_ref) <= RTOL * max(abs(loss_ref), 1.0)
    assert_matches(grad, grad_ref)


@pytest.mark.parametrize("loss_name, make_inputs", [("mse", mse_inputs), ("mae", mse_inputs), ("huber", mse_inputs),
                                                     ("bce", bce_inputs), ("poisson", poisson_inputs)])
def test_an_unweighted_elementwise_loss_takes_1d_predictions_as_numpy_does(rng, loss_name, make_inputs):
    """The contract's "an unweighted elementwise loss takes any shape": the launch read the row
    width as pred.shape[1] (an IndexError for 1-D), though without weights nothing uses it."""
    prediction, target = make_inputs(rng, 300)  # two reduction blocks
    loss_ref, grad_ref = getattr(ref, loss_name)(prediction, target)
    with trace() as t:
        loss, grad = getattr(nb, loss_name)(*to_device(prediction, target))
    assert t.launches == [f"{loss_name}_fwd_bwd"]
    assert abs(loss - loss_ref) <= RTOL * max(abs(loss_ref), 1.0)
    assert_matches(grad, grad_ref)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_huber_takes_its_delta(rng, weighted):
    prediction, target = mse_inputs(rng, 23, 12)
    weights = rng.uniform(0, 2, len(prediction)).astype(np.float32) if weighted else None
    loss_ref, grad_ref = ref.huber(prediction, target, weights, delta=0.3)
    loss, grad = nb.huber(*to_device(prediction, target), *to_device(weights) if weighted else (), delta=0.3)
    assert abs(loss - loss_ref) <= RTOL * max(abs(loss_ref), 1.0)
    assert_matches(grad, grad_ref)
    assert abs(loss - ref.huber(prediction, target, weights)[0]) > 0.1  # delta 1 gives another loss


@pytest.mark.parametrize("make_inputs", [lambda rng: ce_inputs(rng, 19, 7), lambda rng: ce_inputs(rng, 3, 33, np.int32),
                                         lambda rng: ce_inputs(rng, 9, 5, scale=1e4)],
                         ids=["19x7", "3x33-int32", "large-logits"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_softmax_cross_entropy_takes_its_label_smoothing(rng, make_inputs, weighted):
    # 19 rows: the last of three blocks of 8 rows has rows past B, which join the row sum's barriers
    logits, labels = make_inputs(rng)
    weights = rng.uniform(0, 2, len(logits)).astype(np.float32) if weighted else None
    loss_ref, grad_ref = ref.softmax_cross_entropy(logits.astype(np.float64), labels, weights, 0.2)
    with trace() as t:
        loss, grad = nb.softmax_cross_entropy(*to_device(logits, labels), *to_device(weights) if weighted else (),
                                              label_smoothing=0.2)
    assert t.launches == ["ce_fwd_bwd"]
    assert abs(loss - loss_ref) <= RTOL * max(abs(loss_ref), 1.0)
    assert_matches(grad, grad_ref)
    assert abs(loss - ref.softmax_cross_entropy(logits, labels, weights)[0]) > 1e-3 * max(abs(loss_ref), 1.0)


def test_softmax_cross_entropy_with_label_smoothing_of_a_masked_logit_is_inf_with_a_finite_gradient(rng):
    logits, labels = ce_inputs(rng, 10, 40)
    logits[np.arange(10), (labels + 1) % 40] = -np.inf
    loss_ref, grad_ref = ref.softmax_cross_entropy(logits.astype(np.float64), labels, None, 0.1)
    loss, grad = nb.softmax_cross_entropy(*to_device(logits, labels), label_smoothing=0.1)
    assert loss == loss_ref == np.inf
    assert_matches(grad, grad_ref)
    assert nb.softmax_cross_entropy(*to_device(logits, labels))[0] < np.inf  # one-hot: the mask costs nothing


# ----------------------------------------------------------------------------- optimizers

PARAM_SHAPE = (19, 13)
STEPS = 3


def optimizer_state(rng, *names):
    """A parameter, its gradients for STEPS steps, and zeroed state buffers, as host arrays."""
    param = randn(rng, *PARAM_SHAPE)
    grads = [randn(rng, *PARAM_SHAPE) for _ in range(STEPS)]
    return param, grads, {name: np.zeros(PARAM_SHAPE, np.float32) for name in names}


@pytest.mark.parametrize(
    "momentum, nesterov, weight_decay",
    [(0.0, False, 0.0), (0.0, False, 1e-2), (0.9, False, 0.0), (0.9, True, 1e-2)],
    ids=["plain", "weight-decay", "momentum", "nesterov-weight-decay"],
)
def test_sgd_update_matches_numpy(rng, momentum, nesterov, weight_decay):
    param, grads, state = optimizer_state(rng, "velocity")
    velocity = state["velocity"] if momentum else None
    param_dev = nb.asarray(param)
    velocity_dev = nb.asarray(velocity) if momentum else None
    with trace() as t:
        for grad in grads:
            ref.sgd_update(param, grad, velocity, 0.1, momentum, nesterov, weight_decay)
            nb.sgd_update(param_dev, nb.asarray(grad), velocity_dev, 0.1, momentum, nesterov, weight_decay)
    assert t.counts["sgd_update"] == 2 * STEPS
    assert_matches(param_dev, param)
    if momentum:
        assert_matches(velocity_dev, velocity)


@pytest.mark.parametrize(
    "weight_decay, decoupled", [(0.0, False), (1e-2, False), (1e-2, True)], ids=["adam", "adam-l2", "adamw"]
)
def test_adam_update_matches_numpy(rng, weight_decay, decoupled):
    param, grads, state = optimizer_state(rng, "m", "v")
    param_dev, m_dev, v_dev = to_device(param, state["m"], state["v"])
    with trace() as t:
        for step, grad in enumerate(grads, start=1):
            args = (1e-2, 0.9, 0.999, 1e-8, weight_decay, step, decoupled)
            ref.adam_update(param, grad, state["m"], state["v"], *args)
            nb.adam_update(param_dev, nb.asarray(grad), m_dev, v_dev, *args)
    assert t.counts["adam_update"] == 2 * STEPS
    for actual, expected in [(param_dev, param), (m_dev, state["m"]), (v_dev, state["v"])]:
        assert_matches(actual, expected)


@pytest.mark.parametrize(
    "momentum, centered, weight_decay",
    [(0.0, False, 0.0), (0.0, True, 1e-2), (0.9, False, 1e-2), (0.9, True, 0.0)],
    ids=["plain", "centered-weight-decay", "momentum-weight-decay", "centered-momentum"],
)
def test_rmsprop_update_matches_numpy(rng, momentum, centered, weight_decay):
    param, grads, state = optimizer_state(rng, "square_avg", "grad_avg", "momentum_buffer")
    # The buffers an option does not use are None on both sides, as RMSprop passes them.
    host = [state["square_avg"], state["grad_avg"] if centered else None,
            state["momentum_buffer"] if momentum else None]
    param_dev = nb.asarray(param)
    dev = [None if a is None else nb.asarray(a) for a in host]
    with trace() as t:
        for grad in grads:
            args = (1e-2, 0.9, 1e-8, weight_decay, momentum, centered)
            ref.rmsprop_update(param, grad, *host, *args)
            nb.rmsprop_update(param_dev, nb.asarray(grad), *dev, *args)
    assert t.counts["rmsprop_update"] == 2 * STEPS
    for actual, expected in [(param_dev, param)] + [(d, h) for d, h in zip(dev, host) if h is not None]:
        assert_matches(actual, expected)


# ----------------------------------------------------------------------------- helpers


def test_sumsq_matches_numpy_across_reduction_blocks(rng):
    a = randn(rng, 23, 12)
    assert nb.sumsq(nb.asarray(a)) == pytest.approx(ref.sumsq(a), rel=RTOL)


def count_copies_to_host(monkeypatch) -> list:
    """The arrays nb.to_host copies to the host from now on (it still copies them)."""
    copies = []
    to_host = nb.to_host
    monkeypatch.setattr(nb, "to_host", lambda a: copies.append(a) or to_host(a))
    return copies


def test_sumsq_of_many_arrays_reads_one_buffer_back_once(rng, monkeypatch):
    """Gradient clipping's norm: every array reduced into one device buffer, one copy to the host."""
    arrays = [randn(rng, 23, 12), randn(rng, 5), randn(rng, 300)]
    arrays_dev = to_device(*arrays)
    copies = count_copies_to_host(monkeypatch)
    with trace() as t:
        total = nb.sumsq(*arrays_dev)
    assert t.counts["sumsq"] == len(arrays) and len(copies) == 1
    assert total == pytest.approx(sum(float(np.dot(a.ravel().astype(np.float64), a.ravel())) for a in arrays), rel=RTOL)


def test_clip_grad_norm_reads_the_norm_back_once_per_backend(rng, monkeypatch):
    params = []
    for shape in [(7, 5), (5,), (5, 3)]:
        param = gb.Parameter(nb.asarray(randn(rng, *shape)))
        param.backend, param.grad = nb, nb.asarray(randn(rng, *shape))
        params.append(param)
    norm_ref = float(np.sqrt(sum(float(np.sum(host(p.grad).astype(np.float64) ** 2)) for p in params)))
    copies = count_copies_to_host(monkeypatch)
    assert gb.optim.clip_grad_norm(params, 1.0) == pytest.approx(norm_ref, rel=RTOL)
    assert len(copies) == 1


@pytest.mark.parametrize("n", [1, 255, 4096, 67_584, 10**6, 10**9])
def test_reductions_take_a_thread_per_element_up_to_full_sms(n):
    """Two waves of 132 SMs (264 blocks of 256) from 67,584 elements on: a 1024 x 1024 gradient
    takes 1056; the grid never passes BLOCKS_PER_SM per SM, nor has a block without an element
    (so a 64 x 64 gradient, 4096 elements, takes 16 blocks: a thread per element)."""
    blocks = nb.reduce_blocks(n, H200_SMS)
    assert blocks <= nb.BLOCKS_PER_SM * H200_SMS and (blocks - 1) * nb.REDUCE_THREADS < n
    if n >= TWO_WAVES_ON_H200 * nb.REDUCE_THREADS:
        assert blocks >= TWO_WAVES_ON_H200


@pytest.mark.parametrize("workload", ["steps", "frozen"])
def test_the_loss_of_every_benchmark_step_launches_two_waves_of_row_blocks(workload):
    """The benchmark steps' one reduction besides dW's db: softmax cross-entropy over the batch,
    a warp per row (8192 rows: 1024 blocks; 65,536: 8192)."""
    dense = load("test_gpu_dense")
    steps = dense.STEP_WORKLOADS.values() if workload == "steps" else [dense.FROZEN_MODEL]
    for _, batch in steps:
        assert nb.row_blocks(batch) >= TWO_WAVES_ON_H200


def test_scratch_buffers_are_private_to_a_stream_and_shared_within_one(rng):
    on_default_stream = nb.cuda.to_device(randn(rng, 4, 3))
    on_a_stream = nb.cuda.to_device(randn(rng, 4, 3)).bind(nb.cuda.stream())
    written = nb._scratch("test_scratch", 12, on_default_stream)
    nb._view(written).copy_to_device(np.ones(12, np.float32))
    np.testing.assert_array_equal(host(nb._scratch("test_scratch", 12, on_default_stream)), np.ones(12))
    np.testing.assert_array_equal(host(nb._scratch("test_scratch", 12, on_a_stream)), np.zeros(12))


@pytest.mark.gpu
def test_scratch_buffers_live_on_the_device_of_the_arrays_they_serve(rng):
    cupy = pytest.importorskip("cupy")

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA GPUs")
    for device in (1, 0):
        with cupy.cuda.Device(device):
            like = cupy.asarray(randn(rng, 4, 3))
        assert nb._scratch("test_device", 12, like).device.id == device


def test_scale_multiplies_in_place(rng):
    a = randn(rng, 19, 13)
    a_dev = nb.asarray(a)
    nb.scale_(a_dev, 0.25)
    ref.scale_(a, 0.25)
    assert_matches(a_dev, a)


def test_array_helpers_round_trip(rng):
    a = randn(rng, 3, 4)
    a_dev = nb.asarray(a)
    assert nb.is_array(a_dev) and not nb.is_array(a)
    assert nb.asarray(a_dev) is a_dev
    np.testing.assert_array_equal(host(a_dev), a)
    np.testing.assert_array_equal(host(nb.asarray(a.astype(np.float64), np.float32)), a)
    np.testing.assert_array_equal(host(nb.zeros((2, 5))), np.zeros((2, 5), np.float32))
    assert tuple(nb.empty((2, 5)).shape) == (2, 5) and nb.empty((2, 5)).dtype == np.float32
    nb.synchronize()


def test_backend_reports_itself_available_here():
    assert nb.unavailable_reason() is None
    assert (nb.NAME, nb.DEVICE, nb.DTYPES) == ("numba", "cuda", (np.float32,))


def test_a_gpu_without_libnvvm_reads_as_unavailable_naming_nvvm(monkeypatch):
    """A driver without a toolkit's libNVVM runs kernels but compiles none: the backend says so
    when asked, not at the first launch. (The GPU and numba-cuda's libNVVM probe faked.)"""
    import numba.cuda.cudadrv

    found = {"nvvm": False}
    monkeypatch.setattr(nb, "SIMULATOR", False)
    monkeypatch.setattr(nb.cuda, "is_available", lambda: True)
    monkeypatch.setattr(numba.cuda.cudadrv, "nvvm", types.SimpleNamespace(is_available=lambda: found["nvvm"]),
                        raising=False)
    assert "libNVVM" in nb.unavailable_reason()
    found["nvvm"] = True
    assert nb.unavailable_reason() is None


def test_the_reason_numba_cuda_finds_no_gpu_reads_on_one_line(monkeypatch):
    """numba-cuda's reason spans lines, blank ones around it; backends.available() showed them raw."""
    error = ("\nCUDA driver library cannot be found.\nEnsure that a compatible NVIDIA driver is installed and "
             "available on your system path.\n")
    monkeypatch.setattr(nb.cuda, "is_available", lambda: False)
    monkeypatch.setattr(nb.cuda, "cuda_error", lambda: error, raising=False)
    reason = nb.unavailable_reason()
    assert "\n" not in reason
    assert reason.startswith("numba-cuda finds no usable CUDA GPU (CUDA driver library cannot be found. Ensure that "
                             "a compatible NVIDIA driver is installed and available on your system path.) and ")


def test_dense_forward_says_it_computes_in_float32_only():
    assert nb.DTYPES == (np.float32,) and "float64" not in nb.dense_forward.__doc__


# ----------------------------------------------------------------------------- strided arrays


@pytest.fixture
def strided_ravel_raises(monkeypatch):
    """The simulator's device array made to refuse, as numba-cuda's on a GPU does, to ravel (or
    really reshape) a non-contiguous array: NotImplementedError, where the simulator copies. On a
    GPU the arrays refuse by themselves."""
    if not nb.SIMULATOR:
        return
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    ravel, reshape = FakeCUDAArray.ravel, FakeCUDAArray.reshape

    def strict_ravel(self, *args, **kwargs):
        if not self.is_c_contiguous():
            raise NotImplementedError("operation requires copying")
        return ravel(self, *args, **kwargs)

    def strict_reshape(self, *shape, **kwargs):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if not self.is_c_contiguous() and shape != self._ary.shape:
            raise NotImplementedError("operation requires copying")
        return reshape(self, *shape, **kwargs)

    monkeypatch.setattr(FakeCUDAArray, "ravel", strict_ravel)
    monkeypatch.setattr(FakeCUDAArray, "reshape", strict_reshape)


def strided(a: np.ndarray):
    """A non-contiguous device view holding ``a``: every other column (element, for 1-D) of one twice as wide."""
    wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    if a.ndim == 2:
        wide[:, ::2] = a
        view = nb.asarray(wide)[:, ::2]
    else:
        wide[::2] = a
        view = nb.asarray(wide)[::2]
    assert not view.is_c_contiguous()
    return view


STRIDED_KEY = np.array([0x1234, 0xBEEF], np.uint32)


def strided_mask(be):
    return philox.Mask(STRIDED_KEY if be is ref else nb.asarray(STRIDED_KEY), *philox.mask_constants(0.3), 3)


def optimizer_step(be, arr, rng, kind):
    """One SGD (Nesterov), AdamW or centered RMSprop (momentum) step of a parameter and state the
    backend made, the gradient given by ``arr``."""
    param, state = be.asarray(randn(rng, 7, 5)), [be.zeros((7, 5)) for _ in range(3)]
    grad = arr(randn(rng, 7, 5))
    if kind == "sgd":
        be.sgd_update(param, grad, state[0], 0.1, 0.9, True, 1e-2)
    elif kind == "adam":
        be.adam_update(param, grad, *state[:2], 1e-2, 0.9, 0.999, 1e-8, 1e-2, 1, True)
    else:
        be.rmsprop_update(param, grad, *state, 1e-2, 0.99, 1e-8, 1e-2, 0.9, True)
    return [param, *state]


def gelu_backward(be, arr, rng):
    """A masked gelu layer's gradients from a strided dy, x, w and z."""
    x, w, b = dense_inputs(rng, 7, 5, 6)
    _, z = ref.dense_forward(x, w, b, "gelu", dropout=strided_mask(ref))
    return be.dense_backward(arr(randn(rng, 7, 6)), arr(x), arr(w), None, arr(z), "gelu", True, True,
                             dropout=strided_mask(be))


def relu_backward(be, arr, rng):
    """An unmasked relu layer's gradients (its dense_dz pass) from a strided dy, x, w and y."""
    x, w, b = dense_inputs(rng, 7, 5, 6)
    y, _ = ref.dense_forward(x, w, b, "relu")
    return be.dense_backward(arr(randn(rng, 7, 6)), arr(x), arr(w), arr(y), None, "relu", True, True)


# Each call (backend, to_device, rng) -> its results; its inputs from rng, every one strided on the device.
STRIDED_CALLS = {
    "mse": lambda be, arr, rng: be.mse(arr(randn(rng, 7, 5)), arr(randn(rng, 7, 5))),
    "mse-weighted": lambda be, arr, rng: be.mse(arr(randn(rng, 7, 5)), arr(randn(rng, 7, 5)),
                                                 arr(rng.uniform(0, 2, 7).astype(np.float32))),
    "bce": lambda be, arr, rng: be.bce(*map(arr, bce_inputs(rng, 7, 5))),
    "softmax_cross_entropy": lambda be, arr, rng: be.softmax_cross_entropy(*map(arr, ce_inputs(rng, 7, 5))),
    "dropout_forward": lambda be, arr, rng: [be.dropout_forward(arr(randn(rng, 7, 6)), strided_mask(be))],
    "dropout_backward": lambda be, arr, rng: [be.dropout_backward(arr(randn(rng, 7, 6)), strided_mask(be))],
    "dense_forward": lambda be, arr, rng: be.dense_forward(*map(arr, dense_inputs(rng, 7, 5, 6)), "gelu",
                                                           dropout=strided_mask(be)),
    "dense_backward-relu": relu_backward,
    "dense_backward-gelu-masked": gelu_backward,
    "sumsq": lambda be, arr, rng: [be.sumsq(arr(randn(rng, 7, 5)), arr(randn(rng, 9)))],
    "sgd_update": lambda be, arr, rng: optimizer_step(be, arr, rng, "sgd"),
    "adam_update": lambda be, arr, rng: optimizer_step(be, arr, rng, "adam"),
    "rmsprop_update": lambda be, arr, rng: optimizer_step(be, arr, rng, "rmsprop"),
}


@pytest.mark.parametrize("call", STRIDED_CALLS)
def test_strided_inputs_give_what_the_numpy_backend_gives(strided_ravel_raises, call):
    """A user's a[:, ::2] passed on by the layer API or the losses: numba-cuda's device array
    refuses to ravel it on a GPU, which the simulator hid by copying; the inputs are copied to
    C-contiguous ones first."""
    expected = STRIDED_CALLS[call](ref, np.ascontiguousarray, np.random.default_rng(7))
    actual = STRIDED_CALLS[call](nb, strided, np.random.default_rng(7))
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        if got is None:
            assert want is None
        elif isinstance(got, float):
            assert got == pytest.approx(want, rel=RTOL)
        else:
            assert_matches(got, want)


def test_a_model_takes_a_strided_input_and_output_gradient(strided_ravel_raises, rng):
    """A Dropout standing first masks x (dropout_fwd), the relu layer's dz is formed from dout."""
    x, dout = randn(rng, 7, 5), randn(rng, 7, 4)
    results = {}
    for backend, arr in (("numpy", np.ascontiguousarray), ("numba", strided)):
        gb.seed(0)  # the same weights and the same mask
        model = gb.Sequential([gb.Dropout(0.25), gb.Dense(5, 4, activation="relu")], backend=backend)
        out = model.forward(arr(x))
        model.backward(arr(dout))
        results[backend] = [backends.get(backend).to_host(a) for a in (out, *(p.grad for p in model.parameters()))]
    assert len(results["numba"]) == 3
    for got, want in zip(results["numba"], results["numpy"]):
        assert_matches(got, want)


def test_a_strided_input_is_copied_only_when_it_must_be_keeping_its_kind_and_stream(rng):
    a = randn(rng, 7, 5)
    a_dev = nb.asarray(a)
    assert nb._contiguous(a_dev) is a_dev and nb._contiguous(None) is None
    view = strided(a).bind(nb.cuda.stream())
    copy = nb._contiguous(view)
    assert type(copy) is type(view) and copy.is_c_contiguous() and copy.stream is view.stream
    np.testing.assert_array_equal(host(copy), a)


IN_PLACE_CALLS = {
    "a": lambda rng, arr: nb.scale_(arr(randn(rng, 7, 5)), 0.5),
    "y": lambda rng, arr: nb.softmax_(arr(randn(rng, 7, 5))),
    "param": lambda rng, arr: nb.sgd_update(arr(randn(rng, 7, 5)), nb.zeros((7, 5)), None, 0.1, 0.0, False, 0.0),
    "m": lambda rng, arr: nb.adam_update(nb.zeros((7, 5)), nb.zeros((7, 5)), arr(randn(rng, 7, 5)), nb.zeros((7, 5)),
                                         1e-2, 0.9, 0.999, 1e-8, 0.0, 1, True),
    "out": lambda rng, arr: nb.dense_forward(*to_device(*dense_inputs(rng, 7, 5, 6)), "relu",
                                             out=arr(randn(rng, 7, 6))),
    "out_dw": lambda rng, arr: nb.dense_backward(*to_device(randn(rng, 7, 6), randn(rng, 7, 5), randn(rng, 5, 6)),
                                                 None, None, "identity", False, True, out_dw=arr(randn(rng, 5, 6))),
}


IN_PLACE_REFUSAL = "expected a C-contiguous float32 device array (it is written in place), got "


@pytest.mark.parametrize("name", IN_PLACE_CALLS)
def test_a_strided_in_place_operand_is_refused_naming_it(rng, name):
    """Parameters, optimizer state and out buffers are the backend's own, contiguous: a strided one
    was raveled into a copy in the simulator (the update lost) and refused on a GPU."""
    with trace() as t:
        with pytest.raises(ValueError, match=re.escape(f"{name}: {IN_PLACE_REFUSAL}dtype float32, shape (")):
            IN_PLACE_CALLS[name](rng, strided)
    assert t.launches == []


@pytest.mark.parametrize("kind", ["host", "float64"])
@pytest.mark.parametrize("name", IN_PLACE_CALLS)
def test_a_host_or_float64_in_place_operand_is_refused_naming_it_as_cupys_backend_refuses_it(rng, name, kind):
    """A NumPy array failed in numba-cuda's ``as_cuda_array`` (an error naming nothing), and a float64
    device array was updated in float64, where the CuPy backend refuses both (``DTYPES``: float32)."""
    given = []

    def operand(a):
        a = nb.asarray(a, np.float64) if kind == "float64" else a
        given.append((a, np.array(host(a) if nb.is_array(a) else a)))
        return a

    got = "ndarray" if kind == "host" else "dtype float64, shape ("
    with trace() as t:
        with pytest.raises(ValueError, match="^" + re.escape(f"{name}: {IN_PLACE_REFUSAL}{got}")):
            IN_PLACE_CALLS[name](rng, operand)
    assert t.launches == []
    (a, before), = given
    np.testing.assert_array_equal(host(a) if nb.is_array(a) else a, before)  # left as it was


# ----------------------------------------------------------------------------- whole model


@pytest.mark.numba_gpu  # also on the GPU, in gpu_check.sh first-contact
def test_model_on_numba_trains_like_the_numpy_model(rng):
    x = randn(rng, 9, 5)
    labels = rng.integers(0, 3, 9)
    numpy_model = gb.Sequential([gb.Dense(5, 7, activation="tanh"), gb.Dense(7, 3)], backend="numpy")
    numba_model = gb.Sequential([gb.Dense(5, 7, activation="tanh"), gb.Dense(7, 3)], backend="numba")
    numba_model.set_weights(numpy_model.get_weights())
    trajectories = []
    for model in (numpy_model, numba_model):
        optimizer = gb.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses = []
        for _ in range(3):
            loss, dout = gb.losses.cross_entropy(model.forward(x), labels)
            model.backward(dout)
            optimizer.step()
            model.zero_grad()
            losses.append(loss)
        trajectories.append(losses)
    np.testing.assert_allclose(trajectories[1], trajectories[0], rtol=RTOL)
    assert trajectories[1][-1] < trajectories[1][0]
    for got, expected in zip(numba_model.get_weights(), numpy_model.get_weights()):
        assert_matches(got, expected)


# ----------------------------------------------------------------------------- real compiler


def test_kernel_variants_list_every_kernel_and_activation_the_backend_launches():
    variants = nb.kernel_variants()
    names = {v.name for v in variants}
    assert names == {"dense_fwd", "dense_dz", "dense_dw", "dense_db", "dense_dx", "softmax_fwd", "softmax_bwd",
                     "ce_fwd_bwd", "mse_fwd_bwd", "mae_fwd_bwd", "huber_fwd_bwd", "bce_fwd_bwd", "poisson_fwd_bwd",
                     "sumsq", "scale", "sgd_update", "adam_update", "rmsprop_update", "dropout_dz", "dropout_fwd"}
    # One forward kernel for every activation (passed at launch), and one with a dropout mask.
    assert sorted(v.variant for v in variants if v.name == "dense_fwd") == ["", "dropout"]
    # One dX kernel for the activations below whose act' reads y and one for those that read z (passed
    # at launch), each with a twin that also regenerates that layer's mask.
    assert sorted(v.variant for v in variants if v.name == "dense_dx") == ["", "dropout", "reads_z",
                                                                           "reads_z,dropout"]
    assert {v.variant for v in variants if v.name == "dense_dz"} == set(ACTIVATIONS) - {"identity"}
    assert {v.variant for v in variants if v.name == "dropout_dz"} == set(ACTIVATIONS)
    assert len({(v.name, v.variant) for v in variants}) == len(variants)


COMPILE_PROCESSES = 2
numba_variants = load("numba_variants")


@pytest.fixture(scope="module")
def compiled_variants():
    """Every entry of kernel_variants() compiled for sm_90 (PTX, and ptxas -v where ptxas is on
    PATH). The PTX comes from bench/numba_variants.py's ``every_ptx``, one compile (with the
    simulator off: libNVVM is needed, no GPU) that the kernel model (tests/test_kernel_model.py,
    on another pytest-xdist worker) shares through the temporary folder."""
    try:
        compiled = numba_variants.every_ptx((9, 0), COMPILE_PROCESSES)
    except numba_variants.NVVMUnavailable as exc:
        pytest.skip(str(exc))
    functions = compiled["device_functions"]
    report = {"returns": {name: f["returns"] for name, f in functions.items()},
              "float64_ops": {name: f["float64_ops"] for name, f in functions.items()}, "ptxas": {}}
    report["float64_ops"].update({label: ptx.count(".f64") for label, ptx in compiled["backend"].items()})
    report["float_min_max"] = {label: len(FLOAT_MIN_MAX.findall(ptx)) for label, ptx in compiled["backend"].items()}
    report["tile_alignment"] = {label: [int(a) for a in TILE_ARRAY.findall(ptx)]
                                for label, ptx in compiled["backend"].items()}
    ptxas = shutil.which("ptxas")
    if ptxas:
        def assemble(label_ptx):
            label, ptx = label_ptx
            with tempfile.TemporaryDirectory() as folder:
                source = Path(folder) / "kernel.ptx"
                source.write_text(ptx)
                # -c: relocatable, as numba-cuda's linker compiles a kernel's PTX at launch.
                done = subprocess.run([ptxas, "-arch=sm_90", "-c", "-v", str(source), "-o",
                                       str(source.with_suffix(".cubin"))],
                                      capture_output=True, text=True, check=True)
                return label, done.stderr

        with ThreadPoolExecutor(COMPILE_PROCESSES) as pool:
            report["ptxas"] = dict(pool.map(assemble, compiled["backend"].items()))
    return report


@pytest.mark.slow
def test_every_kernel_variant_compiles_to_ptx_with_float32_math_only(compiled_variants):
    """The simulator runs kernels as Python, so Numba never types them there. Compile them
    with the real toolchain: every activation (forward and derivative) must return float32,
    and no kernel variant may contain a float64 instruction (an untyped constant would add some)."""
    report = compiled_variants
    assert {label.partition("[")[0] for label in report["float64_ops"]} >= {v.name for v in nb.kernel_variants()}
    not_float32 = {name: t for name, t in report["returns"].items() if t != "float32"}
    assert not not_float32, f"activations returning another type than float32: {not_float32}"
    float64_ops = {name: n for name, n in report["float64_ops"].items() if n}
    assert not float64_ops, f"float64 instructions per kernel: {float64_ops}"


# PTX min.f32 / max.f32 (what Python's min and max on float32 compile to): they return the
# operand that is not NaN, where the simulator's Python min and max keep the NaN.
FLOAT_MIN_MAX = re.compile(r"\b(?:min|max)(?:\.\w+)*\.f32\b")


# The GEMM tiles' shared array in the PTX: its alignment (the array is TILE_SMEM_FLOATS floats).
TILE_ARRAY = re.compile(rf"\.shared \.align (\d+) \.b8 \w+\[{4 * nb.TILE_SMEM_FLOATS}\];")


@pytest.mark.slow
def test_the_gemm_tiles_are_16_byte_aligned_in_every_dense_kernel(compiled_variants):
    """The linker that builds a Numba kernel's cubin at launch compiles its PTX relocatable and
    trusts the declared alignment: at 4 bytes (Numba's default for float32) each 16-byte shared
    load of the tiles becomes four, and the dW loop's FFMA share falls from 76% to 66%."""
    tiles = {label: a for label, a in compiled_variants["tile_alignment"].items() if a}
    assert {label.partition("[")[0] for label in tiles} >= {"dense_fwd", "dense_dx", "dense_dw"}, sorted(tiles)
    assert all(a == [16] for a in tiles.values()), tiles


@pytest.mark.slow
def test_the_huber_kernel_clips_without_float_min_max_so_a_nan_gradient_stays_nan(compiled_variants):
    """The simulator cannot show it: on a GPU, min(max(nan, -delta), delta) is -delta, a finite
    gradient for a NaN prediction, where the NumPy reference (np.clip) gives NaN."""
    huber = {label: n for label, n in compiled_variants["float_min_max"].items() if label.startswith("huber_fwd_bwd")}
    assert huber and set(huber.values()) == {0}, huber


@pytest.mark.slow
def test_every_kernel_variant_assembles_for_sm_90_without_spills_or_local_memory(compiled_variants):
    """ptxas -v for each variant: no spill stores or loads and no stack frame, so the dense
    kernels keep their 8 x 8 accumulators in registers under the 128-register launch bounds."""
    if not compiled_variants["ptxas"]:
        pytest.skip("ptxas (it comes with nvcc) is not on PATH")
    assert len(compiled_variants["ptxas"]) == len(nb.kernel_variants())
    in_memory = {label: [line.strip() for line in log.splitlines() if "bytes stack frame" in line]
                 for label, log in compiled_variants["ptxas"].items()}
    clean = "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
    assert all(lines == [clean] for lines in in_memory.values()), {k: v for k, v in in_memory.items() if v != [clean]}


def test_host_arrays_read_as_inputs_are_copied_to_the_device_as_cupys_backend_copies_them():
    """A NumPy array where the kernels read one (a layer's input; a loss's predictions, which
    gpubp.losses passes as given) goes to the device, as the CuPy backend's ``asarray`` takes it; it
    raised numba-cuda's error about the CUDA array interface, which named no argument."""
    rng = np.random.default_rng(6)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((4, 3), (3, 2), (2,)))
    y, _ = nb.dense_forward(x, nb.asarray(w), nb.asarray(b), "relu")
    np.testing.assert_allclose(host(y), ref.dense_forward(x, w, b, "relu")[0], rtol=RTOL)
    target = rng.standard_normal((4, 2)).astype(np.float32)
    loss, grad = gb.losses.mse(x[:, :2].copy(), target, backend=nb)
    loss_ref, grad_ref = ref.mse(x[:, :2].copy(), target)
    assert loss == pytest.approx(loss_ref, rel=RTOL)
    np.testing.assert_allclose(host(grad), grad_ref, rtol=RTOL)


def test_activations_at_special_values_match_numpy():
    """relu(NaN) was 0 here (a comparison that sends NaN to the else branch). The simulator runs the
    kernels' float32 arithmetic in NumPy scalars, which warn about the inf * 0 a GPU does quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        check_activations_at_special_values(nb)


def flushing(backend, db_error: float = 0.0):
    """``backend`` as a GPU built with -ftz=true runs it: subnormal inputs of dense_forward read as
    zeros; ``db_error`` added to every bias gradient (a planted bug)."""
    tiny = np.finfo(np.float32).tiny

    def flushed(a):
        return np.where((a != 0) & (np.abs(a) < tiny), np.copysign(np.float32(0), a), a).astype(a.dtype)

    def dense_backward(*args, **kwargs):
        dx, dw, db = backend.dense_backward(*args, **kwargs)
        return dx, dw, db + np.float32(db_error)

    return types.SimpleNamespace(asarray=backend.asarray, to_host=backend.to_host, dense_backward=dense_backward,
                                 dense_forward=lambda x, w, b, act: backend.dense_forward(x, w, flushed(b), act))


def test_the_special_values_check_takes_a_flushed_subnormal_and_still_fails_a_wrong_gradient():
    """An H200 flushes the subnormal pre-activation to 0 (relu's db 0, not 2): the check must take
    that, and still fail a bias gradient that is wrong."""
    with np.errstate(invalid="ignore", over="ignore"):  # the reference's NaN and inf, as the check's own
        check_activations_at_special_values(flushing(ref))
        with pytest.raises(AssertionError, match="relu backward"):
            check_activations_at_special_values(flushing(ref, db_error=0.5), acts=["relu"])


@pytest.mark.parametrize("check", [check_an_off_relu_unit_passes_no_gradient_even_an_infinite_one,
                                   check_no_weight_decay_keeps_an_infinite_weight,
                                   check_cross_entropy_of_a_row_with_an_infinite_logit,
                                   check_softmax_and_cross_entropy_of_a_row_with_a_nan_logit,
                                   check_cross_entropy_of_a_label_outside_the_classes],
                         ids=["off relu unit", "no weight decay", "infinite logit", "nan logit", "label outside"])
def test_special_values_through_gradients_updates_and_losses_match_numpy(check):
    """dz was dy * act' (NaN for an inf dy at an off relu), weight decay 0 added 0 * p (NaN for an
    infinite weight), a +inf logit left its row's sum finite, and so did a NaN logit outside a
    row's first lane (its lane's NaN sum was skipped as an empty lane's)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the simulator's NumPy scalars warn where a GPU does not
        check(nb)


@pytest.mark.parametrize("env, expected", [(None, 0), ("1", 1)], ids=["default", "user_set"])
def test_numba_cudas_low_occupancy_warning_is_off_on_a_gpu_unless_asked_for(env, expected):
    """numba-cuda warns at each launch of under 128 blocks, which the backend makes by design; the
    backend turns that off where kernels run on a GPU (imported with the simulator off), unless
    the user's NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS asks for it."""
    environment = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", nb.LOW_OCCUPANCY_ENV)}
    environment["NUMBA_ENABLE_CUDASIM"] = "0"
    if env is not None:
        environment[nb.LOW_OCCUPANCY_ENV] = env
    code = ("from gpubp.backends import numba_backend as nb; from numba.cuda.core import config; "
            "print(config.CUDA_LOW_OCCUPANCY_WARNINGS)")
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, check=True)
    assert int(done.stdout.strip()) == expected


def test_two_threads_on_one_stream_keep_their_own_scratch_buffers(monkeypatch):
    """A launch returns before its kernel runs, so another thread's kernel can queue between this
    thread's launch and its read-back: with the scratch keyed by stream alone, thread A read back
    thread B's per-row losses. The simulator runs one launch at a time; the order a GPU allows is
    forced here: A reads back only after B's launch."""
    import threading

    launched = {"A": threading.Event(), "B": threading.Event()}
    to_host = nb.to_host

    def read_back_after_the_other_launched(a):
        name = threading.current_thread().name
        if name in launched:
            launched[name].set()
            launched["B"].wait(timeout=60)
        return to_host(a)

    rng = np.random.default_rng(0)
    labels = np.arange(16) % 5
    logits = {"A": rng.standard_normal((16, 5)).astype(np.float32),
              "B": 10 * rng.standard_normal((16, 5)).astype(np.float32)}
    alone = {name: nb.softmax_cross_entropy(nb.asarray(x), nb.asarray(labels))[0] for name, x in logits.items()}
    on_device = {name: (nb.asarray(x), nb.asarray(labels)) for name, x in logits.items()}
    monkeypatch.setattr(nb, "to_host", read_back_after_the_other_launched)
    together = {}

    def run(name):
        if name == "B":
            launched["A"].wait(timeout=60)
        together[name] = nb.softmax_cross_entropy(*on_device[name])[0]

    threads = [threading.Thread(target=run, args=(name,), name=name) for name in "AB"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone and alone["A"] != alone["B"]
