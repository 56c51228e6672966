"""The one LP / QP wrapper of openbox: every LP and QP in the project goes through here.

Convention: an LP is ``minimise c.x subject to A_ub x <= b_ub, A_eq x = b_eq, lo <= x <= hi``
with x in R^k, float64; a QP (:func:`solve_qp`) adds ``x.P x / 2`` to the objective, P
symmetric positive semidefinite. Unlike ``scipy.optimize.linprog``, variables are *free*
unless ``bounds`` says otherwise.

Two solvers sit behind one result type:

* ``method="highs"`` (default): HiGHS dual simplex through ``highspy`` (the engine behind
  ``scipy.optimize.linprog(method="highs")``, called directly so that sparse rows are
  passed without scipy's dense copies and so that :class:`IncrementalLP` can warm-start).
  It is what sequences of related LPs use (one per row in ``compute_irredundant``), where
  only the simplex warm-starts, and it gives exact infeasible / unbounded statuses and
  vertex solutions.
* ``method="clarabel"``: Clarabel's interior point (the conic solver cvxpy ships with).
  The polytope LPs of a CNN have hundreds of *dense* columns; HiGHS works on sparse
  factors and slows to ~10 ms per pivot there (the Chebyshev LP of a demo-CNN region,
  solved over a working set of rows: 349 s with HiGHS, 13 s with Clarabel on all threads,
  about 4 s on one). Clarabel runs on one thread: with its default, its factorisation
  threads spin on a shared 2-core machine (15 s system CPU per demo region); the whole
  Chebyshev LP held sparse (``chebyshev`` method "sparse") takes about 1 s.

QPs (the counterfactual's nearest point of a region in L2) go to Clarabel alone, with the
same settings, status mapping and result type as its LPs.

Statuses: ``solve_lp`` and ``solve_qp`` return ``status`` "optimal", "infeasible" or
"unbounded" and never raise for those; the caller decides what they mean. They raise
:class:`LPError` when the solver fails (numerical trouble, iteration or time limit, a model
the solver rejects), with the solver's own message, and ``ValueError`` for inputs of
inconsistent shape or NaN / infinite coefficients (NaN right-hand sides or bounds).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import clarabel
import highspy
import numpy as np
import scipy.sparse as sp

from openbox.geometry.hrep import _block_rows, as_numpy
from openbox.tolerances import Tolerances

__all__ = ["IncrementalLP", "LPError", "LPResult", "solve_lp", "solve_qp"]

_INF = highspy.kHighsInf
_MS = highspy.HighsModelStatus

# Clarabel's settings for every solve, over its own defaults. max_threads: Clarabel's default
# (0: one thread per core) runs its faer KKT factorisation on rayon threads that spin
# (sched_yield / futex) when the cores are shared: the demo-CNN Chebyshev LP took 15 s wall,
# 16 s of it *system* CPU, against 3.9 s (0.3 s system) on one thread.
_CLARABEL_SETTINGS = {"max_threads": 1}


class LPError(RuntimeError):
    """The LP solver failed: numerical trouble, an iteration or time limit, a model it
    rejected. The message carries the solver's own words.
    Never raised for a problem that is merely infeasible or unbounded (those are statuses)."""


@dataclass(frozen=True)
class LPResult:
    """Outcome of one LP ``minimise c.x s.t. A_ub x <= b_ub, A_eq x = b_eq, lo <= x <= hi``
    (or QP: objective ``x.P x / 2 + c.x``, :func:`solve_qp`).

    Attributes:
        status: "optimal", "infeasible" or "unbounded".
        x: (k,) float64 optimal point when optimal, else None.
        value: the objective at the optimum; +inf when infeasible, -inf when unbounded.
        message: the solver's description of the outcome.
        dual: (m_ub,) float64 multipliers y >= 0 of the rows of A_ub when optimal
            (``P x + c + A_ub^T y + ... = 0`` sign convention: y_i > 0 means row i binds),
            else None.
        iterations: simplex pivots or interior-point iterations spent.
    """

    status: str
    x: np.ndarray | None
    value: float
    message: str
    dual: np.ndarray | None = field(default=None, repr=False)
    iterations: int = 0


def _to_csr(A) -> sp.csr_array:
    """(m, k) float64 CSR of a dense or sparse matrix, converting dense ones in row blocks so
    that no dense temporary of the full size is made (exact zeros are dropped)."""
    if sp.issparse(A):
        return sp.csr_array(A, dtype=np.float64)
    A = as_numpy(A)
    if A.ndim != 2:
        raise ValueError(f"constraint matrix must be 2-D, got shape {A.shape}")
    step = _block_rows(A.shape[1])
    if A.shape[0] <= step:
        return sp.csr_array(A.astype(np.float64, copy=False))
    parts = [
        sp.csr_array(A[i : i + step].astype(np.float64, copy=False))
        for i in range(0, A.shape[0], step)
    ]
    return sp.vstack(parts, format="csr")


def _bounds_arrays(bounds, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) float64 (k,) arrays from None (free) or a pair of scalars / (k,) arrays."""
    if bounds is None:
        return np.full(k, -np.inf), np.full(k, np.inf)
    if len(bounds) != 2:
        raise ValueError("bounds must be None or a pair (lo, hi) of scalars or (k,) arrays")
    lo, hi = bounds
    lo = np.broadcast_to(-np.inf if lo is None else as_numpy(lo, np.float64), (k,)).copy()
    hi = np.broadcast_to(np.inf if hi is None else as_numpy(hi, np.float64), (k,)).copy()
    return lo, hi


