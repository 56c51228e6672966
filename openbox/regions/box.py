"""Box search: every linear region that meets an L-inf box around a point, and their adjacency.

:func:`box` walks breadth-first over the regions that meet ``B = {x : ||x - x0||_inf <= eps}``
(intersected with the OpenBox's domain, if one is declared). For each region:

1. its rows ``A x <= d`` (:func:`openbox.constraints.build_constraints`, from the
   configuration the region was entered with) and its LLC (:func:`compose_backward`);
2. the rows that are facets of ``P ∩ B`` (:func:`~openbox.geometry.compute_irredundant` with
   the box as bounds: one LP per row not settled by its exact filters);
3. a witness: the Chebyshev centre of ``P ∩ B`` (an LP), a point strictly inside both;
4. for every facet, a point in its relative interior inside the box (an LP: the point of the
   facet's hyperplane farthest from the other facets and the box's faces), and the region
   on the other side: :func:`~openbox.configuration.configure` at that point with a
   lexicographic tie-break, the facet's outward normal first, then the OpenBox's direction
   u (the region entered when stepping across the facet, see :mod:`openbox.configuration`).
   The facet points of one region are configured in one batched pass.

Why one crossing per facet suffices: the regions of a continuous piecewise-linear network
(configurations of ReLU signs and max-pool selections) form a polyhedral complex. At a
point of a facet's relative interior every gate other than those that vanish on the whole
facet keeps its strict sign, and those that do vanish are decided by the same derivatives
at every point of the facet; so the whole facet lies in the closure of one neighbour, whose
own facet on that hyperplane is the same set. The cells ``P ∩ B`` tile the box and their
adjacency graph is connected, so the walk finds every region whose intersection with the
box has an interior. Regions that meet the box only in a lower-dimensional set (touching
its boundary) are not reported. A facet already crossed from the other side (the
neighbour's edge point lies on it) is not crossed again.

The same walk runs over several networks at once (:func:`refinement`): then a cell is a
tuple of regions, one per network, whose intersection meets the box, and its rows are all
the networks' rows; :func:`openbox.regions.equivalence.equivalent` walks the common
refinement of two networks that way.

Scaling (``experiments/bench_box.py``, float64, one torch thread, a shared 2-core machine):
the work per region is one basis push (n vectors), one LP per row the exact filters of
:func:`~openbox.geometry.compute_irredundant` leave undecided, a witness LP and one
warm-started LP per facet, all with n + 1 columns. Seeded random networks, box around a
random point:

============================  =====  ======  ========  ========  =========
network                       n      eps     regions   facets    regions/s
============================  =====  ======  ========  ========  =========
MLP 2-10-10-3                 2      1.5     102       183       96
MLP 4-16-16-4                 4      0.1     17        29        122
MLP 4-16-16-4                 4      0.8     1,274     4,056     75
MLP 8-16-16-4                 8      0.25    527       1,861     86
MLP 16-16-16-4                16     0.1     542       2,029     77
MLP 64-64-64-4                64     0.01    46        101       65
CNN (1, 4, 4), ch (2, 3)      16     0.04    501       2,160     75
CNN (1, 8, 8), ch (2, 3)      64     0.01    172       602       61
CNN (1, 12, 12), ch (2, 3)    144    0.01    > 1,000   > 3,047   31
CNN (1, 28, 28), ch (4, 8)    784    5e-4    > 100     > 220     2.3
============================  =====  ======  ========  ========  =========

(">": stopped by ``max_regions``.) So: ~100 regions/s up to a few tens of inputs, falling to
~2 regions/s at Fashion-MNIST size (784 inputs: each region's facet tests are LPs over
thousands of rows and 785 columns), while the number of regions grows fast with eps and n
(17 to 1,274 as eps goes from 0.1 to 0.8 at n = 4; more than 100 at eps = 5e-4 around a
28 x 28 input). Around a real image, which sits on hundreds of tied facets, the demo CNN's
first region alone has ~1,500 facets inside a box of eps = 1e-5. Full boxes are practical for
inputs of up to ~100 dimensions and a few thousand regions; for images, use
:func:`openbox.regions.segment` or :func:`openbox.regions.plane` slices (and
:func:`~openbox.regions.equivalence.equivalent_on_segment` / ``equivalent_on_plane``).

Only the L-inf ball is supported: the L2 ball turns the LPs into second-order cone programs,
which the project's one LP wrapper (:mod:`openbox.geometry.lp`) does not solve.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from openbox.configuration import RegionKey, configure
from openbox.constraints import build_constraints, step_along
from openbox.geometry import (
    IncrementalLP,
    Polytope,
    compute_chebyshev_center,
    compute_irredundant,
)
from openbox.linear_maps import compose_backward
from openbox.tolerances import Tolerances

__all__ = ["BoxRegion", "BoxSearch", "Cell", "Refinement", "box", "refinement"]

DEFAULT_MAX_REGIONS = 1000
"""Regions (cells) a search processes before it stops with ``complete=False``."""

CROSSING_ATTEMPTS = 4
"""Steps across a facet before the walk gives up: the first configures *at* the facet point
(the gate is tied there and the tie-break decides); when rounding left the point a hair
inside the region, each further one steps to the facet along its normal
(:func:`~openbox.constraints.step_along`) and past it by a nudge that grows 16-fold."""

NUDGE_EPS = 16
"""The first nudge past a facet, in machine epsilons of the working dtype times
``1 + ||x||_inf`` (as :func:`openbox.regions.segment` nudges past a breakpoint)."""


# ------------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class BoxRegion:
    """One region of a :class:`BoxSearch`.

    Attributes:
        key: the region's key (as ``ob.region_key(witness)``).
        polytope: the region within the box, ``{x : A x <= d}`` with only the rows that are
            facets of ``P ∩ box`` (A, d as the engine builds them, not normalised; the box
            itself is not among the rows), built at the witness, with the OpenBox's domain.
            It equals the region inside the box only (rows redundant there are left out).
        weight: (C, *input_shape) W of the region's LLC, ``f(x) = W x + b`` on it.
        bias: (C,) b.
        witness: (*input_shape) a point strictly inside the region and the box: the centre
            of the largest L2 ball inside ``P ∩ box``.
        radius: that ball's radius (> 0).
        prediction: the predicted class at the witness.
        n_rows: rows of the region's full polytope (before the facets were selected).
    """

    key: RegionKey
    polytope: Polytope
    weight: Tensor
    bias: Tensor
    witness: Tensor
    radius: float
    prediction: int
    n_rows: int


@dataclass(eq=False)
class BoxSearch:
    """The result of :func:`box`.

    Attributes:
        regions: region key -> :class:`BoxRegion`, in breadth-first order from x0's region.
        graph: networkx.Graph over the keys of ``regions``; an edge for every facet two
            regions share inside the box, with attributes ``row`` ((n,) float64 unit normal
            a), ``offset`` (float d; the facet is ``a . x = d``), ``inside`` (the key of the
            region on the ``a . x <= d`` side) and ``point`` ((n,) float64, the point of the
            facet where the walk crossed it).
        complete: False when ``max_regions`` stopped the walk before every region was found.
        lo, hi: (n,) float64 the box searched, ``[x0 - eps, x0 + eps]`` clipped to the domain.
        n_lps: LPs the walk solved for witnesses and facet points (the facet tests inside
            :func:`~openbox.geometry.compute_irredundant` are not counted).
        seconds: wall time of the search.
        skipped_facets: facets too thin to cross (see :class:`Refinement`); 0 in every case
            tested.
    """

    regions: dict[RegionKey, BoxRegion]
    graph: nx.Graph
    complete: bool
    lo: np.ndarray
    hi: np.ndarray
    n_lps: int = 0
    seconds: float = 0.0
    skipped_facets: int = 0

    def __len__(self) -> int:
        return len(self.regions)

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete (max_regions reached)"
        return (f"BoxSearch({len(self.regions)} regions, {self.graph.number_of_edges()} shared "
                f"facets, {state}, {self.n_lps} LPs in {self.seconds:.2f} s)")

    def locate(self, x: Tensor) -> list[RegionKey | None]:
        """The key of the region whose polytope (within the box) contains each point of x
        (B, *input_shape), to the polytopes' slack threshold (the first match for a point on
        a shared facet); None for a point in none (outside the box, or not found by an
        incomplete search)."""
        pts = x.detach().reshape(x.shape[0], -1).double().cpu().numpy()
        out: list[RegionKey | None] = []
        for p in pts:
            inside = np.all(p >= self.lo) and np.all(p <= self.hi)
            out.append(next((k for k, r in self.regions.items() if inside
                             and r.polytope.contains(p, include_domain=False)), None))
        return out


@dataclass(frozen=True, eq=False)
class Cell:
    """One cell of a :func:`refinement`: a region of each network whose intersection meets
    the box with an interior.

    Attributes:
        keys: one region key per network.
        A: (k, n) float64 the rows that are facets of the cell within the box (the networks'
            rows as built, not normalised); d: (k,).
        owner: (k,) int64 which network each row comes from; row: (k,) int64 its index in
            that network's full rows (``Refinement.rows(i, key)``).
        witness: (n,) float64 centre of the largest L2 ball inside the cell and the box.
        radius: that ball's radius.
    """

    keys: tuple[RegionKey, ...]
    A: np.ndarray
    d: np.ndarray
    owner: np.ndarray
    row: np.ndarray
    witness: np.ndarray
    radius: float


@dataclass(frozen=True, eq=False)
class _Region:
    """One network's region, cached by key: its full rows and its LLC."""

    A: np.ndarray  # (m, n) float64
    d: np.ndarray  # (m,)
    source: np.ndarray  # (m,) ROW_SOURCE_DTYPE
    weight: Tensor  # (C, *input_shape)
    bias: Tensor  # (C,)


