"""Every numerical tolerance openbox uses, named, in one place.

Tolerances are passed explicitly to the functions that use them; no other module
holds a bare numerical threshold. Each value says what it bounds and why it is
that size. "eps" below is the machine epsilon of the working dtype
(float64: 2.2e-16, float32: 1.2e-7).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from linearize.tolerances import PROGRAM_TOLERANCE


@dataclass(frozen=True)
class Tolerances:
    """Tolerances for one working dtype.

    Attributes:
        verify_rtol, verify_atol: an output y (LLC or compiled program) matches the
            model's own output m when ``|y - m| <= verify_atol + verify_rtol * |m|``
            elementwise (DESIGN.md: float64 1e-10 * (1 + |m|); float32 1e-4 absolute);
            defined once, in ``linearize.tolerances``.
        verify_scale_rtol: ... or when ``|y - m| <= verify_scale_rtol * max_c |m_c|``: float32
            rounding grows with the output's magnitude, not with each logit (on unnormalised
            0-255 images the demo CNN's logits reach 4,400 and its float32 LLC error 4e-3,
            1.2e-6 of that magnitude, at small logits too). 4e-6 (~33 float32 eps) keeps the
            bound at 1e-4 for logits up to 25 (Fashion-MNIST scale); 0 in float64.
        tie: a max-pool entry a is *tied* with the window maximum m (x lies on the
            facet between them) when ``m - a <= tie * (1 + |m|)``; a ReLU input z is at
            its kink when ``|z| <= tie``. Far above the rounding of one forward pass
            (~ sqrt(fan_in) * eps * scale), far below any real margin between units.
        same_function: a tied max-pool entry whose derivative along the tie-break
            direction is within ``same_function * (1 + |dm|)`` of the largest tied
            derivative dm is the same linear function (not a facet); a tied ReLU
            input with ``|dz| <= same_function`` is constant (not a facet).
        feasibility: a point satisfies ``a.x <= d`` when
            ``a.x - d <= feasibility * (1 + |d| + ||a||_1 * ||x||_inf)``; also the
            slack below which a constraint counts as tight in a polytope.
        lp: primal feasibility / optimality tolerance handed to the LP solver.
    """

    verify_rtol: float
    verify_atol: float
    verify_scale_rtol: float
    tie: float
    same_function: float
    feasibility: float
    lp: float

    # -- the comparison rules, next to the values they use --------------------------------
    # Each works on torch tensors and numpy arrays alike (``abs`` of either).

    def matches(self, y, m):
        """Elementwise, for outputs (..., C): y matches the model's m when
        ``|y - m| <= max(verify_atol + verify_rtol |m|, verify_scale_rtol max_c |m_c|)``
        (the last term scales float32 checks with the output's magnitude; 0 in float64)."""
        bound = self.verify_atol + self.verify_rtol * abs(m)
        if self.verify_scale_rtol:
            if isinstance(m, torch.Tensor):
                floor = self.verify_scale_rtol * m.abs().amax(-1, keepdim=True)
                bound = torch.maximum(bound, floor)
            else:
                bound = np.maximum(bound, self.verify_scale_rtol * np.abs(m).max(-1, keepdims=True))
        return abs(y - m) <= bound

    def relu_tied(self, z):
        """Elementwise: a ReLU input z is at its kink, ``|z| <= tie``."""
        return abs(z) <= self.tie

    def relu_moving(self, dz):
        """Elementwise: a tied ReLU input with directional derivative dz is not constant
        (a facet, not a constant 0), ``|dz| > same_function``."""
        return abs(dz) > self.same_function

    def pool_floor(self, amax):
        """Elementwise: the lowest value that ties the window maximum amax,
        ``amax - tie (1 + |amax|)`` (computed once per window, compared per entry)."""
        return amax - self.tie * (1 + abs(amax))

    def pool_tied(self, a, amax):
        """Elementwise: max-pool entry a ties the window maximum amax,
        ``a >= amax - tie (1 + |amax|)`` (:meth:`pool_floor`; -inf entries never do)."""
        return a >= self.pool_floor(amax)

    def slope_floor(self, damax):
        """Elementwise: the lowest derivative that is the same as damax,
        ``damax - same_function (1 + |damax|)``."""
        return damax - self.same_function * (1 + abs(damax))

    def same_slope(self, da, damax):
        """Elementwise: a tied entry's derivative da equals the largest tied derivative
        damax, ``da >= damax - same_function (1 + |damax|)`` (:meth:`slope_floor`): the
        same linear function."""
        return da >= self.slope_floor(damax)

    def slack_threshold(self, d, l1, x_inf: float):
        """Per row of ``a.x <= d``: the slack below which x counts as on the row,
        ``feasibility (1 + |d| + ||a||_1 ||x||_inf)``."""
        return self.feasibility * (1.0 + abs(d) + l1 * x_inf)


FLOAT64 = Tolerances(
    verify_rtol=PROGRAM_TOLERANCE[torch.float64][0],
    verify_atol=PROGRAM_TOLERANCE[torch.float64][1],
    verify_scale_rtol=0.0,
    tie=1e-12,  # ~4500 eps: rounding of deep float64 sums is ~1e-14
    same_function=1e-12,
    feasibility=1e-9,
    lp=1e-9,
)

FLOAT32 = Tolerances(
    verify_rtol=PROGRAM_TOLERANCE[torch.float32][0],
    verify_atol=PROGRAM_TOLERANCE[torch.float32][1],
    verify_scale_rtol=4e-6,
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