def _prepare(c, A_ub, b_ub, A_eq, b_eq, bounds):
    c = as_numpy(c, np.float64).reshape(-1)
    k = c.shape[0]
    A_ub = sp.csr_array((0, k)) if A_ub is None else _to_csr(A_ub)
    b_ub = np.zeros(0) if b_ub is None else as_numpy(b_ub, np.float64).reshape(-1)
    A_eq = sp.csr_array((0, k)) if A_eq is None else _to_csr(A_eq)
    b_eq = np.zeros(0) if b_eq is None else as_numpy(b_eq, np.float64).reshape(-1)
    for name, M, b in (("A_ub", A_ub, b_ub), ("A_eq", A_eq, b_eq)):
        if M.shape[1] != k or M.shape[0] != b.shape[0]:
            raise ValueError(
                f"{name} has shape {M.shape} but c has {k} entries and its right-hand side "
                f"{b.shape[0]}"
            )
    lo, hi = _bounds_arrays(bounds, k)
    return c, A_ub, b_ub, A_eq, b_eq, lo, hi


def _highs(tol: Tolerances) -> highspy.Highs:
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("primal_feasibility_tolerance", tol.lp)
    h.setOptionValue("dual_feasibility_tolerance", tol.lp)
    h.setOptionValue("solver", "simplex")
    return h


def _highs_lp(c, A: sp.csr_array, row_lo, row_hi, lo, hi) -> highspy.HighsLp:
    lp = highspy.HighsLp()
    lp.num_col_ = int(A.shape[1])
    lp.num_row_ = int(A.shape[0])
    lp.col_cost_ = c
    lp.col_lower_ = np.clip(lo, -_INF, _INF)
    lp.col_upper_ = np.clip(hi, -_INF, _INF)
    lp.row_lower_ = np.clip(row_lo, -_INF, _INF)
    lp.row_upper_ = np.clip(row_hi, -_INF, _INF)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = A.indptr.astype(np.int32)
    lp.a_matrix_.index_ = A.indices.astype(np.int32)
    lp.a_matrix_.value_ = A.data
    return lp


def _run_highs(h: highspy.Highs, n_ub: int, *, resolve_ambiguous: bool = True) -> LPResult:
    """Run a loaded model; map HiGHS's model status onto an LPResult or raise LPError."""
    run_status = h.run()
    status = h.getModelStatus()
    if status == _MS.kUnboundedOrInfeasible and resolve_ambiguous:
        # Presolve can stop at "infeasible or unbounded"; without it the simplex decides.
        h.setOptionValue("presolve", "off")
        h.clearSolver()
        run_status = h.run()
        status = h.getModelStatus()
        h.setOptionValue("presolve", "choose")
    info = h.getInfo()
    iterations = int(info.simplex_iteration_count) + int(info.ipm_iteration_count)
    message = f"HiGHS: {h.modelStatusToString(status)}"
    if status == _MS.kOptimal:
        if run_status == highspy.HighsStatus.kError:
            raise LPError(f"{message}, but run() reported an error")
        sol = h.getSolution()
        x = np.array(sol.col_value, dtype=np.float64)
        # HiGHS's row duals are <= 0 for binding upper bounds when minimising; report y >= 0.
        dual = -np.array(sol.row_dual, dtype=np.float64)[:n_ub]
        return LPResult("optimal", x, float(info.objective_function_value), message, dual,
                        iterations)
    if status == _MS.kInfeasible:
        return LPResult("infeasible", None, np.inf, message, None, iterations)
    if status == _MS.kUnbounded:
        return LPResult("unbounded", None, -np.inf, message, None, iterations)
    if status == _MS.kUnboundedOrInfeasible:
        # Still ambiguous: a feasibility problem (zero objective) tells the two apart.
        n_col = h.getNumCol()
        cost = np.array(h.getLp().col_cost_, dtype=np.float64)
        h.changeColsCost(n_col, np.arange(n_col, dtype=np.int32), np.zeros(n_col))
        feasible = _run_highs(h, n_ub, resolve_ambiguous=False)
        h.changeColsCost(n_col, np.arange(n_col, dtype=np.int32), cost)
        if feasible.status == "infeasible":
            return LPResult("infeasible", None, np.inf, message, None, iterations)
        return LPResult("unbounded", None, -np.inf, message, None, iterations)
    raise LPError(f"{message} (HiGHS model status {int(status)}); the LP was not solved")


