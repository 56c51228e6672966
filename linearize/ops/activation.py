"""ReLU and LeakyReLU: the sign gates."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linearize.registry import LoweringContext, register_function, register_method, register_module


@register_module(nn.ReLU)
def lower_relu(ctx: LoweringContext, module: nn.ReLU, x: int) -> int:
    return ctx.relu(x, 0.0)


@register_module(nn.LeakyReLU)
def lower_leaky_relu(ctx: LoweringContext, module: nn.LeakyReLU, x: int) -> int:
    return ctx.relu(x, float(module.negative_slope))


@register_function(F.relu, torch.relu, torch.relu_)
@register_method("relu", "relu_")
def lower_relu_call(ctx: LoweringContext, x, inplace=False) -> int:
    return ctx.relu(ctx.value(x), 0.0)


@register_function(F.leaky_relu)
def lower_leaky_relu_call(ctx: LoweringContext, x, negative_slope=0.01, inplace=False) -> int:
    return ctx.relu(ctx.value(x), float(negative_slope))
