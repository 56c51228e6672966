"""openbox.regions.box: every linear region that meets an L-inf box.

References: openbox's region keys at a fine grid and at dense random samples of the box (a
sample misses slivers, so only "every sampled region is found" is asserted), the exact 2-D
plane map of the same box (:func:`openbox.regions.plane`, half-plane clipping: no LP),
the model's own forward, and points stepped off each shared facet.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _models import random_cnn, random_mlp

import openbox
from openbox.regions.box import BoxSearch, box
from openbox.regions.plane import plane

F64 = torch.float64


def _in_box(bs: BoxSearch, x: torch.Tensor) -> bool:
    p = x.reshape(-1).double().numpy()
    return bool(np.all(p >= bs.lo) and np.all(p <= bs.hi))


def _samples(x0, eps, n, seed, lo=None, hi=None):
    g = torch.Generator().manual_seed(seed)
    pts = x0 + eps * (2 * torch.rand((n, *x0.shape), generator=g, dtype=F64) - 1)
    if lo is not None:
        pts = pts.clamp(lo, hi)
    return pts


@pytest.fixture(scope="module")
def two_d():
    model = random_mlp(0, (2, 10, 10, 3))
    ob = openbox.OpenBox(model, (2,), batch_size=4096)
    x0 = torch.tensor([0.3, -0.2], dtype=F64)
    return model, ob, x0, box(ob, x0, 1.5, progress=False)


def test_two_dimensional_box_holds_every_grid_region_and_matches_the_plane_map(two_d):
    _, ob, x0, bs = two_d
    assert bs.complete and len(bs) > 50 and bs.skipped_facets == 0
    a = np.linspace(-1.5, 1.5, 241)
    grid = x0 + torch.tensor(np.stack(np.meshgrid(a, a), -1).reshape(-1, 2), dtype=F64)
    grid_keys = set(ob.region_key(grid))
    assert grid_keys <= set(bs.regions)
    assert len(grid_keys) >= 0.8 * len(bs)  # a grid this fine sees most of them
    # the exact plane map of the same square: same regions, same adjacency
    pm = plane(ob, x0, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]),
               (-1.5, 1.5, -1.5, 1.5), progress=False)
    assert pm.complete
    assert {p.region_key for p in pm.polygons} == set(bs.regions)
    plane_edges = {frozenset((pm.polygons[i].region_key, pm.polygons[j].region_key))
                   for i, j in pm.graph.edges}
    assert {frozenset(e) for e in bs.graph.edges} == plane_edges
    # areas: each region's polytope within the box has its polygon's area
    for p in pm.polygons:
        poly = bs.regions[p.region_key].polytope
        area = _area(_vertices_2d(poly.A, poly.d, bs.lo, bs.hi))
        assert area == pytest.approx(p.area, rel=1e-7, abs=1e-12)


def _vertices_2d(A, d, lo, hi):
    """Vertices of {x : A x <= d} ∩ [lo, hi]: every intersection of two of the lines that
    satisfies all rows, sorted by angle."""
    A = np.vstack([A, np.eye(2), -np.eye(2)])
    d = np.concatenate([d, hi, -lo])
    pts = []
    for i in range(len(A)):
        for j in range(i + 1, len(A)):
            M = A[[i, j]]
            if abs(np.linalg.det(M)) < 1e-12:
                continue
            p = np.linalg.solve(M, d[[i, j]])
            if np.all(A @ p <= d + 1e-9 * (1 + np.abs(d))):
                pts.append(p)
    pts = np.unique(np.round(np.array(pts), 12), axis=0)
    c = pts.mean(0)
    return pts[np.argsort(np.arctan2(pts[:, 1] - c[1], pts[:, 0] - c[0]))]


def _area(v):
    x, y = v[:, 0], v[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def test_witnesses_llcs_and_polytopes(two_d):
    model, ob, x0, bs = two_d
    witnesses = torch.stack([r.witness for r in bs.regions.values()])
    assert list(ob.region_key(witnesses)) == list(bs.regions)
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        want = ref(witnesses)
    for (key, r), w in zip(bs.regions.items(), want):
        assert r.key == key and r.radius > 0
        assert _in_box(bs, r.witness)
        assert r.polytope.contains(r.witness)
        torch.testing.assert_close(r.weight @ r.witness + r.bias, w, rtol=1e-10, atol=1e-10)
        assert r.prediction == int(w.argmax())
        assert r.polytope.n_constraints <= r.n_rows
    # a grid point off every facet lies in its own region's polytope and in no other's
    a = np.linspace(-1.49, 1.49, 37)
    grid = x0 + torch.tensor(np.stack(np.meshgrid(a, a), -1).reshape(-1, 2), dtype=F64)
    keys = ob.region_key(grid)
    for q, k in zip(grid, keys):
        assert bs.regions[k].polytope.contains(q)
    assert bs.locate(grid[::7]) == list(keys[::7])
    assert bs.locate(x0[None] + 2.0) == [None]  # outside the box


def test_graph_edges_join_regions_that_share_a_facet(two_d):
    _, ob, _, bs = two_d
    assert bs.graph.number_of_nodes() == len(bs)
    steps = []
    for k1, k2, e in bs.graph.edges(data=True):
        a, d, p = e["row"], e["offset"], e["point"]
        assert np.linalg.norm(a) == pytest.approx(1.0)
        assert a @ p == pytest.approx(d, abs=1e-9)
        for k in (k1, k2):  # the point is on the boundary of both polytopes
            poly = bs.regions[k].polytope
            assert poly.contains(p)
            an = poly.A / np.linalg.norm(poly.A, axis=1, keepdims=True)
            dn = poly.d / np.linalg.norm(poly.A, axis=1)
            sign = 1.0 if k == e["inside"] else -1.0
            assert np.min(np.abs(an @ p - dn) + np.abs(an - sign * a).sum(1)) < 1e-8
        other = k2 if e["inside"] == k1 else k1
        steps.append((e["inside"], other, p, a))
    # a small step off the facet to either side lands in the two regions
    delta = 1e-7
    inner = torch.tensor(np.array([p - delta * a for _, _, p, a in steps]))
    outer = torch.tensor(np.array([p + delta * a for _, _, p, a in steps]))
    assert list(ob.region_key(inner)) == [s[0] for s in steps]
    assert list(ob.region_key(outer)) == [s[1] for s in steps]


def test_a_start_on_a_facet_and_a_box_inside_one_region(two_d):
    model, ob, _, _ = two_d
    lin, bn = model[0], model[1]  # Linear - BatchNorm1d - ReLU
    w, b = lin.weight[0].detach().double(), lin.bias[0].detach().double()
    gamma, beta, mean, var = (float(t[0].detach()) for t in (bn.weight, bn.bias, bn.running_mean,
                                                   bn.running_var))
    z = mean - beta * (var + bn.eps) ** 0.5 / gamma  # BN output 0 <=> w.x + b = z
    on = torch.tensor([0.2, 0.0], dtype=F64)
    on[1] = (z - b - w[0] * on[0]) / w[1]  # first-layer unit 0 is exactly at its kink
    assert int(ob.explain(on[None]).n_tight[0]) >= 1
    bs = box(ob, on, 0.5, progress=False)
    pm = plane(ob, on, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]),
               (-0.5, 0.5, -0.5, 0.5), progress=False)
    assert bs.complete and {p.region_key for p in pm.polygons} == set(bs.regions)
    inside = box(ob, torch.tensor([0.3, -0.2], dtype=F64), 1e-6, progress=False)
    assert len(inside) == 1 and inside.graph.number_of_edges() == 0 and inside.complete


def test_max_regions_stops_the_walk_incomplete(two_d):
    _, ob, x0, full = two_d
    bs = box(ob, x0, 1.5, max_regions=5, progress=False)
    assert not bs.complete and len(bs) == 5
    assert set(bs.regions) <= set(full.regions)
    assert set(bs.graph.nodes) == set(bs.regions)
    assert box(ob, x0, 1.5, max_regions=len(full), progress=False).complete


def test_five_inputs_against_dense_sampling():
    model = random_mlp(1, (5, 12, 10, 4))
    ob = openbox.OpenBox(model, (5,), batch_size=4096)
    x0 = torch.linspace(-0.5, 0.5, 5, dtype=F64)
    bs = box(ob, x0, 0.3, progress=False)
    assert bs.complete and len(bs) > 20
    pts = torch.cat([_samples(x0, 0.3, 10_000, 2),
                     x0 + 0.3 * torch.tensor(np.array(np.meshgrid(*[[-1, 1]] * 5)).reshape(5, -1).T,
                                             dtype=F64)])  # and the box's corners
    keys = set(ob.region_key(pts))
    assert keys <= set(bs.regions)
    assert len(keys) >= 0.5 * len(bs)
    w = torch.stack([r.witness for r in bs.regions.values()])
    assert list(ob.region_key(w)) == list(bs.regions)
    assert all(_in_box(bs, x) for x in w)


def test_the_domain_clips_the_box_and_a_start_on_its_boundary():
    model = random_mlp(2, (3, 10, 8, 3))
    ob = openbox.OpenBox(model, (3,), domain=(0.0, 1.0), batch_size=4096)
    x0 = torch.tensor([0.0, 0.5, 0.9], dtype=F64)  # on the domain's face x_0 = 0
    bs = box(ob, x0, 0.4, progress=False)
    np.testing.assert_allclose(bs.lo, [0.0, 0.1, 0.5])
    np.testing.assert_allclose(bs.hi, [0.4, 0.9, 1.0])
    assert bs.complete and len(bs) > 3
    pts = _samples(x0, 0.4, 20_000, 3, 0.0, 1.0)
    assert set(ob.region_key(pts)) <= set(bs.regions)
    for r in bs.regions.values():
        assert _in_box(bs, r.witness) and ob.region_key(r.witness[None])[0] == r.key


def test_small_cnn_against_dense_sampling():
    shape = (1, 4, 4)
    model = random_cnn(2, channels=(2, 3), input_shape=shape)
    ob = openbox.OpenBox(model, shape, batch_size=4096)
    x0 = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    bs = box(ob, x0, 0.15, progress=False)
    assert bs.complete and len(bs) > 30
    assert set(ob.region_key(_samples(x0, 0.15, 20_000, 4))) <= set(bs.regions)
    w = torch.stack([r.witness for r in bs.regions.values()])
    assert list(ob.region_key(w)) == list(bs.regions)
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        want = ref(w)
    got = torch.stack([r.weight.flatten(1) @ r.witness.flatten() + r.bias
                       for r in bs.regions.values()])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_float32_finds_the_same_regions(two_d):
    _, ob64, x0, bs64 = two_d
    ob = openbox.OpenBox(random_mlp(0, (2, 10, 10, 3)), (2,), dtype=torch.float32,
                         batch_size=4096)
    bs = box(ob, x0.float(), 1.5, progress=False)
    assert bs.complete
    assert len(bs) == len(bs64)
    a = np.linspace(-1.5, 1.5, 121)
    grid = x0 + torch.tensor(np.stack(np.meshgrid(a, a), -1).reshape(-1, 2), dtype=F64)
    assert set(ob.region_key(grid.float())) <= set(bs.regions)


@pytest.mark.parametrize("eps, norm, error, match", [
    (0.0, float("inf"), ValueError, "eps must be finite and > 0"),
    (-1.0, float("inf"), ValueError, "eps must be finite and > 0"),
    (float("nan"), float("inf"), ValueError, "eps must be finite and > 0"),
    (float("inf"), float("inf"), ValueError, "eps must be finite and > 0"),
    ("wide", float("inf"), ValueError, "eps must be a number"),
    (0.1, 2, NotImplementedError, "second-order cone"),
    (0.1, 1, ValueError, "norm must be float"),
])
def test_bad_arguments_raise_clear_errors(two_d, eps, norm, error, match):
    _, ob, x0, _ = two_d
    with pytest.raises(error, match=match):
        box(ob, x0, eps, norm, progress=False)


def test_bad_points_and_limits(two_d):
    _, ob, x0, _ = two_d
    with pytest.raises(ValueError, match="x0 must have shape"):
        box(ob, torch.zeros(3, dtype=F64), 0.1, progress=False)
    with pytest.raises(ValueError, match=">= 1"):
        box(ob, x0, 0.1, max_regions=0, progress=False)
    boxed = openbox.OpenBox(random_mlp(0, (2, 10, 10, 3)), (2,), domain=(0.0, 1.0))
    with pytest.raises(ValueError, match="outside the declared domain"):
        box(boxed, torch.tensor([1.5, 0.5], dtype=F64), 0.1, progress=False)
