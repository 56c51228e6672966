"""Max-sensitivity of an explainer (Yeh et al. 2019), normalised as in Quantus."""

from __future__ import annotations

import torch
from torch import Tensor

from openbox.explainers.base import Explainer
from openbox.metrics._common import generator


def uniform_ball(x: Tensor, radius: float, n: int, seed: int) -> Tensor:
    """The points :func:`sensitivity` samples: (n, B, *in),

    y_{i,b} = x_b + radius * (2 u_{i,b} - 1), u ~ U[0, 1)^{n x B x D} drawn in one call
    ``torch.rand((n, B, *in), generator=Generator(x.device).manual_seed(seed))`` in x's dtype:
    uniform in the L-inf ball of ``radius`` around x_b, not clipped to any domain.
    """
    g = generator(seed, x.device)
    u = torch.rand((n, *x.shape), generator=g, dtype=x.dtype, device=x.device)
    return x.unsqueeze(0) + radius * (2 * u - 1)


def sensitivity(explainer: Explainer, x: Tensor, target, *, radius: float = 0.02, n: int = 10,
                seed: int = 0, zero: float | None = None) -> Tensor:
    """Max-sensitivity: the largest relative change of the map under small uniform noise.

        S_b = max_i ||Phi(y_{i,b}) - Phi(x_b)||_2 / ||Phi(x_b)||_2

    over the n points y of :func:`uniform_ball` (uniform in the L-inf ball of ``radius``),
    Phi = the explainer's attribution for the same target c_b, norms of the flattened maps.
    This is Quantus 0.6.0's ``MaxSensitivity`` with its defaults (difference, Frobenius norm
    over ||Phi(x)||, uniform noise in [-r, r] per element, no abs / normalisation, every
    sample kept); Yeh et al.'s own definition is the numerator alone.

    Args:
        explainer: the method (stochastic ones run with their own seed on every call).
        x: (B, *input_shape); target: an int or (B,) classes.
        radius: r > 0.
        n: samples per input (>= 1).
        seed: seed of the samples.
        zero: the value for an input whose Phi(x_b) is all zeros (the ratio is undefined
            there). None (the default): raise.

    Returns:
        (B,) float64.

    Raises:
        ValueError: Phi(x_b) is all zeros and ``zero`` is None (naming the inputs), bad
            radius / n / shapes / targets.
    """
    if not isinstance(explainer, Explainer):
        raise TypeError(f"explainer must be an openbox.explainers.Explainer, got "
                        f"{type(explainer).__name__}")
    if not radius > 0 or radius == float("inf"):
        raise ValueError(f"radius must be a positive float, got {radius!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    x = explainer.check_input(x)
    target = explainer.check_target(target, x.shape[0])
    phi = explainer.explain(x, target).attribution.reshape(x.shape[0], -1).double()
    norm = phi.norm(dim=1)
    undefined = norm == 0
    if bool(undefined.any()) and zero is None:
        raise ValueError(f"{explainer.name}: sensitivity is undefined for an all-zero map "
                         f"(inputs {(norm == 0).nonzero().flatten().tolist()[:10]})")
    ys = uniform_ball(x, radius, n, seed)
    worst = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for y in ys:
        phi_y = explainer.explain(y, target).attribution.reshape(x.shape[0], -1).double()
        worst = torch.maximum(worst, (phi_y - phi).norm(dim=1) / torch.where(undefined, 1.0, norm))
    if bool(undefined.any()):
        worst = torch.where(undefined, torch.as_tensor(float(zero), dtype=worst.dtype), worst)
    return worst
