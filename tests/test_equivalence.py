"""openbox.regions.equivalence: do two networks compute the same function on a set?

References: copies whose BatchNorm is folded into the preceding layer by hand (the same
function, other parameters), copies with one weight moved by 1e-6, copies that differ only
through a unit that is dead on part of the input space, and both models' own forward,
evaluated here, independently of the walk, on every counterexample.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from _models import random_cnn, random_mlp
from torch import nn

import openbox
from openbox.regions.box import box
from openbox.regions.equivalence import (
    equivalent,
    equivalent_on_plane,
    equivalent_on_segment,
)
from openbox.regions.plane import plane

F64 = torch.float64
E1, E2 = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)


def _bn_scale(bn):
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return s, bn.bias.double() - bn.running_mean.double() * s


def fold(model: nn.Sequential) -> nn.Sequential:
    """A float64 copy of a Sequential with every BatchNorm folded into the Linear / Conv2d
    before it: ``w' = w gamma / sqrt(var + eps)``, ``b' = (b - mean) gamma / sqrt(var + eps)
    + beta`` (per output channel)."""
    named, out = list(model.named_children()), OrderedDict()
    i = 0
    while i < len(named):
        name, m = named[i][0], copy.deepcopy(named[i][1]).double()
        nxt = named[i + 1][1] if i + 1 < len(named) else None
        if isinstance(m, (nn.Linear, nn.Conv2d)) and isinstance(
                nxt, (nn.BatchNorm1d, nn.BatchNorm2d)):
            s, t = _bn_scale(nxt)
            with torch.no_grad():
                shape = (-1,) + (1,) * (m.weight.dim() - 1)
                m.weight.mul_(s.reshape(shape))
                m.bias.copy_(m.bias * s + t)
            i += 1
        out[name] = m
        i += 1
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in out.values())
    return nn.Sequential(out).eval()


def _differ_beyond_tolerance(model_a, model_b, x) -> bool:
    """Both models' own float64 forward at x (*shape): do they differ beyond 1e-10 (1 + |f|)?"""
    with torch.no_grad():
        fa = copy.deepcopy(model_a).double()(x[None].double())
        fb = copy.deepcopy(model_b).double()(x[None].double())
    return bool(((fb - fa).abs() > 1e-10 * (1 + fa.abs())).any())


@pytest.fixture(scope="module")
def mlps():
    model = random_mlp(0, (2, 10, 10, 3))
    folded = fold(model)
    x0 = torch.tensor([0.3, -0.2], dtype=F64)
    with torch.no_grad():
        assert not torch.equal(folded[0].weight, model[0].weight.double())
        torch.testing.assert_close(folded(x0[None]), model.double()(x0[None]), rtol=1e-12,
                                   atol=1e-12)
    # a last-layer weight of a hidden unit that is active at x0, moved by 1e-6
    with torch.no_grad():
        hidden = folded[:-1](x0[None])[0]
    moved = copy.deepcopy(folded)
    with torch.no_grad():
        moved[-1].weight[0, int(hidden.argmax())] += 1e-6
    boxes = {name: openbox.OpenBox(m, (2,)) for name, m in
             (("model", model), ("folded", folded), ("moved", moved))}
    return model, folded, moved, boxes, x0


def test_a_model_and_its_bn_folded_copy_are_equivalent_on_a_box(mlps):
    _, _, _, obs, x0 = mlps
    r = equivalent(obs["model"], obs["folded"], x0, 1.5, progress=False)
    assert r and r.equivalent and r.decided and r.complete
    assert r.counterexample is None and r.outputs is None
    # the same partition: the common refinement has exactly the model's regions
    n_regions = len(box(obs["model"], x0, 1.5, progress=False))
    assert r.cells == n_regions > 50
    assert "equivalent on the box" in str(r)


def test_a_weight_moved_by_1e_6_gives_a_verified_counterexample(mlps):
    model, _, moved, obs, x0 = mlps
    r = equivalent(obs["model"], obs["moved"], x0, 1.5, progress=False)
    assert not r and r.decided and r.counterexample is not None
    x = r.counterexample
    assert x.shape == (2,) and bool(((x - x0).abs() <= 1.5).all())
    assert _differ_beyond_tolerance(model, moved, x)  # both models' own forward
    fa, fb = r.outputs
    assert r.difference == pytest.approx(float((fb - fa).abs().max()))
    assert 1e-9 < r.difference < 1e-4
    assert "not equivalent" in str(r)


def test_a_difference_below_the_tolerance_is_no_difference(mlps):
    model, folded, _, obs, x0 = mlps
    nudged = copy.deepcopy(folded)
    with torch.no_grad():
        nudged[-1].bias[0] += 1e-12  # far below 1e-10 (1 + |f|)
    r = equivalent(obs["model"], openbox.OpenBox(nudged, (2,)), x0, 1.5, progress=False)
    assert r and r.cells > 50
    with torch.no_grad():
        nudged[-1].bias[0] += 1e-8  # far above it
    r = equivalent(obs["model"], openbox.OpenBox(nudged, (2,)), x0, 1.5, progress=False)
    assert not r and _differ_beyond_tolerance(model, nudged, r.counterexample)


