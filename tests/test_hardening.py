"""Hardening of the core: minimal cases that once gave wrong answers or crashed.

Each test pins one reported failure (the soundness and hardening issue); the fuzz test
(test_fuzz.py) guards the same class of bug on random architectures.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _models import random_mlp
from torch import nn

import openbox

F64 = torch.float64


def _max_abs_llc_error(ob, x, points):
    e = ob.explain(x)
    with torch.no_grad():
        want = ob.reference(points)
    got = torch.einsum("cn,pn->pc", e.weight[0].flatten(1), points.flatten(1)) + e.bias[0]
    return float((got - want).abs().max())


# --------------------------------------------------------------- same-function max-pool rows


def _overlapping_pools():
    torch.manual_seed(0)
    m = nn.Sequential(nn.MaxPool1d(2, stride=1), nn.MaxPool1d(2, stride=1), nn.Flatten(),
                      nn.Linear(6, 2)).double().eval()
    x = torch.tensor([[[0.97, 0.71, 0.46, 0.92, 0.65, 0.79, 0.18, 0.35]]], dtype=F64)
    return openbox.OpenBox(m, input_shape=(1, 8), dtype=F64), x


def _duplicating_adaptive_pool():
    torch.manual_seed(0)
    m = nn.Sequential(nn.AdaptiveAvgPool1d(10), nn.MaxPool1d(4), nn.Flatten(),
                      nn.Linear(2, 2)).double().eval()
    torch.manual_seed(1)
    x = torch.rand(1, 1, 5, dtype=F64)
    return openbox.OpenBox(m, input_shape=(1, 5), dtype=F64), x


@pytest.mark.parametrize("case", [_overlapping_pools, _duplicating_adaptive_pool])
def test_certified_radius_never_exceeds_the_polytope_radius(case):
    ob, x = case()
    poly = ob.polytope(x[0])
    assert not np.any(np.all(np.asarray(poly.A) == 0, axis=1)), "zero rows are dropped"
    for norm in (2, float("inf")):
        r = float(ob.certified_radius(x, norm=norm)[0])
        assert np.isfinite(r)
        assert r == pytest.approx(poly.radius(norm), rel=1e-12, abs=1e-15)
    # and the certificate holds: points on the sphere of 0.99 r keep the key and the LLC
    r = float(ob.certified_radius(x)[0])
    g = torch.Generator().manual_seed(3)
    u = torch.randn((200, *x.shape[1:]), generator=g, dtype=F64)
    pts = x + 0.99 * r * u / u.flatten(1).norm(dim=1).reshape(-1, 1, 1)
    keys = ob.region_key(pts)
    assert all(k == ob.explain(x).region_key[0] for k in keys)
    assert _max_abs_llc_error(ob, x, pts) <= 1e-12


def test_same_function_entries_are_no_facet_and_key_is_canonical():
    ob, x = _overlapping_pools()
    e = ob.explain(x)
    assert int(e.n_tight[0]) == 0
    # the pass picks the lowest window position among entries that are one function
    sel = next(iter(e.configuration.select.values()))
    assert e.region_key == ob.explain(x.clone()).region_key
    assert sel.dtype == torch.int64


def test_zero_rows_dropped_from_polytope_and_counted():
    ob, x = _duplicating_adaptive_pool()
    poly = ob.polytope(x[0])
    assert poly.n_dropped > 0
    assert np.all(np.linalg.norm(np.asarray(poly.A), axis=1) > 0)


# --------------------------------------------------------------- region keys


def test_region_keys_do_not_depend_on_the_batch_for_large_windows():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(17), nn.Flatten(),
                      nn.Linear(2, 3)).double().eval()
    ob = openbox.OpenBox(m, input_shape=(1, 17, 17), dtype=F64)
    g = torch.Generator().manual_seed(5)
    x = torch.rand((6, 1, 17, 17), generator=g, dtype=F64)
    x[0].zero_()
    x[0, 0, 0, 0] = 1.0  # its window maximum sits at position 0 of 289
    alone = [ob.region_key(x[i : i + 1])[0] for i in range(6)]
    for seed in range(3):
        perm = torch.randperm(6, generator=torch.Generator().manual_seed(seed))
        together = ob.region_key(x[perm])
        assert [alone[int(i)] for i in perm] == list(together)


def test_keys_of_different_models_dtypes_or_directions_differ():
    m = random_mlp(3, (4, 6, 3))
    x = 0.5 * torch.ones(1, 4, dtype=F64)
    a = openbox.OpenBox(m, (4,))
    b = openbox.OpenBox(copy.deepcopy(m), (4,))
    assert a.region_key(x) == b.region_key(x), "same model, dtype and direction"
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        next(m2.parameters()).add_(1e-3)
    other_model = openbox.OpenBox(m2, (4,))
    other_dtype = openbox.OpenBox(m, (4,), dtype=torch.float32)
    other_dir = openbox.OpenBox(m, (4,), direction=torch.tensor([1.0, 0.3, -0.2, 0.1]))
    k = a.region_key(x)[0]
    for ob in (other_model, other_dtype, other_dir):
        k2 = ob.region_key(x)[0]
        assert bytes(k2) == bytes(k) and k2 != k
    assert len(k.digest16) == 16 and k.digest16 != other_dir.region_key(x)[0].digest16


# --------------------------------------------------------------- explanation indexing


def test_explanation_indexing_by_mask_and_out_of_range():
    m = random_mlp(4, (4, 8, 3))
    ob = openbox.OpenBox(m, (4,))
    x = torch.rand((6, 4), generator=torch.Generator().manual_seed(0), dtype=F64)
    e = ob.explain(x)
    mask = e.prediction == e.prediction[0]
    sub = e[mask]
    assert len(sub) == int(mask.sum()) == len(sub.region_key)
    idx = mask.nonzero().flatten().tolist()
    assert list(sub.region_key) == [e.region_key[i] for i in idx]
    torch.testing.assert_close(sub.weight, e.weight[mask], rtol=0, atol=0)
    assert sub.configuration.batch_size == len(idx)
    assert e[-1].region_key == (e.region_key[-1],)
    with pytest.raises(IndexError, match="out of range"):
        e[10]
    with pytest.raises(IndexError, match="out of range"):
        e[-7]
    with pytest.raises(IndexError, match="boolean index"):
        e[torch.ones(3, dtype=torch.bool)]


def test_empty_batch_is_a_clear_error():
    ob = openbox.OpenBox(random_mlp(5, (4, 6, 3)), (4,))
    empty = torch.zeros(0, 4, dtype=F64)
    for call in (ob.explain, ob.verify, ob.certified_radius, ob.radius_pair):
        with pytest.raises(ValueError, match="empty batch"):
            call(empty)


# --------------------------------------------------------------- inputs as users pass them


def test_float32_input_is_converted_to_the_working_dtype():
    m = random_mlp(6, (4, 6, 3))
    ob = openbox.OpenBox(m, (4,), dtype=F64)
    x32 = torch.rand((3, 4), generator=torch.Generator().manual_seed(1))
    e = ob.explain(x32)
    assert e.weight.dtype == F64 and e.inputs.dtype == F64
    torch.testing.assert_close(e.weight, ob.explain(x32.double()).weight, rtol=0, atol=0)
    assert ob.verify(x32).ok


def test_errors_name_the_argument_as_the_user_knows_it():
    ob = openbox.OpenBox(random_mlp(7, (4, 6, 3)), (4,))
    bad = torch.tensor([0.0, float("nan"), 0.0, 0.0], dtype=F64)
    good = torch.zeros(4, dtype=F64)
    with pytest.raises(ValueError, match=r"^x contains NaN"):
        ob.polytope(bad)
    with pytest.raises(ValueError, match=r"x0 \(the segment's start\) contains NaN"):
        openbox.regions.segment(ob, bad, good, progress=False)
    with pytest.raises(ValueError, match=r"x1 \(the segment's end\) must have shape"):
        openbox.regions.segment(ob, good, torch.zeros(5, dtype=F64), progress=False)


def test_inputs_outside_a_declared_domain_are_rejected():
    m = random_mlp(8, (4, 6, 3))
    ob = openbox.OpenBox(m, (4,), domain=(0.0, 1.0))
    x = torch.full((2, 4), 0.5, dtype=F64)
    assert ob.verify(x).ok
    for call in (ob.explain, ob.verify, ob.certified_radius):
        with pytest.raises(ValueError, match="outside the declared domain.*domain=None"):
            call(3 * x)
    with pytest.raises(ValueError, match="outside the declared domain"):
        ob.polytope(3 * x[0])
    free = openbox.OpenBox(m, (4,))
    assert free.polytope(3 * x[0]).contains(3 * x[0])


def test_verify_compares_against_the_model_as_it_was_at_construction():
    m = random_mlp(9, (4, 6, 3))
    ob = openbox.OpenBox(m, (4,))
    x = torch.rand((3, 4), generator=torch.Generator().manual_seed(2), dtype=F64)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(2.0)  # the user edits the model afterwards
    report = ob.verify(x)
    assert report.ok, "program and reference are both snapshots of the model at construction"
    assert not openbox.OpenBox(m, (4,)).explain(x).weight.equal(ob.explain(x).weight)


def test_verify_does_not_write_into_the_input_of_an_in_place_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 3)).double().eval()
    ob = openbox.OpenBox(m, (4,))
    x = torch.tensor([[-1.0, 0.5, -0.25, 2.0]], dtype=F64)
    before = x.clone()
    assert ob.verify(x).ok
    torch.testing.assert_close(x, before, rtol=0, atol=0)


def test_float32_verify_scales_with_the_output_magnitude():
    from openbox.fmnist import load_demo_model, load_sample

    m, _ = load_demo_model()
    x = load_sample().images[:64] * 255.0  # unnormalised pixels: logits in the thousands
    ob32 = openbox.OpenBox(m, (1, 28, 28), dtype=torch.float32)
    report = ob32.verify(x)
    assert report.ok, str(report)
    assert float(report.logits.abs().max()) > 1000
    # the float32 bound is still 1e-4 where logits are of Fashion-MNIST size ...
    tol = ob32.tol
    m_small = torch.tensor([[20.0, -3.0]])
    assert bool(tol.matches(m_small + 9e-5, m_small).all())
    assert not bool(tol.matches(m_small + 1.1e-4, m_small).any())
    # ... and a real error is still caught at large scale
    big = report.logits
    assert not bool(tol.matches(big + 0.05 * big.abs().amax(1, keepdim=True), big).all())
