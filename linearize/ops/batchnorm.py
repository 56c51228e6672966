"""nn.BatchNorm1d / nn.BatchNorm2d in eval mode: a per-channel diagonal affine map."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import prod

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from linearize.ir import LinearOperator
from linearize.registry import LoweringContext, register_module


@dataclass(frozen=True, eq=False)
class ChannelScale(LinearOperator):
    """``y[c, ...] = scale[c] * x[c, ...]``: a diagonal matrix constant over each channel.

    Attributes:
        scale: (C, 1, ..., 1), broadcastable to ``in_shape = (C, *spatial)``.
    """

    scale: Tensor = None  # type: ignore[assignment]

    def apply(self, x: Tensor) -> Tensor:
        return x * self.scale

    def apply_transpose(self, g: Tensor) -> Tensor:
        return g * self.scale

    def matrix(self) -> sp.csr_array:
        diag = self.scale.detach().cpu().double().expand(self.in_shape).reshape(-1).numpy()
        n = diag.size  # keeps a zero scale as a structural entry, so nnz holds
        return sp.csr_array((diag, np.arange(n), np.arange(n + 1)), shape=(n, n))

    def channel_scale(self) -> Tensor:
        return self.scale

    def describe(self) -> str:
        return f"ChannelScale {self.in_shape[0]}"

    @property
    def nnz(self) -> int:
        return prod(self.in_shape)


def _float64(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def _scale_shift(module: nn.modules.batchnorm._BatchNorm,
                 param: Callable[[Tensor], Tensor] = _float64) -> tuple[Tensor, Tensor]:
    """The eval-mode map ``y = scale * x + shift`` per channel, both (C,) float64:
    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``."""
    mean, var = param(module.running_mean), param(module.running_var)
    gamma = param(module.weight) if module.weight is not None else torch.ones_like(mean)
    beta = param(module.bias) if module.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + module.eps)
    return scale, beta - mean * scale


def batchnorm_problem(module: nn.modules.batchnorm._BatchNorm) -> str | None:
    """Why the eval-mode map of a batch-norm with finite parameters and running
    statistics is not finite in float64 (the compiler's working dtype), or None."""
    scale, shift = _scale_shift(module)
    var = _float64(module.running_var) + module.eps
    checks = (
        (var == 0, "running_var + eps is 0, its scale is infinite"),
        (var < 0, "running_var + eps is negative, its scale is NaN"),
        (~scale.isfinite(), "weight / sqrt(running_var + eps) overflows float64, its scale "
                            "is infinite"),
        (~shift.isfinite(), "bias - running_mean * scale overflows float64, its shift is "
                            "infinite"),
    )
    for bad, reason in checks:
        if bool(bad.any()):
            return f"{reason} ({_channels(bad)})"
    return None


def _channels(bad: Tensor) -> str:
    idx = bad.nonzero().reshape(-1).tolist()
    shown = ", ".join(map(str, idx[:6])) + (f", ... ({len(idx)} of {bad.numel()})"
                                            if len(idx) > 6 else "")
    return f"channel {shown}" if len(idx) == 1 else f"channels {shown}"


@register_module(nn.BatchNorm1d, nn.BatchNorm2d,
                 condition="in eval mode, with running statistics")
def lower_batchnorm(ctx: LoweringContext, module: nn.modules.batchnorm._BatchNorm, x: int) -> int:
    if module.training:
        ctx.unsupported("in training mode; call model.eval()")
    if module.running_mean is None or module.running_var is None:
        ctx.unsupported("track_running_stats=False normalises with batch statistics")
    in_shape = ctx.shape(x)
    scale, shift = _scale_shift(module, ctx.param)
    broadcast = (-1, *([1] * (len(in_shape) - 1)))
    op = ChannelScale(in_shape, in_shape, scale.reshape(broadcast))
    return ctx.affine(x, op, shift.reshape(broadcast))
