"""The inscribed (Chebyshev) radius by method "sparse" (the default for large regions)
against the whole LP solved by HiGHS, on small networks, a demo-CNN region and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import linprog

from openbox import OpenBox
from openbox.geometry import EmptyPolytopeError, Polytope, compute_chebyshev_center
from openbox.tolerances import FLOAT64 as TOL
from tests._models import random_cnn, random_input, random_mlp

REL = 1e-6


def _same(a: float, b: float) -> bool:
    if a == b:  # both inf
        return True
    return abs(a - b) <= REL * max(abs(a), abs(b)) + 1e-12


def _ball_inside(A, d, c, r, bounds=None):
    norms = np.linalg.norm(A, axis=1)
    live = norms > 0
    assert np.all(A[live] @ c + r * norms[live] <= d[live] + 1e-12)
    if bounds is not None:
        assert np.all(c - r >= bounds[0] - 1e-12) and np.all(c + r <= bounds[1] + 1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("domain", [None, (0.0, 1.0)])
def test_sparse_equals_highs_on_small_networks(seed, kind, domain):
    if kind == "mlp":
        model, shape = random_mlp(seed, (6, 16, 12, 3)).double(), (6,)
        x = random_input(shape, 1, seed, kind="unit")
    else:
        shape = (1, 8, 8)
        model = random_cnn(seed, channels=(2, 3), input_shape=shape).double()
        x = random_input(shape, 1, seed, kind="unit")
    ob = OpenBox(model, shape, dtype=torch.float64, domain=domain)
    poly = ob.polytope(x)
    A, d = np.asarray(poly.A), np.asarray(poly.d)
    for bounds in (None, poly.domain):
        want = compute_chebyshev_center(A, d, bounds=bounds, tol=TOL, method="highs")[1]
        c, r = compute_chebyshev_center(A, d, bounds=bounds, tol=TOL, method="sparse",
                                        near=poly.point)
        assert _same(r, want), (r, want)
        if np.isfinite(r):
            _ball_inside(A, d, c, r, bounds)
    assert _same(poly.inscribed_radius(method="sparse"), poly.inscribed_radius(method="highs"))


def test_demo_image_against_scipy_linprog():
    from openbox.fmnist import load_demo_model, load_sample

    model, _ = load_demo_model()
    ob = OpenBox(model, (1, 28, 28), dtype=torch.float64, domain=(0.0, 1.0))
    poly = ob.polytope(load_sample().images[0:1].double())
    r = poly.inscribed_radius()  # "auto" picks "sparse" at this size
    assert r == poly.inscribed_radius(method="sparse")
    # Independent reference: the whole LP by scipy's HiGHS interior point (with crossover).
    A, d = np.asarray(poly.A), np.asarray(poly.d)
    norms = np.linalg.norm(A, axis=1)
    G = sp.hstack([sp.csr_array(A / norms[:, None]), np.ones((A.shape[0], 1))], format="csr")
    cost = np.zeros(A.shape[1] + 1)
    cost[-1] = -1.0
    res = linprog(cost, A_ub=G, b_ub=d / norms, bounds=[(None, None)] * A.shape[1] + [(0, None)],
                  method="highs-ipm")
    assert res.status == 0
    assert _same(r, -res.fun), (r, -res.fun)


def test_ball_touching_the_domain_box():
    # Triangle x >= 0.2, y >= 0.2, x + y <= 1.6 inside [0, 1]^2: the box's faces x, y <= 1
    # cut it, and the largest ball touches them.
    A = np.array([[-1.0, 0.0], [0.0, -1.0], [1.0, 1.0]])
    d = np.array([-0.2, -0.2, 1.6])
    for bounds in ((0.0, 1.0), (0.0, 0.5)):
        want = compute_chebyshev_center(A, d, bounds=bounds, tol=TOL, method="highs")[1]
        c, r = compute_chebyshev_center(A, d, bounds=bounds, tol=TOL, method="sparse")
        assert _same(r, want)
        _ball_inside(A, d, c, r, bounds)
    assert _same(r, 0.15)  # the box [0, 0.5]^2 minus x, y >= 0.2: a square of side 0.3


def test_unbounded_direction():
    A = np.array([[1.0, 2.0], [1.0, -1.0]])  # a cone: balls of every radius
    c, r = compute_chebyshev_center(A, [1.0, 0.0], tol=TOL, method="sparse")
    assert r == float("inf")
    assert np.min(([1.0, 0.0] - A @ c) / np.linalg.norm(A, axis=1)) >= 1.0 - 1e-9
    # The slab 0 <= x <= 1: unbounded, finite radius 1/2.
    c, r = compute_chebyshev_center(np.array([[1.0, 0.0], [-1.0, 0.0]]), [1.0, 0.0], tol=TOL,
                                    method="sparse")
    assert _same(r, 0.5)


def test_empty_polytope_raises():
    with pytest.raises(EmptyPolytopeError):
        compute_chebyshev_center(np.array([[1.0, 0.0], [-1.0, 0.0]]), [-1.0, -1.0], tol=TOL,
                                 method="sparse")
    with pytest.raises(EmptyPolytopeError):
        compute_chebyshev_center(np.array([[-1.0, 0.0]]), [-2.0], bounds=(0.0, 1.0), tol=TOL,
                                 method="sparse")


def test_duplicate_and_scaled_rows():
    rng = np.random.default_rng(3)
    n = 12
    A = rng.standard_normal((60, n))
    d = 1.0 + rng.random(60)
    # The same rows again, scaled, and a sparse block, so that the CSR path is taken too.
    A2 = np.vstack([A, 3.0 * A[:20], np.eye(n), -np.eye(n), np.eye(n)])
    d2 = np.concatenate([d, 3.0 * d[:20], np.full(n, 2.0), np.full(n, 2.0), np.full(n, 2.0)])
    for M, b in ((A, d), (A2, d2), (np.asfortranarray(A2), d2)):
        want = compute_chebyshev_center(M, b, tol=TOL, method="highs")[1]
        c, r = compute_chebyshev_center(M, b, tol=TOL, method="sparse")
        assert _same(r, want)
        _ball_inside(M, b, c, r)
    sparse_rows = np.vstack([np.eye(n), -np.eye(n), np.eye(n), 2.0 * np.eye(n)])
    sparse_d = np.ones(4 * n)
    c, r = compute_chebyshev_center(np.asfortranarray(sparse_rows), sparse_d, tol=TOL,
                                    method="sparse")
    assert _same(r, 0.75) and np.allclose(c, -0.25, atol=1e-6)  # -1 <= x_j <= 1/2


def test_polytope_default_is_sparse_for_large_regions():
    rng = np.random.default_rng(0)
    n = 100
    A = np.asfortranarray(np.vstack([np.eye(n), -np.eye(n)] * 6))  # 1,200 x 100 > 100,000
    d = np.ones(A.shape[0])
    poly = Polytope(A, d, np.zeros(n), tol=TOL)
    assert _same(poly.inscribed_radius(), 1.0)
    assert _same(poly.inscribed_radius(method="highs"), 1.0)
    P = Polytope(A + 1e-3 * rng.standard_normal(A.shape), d, np.zeros(n), tol=TOL)
    assert _same(P.inscribed_radius(), P.inscribed_radius(method="highs"))
