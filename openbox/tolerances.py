"""Every numerical tolerance openbox uses, named, in one place.

Tolerances are passed explicitly to the functions that use them; no other module
holds a bare numerical threshold. Each value says what it bounds and why it is
that size. "eps" below is the machine epsilon of the working dtype
(float64: 2.2e-16, float32: 1.2e-7).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerances:
    """Tolerances for one working dtype.

    Attributes:
        verify_rtol, verify_atol: an output y (LLC or compiled program) matches the
            model's own output m when ``|y - m| <= verify_atol + verify_rtol * |m|``
            elementwise (DESIGN.md: float64 1e-10 * (1 + |m|); float32 1e-4 absolute).
        tie: two gate values a, b are *tied* (x lies on the facet between them) when
            ``|a - b| <= tie * (1 + max(|a|, |b|))``; a gate input z is at its kink when
            ``|z| <= tie``. Far above the rounding of one forward pass
            (~ sqrt(fan_in) * eps * scale), far below any real margin between units.
        same_function: two tied max-pool entries whose derivatives along the
            tie-break direction agree to ``same_function * (1 + max(|da|, |db|))`` are
            treated as the same linear function (not a facet).
        feasibility: a point satisfies ``a.x <= d`` when
            ``a.x - d <= feasibility * (1 + |d| + ||a||_1 * ||x||_inf)``; also the
            slack below which a constraint counts as tight in a polytope.
        lp: primal feasibility / optimality tolerance handed to the LP solver.
    """

    verify_rtol: float
    verify_atol: float
    tie: float
    same_function: float
    feasibility: float
    lp: float


FLOAT64 = Tolerances(
    verify_rtol=1e-10,
    verify_atol=1e-10,
    tie=1e-12,  # ~4500 eps: rounding of deep float64 sums is ~1e-14
    same_function=1e-12,
    feasibility=1e-9,
    lp=1e-9,
)

FLOAT32 = Tolerances(
    verify_rtol=0.0,
    verify_atol=1e-4,
    tie=2e-6,  # ~16 eps: float32 rounding of one conv sum at Fashion-MNIST scale
    same_function=2e-6,
    feasibility=1e-5,
    lp=1e-9,
)


def for_dtype(dtype: torch.dtype) -> Tolerances:
    """The tolerances of a working dtype (float64 or float32); ValueError otherwise."""
    if dtype == torch.float64:
        return FLOAT64
    if dtype == torch.float32:
        return FLOAT32
    raise ValueError(f"openbox works in torch.float64 or torch.float32, got {dtype}")
