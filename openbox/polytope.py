"""Polytope geometry over an H-representation ``{x : A x <= d}``.

Convention everywhere in this module: A is (m, n), d is (m,), and the polytope is
``P = {x in R^n : A x <= d}`` (row i: ``a_i . x <= d_i``). A may be float64 or float32,
C- or Fortran-ordered (the engine builds it as the transpose of a C-ordered (n, m) array);
it is never copied whole except where a function says so. Torch tensors are accepted
wherever an array is (detached, moved to the CPU, viewed as numpy without a copy).
Computations run in float64 whatever the storage dtype; LPs always do.

Flat functions (pypoman style): :func:`compute_slack`, :func:`compute_radius`,
:func:`compute_chebyshev_center`, :func:`compute_irredundant`. :class:`Polytope` bundles
them around the point x0 it was built at, with an optional input-domain box kept apart.

Zero rows (``a_i = 0``) say ``0 <= d_i``: with ``d_i`` within tolerance of or above 0 they
hold everywhere and are ignored; with ``d_i`` below that the polytope is empty.

Tolerances come from :class:`openbox.tolerances.Tolerances`: a point x satisfies row i when
``a_i.x - d_i <= tol.feasibility * (1 + |d_i| + ||a_i||_1 ||x||_inf)`` (the row's *slack
threshold*); a row whose slack ``d_i - a_i.x`` lies within that threshold of 0 is *tight*
(x is on it); LP solvers get ``tol.lp``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from openbox.lp import IncrementalLP, LPError, as_numpy, solve_lp
from openbox.tolerances import Tolerances

__all__ = [
    "EmptyPolytopeError",
    "Polytope",
    "compute_chebyshev_center",
    "compute_irredundant",
    "compute_radius",
    "compute_slack",
]

# Row blocks of ~32 MB float64 for chunked passes over A.
_BLOCK_ELEMENTS = 1 << 22
# compute_chebyshev_center(method="auto") hands the whole LP to HiGHS when the constraint
# matrix has at most this many entries (exact vertex solution; ~0.1 s at that size, where
# the methods break even) and otherwise row generation with Clarabel's interior point on
# a working set of rows (demo-CNN region, 13,821 x 784: 13 s; HiGHS on the same working
# sets: 349 s).
_HIGHS_MAX_ENTRIES = 100_000
# compute_irredundant shows a progress bar when it has more LPs than this to solve.
_PROGRESS_MIN_LPS = 200
# Rays shot at once by the facet pre-filter of compute_irredundant (memory m x this).
_RAYS_PER_BATCH = 256


class EmptyPolytopeError(ValueError):
    """The polytope ``{x : A x <= d}`` (intersected with the bounds box, if any) is empty:
    no point satisfies every row within the feasibility tolerance."""


# ------------------------------------------------------------------------------------------
# Row data shared by the functions below
# ------------------------------------------------------------------------------------------


def _matrix(A) -> np.ndarray:
    A = as_numpy(A)
    if A.ndim != 2:
        raise ValueError(f"A must be a 2-D (m, n) array, got shape {A.shape}")
    if A.dtype not in (np.float64, np.float32):
        A = A.astype(np.float64)
    return A


def _vector(v, size: int, name: str) -> np.ndarray:
    v = as_numpy(v, np.float64).reshape(-1)
    if v.shape[0] != size:
        raise ValueError(f"{name} must have {size} elements, got {v.shape[0]}")
    return v


def _point(v, size: int, name: str) -> np.ndarray:
    """Like _vector, and every entry finite (a NaN would pass every comparison)."""
    v = _vector(v, size, name)
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} has non-finite entries")
    return v


def _block_rows(n: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, n))


def _matvec(A: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A @ x in float64, (m,); float32 A is converted one row block at a time."""
    if A.dtype == np.float64:
        return A @ x
    out = np.empty(A.shape[0])
    step = _block_rows(A.shape[1])
    for i in range(0, A.shape[0], step):
        out[i : i + step] = A[i : i + step].astype(np.float64) @ x
    return out


def _row_norms(A: np.ndarray) -> dict[str, np.ndarray]:
    """||a_i||_1, ||a_i||_2 and ||a_i||_inf of every row, (m,) float64 each, in one pass."""
    m, n = A.shape
    l1, l2, linf = np.empty(m), np.empty(m), np.empty(m)
    step = _block_rows(n)
    for i in range(0, m, step):
        B = np.abs(A[i : i + step], dtype=np.float64)
        l1[i : i + step] = B.sum(axis=1)
        l2[i : i + step] = np.sqrt(np.einsum("ij,ij->i", B, B))
        linf[i : i + step] = B.max(axis=1, initial=0.0)
    return {"l1": l1, "l2": l2, "linf": linf}


