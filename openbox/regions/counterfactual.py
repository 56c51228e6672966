"""Counterfactuals: the nearest point, in L2 or L-inf, where the network's decision changes.

Inside one region P = {x' : A x' <= d} the network is its LLC f(x') = W x' + b, so the
nearest point of P whose decision is ``target`` is a convex program:

    minimise ||x' - x||  s.t.  A x' <= d,  (W_c - W_t) x' + (b_c - b_t) <= 0  (c != t),
                               lo <= x' <= hi  (the OpenBox's domain, if declared)

a QP for L2 and an LP for L-inf. Over the whole network the problem is a union of such
programs, one per region, and finding its global minimum is NP-hard for ReLU networks
(it decides robustness; Katz et al., Reluplex, 2017). :func:`counterfactual` is therefore
a *local search* over regions:

1. In x's own region, solve the program above. If it is infeasible, walk towards the
   target in legs, like DeepFool but with the model's own decision checked exactly: from
   the current point, head for the nearest point of the current LLC's decision region
   (inside the domain), and find the first point of that segment where the *model*
   reaches the decision (:func:`_first_hit`: batched samples, narrowed down to float
   precision). If there is none, the next leg starts at the segment's end, with the LLC
   of the region entered there.
2. Solve the program in the region where the decision was reached. When the optimum sits
   on some of the region's own facets (rows of A active), step across them into the
   neighbour (the region entered from the optimum along the facets' normals, weighted by
   their multipliers; then along single facets) and solve there. The previous optimum
   lies in the closure of the neighbour with the same logits, so it stays feasible and
   the distance never grows. Stop when the optimum lies inside its region (no row of A
   active: it is then the exact minimiser of the region and a local minimum over the
   network), when no neighbour lowers the distance, or after ``max_regions`` regions.
3. Pull back: if the model reaches the decision earlier on the segment from x to the
   optimum (a region far from x can lie beyond another part of the boundary), that point
   is nearer in every norm; resume step 2 from it.

``target=None`` asks for the nearest point where the prediction p changes to any other
class: the union over c != p of {f_c >= f_p}. Within one region the nearest point of the
union still has p tied for the maximum (had another class c' won there, the segment
back to x would cross {f_c' = f_p} earlier), so each class c gets its own search with a
single decision row (f_c >= f_p) instead of C - 1, and the best is returned. Classes are
searched in order of the distance from x to their half-space under x's LLC (a lower
bound on their program in x's region, only a heuristic beyond it), skipping those whose
bound is no better than the best point found; the pull-back there looks for *any* class
overtaking p, and moves the search to that class. Cost: up to (C - 1) searches, each
with the ``max_regions`` budget (all of them when some classes cannot be reached).

Solvers: Clarabel's interior point (QDLDL linear algebra) for the QP and the LP alike,
through the project's one wrapper (:func:`openbox.geometry.solve_qp` / ``solve_lp``);
variables are shifted to ``x' - x`` so that the solver's relative gap measures the
distance itself (with ``x'`` the gap would be relative to ||x||^2 and stop early).
A CNN region has 14,000-30,000 rows in 784 dimensions (the demo CNN's QP over all rows
took ~30 s), so rows enter through a *working set*: the rows nearest the starting point,
then, round after round, the most violated of the rest, until no row of A is violated
(every row is checked; the working set is only what the solver sees). The solver's
point is then *polished*: x is projected exactly (least squares) onto the affine set
of the active rows, and the projection replaces the solver's point when it satisfies
every row and is no farther. Finally the point is checked by the model's own forward
(:attr:`OpenBox.reference`) and, if the decision is not yet the target's, nudged past
the boundary along the LLC's margin gradient by the verification band.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import lsqr
from torch import Tensor
from tqdm.auto import tqdm

from openbox.configuration import Configuration, GateValues, RegionKey, configure
from openbox.constraints import build_constraints
from openbox.geometry import LPError, LPResult, as_numpy, solve_lp, solve_qp
from openbox.linear_maps import compose_backward

__all__ = ["Counterfactual", "counterfactual"]

WORKING_SET_ROWS = 256
"""Region rows that seed the working set, and most-violated rows added per round. On the
demo CNN (13,821 rows, 784 dimensions) the QP converges in ~6 rounds and ~0.3 s, where
the QP over all rows takes ~30 s."""

ACTIVE_SLACK = 100.0
"""A row counts as active at a solver's optimum when its slack, as a distance (slack /
||a||_2), is within ``ACTIVE_SLACK * tol.lp * (1 + ||x'||_inf)`` of 0: 100 times the
solver's tolerance. On demo-CNN QP optima the active rows sit below 1e-8 and the
others above 1e-6."""

IMPROVEMENT = 1e-6
"""A neighbour region counts as an improvement when its distance is below the best so
far by this relative amount (interior-point optima carry ~1e-8 relative error, so equal
optima must not count as progress)."""

POLISH_SLACK = 1e-9
"""The polished point replaces the solver's when its distance exceeds the solver's by at
most this relative amount (and it satisfies every row)."""

PULL_BACKS = 3
"""Times phase 2 resumes from an earlier point on the segment from x (:func:`_pull_back`)."""

PULL_BACK_MIN = 1e-6
"""An earlier point counts when it is at least this fraction of the segment nearer."""

REGION_CACHE = 2
"""Regions (with their rows) kept between the searches of one call."""

LINE_SAMPLES = 64
"""Points per batched forward with which :func:`_first_hit` narrows down where the model
first reaches the decision along a segment."""

LINE_RESOLUTION = 1e-13
"""... until the interval is this wide (relative to t): 8 forwards of 65 points."""

MIN_NORM_TOL = 1e-14
"""LSQR's relative tolerances in the polish (the projection then meets its rows to ~1e-14;
on a demo-CNN active set it takes ~500 iterations and 0.03 s)."""

FACET_TRIES = 3
"""Single facets (by decreasing multiplier) tried after the combined step, per optimum."""

STEP_SCALES = (0.0, 1e-10, 1e-8, 1e-6)
"""Steps past a facet, relative to 1 + ||x'||_inf: 0 takes the configuration at the
optimum itself with the tie-break along the step (exact when the polished optimum lies on
the facet to rounding); the others step past it when it does not."""

NUDGE_TRIES = 12
"""Doublings of the nudge past the decision boundary before giving up (verified=False
unless the model's logits tie within the verification band)."""

NUDGE_RESIDUAL = 1e-6
"""A nudge direction is used when it meets its rows (unit growth of each binding margin,
no motion off the active facets) to this residual."""

NUDGE_BAND = 1e-6
"""Decision rows within this (relative to 1 + max|f|) of binding at the optimum are all
pushed past together by the nudge (several classes can tie there)."""

SOLVER_OPTIONS = {"direct_solve_method": "qdldl"}
"""Clarabel settings of the region programs, over the wrapper's (:func:`solve_qp`): QDLDL
linear algebra, 2-5x faster than Clarabel's default (faer) on these sparse programs (a
demo-CNN working set, measured when this module still called Clarabel itself: QP 3.7 s vs
0.8 s, LP 6.6 s vs 1.2 s)."""


@dataclass(frozen=True, eq=False)
class Counterfactual:
    """The result of :func:`counterfactual`.

    Attributes:
        point: (*input_shape) tensor in the OpenBox's dtype: on, or just past, the decision
            boundary (inside the domain when one is declared).
        distance: ||point - x|| in ``norm``.
        target: the class at ``point`` (the requested target, or for ``target=None`` the
            class that overtakes the prediction).
        source: the class predicted at x.
        norm: 2 or inf.
        regions: keys of the regions whose LLC or program the search used, in order of
            first visit, x's own region first (of every class searched, with
            ``target=None``); the final region is ``region``.
        region: key of the region whose program gave ``point`` (before the nudge).
        exact_in_region: the point is the exact minimiser of that region's program with no
            row of the region's A active: the optimum did not sit on a region facet, so it
            is also a local minimum over the network. False when the search stopped on a
            facet (no neighbour improved, or ``max_regions`` was reached).
        verified: the model's own forward at ``point`` (:attr:`OpenBox.reference`) gives
            ``target`` (``target=None``: a class other than ``source``), or a tie within the
            verification band ``verify_atol + verify_rtol * max|f|``.
        logits: (C,) the model's own output at ``point``.
        margin: logit of ``target`` minus the best other logit (``target=None``: best other
            class minus ``source``) at ``point``, by the model's forward; >= 0 past the
            boundary.
    """

    point: Tensor
    distance: float
    target: int
    source: int
    norm: float
    regions: list[RegionKey]
    region: RegionKey
    exact_in_region: bool
    verified: bool
    logits: Tensor
    margin: float


# ------------------------------------------------------------------------------------------
# Regions and their programs
# ------------------------------------------------------------------------------------------


class _Region:
    """One region: configuration (with gate values), LLC (C, n) / (C,) float64, and the
    rows ``A x <= d`` built on first use."""

    def __init__(self, ob, config: Configuration, gates: GateValues, W: np.ndarray,
                 b: np.ndarray):
        self.ob = ob
        self.config = config
        self.gates = gates
        self.key: RegionKey = config.region_keys()[0]
        self.W = W
        self.b = b
        self._rows = None

    @classmethod
    def at(cls, ob, point: np.ndarray, directions: list[np.ndarray]) -> _Region:
        """The region entered from ``point`` (n,) along ``directions`` (lexicographic
        tie-break, then the OpenBox's own direction)."""
        shape = ob.input_shape
        x = torch.from_numpy(point).to(ob.dtype).reshape(1, *shape).to(ob.device)
        dirs = [torch.from_numpy(np.asarray(u, np.float64)).to(ob.dtype).reshape(shape)
                .to(ob.device) for u in directions]
        dirs.append(ob.direction)
        _, config, gates, _ = configure(ob.program, x, torch.stack(dirs), ob.tol,
                                        record=True, context=ob.key_context)
        eye = torch.eye(ob.num_classes, dtype=ob.dtype, device=ob.device)
        with torch.no_grad():
            w, b = compose_backward(ob.program, config, eye.expand(1, -1, -1))
        W = w[0].reshape(ob.num_classes, -1).double().cpu().numpy()
        return cls(ob, config, gates, W, b[0].double().cpu().numpy())

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(A (m, n), d (m,), ||a_i||_2 (m,), ||a_i||_1 (m,)), float64 norms."""
        if self._rows is None:
            ob = self.ob
            with torch.no_grad():
                cons = build_constraints(ob.program, self.config, self.gates, ob.tol,
                                         chunk=ob.chunk)
            A = cons.A
            l2 = np.sqrt(np.einsum("ij,ij->i", A, A, dtype=np.float64))
            l1 = np.abs(A).sum(axis=1, dtype=np.float64)
            self._rows = (A, cons.d.astype(np.float64), l2, l1)
        return self._rows


@dataclass
class _Solution:
    """Optimum of one region's program. x (n,), distance, active region rows, their
    multipliers (same length), ``cls`` the decision class it reaches."""

    x: np.ndarray
    distance: float
    active: np.ndarray
    multipliers: np.ndarray
    cls: int
    region: _Region


class _Shared:
    """What the searches of one call share: the regions visited (in order), the progress
    bar, and the last few regions with their rows (a CNN region's rows take ~90 MB, so
    only :data:`REGION_CACHE` are kept)."""

    def __init__(self, bar):
        self.regions: list[RegionKey] = []
        self.bar = bar
        self.cache: dict[RegionKey, _Region] = {}

    def note(self, key: RegionKey) -> None:
        if key not in self.regions:
            self.regions.append(key)

    def region(self, ob, point: np.ndarray, directions: list[np.ndarray]) -> _Region:
        """:meth:`_Region.at`, reusing a cached region (and its rows) with the same key."""
        region = _Region.at(ob, point, directions)
        kept = self.cache.pop(region.key, None)
        if kept is not None:
            region = kept
        self.cache[region.key] = region
        while len(self.cache) > REGION_CACHE:
            self.cache.pop(next(iter(self.cache)))
        return region


class _Search:
    """One local search for one decision (see the module docstring): class ``target``
    beats every other class, or (``target=None``) class ``rival`` ties or beats
    ``source``."""

    def __init__(self, ob, x0: np.ndarray, source: int, target: int | None,
                 rival: int | None, norm: float, shared: _Shared):
        self.ob = ob
        self.tol = ob.tol
        self.x0 = x0
        self.n = x0.size
        self.source = source
        self.target = target
        self.cls = target if target is not None else rival
        self.norm = norm
        self.box = _box(ob.domain, self.n)
        self.shared = shared
        self.used = 0  # LLCs used, a region counted again when the search comes back to it
        self.last: RegionKey | None = None
        self.solved: set[RegionKey] = set()

    def visit(self, region: _Region) -> None:
        if region.key == self.last:
            return
        self.last = region.key
        self.used += 1
        self.shared.bar.update(1)
        self.shared.note(region.key)

    def region(self, point: np.ndarray, directions: list[np.ndarray]) -> _Region:
        return self.shared.region(self.ob, point, directions)

    # -- distances and decision rows -----------------------------------------------------

    def dist(self, x: np.ndarray, ref: np.ndarray | None = None) -> float:
        y = x - (self.x0 if ref is None else ref)
        return float(np.linalg.norm(y) if self.norm == 2 else np.abs(y).max(initial=0.0))

    def decision_rows(self, W, b) -> tuple[np.ndarray, np.ndarray]:
        """(G, h) with ``G x <= h`` <=> the LLC (W, b) reaches the decision: f_t >= f_c for
        every c != t (target t), or f_rival >= f_source."""
        if self.target is not None:
            t = self.target
            return np.delete(W - W[t], t, axis=0), np.delete(b[t] - b, t)
        s, c = self.source, self.cls
        return (W[s] - W[c])[None], np.array([b[c] - b[s]])

    # -- the convex programs -------------------------------------------------------------

    def solve(self, ref: np.ndarray, A_rows: np.ndarray, d_rows: np.ndarray, G: np.ndarray,
              h: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``argmin ||x - ref||`` s.t. ``A_rows x <= d_rows``, ``G x <= h``, x in the domain.
        Returns (x (n,), multipliers of the A_rows (k,)) or None when infeasible.
        Raises LPError when the solver fails.

        Variables are y = x - ref (L-inf: and s >= ||y||_inf), so that the solver's
        relative gap measures the distance itself, not ||x||."""
        n = self.n
        k = A_rows.shape[0]
        rows = [sp.csr_array(A_rows.astype(np.float64)), sp.csr_array(G)]
        rhs = [d_rows - A_rows @ ref, h - G @ ref]
        eye = sp.identity(n, format="csr")
        if self.box is not None:
            lo, hi = self.box
            up, down = np.flatnonzero(np.isfinite(hi)), np.flatnonzero(np.isfinite(lo))
            rows += [eye[up], -eye[down]]
            rhs += [(hi - ref)[up], (ref - lo)[down]]
        if self.norm == 2:
            P, q = sp.identity(n, format="csc"), np.zeros(n)
        else:
            m = sum(r.shape[0] for r in rows)
            ones = sp.csr_array(np.ones((n, 1)))
            rows = [sp.hstack([sp.vstack(rows), sp.csr_array((m, 1))]),
                    sp.hstack([eye, -ones]), sp.hstack([-eye, -ones])]
            rhs += [np.zeros(2 * n)]
            P, q = None, np.zeros(n + 1)
            q[n] = 1.0
        res = _solve(P, q, sp.vstack(rows), np.concatenate(rhs), self.tol)
        if res is None:
            return None
        return ref + res.x[:n], res.dual[:k]

    def threshold(self, d, l1, x) -> np.ndarray:
        """Per-row violation allowed at x (the project's slack threshold)."""
        return self.tol.slack_threshold(d, l1, float(np.abs(x).max(initial=0.0)))

    def active_tol(self, x) -> float:
        return ACTIVE_SLACK * self.tol.lp * (1.0 + float(np.abs(x).max(initial=0.0)))

    def solve_region(self, region: _Region, start: np.ndarray) -> _Solution | None:
        """The decision program of ``region`` (working set seeded near ``start``), or None
        when it is infeasible."""
        self.solved.add(region.key)
        G, h = self.decision_rows(region.W, region.b)
        A, d, l2, l1 = region.rows()
        m = A.shape[0]
        safe = np.where(l2 > 0, l2, 1.0)
        if m == 0:
            ws = np.zeros(0, dtype=np.int64)
        else:
            near = (d - A @ start) / safe
            k = min(WORKING_SET_ROWS, m)
            ws = np.sort(np.argpartition(near, k - 1)[:k])
        in_ws = np.zeros(m, dtype=bool)
        in_ws[ws] = True
        while True:
            out = self.solve(self.x0, A[ws], d[ws], G, h)
            if out is None:
                return None
            x, z = out
            slack = d - A @ x
            bad = (slack < -self.threshold(d, l1, x)) & ~in_ws
            if not bad.any():
                break
            idx = np.flatnonzero(bad)
            worst = idx[np.argsort(slack[idx] / safe[idx])[:WORKING_SET_ROWS]]
            in_ws[worst] = True
            ws = np.flatnonzero(in_ws)
        dual = np.zeros(m)
        dual[ws] = np.maximum(z, 0.0)
        x = self._polish(x, A, d, l2, l1, G, h)
        if self.box is not None:
            x = np.clip(x, *self.box)
        active = np.flatnonzero((d - A @ x) / safe <= self.active_tol(x))
        return _Solution(x, self.dist(x), active, dual[active], self.cls, region)

    # -- polish ------------------------------------------------------------------------

    def _polish(self, x, A, d, l2, l1, G, h) -> np.ndarray:
        """The exact optimum on the solver's active set (module docstring), or x."""
        x0, n = self.x0, self.n
        tau = self.active_tol(x)
        safe = np.where(l2 > 0, l2, 1.0)
        act = np.flatnonzero((d - A @ x) / safe <= tau)
        gl2 = np.linalg.norm(G, axis=1)
        gact = np.flatnonzero((h - G @ x) / np.where(gl2 > 0, gl2, 1.0) <= tau)
        fixed_val = np.full(n, np.nan)
        if self.box is not None:
            lo, hi = self.box
            fixed_val = np.where(x - lo <= tau, lo, np.where(hi - x <= tau, hi, np.nan))
        fixed = ~np.isnan(fixed_val)
        free = ~fixed
        E = np.vstack([A[act].astype(np.float64), G[gact]])
        e = np.concatenate([d[act], h[gact]]) - E[:, fixed] @ fixed_val[fixed]
        Ef = E[:, free]
        xp = np.where(fixed, fixed_val, x0)
        if self.norm == 2:
            if Ef.shape[0]:
                xp[free] = x0[free] - _min_norm(Ef, Ef @ x0[free] - e)
        else:
            s = self.dist(x)
            y = x - x0
            ties = free & (s - np.abs(y) <= tau)
            sign = np.sign(y[ties])
            cols = np.flatnonzero(free)
            pos = np.full(n, -1)
            pos[cols] = np.arange(cols.size)
            S = np.zeros((sign.size, cols.size + 1))
            S[np.arange(sign.size), pos[ties]] = sign
            S[:, -1] = -1.0
            M = np.vstack([np.hstack([Ef, np.zeros((Ef.shape[0], 1))]), S])
            r = np.concatenate([e, sign * x0[ties]])
            ref = np.concatenate([x[free], [s]])
            if M.shape[0]:
                ref = ref - _min_norm(M, M @ ref - r)
            xp[free] = ref[:-1]
        if not np.all(np.isfinite(xp)):
            return x
        if self.box is not None:
            xp = np.clip(xp, *self.box)
        ok = np.all(d - A @ xp >= -self.threshold(d, l1, xp)) and np.all(
            h - G @ xp >= -self.threshold(h, np.abs(G).sum(axis=1), xp))
        if ok and self.dist(xp) <= self.dist(x) * (1.0 + POLISH_SLACK):
            return xp
        return x

    # -- phase 1: where to head ------------------------------------------------------------

    def head_for(self, region: _Region, x: np.ndarray) -> np.ndarray:
        """The point the walk heads for from x: the nearest point of the LLC's decision
        region in the domain, or, when that is empty, the domain point (without a domain:
        the point within ``max(1, ||x||_inf)`` of x in L-inf) where the LLC's decision is
        nearest, i.e. its largest decision row is smallest (an LP)."""
        G, h = self.decision_rows(region.W, region.b)
        out = self.solve(x, np.zeros((0, self.n)), np.zeros(0), G, h)
        if out is not None:
            return out[0]
        n = self.n
        rows = [sp.csr_array(np.hstack([G, -np.ones((G.shape[0], 1))]))]
        rhs = [h]
        # x itself is the variable here, kept in the domain, or (none declared) in a box
        # around x: without one the LP is unbounded as soon as the rows are inconsistent
        if self.box is not None:
            lo, hi = self.box
        else:
            reach = max(1.0, float(np.abs(x).max(initial=0.0)))
            lo, hi = x - reach, x + reach
        eye = sp.identity(n + 1, format="csr")[:n]
        rows += [eye, -eye]
        rhs += [hi, -lo]
        q = np.zeros(n + 1)
        q[n] = 1.0
        res = _solve(None, q, sp.vstack(rows), np.concatenate(rhs), self.tol)
        if res is None:
            raise LPError("no direction towards the decision in the domain")
        return res.x[:n]


def _solve(P, q, M, r, tol) -> LPResult | None:
    """``minimise z.P z / 2 + q.z  s.t.  M z <= r`` (P None: an LP) through the project's
    wrapper (:func:`solve_qp` / :func:`solve_lp` with Clarabel, :data:`SOLVER_OPTIONS`):
    the optimal LPResult (``x``: z, ``dual``: multipliers of the rows of M, >= 0), None
    when infeasible; LPError when the solver fails or reports the program unbounded (a
    distance is bounded below)."""
    if P is None:
        res = solve_lp(q, M, r, tol=tol, method="clarabel", clarabel_options=SOLVER_OPTIONS)
    else:
        res = solve_qp(P, q, M, r, tol=tol, clarabel_options=SOLVER_OPTIONS)
    if res.status == "infeasible":
        return None
    if res.status != "optimal":
        raise LPError(f"{res.message}; the counterfactual program was not solved")
    return res


def _box(domain, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    if domain is None:
        return None
    lo, hi = (np.broadcast_to(as_numpy(b, np.float64).reshape(-1), (n,)).copy()
              for b in domain)
    return lo, hi


def _min_norm(M: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The least-norm least-squares solution of ``M z = r`` (M is mostly zeros: active rows
    of a CNN touch a few pixels each), by LSQR to ~1e-14; far cheaper than a dense SVD."""
    return lsqr(sp.csr_array(M), r, atol=MIN_NORM_TOL, btol=MIN_NORM_TOL,
                iter_lim=10 * max(M.shape) + 100)[0]


def _unit(v: np.ndarray) -> np.ndarray:
    m = np.abs(v).max(initial=0.0)
    return v / m if m > 0 else v


def _inward(v: np.ndarray, x: np.ndarray, box, tau: float) -> np.ndarray:
    """v with the components that would leave the domain at x set to 0."""
    if box is None:
        return v
    lo, hi = box
    out = ((x - lo <= tau) & (v < 0)) | ((hi - x <= tau) & (v > 0))
    return np.where(out, 0.0, v)


# ------------------------------------------------------------------------------------------
# The search
# ------------------------------------------------------------------------------------------


def counterfactual(ob, x: Tensor, target: int | None = None, norm: float = 2, *,
                   max_regions: int = 50, progress: bool | None = None) -> Counterfactual:
    """The nearest point to x, in ``norm``, where the network decides ``target`` (a local
    search over regions; see the module docstring for the algorithm).

    Finding the global minimum over all regions is NP-hard in general; this returns a
    point that is exact within its final region and, when ``exact_in_region``, a local
    minimum over the network. Its ``distance`` is an upper bound on the global one.

    Args:
        ob: an :class:`~openbox.OpenBox`; its domain, if declared, constrains the search.
        x: one input, (*input_shape) or (1, *input_shape) (:meth:`OpenBox.check_point`).
        target: a class index other than x's prediction, or None for the nearest point
            where the prediction changes to any other class (one search per class,
            best-first by the distance to that class's half-space under x's own LLC,
            skipping classes whose bound is no better than the best point found).
        norm: 2 (a QP per region) or float('inf') (an LP per region).
        max_regions: regions whose LLC one search may use (>= 1); with ``target=None``
            each class searched has this budget.
        progress: a tqdm bar over regions on stderr (default: for inputs of more than
            256 dimensions, where a region costs about a second).

    Returns:
        A :class:`Counterfactual`.

    Raises:
        ValueError: bad x (as :meth:`OpenBox.check_point`), target out of range or equal
            to the prediction, norm not 2 or inf, max_regions < 1.
        RuntimeError: no point of the target's decision was reached within
            ``max_regions`` regions (raise it, or the target may be unreachable in the
            domain).
        LPError: a solver failed in x's own region.
    """
    xt = ob.check_point(x)
    if norm not in (2, float("inf")):
        raise ValueError(f"norm must be 2 or float('inf'), got {norm!r}")
    norm = 2 if norm == 2 else float("inf")
    if isinstance(max_regions, bool) or not isinstance(max_regions, (int, np.integer)) \
            or max_regions < 1:
        raise ValueError(f"max_regions must be a positive integer, got {max_regions!r}")
    x0 = xt.reshape(-1).double().cpu().numpy()
    first = _Region.at(ob, x0, [])
    source = int(np.argmax(first.W @ x0 + first.b))
    target = _check_target(target, source, ob.num_classes)
    show = x0.size > 256 if progress is None else progress
    bar = tqdm(desc="counterfactual", unit="region", leave=False, disable=not show)
    with bar:
        shared = _Shared(bar)
        shared.cache[first.key] = first
        if target is not None:
            search = _Search(ob, x0, source, target, None, norm, shared)
            return _finish(*_run(search, first, max_regions))
        best = None
        for bound, rival in _rivals(first, x0, source, norm):
            if best is not None and bound >= best[1].distance:
                break
            search = _Search(ob, x0, source, None, rival, norm, shared)
            try:
                found = _run(search, first, max_regions)
            except RuntimeError:
                continue
            if best is None or found[1].distance < best[1].distance:
                best = found
        if best is None:
            raise RuntimeError(
                f"no point where the prediction {source} changes was reached within "
                f"max_regions={max_regions} regions for any class; raise max_regions"
            )
        return _finish(*best)


def _check_target(target, source: int, num_classes: int) -> int | None:
    if target is None:
        return None
    if isinstance(target, Tensor) and target.numel() == 1:
        target = target.item()
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise ValueError(f"target must be an int class index or None, got {target!r}")
    target = int(target)
    if not 0 <= target < num_classes:
        raise ValueError(f"target must lie in [0, {num_classes}), got {target}")
    if target == source:
        raise ValueError(
            f"target {target} is already the prediction at x; pick another class, or "
            "target=None for the nearest change of class"
        )
    return target


def _rivals(region: _Region, x0: np.ndarray, source: int, norm: float
            ) -> list[tuple[float, int]]:
    """(distance from x0 to {f_c >= f_source} under the region's LLC, c) for every class
    c != source, nearest first: a lower bound on c's program in x's own region (only a
    heuristic beyond it)."""
    W, b = region.W, region.b
    f = W @ x0 + b
    out = []
    for c in range(W.shape[0]):
        if c == source:
            continue
        nrm = float(np.linalg.norm(W[c] - W[source], 2 if norm == 2 else 1))
        gap = float(f[source] - f[c])
        out.append((0.0 if gap <= 0 else (gap / nrm if nrm > 0 else np.inf), c))
    return sorted(out)


def _run(search: _Search, first: _Region, max_regions: int
         ) -> tuple[_Search, _Solution, bool]:
    """One search: x's own program, else phase 1; then phase 2 and pull-backs."""
    search.visit(first)
    sol = search.solve_region(first, search.x0)
    if sol is None:
        sol = _approach(search, first, max_regions)
    sol, exact = _descend(search, sol, max_regions)
    return _pull_back(search, sol, exact, max_regions)


def _pull_back(search: _Search, sol: _Solution, exact: bool, max_regions: int
               ) -> tuple[_Search, _Solution, bool]:
    """Where the decision is reached earlier on the segment from x to the optimum (a
    region far from x can lie past another part of the boundary; with ``target=None``
    another class may overtake the source first), that earlier point is nearer in every
    norm: resume phase 2 from it (for the class that overtakes there)."""
    for _ in range(PULL_BACKS):
        u = sol.x - search.x0
        if not np.any(u):
            break
        hit = _first_hit(search, search.x0, sol.x, any_class=search.target is None)
        if hit is None or hit[0] >= 1.0 - PULL_BACK_MIN:
            break
        nxt = search
        if search.target is None and hit[1] != search.cls:
            nxt = _Search(search.ob, search.x0, search.source, None, hit[1], search.norm,
                          search.shared)
            nxt.used = search.used
        if nxt.used >= max_regions:
            break
        p = search.x0 + hit[0] * u
        if search.box is not None:
            p = np.clip(p, *search.box)
        region = nxt.region(p, [u])
        nxt.visit(region)
        search.used = nxt.used
        try:
            start = nxt.solve_region(region, p)
        except LPError:
            start = None
        if start is None or start.distance >= sol.distance * (1.0 - IMPROVEMENT):
            break
        search = nxt
        sol, exact = _descend(search, start, max_regions)
    return search, sol, exact


def _approach(search: _Search, region: _Region, max_regions: int) -> _Solution:
    """Phase 1 (x's own program is infeasible): legs of straight segments, each from the
    current point to the nearest point of its region's LLC decision (:meth:`head_for`),
    until the model's own decision is reached on a leg (:func:`_first_hit`); the region
    entered there has a feasible program."""
    a = search.x0.copy()
    for _ in range(max_regions):  # each leg uses one LLC, even when it ends in the same region
        if search.used >= max_regions:
            break
        y = search.head_for(region, a)
        if search.box is not None:
            y = np.clip(y, *search.box)
        u = y - a
        if not np.any(u):
            break
        hit = _first_hit(search, a, y)
        if hit is not None:
            if search.used >= max_regions:
                break
            p = a + hit[0] * u
            if search.box is not None:
                p = np.clip(p, *search.box)
            nb = search.region(p, [u])
            search.visit(nb)
            sol = search.solve_region(nb, p)
            if sol is not None:
                return sol
            y = p
        if search.used >= max_regions:
            break
        a = y
        region = search.region(a, [u])
        search.visit(region)
    raise RuntimeError(
        f"no point where the decision becomes {_what(search)} was reached within "
        f"max_regions={max_regions} regions; raise max_regions (or the target may be "
        "unreachable inside the domain)"
    )


def _first_hit(search: _Search, a: np.ndarray, y: np.ndarray, any_class: bool = False
               ) -> tuple[float, int] | None:
    """(t, class): the first t in [0, 1] where the model's decision on ``a + t (y - a)``
    is the search's (with ``any_class``: where any class ties or beats the source), and
    that class; or None.

    The model is evaluated at :data:`LINE_SAMPLES` + 1 equally spaced points (one batched
    forward); the interval between the last sample short of the decision and the first
    that reaches it is sampled again, and so on until it is a few ulps wide: t is then
    the crossing to float precision, on the reaching side. A decision reached and lost
    again between two samples is missed. (An exact segment walk is no option here: from
    an image on hundreds of facets the segment crosses tens of thousands of regions.)"""
    groups = _decision_margins(search, any_class)

    def first_reached(t0: float, t1: float):
        t = np.linspace(t0, t1, LINE_SAMPLES + 1)
        f = _logits(search.ob, a[None] + t[:, None] * (y - a)[None])
        reached = np.zeros(t.size, dtype=bool)
        for _, margin in groups:
            reached |= np.all(margin(f) >= 0, axis=1)
        if not reached.any():
            return None
        k = int(np.argmax(reached))
        cls = min(c for c, margin in groups if np.all(margin(f[k : k + 1]) >= 0))
        return t, k, cls

    found = first_reached(0.0, 1.0)
    if found is None:
        return None
    t, k, cls = found
    while k > 0 and t[k] - t[k - 1] > LINE_RESOLUTION * max(1.0, t[k]):
        finer = first_reached(t[k - 1], t[k])
        if finer is None:  # t[k] itself no longer reaches: a batch's rounding, at a tie
            break
        t, k, cls = finer
    return float(t[k]), cls


def _logits(ob, points: np.ndarray) -> np.ndarray:
    """(K, C) float64: the model's own output at points (K, n)."""
    pts = torch.from_numpy(points).to(ob.dtype).to(ob.device)
    with torch.no_grad():
        out = [ob.reference(c.reshape(-1, *ob.input_shape).clone())
               for c in pts.split(ob.batch_size)]
    return torch.cat(out).double().cpu().numpy()


def _decision_margins(search: _Search, any_class: bool):
    """[(class, margins)]: ``margins(f)`` (K, r) are all >= 0 where the logits f (K, C)
    reach that class's decision, ties within the verification band included (a point the
    head-for QP puts exactly on the boundary rounds to either side of it)."""
    s = search.source
    tol = search.tol

    def band(f):
        return (tol.verify_atol + tol.verify_rtol * np.abs(f).max(axis=1))[:, None]

    if search.target is not None:
        t = search.target
        return [(t, lambda f: f[:, [t]] - np.delete(f, t, axis=1) + band(f))]
    classes = [c for c in range(search.ob.num_classes) if c != s] if any_class \
        else [search.cls]
    return [(c, lambda f, c=c: f[:, [c]] - f[:, [s]] + band(f)) for c in classes]


def _first_on_piece(m0: np.ndarray, m1: np.ndarray) -> float | None:
    """Smallest s in [0, 1] with ``m0 + s (m1 - m0) >= 0`` in every entry, or None."""
    lo, hi = 0.0, 1.0
    for a, b in zip(m0, m1):
        if a < 0 and b < 0:
            return None
        if a < 0:
            lo = max(lo, a / (a - b))
        elif b < 0:
            hi = min(hi, a / (a - b))
    return lo if lo <= hi else None


def _what(search: _Search) -> str:
    if search.target is not None:
        return f"class {search.target}"
    return f"another class than {search.source}"


def _neighbours(search: _Search, sol: _Solution) -> Iterator[_Region]:
    """Regions across the active facets of ``sol``'s region at its optimum: first along
    the multiplier-weighted sum of the facets' unit normals, then along single facets."""
    region = sol.region
    A, _, l2, _ = region.rows()
    normals = A[sol.active].astype(np.float64) / l2[sol.active, None]
    order = np.argsort(-sol.multipliers)
    combined = (sol.multipliers[:, None] * normals).sum(axis=0)
    if not np.any(combined):
        combined = normals.sum(axis=0)
    directions = [combined] + [normals[i] for i in order[:FACET_TRIES]]
    scale = 1.0 + float(np.abs(sol.x).max(initial=0.0))
    tau = search.active_tol(sol.x)
    seen = {region.key}
    for v in directions:
        v = _unit(_inward(v, sol.x, search.box, tau))
        if not np.any(v):
            continue
        for step in STEP_SCALES:
            q = sol.x + step * scale * v
            if search.box is not None:
                q = np.clip(q, *search.box)
            nb = search.region(q, [v])
            if nb.key in seen or nb.key in search.solved:
                continue
            seen.add(nb.key)
            yield nb
            break


def _descend(search: _Search, sol: _Solution, max_regions: int) -> tuple[_Solution, bool]:
    """Phase 2: step across the active facets of the optimum while the distance drops.
    Returns the best solution and whether it lies inside its region (no facet active)."""
    while sol.active.size:
        improved = None
        for nb in _neighbours(search, sol):
            if search.used >= max_regions:
                return sol, False
            search.visit(nb)
            try:
                cand = search.solve_region(nb, sol.x)
            except LPError:
                cand = None
            if cand is not None and cand.distance < sol.distance * (1.0 - IMPROVEMENT):
                improved = cand
                break
        if improved is None:
            return sol, False
        sol = improved
    return sol, True


# ------------------------------------------------------------------------------------------
# Verification and the nudge past the boundary
# ------------------------------------------------------------------------------------------


def _nudge_direction(search: _Search, sol: _Solution, f: Tensor, tau: float):
    """u (n,) along which every near-binding decision margin of the LLC grows at unit
    rate (min-norm, domain-respecting), or None when the domain blocks every such u.
    Near-binding: within ``NUDGE_BAND * (1 + max|f|)`` of the decision."""
    W = sol.region.W
    f = f.numpy()
    band = NUDGE_BAND * (1.0 + float(np.abs(f).max()))
    if search.target is not None:
        t = search.target
        rivals = [c for c in range(W.shape[0]) if c != t and f[t] - f[c] <= band]
        G = np.stack([W[t] - W[c] for c in rivals]) if rivals else np.zeros((0, W.shape[1]))
    else:
        s = search.source
        c = max((c for c in range(W.shape[0]) if c != s), key=lambda c: f[c])
        G = (W[c] - W[s])[None]
    if G.shape[0] == 0:
        return None
    free = np.ones(W.shape[1], dtype=bool)
    if search.box is not None:
        lo, hi = search.box
        free = (sol.x - lo > tau) & (hi - sol.x > tau)  # coordinates at a bound stay
    if not np.any(G[:, free]):
        return None
    # first along the region's active facets (the LLC stays the network's there), then
    # freely (the facets then move the point into a neighbour, whose logits agree to
    # first order only near the optimum)
    A, _, l2, _ = sol.region.rows()
    stay = A[sol.active].astype(np.float64) / l2[sol.active, None]
    for rows, rhs in ((np.vstack([G, stay]), np.r_[np.ones(G.shape[0]), np.zeros(len(stay))]),
                      (G, np.ones(G.shape[0]))):
        u = np.zeros(W.shape[1])
        u[free] = np.linalg.lstsq(rows[:, free], rhs, rcond=None)[0]
        if np.all(G @ u > 0.5) and np.all(np.abs(rows @ u - rhs) <= NUDGE_RESIDUAL):
            return u
    return None


def _finish(search: _Search, sol: _Solution, exact: bool) -> Counterfactual:
    ob = search.ob
    tol = ob.tol
    x = sol.x.copy()
    cls = sol.cls

    def evaluate(p: np.ndarray):
        pt = torch.from_numpy(p).to(ob.dtype).reshape(1, *ob.input_shape).to(ob.device)
        with torch.no_grad():
            f = ob.reference(pt.clone())[0].double().cpu()
        return pt[0], f

    def margin(f: Tensor) -> tuple[float, int]:
        """(margin, the competing class) by the model's logits."""
        if search.target is not None:
            others = f.clone()
            others[search.target] = -torch.inf
            c = int(others.argmax())
            return float(f[search.target] - f[c]), c
        others = f.clone()
        others[search.source] = -torch.inf
        c = int(others.argmax())
        return float(f[c] - f[search.source]), c

    point, f = evaluate(x)
    m, rival = margin(f)
    tau = search.active_tol(x)
    need = 0.0
    for _ in range(NUDGE_TRIES):
        if m > 0:
            break
        band = float(tol.verify_atol + tol.verify_rtol * f.abs().max())
        u = _nudge_direction(search, sol, f, tau)
        if u is None:
            break
        need = max(2.0 * need, band - m)
        x = sol.x + need * u
        if search.box is not None:
            x = np.clip(x, *search.box)
        point, f = evaluate(x)
        m, rival = margin(f)
    band = float(tol.verify_atol + tol.verify_rtol * f.abs().max())
    verified = m >= -band
    if search.target is None:
        cls = rival if m > 0 else cls
    dist = search.dist(point.reshape(-1).double().cpu().numpy())
    return Counterfactual(
        point=point, distance=dist, target=int(cls), source=search.source, norm=search.norm,
        regions=list(search.shared.regions), region=sol.region.key, exact_in_region=exact,
        verified=bool(verified), logits=f.to(ob.dtype), margin=m,
    )
