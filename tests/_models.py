"""Small, seeded model builders and comparison helpers shared by the test suite.

Every builder takes a ``seed`` and returns a model in eval mode whose parameters
*and* batch-norm statistics are random (never torch's defaults, under which a
BatchNorm is nearly the identity and hides bugs). Models are float32 as torch
builds them; call ``.double()`` for float64 references.

``random_cnn(seed)`` is the reference CNN of DESIGN.md (``openbox.fmnist.models.cnn``'s layout),
2 x [conv3x3 - BN - ReLU - maxpool2] - linear, channels (16, 32), on (1, 28, 28) inputs;
pass ``channels=(4, 8)`` for a faster one.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import linearize
from linearize.tolerances import PROGRAM_TOLERANCE

MNIST_SHAPE = (1, 28, 28)



# --------------------------------------------------------------------------- randomness


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter and batch-norm statistic with seeded random values.

    Weights ~ N(0, 1 / fan_in) (activations stay O(1) through a stack); biases ~ N(0, 0.25);
    BN running_mean ~ N(0, 0.25), running_var ~ U(0.5, 2), weight ~ +-U(0.5, 1.5),
    bias ~ N(0, 0.25). Returns ``model`` (modified in place: it is the test's own).
    """
    g = generator(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(0.5 * torch.randn(c, generator=g))
                    m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
                if m.weight is not None:
                    sign = torch.where(torch.rand(c, generator=g) < 0.2, -1.0, 1.0)
                    m.weight.copy_(sign * (0.5 + torch.rand(c, generator=g)))
                    m.bias.copy_(0.5 * torch.randn(c, generator=g))
                continue
            for name, p in m.named_parameters(recurse=False):
                if name == "bias" or p.dim() < 2:
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
                else:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model


def random_input(
    shape: Sequence[int], batch: int, seed: int, dtype=torch.float64, kind: str = "normal"
) -> Tensor:
    """Seeded batch (batch, *shape): ``kind`` 'normal' (N(0, 1)) or 'unit' (U[0, 1], pixels)."""
    g = generator(seed)
    if kind == "unit":
        return torch.rand((batch, *shape), generator=g, dtype=dtype)
    return torch.randn((batch, *shape), generator=g, dtype=dtype)


# --------------------------------------------------------------------------- models


def random_cnn(
    seed: int,
    *,
    channels: Sequence[int] = (16, 32),
    num_classes: int = 10,
    batch_norm: bool = True,
    pool: str = "max",
    input_shape: Sequence[int] = MNIST_SHAPE,
) -> nn.Sequential:
    """The reference CNN: 2 x [Conv2d 3x3 p1 - BatchNorm2d - ReLU - {Max,Avg}Pool2d(2)]
    - Flatten - Linear, random weights and BN statistics, eval mode."""
    c_in, h, w = input_shape
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, c in enumerate(channels, start=1):
        layers[f"conv{i}"] = nn.Conv2d(c_in, c, 3, padding=1)
        if batch_norm:
            layers[f"bn{i}"] = nn.BatchNorm2d(c)
        layers[f"relu{i}"] = nn.ReLU()
        layers[f"pool{i}"] = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
        c_in, h, w = c, h // 2, w // 2
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(c_in * h * w, num_classes)
    return randomize_(nn.Sequential(layers), seed).eval()


def random_mlp(seed: int, sizes: Sequence[int] = (12, 16, 8, 5), *, batch_norm: bool = True,
               negative_slope: float = 0.0) -> nn.Sequential:
    """Linear - [BatchNorm1d] - (Leaky)ReLU - ... - Linear on (sizes[0],) inputs."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers.append(nn.Linear(a, b))
        if batch_norm:
            layers.append(nn.BatchNorm1d(b))
        layers.append(nn.LeakyReLU(negative_slope) if negative_slope else nn.ReLU())
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return randomize_(nn.Sequential(*layers), seed).eval()


ADD_STYLES = ("plus", "torch.add", "iadd")


class ResidualBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU.

    ``add`` picks how the sum is written: ``a + b``, ``torch.add(a, b)`` or ``a += b``.
    With ``stride > 1`` or a channel change the shortcut is a strided 1x1 conv + BN.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, add: str = "plus", dims: int = 2):
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.add = add
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(c_out)
        self.relu = nn.ReLU()
        self.conv2 = conv(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = bn(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride=stride, bias=False),
                                          bn(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = self.shortcut(x)
        if self.add == "plus":
            out = out + identity
        elif self.add == "torch.add":
            out = torch.add(out, identity)
        else:
            out += identity
        return F.relu(out)


def resnet_like(seed: int, *, add: str = "plus", channels: int = 4,
                input_shape: Sequence[int] = (2, 10, 10), num_classes: int = 5) -> nn.Module:
    """Stem conv - BN - ReLU - identity block - downsampling block - global avg pool - Linear."""
    c_in = input_shape[0]
    model = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(c_in, channels, 3, padding=1),
        bn=nn.BatchNorm2d(channels),
        relu=nn.ReLU(),
        block1=ResidualBlock(channels, channels, add=add),
        block2=ResidualBlock(channels, 2 * channels, stride=2, add=add),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(2 * channels, num_classes),
    ))
    return randomize_(model, seed).eval()


def conv1d_net(seed: int, *, input_shape: Sequence[int] = (3, 20), num_classes: int = 4,
               add: str = "plus") -> nn.Module:
    """Conv1d - BN1d - LeakyReLU - MaxPool1d - residual 1-D block - AvgPool1d - Flatten - Linear
    on (C, L) inputs."""
    c_in, length = input_shape
    model = nn.Sequential(OrderedDict(
        conv=nn.Conv1d(c_in, 6, 5, padding=2),
        bn=nn.BatchNorm1d(6),
        act=nn.LeakyReLU(0.1),
        pool=nn.MaxPool1d(2),
        block=ResidualBlock(6, 6, add=add, dims=1),
        avg=nn.AvgPool1d(3, stride=2, padding=1),
        flatten=nn.Flatten(),
        fc=nn.Linear(6 * ((length // 2 + 2 - 3) // 2 + 1), num_classes),
    ))
    return randomize_(model, seed).eval()


# --------------------------------------------------------------------------- comparison


def relative_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| / (1 + |want|): the quantity the float64 bound is stated in."""
    return float(((got - want).abs() / (1 + want.abs())).max())


def assert_program_matches(program: linearize.Program, model: nn.Module, x: Tensor) -> float:
    """Assert ``program(x)`` equals ``model(x)`` to the program tolerance of x's dtype.

    The model is run on a float64 deep copy when x is float64 (it is not modified),
    in its own dtype otherwise. Returns the max relative error (see relative_error).
    """
    import copy

    ref = copy.deepcopy(model).to(x.dtype) if x.dtype == torch.float64 else model
    with torch.no_grad():
        want = ref(x)
        got = program(x)
    rtol, atol = PROGRAM_TOLERANCE[x.dtype]
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    return relative_error(got, want)
