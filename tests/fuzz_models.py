"""Seeded random-architecture fuzzing of linearize + openbox against torch, in float64.

``build_case(seed, index)`` draws one small piecewise-linear network (every supported
layer and keyword, 1-D, 2-D and vector inputs) and a batch of inputs, deterministically
from ``(seed, index)``; ``check_case(case)`` runs the exactness checks of DESIGN.md on it
through the public API only and returns the failures; ``run_case(seed, index)`` does both.

The generator is biased towards the cases that have broken exactness before:

* same-function entries in one max-pool window: two overlapping max-pools in a row, an
  adaptive average pool that up-samples (duplicates entries) before a max-pool, ReLUs that
  are all off (a strongly negative bias) or BN channels with scale 0 before a max-pool;
* max-pool windows of more than 256 positions (MaxPool2d(17) on 17x17+, MaxPool1d(257+));
* max-pool windows lying (partly or wholly) in the padding (padding with dilation after
  a global average pool);
* inputs on facets: exact zeros, constant blocks, values on a coarse grid (multiples of
  0.25), small integers.

Checks (each failure names the check, the input and a reproducer):

1. ``program``: compiled program == model, ``|prog(x) - f(x)| <= 1e-10 (1 + |f(x)|)``.
2. ``llc``: ``W x + b == f(x)`` to the same tolerance (and ``e.logits``, ``ob.verify``).
3. ``jacobian``: W == torch.func.jacrev of the model at x (no tight facet) or at x + t u
   (u = ob.direction) where the key at x + t u is x's key: the region entered along u.
4. ``radius``: certified radius (L2, L-inf) <= the polytope's own radius, finite unless the
   polytope has no rows, never NaN; the polytope has no all-zero row.
5. ``ball``: points at 0.9 r in random directions keep the key and the LLC.
6. ``facet``: a point pushed just past the nearest facet of the polytope changes the key.
7. ``batch-key``: an input's key alone == its key inside a shuffled batch with others.

Architectures torch itself rejects (construction or forward errors) or whose output is not
finite are skipped and counted (``status`` 'rejected' / 'nonfinite'); any exception from
linearize or openbox is a failure, except ``linearize.UnsupportedLayerError`` naming the
module when the model has a max-pool window made only of padding (its output is -inf,
not a piecewise-linear value), where declining is a correct answer.
"""

from __future__ import annotations

import copy
import math
import random
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jacrev
from torch.overrides import TorchFunctionMode

import linearize
import openbox

F64 = torch.float64
RTOL = ATOL = 1e-10
"""DESIGN.md: float64 outputs agree to 1e-10 * (1 + |f(x)|)."""
RADIUS_RTOL, RADIUS_ATOL = 1e-9, 1e-12
"""certified radius <= polytope radius * (1 + RADIUS_RTOL) + RADIUS_ATOL."""
N_BALL = 20
BALL_FRACTION = 0.9
JACOBIAN_STEPS = (1e-7, 1e-8, 1e-6, 1e-9, 1e-5, 1e-10)
"""Tie-break steps t (times 1 + ||x||_inf) tried in order for the Jacobian at x + t u."""
N_EXTRA_BATCH = 4
"""Other inputs mixed into the shuffled batch of check 7."""

FAMILIES = {
    "stack": 0.44,  # random stack of blocks (motif blocks included in the menu)
    "double-maxpool": 0.09,  # (a) two overlapping max-pools in a row
    "upsample-maxpool": 0.09,  # (a, b) adaptive avg pool that up-samples, then max-pool
    "dead-relu-maxpool": 0.07,  # (a) all-off ReLUs / constant channels before a max-pool
    "big-window": 0.11,  # (c) max-pool windows with > 256 positions
    "padded-dilated-pool": 0.08,  # (d) windows lying in the padding
    "mlp": 0.06,  # vector inputs: Linear / BatchNorm1d / (Leaky)ReLU / Dropout
    "residual": 0.06,  # residual blocks and functional calls
}


# --------------------------------------------------------------------------- custom modules


class Residual(nn.Module):
    """``body(x) + shortcut(x)``, written as ``style``: 'plus' (a + b), 'torch.add',
    'iadd' (a += b) or 'method' (a.add(b)); then F.relu if ``post_relu``."""

    def __init__(self, body: nn.Module, shortcut: nn.Module, style: str, post_relu: bool):
        super().__init__()
        self.body, self.shortcut = body, shortcut
        self.style, self.post_relu = style, post_relu

    def forward(self, x: Tensor) -> Tensor:
        a = self.body(x)
        b = self.shortcut(x)
        if self.style == "plus":
            y = a + b
        elif self.style == "torch.add":
            y = torch.add(a, b)
        elif self.style == "iadd":
            y = a
            y += b
        else:
            y = a.add(b)
        return F.relu(y) if self.post_relu else y

    def extra_repr(self) -> str:
        return f"style={self.style!r}, post_relu={self.post_relu}"


class Functional(nn.Module):
    """Torch functions called in forward: ``ops`` is a tuple of (name, kwargs) with name in
    relu, leaky_relu, max_pool1d/2d, avg_pool1d/2d, adaptive_avg_pool1d/2d, flatten
    (torch.flatten(x, 1)), view (x.view(x.size(0), -1)), reshape (x.reshape(x.shape[0], -1))."""

    def __init__(self, ops):
        super().__init__()
        self.ops = tuple((name, dict(kw)) for name, kw in ops)

    def forward(self, x: Tensor) -> Tensor:
        for name, kw in self.ops:
            if name == "relu":
                x = F.relu(x)
            elif name == "leaky_relu":
                x = F.leaky_relu(x, **kw)
            elif name == "flatten":
                x = torch.flatten(x, 1)
            elif name == "view":
                x = x.view(x.size(0), -1)
            elif name == "reshape":
                x = x.reshape(x.shape[0], -1)
            else:
                x = getattr(F, name)(x, **kw)
        return x

    def extra_repr(self) -> str:
        return f"ops={self.ops!r}"