def solve_lp(
    c,
    A_ub,
    b_ub,
    *,
    A_eq=None,
    b_eq=None,
    bounds=None,
    tol: Tolerances,
    method: str = "highs",
    clarabel_options: dict | None = None,
) -> LPResult:
    """Minimise ``c.x`` subject to ``A_ub x <= b_ub``, ``A_eq x = b_eq``, ``lo <= x <= hi``.

    Args:
        c: (k,) objective.
        A_ub: (m, k) dense (numpy or torch; any memory order, not copied whole) or scipy sparse,
            or None for no inequality rows. b_ub: (m,).
        A_eq, b_eq: (p, k) and (p,) equality rows, or None.
        bounds: None (every variable free; note scipy's linprog defaults to x >= 0) or a pair
            ``(lo, hi)`` of scalars or (k,) arrays, +-inf (or None) for no bound.
        tol: ``tol.lp`` is the solver's primal and dual feasibility tolerance (HiGHS) or its
            feasibility and duality-gap tolerance (Clarabel).
        method: "highs" (dual simplex) or "clarabel" (interior point, for dense columns);
            see the module docstring.
        clarabel_options: Clarabel settings (name -> value) over ``_CLARABEL_SETTINGS``,
            e.g. ``{"direct_solve_method": "qdldl"}``; ignored by HiGHS.

    Returns:
        LPResult with status "optimal", "infeasible" or "unbounded".

    Raises:
        LPError: the solver failed (numerical trouble, iteration/time limit, rejected model).
        ValueError: inconsistent shapes, an unknown method, NaN or infinite entries in c,
            A_ub, A_eq or b_eq, or NaN in b_ub or the bounds (+-inf there means no bound).
    """
    c, A_ub, b_ub, A_eq, b_eq, lo, hi = _prepare(c, A_ub, b_ub, A_eq, b_eq, bounds)
    _check_numbers("LP", {"c": c}, A_ub, b_ub, A_eq, b_eq, lo, hi)
    if method == "highs":
        A = sp.vstack([A_ub, A_eq], format="csr") if A_eq.shape[0] else A_ub
        row_lo = np.concatenate([np.full(b_ub.shape[0], -np.inf), b_eq])
        row_hi = np.concatenate([b_ub, b_eq])
        h = _highs(tol)
        h.passModel(_highs_lp(c, A, row_lo, row_hi, lo, hi))
        return _run_highs(h, b_ub.shape[0])
    if method == "clarabel":
        return _solve_clarabel(c, A_ub, b_ub, A_eq, b_eq, lo, hi, tol, clarabel_options)
    raise ValueError(f"unknown LP method {method!r}; use 'highs' or 'clarabel'")


