"""openbox.regions.plane: exact 2-D slices of the partition.

References: the model's own forward and openbox's region keys at sampled points, a
brute-force grid on a network with a 2-D input, and plain geometry (areas, overlaps).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math

import networkx as nx
import numpy as np
import pytest
import torch
from _models import random_cnn, random_mlp

import openbox
from openbox.regions.plane import plane

F64 = torch.float64


def _points(pm, n, seed):
    a0, a1, b0, b1 = pm.extent
    g = np.random.default_rng(seed)
    return np.c_[g.uniform(a0, a1, n), g.uniform(b0, b1, n)]


def _check_tiling(pm, pts):
    total = sum(p.area for p in pm.polygons)
    area = (pm.extent[1] - pm.extent[0]) * (pm.extent[3] - pm.extent[2])
    assert pm.complete
    assert total == pytest.approx(area, rel=1e-9)
    strict = np.array([[bool(p.contains(q[None], tol=-1e-7)[0]) for p in pm.polygons]
                       for q in pts])
    loose = np.array([[bool(p.contains(q[None], tol=1e-9)[0]) for p in pm.polygons]
                      for q in pts])
    assert strict.sum(1).max() <= 1, "two polygons overlap"
    assert loose.sum(1).min() >= 1, "a point lies in no polygon"


def _along_an_edge(verts, seg, rel=1e-9):
    """The segment (2, 2) lies on one edge of the polygon (K, 2): both ends on the edge's
    line and within its span, to ``rel`` times the polygon's size."""
    size = float(np.abs(verts).max() + np.ptp(verts, axis=0).max())
    for a, b in zip(verts, np.roll(verts, -1, 0)):
        d = b - a
        n = np.array([-d[1], d[0]]) / np.linalg.norm(d)
        t = (seg - a) @ d / (d @ d)
        if np.abs((seg - a) @ n).max() <= rel * size and t.min() >= -rel and t.max() <= 1 + rel:
            return True
    return False


def test_two_dimensional_input_matches_a_brute_force_grid():
    model = random_mlp(0, (2, 10, 10, 3))
    ob = openbox.OpenBox(model, (2,))
    pm = plane(ob, torch.zeros(2, dtype=F64), torch.tensor([1.0, 0.0]),
               torch.tensor([0.0, 1.0]), (-3, 3, -2, 2.5), progress=False)
    assert len(pm) > 20
    grid = np.stack(np.meshgrid(np.linspace(-2.99, 2.99, 61), np.linspace(-1.99, 2.49, 47)),
                    -1).reshape(-1, 2)
    _check_tiling(pm, _points(pm, 300, 1))
    where = pm.locate(grid)
    assert (where >= 0).all()
    keys = ob.region_key(torch.tensor(grid, dtype=F64))
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        want = ref(torch.tensor(grid, dtype=F64)).numpy()
    for q, i, k, w in zip(grid, where, keys, want):
        poly = pm.polygons[i]
        strict = poly.contains(q[None], tol=-1e-9)[0]
        if strict:  # off every edge: the key is the polygon's
            assert k == poly.region_key
        np.testing.assert_allclose(poly.logits(q)[0], w, rtol=1e-9, atol=1e-9)
    assert {p.region_key for p in pm.polygons} >= set(keys)


def test_cnn_slice_keys_llc_and_graph():
    model = random_cnn(3, channels=(3, 4), input_shape=(1, 12, 12))
    ob = openbox.OpenBox(model, (1, 12, 12))
    g = torch.Generator().manual_seed(4)
    x0, x1, x2 = torch.rand((3, 1, 12, 12), generator=g, dtype=F64)
    pm = plane(ob, x0, x1 - x0, x2 - x0, (-0.05, 0.05, -0.05, 0.05), progress=False)
    assert len(pm) > 10
    pts = _points(pm, 200, 2)
    _check_tiling(pm, pts)
    where = pm.locate(pts)
    xs = x0 + torch.tensor(pts[:, :1, None, None]) * (x1 - x0) + torch.tensor(
        pts[:, 1:, None, None]) * (x2 - x0)
    keys = ob.region_key(xs)
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        want = ref(xs).numpy()
    for q, i, k, w in zip(pts, where, keys, want):
        assert k == pm.polygons[i].region_key
        np.testing.assert_allclose(pm.polygons[i].logits(q)[0], w, rtol=1e-9, atol=1e-9)
    assert nx.is_connected(pm.graph)
    agree, total = 0, 0
    for i, j, data in pm.graph.edges(data=True):
        seg = data["segment"]
        mid = seg.mean(0)
        assert pm.polygons[i].contains(mid[None])[0] and pm.polygons[j].contains(mid[None])[0]
        # a shared boundary, not a touch at a vertex: the segment lies along an edge of both
        for k in (i, j):
            assert _along_an_edge(pm.polygons[k].vertices, seg), (i, j, k)
        d = seg[1] - seg[0]
        n = np.array([d[1], -d[0]]) / np.linalg.norm(d)
        side = [mid + s * 1e-7 * n for s in (1, -1)]
        xs2 = torch.stack([x0 + a * (x1 - x0) + b * (x2 - x0) for a, b in side])
        with torch.no_grad():
            classes = ref(xs2).argmax(1)
        agree += data["decision_boundary"] == bool(classes[0] != classes[1])
        total += 1
    assert agree == total, f"decision-boundary flags agree with the model on {agree}/{total}"
    for p in pm.polygons:  # counter-clockwise, convex
        v = p.vertices
        e = np.roll(v, -1, 0) - v
        assert (e[:, 0] * np.roll(e, -1, 0)[:, 1] - e[:, 1] * np.roll(e, -1, 0)[:, 0]
                >= -1e-15).all()


def test_domain_clips_the_extent():
    model = random_mlp(5, (6, 10, 8, 3))
    ob = openbox.OpenBox(model, (6,), domain=(0.0, 1.0))
    g = torch.Generator().manual_seed(6)
    x0 = 0.2 + 0.6 * torch.rand(6, generator=g, dtype=F64)
    u, v = torch.randn((2, 6), generator=g, dtype=F64)
    pm = plane(ob, x0, u, v, (-1, 1, -1, 1), progress=False)
    total = sum(p.area for p in pm.polygons)
    from openbox.regions.plane import _area

    assert total == pytest.approx(_area(pm.domain_polygon), rel=1e-9)
    assert _area(pm.domain_polygon) < 4.0
    for p in pm.polygons:
        for a, b in p.vertices:
            x = x0 + a * u + b * v
            assert float(x.min()) >= -1e-9 and float(x.max()) <= 1 + 1e-9


