"""``Polytope``: the region of a network around the point it was built at.

Convention: A (m, n), d (m,), ``P = {x : A x <= d}`` (see :mod:`openbox.geometry.hrep`);
the optional input-domain box is kept apart from the network's own rows.
"""

from __future__ import annotations

import numpy as np

from openbox.geometry.chebyshev import compute_chebyshev_center
from openbox.geometry.hrep import (
    _box,
    _check_inside,
    _dual_norm_name,
    _matvec,
    _point,
    _radius_from,
    _row_norms,
    _thresholds,
    _vector,
    as_numpy,
)
from openbox.geometry.irredundant import compute_irredundant
from openbox.tolerances import Tolerances

__all__ = ["Polytope"]


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
                    thr = tol.slack_threshold(bound, 1.0, x_inf)
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

    def inscribed_radius(self, *, method: str = "auto") -> float:
        """The region's own inscribed-ball radius, an LP (about a second on a demo-CNN
        region, as one sparse solve; hence a method): the largest L2 ball inside the
        network's polytope P,
        *without* the domain box (``chebyshev_center(include_domain=False)``'s radius;
        ``inf`` for an unbounded region that holds every ball). Positive for a
        full-dimensional region even when :meth:`radius` is an honest 0 because the point
        is on a facet.

        Why not inside the domain too: on real images P ∩ [0, 1]^n is typically flat. Rows
        tight at the point (ties) and pixels at 0 combine, with nonnegative weights, to
        ``0 . x <= 0`` (an exact LP-duality certificate), so no ball fits there and that
        radius is 0 for every such image. Use ``chebyshev_center(include_domain=True)`` for it.
        """
        return self.chebyshev_center(include_domain=False, method=method)[1]

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