@dataclass(eq=False)
class Refinement:
    """The result of :func:`refinement`.

    Attributes:
        cells: cell keys (one region key per network) -> :class:`Cell`, breadth-first.
        graph: networkx.Graph over the cell keys, an edge per shared facet (attributes as in
            :class:`BoxSearch`, plus ``owner``: the network whose row the facet is).
        complete: every cell was found (not stopped by ``max_cells`` or by ``visit``).
        stopped: ``visit`` asked the walk to stop.
        lo, hi: (n,) the box. n_lps: LPs solved. seconds: wall time.
        regions: per network, key -> its region's full rows and LLC (``_Region``).
        skipped_facets: facets not crossed because the LP found no point of them at a
            distance above the feasibility tolerance from the other facets and the box (a
            facet that thin is rounding; 0 in every case tested).
    """

    cells: dict[tuple[RegionKey, ...], Cell]
    graph: nx.Graph
    complete: bool
    stopped: bool
    lo: np.ndarray
    hi: np.ndarray
    n_lps: int
    seconds: float
    regions: list[dict[RegionKey, _Region]] = field(repr=False)
    skipped_facets: int = 0

    def llc(self, i: int, key: RegionKey) -> tuple[Tensor, Tensor]:
        """(W (C, *input_shape), b (C,)) of network i's region ``key``."""
        r = self.regions[i][key]
        return r.weight, r.bias

    def rows(self, i: int, key: RegionKey) -> tuple[np.ndarray, np.ndarray]:
        """(A (m, n), d (m,)) float64: all rows of network i's region ``key``."""
        r = self.regions[i][key]
        return r.A, r.d


