"""Pooling: max-pooling (a gate with a window table), average and adaptive average
pooling (linear operators), as modules and as functional calls, 1-D and 2-D."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import ceil, floor, prod

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linearize.ir import LinearOperator
from linearize.registry import LoweringContext, register_function, register_module
from linearize.windows import window_table

_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d}
_ADAPTIVE = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d}


def _per_dim(v, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(v)
    return v * n if len(v) == 1 else v


def _channel_kron(spatial: sp.sparray, channels: int) -> sp.csr_array:
    """The same spatial map on every channel: kron(I_C, spatial) in (C, *spatial) order."""
    m = sp.csr_array(sp.kron(sp.eye_array(channels), spatial))
    m.eliminate_zeros()  # scipy's kron stores the zeros of a dense-ish factor
    return m


def _separable(per_dim: Sequence[np.ndarray]) -> sp.csr_array:
    """kron of per-dimension (out_d, in_d) matrices: a map on the row-major spatial grid."""
    m = sp.csr_array(np.ones((1, 1)))
    for a in per_dim:
        m = sp.csr_array(sp.kron(m, sp.csr_array(a)))
    return m


def _transpose_by_autograd(op: LinearOperator, g: Tensor) -> Tensor:
    """Adjoint of a linear torch op through its own backward (exact for linear maps)."""
    x = torch.zeros((g.shape[0], *op.in_shape), dtype=g.dtype, device=g.device, requires_grad=True)
    with torch.enable_grad():
        y = op.apply(x)
    return torch.autograd.grad(y, x, g)[0]


# --------------------------------------------------------------------------- average


@dataclass(frozen=True, eq=False)
class AvgPool(LinearOperator):
    """Average pooling with torch's divisor rules. ``in_shape = (C, *spatial)``.

    Divisor of a window: ``divisor_override`` if set; else, with
    ``count_include_pad``, the number of its positions inside the zero-padded input
    ``[-padding, n + padding)``; else the number inside the input. Windows are
    products of 1-D windows, so the spatial matrix is a Kronecker product.
    """

    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None

    def apply(self, x: Tensor) -> Tensor:
        nd = len(self.kernel)
        kw = {} if nd == 1 else {"divisor_override": self.divisor_override}
        return _AVG[nd](x, self.kernel, self.stride, self.padding, self.ceil_mode,
                        self.count_include_pad, **kw)

    def apply_transpose(self, g: Tensor) -> Tensor:
        return _transpose_by_autograd(self, g)

    def matrix(self) -> sp.csr_array:
        per_dim = []
        for n, o, k, s, p in zip(self.in_shape[1:], self.out_shape[1:], self.kernel,
                                 self.stride, self.padding):
            start = np.arange(o)[:, None] * s - p
            pos = np.arange(n)[None, :]
            inside = ((pos >= start) & (pos < start + k)).astype(np.float64)  # (o, n)
            if self.divisor_override:
                count = np.ones(o)
            elif self.count_include_pad:
                count = (np.minimum(start[:, 0] + k, n + p) - start[:, 0]).astype(np.float64)
            else:
                count = inside.sum(axis=1)
            per_dim.append(inside / np.where(count > 0, count, 1.0)[:, None])
        m = _separable(per_dim)
        if self.divisor_override:
            m = m / float(self.divisor_override)
        return _channel_kron(m, self.in_shape[0])

    def describe(self) -> str:
        k = "x".join(map(str, self.kernel))
        return f"AvgPool{len(self.kernel)}d {k} s{'x'.join(map(str, self.stride))}"


@dataclass(frozen=True, eq=False)
class AdaptiveAvgPool(LinearOperator):
    """Adaptive average pooling: output i along a dimension of size n -> o averages
    input ``[floor(i n / o), ceil((i + 1) n / o))``. Linear for a fixed input shape."""

    def apply(self, x: Tensor) -> Tensor:
        return _ADAPTIVE[len(self.in_shape) - 1](x, self.out_shape[1:])

    def apply_transpose(self, g: Tensor) -> Tensor:
        return _transpose_by_autograd(self, g)

    def matrix(self) -> sp.csr_array:
        per_dim = []
        for n, o in zip(self.in_shape[1:], self.out_shape[1:]):
            a = np.zeros((o, n))
            for i in range(o):
                lo, hi = floor(i * n / o), ceil((i + 1) * n / o)
                a[i, lo:hi] = 1.0 / (hi - lo)
            per_dim.append(a)
        return _channel_kron(_separable(per_dim), self.in_shape[0])

    def describe(self) -> str:
        return f"AdaptiveAvgPool -> {'x'.join(map(str, self.out_shape[1:]))}"


def _avg(ctx: LoweringContext, x: int, kernel, stride, padding, ceil_mode, count_include_pad,
         divisor_override) -> int:
    in_shape = ctx.shape(x)
    nd = len(in_shape) - 1
    kernel = _per_dim(kernel, nd)
    stride = kernel if stride is None or stride == [] else _per_dim(stride, nd)
    op = AvgPool(in_shape, ctx.out_shape, kernel, stride, _per_dim(padding, nd),
                 bool(ceil_mode), bool(count_include_pad), divisor_override or None)
    return ctx.affine(x, op, None)


@register_module(nn.AvgPool1d, nn.AvgPool2d)
def lower_avg_pool(ctx: LoweringContext, module, x: int) -> int:
    return _avg(ctx, x, module.kernel_size, module.stride, module.padding, module.ceil_mode,
                module.count_include_pad, getattr(module, "divisor_override", None))


@register_function(F.avg_pool1d, F.avg_pool2d)
def lower_avg_pool_call(ctx: LoweringContext, x, kernel_size, stride=None, padding=0,
                        ceil_mode=False, count_include_pad=True, divisor_override=None) -> int:
    return _avg(ctx, ctx.value(x), kernel_size, stride, padding, ceil_mode,
                count_include_pad, divisor_override)


def _adaptive(ctx: LoweringContext, x: int) -> int:
    in_shape = ctx.shape(x)
    if ctx.out_shape == in_shape:
        return x
    return ctx.affine(x, AdaptiveAvgPool(in_shape, ctx.out_shape), None)


@register_module(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
def lower_adaptive_avg_pool(ctx: LoweringContext, module, x: int) -> int:
    return _adaptive(ctx, x)


@register_function(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)
def lower_adaptive_avg_pool_call(ctx: LoweringContext, x, output_size) -> int:
    return _adaptive(ctx, ctx.value(x))


# --------------------------------------------------------------------------- max


def max_pool_window(
    in_shape: Sequence[int], out_shape: Sequence[int], kernel, stride, padding, dilation
) -> np.ndarray:
    """Window table (prod(out_shape), prod(kernel)) of flat (C, *spatial) input indices.

    Each channel pools its own plane; padding positions are -1.
    """
    spatial = window_table(in_shape[1:], out_shape[1:], kernel, stride, padding, dilation)
    n_in = prod(in_shape[1:])
    c = np.arange(in_shape[0])[:, None, None] * n_in
    return np.where(spatial[None] >= 0, spatial[None] + c, -1).reshape(-1, spatial.shape[1])


_READS_INPUT = "every window reading the input"
_MAX_CONDITION = f"return_indices=False, {_READS_INPUT}"


def _max(ctx: LoweringContext, x: int, kernel, stride, padding, dilation,
         return_indices=False) -> int:
    if return_indices:
        ctx.unsupported("return_indices=True")
    in_shape = ctx.shape(x)
    nd = len(in_shape) - 1
    kernel = _per_dim(kernel, nd)
    stride = kernel if stride is None or stride == [] else _per_dim(stride, nd)
    padding, dilation = _per_dim(padding, nd), _per_dim(dilation, nd)
    spatial = window_table(in_shape[1:], ctx.out_shape[1:], kernel, stride, padding, dilation)
    empty = int((spatial < 0).all(axis=1).sum())
    if empty:
        # torch pools such a window to -inf: no finite affine piece, and a gate input
        # of -inf has no linear form, so the network is not one this compiler can express
        def fmt(v):
            return "x".join(map(str, v))

        ctx.unsupported(
            f"{empty} of {spatial.shape[0]} windows per channel lie entirely in the padding, "
            f"where torch's max-pool returns -inf; kernel {fmt(kernel)}, padding "
            f"{fmt(padding)}, dilation {fmt(dilation)} on spatial size {fmt(in_shape[1:])}"
        )
    window = max_pool_window(in_shape, ctx.out_shape, kernel, stride, padding, dilation)
    return ctx.maxpool(x, torch.from_numpy(window))


@register_module(nn.MaxPool1d, nn.MaxPool2d, condition=_MAX_CONDITION)
def lower_max_pool(ctx: LoweringContext, module, x: int) -> int:
    # ceil_mode only changes the output size, which comes from the traced shape
    return _max(ctx, x, module.kernel_size, module.stride, module.padding, module.dilation,
                module.return_indices)


@register_function(F.max_pool1d, F.max_pool2d, condition=_MAX_CONDITION)
def lower_max_pool_call(ctx: LoweringContext, x, kernel_size, stride=None, padding=0,
                        dilation=1, ceil_mode=False, return_indices=False) -> int:
    return _max(ctx, ctx.value(x), kernel_size, stride, padding, dilation, return_indices)


@register_function(torch.max_pool1d, torch.max_pool2d, condition=_READS_INPUT)
def lower_torch_max_pool_call(ctx: LoweringContext, x, kernel_size, stride=(), padding=0,
                              dilation=1, ceil_mode=False) -> int:
    return _max(ctx, ctx.value(x), kernel_size, stride or None, padding, dilation)