def _dual_norm_name(norm) -> str:
    """The dual norm that turns slack into distance for a ball of ``norm``."""
    if norm == 2:
        return "l2"
    if norm == np.inf:
        return "l1"
    if norm == 1:
        return "linf"
    raise ValueError(f"norm must be 2, float('inf') or 1, got {norm!r}")


def _thresholds(d: np.ndarray, l1: np.ndarray, x_inf: float, tol: Tolerances) -> np.ndarray:
    """Per-row slack threshold ``tol.feasibility * (1 + |d_i| + ||a_i||_1 ||x||_inf)``."""
    return tol.feasibility * (1.0 + np.abs(d) + l1 * x_inf)


def _check_inside(slack, thr, zero, what: str = "point") -> None:
    """Raise ValueError naming the worst row if some slack is below -threshold."""
    bad = -slack > thr
    if np.any(bad):
        worst = int(np.argmax(np.where(bad, -slack, -np.inf)))
        kind = " (a zero row: 0 <= d_i fails, the polytope is empty)" if zero[worst] else ""
        raise ValueError(
            f"{what} is outside the polytope: row {worst} has a_i.x - d_i = {-slack[worst]:.3e}"
            f" > tolerance {thr[worst]:.1e}{kind}; {int(bad.sum())} row(s) violated in all"
        )


def _radius_from(slack, dual_norm, thr, zero) -> float:
    """min_i slack_i / ||a_i||_* over nonzero rows; exactly 0.0 if a row is tight."""
    live = ~zero
    if not np.any(live):
        return float("inf")
    s = slack[live]
    if np.any(s <= thr[live]):
        return 0.0
    return float(np.min(s / dual_norm[live]))