# ------------------------------------------------------------------------------- checks


def check_box(obs: Sequence, x0: Tensor, eps: float, norm) -> tuple[Tensor, np.ndarray,
                                                                      np.ndarray]:
    """Validate (x0, eps, norm) for the OpenBoxes ``obs`` (same input shape) and return x0
    as (1, *input_shape) in the working dtype and the box (lo, hi), (n,) float64 each:
    ``[x0 - eps, x0 + eps]`` intersected with every declared domain.

    Raises:
        NotImplementedError: ``norm == 2`` (an SOCP; see the module docstring).
        ValueError: another norm; eps not a finite number > 0; x0 invalid for an OpenBox
            (:meth:`OpenBox.check_point`); a box of zero width in some coordinate.
    """
    if norm == 2:
        raise NotImplementedError(
            "norm=2: the L2 ball makes every LP of the search a second-order cone program, "
            "which openbox's LP wrapper does not solve; use norm=float('inf') (an L2 ball of "
            "radius eps lies inside the L-inf box of the same eps)")
    if norm != float("inf"):
        raise ValueError(f"norm must be float('inf') (an L-inf box), got {norm!r}")
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"eps must be a number > 0, got {eps!r}") from None
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps!r}")
    x0 = obs[0].check_point(x0, "x0")
    for ob in obs[1:]:
        ob.check_point(x0, "x0")
    x = x0.reshape(-1).double().cpu().numpy()
    lo, hi = x - eps, x + eps
    for ob in obs:
        if ob.domain is not None:
            dlo, dhi = (np.broadcast_to(torch.as_tensor(b, dtype=torch.float64).reshape(-1)
                                        .numpy(), x.shape) for b in ob.domain)
            lo, hi = np.maximum(lo, dlo), np.minimum(hi, dhi)
    if np.any(hi <= lo):
        j = int(np.argmin(hi - lo))
        raise ValueError(f"the box around x0 has zero width in coordinate {j} ([{lo[j]:g}, "
                         f"{hi[j]:g}] after clipping to the domain); it has no interior")
    return x0, lo, hi


