"""nn.Linear: a dense matrix acting on the last dimension."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from math import prod

import numpy as np
import scipy.sparse as sp
import torch.nn.functional as F
from torch import Tensor, nn

from linearize.ir import LinearOperator
from linearize.registry import LoweringContext, register_module


@dataclass(frozen=True, eq=False)
class Dense(LinearOperator):
    """``y[..., i] = sum_j weight[i, j] x[..., j]``: a matrix on the last dimension.

    Attributes:
        weight: (out_features, in_features). ``in_shape = (*lead, in_features)``,
            ``out_shape = (*lead, out_features)``; the explicit matrix is
            ``kron(I_prod(lead), weight)``.
    """

    weight: Tensor = None  # type: ignore[assignment]

    def apply(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def apply_transpose(self, g: Tensor) -> Tensor:
        return g @ self.weight

    def matrix(self) -> sp.csr_array:
        w = self.weight.detach().cpu().double().numpy()
        rows, cols = np.indices(w.shape)
        # every weight is a structural entry, zero or not (as in Conv.matrix), so nnz holds
        w = sp.csr_array((w.ravel(), (rows.ravel(), cols.ravel())), shape=w.shape)
        lead = prod(self.in_shape[:-1])
        return sp.csr_array(sp.kron(sp.eye_array(lead), w)) if lead > 1 else w

    def scale_output(self, scale: Tensor) -> Dense | None:
        """Row i scaled by ``scale[i]`` (out_features,) when the output is a vector; with
        leading dimensions the channel is the first of them, which the shared weight
        cannot scale on its own, so None."""
        if len(self.out_shape) != 1:
            return None
        return dataclasses.replace(self, weight=self.weight * scale[:, None])

    def describe(self) -> str:
        o, i = self.weight.shape
        return f"Linear {i}->{o}"

    @property
    def nnz(self) -> int:
        return prod(self.in_shape[:-1]) * self.weight.numel()


@register_module(nn.Linear)
def lower_linear(ctx: LoweringContext, module: nn.Linear, x: int) -> int:
    in_shape = ctx.shape(x)
    out_shape = (*in_shape[:-1], module.out_features)
    op = Dense(in_shape, out_shape, ctx.param(module.weight))
    bias = None if module.bias is None else ctx.param(module.bias)
    return ctx.affine(x, op, bias)