def test_plot_draws_regions_and_boundaries(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    model = random_mlp(7, (2, 8, 3))
    ob = openbox.OpenBox(model, (2,))
    pm = plane(ob, torch.zeros(2, dtype=F64), torch.tensor([1.0, 0.0]),
               torch.tensor([0.0, 1.0]), (-2, 2, -2, 2), progress=False)
    ax = pm.plot()
    assert f"{len(pm)} linear regions" in ax.get_title()
    assert len(ax.collections) == 3 and ax.get_xlabel().startswith("a")
    ax.figure.savefig(tmp_path / "plane.png")
    assert (tmp_path / "plane.png").stat().st_size > 1000


def test_plane_bad_input():
    ob = openbox.OpenBox(random_mlp(8, (3, 6, 2)), (3,))
    x = torch.zeros(3, dtype=F64)
    u = torch.tensor([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="parallel"):
        plane(ob, x, u, 2 * u, progress=False)
    with pytest.raises(ValueError, match="a_min < a_max"):
        plane(ob, x, u, torch.tensor([0.0, 1.0, 0.0]), (1, 1, 0, 1), progress=False)
    with pytest.raises(ValueError, match="extent must be"):
        plane(ob, x, u, torch.tensor([0.0, 1.0, 0.0]), (0, 1), progress=False)
    with pytest.raises(ValueError, match="v must have shape"):
        plane(ob, x, u, torch.zeros(2), progress=False)
    with pytest.raises(ValueError, match="non-zero"):
        plane(ob, x, u, torch.zeros(3), progress=False)
    w = torch.tensor([0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="starts must be a positive"):
        plane(ob, x, u, w, starts=0, progress=False)
    with pytest.raises(ValueError, match="batch must be a positive"):
        plane(ob, x, u, w, batch=0, progress=False)
    ob32 = openbox.OpenBox(random_mlp(8, (3, 6, 2)), (3,), dtype=torch.float32)
    with pytest.raises(ValueError, match="need an OpenBox in torch.float64"):
        plane(ob32, x.float(), u, w, progress=False)


def test_many_facets_through_one_vertex_regression():
    """Found by the fuzz test (seed 1, case 50, inputs rectified): clipping by many lines
    through a tied x0 left an edge of rounding length, whose line then cut a neighbour's
    coverage of a real edge and stopped the walk as inconsistent."""
    import fuzz_models as fm

    case = fm.build_case(1, 50)
    torch.set_num_threads(1)
    ob = openbox.OpenBox(case.model, case.input_shape)
    x0, x1 = case.x[0].clamp_min(0), case.x[-1].clamp_min(0)
    u = x1 - x0
    v = torch.randn(case.input_shape, generator=torch.Generator().manual_seed(50), dtype=F64)
    v = v - (v * u).sum() / (u * u).sum() * u
    pm = plane(ob, x0, u, v * (u.norm() / v.norm()), (-0.05, 0.05, -0.05, 0.05),
               progress=False)
    assert pm.complete and pm.coverage == pytest.approx(1.0, abs=1e-9)
    pts = _points(pm, 100, 3)
    _check_tiling(pm, pts)


def _clip_reference(verts, labels, g, h, label):
    """Sutherland-Hodgman, one vertex at a time (the reference for the vectorised clip)."""
    s = verts @ g - h
    inside = s <= 0
    out_v, out_l = [], []
    for i in range(len(verts)):
        j = (i + 1) % len(verts)
        if inside[i]:
            out_v.append(verts[i])
            out_l.append(labels[i])
        if inside[i] != inside[j]:
            out_v.append(verts[i] + s[i] / (s[i] - s[j]) * (verts[j] - verts[i]))
            out_l.append(labels[i] if inside[j] else label)
    return np.array(out_v).reshape(-1, 2), np.array(out_l, dtype=np.int64)


def test_vectorised_clip_and_stretches_match_one_at_a_time_references():
    """_clip against a vertex-by-vertex Sutherland-Hodgman; _Edges.stretches (all
    edge/polygon pairs at once) against _segment_inside pair by pair, on random polygons
    (clipped from one square, so they overlap) and every polygon's edges, its own
    included."""
    from openbox.regions.plane import _clip, _Edges, _segment_inside

    g = np.random.default_rng(0)
    polys = []
    for _ in range(30):
        v, lab = np.array([[-1.0, -1], [1, -1], [1, 1], [-1, 1]]), np.full(4, -1)
        for r in range(g.integers(1, 7)):
            n = g.normal(size=2)
            h = float(g.uniform(0.05, 0.9)) * np.linalg.norm(n)
            want_v, want_l = _clip_reference(v, lab, n, h, r)
            v, lab = _clip(v, lab, n, h, r)
            assert len(v) == len(want_v)  # no vertices of rounding distance here
            np.testing.assert_array_equal(v, want_v)
            np.testing.assert_array_equal(lab, want_l)
        polys.append(v)
    store = _Edges()
    store.add(0, polys)
    edge, poly, ref = [], [], []
    for t in range(len(store.owner)):
        for k in range(len(polys)):
            edge.append(t)
            poly.append(k)
            ref.append(_segment_inside(store.p[t], store.q[t], polys[k]))
    s0, s1, lo, hi = store.stretches(np.array(edge), np.array(poly))
    np.testing.assert_array_equal(np.c_[s0, s1], np.array(ref))
    own = store.owner[np.array(edge)] == np.array(poly)
    # an edge lies along its own polygon's edge, over its whole length
    np.testing.assert_allclose(lo[own], 0.0, atol=1e-12)
    np.testing.assert_allclose(hi[own], 1.0, atol=1e-12)
    assert (s0[own] == 0).all() and (s1[own] == 1).all()


def _key_map(pm):
    """key -> (area, centroid), and the graph as key pairs."""
    polys = {p.region_key: (p.area, p.centroid) for p in pm.polygons}
    edges = {frozenset((pm.polygons[i].region_key, pm.polygons[j].region_key))
             for i, j in pm.graph.edges}
    return polys, edges


def test_box_pairs_by_windows_are_the_dense_test():
    """_boxes_meet's windowed search (boxes sorted by lower x) gives the pairs the test of
    every pair gives, in the same order: random boxes with a few wide ones, boxes that
    only touch, and one box spanning everything."""
    P = importlib.import_module("openbox.regions.plane")
    rng = np.random.default_rng(0)
    for trial in range(60):
        e, n = int(rng.integers(1, 300)), int(rng.integers(1, 500))
        c, ec = rng.uniform(-1, 1, (n, 2)), rng.uniform(-1, 1, (e, 2))
        w = rng.exponential(0.05, (n, 2))
        w[rng.uniform(size=n) < 0.02] *= 20
        ew = rng.exponential(0.02, (e, 2))
        lo, hi, elo, ehi = c - w, c + w, ec - ew, ec + ew
        if trial % 3 == 0 and min(n, e) > 3:  # touching (closed boxes meet)
            elo[0, 0], ehi[1, 0], lo[3] = hi[1, 0], lo[2, 0], (-5.0, -5.0)
            hi[3] = (5.0, 5.0)
        old = P.BOX_PAIRS_DENSE
        try:
            P.BOX_PAIRS_DENSE = 10**12
            dense = P._boxes_meet(elo, ehi, lo, hi)
            P.BOX_PAIRS_DENSE = 0
            windowed = P._boxes_meet(elo, ehi, lo, hi)
        finally:
            P.BOX_PAIRS_DENSE = old
        assert len(dense[0]) > 0 or trial % 3
        np.testing.assert_array_equal(dense[0], windowed[0])
        np.testing.assert_array_equal(dense[1], windowed[1])


def test_batch_size_and_neighbour_guesses_do_not_change_the_map():
    """One point per pass (no batch, so no guess keeps a crossing back), big batches and
    walks from a grid of starts give the same regions, areas and graph; and the guessed
    neighbour across a facet edge (the edge's row flipped) is the configured one for most
    edges (the reference: the
    configuration just across each edge's middle)."""
    from openbox.configuration import configure
    from openbox.constraints import rows_in_plane
    from openbox.regions.plane import BOUNDARY, _States

    model = random_cnn(3, channels=(3, 4), input_shape=(1, 12, 12))
    ob = openbox.OpenBox(model, (1, 12, 12))
    g = torch.Generator().manual_seed(4)
    x0, x1, x2 = torch.rand((3, 1, 12, 12), generator=g, dtype=F64)
    u, v = x1 - x0, x2 - x0
    ext = (-0.03, 0.03, -0.03, 0.03)
    maps = [plane(ob, x0, u, v, ext, batch=b, starts=n, progress=False)
            for b, n in ((1, 6), (7, 1), (7, 3), (256, 1), (256, 6))]
    assert len(maps[0]) > 40
    (p1, e1), *rest = [_key_map(pm) for pm in maps]
    for polys, edges in rest:
        assert set(polys) == set(p1) and edges == e1
        for k, (area, c) in polys.items():
            assert area == pytest.approx(p1[k][0], rel=1e-9, abs=1e-15)
            np.testing.assert_allclose(c, p1[k][1], rtol=1e-9, atol=1e-12)

    pm = maps[0]
    states = _States()

    def hashes_at(ab):
        xs = x0 + torch.tensor(ab[:, :1, None, None]) * u + torch.tensor(
            ab[:, 1:, None, None]) * v
        dirs = torch.stack([u, v, ob.direction]).unsqueeze(1).expand(3, len(ab), *u.shape)
        _, config, gates, _ = configure(ob.program, xs, dirs, ob.tol, record=True)
        layout = [(k, int(t.shape[1])) for k, t, _, _ in rows_in_plane(ob.program, config,
                                                                       gates, ob.tol)]
        return states.hashes(config, layout), layout

    right, total, pool_rows = 0, 0, 0
    for poly in pm.polygons:
        h, layout = hashes_at(poly.centroid[None])
        guess = states.across(h, 0, poly.edge_labels, layout)
        verts = poly.vertices
        for i, lab in enumerate(poly.edge_labels):
            if lab == BOUNDARY:
                continue
            a, b = verts[i], verts[(i + 1) % len(verts)]
            d = b - a
            if np.linalg.norm(d) < 1e-6:
                continue
            out = 0.5 * (a + b) + 1e-7 * np.array([d[1], -d[0]]) / np.linalg.norm(d)
            there = hashes_at(out[None])[0][0][0]
            right += int(there == guess[i])
            total += 1
            gate = layout[int(np.searchsorted(h[3], lab, side="right")) - 1][0]
            pool_rows += int(gate not in h[4])
    # wrong guesses: a ReLU that turns on in a max-pool window of zeros also moves the
    # window's selection (the walk then crosses once more; the maps above agree)
    assert total > 100 and right >= 0.6 * total, (right, total)
    assert pool_rows > 0


def _polygon_reference(tie, G, h, rows, p, start):
    """One polygon, one clip at a time (the reference for the lockstep _polygons): clip by
    the cutting row nearest p until no row cuts by more than rounding."""
    from openbox.regions.plane import _clip

    verts, labels = start.copy(), np.full(len(start), -1)
    gn = np.abs(G).sum(axis=1)
    reach = (h - G @ p) / np.linalg.norm(G, axis=1)
    while len(verts) >= 3:
        excess = G @ verts.T - h[:, None]
        thr = tie * (1.0 + np.abs(h) + gn * np.abs(verts).max())
        cutting = np.flatnonzero((excess - thr[:, None]).max(axis=1) > 0)
        if cutting.size == 0:
            break
        r = cutting[np.argmin(reach[cutting])]
        verts, labels = _clip(verts, labels, G[r], h[r], int(rows[r]))
    return verts, labels


def test_lockstep_polygons_match_one_polygon_at_a_time():
    """_polygons clips many polygons at once (each with its own rows, padded): the same
    polygons and edge labels as clipping each alone, and each polygon is the part of the
    extent where all its rows hold (checked on random points)."""
    from openbox.regions.plane import _polygons

    ob = openbox.OpenBox(random_mlp(8, (3, 6, 2)), (3,))
    g = np.random.default_rng(1)
    start = np.array([[-1.0, -1], [1, -1], [1, 1], [-1, 1]])
    items = []
    for i in range(25):
        m = int(g.integers(1, 40))
        p = g.uniform(-0.5, 0.5, 2)
        G = g.normal(size=(m, 2))
        h = G @ p + g.exponential(0.4, m) * np.linalg.norm(G, axis=1)
        if i % 5 == 0:
            h[0] = G[0] @ p  # p on the line of a row (a crossing point)
        dist = (h - G @ p) / np.abs(G).sum(axis=1)
        items.append((G, h, np.arange(m) + 100 * i, dist, p))
    got = _polygons(ob, items, start)
    q = g.uniform(-1, 1, (2000, 2))
    for (G, h, rows, _, p), (verts, labels) in zip(items, got):
        want_v, want_l = _polygon_reference(ob.tol.tie, G, h, rows, p, start)
        assert len(verts) == len(want_v) >= 3
        np.testing.assert_allclose(verts, want_v, rtol=0, atol=1e-13)
        np.testing.assert_array_equal(labels, want_l)
        inside = openbox.regions.Polygon(verts, None, 0, np.zeros((1, 2)), np.zeros(1),
                                         labels).contains(q, tol=-1e-9)
        assert np.all(G @ q[inside].T <= h[:, None] + 1e-12)
        holds = np.all(G @ q.T <= h[:, None] - 1e-9, axis=0)
        assert np.all(inside[holds])


def test_max_regions_stops_the_walk_with_a_part_of_the_full_map():
    """A walk stopped by max_regions says so, and what it found is part of the full map
    (same keys, same polygons), the seed's region first; from x0 alone (starts=1) it is
    connected."""
    model = random_mlp(0, (2, 10, 10, 3))
    ob = openbox.OpenBox(model, (2,))
    args = (torch.zeros(2, dtype=F64), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]),
            (-3, 3, -2, 2.5))
    full = plane(ob, *args, progress=False)
    area = {p.region_key: p.area for p in full.polygons}
    assert full.complete
    for starts in (1, 6):
        part = plane(ob, *args, max_regions=20, batch=4, starts=starts, progress=False)
        assert not part.complete
        assert 20 <= len(part) < len(full)
        assert part.coverage < 1
        assert part.polygons[0].contains(np.zeros((1, 2)))[0]
        for p in part.polygons:
            assert p.area == pytest.approx(area[p.region_key], rel=1e-9)
        if starts == 1:  # one walk from x0: the regions found are x0's surroundings
            assert nx.is_connected(part.graph)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_in_plane_near_is_the_dense_rows_filtered(dtype):
    """rows_in_plane(near=...) forms only the rows whose line passes within near of each
    input: exactly the dense rows (same values, bit for bit) with slack < near (|rate1| +
    |rate2|) and a rate not 0, on a ReLU, a LeakyReLU and max-pools with padding and
    overlapping windows, at generic points and at tied ones (a zero background: tied
    windows)."""
    from collections import OrderedDict

    from openbox.configuration import configure
    from openbox.constraints import rows_in_plane

    layers = OrderedDict(conv1=torch.nn.Conv2d(1, 3, 3, padding=1), relu1=torch.nn.ReLU(),
                         pool1=torch.nn.MaxPool2d(3, stride=2, padding=1),
                         conv2=torch.nn.Conv2d(3, 4, 3, padding=1),
                         relu2=torch.nn.LeakyReLU(0.1),
                         pool2=torch.nn.MaxPool2d(2), flatten=torch.nn.Flatten(),
                         fc=torch.nn.Linear(4 * 2 * 2, 3))
    torch.manual_seed(0)
    model = torch.nn.Sequential(layers).eval()
    with torch.no_grad():
        model.conv1.bias.zero_()  # a zero input ties every unit of the first layer
    ob = openbox.OpenBox(model, (1, 10, 10), dtype=dtype)
    g = torch.Generator().manual_seed(5)
    xs = torch.rand((6, 1, 10, 10), generator=g, dtype=dtype)
    xs[0] = 0.0
    xs[1, :, :5] = 0.0
    dirs = torch.randn((2, 6, 1, 10, 10), generator=g, dtype=dtype)
    dirs = torch.cat([dirs, ob.direction.expand(1, 6, 1, 10, 10)])
    near = torch.tensor([0.0, 1e-3, 0.05, 0.3, 2.0, float("inf")], dtype=dtype)
    # the OpenBox's tolerances, and coarse ones under which many rows tie without being
    # equal (their slack is set to 0) and many ties are flat along both directions
    coarse = dataclasses.replace(ob.tol, tie=0.05, same_function=0.05)
    for tol in (ob.tol, coarse):
        _, config, gates, _ = configure(ob.program, xs, dirs, tol, record=True)
        dense = rows_in_plane(ob.program, config, gates, tol)
        sparse = rows_in_plane(ob.program, config, gates, tol, near=near)
        assert [k for k, *_ in dense] == [k for k, *_ in sparse]
        kinds, kept = set(), 0
        for (k, s, r1, r2), (_, m, index, s2, q1, q2) in zip(dense, sparse):
            assert m == s.shape[1]
            want = (s < near[:, None] * (r1.abs() + r2.abs())) & ((r1 != 0) | (r2 != 0))
            np.testing.assert_array_equal(index.numpy(), np.flatnonzero(want.numpy()))
            for a, b in ((s, s2), (r1, q1), (r2, q2)):
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(a.reshape(-1)[index].numpy(), b.numpy())
            kinds.add(type(ob.program.nodes[k]).__name__)
            kept += len(index)
            assert 0 < len(index) < want.numel()
        assert kinds == {"ReLU", "MaxPool"} and kept > 0


def test_state_hashes_are_the_xor_of_every_gate_input_word():
    """_States.hashes: each input's hash is the XOR of words[k][unit, state] over every
    unit of every gate (ReLU: on / off; max-pool: the selected position), the reference
    taken unit by unit."""
    from openbox.configuration import configure
    from openbox.regions.plane import _States

    model = random_cnn(3, channels=(3, 4), input_shape=(1, 12, 12))
    ob = openbox.OpenBox(model, (1, 12, 12))
    xs = torch.rand((5, 1, 12, 12), generator=torch.Generator().manual_seed(2), dtype=F64)
    _, config, _, _ = configure(ob.program, xs, ob.direction, ob.tol)
    layout = [(k, config.on[k][0].numel() if k in config.on
               else config.select[k].shape[1] * config.window_sizes[k])
              for k in ob.program.gates]
    states = _States()
    h, st, words, _, relu = states.hashes(config, layout)
    assert relu == set(config.on) and relu and set(config.select)
    for i in range(config.batch_size):
        want = np.uint64(0)
        for k, _ in layout:
            s = (config.on[k] if k in config.on else config.select[k])[i].reshape(-1)
            for unit, state in enumerate(s.tolist()):
                want ^= words[k][unit, int(state)]
            np.testing.assert_array_equal(st[k][i], s.numpy().astype(np.int64))
        assert h[i] == want


def test_batched_centroids_and_starts():
    """_centroids gives each polygon's _centroid (a zero-area one: the vertices' mean);
    _starts gives the origin first, then grid centres strictly inside, nearest first."""
    from openbox.regions.plane import _centroid, _centroids, _inside, _starts

    g = np.random.default_rng(3)
    polys = []
    for k in (3, 4, 7, 12):
        t = np.sort(g.uniform(0, 2 * np.pi, k))
        polys.append(np.c_[np.cos(t), np.sin(t)] * g.uniform(0.1, 5) + g.normal(size=2))
    polys.append(np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))  # no area
    got = _centroids(polys)
    for p, c in zip(polys, got):
        np.testing.assert_allclose(c, _centroid(p), rtol=1e-12, atol=1e-15)

    tri = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    pts = _starts(tri, np.array([0.5, 0.5]), 4, 100)
    assert np.array_equal(pts[0], [0.5, 0.5])
    assert all(_inside(tri, q) for q in pts[1:])
    assert len(pts) == 1 + 6 - 1  # the cells below the diagonal, less the origin's centre
    d = np.abs(pts[1:] - pts[0]).sum(axis=1)
    assert np.all(np.diff(d) >= 0)
    assert len(_starts(tri, np.array([0.5, 0.5]), 4, 3)) == 3