# ------------------------------------------------------------------------------- the walk


def _normalise(A: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(A, axis=1)
    return A / norms[:, None], d / norms


class _FacetPoints:
    """Points in the relative interior of a cell's facets, one warm-started LP each.

    For facet j: the point of its hyperplane ``An_j . x = dn_j`` farthest (in L2 distance to
    their hyperplanes) from the other facets and the box's faces, and that distance r: max r
    s.t. ``An_i . x + r <= dn_i`` (i != j), ``lo + r <= x <= hi - r``, ``An_j . x = dn_j``.
    One HiGHS model holds, per facet i, the row with r, the row without it and its reverse
    ``-An_i . x <= -dn_i``; facet j's LP switches its row with r off and its reverse on, so
    every LP after the first starts from the last basis (:class:`IncrementalLP`).
    """

    def __init__(self, An: np.ndarray, dn: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                 tol: Tolerances):
        k, n = An.shape
        eye, zeros, ones = np.eye(n), np.zeros((k, 1)), np.ones((k, 1))
        A = np.vstack([np.hstack([An, ones]), np.hstack([An, zeros]), np.hstack([-An, zeros]),
                       np.hstack([eye, np.ones((n, 1))]), np.hstack([-eye, np.ones((n, 1))])])
        b = np.concatenate([dn, dn, np.full(k, np.inf), hi, -lo])
        cost = np.zeros(n + 1)
        cost[n] = -1.0
        self.lp = IncrementalLP(cost, A, b, tol=tol)
        self.An, self.dn, self.lo, self.hi, self.tol = An, dn, lo, hi, tol
        self.k, self.n = k, n

    def point(self, j: int) -> tuple[np.ndarray, float] | None:
        """(x (n,), r) for facet j, or None when the LP finds no point with r > 0."""
        k, n, An, dn = self.k, self.n, self.An, self.dn
        self.lp.set_row_upper(j, np.inf)
        self.lp.set_row_upper(2 * k + j, -dn[j])
        res = self.lp.solve()
        self.lp.set_row_upper(j, dn[j])
        self.lp.set_row_upper(2 * k + j, np.inf)
        if res.status != "optimal":
            return None
        x, r = res.x[:n], float(res.x[n])
        if not r > self.tol.feasibility * (1.0 + float(np.max(np.abs(x)))):
            return None
        x = x - (An[j] @ x - dn[j]) * An[j]  # onto the hyperplane, to rounding
        return np.clip(x, self.lo, self.hi), r


class _Net:
    """One network of a walk: its OpenBox and its regions, cached by key."""

    def __init__(self, ob):
        self.ob = ob
        self.regions: dict[RegionKey, _Region] = {}
        self.eye = torch.eye(ob.num_classes, dtype=ob.dtype, device=ob.device)[None]

    def configure(self, x: Tensor, dirs: Tensor):
        return configure(self.ob.program, x, dirs, self.ob.tol, record=True,
                         context=self.ob.key_context)

    def ensure(self, key: RegionKey, config, gates) -> None:
        """Build the region's rows and LLC from a configuration of one input, once."""
        if key in self.regions:
            return
        ob = self.ob
        with torch.no_grad():
            cons = build_constraints(ob.program, config, gates, ob.tol, chunk=ob.chunk)
            w, b = compose_backward(ob.program, config, self.eye)
        self.regions[key] = _Region(np.asarray(cons.A, dtype=np.float64),
                                    np.asarray(cons.d, dtype=np.float64), cons.source, w[0],
                                    b[0])


Visit = Callable[[Cell, "list[_Net]"], bool]
"""``visit(cell, nets) -> stop``: called for every new cell; True stops the walk."""


def refinement(
    obs: Sequence,
    x0: Tensor,
    lo: np.ndarray,
    hi: np.ndarray,
    *,
    max_cells: int = DEFAULT_MAX_REGIONS,
    progress: bool | None = None,
    visit: Visit | None = None,
    desc: str = "box",
) -> Refinement:
    """Breadth-first walk over the common refinement of the partitions of the networks
    ``obs`` (OpenBoxes with the same input shape and dtype) inside the box ``[lo, hi]``.

    Args:
        obs: one OpenBox (:func:`box`) or several (their cells are tuples of regions).
        x0: (1, *input_shape) checked start; the walk starts at x0 if it lies strictly inside
            the box, else at the box's centre, with the first OpenBox's tie-break direction
            (used for every network, so that the regions chosen at a tie intersect).
        lo, hi: (n,) float64, lo < hi.
        max_cells: stop (``complete=False``) after this many cells.
        progress: a tqdm bar over cells found (default on).
        visit: optional ``visit(cell, nets) -> bool``, called for every new cell before its
            facets are crossed; True stops the walk (``stopped=True``).

    Returns:
        a :class:`Refinement`. See the module docstring for the algorithm.
    """
    started = time.perf_counter()
    if max_cells < 1:
        raise ValueError(f"max_regions / max_cells must be >= 1, got {max_cells}")
    nets = [_Net(ob) for ob in obs]
    ob0 = obs[0]
    tol = ob0.tol
    shape = ob0.input_shape
    u = ob0.direction
    bounds = (lo, hi)
    as_t = lambda a: torch.as_tensor(a, dtype=ob0.dtype, device=ob0.device)  # noqa: E731
    eps = float(torch.finfo(ob0.dtype).eps)

    x = x0.reshape(-1).double().cpu().numpy()
    start = x0 if np.all((x > lo) & (x < hi)) else as_t(0.5 * (lo + hi)).reshape(1, *shape)
    keys, parts = [], []
    with torch.no_grad():
        for net in nets:
            _, config, gates, _ = net.configure(start, u)
            keys.append(config.region_keys()[0])
            parts.append((config, gates))
    first = tuple(keys)

    cells: dict[tuple[RegionKey, ...], Cell] = {}
    graph = nx.Graph()
    # frontier: (cell key, per network the (configuration, gate values) it was entered with);
    # a region's rows are built when a cell of it is processed, not when it is first seen
    queue = deque([(first, parts)])
    queued = {first}
    n_lps = n_skipped = 0
    complete, stopped = True, False
    bar = tqdm(desc=desc, unit="cell" if len(obs) > 1 else "region", leave=False,
               disable=not (True if progress is None else progress))
    with bar, torch.no_grad():
        while queue:
            if len(cells) >= max_cells:
                complete = False
                break
            ckey, entry = queue.popleft()
            for net, k, (config, gates) in zip(nets, ckey, entry):
                net.ensure(k, config, gates)
            regions = [net.regions[k] for net, k in zip(nets, ckey)]
            A = np.vstack([r.A for r in regions])
            d = np.concatenate([r.d for r in regions])
            owner = np.concatenate([np.full(r.A.shape[0], i) for i, r in enumerate(regions)])
            row = np.concatenate([np.arange(r.A.shape[0]) for r in regions])
            facets = compute_irredundant(A, d, bounds=bounds, tol=tol, progress=False)
            Af, df = A[facets], d[facets]
            centre, radius = compute_chebyshev_center(Af, df, bounds=bounds, tol=tol)
            n_lps += 1
            cell = Cell(ckey, Af, df, owner[facets], row[facets], centre, radius)
            cells[ckey] = cell
            graph.add_node(ckey)
            bar.update(1)
            if visit is not None and visit(cell, nets):
                complete, stopped = False, True
                break
            if facets.size == 0:
                continue
            An, dn = _normalise(Af, df)
            points, normals, rows = [], [], []
            facet_points = _FacetPoints(An, dn, lo, hi, tol)
            for j in range(An.shape[0]):
                if _crossed(graph, ckey, An[j], dn[j], tol):
                    continue
                found = facet_points.point(j)
                n_lps += 1
                if found is None:  # flat within the box, to the feasibility tolerance
                    n_skipped += 1
                    continue
                points.append(found[0])
                normals.append(An[j])
                rows.append(j)
            if not points:
                continue
            P = as_t(np.array(points)).reshape(-1, *shape)
            N = as_t(np.array(normals)).reshape(-1, *shape)
            dirs = torch.stack([N, u.expand_as(N)])
            nb_keys, nb_parts = _cross(nets, P, N, dirs, ckey, eps)
            for i, j in enumerate(rows):
                nkey = nb_keys[i]
                if not graph.has_edge(ckey, nkey):
                    graph.add_edge(ckey, nkey, row=An[j].copy(), offset=float(dn[j]),
                                   inside=ckey, point=np.asarray(points[i]),
                                   owner=int(cell.owner[j]))
                if nkey not in queued:
                    queued.add(nkey)
                    queue.append((nkey, nb_parts[i]))
    if not complete:  # edges to cells that were found but never processed
        graph.remove_nodes_from([k for k in list(graph.nodes) if k not in cells])
    return Refinement(cells, graph, complete and not queue, stopped, lo, hi, n_lps,
                      time.perf_counter() - started, [net.regions for net in nets], n_skipped)


def _crossed(graph: nx.Graph, ckey, a: np.ndarray, d: float, tol: Tolerances) -> bool:
    """Whether facet ``a . x <= d`` (unit a) of cell ``ckey`` was crossed from the other
    side: a known neighbour's edge has the opposite normal and its point lies on the facet."""
    for nb in graph.neighbors(ckey):
        e = graph.edges[ckey, nb]
        if e["inside"] == ckey:
            continue
        p = e["point"]
        on = abs(float(a @ p) - d) <= tol.slack_threshold(d, float(np.abs(a).sum()),
                                                          float(np.max(np.abs(p))))
        if on and 1.0 + float(a @ e["row"]) <= tol.feasibility:
            return True
    return False


def _cross(nets: list[_Net], P: Tensor, N: Tensor, dirs: Tensor, ckey, eps: float):
    """Configure every network at the facet points P (B, *input_shape), stepping across
    along the normals N when rounding left a point inside the cell (see
    :data:`CROSSING_ATTEMPTS`). Returns per point the neighbour's cell key and, per network,
    the (configuration, gate values) of one input it was found with."""
    b = P.shape[0]
    keys: list = [None] * b
    parts: list = [None] * b
    todo = torch.arange(b)
    x = P.clone()
    nudge = NUDGE_EPS * eps
    shape = (-1, *[1] * (P.dim() - 1))
    for attempt in range(CROSSING_ATTEMPTS):
        xs, ds = x[todo], dirs[:, todo]
        runs = [net.configure(xs, ds) for net in nets]
        per_net = [r.configuration.region_keys() for r in runs]
        stuck = []
        for i, j in enumerate(todo.tolist()):
            key = tuple(k[i] for k in per_net)
            if key == ckey:
                stuck.append(i)
                continue
            keys[j] = key
            parts[j] = [(r.configuration[i], r.gate_values[i]) for r in runs]
        if not stuck:
            return keys, parts
        if attempt == CROSSING_ATTEMPTS - 1:
            break
        stuck_t = torch.tensor(stuck)
        dt = torch.stack([step_along(net.ob.program, r.configuration[stuck_t],
                                     r.gate_values[stuck_t], net.ob.tol)
                          for net, r in zip(nets, runs)]).amin(0)
        rows = todo[stuck_t]
        scale = x[rows].reshape(len(stuck), -1).abs().amax(1).double().cpu() + 1.0
        step = (torch.where(torch.isfinite(dt), dt, 0.0) + nudge * scale).to(x.dtype)
        x[rows] = x[rows] + step.to(x.device).reshape(shape) * N[rows]
        nudge *= 16
        todo = rows
    raise RuntimeError(
        f"box: could not cross {len(stuck)} facet(s) of a region after {CROSSING_ATTEMPTS} "
        "steps; the configuration on the far side equals the region's own (the walk is "
        "inconsistent)")


# ------------------------------------------------------------------------------- box


def box(
    ob,
    x0: Tensor,
    eps: float,
    norm: float = float("inf"),
    max_regions: int = DEFAULT_MAX_REGIONS,
    *,
    progress: bool | None = None,
) -> BoxSearch:
    """Every linear region of the network that meets the box ``||x - x0||_inf <= eps``.

    Args:
        ob: an :class:`~openbox.OpenBox`.
        x0: (*input_shape) the box's centre (inside the OpenBox's domain, if declared).
        eps: the box's half-width, > 0. The box is intersected with the domain.
        norm: float("inf") only (``norm=2`` raises NotImplementedError: an SOCP; any other
            value ValueError).
        max_regions: stop, with ``complete=False``, after this many regions.
        progress: a tqdm bar over regions found (default on).

    Returns:
        a :class:`BoxSearch`: ``.regions`` (key -> :class:`BoxRegion` with its polytope
        within the box, LLC and witness), ``.graph`` (an edge per shared facet),
        ``.complete``. Every region whose intersection with the box has an interior is found
        when complete; see the module docstring for the algorithm and how far it scales.

    Raises:
        ValueError: bad x0, eps or norm (see :func:`check_box`).
        RuntimeError: the walk could not cross a facet (numerically inconsistent).
    """
    x0, lo, hi = check_box([ob], x0, eps, norm)
    ref = refinement([ob], x0, lo, hi, max_cells=max_regions, progress=progress)
    regions: dict[RegionKey, BoxRegion] = {}
    store = ref.regions[0]
    for (key,), cell in ref.cells.items():
        r = store[key]
        poly = Polytope(cell.A, cell.d, cell.witness, domain=ob.domain, tol=ob.tol,
                        row_source=r.source[cell.row], n_dropped=0)
        w = torch.as_tensor(cell.witness, dtype=ob.dtype, device=ob.device).reshape(
            ob.input_shape)
        pred = int((r.weight.flatten(1) @ w.reshape(-1) + r.bias).argmax())
        regions[key] = BoxRegion(key, poly, r.weight, r.bias, w, cell.radius, pred,
                                 r.A.shape[0])
    graph = nx.relabel_nodes(ref.graph, {k: k[0] for k in ref.graph.nodes})
    for _, _, attrs in graph.edges(data=True):
        attrs["inside"] = attrs["inside"][0]
        del attrs["owner"]
    return BoxSearch(regions, graph, ref.complete, lo, hi, ref.n_lps, ref.seconds,
                     ref.skipped_facets)
