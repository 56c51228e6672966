"""Polytope geometry: slack, radii, Chebyshev centre, facets, the Polytope class.

References are independent of the code under test: sampled balls, closed forms for boxes and
triangles, and scipy.spatial (Qhull) for the facets of small 2-D and 3-D polytopes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial import ConvexHull, HalfspaceIntersection

from openbox.geometry import (
    EmptyPolytopeError,
    Polytope,
    compute_chebyshev_center,
    compute_irredundant,
    compute_radius,
    compute_slack,
)
from openbox.tolerances import FLOAT32, FLOAT64

TOL = FLOAT64
CHEB_METHODS = ["highs", "clarabel"]


def random_polytope(rng, m, n, *, slack=(0.5, 1.5)):
    """(A, d, x0) with x0 strictly inside: d = A x0 + slack."""
    A = rng.standard_normal((m, n))
    x0 = rng.uniform(-1.0, 1.0, n)
    return A, A @ x0 + rng.uniform(*slack, m), x0


def unit_box(n):
    """[0, 1]^n as A x <= d: rows x_j <= 1 then -x_j <= 0."""
    return np.vstack([np.eye(n), -np.eye(n)]), np.r_[np.ones(n), np.zeros(n)]


def sample_l2_ball(rng, center, r, k):
    u = rng.standard_normal((k, center.size))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    radii = r * rng.uniform(0, 1, k) ** (1.0 / center.size)
    radii[: k // 10] = r  # some exactly on the sphere
    return center + u * radii[:, None]


# ------------------------------------------------------------------------------------------
# slack and radius
# ------------------------------------------------------------------------------------------


def test_slack_is_d_minus_ax_for_numpy_torch_and_float32():
    rng = np.random.default_rng(0)
    A, d, x = random_polytope(rng, 30, 5)
    want = d - A @ x
    np.testing.assert_allclose(compute_slack(A, d, x), want, rtol=0, atol=1e-12)
    got = compute_slack(torch.from_numpy(A), torch.from_numpy(d), torch.from_numpy(x))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    got32 = compute_slack(A.astype(np.float32), d.astype(np.float32), x)
    assert got32.dtype == np.float64
    np.testing.assert_allclose(got32, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [1, 3, 10])
def test_radius_of_unit_box_centre_is_half(n):
    A, d = unit_box(n)
    x = np.full(n, 0.5)
    for norm in (2, float("inf"), 1):
        assert compute_radius(A, d, x, norm, tol=TOL) == 0.5


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("layout", ["C", "F"])
def test_radius_balls_inside_and_just_outside(seed, layout):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 12))
    A, d, x0 = random_polytope(rng, 200, n)
    if layout == "F":  # as the engine builds it: the transpose of a C-ordered (n, m) array
        A = np.ascontiguousarray(A.T).T
    poly = Polytope(A, d, x0, tol=TOL)
    assert np.shares_memory(poly.A, A)

    # L2: sampled ball inside; past the nearest facet along its normal, outside.
    r2 = poly.radius(norm=2)
    assert r2 == compute_radius(A, d, x0, 2, tol=TOL) > 0
    assert all(poly.contains(p) for p in sample_l2_ball(rng, x0, r2, 400))
    worst = np.argmin((d - A @ x0) / np.linalg.norm(A, axis=1))
    normal = A[worst] / np.linalg.norm(A[worst])
    assert not poly.contains(x0 + r2 * (1 + 1e-6) * normal)

    # L-inf: sampled cube and all the corners that rows point at inside; past the nearest
    # facet along the sign vector of its row, outside.
    rinf = poly.radius(norm=float("inf"))
    assert rinf == compute_radius(A, d, x0, float("inf"), tol=TOL) > 0
    cube = x0 + rinf * rng.uniform(-1, 1, (400, n))
    corners = x0 + rinf * np.sign(A)
    assert all(poly.contains(p) for p in np.vstack([cube, corners]))
    worst = np.argmin((d - A @ x0) / np.abs(A).sum(axis=1))
    assert not poly.contains(x0 + rinf * (1 + 1e-6) * np.sign(A[worst]))


def test_radius_outside_point_raises_naming_the_row():
    A, d = unit_box(3)
    x = np.array([0.5, 1.25, 0.5])  # violates row 1 (x_1 <= 1) by 0.25
    with pytest.raises(ValueError, match=r"row 1 has a_i.x - d_i = 2.500e-01"):
        compute_radius(A, d, x, 2, tol=TOL)
    with pytest.raises(ValueError, match="row 1"):
        Polytope(A, d, x, tol=TOL)


def test_radius_tight_point_is_exactly_zero_and_slack_is_used():
    A, d = unit_box(2)
    x = np.array([0.0, 0.5])  # on the face -x_0 <= 0 (row 2)
    assert compute_radius(A, d, x, 2, tol=TOL) == 0.0
    assert compute_radius(A, d, x + np.array([1e-12, 0]), float("inf"), tol=TOL) == 0.0
    # A given slack is used instead of d - A x: here it says row 0 is tight.
    slack = d - A @ np.full(2, 0.5)
    slack[0] = 0.0
    assert compute_radius(A, d, np.full(2, 0.5), 2, slack=slack, tol=TOL) == 0.0
    poly = Polytope(A, d, np.full(2, 0.5), slack=slack, tol=TOL)
    assert poly.radius(2) == 0.0 and list(poly.tight_rows()) == [0]


def test_radius_zero_rows_ignored_or_empty():
    A, d = unit_box(2)
    A0 = np.vstack([A, np.zeros((2, 2))])
    x = np.full(2, 0.5)
    assert compute_radius(A0, np.r_[d, 0.0, 3.0], x, 2, tol=TOL) == 0.5
    with pytest.raises(ValueError, match="row 5 .*zero row"):
        compute_radius(A0, np.r_[d, 0.0, -1.0], x, 2, tol=TOL)
    assert compute_radius(np.zeros((1, 2)), [1.0], x, 2, tol=TOL) == float("inf")


def test_radius_rejects_unknown_norm():
    A, d = unit_box(2)
    with pytest.raises(ValueError, match="norm must be"):
        compute_radius(A, d, np.full(2, 0.5), 3, tol=TOL)


# ------------------------------------------------------------------------------------------
# Chebyshev centre
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", CHEB_METHODS)
def test_chebyshev_triangle_and_rectangle(method):
    # Triangle x >= 0, y >= 0, x + y <= 1: r = 1 / (2 + sqrt 2) at (r, r).
    A = np.array([[-1.0, 0.0], [0.0, -1.0], [1.0, 1.0]])
    c, r = compute_chebyshev_center(A, [0.0, 0.0, 1.0], tol=TOL, method=method)
    want = 1.0 / (2.0 + np.sqrt(2.0))
    assert r == pytest.approx(want, abs=1e-8)
    np.testing.assert_allclose(c, [want, want], atol=1e-7)
    # Rectangle [0, 2] x [0, 1]: r = 1/2, centre y = 1/2, x anywhere in [1/2, 3/2].
    A = np.vstack([np.eye(2), -np.eye(2)])
    c, r = compute_chebyshev_center(A, [2.0, 1.0, 0.0, 0.0], tol=TOL, method=method)
    assert r == pytest.approx(0.5, abs=1e-8)
    assert c[1] == pytest.approx(0.5, abs=1e-7) and 0.5 - 1e-7 <= c[0] <= 1.5 + 1e-7


@pytest.mark.parametrize("method", CHEB_METHODS)
def test_chebyshev_empty_raises(method):
    A = np.array([[1.0, 0.0], [-1.0, 0.0]])  # x <= -1 and x >= 1
    with pytest.raises(EmptyPolytopeError):
        compute_chebyshev_center(A, [-1.0, -1.0], tol=TOL, method=method)
    with pytest.raises(EmptyPolytopeError, match="row 1 is zero"):
        compute_chebyshev_center(np.array([[1.0, 0.0], [0.0, 0.0]]), [1.0, -1.0], tol=TOL,
                                 method=method)
    with pytest.raises(EmptyPolytopeError):  # x >= 2 outside the box [0, 1]^2
        compute_chebyshev_center(np.array([[-1.0, 0.0]]), [-2.0], bounds=(0.0, 1.0), tol=TOL,
                                 method=method)


@pytest.mark.parametrize("method", CHEB_METHODS)
def test_chebyshev_unbounded_is_inf(method):
    for A, d in (
        (np.array([[1.0, 2.0]]), np.array([1.0])),  # a half-space
        (-np.eye(2), np.zeros(2)),  # the positive quadrant
    ):
        c, r = compute_chebyshev_center(A, d, tol=TOL, method=method)
        assert r == float("inf")
        assert np.min((d - A @ c) / np.linalg.norm(A, axis=1)) >= 1.0 - 1e-9
    # Unbounded set, finite radius: the slab 0 <= x <= 1 in the plane.
    c, r = compute_chebyshev_center(np.array([[1.0, 0.0], [-1.0, 0.0]]), [1.0, 0.0], tol=TOL,
                                    method=method)
    assert r == pytest.approx(0.5, abs=1e-8) and c[0] == pytest.approx(0.5, abs=1e-7)
    # Lower-dimensional: x = 0, |y| <= 1 has radius 0.
    A = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    _, r = compute_chebyshev_center(A, [0.0, 0.0, 1.0, 1.0], tol=TOL, method=method)
    assert r == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("method", CHEB_METHODS)
def test_chebyshev_far_from_the_seed_point(method):
    # The square [100, 101]^2, seeded at the origin: the clarabel trust box must grow.
    A = np.vstack([np.eye(2), -np.eye(2)])
    d = np.array([101.0, 101.0, -100.0, -100.0])
    c, r = compute_chebyshev_center(A, d, tol=TOL, method=method, near=np.zeros(2))
    assert r == pytest.approx(0.5, abs=1e-8)
    np.testing.assert_allclose(c, [100.5, 100.5], atol=1e-6)


@pytest.mark.parametrize("method", CHEB_METHODS)
def test_chebyshev_flat_inside_the_domain(method):
    # As on real images: two rows tight at x sum to 2 x_0 <= 0, and x_0 = 0 is a pixel at
    # the domain's edge, so P ∩ [0, 1]^3 is flat although P itself is full-dimensional.
    A = np.array([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0],
                  [0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    x = np.array([0.0, 0.5, 0.5])
    d = A @ x + np.array([0.0, 0.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    _, r_domain = compute_chebyshev_center(A, d, bounds=(0.0, 1.0), tol=TOL, method=method)
    assert r_domain == pytest.approx(0.0, abs=1e-8)
    poly = Polytope(A, d, x, domain=(0.0, 1.0), tol=TOL)
    assert poly.radius(2) == 0.0 and list(poly.tight_rows()) == [0, 1]
    assert poly.inscribed_radius() > 0.1  # the region's own ball, without the domain
    assert poly.chebyshev_center(method=method)[1] == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_chebyshev_ball_inside_and_methods_agree(seed):
    rng = np.random.default_rng(10 + seed)
    n = int(rng.integers(2, 20))
    A, d, x0 = random_polytope(rng, 40 * n, n)
    norms = np.linalg.norm(A, axis=1)
    results = {}
    for method in CHEB_METHODS:
        for bounds in (None, (-1.2, 1.2)):
            c, r = compute_chebyshev_center(A, d, bounds=bounds, tol=TOL, method=method,
                                            near=x0)
            assert 0 < r < np.inf
            assert np.all(A @ c + r * norms <= d + 1e-12)  # the ball is inside, exactly
            if bounds is not None:
                assert np.all(c - r >= -1.2 - 1e-12) and np.all(c + r <= 1.2 + 1e-12)
            results[method, bounds] = r
    assert results["highs", None] == pytest.approx(results["clarabel", None], abs=1e-7)
    box = (-1.2, 1.2)
    assert results["highs", box] == pytest.approx(results["clarabel", box], abs=1e-7)
    assert results["highs", box] <= results["highs", None] + 1e-12


def test_chebyshev_row_generation_on_a_tall_instance():
    # Enough rows that the working set is a small part of them.
    rng = np.random.default_rng(7)
    A, d, x0 = random_polytope(rng, 3000, 40)
    want = compute_chebyshev_center(A, d, tol=TOL, method="highs")[1]
    for near in (None, x0):
        c, r = compute_chebyshev_center(A, d, tol=TOL, method="clarabel", near=near)
        assert r == pytest.approx(want, abs=1e-8)


# ------------------------------------------------------------------------------------------
# Irredundant rows vs Qhull
# ------------------------------------------------------------------------------------------


def qhull_facets(A, d, interior):
    """Hull facet planes (unit normal u, offset e: u.x <= e) of {A x <= d} by Qhull."""
    hs = HalfspaceIntersection(np.c_[A, -d], interior)
    eq = ConvexHull(hs.intersections).equations  # normal.x + offset <= 0 inside
    return eq[:, :-1], -eq[:, -1], hs.intersections


def _normalised(A, d):
    norms = np.linalg.norm(A, axis=1)
    live = norms > 0
    safe = np.where(live, norms, 1.0)
    return live, A / safe[:, None], d / safe


def expected_facet_rows(A, d, planes, *, box=None):
    """Lowest-index row of A matching each hull plane (unit normal, offset). Planes that are
    faces of the ``box`` (rows, offsets) belong to the box: no row of A gets them."""
    live, an, dn = _normalised(A, d)

    def matches(an, dn, live, u, e):
        return np.flatnonzero(live & (np.abs(an - u).max(axis=1) < 1e-7)
                              & (np.abs(dn - e) < 1e-7))

    want = set()
    for u, e in zip(*planes, strict=True):
        if box is not None and matches(*_normalised(*box)[1:], np.ones(len(box[1]), bool),
                                       u, e).size:
            continue
        hits = matches(an, dn, live, u, e)
        assert hits.size, "every hull facet comes from some row"
        want.add(int(hits[0]))
    return want


def polytope_with_extras(rng, n):
    """A bounded polytope around the origin plus redundant, vertex-touching, duplicate and
    zero rows, shuffled. Returns (A, d)."""
    m0 = 12 if n == 2 else 30
    U = rng.standard_normal((m0, n))
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    A = np.vstack([U, np.eye(n), -np.eye(n)])  # the box keeps it bounded
    d = np.r_[rng.uniform(0.5, 1.5, m0), np.full(2 * n, 3.0)]
    vertices = HalfspaceIntersection(np.c_[A, -d], np.zeros(n)).intersections
    V = rng.standard_normal((6, n))
    d_far = (V @ vertices.T).max(axis=1) + rng.uniform(0.05, 1.0, 6)  # redundant
    W = rng.standard_normal((3, n))
    d_touch = (W @ vertices.T).max(axis=1)  # through a vertex: redundant, touching
    dup = rng.choice(m0, 4, replace=False)
    scale = rng.uniform(0.3, 3.0, 4)
    A = np.vstack([A, V, W, A[dup] * scale[:, None], np.zeros((2, n))])
    d = np.r_[d, d_far, d_touch, d[dup] * scale, [0.0, 1.0]]
    perm = rng.permutation(A.shape[0])
    return A[perm], d[perm]


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("seed", range(8))
def test_irredundant_matches_qhull(n, seed):
    rng = np.random.default_rng(100 * n + seed)
    A, d = polytope_with_extras(rng, n)
    live = np.linalg.norm(A, axis=1) > 0
    u, e, _ = qhull_facets(A[live], d[live], np.zeros(n))
    want = expected_facet_rows(A, d, (u, e))
    got = compute_irredundant(A, d, tol=TOL, progress=False)
    assert got.dtype == np.int64 and list(got) == sorted(got)
    assert set(got.tolist()) == want
    # A candidate subset: exactly the facets among it.
    rows = rng.choice(A.shape[0], A.shape[0] // 2, replace=False)
    assert set(compute_irredundant(A, d, rows=rows, tol=TOL).tolist()) == want & set(
        rows.tolist())


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_irredundant_within_bounds_matches_qhull(n, seed):
    rng = np.random.default_rng(1000 + 100 * n + seed)
    A, d = polytope_with_extras(rng, n)
    live = np.linalg.norm(A, axis=1) > 0
    lo, hi = -rng.uniform(0.4, 1.0, n), rng.uniform(0.4, 1.0, n)
    box_A = np.vstack([np.eye(n), -np.eye(n)])
    box_d = np.r_[hi, -lo]
    u, e, _ = qhull_facets(np.vstack([A[live], box_A]), np.r_[d[live], box_d], np.zeros(n))
    want = expected_facet_rows(A, d, (u, e), box=(box_A, box_d))
    got = compute_irredundant(A, d, bounds=(lo, hi), tol=TOL)
    assert set(got.tolist()) == want


def test_irredundant_duplicates_keep_lowest_index_and_zero_rows_dropped():
    A, d = unit_box(2)  # rows 0..3
    A = np.vstack([A, 2 * A[1], np.zeros(2), A[0], [[1.0, 1.0]]])
    d = np.r_[d, 2 * d[1], 0.0, d[0], 5.0]
    assert list(compute_irredundant(A, d, tol=TOL)) == [0, 1, 2, 3]
    # A duplicate of an untested row is redundant even when its twin is not a candidate.
    assert list(compute_irredundant(A, d, rows=[4, 6, 7], tol=TOL)) == []
    with pytest.raises(EmptyPolytopeError):
        compute_irredundant(np.vstack([A, [[-1.0, 0.0]]]), np.r_[d, -2.0], tol=TOL)


def test_irredundant_in_higher_dimension_agrees_with_plain_lps():
    # Rays certify some facets; every answer must agree with one full LP per row.
    rng = np.random.default_rng(5)
    A, d, _ = random_polytope(rng, 150, 6)
    got = set(compute_irredundant(A, d, tol=TOL).tolist())
    from openbox.geometry.lp import solve_lp

    want = set()
    for i in range(A.shape[0]):
        others = np.delete(np.arange(A.shape[0]), i)
        rows = np.vstack([A[others], A[i]])
        rhs = np.r_[d[others], d[i] + np.linalg.norm(A[i])]
        res = solve_lp(-A[i], rows, rhs, tol=TOL)
        if -res.value > d[i] + 1e-7:
            want.add(i)
    assert got == want


# ------------------------------------------------------------------------------------------
# Polytope
# ------------------------------------------------------------------------------------------


def test_polytope_tight_point_radius_zero_inscribed_positive():
    A, d = unit_box(2)
    poly = Polytope(A, d, [0.0, 0.5], tol=TOL)
    assert poly.radius(2) == 0.0 and poly.radius(float("inf")) == 0.0
    assert list(poly.tight_rows()) == [2]
    assert list(poly.tight_facets()) == [2]
    assert poly.inscribed_radius() == pytest.approx(0.5, abs=1e-9)
    center, r = poly.chebyshev_center()
    np.testing.assert_allclose(center, [0.5, 0.5], atol=1e-7)
    assert r == poly.inscribed_radius()


def test_polytope_domain_kept_apart():
    n = 4
    A = np.vstack([np.eye(n), -np.eye(n)])
    d = np.full(2 * n, 10.0)  # |x_j| <= 10: far away
    x = np.array([0.0, 0.3, 1.0, 0.5])  # pixel 0 at the domain's edge
    poly = Polytope(A, d, x, domain=(0.0, 1.0), tol=TOL)
    assert poly.n_constraints == 2 * n and poly.A.shape == (2 * n, n)
    assert poly.radius(norm=2) == pytest.approx(9.0)  # x_2 = 1 is 9 from its row
    assert poly.radius(norm=float("inf")) == pytest.approx(9.0)
    assert poly.contains(x)
    outside_box = x + np.array([0.0, 1.5, 0.0, 0.0])
    assert not poly.contains(outside_box)
    assert poly.contains(outside_box, include_domain=False)
    assert np.all(poly.domain_A @ x <= poly.domain_d)
    assert not np.all(poly.domain_A @ outside_box <= poly.domain_d)
    assert poly.domain_A.shape == (2 * n, n)
    # The region's own inscribed ball ignores the domain; inside the domain it is 0.5.
    assert poly.inscribed_radius() == pytest.approx(10.0, abs=1e-7)
    assert poly.chebyshev_center()[1] == pytest.approx(0.5, abs=1e-8)
    assert poly.chebyshev_center(include_domain=False)[1] == poly.inscribed_radius()
    assert "domain [0, 1]^4" in repr(poly)


def test_polytope_data_and_repr():
    rng = np.random.default_rng(3)
    A, d, x0 = random_polytope(rng, 50, 4)
    source = np.arange(50) * 10
    poly = Polytope(A, d, x0.reshape(2, 2), tol=TOL, row_source=source)
    assert poly.dim == 4 and poly.n_constraints == 50
    assert poly.nbytes == A.nbytes + d.nbytes
    assert poly.point.shape == (4,)
    with pytest.raises(ValueError):
        poly.A[0, 0] = 1.0  # read-only view
    assert A.flags.writeable  # the caller's array is untouched
    text = repr(poly)
    assert "50 constraints" in text and "dim 4" in text and "MiB" in text and "radius" in text
    with pytest.raises(ValueError, match="row_source"):
        Polytope(A, d, x0, tol=TOL, row_source=source[:3])


def test_polytope_irredundant_subsets_rows_and_sources():
    rng = np.random.default_rng(4)
    A, d = polytope_with_extras(rng, 3)
    source = np.arange(A.shape[0])
    poly = Polytope(A, d, np.zeros(3), domain=(-5.0, 5.0), tol=TOL, row_source=source)
    facets = compute_irredundant(A, d, tol=TOL)
    small = poly.irredundant()
    assert small.n_constraints == facets.size
    np.testing.assert_array_equal(small.row_source, facets)
    np.testing.assert_array_equal(small.A, A[facets])
    np.testing.assert_array_equal(small.slack, poly.slack[facets])
    np.testing.assert_array_equal(small.point, poly.point)
    assert small.domain is not None and small.radius(2) == pytest.approx(poly.radius(2))
    # With rows=..., untested rows stay (zero rows excepted).
    rows = np.arange(10)
    partial = poly.irredundant(rows=rows)
    zero = np.linalg.norm(A, axis=1) == 0
    kept = set(partial.row_source.tolist())
    assert kept == (set(np.flatnonzero(~zero).tolist()) - set(range(10))) | set(
        facets[facets < 10].tolist())


@pytest.mark.parametrize("seed", range(3))
def test_polytope_tight_facets_match_full_lps(seed):
    # A point where several rows are tight, some of them redundant at the point.
    rng = np.random.default_rng(50 + seed)
    n = 4
    x0 = rng.uniform(-1, 1, n)
    T = rng.standard_normal((7, n))
    T[5] = T[0] + T[1]  # a positive combination of two tight rows: redundant
    T[6] = 2.0 * T[2]  # a duplicate tight row
    F, dF, _ = random_polytope(rng, 60, n)
    A = np.vstack([T, F])
    d = np.r_[T @ x0, F @ x0 + rng.uniform(0.5, 1.5, 60)]
    poly = Polytope(A, d, x0, tol=TOL)
    tight = poly.tight_rows()
    assert list(tight) == list(range(7))
    want = compute_irredundant(A, d, rows=tight, tol=TOL)
    np.testing.assert_array_equal(poly.tight_facets(), want)
    assert 5 not in want and 6 not in want


def test_polytope_float32_and_torch_inputs():
    rng = np.random.default_rng(6)
    A, d, x0 = random_polytope(rng, 80, 5)
    p32 = Polytope(A.astype(np.float32), d.astype(np.float32), x0, tol=FLOAT32)
    assert p32.A.dtype == np.float32
    p64 = Polytope(A, d, x0, tol=TOL)
    assert p32.radius(2) == pytest.approx(p64.radius(2), rel=1e-5)
    assert p32.inscribed_radius() == pytest.approx(p64.inscribed_radius(), rel=1e-4)
    pt = Polytope(torch.from_numpy(A), torch.from_numpy(d), torch.from_numpy(x0), tol=TOL)
    assert pt.radius(2) == p64.radius(2)
    assert pt.contains(torch.from_numpy(x0))
    assert not pt.contains(np.full(5, np.nan))
    with pytest.raises(ValueError, match="non-finite"):
        compute_radius(A, d, np.full(5, np.nan), 2, tol=TOL)