def test_first_boxes_do_not_change_the_map(monkeypatch):
    """Polygons first clipped in small boxes around their points (every size of box: one
    that holds the polygon, one it reaches so that the wider box is needed, one that even
    the wider box cuts, so that every row of the extent is gathered again) are the ones
    clipped by every row that meets the extent: same regions, areas and graph."""
    P = importlib.import_module("openbox.regions.plane")

    model = random_cnn(3, channels=(3, 4), input_shape=(1, 12, 12))
    ob = openbox.OpenBox(model, (1, 12, 12))
    g = torch.Generator().manual_seed(4)
    x0, x1, x2 = torch.rand((3, 1, 12, 12), generator=g, dtype=F64)
    args = (ob, x0, x1 - x0, x2 - x0, (-0.03, 0.03, -0.03, 0.03))
    calls = []
    half_planes = P._half_planes

    def counted(*a, **k):
        calls.append(k.get("radius", a[7] if len(a) > 7 else None))
        return half_planes(*a, **k)

    monkeypatch.setattr(P, "_half_planes", counted)
    maps, full_calls = [], []
    for factor in (1e9, 3.0, 0.3, 1e-4):
        monkeypatch.setattr(P, "RADIUS_FACTOR", factor)
        calls.clear()
        maps.append(plane(*args, batch=16, progress=False))
        full_calls.append(sum(r is None for r in calls))
    assert full_calls[0] == 0 and full_calls[-1] > 0  # the last gathered every row again
    (p0, e0), *rest = [_key_map(pm) for pm in maps]
    assert len(p0) > 40
    for polys, edges in rest:
        assert set(polys) == set(p0) and edges == e0
        for k, (area, c) in polys.items():
            assert area == pytest.approx(p0[k][0], rel=1e-9, abs=1e-15)
            np.testing.assert_allclose(c, p0[k][1], rtol=1e-9, atol=1e-12)
    for pm in maps:
        assert pm.complete and abs(pm.coverage - 1) < 1e-9
        assert all((p.edge_labels != P.BOX).all() for p in pm.polygons)


