"""The LP wrapper: statuses, known optima, both methods, the incremental model."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse as sp
import torch

from openbox.geometry.lp import IncrementalLP, LPError, solve_lp
from openbox.tolerances import FLOAT64

TOL = FLOAT64
METHODS = ["highs", "clarabel"]

# max x + y  s.t.  x + 2y <= 4,  3x + y <= 6,  x, y >= 0   ->  (1.6, 1.2), value 2.8
C = np.array([-1.0, -1.0])
A_UB = np.array([[1.0, 2.0], [3.0, 1.0]])
B_UB = np.array([4.0, 6.0])


@pytest.mark.parametrize("method", METHODS)
def test_known_optimum(method):
    res = solve_lp(C, A_UB, B_UB, bounds=(0.0, None), tol=TOL, method=method)
    assert res.status == "optimal"
    np.testing.assert_allclose(res.x, [1.6, 1.2], rtol=0, atol=1e-7)
    assert res.value == pytest.approx(-2.8, abs=1e-7)
    # Multipliers y >= 0 with c + A^T y = 0 (both rows bind, x > 0 so bounds do not).
    np.testing.assert_allclose(C + A_UB.T @ res.dual, 0.0, atol=1e-7)
    assert np.all(res.dual >= -1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_matches_scipy_linprog_on_random_bounded_lps(method):
    rng = np.random.default_rng(1)
    for _ in range(5):
        m, k = 60, 8
        A = rng.standard_normal((m, k))
        b = A @ rng.uniform(-1, 1, k) + rng.uniform(0.1, 1.0, m)  # feasible by construction
        c = rng.standard_normal(k)
        want = scipy.optimize.linprog(c, A_ub=A, b_ub=b, bounds=(-5, 5), method="highs")
        got = solve_lp(c, A, b, bounds=(-5.0, 5.0), tol=TOL, method=method)
        assert got.status == "optimal"
        assert got.value == pytest.approx(want.fun, abs=1e-7)
        assert np.max(A @ got.x - b) <= 1e-7


def test_free_variables_by_default():
    # min x s.t. -x <= 3: x = -3 (scipy's linprog would clamp at its default x >= 0).
    res = solve_lp([1.0], [[-1.0]], [3.0], tol=TOL)
    assert res.status == "optimal" and res.x[0] == pytest.approx(-3.0)


def test_infeasible_and_unbounded_are_statuses():
    infeasible = solve_lp([1.0, 0.0], [[1.0, 0.0], [-1.0, 0.0]], [-1.0, -1.0], tol=TOL)
    assert infeasible.status == "infeasible" and infeasible.x is None
    assert infeasible.value == np.inf
    unbounded = solve_lp([-1.0, 0.0], [[0.0, 1.0]], [1.0], tol=TOL)
    assert unbounded.status == "unbounded" and unbounded.value == -np.inf
    # Infeasible *and* unbounded objective direction: infeasibility wins.
    both = solve_lp([-1.0, 0.0], [[0.0, 1.0], [0.0, -1.0]], [-1.0, -1.0], tol=TOL)
    assert both.status == "infeasible"
    # Infeasible bounds alone.
    assert solve_lp([1.0], None, None, bounds=(1.0, 0.0), tol=TOL).status == "infeasible"


def test_equality_rows():
    # min x + 2y s.t. x + y = 1, x, y >= 0 -> (1, 0).
    res = solve_lp([1.0, 2.0], None, None, A_eq=[[1.0, 1.0]], b_eq=[1.0], bounds=(0, None),
                   tol=TOL)
    assert res.status == "optimal"
    np.testing.assert_allclose(res.x, [1.0, 0.0], atol=1e-9)
    ipm = solve_lp([1.0, 2.0], None, None, A_eq=[[1.0, 1.0]], b_eq=[1.0], bounds=(0, None),
                   tol=TOL, method="clarabel")
    assert ipm.status == "optimal"
    np.testing.assert_allclose(ipm.x, [1.0, 0.0], atol=1e-7)


@pytest.mark.parametrize(
    "c, A, b, status",
    [
        ([1.0, 0.0], [[1.0, 0.0], [-1.0, 0.0]], [-1.0, -1.0], "infeasible"),
        ([-1.0, 0.0], [[0.0, 1.0], [-1.0, 0.0]], [1.0, 1.0], "unbounded"),  # x -> inf
    ],
)
def test_interior_point_certifies_infeasible_and_unbounded(c, A, b, status):
    assert solve_lp(c, A, b, tol=TOL, method="clarabel").status == status


@pytest.mark.parametrize("method", METHODS)
def test_unbounded_optimal_face_is_still_optimal(method):
    # min -x s.t. x <= 1, y <= 1, -x <= 1: optimum -1 on the face x = 1, y free below.
    res = solve_lp([-1.0, 0.0], [[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]], [1.0, 1.0, 1.0],
                   tol=TOL, method=method)
    assert res.status == "optimal" and res.value == pytest.approx(-1.0, abs=1e-8)


def test_inputs_torch_sparse_fortran():
    A = np.asfortranarray(A_UB)
    for A_in in (torch.from_numpy(A_UB), sp.csr_array(A_UB), A):
        res = solve_lp(torch.tensor(C), A_in, torch.tensor(B_UB), bounds=(0.0, None), tol=TOL)
        np.testing.assert_allclose(res.x, [1.6, 1.2], atol=1e-9)


def test_shape_errors():
    with pytest.raises(ValueError, match="A_ub has shape"):
        solve_lp(C, A_UB, [1.0], tol=TOL)
    with pytest.raises(ValueError, match="unknown LP method"):
        solve_lp(C, A_UB, B_UB, tol=TOL, method="simplex")


def test_interior_point_duals_match_simplex():
    # Box [0, 1]^2 as rows plus a cut: max x + y s.t. x + 2y <= 2 -> (1, 0.5).
    A = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 2.0]])
    b = np.array([1.0, 1.0, 0.0, 0.0, 2.0])
    ipm = solve_lp(C, A, b, tol=TOL, method="clarabel")
    vertex = solve_lp(C, A, b, tol=TOL, method="highs")
    np.testing.assert_allclose(ipm.x, vertex.x, atol=1e-7)
    np.testing.assert_allclose(ipm.dual, vertex.dual, atol=1e-7)
    assert ipm.dual.shape == (5,)


def test_incremental_lp_matches_fresh_solves():
    rng = np.random.default_rng(2)
    m, k = 80, 6
    A = rng.standard_normal((m, k))
    b = A @ rng.uniform(-1, 1, k) + rng.uniform(0.1, 1.0, m)
    model = IncrementalLP(np.zeros(k), A, b, bounds=(-3.0, 3.0), tol=TOL)
    upper = b.copy()
    for i in rng.choice(m, 10, replace=False):
        c = rng.standard_normal(k)
        model.set_objective(c)
        model.set_row_upper(i, np.inf)  # switch row i off
        upper[i] = np.inf
        got = model.solve()
        live = np.isfinite(upper)
        want = solve_lp(c, A[live], upper[live], bounds=(-3.0, 3.0), tol=TOL)
        assert got.status == want.status == "optimal"
        assert got.value == pytest.approx(want.value, abs=1e-8)
        assert model.row_upper(i) == np.inf


def test_solver_failure_raises_lperror():
    rng = np.random.default_rng(3)
    A = rng.standard_normal((50, 5))
    b = A @ np.zeros(5) + 1.0
    model = IncrementalLP(rng.standard_normal(5), A, b, bounds=(-1.0, 1.0), tol=TOL)
    model._h.setOptionValue("simplex_iteration_limit", 0)  # force an iteration-limit stop
    model._h.setOptionValue("presolve", "off")
    with pytest.raises(LPError, match="HiGHS"):
        model.solve()