def test_a_difference_through_a_unit_dead_on_the_box_is_no_difference():
    """b differs from a only through first-layer unit k: equivalent on a box where k is off
    everywhere, not on a box where it turns on."""
    a = fold(random_mlp(4, (2, 8, 8, 3), batch_norm=False))
    w, b = a[0].weight[0].detach(), a[0].bias[0].detach()
    x0 = -(1.0 + b) * w / (w @ w)  # z_0(x0) = -1
    b_model = copy.deepcopy(a)
    with torch.no_grad():
        b_model[2].weight[:, 0] += 1e-3  # the outgoing weights of unit 0
    oa, ob = openbox.OpenBox(a, (2,)), openbox.OpenBox(b_model, (2,))
    small = 0.9 / float(w.abs().sum())  # |z_0 + 1| <= 0.9 on the box
    near = equivalent(oa, ob, x0, small, progress=False)
    assert near and near.cells > 1
    far = equivalent(oa, ob, x0, 4.0 / float(w.abs().sum()), progress=False)
    assert not far
    x = far.counterexample
    assert float(w @ x + b) > 0  # unit 0 is on there
    assert _differ_beyond_tolerance(a, b_model, x)
    # the segment and plane variants agree on both boxes
    e = small * torch.ones(2, dtype=F64)
    assert equivalent_on_segment(oa, ob, x0 - e, x0 + e)
    assert equivalent_on_plane(oa, ob, x0, E1, E2, (-small, small, -small, small))
    big = 4.0 / float(w.abs().sum())
    assert not equivalent_on_plane(oa, ob, x0, E1, E2, (-big, big, -big, big))
    seg = equivalent_on_segment(oa, ob, x0, x0 + big * w.sign())
    assert not seg and _differ_beyond_tolerance(a, b_model, seg.counterexample)


def test_segment_and_plane_variants_agree_with_the_box(mlps):
    model, _, moved, obs, x0 = mlps
    ext = (-1.5, 1.5, -1.5, 1.5)
    corner = torch.tensor([1.5, 1.4], dtype=F64)
    same = equivalent_on_plane(obs["model"], obs["folded"], x0, E1, E2, ext)
    assert same and same.cells == len(plane(obs["model"], x0, E1, E2, ext,
                                                            progress=False))
    assert equivalent_on_segment(obs["model"], obs["folded"], x0 - corner, x0 + corner)
    diff = equivalent_on_plane(obs["model"], obs["moved"], x0, E1, E2, ext)
    assert not diff and _differ_beyond_tolerance(model, moved, diff.counterexample)
    seg = equivalent_on_segment(obs["model"], obs["moved"], x0 - corner, x0 + corner)
    assert not seg and seg.where == "segment"
    assert _differ_beyond_tolerance(model, moved, seg.counterexample)


@pytest.fixture(scope="module")
def cnns():
    shape = (1, 10, 10)
    model = random_cnn(3, channels=(3, 4), input_shape=shape)
    folded = fold(model)
    g = torch.Generator().manual_seed(5)
    x0, x1 = torch.rand((2, *shape), generator=g, dtype=F64)
    return model, folded, x0, x1


def test_a_cnn_and_its_bn_folded_copy_are_equivalent_on_a_segment(cnns):
    model, folded, x0, x1 = cnns
    oa, ob = openbox.OpenBox(model, x0.shape), openbox.OpenBox(folded, x0.shape)
    r = equivalent_on_segment(oa, ob, x0, x1)
    assert r and r.cells > 10 and r.where == "segment"
    moved = copy.deepcopy(folded)
    with torch.no_grad():
        moved.fc.weight += 1e-6
    r = equivalent_on_segment(oa, openbox.OpenBox(moved, x0.shape), x0, x1)
    assert not r and _differ_beyond_tolerance(model, moved, r.counterexample)


def test_a_cnn_and_its_bn_folded_copy_are_equivalent_on_a_small_box():
    shape = (1, 4, 4)
    model = random_cnn(2, channels=(2, 3), input_shape=shape)
    x0 = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    folded = fold(model)
    oa, ob = openbox.OpenBox(model, shape), openbox.OpenBox(folded, shape)
    r = equivalent(oa, ob, x0, 0.1, progress=False)
    assert r and r.cells > 5
    with torch.no_grad():
        folded.fc.bias[1] += 1e-6
    r = equivalent(oa, openbox.OpenBox(folded, shape), x0, 0.1, progress=False)
    assert not r and _differ_beyond_tolerance(model, folded, r.counterexample)


def test_max_cells_leaves_the_verdict_undecided(mlps):
    _, _, _, obs, x0 = mlps
    r = equivalent(obs["model"], obs["folded"], x0, 1.5, max_cells=3, progress=False)
    assert not r and not r.decided and not r.complete and r.cells == 3
    assert r.counterexample is None and "undecided" in str(r)


def test_bad_input_raises_clear_errors(mlps):
    _, _, _, obs, x0 = mlps
    a = obs["model"]
    other_shape = openbox.OpenBox(random_mlp(0, (3, 10, 10, 3)), (3,))
    with pytest.raises(ValueError, match=r"same input shape.*input shapes \(2,\) and \(3,\)"):
        equivalent(a, other_shape, x0, 0.1)
    with pytest.raises(ValueError, match="3 and 4 classes"):
        equivalent(a, openbox.OpenBox(random_mlp(0, (2, 10, 10, 4)), (2,)), x0, 0.1)
    with pytest.raises(ValueError, match="dtypes"):
        equivalent(a, openbox.OpenBox(random_mlp(0, (2, 10, 10, 3)), (2,),
                                      dtype=torch.float32), x0, 0.1)
    for eps in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="eps must be finite and > 0"):
            equivalent(a, obs["folded"], x0, eps)
    with pytest.raises(NotImplementedError, match="second-order cone"):
        equivalent(a, obs["folded"], x0, 0.1, norm=2)
    with pytest.raises(ValueError, match="same input shape"):
        equivalent_on_segment(a, other_shape, x0, x0 + 1)
    with pytest.raises(ValueError, match="same input shape"):
        equivalent_on_plane(a, other_shape, x0, E1, E2)
    with pytest.raises(ValueError, match="same point"):
        equivalent_on_segment(a, obs["folded"], x0, x0)
