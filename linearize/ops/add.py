"""Elementwise sum of two branches (residual connections)."""

from __future__ import annotations

import operator

import torch

from linearize.registry import LoweringContext, register_function, register_method

_SAME_SHAPE = "the sum of two tensors of the same shape"


@register_function(operator.add, operator.iadd, torch.add, condition=_SAME_SHAPE)
@register_method("add", "add_", "__add__", "__iadd__", condition=_SAME_SHAPE)
def lower_add(ctx: LoweringContext, a, b, alpha=1) -> int:
    if not (ctx.is_value(a) and ctx.is_value(b)):
        ctx.unsupported("adding a constant; only the sum of two tensors is supported")
    if alpha != 1:
        ctx.unsupported(f"alpha={alpha}")
    va, vb = ctx.value(a), ctx.value(b)
    if ctx.shape(va) != ctx.shape(vb):
        ctx.unsupported(
            f"broadcasting {ctx.shape(va)} + {ctx.shape(vb)}; both terms need the same shape"
        )
    return ctx.add(va, vb)