# --------------------------------------------------------------------------- the generator


@dataclass
class Case:
    """One architecture and its inputs.

    Attributes:
        seed, index: the case is ``build_case(seed, index)``.
        status: 'ok' (checkable), 'rejected' (torch raised building or running it) or
            'nonfinite' (the model's output is not finite on the inputs).
        family: which branch of the generator made it; motifs: dangerous patterns in it.
        model: float64, eval mode. input_shape: per-example shape. x: (B, *input_shape).
        extra: (N_EXTRA_BATCH, *input_shape) other inputs for the batch check.
        padding_window: some max-pool window holds only padding (output -inf there).
        reason: why torch rejected it. input_kinds: how each row of x was drawn.
    """

    seed: int
    index: int
    status: str
    family: str
    motifs: list[str] = field(default_factory=list)
    model: nn.Module | None = None
    input_shape: tuple[int, ...] = ()
    x: Tensor | None = None
    extra: Tensor | None = None
    padding_window: bool = False
    reason: str = ""
    input_kinds: list[str] = field(default_factory=list)

    @property
    def reproducer(self) -> str:
        return (f"python experiments/fuzz.py --seed {self.seed} --case {self.index}   "
                f"# or tests/fuzz_models.py: run_case({self.seed}, {self.index})")


class _Builder:
    """Draws blocks for a running shape (C, *spatial) or (features,)."""

    def __init__(self, rng: random.Random, nd: int):
        self.rng = rng
        self.nd = nd  # spatial dimensions of the feature stage (1 or 2)
        self.motifs: list[str] = []
        self.dead: list[nn.Module] = []  # convs / linears whose bias is made very negative
        self.zero_scale: list[nn.Module] = []  # BNs with some channel scale exactly 0

    # helpers ---------------------------------------------------------------------------

    def pick(self, options, weights=None):
        return self.rng.choices(options, weights=weights)[0]

    def per_dim(self, f):
        """An int, or (2-D, sometimes) a tuple of two draws."""
        if self.nd == 2 and self.rng.random() < 0.25:
            return (f(0), f(1))
        return f(None)

    @staticmethod
    def size(shape, dim):
        spatial = shape[1:]
        return spatial[0] if dim is None else spatial[dim]

    # blocks ----------------------------------------------------------------------------

    def conv(self, shape, c_out=None, dead=False):
        r, nd = self.rng, self.nd
        c_in = shape[0]
        c_out = c_out or r.randint(1, 4)
        groups = 1
        if r.random() < 0.2:
            g = r.choice([d for d in range(1, c_in + 1) if c_in % d == 0])
            c_out = g * r.randint(1, max(1, 4 // g))
            groups = g
        stride = self.pick([1, 2, 3], [6, 3, 1])
        dilation = self.pick([1, 2, 3], [6, 3, 1])
        padding = self.pick([0, 1, 2, "same", "valid"], [4, 4, 2, 3, 1])
        if padding == "same" and r.random() < 0.95:
            stride = 1  # torch rejects 'same' with stride > 1

        def k(dim):
            n = self.size(shape, dim)
            p = 0 if isinstance(padding, str) else padding
            if padding == "same":
                return r.randint(1, 4)
            kmax = max(1, (n + 2 * p - 1) // dilation + 1)
            return r.randint(1, min(4, kmax)) if r.random() < 0.97 else r.randint(1, 5)

        conv = (nn.Conv1d if nd == 1 else nn.Conv2d)(
            c_in, c_out, self.per_dim(k), stride=stride, padding=padding, dilation=dilation,
            groups=groups, bias=dead or r.random() < 0.75,
        )
        if dead:
            self.dead.append(conv)
        return conv

    def bn(self, shape):
        c = shape[0]
        cls = nn.BatchNorm1d if len(shape) <= 2 else nn.BatchNorm2d
        m = cls(c, eps=self.pick([1e-5, 1e-3, 0.1]), affine=self.rng.random() < 0.85)
        if m.affine and self.rng.random() < 0.15:
            self.zero_scale.append(m)
            self.motifs.append("bn-zero-scale")
        return m

    def act(self, inplace_ok=True):
        r = self.rng
        if r.random() < 0.55:
            return nn.ReLU(inplace=inplace_ok and r.random() < 0.15)
        slope = r.choice([0.01, 0.1, 0.3, -0.2, -1.0, 1.5, 2.0, 0.0, 1.0])
        if slope < 0 or slope > 1:
            self.motifs.append("leaky-slope-outside-(0,1)")
        return nn.LeakyReLU(slope)

    def maxpool_args(self, shape, overlap=None, kernel=None):
        r = self.rng
        dilation = self.pick([1, 2, 3], [6, 2, 1])
        ceil_mode = r.random() < 0.3

        def k(dim):
            if kernel is not None:
                return kernel
            n = self.size(shape, dim)
            kmax = max(1, (n - 1) // dilation + 1)
            return r.randint(1, min(4, kmax)) if r.random() < 0.95 else r.randint(2, 5)

        ks = self.per_dim(k)
        kk = ks if isinstance(ks, int) else max(ks)
        if overlap or (overlap is None and r.random() < 0.4):
            stride = r.randint(1, max(1, kk - 1))
        else:
            stride = self.pick([None, kk, r.randint(1, kk + 1)])
        padding = r.randint(0, min(ks) // 2 if isinstance(ks, tuple) else kk // 2) if (
            r.random() < 0.4) else 0
        if padding and dilation > 1:
            self.motifs.append("maxpool-padding-dilation")
        if stride is not None and stride < kk:
            self.motifs.append("maxpool-overlap")
        return dict(kernel_size=ks, stride=stride, padding=padding, dilation=dilation,
                    ceil_mode=ceil_mode)

    def maxpool(self, shape, **kw):
        return (nn.MaxPool1d if self.nd == 1 else nn.MaxPool2d)(**self.maxpool_args(shape, **kw))

    def avgpool_args(self, shape):
        r = self.rng

        def k(dim):
            n = self.size(shape, dim)
            return r.randint(1, max(1, min(4, n)))

        ks = self.per_dim(k)
        kk = ks if isinstance(ks, int) else min(ks)
        kw = dict(kernel_size=ks, stride=self.pick([None, r.randint(1, max(1, kk))]),
                  padding=r.randint(0, kk // 2), ceil_mode=r.random() < 0.3,
                  count_include_pad=r.random() < 0.5)
        if self.nd == 2 and r.random() < 0.3:
            kw["divisor_override"] = r.randint(1, 5)
        return kw

    def avgpool(self, shape):
        return (nn.AvgPool1d if self.nd == 1 else nn.AvgPool2d)(**self.avgpool_args(shape))

    def adaptive_size(self, shape, up=None):
        r = self.rng

        def o(dim):
            n = self.size(shape, dim)
            if up or (up is None and r.random() < 0.4):
                return r.randint(n + 1, max(n + 1, min(2 * n + 1, 12)))
            return r.randint(1, max(1, n))

        if self.nd == 2 and r.random() < 0.1:
            return (None, o(1))
        size = self.per_dim(o)
        n0 = self.size(shape, None)
        if (size if isinstance(size, int) else size[0]) > n0:
            self.motifs.append("adaptive-upsample")
        return size

    def adaptive(self, shape, up=None):
        cls = nn.AdaptiveAvgPool1d if self.nd == 1 else nn.AdaptiveAvgPool2d
        return cls(self.adaptive_size(shape, up))

    def dropout(self):
        cls = self.pick([nn.Dropout, nn.Dropout1d if self.nd == 1 else nn.Dropout2d])
        return cls(self.rng.choice([0.1, 0.5, 0.9]))

    def residual(self, shape):
        r, nd = self.rng, self.nd
        c = shape[0]
        conv = nn.Conv1d if nd == 1 else nn.Conv2d
        kind = self.pick(["identity", "strided", "pool-shortcut", "two-branch"], [4, 2, 2, 1])
        k = self.pick([1, 3, 5], [1, 4, 1])
        dil = self.pick([1, 2], [4, 1])
        pad = dil * (k - 1) // 2
        if kind == "strided":
            c2 = r.randint(1, 4)
            body = nn.Sequential(conv(c, c2, k, stride=2, padding=pad, dilation=dil),
                                 self.bn((c2, *shape[1:])), self.act(), conv(c2, c2, 3, padding=1))
            shortcut = nn.Sequential(conv(c, c2, 1, stride=2), self.bn((c2, *shape[1:])))
        else:
            c2 = r.randint(1, 4)
            layers = [conv(c, c2, k, padding=pad, dilation=dil)]
            if r.random() < 0.6:
                layers.append(self.bn((c2, *shape[1:])))
            layers += [self.act(inplace_ok=False), conv(c2, c, 3, padding="same")]
            body = nn.Sequential(*layers)
            if kind == "identity":
                shortcut = nn.Identity()
            elif kind == "pool-shortcut":
                pool = nn.MaxPool1d if nd == 1 else nn.MaxPool2d
                shortcut = pool(3, stride=1, padding=1) if r.random() < 0.6 else (
                    nn.AvgPool1d if nd == 1 else nn.AvgPool2d)(3, stride=1, padding=1)
            else:
                shortcut = nn.Sequential(conv(c, c, 3, padding=1), self.act(inplace_ok=False))
        self.motifs.append(f"residual-{kind}")
        return Residual(body, shortcut, r.choice(["plus", "torch.add", "iadd", "method"]),
                        r.random() < 0.6)

    def functional(self, shape, flatten=False):
        r, nd = self.rng, self.nd
        ops = []
        for _ in range(r.randint(1, 3)):
            kind = self.pick(["relu", "leaky_relu", "max_pool", "avg_pool", "adaptive"],
                             [3, 1, 3, 1, 1])
            if kind == "relu":
                ops.append(("relu", {}))
            elif kind == "leaky_relu":
                ops.append(("leaky_relu", {"negative_slope": r.choice([0.1, -0.5, 1.5])}))
            elif kind == "max_pool":
                kw = self.maxpool_args(shape)
                if kw["stride"] is None:
                    del kw["stride"]
                ops.append((f"max_pool{nd}d", kw))
            elif kind == "avg_pool":
                kw = self.avgpool_args(shape)
                if kw["stride"] is None:
                    del kw["stride"]
                ops.append((f"avg_pool{nd}d", kw))
            else:
                ops.append((f"adaptive_avg_pool{nd}d", {"output_size": self.adaptive_size(shape)}))
        if flatten:
            ops.append((r.choice(["flatten", "view", "reshape"]), {}))
        self.motifs.append("functional")
        return Functional(ops)

    def flatten(self, shape):
        if self.rng.random() < 0.7:
            return nn.Flatten()
        return Functional([(self.rng.choice(["flatten", "view", "reshape"]), {})])

    def block(self, shape):
        """One feature block (a list of modules) drawn from the weighted menu."""
        kind = self.pick(
            ["conv", "conv-bn-act", "act", "bn", "maxpool", "avgpool", "adaptive", "identity",
             "dropout", "residual", "functional", "double-maxpool", "upsample-maxpool",
             "dead-relu-maxpool"],
            [3, 4, 2, 1, 3, 2, 2, 1, 1, 2, 2, 1.5, 1.5, 1],
        )
        if kind == "conv":
            return [self.conv(shape)]
        if kind == "conv-bn-act":
            c = self.conv(shape)
            return [c, self.bn((c.out_channels, *shape[1:])), self.act()]
        if kind == "act":
            return [self.act()]
        if kind == "bn":
            return [self.bn(shape)]
        if kind == "maxpool":
            return [self.maxpool(shape)]
        if kind == "avgpool":
            return [self.avgpool(shape)]
        if kind == "adaptive":
            return [self.adaptive(shape)]
        if kind == "identity":
            return [nn.Identity()]
        if kind == "dropout":
            return [self.dropout()]
        if kind == "residual":
            return [self.residual(shape)]
        if kind == "functional":
            return [self.functional(shape)]
        if kind == "double-maxpool":
            return self.double_maxpool(shape)
        if kind == "upsample-maxpool":
            return self.upsample_maxpool(shape)
        return self.dead_relu_maxpool(shape)

    # motifs ----------------------------------------------------------------------------

    def double_maxpool(self, shape):
        self.motifs.append("double-maxpool")
        r = self.rng
        k1, k2 = r.choice([2, 2, 3]), r.choice([2, 2, 3])
        pool = nn.MaxPool1d if self.nd == 1 else nn.MaxPool2d
        out = [pool(k1, stride=1, padding=r.choice([0, 0, 1]) if k1 > 1 else 0)]
        if r.random() < 0.25:
            out.append(self.pick([nn.Identity(), nn.ReLU(), nn.Dropout(0.3)]))
        out.append(pool(k2, stride=r.choice([1, 1, 2])))
        return out

    def upsample_maxpool(self, shape):
        self.motifs.append("upsample-maxpool")
        up = self.adaptive(shape, up=True)
        pool = nn.MaxPool1d if self.nd == 1 else nn.MaxPool2d
        k = self.rng.choice([2, 3, 4])
        return [up, pool(k, stride=self.rng.choice([None, 1, 2]))]

    def dead_relu_maxpool(self, shape):
        self.motifs.append("dead-relu-maxpool")
        c = self.conv(shape, dead=True)
        return [c, nn.ReLU(), self.maxpool((c.out_channels, *shape[1:]), overlap=True)]

    def big_window(self, shape):
        self.motifs.append("big-window")
        n = min(shape[1:])
        k = self.rng.randint(max(17 if self.nd == 2 else 257, n - 3), n)
        stride = self.rng.choice([None, 1])
        pool = nn.MaxPool1d if self.nd == 1 else nn.MaxPool2d
        return [pool(k, stride=stride)]

    def padded_dilated_pool(self, shape):
        """[adaptive avg pool to 1 or 2] - max-pool with padding and dilation (windows partly
        or wholly in the padding) - [ReLU]."""
        self.motifs.append("padded-dilated-pool")
        r = self.rng
        out = []
        n = min(shape[1:])
        if r.random() < 0.7:
            o = r.choice([1, 1, 2])
            out.append((nn.AdaptiveAvgPool1d if self.nd == 1 else nn.AdaptiveAvgPool2d)(o))
            n = o
        combos = [(k, d, p) for k in (2, 3, 4) for d in (2, 3) for p in range(1, k // 2 + 1)]
        valid = [c for c in combos if n + 2 * c[2] >= c[1] * (c[0] - 1) + 1]
        k, d, p = r.choice(valid if valid and r.random() < 0.9 else combos)
        pool = nn.MaxPool1d if self.nd == 1 else nn.MaxPool2d
        out.append(pool(k, stride=r.choice([None, 1]), padding=p, dilation=d,
                        ceil_mode=r.random() < 0.3))
        if r.random() < 0.7:
            out.append(nn.ReLU())
        return out

    def head(self, n_features):
        r = self.rng
        out = []
        n = n_features
        for _ in range(self.pick([0, 1, 2], [5, 3, 1])):
            h = r.randint(2, 8)
            out.append(nn.Linear(n, h, bias=r.random() < 0.85))
            if r.random() < 0.4:
                out.append(nn.BatchNorm1d(h, affine=r.random() < 0.8))
            out.append(self.act())
            if r.random() < 0.2:
                out.append(nn.Dropout(0.5))
            n = h
        out.append(nn.Linear(n, self.pick([1, 2, 3, 5], [1, 4, 3, 2]), bias=r.random() < 0.9))
        return out


def _randomize(model: nn.Module, b: _Builder, g: torch.Generator) -> None:
    """Random parameters and BN statistics (never torch's defaults); 'dead' biases -(5..10)
    fan-in scale; some BN channel scales exactly 0."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
                if m.affine:
                    sign = torch.where(torch.rand(c, generator=g) < 0.2, -1.0, 1.0)
                    m.weight.copy_(sign * (0.5 + torch.rand(c, generator=g)))
                    m.bias.copy_(0.5 * torch.randn(c, generator=g))
                    if m in b.zero_scale:
                        m.weight[torch.randint(c, (1,), generator=g)] = 0.0
                continue
            for name, p in m.named_parameters(recurse=False):
                if name == "bias" or p.dim() < 2:
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            if m in b.dead and getattr(m, "bias", None) is not None:
                scale = float(m.weight.abs().sum(dim=tuple(range(1, m.weight.dim()))).max()) * 4
                every = bool(torch.rand((), generator=g) < 0.5)
                mask = torch.ones(m.bias.shape, dtype=torch.bool) if every else (
                    torch.rand(m.bias.shape, generator=g) < 0.6)
                low = 5.0 + scale * (1 + torch.rand(int(mask.sum()), generator=g))
                m.bias[mask] = -low.to(m.bias.dtype)


def _input_shape(rng: random.Random, family: str, nd: int) -> tuple[int, ...]:
    if family == "big-window":
        c = rng.choice([1, 1, 2])
        if nd == 2:
            return (c, rng.randint(17, 19), rng.randint(17, 19)) if rng.random() < 0.3 else (
                c, *([rng.randint(17, 19)] * 2))
        return (c, rng.randint(257, 300))
    c = rng.randint(1, 4)
    if nd == 1:
        return (c, rng.randint(1, 12))
    if rng.random() < 0.7:
        s = rng.randint(1, 12)
        return (c, s, s)
    return (c, rng.randint(1, 12), rng.randint(1, 12))


def _spec(rng: random.Random, family: str, nd: int, shape, b: _Builder):
    """(list of modules up to and including the head, input shape); shapes are tracked by
    running the partial model on zeros (torch raises for invalid combinations)."""
    if family == "mlp":
        n = rng.randint(1, 12)
        layers, width = [], n
        for _ in range(rng.randint(0, 3)):
            kind = b.pick(["linear", "bn", "act", "dropout", "identity"], [4, 2, 3, 1, 1])
            if kind == "linear":
                h = rng.randint(1, 10)
                layers.append(nn.Linear(width, h, bias=rng.random() < 0.85))
                width = h
            elif kind == "bn":
                layers.append(b.bn((width,)))
            elif kind == "act":
                layers.append(b.act())
            elif kind == "dropout":
                layers.append(nn.Dropout(0.5))
            else:
                layers.append(nn.Identity())
        return layers + b.head(width), (n,)

    layers: list[nn.Module] = []

    def cur():
        probe = nn.Sequential(*layers).double().eval()
        with torch.no_grad():
            return tuple(probe(torch.zeros(2, *shape, dtype=F64)).shape[1:])

    if family == "stack":
        for _ in range(b.pick([0, 1, 2, 3, 4, 5], [1, 3, 4, 3, 2, 1])):
            layers += b.block(cur())
    else:
        # 40% "pure": the motif alone between the input and Flatten - Linear, like the
        # minimal reproducers of the bugs it targets
        pure = family != "residual" and rng.random() < 0.4
        if not pure and rng.random() < 0.35 and family != "big-window":
            pre = b.pick(["conv", "conv-bn-act", "act", "residual"], [2, 2, 1, 1])
            s = cur()
            if pre == "conv":
                layers.append(b.conv(s, c_out=rng.randint(1, 3)))
            elif pre == "conv-bn-act":
                c = b.conv(s, c_out=rng.randint(1, 3))
                layers += [c, b.bn((c.out_channels, *s[1:])), b.act()]
            elif pre == "act":
                layers.append(b.act())
            else:
                layers.append(b.residual(s))
        elif not pure and family == "big-window" and rng.random() < 0.4:
            c = shape[0]
            conv = (nn.Conv1d if nd == 1 else nn.Conv2d)(c, rng.randint(1, 2), 3, padding="same")
            layers += [conv, b.act()]
        s = cur()
        if family == "double-maxpool":
            layers += b.double_maxpool(s)
        elif family == "upsample-maxpool":
            layers += b.upsample_maxpool(s)
        elif family == "dead-relu-maxpool":
            layers += b.dead_relu_maxpool(s)
        elif family == "big-window":
            layers += b.big_window(s)
        elif family == "padded-dilated-pool":
            layers += b.padded_dilated_pool(s)
        elif family == "residual":
            layers.append(b.residual(s))
            layers.append(b.functional(cur()))
        for _ in range(0 if pure else b.pick([0, 1, 2], [5, 3, 1])):
            layers += b.block(cur())
        if pure:
            s = cur()
            return layers + [b.flatten(s), nn.Linear(math.prod(s), rng.randint(1, 3))], shape
    s = cur()
    if b.rng.random() < 0.25:
        layers.append(b.functional(s, flatten=True))
    else:
        layers.append(b.flatten(s))
    return layers + b.head(math.prod(cur())), shape


def make_inputs(g: torch.Generator, rng: random.Random, shape, batch: int) -> tuple[Tensor, list]:
    """(batch, *shape) float64: the first input generic (normal or uniform), the others
    mostly on facets: exact-zero or constant blocks, a 0.25 grid, small integers, sparse."""
    kinds = [rng.choice(["normal", "unit"])] + rng.choices(
        ["normal", "unit", "grid", "zero-block", "const-block", "integers", "sparse", "zeros",
         "constant"], weights=[1, 1, 3, 3, 3, 1, 1, 0.3, 0.3], k=batch - 1)
    out = []
    for kind in kinds:
        if kind == "unit":
            v = torch.rand(shape, generator=g, dtype=F64)
        elif kind == "grid":
            v = torch.round(4 * torch.rand(shape, generator=g, dtype=F64)) / 4
        elif kind == "integers":
            v = torch.randint(-2, 3, shape, generator=g).to(F64)
        elif kind == "sparse":
            v = torch.rand(shape, generator=g, dtype=F64)
            v = v * (torch.rand(shape, generator=g, dtype=F64) < 0.3)
        elif kind == "zeros":
            v = torch.zeros(shape, dtype=F64)
        elif kind == "constant":
            v = torch.full(shape, rng.choice([0.5, -1.0, 0.25]), dtype=F64)
        else:
            v = torch.randn(shape, generator=g, dtype=F64)
        if kind in ("zero-block", "const-block"):
            v = v.abs() if rng.random() < 0.5 else v
            box = []
            if len(shape) > 1 and rng.random() < 0.4:
                j = rng.randrange(shape[0])
                box.append(slice(j, j + 1))
            elif len(shape) > 1:
                box.append(slice(None))
            for n in shape[1:] if len(shape) > 1 else shape:
                a = rng.randrange(n)
                box.append(slice(a, rng.randint(a + 1, n)))
            v[tuple(box)] = 0.0 if kind == "zero-block" else rng.choice([0.5, 1.0, -0.25, 0.1])
        out.append(v)
    return torch.stack(out), kinds


class _PaddingWindowProbe(TorchFunctionMode):
    """Notes whether any max-pool output holds -inf: a window made only of padding."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "max_pool" in getattr(func, "__name__", ""):
            t = out[0] if isinstance(out, tuple) else out
            if isinstance(t, Tensor) and bool(torch.isneginf(t).any()):
                self.seen = True
        return out


def build_case(seed: int, index: int, batch: int = 4) -> Case:
    """Architecture ``index`` of run ``seed``: deterministic, independent of other cases."""
    rng = random.Random(f"openbox-fuzz:{seed}:{index}")
    g = torch.Generator().manual_seed(rng.getrandbits(62))
    family = rng.choices(list(FAMILIES), weights=list(FAMILIES.values()))[0]
    nd = 0 if family == "mlp" else rng.choice([1, 1, 2]) if family != "big-window" else (
        rng.choice([1, 2, 2]))
    shape = (0,) if nd == 0 else _input_shape(rng, family, nd)
    b = _Builder(rng, max(nd, 1))
    case = Case(seed, index, "rejected", family)
    try:
        layers, shape = _spec(rng, family, nd, shape, b)
        model = nn.Sequential(*layers).double().eval()
        _randomize(model, b, g)
        x, kinds = make_inputs(g, rng, shape, batch)
        extra, _ = make_inputs(g, rng, shape, N_EXTRA_BATCH)
        probe = _PaddingWindowProbe()
        with torch.no_grad(), probe:
            y = model(torch.cat([x, extra]))
    except (RuntimeError, ValueError, TypeError, IndexError, ZeroDivisionError) as e:
        case.reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        case.motifs = sorted(set(b.motifs))
        return case
    case.motifs = sorted(set(b.motifs))
    case.model, case.input_shape, case.x, case.extra = model, tuple(shape), x, extra
    case.input_kinds = kinds
    case.padding_window = probe.seen
    if y.dim() != 2:
        case.reason = f"output shape {tuple(y.shape)} is not (N, C)"
        return case
    if not bool(torch.isfinite(y).all()):
        case.status, case.reason = "nonfinite", "model output is not finite"
        return case
    case.status = "ok"
    return case


def case_from_model(model: nn.Module, input_shape, x: Tensor, extra: Tensor | None = None,
                    name: str = "pinned") -> Case:
    """A hand-written case: float64 eval ``model``, inputs x (B, *input_shape), optional
    ``extra`` inputs for the batch check (default: x + 1, x + 2)."""
    model = model.double().eval()
    x = x.to(F64)
    extra = torch.cat([x + 1, x + 2]) if extra is None else extra.to(F64)
    probe = _PaddingWindowProbe()
    with torch.no_grad(), probe:
        y = model(torch.cat([x, extra]))
    return Case(seed=-1, index=-1, status="ok" if bool(torch.isfinite(y).all()) else
                "nonfinite", family=name, model=model, input_shape=tuple(input_shape), x=x,
                extra=extra, padding_window=probe.seen)


# --------------------------------------------------------------------------- the checks


@dataclass
class Failure:
    """One failed check: ``check`` (its name), ``detail``, the case's reproducer."""

    check: str
    detail: str
    seed: int
    index: int
    input: int | None = None
    family: str = ""
    motifs: tuple[str, ...] = ()

    def __str__(self) -> str:
        where = f" input {self.input}" if self.input is not None else ""
        return (f"[{self.check}] seed={self.seed} case={self.index}{where} "
                f"({self.family}; {', '.join(self.motifs) or '-'}): {self.detail}\n"
                f"    reproduce: python experiments/fuzz.py --seed {self.seed} "
                f"--case {self.index}")


@dataclass
class Outcome:
    """What ``run_case`` found: status 'ok' / 'failed' / 'rejected' / 'nonfinite' /
    'declined' (UnsupportedLayerError for an all-padding window, accepted)."""

    case: Case
    status: str
    failures: list[Failure]
    seconds: float
    notes: dict = field(default_factory=dict)


def excess(got: Tensor, want: Tensor, rtol: float = RTOL, atol: float = ATOL) -> float:
    """max |got - want| / (atol + rtol |want|): <= 1 passes."""
    if not got.numel():
        return 0.0
    got, want = got.detach(), want.detach()
    return float(((got - want).abs() / (atol + rtol * want.abs())).max())


def autograd_reference(model: nn.Module) -> nn.Module:
    """A copy of the model with in-place activations turned off: the same function, but one
    autograd can differentiate (ReLU(inplace=True) overwrites a tensor backward needs)."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    return ref


def _jacobian(model: nn.Module, x1: Tensor) -> Tensor:
    """(C, *input_shape) torch.func Jacobian of a float64 model at one input."""
    return jacrev(lambda z: model(z[None])[0])(x1.clone())


class _Checker:
    def __init__(self, case: Case):
        self.case = case
        self.failures: list[Failure] = []
        self.reference: nn.Module | None = None
        self.notes = {"jacobian_skipped": 0, "tight_inputs": 0, "facet_checked": 0,
                      "ball_checked": 0, "radius_below_polytope": 0}

    def fail(self, check: str, detail: str, i: int | None = None):
        c = self.case
        self.failures.append(Failure(check, detail, c.seed, c.index, i, c.family,
                                     tuple(c.motifs)))

    def guard(self, check: str, f, *args, i=None):
        """Run an API call on copies of its tensor arguments; an exception from it is a
        failure of ``check``, and so is writing into an argument."""
        copies = [a.clone() if isinstance(a, Tensor) else a for a in args]
        try:
            out = f(*copies)
        except Exception as e:  # noqa: BLE001  (every exception from openbox is a finding)
            tb = traceback.format_exc(limit=-2).strip().splitlines()
            self.fail(f"error:{check}", f"{type(e).__name__}: {str(e)[:300]} | {tb[-3:]}", i)
            return None
        for a, c in zip(args, copies):
            if isinstance(a, Tensor) and not torch.equal(a, c):
                self.fail("mutates-input", f"{check} wrote into its input tensor", i)
                break
        return out

    def run(self) -> str:
        case = self.case
        model, shape, x = case.model, case.input_shape, case.x
        try:
            prog = linearize.compile(model, shape)
        except linearize.UnsupportedLayerError as e:
            if case.padding_window and all(o.path for o in e.offenders) and any(
                    f"'{o.path}'" in str(e) for o in e.offenders):
                return "declined"
            self.fail("compile", f"UnsupportedLayerError on supported layers: {str(e)[:400]}")
            return "failed"
        except Exception as e:  # noqa: BLE001
            self.fail("compile", f"{type(e).__name__}: {str(e)[:400]}")
            return "failed"
        with torch.no_grad():
            want = model(x.clone())
            got = self.guard("program", prog, x)
        if got is not None:
            if got.shape != want.shape or excess(got, want) > 1:
                self.fail("program", f"|prog - f| / tol = {excess(got, want):.3g} "
                          f"(shapes {tuple(got.shape)} vs {tuple(want.shape)})")
        ob = self.guard("OpenBox", lambda: openbox.OpenBox(model, input_shape=shape, dtype=F64))
        if ob is None:
            return "failed"
        e = self.guard("explain", ob.explain, x)
        if e is None:
            return "failed"
        self.check_llc(ob, e, x, want)
        alone = [self.guard("explain", ob.explain, x[i : i + 1], i=i) for i in range(len(x))]
        self.check_batch_keys(ob, e, alone)
        for i in range(len(x)):
            if alone[i] is not None:
                self.check_input(ob, x, i, alone[i])
        return "failed" if self.failures else "ok"

    def check_llc(self, ob, e, x, want):
        llc = torch.einsum("bcn,bn->bc", e.weight.flatten(2), x.flatten(1)) + e.bias
        for i in range(len(x)):
            if excess(llc[i], want[i]) > 1:
                self.fail("llc", f"|W x + b - f(x)| / tol = {excess(llc[i], want[i]):.3g}", i)
            elif excess(e.logits[i], want[i]) > 1:
                self.fail("llc", f"|e.logits - f(x)| / tol = {excess(e.logits[i], want[i]):.3g}",
                          i)
        report = self.guard("verify", ob.verify, x)
        if report is not None and not report.ok and not any(
                f.check == "llc" for f in self.failures):
            self.fail("llc", f"ob.verify not ok: {report}")

    def check_batch_keys(self, ob, e, alone):
        case = self.case
        n = len(case.x)
        for i in range(n):
            if alone[i] is not None and alone[i].region_key[0] != e.region_key[i]:
                self.fail("batch-key", f"key alone {alone[i].region_key[0]} != key in its own "
                          f"batch of {n} {e.region_key[i]}", i)
        pool = torch.cat([case.x, case.extra])
        perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(case.index))
        eb = self.guard("explain", ob.explain, pool[perm])
        if eb is None:
            return
        pos = {int(p): j for j, p in enumerate(perm)}
        for i in range(n):
            if alone[i] is not None and alone[i].region_key[0] != eb.region_key[pos[i]]:
                self.fail("batch-key", f"key alone {alone[i].region_key[0]} != key at position "
                          f"{pos[i]} of a shuffled batch of {len(pool)} "
                          f"{eb.region_key[pos[i]]}", i)
            elif alone[i] is not None and not torch.equal(
                    alone[i].weight[0], eb.weight[pos[i]]) and excess(
                    eb.weight[pos[i]], alone[i].weight[0]) > 1:
                self.fail("batch-key", "W alone != W in a shuffled batch", i)

    def check_input(self, ob, x, i, e):
        x1 = x[i]
        tight = int(e.n_tight[0])
        self.notes["tight_inputs"] += tight > 0
        # 3. Jacobian of the model in the tie-broken region
        self.check_jacobian(ob, x1, e, tight, i)
        # 4. radii
        r2 = self.guard("certified_radius", ob.certified_radius, x1[None], 2, i=i)
        rinf = self.guard("certified_radius", ob.certified_radius, x1[None], float("inf"), i=i)
        poly = self.guard("polytope", ob.polytope, x1, i=i)
        if r2 is None or rinf is None or poly is None:
            return
        r2, rinf = float(r2[0]), float(rinf[0])
        A, d = np.asarray(poly.A, dtype=np.float64), np.asarray(poly.d, dtype=np.float64)
        zero = ~np.any(A != 0, axis=1)
        if zero.any():
            self.fail("zero-rows", f"polytope keeps {int(zero.sum())} all-zero rows of "
                      f"{A.shape[0]} (offsets {d[zero][:4].tolist()})", i)
        p2 = self.guard("polytope.radius", poly.radius, 2, i=i)
        pinf = self.guard("polytope.radius", poly.radius, float("inf"), i=i)
        if p2 is None or pinf is None:
            return
        n_live = int((~zero).sum())
        for name, r, p in (("L2", r2, p2), ("Linf", rinf, pinf)):
            if math.isnan(r) or math.isnan(p):
                self.fail("radius-nan", f"{name}: certified {r}, polytope {p}", i)
            elif math.isinf(r) and n_live > 0:
                self.fail("radius-inf", f"{name}: certified_radius inf but the polytope has "
                          f"{n_live} nonzero rows (polytope.radius {p:.6g})", i)
            elif r > p * (1 + RADIUS_RTOL) + RADIUS_ATOL:
                self.fail("radius>polytope", f"{name}: certified_radius {r:.6g} > "
                          f"polytope.radius {p:.6g} ({A.shape[0]} rows, n_tight {tight})", i)
            elif r < p * (1 - 1e-6) - RADIUS_ATOL:
                self.notes["radius_below_polytope"] += 1
        if tight and r2 != 0:
            self.fail("radius-tight", f"n_tight {tight} but certified L2 radius {r2:.3g}", i)
        # 5. the certified ball keeps the key and the LLC
        if r2 > 0 and not math.isnan(r2):
            self.check_ball(ob, x1, e, r2, i)
        # 6. just past the nearest facet the key changes
        if 0 < r2 < math.inf and n_live:
            self.check_facet(ob, x1, e, A, d, zero, i)

    def check_jacobian(self, ob, x1, e, tight, i):
        if self.reference is None:
            self.reference = autograd_reference(self.case.model)
        model = self.reference
        W = e.weight[0]
        if tight == 0:
            J = _jacobian(model, x1)
            if excess(W, J) > 1:
                self.fail("jacobian", f"|W - jacrev(f)(x)| / tol = {excess(W, J):.3g} "
                          f"(max abs {float((W - J).abs().max()):.3g})", i)
            return
        scale = 1 + float(x1.abs().max())
        u = ob.direction
        for t in JACOBIAN_STEPS:
            xt = x1 + t * scale * u
            et = self.guard("explain", ob.explain, xt[None], i=i)
            if et is None:
                return
            if et.region_key[0] == e.region_key[0] and int(et.n_tight[0]) == 0:
                J = _jacobian(model, xt)
                if excess(W, J) > 1:
                    self.fail("jacobian", f"n_tight {tight}: |W - jacrev(f)(x + t u)| / tol = "
                              f"{excess(W, J):.3g} at t = {t * scale:.1e} (max abs "
                              f"{float((W - J).abs().max()):.3g})", i)
                return
        self.notes["jacobian_skipped"] += 1

    def check_ball(self, ob, x1, e, r, i):
        model = self.case.model
        g = torch.Generator().manual_seed(self.case.index * 1000 + i)
        v = torch.randn((N_BALL, *x1.shape), generator=g, dtype=F64)
        v = v / v.flatten(1).norm(dim=1).reshape(-1, *([1] * x1.dim()))
        rad = BALL_FRACTION * r if math.isfinite(r) else 1 + float(x1.abs().max())
        xs = x1 + rad * v
        es = self.guard("explain", ob.explain, xs, i=i)
        if es is None:
            return
        self.notes["ball_checked"] += 1
        bad = [j for j in range(N_BALL) if es.region_key[j] != e.region_key[0]]
        if bad:
            self.fail("ball-key", f"{len(bad)}/{N_BALL} points at {BALL_FRACTION} * r "
                      f"(r = {r:.4g}) change the key", i)
        with torch.no_grad():
            want = model(xs.clone())
        llc = xs.flatten(1) @ e.weight[0].flatten(1).T + e.bias[0]
        if excess(llc, want) > 1:
            self.fail("ball-llc", f"|W x' + b - f(x')| / tol = {excess(llc, want):.3g} at "
                      f"{BALL_FRACTION} * r (r = {r:.4g})", i)

    def check_facet(self, ob, x1, e, A, d, zero, i):
        xf = x1.flatten().numpy()
        slack = d - A @ xf
        l2 = np.linalg.norm(A, axis=1)
        dist = np.where(zero, np.inf, slack / np.where(zero, 1, l2))
        j = int(np.argmin(dist))
        a = A[j] / l2[j]
        over = 1e-7 * (1 + abs(d[j]) + np.abs(A[j]).sum() * np.abs(xf).max()) / l2[j]
        step = dist[j] * (1 + 1e-6) + over
        xp = torch.from_numpy(xf + step * a).reshape(x1.shape)
        viol = float(A[j] @ xp.flatten().numpy() - d[j])
        if viol <= 0:
            return  # the step did not cross row j in floating point: nothing to claim
        self.notes["facet_checked"] += 1
        ep = self.guard("explain", ob.explain, xp[None], i=i)
        if ep is not None and ep.region_key[0] == e.region_key[0]:
            dup = int(np.sum(np.all(np.isclose(A / np.where(zero, 1, l2)[:, None], a), axis=1)))
            self.fail("facet-key", f"x + {step:.4g} a_j/||a_j|| past row {j} (distance "
                      f"{dist[j]:.4g}, violation {viol:.3g}, {dup} parallel copies) keeps the key",
                      i)


def check_case(case: Case) -> Outcome:
    """Run every check on an 'ok' case; other cases pass through with their status."""
    t0 = time.perf_counter()
    if case.status != "ok":
        return Outcome(case, case.status, [], time.perf_counter() - t0)
    checker = _Checker(case)
    try:
        status = checker.run()
    except Exception as e:  # noqa: BLE001  (a bug of the harness itself: report, don't hide)
        tb = traceback.format_exc(limit=-3).strip().splitlines()
        checker.fail("harness", f"{type(e).__name__}: {str(e)[:300]} | {tb[-4:]}")
        status = "failed"
    return Outcome(case, status, checker.failures, time.perf_counter() - t0, checker.notes)


def run_case(seed: int, index: int) -> Outcome:
    """``check_case(build_case(seed, index))``."""
    return check_case(build_case(seed, index))


def describe(case: Case) -> str:
    """The case as text: family, motifs, input shape and kinds, the model's repr."""
    lines = [f"seed={case.seed} case={case.index} family={case.family} status={case.status}",
             f"motifs: {', '.join(case.motifs) or '-'}",
             f"reproduce: {case.reproducer}",
             f"input_shape: {case.input_shape}; inputs: {', '.join(case.input_kinds) or '-'}"]
    if case.reason:
        lines.append(f"reason: {case.reason}")
    if case.model is not None:
        lines.append(f"model: {case.model!r}")
    if case.x is not None:
        torch.set_printoptions(precision=17, threshold=10_000)
        lines.append(f"x = {case.x!r}")
        torch.set_printoptions(profile="default")
    return "\n".join(lines)


KNOWN_BUGS = {
    "a": "certified radius > the polytope's own radius (same-function max-pool entries)",
    "b": "certified radius inf / polytope keeps all-zero rows (duplicated max-pool entries)",
    "c": "region key depends on the batch (max-pool windows of > 256 positions)",
    "d": "compile: internal LintError for a max-pool window made only of padding",
}


def known_bug(failure: Failure, siblings: list[Failure] = ()) -> str:
    """Which known bug (KNOWN_BUGS key) a failure is a symptom of, or 'other'.

    ``siblings``: the other failures of the same case; a ball check that fails on an input
    whose certified radius is already too large (a, b) is a consequence of that bug.
    """
    c = failure.check
    if c == "radius>polytope":
        return "a"
    if c in ("radius-inf", "zero-rows"):
        return "b"
    if c == "batch-key":
        return "c"
    if c == "compile" and "only padding" in failure.detail:
        return "d"
    if c in ("ball-key", "ball-llc"):
        for s in siblings:
            if s.input == failure.input and s.check in ("radius>polytope", "radius-inf"):
                return known_bug(s)
    return "other"
