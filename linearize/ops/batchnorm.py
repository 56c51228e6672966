"""nn.BatchNorm1d / nn.BatchNorm2d in eval mode: a per-channel diagonal affine map."""

from __future__ import annotations

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


@register_module(nn.BatchNorm1d, nn.BatchNorm2d,
                 condition="in eval mode, with running statistics")
def lower_batchnorm(ctx: LoweringContext, module: nn.modules.batchnorm._BatchNorm, x: int) -> int:
    if module.training:
        ctx.unsupported("in training mode; call model.eval()")
    if module.running_mean is None or module.running_var is None:
        ctx.unsupported("track_running_stats=False normalises with batch statistics")
    in_shape = ctx.shape(x)
    mean, var = ctx.param(module.running_mean), ctx.param(module.running_var)
    gamma = ctx.param(module.weight) if module.weight is not None else torch.ones_like(mean)
    beta = ctx.param(module.bias) if module.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + module.eps)
    shift = beta - mean * scale
    broadcast = (-1, *([1] * (len(in_shape) - 1)))
    op = ChannelScale(in_shape, in_shape, scale.reshape(broadcast))
    return ctx.affine(x, op, shift.reshape(broadcast))