class IncrementalLP:
    """A HiGHS model kept between solves, for sequences of LPs that share their rows.

    ``minimise c.x s.t. A x <= b, lo <= x <= hi`` with A (m, k) fixed; between solves the
    objective and the right-hand side of single rows change, and the last basis warm-starts
    the next solve. Row i is switched off by ``set_row_upper(i, inf)``. Statuses and
    exceptions are those of :func:`solve_lp` with method "highs".
    """

    def __init__(self, c, A, b, *, bounds=None, tol: Tolerances):
        """c: (k,); A: (m, k) dense or sparse; b: (m,); bounds as in :func:`solve_lp`."""
        c, A, b, _, _, lo, hi = _prepare(c, A, b, None, None, bounds)
        self.n_rows, self.n_cols = A.shape
        self._upper = b.copy()
        self._h = _highs(tol)
        self._h.passModel(_highs_lp(c, A, np.full(self.n_rows, -np.inf), b, lo, hi))
        self._cols = np.arange(self.n_cols, dtype=np.int32)

    def set_objective(self, c) -> None:
        """Replace the objective by c (k,)."""
        c = as_numpy(c, np.float64).reshape(-1)
        if c.shape[0] != self.n_cols:
            raise ValueError(f"objective has {c.shape[0]} entries, the model {self.n_cols}")
        self._h.changeColsCost(self.n_cols, self._cols, c)

    def set_row_upper(self, i: int, value: float) -> None:
        """Set the right-hand side of row i to ``value`` (+inf switches the row off)."""
        self._upper[i] = value
        self._h.changeRowBounds(int(i), -_INF, float(min(value, _INF)))

    def row_upper(self, i: int) -> float:
        """The current right-hand side of row i."""
        return float(self._upper[i])

    def solve(self) -> LPResult:
        """Solve from the last basis. Raises LPError as :func:`solve_lp` does."""
        return _run_highs(self._h, self.n_rows)


# ------------------------------------------------------------------------------------------
# Interior point (Clarabel)
# ------------------------------------------------------------------------------------------


def _clarabel_settings(tol: Tolerances, options: dict | None) -> clarabel.DefaultSettings:
    """Clarabel's settings for one solve: quiet, ``tol.lp`` as its feasibility and gap
    tolerances, then ``_CLARABEL_SETTINGS``, then the caller's ``options`` (name -> value)."""
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.tol_feas = settings.tol_gap_abs = settings.tol_gap_rel = tol.lp
    for name, value in {**_CLARABEL_SETTINGS, **(options or {})}.items():
        setattr(settings, name, value)
    return settings


def _clarabel_rows(A_ub, b_ub, A_eq, b_eq, lo, hi):
    """(M (r, k) CSC, rhs (r,), cones) of ``M x + s = rhs, s in cones``: the ``<=`` rows
    first (so their multipliers lead ``z``), then finite upper and lower bounds as rows
    (nonnegative cone), then the equality rows (zero cone)."""
    k = A_ub.shape[1]
    eye = sp.identity(k, format="csr")
    up, down = np.flatnonzero(np.isfinite(hi)), np.flatnonzero(np.isfinite(lo))
    # no bound rows (the counterfactual's programs): a CSC copy, not a vstack (~2 ms saved
    # on a 4,000 x 785 working set)
    M = (sp.vstack([A_ub, eye[up], -eye[down]], format="csc") if up.size or down.size
         else A_ub.tocsc())
    rhs = np.concatenate([b_ub, hi[up], -lo[down]])
    cones = [clarabel.NonnegativeConeT(M.shape[0])]
    if A_eq.shape[0]:
        M = sp.vstack([M, A_eq], format="csc")
        rhs = np.concatenate([rhs, b_eq])
        cones.append(clarabel.ZeroConeT(A_eq.shape[0]))
    return M, rhs, cones


def _run_clarabel(P, q, M, rhs, cones, n_ub: int, tol: Tolerances, options, what: str
                  ) -> LPResult:
    """Solve ``min x.P x / 2 + q.x s.t. M x + s = rhs, s in cones`` (P: upper triangle,
    CSC) and map Clarabel's status onto an LPResult, or raise LPError.

    Clarabel's dual z lies in the dual cone with ``P x + q + M^T z = 0`` at the optimum,
    so the multipliers of the ``<=`` rows are already the y >= 0 of :class:`LPResult`;
    the first ``n_ub`` of them are reported. ``what`` ("LP", "QP") names the program in
    the error message."""
    solver = clarabel.DefaultSolver(P, q, sp.csc_matrix(M), rhs, cones,
                                    _clarabel_settings(tol, options))
    sol = solver.solve()
    status = str(sol.status)
    message = f"Clarabel: {status}"
    iterations = int(sol.iterations)
    if status in ("Solved", "AlmostSolved"):
        x = np.array(sol.x, dtype=np.float64)
        dual = np.array(sol.z, dtype=np.float64)[:n_ub]
        Px = P @ x + P.T @ x - P.diagonal() * x  # P x from its upper triangle
        value = float(q @ x + 0.5 * x @ Px)
        return LPResult("optimal", x, value, message, dual, iterations)
    if status in ("PrimalInfeasible", "AlmostPrimalInfeasible"):
        return LPResult("infeasible", None, np.inf, message, None, iterations)
    if status in ("DualInfeasible", "AlmostDualInfeasible"):
        return LPResult("unbounded", None, -np.inf, message, None, iterations)
    raise LPError(f"{message}; the {what} was not solved")


