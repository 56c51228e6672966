"""nn.Conv1d / nn.Conv2d: convolution as a sparse (Toeplitz) matrix and as a torch op."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from math import prod

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linearize.ir import LinearOperator
from linearize.registry import LoweringContext, register_module
from linearize.windows import window_table

_CONV = {1: F.conv1d, 2: F.conv2d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d}

CHUNK_BYTES = 1 << 20
"""On the CPU a convolution runs on row chunks whose input and output activations
together take at most this many bytes (at least one row per call). CPU convolutions slow
down 2-4x per row once a batch's activations overflow the cache: on a 2-core AMD EPYC
(2 MiB L2 per core) the reference CNN's second convolution (16 -> 32 channels, 14x14,
float64) took 31-40 ms for 192 rows in one call and 8-12 ms in calls of 16-32 rows. On
3x3 convolutions with padding 1 (the CNNs here) torch's CPU kernels give each row the same
bits in a call of any size, so the chunking changes no result; on some other shapes
(no padding, dilation, odd sizes) a row's bits vary with the call's batch size by an ulp
or so, with or without chunks. Other devices get one call."""


def _chunked(fn, x: Tensor, out_per_row: int) -> Tensor:
    """fn(x) for x (N, ...), in row chunks of at most :data:`CHUNK_BYTES` of input and
    output on the CPU (``out_per_row``: output elements per row)."""
    n = x.shape[0]
    per_row = (x[0].numel() + out_per_row) * x.element_size() if n else 0
    if x.device.type != "cpu" or n * per_row <= CHUNK_BYTES:
        return fn(x)
    step = max(1, CHUNK_BYTES // per_row)
    return torch.cat([fn(x[i : i + step]) for i in range(0, n, step)])


@dataclass(frozen=True, eq=False)
class Conv(LinearOperator):
    """Cross-correlation with zero padding, any stride, dilation and groups (1-D or 2-D).

    ``in_shape = (C_in, *spatial_in)``, ``out_shape = (C_out, *spatial_out)``.

    Attributes:
        weight: (C_out, C_in / groups, *kernel).
        stride, dilation: one int per spatial dimension.
        padding: ``(before, after)`` per spatial dimension; 'same' padding with an
            even kernel is asymmetric, so both sides are kept.
        groups: input and output channels split into this many independent groups.
    """

    weight: Tensor = None  # type: ignore[assignment]
    stride: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @property
    def ndim(self) -> int:
        return self.weight.dim() - 2

    @property
    def _symmetric(self) -> bool:
        return all(a == b for a, b in self.padding)

    def apply(self, x: Tensor) -> Tensor:
        return _chunked(self._apply, x, prod(self.out_shape))

    def _apply(self, x: Tensor) -> Tensor:
        conv = _CONV[self.ndim]
        if self._symmetric:
            pad = tuple(a for a, _ in self.padding)
            return conv(x, self.weight, None, self.stride, pad, self.dilation, self.groups)
        # F.pad takes (last-dim before, last-dim after, previous dim ...)
        flat_pad = [v for pair in reversed(self.padding) for v in pair]
        return conv(F.pad(x, flat_pad), self.weight, None, self.stride, 0, self.dilation,
                    self.groups)

    def apply_transpose(self, g: Tensor) -> Tensor:
        return _chunked(self._apply_transpose, g, prod(self.in_shape))

    def _apply_transpose(self, g: Tensor) -> Tensor:
        # conv_transpose maps back onto the padded input and drops `padding` from each
        # side; rows past the last window are not read by the convolution and come
        # back as output_padding (< stride, as torch requires). Asymmetric padding
        # transposes onto the fully padded input and crops.
        k = self.weight.shape[2:]
        before = [a for a, _ in self.padding]
        after = [a if self._symmetric else b for a, b in self.padding]
        lost = [0 if self._symmetric else a for a, _ in self.padding]
        padded = [n + a + b for n, a, b in zip(self.in_shape[1:], before, after)]
        reach = [
            (o - 1) * s + d * (kk - 1) + 1
            for o, s, d, kk in zip(self.out_shape[1:], self.stride, self.dilation, k)
        ]
        out_pad = tuple(p - r for p, r in zip(padded, reach))
        pad = tuple(before) if self._symmetric else 0
        y = _CONV_T[self.ndim](
            g, self.weight, None, self.stride, pad, out_pad, self.groups, self.dilation
        )
        if self._symmetric:
            return y
        crop = tuple(slice(a, a + n) for n, a in zip(self.in_shape[1:], lost))
        return y[(slice(None), slice(None), *crop)]

    def matrix(self) -> sp.csr_array:
        w = self.weight.detach().cpu().double().numpy()
        c_out, c_in_g = w.shape[:2]
        c_in = self.in_shape[0]
        spatial_in, spatial_out = self.in_shape[1:], self.out_shape[1:]
        idx = window_table(
            spatial_in, spatial_out, w.shape[2:], self.stride,
            [a for a, _ in self.padding], self.dilation,
        )  # (P, Q)
        n_in, P, Q = prod(spatial_in), idx.shape[0], idx.shape[1]
        group_of = np.arange(c_out) // (c_out // self.groups)
        co = np.arange(c_out)[:, None, None, None]
        ci = (group_of[:, None] * c_in_g + np.arange(c_in_g)[None, :])[:, :, None, None]
        rows = np.broadcast_to(co * P + np.arange(P)[None, None, :, None], (c_out, c_in_g, P, Q))
        cols = ci * n_in + idx[None, None]
        vals = np.broadcast_to(w.reshape(c_out, c_in_g, 1, Q), (c_out, c_in_g, P, Q))
        keep = np.broadcast_to(idx[None, None] >= 0, (c_out, c_in_g, P, Q))
        m = sp.coo_array(
            (vals[keep], (rows[keep], cols[keep])), shape=(c_out * P, c_in * n_in)
        )
        return sp.csr_array(m)

    @property
    def nnz(self) -> int:
        idx = window_table(
            self.in_shape[1:], self.out_shape[1:], self.weight.shape[2:], self.stride,
            [a for a, _ in self.padding], self.dilation,
        )
        return int((idx >= 0).sum()) * self.weight.shape[0] * self.weight.shape[1]

    def scale_output(self, scale: Tensor) -> Conv:
        """Output channel c scaled by ``scale[c]`` (C_out,): the kernels of channel c are."""
        w = self.weight * scale.reshape(-1, *([1] * (self.weight.dim() - 1)))
        return dataclasses.replace(self, weight=w)

    def describe(self) -> str:
        k = "x".join(map(str, self.weight.shape[2:]))
        s = "x".join(map(str, self.stride))
        p = ",".join(f"{a}" if a == b else f"{a}/{b}" for a, b in self.padding)
        d = "x".join(map(str, self.dilation))
        extra = "" if all(v == 1 for v in self.dilation) else f" d{d}"
        extra += "" if self.groups == 1 else f" g{self.groups}"
        return f"Conv{self.ndim}d {k} s{s} p{p}{extra}"


def conv_padding(module: nn.modules.conv._ConvNd) -> tuple[tuple[int, int], ...]:
    """(before, after) zero padding per spatial dimension, resolving 'same'/'valid'."""
    k, d = module.kernel_size, module.dilation
    if module.padding == "valid":
        return tuple((0, 0) for _ in k)
    if module.padding == "same":
        total = [dd * (kk - 1) for kk, dd in zip(k, d)]
        return tuple((t // 2, t - t // 2) for t in total)
    return tuple((p, p) for p in module.padding)


@register_module(nn.Conv1d, nn.Conv2d, condition="padding_mode='zeros'")
def lower_conv(ctx: LoweringContext, module: nn.modules.conv._ConvNd, x: int) -> int:
    if module.padding_mode != "zeros":
        ctx.unsupported(f"padding_mode={module.padding_mode!r}; only 'zeros' is supported")
    op = Conv(
        ctx.shape(x),
        ctx.out_shape,
        ctx.param(module.weight),
        tuple(module.stride),
        conv_padding(module),
        tuple(module.dilation),
        module.groups,
    )
    bias = None
    if module.bias is not None:
        bias = ctx.param(module.bias).reshape(-1, *([1] * op.ndim))
    return ctx.affine(x, op, bias)
