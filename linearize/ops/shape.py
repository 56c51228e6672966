"""Shape-only layers: Flatten, view/reshape/flatten calls (a Reshape operator), and the
layers that are the identity in eval mode (Identity, Dropout)."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linearize.ir import LinearOperator
from linearize.registry import LoweringContext, register_function, register_method, register_module


@dataclass(frozen=True, eq=False)
class Reshape(LinearOperator):
    """Reinterpret the row-major flat vector with another shape: the identity matrix."""

    def apply(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.out_shape)

    def apply_transpose(self, g: Tensor) -> Tensor:
        return g.reshape(g.shape[0], *self.in_shape)

    def matrix(self) -> sp.csr_array:
        return sp.csr_array(sp.eye_array(prod(self.in_shape)))

    def describe(self) -> str:
        return "Reshape"

    @property
    def nnz(self) -> int:
        return prod(self.in_shape)


def _reshape_to_traced(ctx: LoweringContext, x: int) -> int:
    """A reshape whose result shape is the one observed when tracing.

    The compiler traced with a batch size that appears nowhere else, so a call that
    folds the batch into the features (``x.view(-1, k)``) shows as a changed
    batch dimension and is rejected.
    """
    ctx.require_batch_preserved()
    out_shape = ctx.out_shape
    in_shape = ctx.shape(x)
    if out_shape == in_shape:
        return x
    return ctx.affine(x, Reshape(in_shape, out_shape), None)


_KEEPS_BATCH = "keeping the batch dimension"


@register_module(nn.Flatten, nn.Unflatten, condition=_KEEPS_BATCH)
def lower_flatten_module(ctx: LoweringContext, module: nn.Module, x: int) -> int:
    return _reshape_to_traced(ctx, x)


@register_function(torch.flatten, torch.reshape, condition=_KEEPS_BATCH)
@register_method("flatten", "view", "reshape", condition=_KEEPS_BATCH)
def lower_reshape_call(ctx: LoweringContext, x, *args, **kwargs) -> int:
    return _reshape_to_traced(ctx, ctx.value(x))


@register_method("contiguous")
def lower_contiguous(ctx: LoweringContext, x, *args, **kwargs) -> int:
    return ctx.value(x)


@register_module(nn.Identity)
def lower_identity(ctx: LoweringContext, module: nn.Module, x: int) -> int:
    return x


@register_module(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                 condition="in eval mode, or p=0")
def lower_dropout(ctx: LoweringContext, module: nn.Module, x: int) -> int:
    # training-mode dropout is rejected before tracing (TrainingModeError)
    return x


@register_function(F.dropout, F.dropout1d, F.dropout2d, condition="training=False, or p=0")
def lower_dropout_call(ctx: LoweringContext, x, p=0.5, training=True, inplace=False) -> int:
    if training and p > 0:
        ctx.unsupported("dropout called with training=True")
    return ctx.value(x)
