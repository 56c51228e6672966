"""The LP / QP wrapper: statuses, known optima, both methods, the incremental model, QPs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse as sp
import torch

from openbox.geometry.lp import IncrementalLP, LPError, solve_lp, solve_qp
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


# ------------------------------------------------------------------------------------------
# solve_qp: optima known in closed form
# ------------------------------------------------------------------------------------------


def test_qp_unconstrained_optimum_is_the_linear_solve():
    # min x.P x / 2 + q.x with P positive definite: x = -P^-1 q, value -q.P^-1 q / 2.
    rng = np.random.default_rng(4)
    B = rng.standard_normal((6, 6))
    P = B @ B.T + 0.5 * np.eye(6)
    q = rng.standard_normal(6)
    want = -np.linalg.solve(P, q)
    res = solve_qp(P, q, None, None, tol=TOL)
    assert res.status == "optimal" and res.message.startswith("Clarabel")
    np.testing.assert_allclose(res.x, want, rtol=0, atol=1e-7)
    assert res.value == pytest.approx(0.5 * q @ want, abs=1e-8)
    assert res.dual.shape == (0,)


def test_qp_projection_onto_a_half_space():
    # argmin ||x - p||^2 / 2 s.t. a.x <= b: x = p - t a with t = (a.p - b) / ||a||^2 when
    # p violates the row, and t is the row's multiplier; p itself (multiplier 0) otherwise.
    a = np.array([1.0, -2.0, 2.0])
    b = 1.0
    for p, t in ((np.array([3.0, 0.0, 1.0]), (5.0 - 1.0) / 9.0), (np.zeros(3), 0.0)):
        res = solve_qp(np.eye(3), -p, a[None], [b], tol=TOL)
        assert res.status == "optimal"
        np.testing.assert_allclose(res.x, p - t * a, rtol=0, atol=1e-8)
        np.testing.assert_allclose(res.dual, [t], rtol=0, atol=1e-8)
        assert res.value == pytest.approx(0.5 * t**2 * (a @ a) - 0.5 * p @ p, abs=1e-8)


def test_qp_projection_onto_a_box_by_bounds_and_by_rows():
    # argmin ||x - p||^2 / 2 over lo <= x <= hi is clip(p, lo, hi), coordinate by coordinate.
    p = np.array([-2.0, 0.3, 5.0, 0.9])
    lo, hi = np.array([0.0, 0.0, 0.0, -np.inf]), np.array([1.0, 1.0, 2.0, 0.5])
    want = np.clip(p, lo, hi)
    by_bounds = solve_qp(sp.identity(4), -p, None, None, bounds=(lo, hi), tol=TOL)
    np.testing.assert_allclose(by_bounds.x, want, rtol=0, atol=1e-8)
    fin = np.isfinite(lo)
    A = np.vstack([np.eye(4), -np.eye(4)[fin]])
    b = np.concatenate([hi, -lo[fin]])
    by_rows = solve_qp(torch.eye(4, dtype=torch.float64), torch.from_numpy(-p), A, b, tol=TOL)
    np.testing.assert_allclose(by_rows.x, want, rtol=0, atol=1e-8)
    # multipliers: p - x on the upper rows that bind, x - p on the lower ones
    np.testing.assert_allclose(by_rows.dual, np.concatenate(
        [np.maximum(p - hi, 0), np.maximum(lo - p, 0)[fin]]), rtol=0, atol=1e-8)


def test_qp_equality_rows():
    # argmin ||x||^2 / 2 s.t. sum(x) = 1: x = 1/k everywhere.
    res = solve_qp(np.eye(5), np.zeros(5), None, None, A_eq=np.ones((1, 5)), b_eq=[1.0],
                   tol=TOL)
    assert res.status == "optimal"
    np.testing.assert_allclose(res.x, np.full(5, 0.2), rtol=0, atol=1e-8)


def test_qp_without_p_is_the_clarabel_lp():
    ipm = solve_lp(C, A_UB, B_UB, bounds=(0.0, None), tol=TOL, method="clarabel")
    res = solve_qp(None, C, A_UB, B_UB, bounds=(0.0, None), tol=TOL)
    assert res.status == "optimal"
    np.testing.assert_allclose(res.x, [1.6, 1.2], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(res.x, ipm.x)
    np.testing.assert_array_equal(res.dual, ipm.dual)
    assert res.value == ipm.value


def test_qp_infeasible_and_unbounded_are_statuses():
    # x <= -1 and -x <= -1; then P singular with q along its null space: x_2 -> inf.
    infeasible = solve_qp(np.eye(1), [0.0], [[1.0], [-1.0]], [-1.0, -1.0], tol=TOL)
    assert infeasible.status == "infeasible" and infeasible.x is None
    assert infeasible.value == np.inf and "Infeasible" in infeasible.message
    unbounded = solve_qp(np.diag([1.0, 0.0]), [0.0, -1.0], None, None, tol=TOL)
    assert unbounded.status == "unbounded" and unbounded.value == -np.inf


def test_qp_solver_failure_raises_lperror_with_clarabels_status():
    with pytest.raises(LPError, match="Clarabel: MaxIterations; the QP was not solved"):
        solve_qp(np.eye(3), np.ones(3), np.ones((1, 3)), [-1.0], tol=TOL,
                 clarabel_options={"max_iter": 1})


@pytest.mark.parametrize(
    "args, message",
    [
        ((np.array([[1.0, np.nan], [np.nan, 1.0]]), np.zeros(2), None, None),
         "P has 2 non-finite entries"),
        ((np.eye(2), [0.0, np.nan], None, None), "q has 1 non-finite entries"),
        ((np.eye(2), np.zeros(2), [[np.inf, 0.0]], [1.0]), "A_ub has 1 non-finite"),
        ((np.eye(2), np.zeros(2), [[1.0, 0.0]], [np.nan]), "b_ub has 1 NaN entries"),
        ((np.array([[1.0, 1.0], [0.0, 1.0]]), np.zeros(2), None, None), "P is not symmetric"),
        ((np.eye(3), np.zeros(2), None, None), r"P has shape \(3, 3\)"),
        ((np.eye(2), np.zeros(2), [[1.0, 0.0]], [1.0, 2.0]), "A_ub has shape"),
    ],
)
def test_qp_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        solve_qp(*args, tol=TOL)


def test_qp_accepts_an_infinite_right_hand_side_as_no_row():
    res = solve_qp(np.eye(2), [-2.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], [np.inf, 1.0], tol=TOL)
    assert res.status == "optimal"
    np.testing.assert_allclose(res.x, [2.0, 0.0], rtol=0, atol=1e-8)


@pytest.mark.parametrize("method", ["highs", "clarabel"])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(c=[np.nan, 1.0]), "c has 1 non-finite entries"),
        (dict(A_ub=[[np.nan, 0.0]]), "A_ub has 1 non-finite"),
        (dict(b_ub=[np.nan]), "b_ub has 1 NaN entries"),
        (dict(bounds=(np.nan, 1.0)), "bounds has 2 NaN entries"),
        (dict(A_eq=[[1.0, np.inf]], b_eq=[0.0]), "A_eq has 1 non-finite"),
    ],
)
def test_lp_rejects_nan_and_infinite_coefficients(kwargs, message, method):
    """NaN never reaches the solver (HiGHS would take it as a number): a ValueError
    names the input; an infinite right-hand side stays "no row"."""
    args = dict(c=[1.0, 1.0], A_ub=[[-1.0, 0.0]], b_ub=[1.0], bounds=(-5.0, 5.0))
    args.update(kwargs)
    c, a, b = args.pop("c"), args.pop("A_ub"), args.pop("b_ub")
    with pytest.raises(ValueError, match=message):
        solve_lp(c, a, b, tol=TOL, method=method, **args)
    res = solve_lp([1.0, 1.0], [[-1.0, 0.0]], [np.inf], bounds=(-5.0, 5.0), tol=TOL,
                   method=method)
    assert res.status == "optimal"
    np.testing.assert_allclose(res.x, [-5.0, -5.0], rtol=0, atol=1e-7)