def test_probe_samples_are_covered_by_the_polygons_that_contain_them():
    """_Walk._cover_samples marks exactly the samples that Polygon.contains puts inside a
    polygon; probes are uncovered samples, apart from the given points and each other."""
    P = importlib.import_module("openbox.regions.plane")

    model = random_mlp(0, (2, 10, 10, 3))
    ob = openbox.OpenBox(model, (2,))
    pm = plane(ob, torch.zeros(2, dtype=F64), torch.tensor([1.0, 0.0]),
               torch.tensor([0.0, 1.0]), (-3, 3, -2, 2.5), progress=False)
    walk = P._Walk(ob, torch.zeros(1, 2, dtype=F64), torch.tensor([1.0, 0.0], dtype=F64),
                   torch.tensor([0.0, 1.0], dtype=F64), pm.domain_polygon)
    some = pm.polygons[: len(pm.polygons) // 2]
    walk.polys = list(some)
    walk._cover_samples(0)
    inside = np.zeros(len(walk.samples), dtype=bool)
    for poly in some:
        inside |= poly.contains(walk.samples)
    np.testing.assert_array_equal(walk.uncovered, ~inside)
    assert walk.last_size == pytest.approx(np.median([np.sqrt(p.area) for p in some]))
    near = np.array([[0.0, 0.0]])
    free = walk.uncovered.copy()
    got = walk.probes(10, near)
    assert 0 < len(got) <= 10
    pts = np.vstack([near, got])
    gaps = np.abs(pts[:, None] - pts[None]).max(axis=2) + np.eye(len(pts)) * 1e9
    assert gaps.min() >= walk.last_size
    hit = [int(np.flatnonzero((walk.samples == q).all(axis=1))[0]) for q in got]
    assert free[hit].all() and not walk.uncovered[hit].any()


@pytest.mark.parametrize("shared", [False, True])
def test_rows_in_plane_near_on_grid_pools_is_the_gathered_path(monkeypatch, shared):
    """The grid pools' near rows (a window test on strided views, then the exact test on
    the windows that pass it) equal the gathered path's bit for bit, on a pool that reads
    the input (its derivatives one shared row when the directions are shared) and one
    after a ReLU, with a zero background (tied, flat windows)."""
    from collections import OrderedDict

    from openbox import configuration as cfg
    from openbox.configuration import configure
    from openbox.constraints import rows_in_plane

    torch.manual_seed(3)
    model = torch.nn.Sequential(OrderedDict(
        pool0=torch.nn.MaxPool2d(2), conv=torch.nn.Conv2d(1, 3, 3, padding=1),
        relu=torch.nn.ReLU(), pool=torch.nn.MaxPool2d(2), flatten=torch.nn.Flatten(),
        fc=torch.nn.Linear(3 * 3 * 3, 4))).double().eval()
    ob = openbox.OpenBox(model, (1, 12, 12))
    pools = [n for n in ob.program.nodes if type(n).__name__ == "MaxPool"]
    assert len(pools) == 2 and all(cfg.pool_grid(n) is not None for n in pools)
    g = torch.Generator().manual_seed(8)
    n = 40
    xs = torch.rand((n, 1, 12, 12), generator=g, dtype=F64)
    xs[0] = 0.0
    xs[1, :, :6] = 0.0
    d = torch.randn((2, 1 if shared else n, 1, 12, 12), generator=g, dtype=F64)
    d[:, :, :, :4] = 0.0  # flat along both directions there: tied windows stay tied
    dirs = torch.cat([d, ob.direction.expand(1, *d.shape[1:])])
    if shared:
        dirs = dirs[:, 0]  # (D, *input_shape): one row per direction
    # distances from none to all, densely in between: rows at every side of the threshold
    near = torch.cat([torch.tensor([0.0, float("inf")], dtype=F64),
                      torch.logspace(-4, 1, n - 2, dtype=F64)])
    _, config, gates, _ = configure(ob.program, xs, dirs, ob.tol, record=True)
    if shared:
        k0 = ob.program.gates[0]
        assert gates.derivatives[k0].reshape(n, -1).stride(0) == 0
    grid = rows_in_plane(ob.program, config, gates, ob.tol, near=near)
    monkeypatch.setattr(cfg, "_pool_grid", lambda node: None)
    gathered = rows_in_plane(ob.program, config, gates, ob.tol, near=near)
    assert len(grid) == len(gathered) == 3
    kept = 0
    for a, b in zip(grid, gathered):
        assert a[:2] == b[:2]
        for x, y in zip(a[2:], b[2:]):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x.numpy(), y.numpy())
        kept += len(a[2])
    assert kept > 0


