"""H-representation helpers over ``{x : A x <= d}``: coercion, row norms, thresholds, slack
and radius, and the error for an empty polytope.

Convention everywhere in :mod:`openbox.geometry`: A is (m, n), d is (m,), and the polytope
is ``P = {x in R^n : A x <= d}`` (row i: ``a_i . x <= d_i``). A may be float64 or float32,
C- or Fortran-ordered (the engine builds it as the transpose of a C-ordered (n, m) array);
it is never copied whole except where a function says so. Torch tensors are accepted
wherever an array is (detached, moved to the CPU, viewed as numpy without a copy; torch is
never imported here). Computations run in float64 whatever the storage dtype; LPs always do.

Zero rows (``a_i = 0``) say ``0 <= d_i``: with ``d_i`` within tolerance of or above 0 they
hold everywhere and are ignored; with ``d_i`` below that the polytope is empty.

Tolerances come from :class:`openbox.tolerances.Tolerances`: a point x satisfies row i when
``a_i.x - d_i <= tol.feasibility * (1 + |d_i| + ||a_i||_1 ||x||_inf)`` (the row's *slack
threshold*); a row whose slack ``d_i - a_i.x`` lies within that threshold of 0 is *tight*
(x is on it); LP solvers get ``tol.lp``.
"""

from __future__ import annotations

import numpy as np

from openbox.tolerances import Tolerances

__all__ = ["EmptyPolytopeError", "as_numpy", "compute_radius", "compute_slack"]

# Row blocks of ~32 MB float64 for chunked passes over A.
_BLOCK_ELEMENTS = 1 << 22


class EmptyPolytopeError(ValueError):
    """The polytope ``{x : A x <= d}`` (intersected with the bounds box, if any) is empty:
    no point satisfies every row within the feasibility tolerance."""


def as_numpy(a, dtype=None) -> np.ndarray:
    """A numpy view of ``a`` (numpy array, torch tensor or sequence), without a copy when
    possible. Torch tensors are detached and moved to the CPU. ``dtype`` converts if given."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch.Tensor, without importing torch here
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=dtype)


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
    """Rows of an (m, n) array per block of about _BLOCK_ELEMENTS entries."""
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


def _row_l2(A: np.ndarray) -> np.ndarray:
    """(m,) float64 ||a_i||_2 of every row, one pass without a temporary as large as A (the
    engine's A is Fortran-ordered, so its transpose is read in C order)."""
    m, n = A.shape
    out = np.empty(m)
    if A.flags.f_contiguous and not A.flags.c_contiguous:
        At = A.T
        step = _block_rows(n)
        for i in range(0, m, step):
            B = At[:, i : i + step]
            out[i : i + step] = np.einsum("ji,ji->i", B, B, dtype=np.float64)
    else:
        step = _block_rows(n)
        for i in range(0, m, step):
            B = A[i : i + step]
            out[i : i + step] = np.einsum("ij,ij->i", B, B, dtype=np.float64)
    return np.sqrt(out)


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
    return tol.slack_threshold(d, l1, x_inf)


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




class _Rows:
    """A (not copied), d, row norms and the nonzero rows of ``{x : A x <= d}``."""

    def __init__(self, A, d):
        self.A = _matrix(A)
        self.m, self.n = self.A.shape
        self.d = _vector(d, self.m, "d")
        self._norms = None
        self.l2 = _row_l2(self.A)
        # A row is zero iff its l1 norm is; l2 == 0 can also be a nonzero row whose squares
        # underflow, so only those few rows are looked at again.
        self.zero = self.l2 == 0
        for i in np.flatnonzero(self.zero):
            self.zero[i] = not np.any(self.A[i])
        self.live = np.flatnonzero(~self.zero)

    @property
    def norms(self) -> dict[str, np.ndarray]:
        """||a_i||_1, ||a_i||_2, ||a_i||_inf (computed on first use)."""
        if self._norms is None:
            self._norms = _row_norms(self.A)
        return self._norms

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
