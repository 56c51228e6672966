"""Polytope geometry over an H-representation ``{x : A x <= d}``: numpy and LP solvers only.

No torch model is imported here (torch tensors are accepted as arrays); it is testable
without any network, as pypoman is. Convention everywhere: A is (m, n), d is (m,), and
``P = {x in R^n : A x <= d}``.

Flat functions (pypoman style): :func:`compute_slack`, :func:`compute_radius`,
:func:`compute_chebyshev_center`, :func:`compute_irredundant`; :class:`Polytope` bundles
them around the point it was built at. Every LP goes through :func:`solve_lp` /
:class:`IncrementalLP`, every QP through :func:`solve_qp` (:mod:`openbox.geometry.lp`).
"""

from openbox.geometry.chebyshev import compute_chebyshev_center
from openbox.geometry.hrep import EmptyPolytopeError, as_numpy, compute_radius, compute_slack
from openbox.geometry.irredundant import compute_irredundant
from openbox.geometry.lp import IncrementalLP, LPError, LPResult, solve_lp, solve_qp
from openbox.geometry.polytope import Polytope

__all__ = [
    "EmptyPolytopeError",
    "IncrementalLP",
    "LPError",
    "LPResult",
    "Polytope",
    "as_numpy",
    "compute_chebyshev_center",
    "compute_irredundant",
    "compute_radius",
    "compute_slack",
    "solve_lp",
    "solve_qp",
]