class _TwoBranches(torch.nn.Module):
    """conv_a(x) + conv_b(x) -> ReLU -> max-pool -> linear: an Add before the first gate."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.b = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc = torch.nn.Linear(3 * 5 * 5, 4)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.a(x) + self.b(x))).flatten(1))


def _screen_models():
    from collections import OrderedDict

    torch.manual_seed(11)
    padded = torch.nn.Sequential(OrderedDict(
        pool0=torch.nn.MaxPool2d(2), conv=torch.nn.Conv2d(1, 3, 3, padding=1),
        relu=torch.nn.LeakyReLU(0.1), pool=torch.nn.MaxPool2d(3, stride=2, padding=1),
        flatten=torch.nn.Flatten(), fc=torch.nn.Linear(3 * 3 * 3, 4))).eval()
    return [random_cnn(2, channels=(3, 4), input_shape=(1, 10, 10)), padded,
            _TwoBranches().eval()]


def _screen_case(model, coarse: bool, seed: int):
    """(ob, tol, x0, u, v, generator) on (1, 10, 10): a random plane whose first four
    rows are a background it does not move (zero there); tol the OpenBox's, or, coarse,
    one under which many entries tie."""
    ob = openbox.OpenBox(model.double(), (1, 10, 10))
    tol = dataclasses.replace(ob.tol, tie=0.02, same_function=0.02) if coarse else ob.tol
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((1, 10, 10), generator=g, dtype=F64)
    u, v = torch.randn((2, 1, 10, 10), generator=g, dtype=F64)
    x0[:, :4], u[:, :4], v[:, :4] = 0.0, 0.0, 0.0
    return ob, tol, x0, u, v, g


@pytest.mark.parametrize("coarse", [False, True])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_plane_screen_leaves_the_rows_as_they_are(which, coarse):
    """rows_in_plane(near=, only=PlaneScreen.only(...)) equals rows_in_plane(near=) bit
    for bit at points of the screen's box (any unit directions, near up to the bound),
    on a conv-BN-ReLU-max-pool CNN, a pool on the input then a LeakyReLU and a padded,
    overlapping pool (not screened: padding), and an Add before the first ReLU; with a
    zero background (flat, tied windows) and, coarse, a tie tolerance under which many
    entries tie. The screen leaves units out (it is not a no-op), and leaving out every
    unit changes the rows (the comparison can fail)."""
    from openbox.configuration import configure
    from openbox.constraints import PlaneScreen, rows_in_plane

    ob, tol, x0, u, v, _ = _screen_case(_screen_models()[which], coarse, 20 + which)
    e = 0.05
    lo, hi = np.array([-e, -0.5 * e]), np.array([0.5 * e, e])
    screen = PlaneScreen(ob.program, tol, x0, u, v, lo, hi)
    n = 48
    rng = np.random.default_rng(which)
    pts = lo + rng.random((n, 2)) * (hi - lo)
    pts[:4] = [lo, hi, [lo[0], hi[1]], [hi[0], lo[1]]]  # the box's corners
    th = rng.random(n) * 2 * np.pi
    ns, es = np.c_[np.cos(th), np.sin(th)], np.c_[-np.sin(th), np.cos(th)]
    near_max = 0.2 * e
    near = torch.as_tensor(np.r_[near_max, near_max * np.logspace(-3, 0, n - 1)])

    def comb(ab):
        ab = torch.as_tensor(ab)
        return ab[:, 0].reshape(-1, 1, 1, 1) * u + ab[:, 1].reshape(-1, 1, 1, 1) * v

    dirs = torch.stack([comb(ns), comb(es), ob.direction.expand(n, 1, 10, 10)])
    _, config, gates, _ = configure(ob.program, x0 + comb(pts), dirs, tol, record=True)

    def same(a, b):
        return len(a) == len(b) and all(
            x[:2] == y[:2] and all(torch.equal(p, q) for p, q in zip(x[2:], y[2:]))
            for x, y in zip(a, b))

    dense = rows_in_plane(ob.program, config, gates, tol, near=near)
    only = screen.only(near_max, pts)
    assert set(only) == set(screen.q) and only
    assert same(dense, rows_in_plane(ob.program, config, gates, tol, near=near, only=only))
    sizes = {k: len(q) for k, q in screen.q.items()}
    assert sum(len(c) for c in only.values()) < sum(sizes.values())
    # the screened gates have near rows here, so a screen that leaves every unit out
    # changes the result (the comparison can fail)
    assert sum(len(rows[2]) for rows in dense if rows[0] in only) > 0
    empty = {k: c[:0] for k, c in only.items()}
    assert not same(dense, rows_in_plane(ob.program, config, gates, tol, near=near, only=empty))


def test_plane_screen_refuses_points_outside_its_box():
    """PlaneScreen.only screens nothing ({}) for points outside the box it bounds; a
    reversed box and a float32 program are errors; non-finite bounds screen nothing."""
    from openbox.constraints import PlaneScreen

    ob = openbox.OpenBox(_screen_models()[0].double(), (1, 10, 10))
    g = torch.Generator().manual_seed(3)
    x0, u, v = torch.randn((3, 1, 10, 10), generator=g, dtype=F64)
    screen = PlaneScreen(ob.program, ob.tol, x0, u, v, np.array([-0.1, -0.1]),
                         np.array([0.1, 0.1]))
    assert screen.only(0.01, np.array([[0.0, 0.0]]))
    assert screen.only(0.01, np.array([[0.0, 0.1 + 1e-12]])) == {}
    with pytest.raises(ValueError, match="lo <= hi"):
        PlaneScreen(ob.program, ob.tol, x0, u, v, np.array([0.1, 0.0]), np.array([0.0, 0.1]))
    ob32 = openbox.OpenBox(_screen_models()[0], (1, 10, 10), dtype=torch.float32)
    with pytest.raises(ValueError, match="float64"):
        PlaneScreen(ob32.program, ob32.tol, x0.float(), u.float(), v.float(),
                    np.array([-0.1, -0.1]), np.array([0.1, 0.1]))
    # non-finite bounds (a direction of infinities: NaN values) leave every unit in
    wild = PlaneScreen(ob.program, ob.tol, x0, u * np.inf, v, np.array([-0.1, -0.1]),
                       np.array([0.1, 0.1]))
    assert all(len(c) == len(wild.q[k])
               for k, c in wild.only(0.01, np.array([[0.0, 0.0]])).items())


@pytest.mark.parametrize("which", ["cnn", "two_branches", "mlp", "resnet", "pool_first"])
def test_plane_prefix_is_the_pass_on_the_points(which):
    """configure(given=PlanePrefix.given(...)) (the affine prefix combined from the
    plane's rows) agrees with the pass on the points themselves: the same region keys at
    random points, logits, rates and gate values to 1e-12 of their scale; on a CNN, an
    Add before the first ReLU, an MLP, a ResNet, and a pool on the input (nothing to
    combine: no prefix). Wrong combined values change the pass (they are used)."""
    from openbox.configuration import PlanePrefix, configure

    from _models import resnet_like

    models = {"cnn": (lambda: random_cnn(4, channels=(3, 4), input_shape=(1, 10, 10)),
                      (1, 10, 10)),
              "two_branches": (lambda: _TwoBranches(), (1, 10, 10)),
              "mlp": (lambda: random_mlp(5, (12, 16, 8, 5)), (12,)),
              "resnet": (lambda: resnet_like(6), (2, 10, 10)),
              "pool_first": (lambda: _screen_models()[1], (1, 10, 10))}
    build, shape = models[which]
    torch.manual_seed(7)
    ob = openbox.OpenBox(build().double().eval(), shape)
    g = torch.Generator().manual_seed(9)
    x0 = torch.rand((1, *shape), generator=g, dtype=F64)
    u, v = 0.1 * torch.randn((2, *shape), generator=g, dtype=F64)
    prefix = PlanePrefix(ob.program, x0, u, v, ob.direction)
    assert (not prefix.rows) == (which == "pool_first")
    n = 32
    pts = torch.rand((n, 2), generator=g, dtype=F64) * 2 - 1
    th = torch.rand(n, generator=g, dtype=F64) * 2 * math.pi
    ns, es = torch.stack([th.cos(), th.sin()], 1), torch.stack([-th.sin(), th.cos()], 1)
    comb = lambda ab: ab[:, 0].reshape(-1, *[1] * len(shape)) * u + \
        ab[:, 1].reshape(-1, *[1] * len(shape)) * v  # noqa: E731
    xs, dirs = x0 + comb(pts), torch.stack([comb(ns), comb(es), ob.direction.expand(n, *shape)])
    want = configure(ob.program, xs, dirs, ob.tol, record=True, all_rates=True)
    got = configure(ob.program, xs, dirs, ob.tol, record=True, all_rates=True,
                    given=prefix.given(pts, ns, es))
    assert got.configuration.region_keys() == want.configuration.region_keys()

    def close(a, b):
        scale = 1 + float(b.abs().max())
        assert float((a - b).abs().max()) <= 1e-12 * scale

    close(got.logits, want.logits)
    close(got.rates, want.rates)
    for k in ob.program.gates:
        for d in ("values", "derivatives", "derivatives2"):
            close(getattr(got.gate_values, d)[k], getattr(want.gate_values, d)[k])
    if prefix.rows:  # the combined values are used: wrong ones change the pass
        bad = {i: t + 1.0 for i, t in prefix.given(pts, ns, es).items()}
        assert not torch.equal(configure(ob.program, xs, dirs, ob.tol, given=bad).logits,
                               want.logits)


def test_interpreter_runs_only_what_the_given_values_leave_needed():
    """Interpreter.run(given=): the nodes whose values are given, and those only they
    need, do not run; the result is the run's own when the given value is its own."""
    from linearize.ir import Evaluator

    ob = openbox.OpenBox(random_cnn(1, channels=(3, 4), input_shape=(1, 10, 10)).double(),
                         (1, 10, 10))
    prog = ob.program
    x = torch.rand((3, 1, 10, 10), dtype=F64, generator=torch.Generator().manual_seed(2))
    ran = []

    class Counting(Evaluator):
        def dispatch(self, k, node, args):
            ran.append(k)
            return super().dispatch(k, node, args)

    want = Counting().run(prog, x)
    assert ran == list(range(len(prog.nodes)))
    first = prog.gates[0]
    value = Counting().run(prog, x, until=first - 1)  # the first gate's input
    ran.clear()
    got = Counting().run(prog, x, given={first: value})
    assert torch.equal(got, want) and ran == list(range(first, len(prog.nodes)))
    ran.clear()
    assert not torch.equal(Counting().run(prog, x, given={first: value + 1}), want)


@pytest.mark.parametrize("coarse", [False, True])
@pytest.mark.parametrize("which", [0, 2])
def test_pass_with_the_screens_varying_windows_is_the_pass(which, coarse):
    """configure(varying=PlaneScreen.varying(pts)) (the rule run on the first point for
    the windows that keep their order over the box, copied to the others) gives the same
    keys, selections, tie counts, logits and gate values, bit for bit, as the pass that
    decides every window at every point; with a zero background (flat tied windows) and
    coarse ties. Copying every window from the first point changes the selections here
    (the comparison can fail)."""
    from openbox.configuration import configure
    from openbox.constraints import PlaneScreen

    ob, tol, x0, u, v, _ = _screen_case(_screen_models()[which], coarse, 30 + which)
    lo, hi = np.array([-0.05, -0.02]), np.array([0.03, 0.05])
    screen = PlaneScreen(ob.program, tol, x0, u, v, lo, hi)
    n = 40
    rng = np.random.default_rng(which)
    pts = lo + rng.random((n, 2)) * (hi - lo)
    th = rng.random(n) * 2 * np.pi
    ns, es = np.c_[np.cos(th), np.sin(th)], np.c_[-np.sin(th), np.cos(th)]

    def comb(ab):
        ab = torch.as_tensor(ab)
        return ab[:, 0].reshape(-1, 1, 1, 1) * u + ab[:, 1].reshape(-1, 1, 1, 1) * v

    xs = x0 + comb(pts)
    dirs = torch.stack([comb(ns), comb(es), ob.direction.expand(n, 1, 10, 10)])
    varying = screen.varying(pts)
    assert varying and all(len(c) < len(screen.q[k]) for k, c in varying.items())
    want = configure(ob.program, xs, dirs, tol, record=True, all_rates=True)
    got = configure(ob.program, xs, dirs, tol, record=True, all_rates=True, varying=varying)
    a, b = want.configuration, got.configuration
    assert a.region_keys() == b.region_keys()
    for k in a.select:
        assert torch.equal(a.select[k], b.select[k]) and torch.equal(a.index[k], b.index[k])
    assert torch.equal(a.n_tight_pool, b.n_tight_pool)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.rates, want.rates)
    for k in ob.program.gates:
        assert torch.equal(got.gate_values.values[k], want.gate_values.values[k])
    # the windows left out do not vary here, but the others do: deciding every window at
    # the first point only gives other selections
    empty = {k: c[:0] for k, c in varying.items()}
    wrong = configure(ob.program, xs, dirs, tol, varying=empty).configuration
    assert any(not torch.equal(wrong.select[k], a.select[k]) for k in varying)


