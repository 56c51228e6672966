"""Irredundant rows (facets) of ``{x : A x <= d}``: exact filters, then one LP per row.

Convention: A (m, n), d (m,), ``P = {x : A x <= d}`` (see :mod:`openbox.geometry.hrep`).
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from openbox.geometry.chebyshev import compute_chebyshev_center
from openbox.geometry.hrep import EmptyPolytopeError, _block_rows, _box, _Rows, as_numpy
from openbox.geometry.lp import IncrementalLP, LPError
from openbox.tolerances import Tolerances

__all__ = ["compute_irredundant"]

# compute_irredundant shows a progress bar when it has more LPs than this to solve.
_PROGRESS_MIN_LPS = 200
# Rays shot at once by the facet pre-filter of compute_irredundant (memory m x this).
_RAYS_PER_BATCH = 256


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
        return tol.slack_threshold(dn[pos], l1n[pos], x_inf)

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
