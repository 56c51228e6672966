"""The exactness bound of a compiled program, per working dtype (DESIGN.md).

A program output y matches the model's output m when, elementwise,
``|y - m| <= atol + rtol * |m|``. These are the numbers behind "exact" in the
compiler; ``openbox.tolerances`` re-exports them for verification.
"""

from __future__ import annotations

import torch

PROGRAM_TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    # (rtol, atol): float64 1e-10 * (1 + |m|); float32 1e-4 absolute at Fashion-MNIST scale
    torch.float64: (1e-10, 1e-10),
    torch.float32: (0.0, 1e-4),
}


def within(y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Elementwise bool: does y match m to the program tolerance of m's dtype?"""
    rtol, atol = PROGRAM_TOLERANCE[m.dtype]
    return (y - m).abs() <= atol + rtol * m.abs()