@pytest.mark.parametrize("coarse", [False, True])
@pytest.mark.parametrize("which", [0, 2, "leaky"])
def test_plane_block_pass_is_the_pass(which, coarse):
    """configure(block=PlaneBlock.bind(...)) (the first ReLU and max-pool decided once
    where the screen proves they cannot change, per point elsewhere; the pass starting
    after the pool) equals the pass through both gates on the prefix's values bit for
    bit: keys, selections, indices, tie counts, logits, rates, every later gate's values,
    and the two gates' values and derivatives at every position (formed on demand), also
    on a sub-batch; on a conv-BN-ReLU-pool CNN, an Add before the ReLU and a LeakyReLU,
    with a flat background and coarse ties (flat windows whose choice is not their
    maximum). A block whose centre decisions are wrong changes the keys (the comparison
    can fail)."""
    from collections import OrderedDict

    from openbox.configuration import PlaneBlock, PlanePrefix, configure
    from openbox.constraints import PlaneScreen

    if which == "leaky":
        torch.manual_seed(4)
        model = torch.nn.Sequential(OrderedDict(
            conv=torch.nn.Conv2d(1, 3, 3, padding=1), relu=torch.nn.LeakyReLU(0.2),
            pool=torch.nn.MaxPool2d(2), flatten=torch.nn.Flatten(),
            fc=torch.nn.Linear(3 * 5 * 5, 4))).eval()
    else:
        model = _screen_models()[which]
    ob, tol, x0, u, v, g = _screen_case(model, coarse, 40)
    # the background nearly constant: under the coarse tolerance its windows tie, and the
    # rule can choose an entry below the window's maximum
    x0[:, :4] = 1e-3 * torch.rand((1, 4, 10), generator=g, dtype=F64)
    lo, hi = np.array([-0.05, -0.02]), np.array([0.03, 0.05])
    prefix = PlanePrefix(ob.program, x0, u, v, ob.direction)
    screen = PlaneScreen(ob.program, tol, x0, u, v, lo, hi)
    block = PlaneBlock(ob.program, tol, prefix, screen)
    assert block.usable and block.units.numel() and block.windows.numel()
    assert block.flat.numel() > 0 if coarse else True
    n = 40
    gen = torch.Generator().manual_seed(41)
    pts = torch.as_tensor(lo) + torch.rand((n, 2), generator=gen, dtype=F64) * \
        torch.as_tensor(hi - lo)
    th = torch.rand(n, generator=gen, dtype=F64) * 2 * math.pi
    ns, es = torch.stack([th.cos(), th.sin()], 1), torch.stack([-th.sin(), th.cos()], 1)
    comb = lambda ab: ab[:, 0].reshape(-1, 1, 1, 1) * u + ab[:, 1].reshape(-1, 1, 1, 1) * v  # noqa: E731
    xs, dirs = x0 + comb(pts), torch.stack([comb(ns), comb(es), ob.direction.expand(n, 1, 10, 10)])
    want = configure(ob.program, xs, dirs, tol, record=True, all_rates=True,
                     given=prefix.given(pts, ns, es))
    got = configure(ob.program, xs, dirs, tol, record=True, all_rates=True,
                    block=block.bind(pts, ns, es))
    a, b = want.configuration, got.configuration
    assert a.region_keys() == b.region_keys()
    assert len(set(a.region_keys())) > 1  # the points are in several regions
    for k in a.select:
        assert torch.equal(a.select[k], b.select[k]) and torch.equal(a.index[k], b.index[k])
    for k in a.on:
        assert torch.equal(a.on[k], b.on[k])
    assert torch.equal(a.n_tight_relu, b.n_tight_relu)
    assert torch.equal(a.n_tight_pool, b.n_tight_pool)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.rates, want.rates)
    gw, gg = want.gate_values, got.gate_values
    for k in ob.program.gates:
        every = torch.arange(math.prod(ob.program.nodes[k].in_shape)).reshape(1, -1)
        for sub in (slice(None), slice(3, 17)):
            sw, sg = gw[sub], gg[sub]
            zw, dw = sw.columns(k, every, [sw.derivatives, sw.derivatives2])
            zg, dg = sg.columns(k, every, [sg.derivatives, sg.derivatives2])
            assert torch.equal(zw, zg) and all(torch.equal(p, q) for p, q in zip(dw, dg))
    # the decisions copied from the centre are used: flipping them changes the keys
    block.on_ref = ~block.on_ref
    bad = configure(ob.program, xs, dirs, tol, block=block.bind(pts, ns, es)).configuration
    assert bad.region_keys() != a.region_keys()


def test_plane_block_declines_other_layouts():
    """PlaneBlock is not usable (the plain pass runs) when the first gates are not a ReLU
    on the affine prefix followed by a max-pool on its output alone."""
    from openbox.configuration import PlaneBlock, PlanePrefix
    from openbox.constraints import PlaneScreen

    from _models import resnet_like

    for model, shape in ((_screen_models()[1], (1, 10, 10)), (random_mlp(1), (12,)),
                         (resnet_like(2), (2, 10, 10))):
        ob = openbox.OpenBox(model.double(), shape)
        g = torch.Generator().manual_seed(1)
        x0, u, v = torch.randn((3, *shape), generator=g, dtype=F64)
        prefix = PlanePrefix(ob.program, x0[None], u, v, ob.direction)
        screen = PlaneScreen(ob.program, ob.tol, x0[None], u, v, np.array([-0.1, -0.1]),
                             np.array([0.1, 0.1]))
        assert not PlaneBlock(ob.program, ob.tol, prefix, screen).usable