def _solve_clarabel(c, A_ub, b_ub, A_eq, b_eq, lo, hi, tol: Tolerances, options=None
                    ) -> LPResult:
    """The LP by Clarabel's interior point. Bounds become rows; equality rows a zero cone."""
    k = c.shape[0]
    M, rhs, cones = _clarabel_rows(A_ub, b_ub, A_eq, b_eq, lo, hi)
    return _run_clarabel(sp.csc_matrix((k, k)), c, M, rhs, cones, b_ub.shape[0], tol,
                         options, "LP")


def _check_numbers(what: str, objective: dict, A_ub, b_ub, A_eq, b_eq, lo, hi) -> None:
    """ValueError for NaN or infinite coefficients (``objective``: name -> values, the
    rows' matrices, b_eq) or NaN right-hand sides and bounds (+-inf there means no
    bound), naming the input."""
    items = [(name, values, True) for name, values in objective.items()]
    items += [("A_ub", A_ub.data, True), ("A_eq", A_eq.data, True), ("b_ub", b_ub, False),
              ("b_eq", b_eq, True), ("bounds", np.concatenate([lo, hi]), False)]
    for name, values, finite in items:
        bad = ~np.isfinite(values) if finite else np.isnan(values)
        if bad.any():
            raise ValueError(f"{name} has {int(bad.sum())} {'non-finite' if finite else 'NaN'}"
                             f" entries; the {what} needs {'finite' if finite else 'non-NaN'} "
                             "numbers")


def solve_qp(
    P,
    q,
    A_ub,
    b_ub,
    *,
    A_eq=None,
    b_eq=None,
    bounds=None,
    tol: Tolerances,
    clarabel_options: dict | None = None,
) -> LPResult:
    """Minimise ``x.P x / 2 + q.x`` subject to ``A_ub x <= b_ub``, ``A_eq x = b_eq``,
    ``lo <= x <= hi``, by Clarabel's interior point (the settings of :func:`solve_lp`'s
    method "clarabel": one thread, ``tol.lp``).

    Args:
        P: (k, k) symmetric positive semidefinite, dense (numpy or torch) or scipy sparse,
            or None for an LP (then as :func:`solve_lp` with method "clarabel"). Symmetry
            is checked; positive semidefiniteness is the caller's (Clarabel reports an
            indefinite P as a failure or an unbounded program).
        q: (k,) linear term.
        A_ub, b_ub, A_eq, b_eq, bounds: as in :func:`solve_lp` (variables free by default).
        tol: ``tol.lp`` is Clarabel's feasibility and duality-gap tolerance.
        clarabel_options: Clarabel settings over ``_CLARABEL_SETTINGS``, e.g.
            ``{"direct_solve_method": "qdldl"}`` (faster on sparse rows with few columns).

    Returns:
        LPResult with status "optimal" (``x``, ``value`` = the objective at x, ``dual``:
        (m_ub,) multipliers y >= 0 of the rows of A_ub, ``P x + q + A_ub^T y + ... = 0``),
        "infeasible" or "unbounded" (objective unbounded below), as :func:`solve_lp`: those
        are statuses, not errors; the caller decides what they mean.

    Raises:
        LPError: Clarabel failed (numerical trouble, iteration or time limit), with its
            status in the message.
        ValueError: inconsistent shapes, a P that is not symmetric, NaN or infinite entries
            in P, q, A_ub, A_eq or b_eq, or NaN in b_ub or the bounds (+-inf there means
            no row / no bound).
    """
    q, A_ub, b_ub, A_eq, b_eq, lo, hi = _prepare(q, A_ub, b_ub, A_eq, b_eq, bounds)
    k = q.shape[0]
    if P is None:
        P = sp.csc_matrix((k, k))
    else:
        P = sp.csc_matrix(_to_csr(P))
        if P.shape != (k, k):
            raise ValueError(f"P has shape {P.shape} but q has {k} entries")
    _check_numbers("QP", {"P": P.data, "q": q}, A_ub, b_ub, A_eq, b_eq, lo, hi)
    if P.nnz and abs(P - P.T).max() > 0:
        raise ValueError("P is not symmetric; pass (P + P.T) / 2 for the same objective")
    M, rhs, cones = _clarabel_rows(A_ub, b_ub, A_eq, b_eq, lo, hi)
    return _run_clarabel(sp.triu(P, format="csc"), q, M, rhs, cones, b_ub.shape[0], tol,
                         clarabel_options, "QP")
