"""The Chebyshev centre: the largest L2 ball inside ``{x : A x <= d}`` (and a box).

Convention: A (m, n), d (m,), ``P = {x : A x <= d}`` (see :mod:`openbox.geometry.hrep`).
Every LP goes through :mod:`openbox.geometry.lp`.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from openbox.geometry.hrep import EmptyPolytopeError, _box, _matvec, _point, _Rows
from openbox.geometry.lp import LPError, solve_lp
from openbox.tolerances import Tolerances

__all__ = ["compute_chebyshev_center"]

# compute_chebyshev_center(method="auto") hands the whole LP to HiGHS when the constraint
# matrix has at most this many entries (exact vertex solution; ~0.1 s at that size, where
# the methods break even) and otherwise row generation with Clarabel's interior point on
# a working set of rows (demo-CNN region, 13,821 x 784: 13 s; HiGHS on the same working
# sets: 349 s).
_HIGHS_MAX_ENTRIES = 100_000

# method "sparse" keeps A as a sparse matrix when at most this share of its entries is
# nonzero (CSR costs 12 bytes per nonzero against 8 per dense entry; the demo CNN's rows: 3%).
_SPARSE_MAX_DENSITY = 0.25

# Clarabel settings of method "sparse" on sparse rows. QDLDL factors the KKT system of the
# whole demo-CNN Chebyshev LP (13,821 x 785) in ~40 ms an iteration, faer (supernodal) in
# twice that; iterative refinement (its default) doubles each solve and moves the radius by
# ~1e-11 relative, which the exact recomputation at the centre and the row check absorb.
_SPARSE_KKT = {"direct_solve_method": "qdldl", "iterative_refinement_enable": False}


def _box_blocks(box, n: int):
    """Rows [I | 1] <= hi and [-I | 1] <= -lo of a ball of radius r around c inside a box."""
    lo, hi = box
    eye = sp.identity(n, format="csr")
    ones = sp.csr_array(np.ones((n, 1)))
    blocks, rhs = [], []
    for sign, bound in ((1.0, hi), (-1.0, -lo)):
        keep = np.flatnonzero(np.isfinite(bound))
        if keep.size:
            blocks.append(sp.hstack([sign * eye[keep], ones[keep]], format="csr"))
            rhs.append(bound[keep])
    return blocks, rhs


def _exact_radius(rows: _Rows, box, c: np.ndarray, dist=None) -> float:
    """min over live rows of (d_i - a_i.c)/||a_i||_2 (``dist`` if already computed) and
    over the box of the distance to its faces, clamped at 0: the largest L2 ball around c
    inside P (and the box)."""
    dist = rows.distance(c) if dist is None else dist
    r = float(np.min(dist, initial=np.inf))
    if box is not None:
        lo, hi = box
        r = min(r, float(np.min(c - lo, initial=np.inf)), float(np.min(hi - c, initial=np.inf)))
    return max(r, 0.0)


def _chebyshev_highs(rows: _Rows, box, tol: Tolerances):
    """Whole Chebyshev LP by HiGHS: max r s.t. a_i.c/||a_i|| + r <= d_i/||a_i||, r >= 0."""
    n = rows.n
    An, dn = rows.normalised(rows.live)
    blocks = [sp.csr_array(np.hstack([An, np.ones((An.shape[0], 1))]))]
    rhs = [dn]
    if box is not None:
        b, h = _box_blocks(box, n)
        blocks += b
        rhs += h
    G = sp.vstack(blocks, format="csr") if blocks else sp.csr_array((0, n + 1))
    h = np.concatenate(rhs) if rhs else np.zeros(0)
    cost = np.zeros(n + 1)
    cost[n] = -1.0
    lo = np.full(n + 1, -np.inf)
    lo[n] = 0.0
    res = solve_lp(cost, G, h, bounds=(lo, np.inf), tol=tol)
    if res.status == "infeasible":
        raise EmptyPolytopeError(f"the polytope is empty (Chebyshev LP infeasible; {res.message})")
    if res.status == "unbounded":
        hi = np.full(n + 1, np.inf)
        hi[n] = 1.0
        res = solve_lp(cost, G, h, bounds=(lo, hi), tol=tol)
        if res.status != "optimal":
            raise LPError(f"Chebyshev LP with r <= 1 not solved: {res.message}")
        return res.x[:n], float("inf")
    return res.x[:n], float(res.x[n])


class _NormalisedRows:
    """``[a_i/||a_i||_2, 1]`` of the rows of ``rows``, as CSR blocks for the LPs below.

    Sparse A (the demo CNN's rows have ~3% nonzeros: conv receptive fields) is converted
    once, in one pass over A, to a CSR of every row; dense A is gathered per call instead.
    """

    def __init__(self, rows: _Rows):
        self.rows = rows
        self.csr = None
        A = rows.A
        if A.size and np.count_nonzero(A) <= _SPARSE_MAX_DENSITY * A.size:
            S = sp.csr_array(A.T if A.flags.f_contiguous else A, dtype=np.float64)
            S = S.T.tocsr() if A.flags.f_contiguous else S
            S.data /= np.repeat(np.where(rows.zero, 1.0, rows.l2), np.diff(S.indptr))
            self.csr = sp.csr_array(S)

    @property
    def sparse(self) -> bool:
        return self.csr is not None

    def block(self, W: np.ndarray) -> sp.csr_array:
        """(len(W), n + 1) CSR ``[a_i/||a_i||_2, 1]`` of rows W (live rows only)."""
        ones = sp.csr_array(np.ones((W.size, 1)))
        if self.csr is not None:
            return sp.hstack([self.csr[W], ones], format="csr")
        An, _ = self.rows.normalised(W)
        return sp.hstack([sp.csr_array(An), ones], format="csr")


def _rowgen(rows: _Rows, working, rhs, cost, extra_blocks, extra_rhs, tol, check,
            norm_rows: _NormalisedRows | None = None, options=None):
    """Row generation for ``min cost.y`` s.t. ``[a_i/||a_i||_2, 1] y <= rhs_i`` over the live
    rows plus fixed ``extra_blocks`` rows, an LP known to be feasible and bounded.

    Solves the LP over a working set of rows (starting from ``working``) with Clarabel's
    interior point; ``check(y)`` returns ``(v, done)`` with v (m,) the violation of every row
    beyond tolerance (-inf for rows to ignore) and ``done`` whether y is good enough; if not
    done, the 2(n+1) most violated rows join the working set and the LP is solved again.
    ``norm_rows`` builds the working-set matrix (default: gathered from A per round);
    ``options`` are Clarabel settings (see :func:`solve_lp`).
    Returns (the last LPResult, the final working set).
    """
    n = rows.n
    in_w = np.zeros(rows.m, dtype=bool)
    in_w[working] = True
    while True:
        W = np.flatnonzero(in_w)
        if norm_rows is None:
            An, _ = rows.normalised(W)
            G = sp.csr_array(np.hstack([An, np.ones((W.size, 1))]))
        else:
            G = norm_rows.block(W)
        res = solve_lp(cost, sp.vstack([G, *extra_blocks], format="csr"),
                       np.concatenate([rhs[W], *extra_rhs]), tol=tol, method="clarabel",
                       clarabel_options=options)
        if res.status != "optimal":  # the callers build LPs that are feasible and bounded
            raise LPError(f"working-set LP not solved: {res.message}")
        v, done = check(res.x)
        v[in_w] = -np.inf
        new = np.flatnonzero(v > 0)
        if done or new.size == 0:
            return res, W
        k_add = 2 * (n + 1)
        if new.size > k_add:
            new = new[np.argpartition(-v[new], k_add - 1)[:k_add]]
        in_w[new] = True


def _chebyshev_rowgen(rows: _Rows, box, tol: Tolerances, near, *, seed: str = "nearest"):
    """Chebyshev LP by row generation, each working-set LP by Clarabel's interior point.

    ``seed="nearest"`` (method "clarabel"): the first working set is the 2(n+1) rows nearest
    ``near``, gathered dense each round. ``seed="all"`` (method "sparse"): every live row,
    as one sparse matrix built in one pass over A, the KKT system factored by QDLDL (the
    rows of a CNN region are conv receptive fields, ~3% nonzeros, so its fill stays small),
    so that the first LP is the whole LP and the check below passes at once (the IPM's
    centre of a huge optimal face wanders far from the nearest rows: five rounds and
    8,000 rows on the demo CNN with ``"nearest"``).

    The LP is *elastic* (r free), so it is always feasible: its optimum r* < 0 means that no
    point satisfies all rows (P empty, by -r* in normalised distance). Row generation stops
    when no row is violated or when the working-set optimum r_W (an upper bound on r*) is
    within ``tol.lp (1 + |r_W|)`` of the exact radius at its centre (a lower bound).

    Without a box, the centre is confined to a *trust box* ``|c - near|_inf <= R``: it keeps
    each working-set LP bounded and stops the interior point from drifting along a huge
    optimal face (which would violate many rows outside the working set). The trust box is
    exact: when its multipliers sum to more than ``tol.lp`` it binds, and then either a
    recession direction proves the radius infinite or R grows (x100) and the LP is re-solved.
    """
    n = rows.n
    live = rows.live
    if live.size == 0 and box is None:
        return np.zeros(n), float("inf")
    dn = rows.d / np.where(rows.zero, 1.0, rows.l2)
    if near is None:
        near = np.zeros(n) if box is None else np.clip(0.0, *box)
        near = np.where(np.isfinite(near), near, 0.0)
    k0 = min(live.size, 2 * (n + 1))
    working = live
    norm_rows, options = None, None
    if seed == "all":
        norm_rows = _NormalisedRows(rows)
        options = _SPARSE_KKT if norm_rows.sparse else None
    elif k0 < live.size:
        working = live[np.argpartition(rows.distance(near), k0 - 1)[:k0]]
    cost = np.zeros(n + 1)
    cost[n] = -1.0
    viol_tol = (tol.lp * (1.0 + np.abs(dn)))[live]
    scale = 1.0 + float(np.max(np.abs(dn[live]), initial=0.0)) + float(np.max(np.abs(near)))

    def check(y):  # violation a_i.c/||a_i|| + r - d_i/||a_i|| beyond the solver tolerance
        c, r = y[:n], y[n]
        dist = rows.distance(c)
        v = np.full(rows.m, -np.inf)
        v[live] = r - dist - viol_tol
        r_exact = _exact_radius(rows, box, c, dist)
        return v, r - r_exact <= tol.lp * (1.0 + abs(r))

    eye = sp.hstack([sp.identity(n, format="csr"), sp.csr_array((n, 1))], format="csr")
    trust = None if box is not None else 1.0 + float(np.max(np.abs(near)))
    recession_tested = False
    for _ in range(12):
        if box is not None:
            blocks, rhs = _box_blocks(box, n)
        else:
            blocks, rhs = [eye, -eye], [near + trust, trust - near]
        res, W = _rowgen(rows, working, dn, cost, blocks, rhs, tol, check, norm_rows, options)
        working = W
        c, r = res.x[:n], float(res.x[n])
        if box is not None or float(np.sum(res.dual[W.size :])) <= tol.lp:  # trust free
            thr = tol.feasibility * (1.0 + scale + np.sqrt(n) * float(np.max(np.abs(c))))
            if r < -thr:
                raise EmptyPolytopeError(
                    f"the polytope is empty: the best point violates some row by {-r:.3e} "
                    f"(normalised distance) > tolerance {thr:.1e}"
                )
            return c, r
        if r > 0 and not recession_tested:
            recession_tested = True
            u = _recession_direction(rows, tol)
            if u is not None:
                # Along u every row's slack grows (a_i.u < 0): move until a unit ball fits.
                rate = -(_matvec(rows.A, u)[live] / rows.l2[live])
                need = (1.0 - rows.distance(c)) / rate
                return c + max(0.0, float(np.max(need, initial=0.0))) * u, float("inf")
        trust *= 100.0
    raise LPError("Chebyshev LP: the trust box still binds after enlarging it 11 times")


def _recession_direction(rows: _Rows, tol: Tolerances) -> np.ndarray | None:
    """A direction u with a_i.u < 0 for every live row (the polytope then holds balls of
    every radius), or None if there is none. LP: max t s.t. a_i.u/||a_i|| + t <= 0,
    -1 <= u <= 1, t <= 1 (always feasible and bounded), by row generation."""
    n = rows.n
    live = rows.live
    if live.size == 0:
        return np.zeros(n)
    cost = np.zeros(n + 1)
    cost[n] = -1.0
    eye = sp.identity(n + 1, format="csr")
    box = sp.vstack([eye, -eye[:n]], format="csr")  # u <= 1, t <= 1, -u <= 1
    box_rhs = np.ones(2 * n + 1)

    def check(y):  # a_i.u/||a_i|| + t, beyond the solver tolerance
        v = np.full(rows.m, -np.inf)
        v[live] = y[n] + _matvec(rows.A, y[:n])[live] / rows.l2[live] - tol.lp
        return v, False

    working = live[: min(live.size, 2 * (n + 1))]
    res, _ = _rowgen(rows, working, np.zeros(rows.m), cost, [box], [box_rhs], tol, check)
    u, t = res.x[:n], float(res.x[n])
    if t <= tol.feasibility:
        return None
    if np.max(_matvec(rows.A, u)[live]) < 0:
        return u
    raise LPError(f"recession LP found t = {t:.3e} > 0 but its direction fails the exact check")


def compute_chebyshev_center(
    A, d, *, bounds=None, tol: Tolerances, near=None, method: str = "auto"
) -> tuple[np.ndarray, float]:
    """Centre and radius of the largest L2 ball inside ``{x : A x <= d}`` (and the box).

    LP: ``max r s.t. a_i.c + r ||a_i||_2 <= d_i`` for every nonzero row (rows are normalised
    first), plus ``lo_j + r <= c_j <= hi_j - r`` when ``bounds`` is given.

    Args:
        A: (m, n); d: (m,). Zero rows are ignored (or make the polytope empty, see module).
        bounds: optional box ``(lo, hi)`` (scalars or n elements) the ball must also fit in.
        tol: ``tol.lp`` for the solver, ``tol.feasibility`` for deciding emptiness.
        near: optional point (n elements) whose nearest rows seed the row generation of the
            interior-point method; any point works, it only affects speed.
        method: "highs" (the whole LP by HiGHS dual simplex: exact vertex and statuses, but
            100+ s for a dense 38,000 x 784 A), "clarabel" (row generation: the LP over a
            working set of rows, seeded by the rows nearest ``near``, by
            Clarabel, adding the most violated rows until none is;
            ~5 s for a dense random 38,000 x 784 A with single-threaded BLAS), "sparse"
            (the same loop seeded with *every* row, held as one sparse matrix, QDLDL
            factorisation: the demo-CNN region, 13,821 x 784, in ~1.2 s against ~15 s for
            "clarabel" before Clarabel ran on one thread) or "auto" (HiGHS up to 100,000
            matrix entries, "sparse" above).

    Exactness (every method): the returned radius is recomputed at the centre against all
    rows; the row-generation methods stop only when no row is violated beyond ``tol.lp``
    and the LP optimum over the working set (an upper bound on the full LP's) is within
    ``tol.lp (1 + |r|)`` of that exact radius (a lower bound): optimality over a subset of
    rows plus feasibility for all rows is optimality for the full LP.

    Returns:
        (center (n,) float64, radius float). The radius is recomputed at the returned centre
        as ``min_i (d_i - a_i.c)/||a_i||_2`` (and the distances to the box faces), clamped at
        0, so the ball is inside up to rounding, never up to solver tolerance. A polytope of
        lower dimension has radius 0. An unbounded polytope that holds balls of every radius
        (e.g. a half-space) gives radius ``inf`` and a centre around which a ball of radius
        at least 1 fits.

    Raises:
        EmptyPolytopeError: no point satisfies every row (and the box) within tolerance.
        LPError: the solver failed.
    """
    rows = _Rows(A, d)
    n = rows.n
    rows.check_zero_rows(tol)
    box = _box(bounds, n)
    if box is not None and np.any(box[0] > box[1]):
        j = int(np.argmax(box[0] - box[1]))
        raise EmptyPolytopeError(f"bounds box is empty: lo[{j}] = {box[0][j]} > hi[{j}]")
    if near is not None:
        near = _point(near, n, "near")
    if method == "auto":
        method = "highs" if rows.live.size * (n + 1) <= _HIGHS_MAX_ENTRIES else "sparse"
    if method == "highs":
        center, r = _chebyshev_highs(rows, box, tol)
    elif method == "clarabel":
        center, r = _chebyshev_rowgen(rows, box, tol, near)
    elif method == "sparse":
        center, r = _chebyshev_rowgen(rows, box, tol, near, seed="all")
    else:
        raise ValueError(
            f"unknown method {method!r}; use 'auto', 'highs', 'clarabel' or 'sparse'")
    if r == float("inf"):
        return center, r
    return center, _exact_radius(rows, box, center)