def _box(bounds, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(lo, hi) float64 (n,) from None or a pair of scalars / arrays with n elements."""
    if bounds is None:
        return None
    if len(bounds) != 2:
        raise ValueError("bounds/domain must be a pair (lo, hi) of scalars or arrays")
    lo, hi = (np.broadcast_to(as_numpy(b, np.float64).reshape(-1), (n,)).copy() for b in bounds)
    if np.any(np.isnan(lo)) or np.any(np.isnan(hi)):
        raise ValueError("bounds/domain contain NaN")
    return lo, hi


# ------------------------------------------------------------------------------------------
# Slack and radius
# ------------------------------------------------------------------------------------------


def compute_slack(A, d, x) -> np.ndarray:
    """Slack ``d - A x`` of every row of ``{x : A x <= d}``: (m,) float64.

    A (m, n), d (m,), x any shape with n elements (numpy or torch). Row i holds at x iff its
    slack is >= 0 (up to the feasibility tolerance).
    """
    A = _matrix(A)
    m, n = A.shape
    return _vector(d, m, "d") - _matvec(A, _point(x, n, "x"))


def compute_radius(A, d, x, norm=2, *, slack=None, tol: Tolerances) -> float:
    """Radius of the largest ``norm``-ball around x inside ``{x' : A x' <= d}``.

    ``r = min_i slack_i / ||a_i||_*`` over nonzero rows, with ||.||_* the dual norm: ||.||_2
    for norm=2, ||.||_1 for norm=inf, ||.||_inf for norm=1.

    Args:
        A: (m, n); d: (m,); x: n elements (any shape; numpy or torch).
        norm: 2, float("inf") or 1.
        slack: optional (m,) ``d - A x`` known more accurately than recomputing it (the
            engine's own gate values); used instead of ``d - A x`` when given.
        tol: ``tol.feasibility`` sets the per-row slack threshold (module docstring).

    Returns:
        r >= 0: exactly 0.0 when some nonzero row is tight (slack within its threshold of
        0: x is on a facet); ``inf`` when no row is nonzero.

    Raises:
        ValueError: x is outside the polytope (some slack below minus its threshold), naming
            the worst row and its violation; or a bad ``norm`` / shapes.
    """
    A = _matrix(A)
    m, n = A.shape
    d = _vector(d, m, "d")
    x = _point(x, n, "x")
    dual = _dual_norm_name(norm)
    s = d - _matvec(A, x) if slack is None else _vector(slack, m, "slack")
    norms = _row_norms(A)
    zero = norms["l1"] == 0
    thr = _thresholds(d, norms["l1"], float(np.max(np.abs(x), initial=0.0)), tol)
    _check_inside(s, thr, zero)
    return _radius_from(s, norms[dual], thr, zero)


# ------------------------------------------------------------------------------------------
# Chebyshev centre
# ------------------------------------------------------------------------------------------


class _Rows:
    """A (not copied), d, row norms and the nonzero rows of ``{x : A x <= d}``."""

    def __init__(self, A, d):
        self.A = _matrix(A)
        self.m, self.n = self.A.shape
        self.d = _vector(d, self.m, "d")
        self.norms = _row_norms(self.A)
        self.zero = self.norms["l1"] == 0
        self.live = np.flatnonzero(~self.zero)
        self.l2 = self.norms["l2"]

    def check_zero_rows(self, tol: Tolerances) -> None:
        bad = self.zero & (self.d < -tol.feasibility * (1.0 + np.abs(self.d)))
        if np.any(bad):
            i = int(np.flatnonzero(bad)[0])
            raise EmptyPolytopeError(
                f"row {i} is zero with d_i = {self.d[i]:.3e} < 0: 0 <= d_i fails, so the "
                "polytope is empty"
            )

    def normalised(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(len(rows), n) a_i/||a_i||_2 and (len(rows),) d_i/||a_i||_2, float64 copies."""
        nrm = self.l2[rows]
        return self.A[rows].astype(np.float64) / nrm[:, None], self.d[rows] / nrm

    def distance(self, x: np.ndarray) -> np.ndarray:
        """(len(live),) signed L2 distance (d_i - a_i.x)/||a_i|| of x to each live row."""
        return ((self.d - _matvec(self.A, x)) / np.where(self.zero, 1.0, self.l2))[self.live]


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


def _rowgen(rows: _Rows, working, rhs, cost, extra_blocks, extra_rhs, tol, check):
    """Row generation for ``min cost.y`` s.t. ``[a_i/||a_i||_2, 1] y <= rhs_i`` over the live
    rows plus fixed ``extra_blocks`` rows, an LP known to be feasible and bounded.

    Solves the LP over a working set of rows (starting from ``working``) with Clarabel's
    interior point; ``check(y)`` returns ``(v, done)`` with v (m,) the violation of every row
    beyond tolerance (-inf for rows to ignore) and ``done`` whether y is good enough; if not
    done, the 2(n+1) most violated rows join the working set and the LP is solved again.
    Returns (the last LPResult, the final working set).
    """
    n = rows.n
    in_w = np.zeros(rows.m, dtype=bool)
    in_w[working] = True
    while True:
        W = np.flatnonzero(in_w)
        An, _ = rows.normalised(W)
        G = np.hstack([An, np.ones((W.size, 1))])
        res = solve_lp(cost, sp.vstack([sp.csr_array(G), *extra_blocks], format="csr"),
                       np.concatenate([rhs[W], *extra_rhs]), tol=tol, method="clarabel")
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


def _chebyshev_rowgen(rows: _Rows, box, tol: Tolerances, near):
    """Chebyshev LP by row generation, each working-set LP by Clarabel's interior point.

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
    if k0 < live.size:
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
        res, W = _rowgen(rows, working, dn, cost, blocks, rhs, tol, check)
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
            ~5 s for a dense random 38,000 x 784 A with single-threaded BLAS) or "auto"
            (HiGHS up to 100,000 matrix entries, clarabel above).

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
        method = "highs" if rows.live.size * (n + 1) <= _HIGHS_MAX_ENTRIES else "clarabel"
    if method == "highs":
        center, r = _chebyshev_highs(rows, box, tol)
    elif method == "clarabel":
        center, r = _chebyshev_rowgen(rows, box, tol, near)
    else:
        raise ValueError(f"unknown method {method!r}; use 'auto', 'highs' or 'clarabel'")
    if r == float("inf"):
        return center, r
    return center, _exact_radius(rows, box, center)


# ------------------------------------------------------------------------------------------
# Irredundant rows (facets)
# ------------------------------------------------------------------------------------------


def _duplicate_representatives(An: np.ndarray, dn: np.ndarray, tol: Tolerances) -> np.ndarray:
    """(k,) for rows (a_i, d_i) normalised to ||a_i|| = 1: the index (into these rows) of the
    lowest-index row with the same (a_i, d_i) rounded to ``tol.feasibility``."""
    k = An.shape[0]
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    keys = np.round(np.hstack([An, dn[:, None]]) / tol.feasibility)
    h = keys @ np.random.default_rng(0).standard_normal(keys.shape[1])  # same keys, same h
    order = np.lexsort((np.arange(k), h))
    rep = np.arange(k)
    hs = h[order]
    starts = np.flatnonzero(np.r_[True, hs[1:] != hs[:-1]])
    sizes = np.diff(np.r_[starts, k])
    for s, size in zip(starts[sizes > 1], sizes[sizes > 1], strict=True):
        group = order[s : s + size]  # rows sharing a hash, lowest index first
        for g in group:
            if rep[g] != g:
                continue
            same = group[(group > g) & np.all(keys[group] == keys[g], axis=1)]
            rep[same] = g
    return rep


def _certify_facets_by_rays(An, dn, z, box, candidates, thr_fn) -> np.ndarray:
    """Rows proven to be facets by ray shooting from an interior point z.

    For a direction u, the ray z + t u leaves P first through the row with the smallest
    ``t_i = (dn_i - An_i.z)/(An_i.u)`` over ``An_i.u > 0``. If that row j is hit strictly
    first (before the second row and the box), the point w halfway between the first and
    the next hit satisfies every other row strictly and violates row j by more than its
    threshold: a witness that row j is a facet. Directions: the normals of the candidates.
    """
    s = dn - An @ z
    certified = np.zeros(An.shape[0], dtype=bool)
    for b in range(0, candidates.size, _RAYS_PER_BATCH):
        U = An[candidates[b : b + _RAYS_PER_BATCH]].T  # (n, batch) unit directions
        P = An @ U
        with np.errstate(divide="ignore", invalid="ignore"):
            T = np.where(P > 0, s[:, None] / P, np.inf)
        if T.shape[0] >= 2:
            two = np.partition(T, 1, axis=0)[:2]
            t1, t2 = two[0], two[1]
        else:
            t1, t2 = T[0], np.full(T.shape[1], np.inf)
        first = np.argmin(T, axis=0)
        if box is not None:
            lo, hi = box
            with np.errstate(divide="ignore", invalid="ignore"):
                tb = np.where(U > 0, (hi - z)[:, None] / U, np.inf)
                tb = np.minimum(tb, np.where(U < 0, (lo - z)[:, None] / U, np.inf))
            t2 = np.minimum(t2, tb.min(axis=0))
        ok = np.isfinite(t1) & (t2 > t1)
        t_mid = np.where(np.isfinite(t2), 0.5 * (t1 + t2), t1 + 1.0)
        cols = np.flatnonzero(ok)
        j = first[cols]
        w = z[:, None] + t_mid[cols] * U[:, cols]
        excess = P[j, cols] * (t_mid[cols] - t1[cols])  # violation of row j at w
        good = excess > thr_fn(j, np.max(np.abs(w), axis=0))
        certified[j[good]] = True
    return certified


def _inside_box(An, dn, lo, hi, thr_fn) -> np.ndarray:
    """(k,) bool: rows with ``max over the box of An_i.x <= dn_i - threshold`` (redundant
    within the box; infinite box sides allowed), computed one row block at a time."""
    lo_f, hi_f = np.where(np.isfinite(lo), lo, 0.0), np.where(np.isfinite(hi), hi, 0.0)
    x_inf = float(np.max(np.abs(np.r_[lo_f, hi_f]), initial=0.0))
    box_max = np.empty(An.shape[0])
    step = _block_rows(An.shape[1])
    for i in range(0, An.shape[0], step):
        B = An[i : i + step]
        pos, neg = np.maximum(B, 0.0), np.minimum(B, 0.0)
        top = pos @ hi_f + neg @ lo_f
        top[((pos > 0) @ ~np.isfinite(hi)) | ((neg < 0) @ ~np.isfinite(lo))] = np.inf
        box_max[i : i + step] = top
    return box_max <= dn - thr_fn(np.arange(An.shape[0]), x_inf)


def compute_irredundant(
    A, d, *, bounds=None, rows=None, tol: Tolerances, progress: bool | None = None
) -> np.ndarray:
    """Rows of ``{x : A x <= d}`` that are facets: removing the row changes the set.

    Standard test (one LP per row): row i is redundant iff ``max a_i.x`` subject to the
    other rows (and ``a_i.x <= d_i + ||a_i||`` to keep it bounded) is ``<= d_i`` within the
    slack threshold. Redundant rows are removed as they are found, so the remaining rows
    always describe the same set and each kept row is a facet of the final set; rows are
    tested from the highest index down.

    Before the LPs, cheap and exact filters: zero rows are dropped; of rows that coincide
    after normalising ``(a_i, d_i)`` by ``||a_i||_2`` (to ``tol.feasibility``) only the
    lowest index is kept (the others are redundant, whether or not in ``rows``); rows
    redundant over the ``bounds`` box alone are dropped; and rows hit first by rays from
    the Chebyshev centre along the candidates' normals are proven facets by an explicit
    witness point. Only the rows left undecided get an LP.

    Memory: a normalised float64 copy of the nonzero rows, plus HiGHS's sparse copy of it.

    Args:
        A: (m, n); d: (m,).
        bounds: optional box ``(lo, hi)``: test facets of ``P ∩ box`` (rows redundant inside
            the box are dropped; the box's own faces are never returned).
        rows: optional candidate row indices to test (default all); the other rows are not
            tested, stay in the constraint set and are not returned.
        tol: ``tol.feasibility`` (slack threshold, duplicate rounding), ``tol.lp`` (solver).
        progress: show a tqdm bar over the LPs (default: when more than 200 LPs).

    Returns:
        (k,) int64 sorted indices into A's rows of the candidates that are facets.

    Raises:
        EmptyPolytopeError: the polytope (with the box) is empty.
        LPError: the solver failed.
    """
    R = _Rows(A, d)
    n = R.n
    R.check_zero_rows(tol)
    box = _box(bounds, n)
    cand_all = np.arange(R.m) if rows is None else np.unique(as_numpy(rows, np.int64))
    if cand_all.size and (cand_all[0] < 0 or cand_all[-1] >= R.m):
        raise ValueError(f"rows must be indices in [0, {R.m}), got {cand_all[[0, -1]]}")
    live = R.live
    An, dn = R.normalised(live)
    rep = _duplicate_representatives(An, dn, tol)
    alive = rep == np.arange(live.size)  # positions into `live`
    is_cand = np.zeros(R.m, dtype=bool)
    is_cand[cand_all] = True
    cand = np.flatnonzero(is_cand[live] & alive)  # positions into `live`
    l1n = R.norms["l1"][live] / R.l2[live]

    def thr_fn(pos, x_inf):
        return tol.feasibility * (1.0 + np.abs(dn[pos]) + l1n[pos] * x_inf)

    if box is not None:
        lo, hi = box
        if np.any(lo > hi):
            raise EmptyPolytopeError("bounds box is empty")
        inside = _inside_box(An, dn, lo, hi, thr_fn)
        alive &= ~inside

    status = np.zeros(live.size, dtype=np.int8)  # 0 unknown, 1 facet, -1 redundant
    status[~alive] = -1
    if not np.any(status[cand] == 0):
        return np.sort(live[cand[status[cand] == 1]])

    keep = np.flatnonzero(alive)
    z, r = compute_chebyshev_center(An[keep], dn[keep], bounds=box, tol=tol)
    r = min(r, 1.0)  # radius inf: z is the centre of a unit ball inside
    if r > tol.feasibility * (1.0 + float(np.max(np.abs(z), initial=0.0))):
        todo = cand[status[cand] == 0]
        certified = _certify_facets_by_rays(An[keep], dn[keep], z, box,
                                            np.searchsorted(keep, todo), lambda j, xi:
                                            thr_fn(keep[j], xi))
        status[keep[certified]] = 1

    todo = cand[status[cand] == 0][::-1]  # highest index first: the lowest survives ties
    lp = IncrementalLP(np.zeros(n), An[keep], dn[keep], bounds=box, tol=tol)
    where = np.full(live.size, -1)
    where[keep] = np.arange(keep.size)
    show = progress if progress is not None else todo.size > _PROGRESS_MIN_LPS
    for pos in tqdm(todo, desc="irredundant: LP per row", unit="LP", disable=not show):
        i = int(where[pos])
        lp.set_objective(-An[pos])
        lp.set_row_upper(i, dn[pos] + 1.0)
        res = lp.solve()
        if res.status == "infeasible":
            raise EmptyPolytopeError(f"the polytope is empty ({res.message})")
        if res.status != "optimal":
            raise LPError(f"irredundant: LP of row {live[pos]} is {res.status}: {res.message}")
        top = float(An[pos] @ res.x)
        if top <= dn[pos] + thr_fn(pos, float(np.max(np.abs(res.x), initial=0.0))):
            status[pos] = -1
            lp.set_row_upper(i, np.inf)
        else:
            status[pos] = 1
            lp.set_row_upper(i, dn[pos])
    return np.sort(live[cand[status[cand] == 1]])


# ------------------------------------------------------------------------------------------
# Polytope
# ------------------------------------------------------------------------------------------


def _readonly(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


class Polytope:
    """The region ``P = {x in R^n : A x <= d}`` of a network around the point it was built at.

    Args:
        A: (m, n) the network's own constraint rows, float64 or float32 (kept as given, not
            copied; viewed read-only), numpy or torch.
        d: (m,) offsets, same dtype as A.
        point: x0, n elements (any shape), the input the polytope was built at; stored as
            (n,) float64. Must lie in P (within the slack threshold), else ValueError.
        slack: optional (m,) ``d - A x0`` from the engine's forward pass (more accurate than
            recomputing; tied rows exactly 0). When given it is trusted as the engine's tie
            decision: a row is tight iff its slack is 0, so :meth:`radius` agrees with
            ``OpenBox.certified_radius``. Default: computed in float64 and read with the
            feasibility threshold.
        domain: optional input-domain box ``(lo, hi)`` (scalars or n elements), e.g.
            ``(0.0, 1.0)`` for pixels. Kept apart: A and d never include it; see
            :attr:`domain_A` / :attr:`domain_d`.
        tol: tolerances of the working dtype (:mod:`openbox.tolerances`).
        row_source: optional per-row array of length m (e.g. which gate made each row),
            carried along and subset with the rows.
        n_dropped: how many rows the builder left out before A as identically zero (a
            record for the reader; they constrain nothing).

    The object is immutable in practice: attributes are read-only properties, arrays are
    read-only views, and computed quantities (radii, Chebyshev centre) are cached.
    """

    __slots__ = ("_A", "_d", "_point", "_slack", "_given_slack", "_domain", "_tol",
                 "_row_source", "_cache", "n_dropped")

    def __init__(self, A, d, point, *, slack=None, domain=None, tol: Tolerances,
                 row_source=None, n_dropped: int = 0):
        A = as_numpy(A)
        if A.ndim != 2:
            raise ValueError(f"A must be a 2-D (m, n) array, got shape {A.shape}")
        if A.dtype not in (np.float64, np.float32):
            A = A.astype(np.float64)
        m, n = A.shape
        d = as_numpy(d).reshape(-1)
        if d.shape[0] != m:
            raise ValueError(f"d must have {m} elements (one per row of A), got {d.shape[0]}")
        self._A = _readonly(A)
        self._d = _readonly(d)
        self._point = _readonly(_point(point, n, "point").copy())
        self._tol = tol
        self._cache = {}
        if slack is None:
            s = d.astype(np.float64, copy=False) - _matvec(A, self._point)
        else:
            s = _vector(slack, m, "slack").copy()
        self._slack = _readonly(s)
        # The engine's slack is its own tie decision: >= 0, exactly 0 on the facets the
        # point lies on. Recomputed slack carries rounding, so it is read with thresholds.
        self._given_slack = slack is not None
        if not (self._given_slack and bool(np.all(s >= 0))):
            _check_inside(s, self._thr, self._zero, what="the polytope's point")
        self._domain = _box(domain, n)
        if self._domain is not None and np.any(self._domain[0] > self._domain[1]):
            raise ValueError("domain box is empty (lo > hi somewhere)")
        if row_source is not None:
            row_source = as_numpy(row_source)
            if row_source.shape[0] != m:
                raise ValueError(f"row_source must have {m} entries, got {row_source.shape[0]}")
            row_source = _readonly(row_source)
        self._row_source = row_source
        self.n_dropped = int(n_dropped)

    @staticmethod
    def _inf_norm(x: np.ndarray) -> float:
        return float(np.max(np.abs(x), initial=0.0))

    @property
    def _norms(self) -> dict[str, np.ndarray]:
        """Row norms (computed on first use: one pass over A)."""
        if "norms" not in self._cache:
            self._cache["norms"] = _row_norms(self._A)
        return self._cache["norms"]

    @property
    def _zero(self) -> np.ndarray:
        return self._norms["l1"] == 0

    @property
    def _thr(self) -> np.ndarray:
        """Per-row slack below which a row counts as tight: 0 for the engine's own slack
        (its tie decision is exact), else the feasibility threshold."""
        if "thr" not in self._cache:
            self._cache["thr"] = (
                np.zeros(self.n_constraints) if self._given_slack else _thresholds(
                    self._d.astype(np.float64, copy=False), self._norms["l1"],
                    self._inf_norm(self._point), self._tol)
            )
        return self._cache["thr"]

    # -- data ---------------------------------------------------------------------------

    @property
    def A(self) -> np.ndarray:
        """(m, n) the network's rows, as given (read-only view); the domain is not included."""
        return self._A

    @property
    def d(self) -> np.ndarray:
        """(m,) offsets of ``A x <= d`` (read-only view)."""
        return self._d

    @property
    def point(self) -> np.ndarray:
        """(n,) float64, the point the polytope was built at."""
        return self._point

    @property
    def slack(self) -> np.ndarray:
        """(m,) float64 ``d - A point`` (the engine's, if it gave one)."""
        return self._slack

    @property
    def tol(self) -> Tolerances:
        return self._tol

    @property
    def domain(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The input-domain box as ((n,), (n,)) float64 ``(lo, hi)``, or None."""
        return self._domain

    @property
    def domain_A(self) -> np.ndarray | None:
        """(k, n) the domain box as rows ``x_j <= hi_j`` then ``-x_j <= -lo_j`` (rows with an
        infinite bound omitted), or None without a domain."""
        if self._domain is None:
            return None
        lo, hi = self._domain
        eye = np.eye(self.dim)
        return np.vstack([eye[np.isfinite(hi)], -eye[np.isfinite(lo)]])

    @property
    def domain_d(self) -> np.ndarray | None:
        """(k,) offsets matching :attr:`domain_A`, or None."""
        if self._domain is None:
            return None
        lo, hi = self._domain
        return np.concatenate([hi[np.isfinite(hi)], -lo[np.isfinite(lo)]])

    @property
    def row_source(self) -> np.ndarray | None:
        """Per-row provenance given at construction (subset with the rows), or None."""
        return self._row_source

    @property
    def n_constraints(self) -> int:
        """m, the number of network rows (the domain not counted)."""
        return self._A.shape[0]

    @property
    def dim(self) -> int:
        """n, the input dimension."""
        return self._A.shape[1]

    @property
    def nbytes(self) -> int:
        """Memory of A and d in bytes."""
        return self._A.nbytes + self._d.nbytes

    # -- geometry -----------------------------------------------------------------------

    def contains(self, x, *, include_domain: bool = True, tol: Tolerances | None = None) -> bool:
        """Whether x (n elements, any shape; numpy or torch) satisfies every row within its
        slack threshold (and lies in the domain box, within the same threshold, when
        ``include_domain`` and a domain is set). ``tol`` defaults to the polytope's."""
        tol = self._tol if tol is None else tol
        x = _vector(x, self.dim, "x")
        if not np.all(np.isfinite(x)):
            return False
        x_inf = self._inf_norm(x)
        d64 = self._d.astype(np.float64, copy=False)
        excess = _matvec(self._A, x) - d64
        if np.any(excess > _thresholds(d64, self._norms["l1"], x_inf, tol)):
            return False
        if include_domain and self._domain is not None:
            lo, hi = self._domain
            with np.errstate(invalid="ignore"):
                for bound, out in ((hi, x - hi), (lo, lo - x)):
                    thr = tol.feasibility * (1.0 + np.abs(bound) + x_inf)
                    if np.any(np.isfinite(bound) & (out > thr)):
                        return False
        return True

    def radius(self, norm=2) -> float:
        """Radius of the largest ``norm``-ball (2, float("inf") or 1) around :attr:`point`
        inside the network's polytope, ``min_i slack_i / ||a_i||_*``. The domain box is not
        a constraint here (a pixel at 0 still has a positive radius). Exactly 0.0 when
        ``point`` is on a facet (see :meth:`tight_rows`)."""
        key = ("radius", _dual_norm_name(norm))
        if key not in self._cache:
            self._cache[key] = _radius_from(self._slack, self._norms[key[1]], self._thr,
                                            self._zero)
        return self._cache[key]

    def chebyshev_center(self, include_domain: bool = True, *, method: str = "auto"
                         ) -> tuple[np.ndarray, float]:
        """(center (n,), radius) of the largest L2 ball inside P, and inside the domain box
        when ``include_domain`` and a domain is set. See :func:`compute_chebyshev_center`."""
        key = ("chebyshev", bool(include_domain and self._domain is not None), method)
        if key not in self._cache:
            center, r = compute_chebyshev_center(
                self._A, self._d, bounds=self._domain if key[1] else None, tol=self._tol,
                near=self._point, method=method,
            )
            self._cache[key] = (_readonly(center), r)
        center, r = self._cache[key]
        return center.copy(), r

    @property
    def inscribed_radius(self) -> float:
        """The region's own inscribed-ball radius: the largest L2 ball inside the network's
        polytope P, *without* the domain box (``chebyshev_center(include_domain=False)``'s
        radius; ``inf`` for an unbounded region that holds every ball). Positive for a
        full-dimensional region even when :meth:`radius` is an honest 0 because the point
        is on a facet.

        Why not inside the domain too: on real images P ∩ [0, 1]^n is typically flat. Rows
        tight at the point (ties) and pixels at 0 combine, with nonnegative weights, to
        ``0 . x <= 0`` (an exact LP-duality certificate), so no ball fits there and that
        radius is 0 for every such image. Use ``chebyshev_center(include_domain=True)`` for it.
        """
        return self.chebyshev_center(include_domain=False)[1]

    def tight_rows(self, tol: Tolerances | None = None) -> np.ndarray:
        """(k,) int64 indices of the nonzero rows whose slack at :attr:`point` is within the
        slack threshold of 0 (exactly 0 for the engine's slack, unless ``tol`` is given):
        the facets the point lies on."""
        thr = self._thr if tol is None else _thresholds(
            self._d.astype(np.float64, copy=False), self._norms["l1"],
            self._inf_norm(self._point), tol)
        return np.flatnonzero(~self._zero & (np.abs(self._slack) <= thr))

    def tight_facets(self, *, progress: bool | None = None) -> np.ndarray:
        """(k,) int64 indices of the tight rows (:meth:`tight_rows`) that are facets of P.

        Exact and cheap: near ``point``, P coincides with ``point + {v : a_i.v <= 0, i
        tight}`` (the other rows have slack > 0), and a row through ``point`` is redundant
        in P iff it is redundant in that cone (if some y in P-without-row-i violated row i,
        so would the points of the segment from ``point`` to y near ``point``). So only the
        tight rows enter the LPs of :func:`compute_irredundant`, not all m. Tight rows count
        as passing exactly through ``point`` (their slack is within tolerance of 0).
        """
        tight = self.tight_rows()
        if tight.size == 0:
            return tight
        cone = compute_irredundant(self._A[tight], np.zeros(tight.size), tol=self._tol,
                                   progress=progress)
        return tight[cone]

    def irredundant(self, *, include_domain: bool = False, rows=None,
                    progress: bool | None = None) -> Polytope:
        """The same region with only facet rows (:func:`compute_irredundant`), as a new
        Polytope with the same point, domain and tolerances; ``row_source`` and ``slack``
        are subset alike. With ``rows``, only those rows are tested and all others kept.
        With ``include_domain``, rows that are redundant *inside the domain box* are dropped
        too (the new polytope then equals the old one only within the box)."""
        facets = compute_irredundant(
            self._A, self._d, bounds=self._domain if include_domain else None, rows=rows,
            tol=self._tol, progress=progress,
        )
        if rows is None:
            keep = facets
        else:
            untested = np.ones(self.n_constraints, dtype=bool)
            untested[as_numpy(rows, np.int64)] = False
            untested &= ~self._zero
            untested[facets] = True
            keep = np.flatnonzero(untested)
        return Polytope(
            self._A[keep], self._d[keep], self._point, slack=self._slack[keep],
            domain=self._domain, tol=self._tol,
            row_source=None if self._row_source is None else self._row_source[keep],
        )

    def __repr__(self) -> str:
        mib = self.nbytes / 2**20
        parts = [f"{self.n_constraints} constraints", f"dim {self.dim}", f"{mib:.1f} MiB",
                 f"{self.tight_rows().size} tight"]
        parts.append(f"radius L2 {self.radius(2):.3g}, Linf {self.radius(np.inf):.3g}")
        if self._domain is not None:
            lo, hi = self._domain
            if np.all(lo == lo[0]) and np.all(hi == hi[0]):
                parts.append(f"domain [{lo[0]:g}, {hi[0]:g}]^{self.dim}")
            else:
                parts.append("domain box")
        return f"Polytope({', '.join(parts)})"
