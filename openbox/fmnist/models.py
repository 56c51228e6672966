"""Reference architectures for Fashion-MNIST, built only from piecewise-linear layers.

Every model is a flat ``nn.Sequential`` with named layers (``conv1``, ``bn1``,
``relu1``, ``pool1``, ..., ``fc``) made only of ``Linear``, ``Conv2d``,
``BatchNorm1d/2d``, ``ReLU``, ``LeakyReLU``, ``MaxPool2d``, ``AvgPool2d``,
``AdaptiveAvgPool2d`` and ``Flatten``, so ``linearize.compile`` handles all of them.
Input: float ``(B, 1, 28, 28)`` with pixels in ``[0, 1]``; output: logits
``(B, num_classes)``.

=========  ==================================================================
``plnn``   the OpenBox paper's fully connected ReLU net, 784-256-128-100-C
``cnn``    the reference CNN, 2 x [conv3x3 - BN - ReLU - maxpool2] - linear
``lenet``  LeNet-5 style, 2 x [conv5x5 - ReLU - avgpool2] - 120 - 84 - C
``gap``    3 x [conv3x3 - BN - ReLU] (maxpool after the first two) - global
           average pool - linear (class activation maps apply)
=========  ==================================================================

Variants of ``cnn`` of the same size (16, 32 channels, one change each), for comparing
how the architecture shapes the linear regions:

=================  ==========================================================
``cnn-poolfirst``  2 x [conv3x3 - BN - maxpool2 - ReLU] - linear (same function
                   class as ``cnn``: max-pool and ReLU commute; other gates)
``cnn-avg``        2 x [conv3x3 - BN - ReLU - avgpool2] - linear
``cnn-strided``    2 x [conv3x3 stride 2 - BN - ReLU] - linear (no pooling)
``cnn-nobn``       2 x [conv3x3 - ReLU - maxpool2] - linear (no batch-norm)
``cnn-leaky``      2 x [conv3x3 - BN - LeakyReLU(0.1) - maxpool2] - linear
=================  ==========================================================

``build_model(name, num_classes=10, **kwargs)`` builds one; ``MODELS[name].description``
says in one line what it is, with its parameter count at the default settings.

Sizes are bounded: a model may hold at most :data:`MAX_PARAMETERS` scalars (parameters
and buffers together, counted on the ``meta`` device before anything is allocated) and
list options (``channels``, ``hidden``) at most :data:`MAX_LAYERS` entries, so neither a
typo on the command line nor a forged checkpoint can ask for terabytes. Seeds are ints
in ``[0, MAX_SEED]`` (:func:`check_seed`).
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from openbox.fmnist.data import INPUT_SHAPE

__all__ = [
    "INPUT_SHAPE",
    "MAX_LAYERS",
    "MAX_PARAMETERS",
    "MAX_SEED",
    "MODELS",
    "MODEL_NAMES",
    "ModelSpec",
    "build_model",
    "check_seed",
    "count_parameters",
    "describe_models",
    "state_size",
]


IN_CHANNELS, IMAGE_SIZE = INPUT_SHAPE[0], INPUT_SHAPE[1]
DEFAULT_NUM_CLASSES = 10

PLNN_HIDDEN = (256, 128, 100)
CNN_CHANNELS = (16, 32)
CNN_KERNEL = 3
POOL = 2  # kernel and stride of every 2x2 pooling layer
LENET_CHANNELS = (6, 16)
LENET_KERNEL = 5
LENET_PADDING = 2  # pads 28x28 to LeNet-5's 32x32 receptive layout
LENET_HIDDEN = (120, 84)
GAP_CHANNELS = (16, 32, 64)
GAP_MAX_STAGES = 5  # 28 -> 14 -> 7 -> 3 -> 1 after four poolings, then the last conv
POOL_KINDS = ("max", "avg")
STRIDE = 2  # stride of cnn-strided's convolutions: 28 -> 14 -> 7, as two 2x2 poolings
LEAKY_SLOPE = 0.1  # negative slope of cnn-leaky's LeakyReLU

MAX_PARAMETERS = 50_000_000
"""Most scalars (parameters and buffers) a model may hold: 200 MB of float32, ~2,000 times
the reference CNN. Checked on the ``meta`` device, before any weight is allocated."""
MAX_LAYERS = 64
"""Most entries a ``channels`` or ``hidden`` option may list (each adds layers)."""
MAX_SEED = 2**63 - 1
"""Largest seed accepted. ``torch.manual_seed`` takes up to 2**64 - 1 (and wraps negative
seeds onto that range, so -1 and 2**64 - 1 would be the same seed); ``[0, 2**63 - 1]`` is
one int64, which every checkpoint reader and JSON consumer stores exactly."""


def _pool(kind: str) -> nn.Module:
    if kind == "max":
        return nn.MaxPool2d(POOL)
    if kind == "avg":
        return nn.AvgPool2d(POOL)
    raise ValueError(f"pool must be one of {POOL_KINDS}, got {kind!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_ints(name: str, values: Sequence[int], length: int | None = None) -> tuple[int, ...]:
    want = f"{length} positive integers" if length else f"1 to {MAX_LAYERS} positive integers"
    try:
        n = len(values)
    except TypeError:
        n = None
    if n is None or isinstance(values, (str, bytes, Mapping)):
        raise ValueError(f"{name} must be {want}, got {values!r}")
    if n > MAX_LAYERS:  # before looking at the entries: the list may be huge
        raise ValueError(f"{name} must be {want}, got {n:,} entries")
    if (not all(_is_int(v) for v in values) or (length is not None and len(values) != length)
            or n == 0 or min(values) < 1):
        raise ValueError(f"{name} must be {want}, got {tuple(values)!r}")
    return tuple(int(v) for v in values)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _check_classes(num_classes: int) -> int:
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return int(num_classes)


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` as an int, or ValueError naming ``name`` unless it is an integer in
    ``[0, MAX_SEED]`` (bools and floats are refused, not rounded)."""
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, 2**63 - 1], got {seed!r}")
    return int(seed)


def plnn(
    num_classes: int = DEFAULT_NUM_CLASSES, *, hidden: Sequence[int] = PLNN_HIDDEN
) -> nn.Sequential:
    """Fully connected ReLU net: Flatten -> 784-256-128-100 (ReLU after each) -> num_classes."""
    num_classes = _check_classes(num_classes)
    hidden = _positive_ints("hidden", hidden)
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = IN_CHANNELS * IMAGE_SIZE * IMAGE_SIZE
    for i, h in enumerate(hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(width, h)
        layers[f"relu{i}"] = nn.ReLU()
        width = h
    layers["fc"] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)


def cnn(num_classes: int = DEFAULT_NUM_CLASSES, *, channels: Sequence[int] = CNN_CHANNELS,
        batch_norm: bool = True, pool: str = "max") -> nn.Sequential:
    """The reference CNN.

    ``[Conv2d(1, c1, 3, padding=1) -> BatchNorm2d -> ReLU -> MaxPool2d(2)]``
    ``-> [Conv2d(c1, c2, 3, padding=1) -> BatchNorm2d -> ReLU -> MaxPool2d(2)]``
    ``-> Flatten -> Linear(c2 * 7 * 7, num_classes)``.

    Args:
        channels: ``(c1, c2)``, default ``(16, 32)``.
        batch_norm: include the BatchNorm2d layers.
        pool: ``"max"`` (default) or ``"avg"`` pooling.
    """
    num_classes = _check_classes(num_classes)
    channels = _positive_ints("channels", channels, length=2)
    batch_norm = _check_bool("batch_norm", batch_norm)
    if pool not in POOL_KINDS:
        raise ValueError(f"pool must be one of {POOL_KINDS}, got {pool!r}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width, size = IN_CHANNELS, IMAGE_SIZE
    for i, c in enumerate(channels, start=1):
        layers[f"conv{i}"] = nn.Conv2d(width, c, CNN_KERNEL, padding=CNN_KERNEL // 2)
        if batch_norm:
            layers[f"bn{i}"] = nn.BatchNorm2d(c)
        layers[f"relu{i}"] = nn.ReLU()
        layers[f"pool{i}"] = _pool(pool)
        width, size = c, size // POOL
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(width * size * size, num_classes)
    return nn.Sequential(layers)


def lenet(num_classes: int = DEFAULT_NUM_CLASSES, *, channels: Sequence[int] = LENET_CHANNELS,
          hidden: Sequence[int] = LENET_HIDDEN) -> nn.Sequential:
    """LeNet-5 style CNN with average pooling.

    ``Conv2d(1, 6, 5, padding=2) -> ReLU -> AvgPool2d(2) -> Conv2d(6, 16, 5) -> ReLU ->
    AvgPool2d(2) -> Flatten -> Linear(400, 120) -> ReLU -> Linear(120, 84) -> ReLU ->
    Linear(84, num_classes)``.
    """
    num_classes = _check_classes(num_classes)
    channels = _positive_ints("channels", channels, length=2)
    hidden = _positive_ints("hidden", hidden)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width, size = IN_CHANNELS, IMAGE_SIZE
    for i, (c, pad) in enumerate(zip(channels, (LENET_PADDING, 0), strict=True), start=1):
        layers[f"conv{i}"] = nn.Conv2d(width, c, LENET_KERNEL, padding=pad)
        layers[f"relu{i}"] = nn.ReLU()
        layers[f"pool{i}"] = nn.AvgPool2d(POOL)
        width, size = c, (size + 2 * pad - LENET_KERNEL + 1) // POOL
    layers["flatten"] = nn.Flatten()
    features = width * size * size
    for i, h in enumerate(hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(features, h)
        layers[f"relu_fc{i}"] = nn.ReLU()
        features = h
    layers["fc"] = nn.Linear(features, num_classes)
    return nn.Sequential(layers)


def gap(num_classes: int = DEFAULT_NUM_CLASSES, *, channels: Sequence[int] = GAP_CHANNELS,
        batch_norm: bool = True) -> nn.Sequential:
    """CNN with a global-average-pooling head (class activation maps apply).

    ``[Conv2d(3x3, padding=1) -> BatchNorm2d -> ReLU -> MaxPool2d(2)]`` for every channel
    width but the last, then ``Conv2d(3x3, padding=1) -> BatchNorm2d -> ReLU ->
    AdaptiveAvgPool2d(1) -> Flatten -> Linear(c_last, num_classes)``.
    Default widths ``(16, 32, 64)``: feature maps 28 -> 14 -> 7, the CAM grid is 7x7.
    """
    num_classes = _check_classes(num_classes)
    channels = _positive_ints("channels", channels)
    batch_norm = _check_bool("batch_norm", batch_norm)
    if IMAGE_SIZE // POOL ** (len(channels) - 1) < 1:
        raise ValueError(f"channels: at most {GAP_MAX_STAGES} widths fit a {IMAGE_SIZE}x"
                         f"{IMAGE_SIZE} image (a 2x2 pooling after each but the last), got "
                         f"{len(channels)}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width = IN_CHANNELS
    for i, c in enumerate(channels, start=1):
        layers[f"conv{i}"] = nn.Conv2d(width, c, CNN_KERNEL, padding=CNN_KERNEL // 2)
        if batch_norm:
            layers[f"bn{i}"] = nn.BatchNorm2d(c)
        layers[f"relu{i}"] = nn.ReLU()
        if i < len(channels):
            layers[f"pool{i}"] = nn.MaxPool2d(POOL)
        width = c
    layers["gap"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)


def _check_slope(negative_slope: Any) -> float:
    if (isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real)
            or not 0.0 < float(negative_slope) < 1.0):
        raise ValueError(f"negative_slope must be a number in (0, 1), got {negative_slope!r}")
    return float(negative_slope)


def _cnn_stack(num_classes: int, channels: Sequence[int], *, batch_norm: bool,
               pool: str | None, pool_first: bool = False,
               negative_slope: float = 0.0) -> nn.Sequential:
    """``cnn`` and its variants: per width c, ``conv3x3 -> [BN] -> act -> pool`` (or
    ``pool -> act`` when ``pool_first``; ``pool=None``: a stride-2 conv, no pooling),
    then ``Flatten -> Linear``. ``act`` is ReLU, or LeakyReLU when ``negative_slope > 0``.
    """
    num_classes = _check_classes(num_classes)
    channels = _positive_ints("channels", channels, length=2)
    batch_norm = _check_bool("batch_norm", batch_norm)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width, size = IN_CHANNELS, IMAGE_SIZE
    stride = 1 if pool is not None else STRIDE
    for i, c in enumerate(channels, start=1):
        layers[f"conv{i}"] = nn.Conv2d(width, c, CNN_KERNEL, stride=stride,
                                       padding=CNN_KERNEL // 2)
        size = (size + 2 * (CNN_KERNEL // 2) - CNN_KERNEL) // stride + 1
        if batch_norm:
            layers[f"bn{i}"] = nn.BatchNorm2d(c)
        act = nn.LeakyReLU(negative_slope) if negative_slope > 0 else nn.ReLU()
        if pool is not None and pool_first:
            layers[f"pool{i}"] = _pool(pool)
        layers[f"relu{i}"] = act
        if pool is not None and not pool_first:
            layers[f"pool{i}"] = _pool(pool)
        if pool is not None:
            size //= POOL
        width = c
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(width * size * size, num_classes)
    return nn.Sequential(layers)


def cnn_poolfirst(num_classes: int = DEFAULT_NUM_CLASSES, *,
                  channels: Sequence[int] = CNN_CHANNELS, batch_norm: bool = True
                  ) -> nn.Sequential:
    """The reference CNN with max-pooling *before* the ReLU.

    ``[Conv2d(1, c1, 3, padding=1) -> BatchNorm2d -> MaxPool2d(2) -> ReLU]``
    ``-> [Conv2d(c1, c2, 3, padding=1) -> BatchNorm2d -> MaxPool2d(2) -> ReLU]``
    ``-> Flatten -> Linear(c2 * 7 * 7, num_classes)``.

    ``relu(max(a)) == max(relu(a))``, so with equal weights it computes the same function
    as ``cnn``; its gates differ: one ReLU per pooled unit (a quarter as many) and
    max-pool selections among pre-activations (never among tied zeros).
    """
    return _cnn_stack(num_classes, channels, batch_norm=batch_norm, pool="max",
                      pool_first=True)


def cnn_avg(num_classes: int = DEFAULT_NUM_CLASSES, *, channels: Sequence[int] = CNN_CHANNELS,
            batch_norm: bool = True) -> nn.Sequential:
    """The reference CNN with average pooling, i.e. ``cnn(pool="avg")``.

    ``[Conv2d(1, c1, 3, padding=1) -> BatchNorm2d -> ReLU -> AvgPool2d(2)]``
    ``-> [Conv2d(c1, c2, 3, padding=1) -> BatchNorm2d -> ReLU -> AvgPool2d(2)]``
    ``-> Flatten -> Linear(c2 * 7 * 7, num_classes)``. The only gates are the ReLUs.
    """
    return cnn(num_classes, channels=channels, batch_norm=batch_norm, pool="avg")


def cnn_strided(num_classes: int = DEFAULT_NUM_CLASSES, *,
                channels: Sequence[int] = CNN_CHANNELS, batch_norm: bool = True
                ) -> nn.Sequential:
    """The reference CNN with stride-2 convolutions instead of pooling.

    ``[Conv2d(1, c1, 3, stride=2, padding=1) -> BatchNorm2d -> ReLU]`` (28 -> 14)
    ``-> [Conv2d(c1, c2, 3, stride=2, padding=1) -> BatchNorm2d -> ReLU]`` (14 -> 7)
    ``-> Flatten -> Linear(c2 * 7 * 7, num_classes)``. The only gates are the ReLUs.
    """
    return _cnn_stack(num_classes, channels, batch_norm=batch_norm, pool=None)


def cnn_nobn(num_classes: int = DEFAULT_NUM_CLASSES, *, channels: Sequence[int] = CNN_CHANNELS,
             pool: str = "max") -> nn.Sequential:
    """The reference CNN without batch-norm, i.e. ``cnn(batch_norm=False)``.

    ``[Conv2d(1, c1, 3, padding=1) -> ReLU -> MaxPool2d(2)]``
    ``-> [Conv2d(c1, c2, 3, padding=1) -> ReLU -> MaxPool2d(2)]``
    ``-> Flatten -> Linear(c2 * 7 * 7, num_classes)``.
    """
    return cnn(num_classes, channels=channels, batch_norm=False, pool=pool)


def cnn_leaky(num_classes: int = DEFAULT_NUM_CLASSES, *, channels: Sequence[int] = CNN_CHANNELS,
              batch_norm: bool = True, negative_slope: float = LEAKY_SLOPE) -> nn.Sequential:
    """The reference CNN with LeakyReLU (default negative slope 0.1) instead of ReLU.

    ``[Conv2d(1, c1, 3, padding=1) -> BatchNorm2d -> LeakyReLU(0.1) -> MaxPool2d(2)]``
    ``-> [Conv2d(c1, c2, 3, padding=1) -> BatchNorm2d -> LeakyReLU(0.1) -> MaxPool2d(2)]``
    ``-> Flatten -> Linear(c2 * 7 * 7, num_classes)``.

    Args:
        negative_slope: in ``(0, 1)`` (0 would be ``cnn``; >= 1 is not a rectifier).
    """
    return _cnn_stack(num_classes, channels, batch_norm=batch_norm, pool="max",
                      negative_slope=_check_slope(negative_slope))


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture.

    Attributes:
        name: registry key.
        builder: ``builder(num_classes, **kwargs) -> nn.Module``.
        description: one line, with the parameter count at 10 classes and default kwargs.
        default_parameters: that parameter count (tests check it against the built model).
    """

    name: str
    builder: Callable[..., nn.Module]
    description: str
    default_parameters: int


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("plnn", plnn, "fully connected ReLU net 784-256-128-100-10 "
                  "(OpenBox paper), 247,766 parameters", 247_766),
        ModelSpec("cnn", cnn, "2 x [conv3x3-BN-ReLU-maxpool2] (16, 32 channels) - linear, "
                  "20,586 parameters", 20_586),
        ModelSpec("lenet", lenet, "LeNet-5 style, 2 x [conv5x5-ReLU-avgpool2] - 120 - 84 - 10, "
                  "61,706 parameters", 61_706),
        ModelSpec("gap", gap, "3 x [conv3x3-BN-ReLU] (16, 32, 64 channels, maxpool2 after the "
                  "first two) - global average pool - linear, 24,170 parameters", 24_170),
        ModelSpec("cnn-poolfirst", cnn_poolfirst, "2 x [conv3x3-BN-maxpool2-ReLU] (16, 32 "
                  "channels) - linear, 20,586 parameters", 20_586),
        ModelSpec("cnn-avg", cnn_avg, "2 x [conv3x3-BN-ReLU-avgpool2] (16, 32 channels) - "
                  "linear, 20,586 parameters", 20_586),
        ModelSpec("cnn-strided", cnn_strided, "2 x [conv3x3 stride 2-BN-ReLU] (16, 32 "
                  "channels, no pooling) - linear, 20,586 parameters", 20_586),
        ModelSpec("cnn-nobn", cnn_nobn, "2 x [conv3x3-ReLU-maxpool2] (16, 32 channels, no "
                  "batch-norm) - linear, 20,490 parameters", 20_490),
        ModelSpec("cnn-leaky", cnn_leaky, "2 x [conv3x3-BN-LeakyReLU(0.1)-maxpool2] (16, 32 "
                  "channels) - linear, 20,586 parameters", 20_586),
    )
}
"""Registry: name -> :class:`ModelSpec`."""

MODEL_NAMES: tuple[str, ...] = tuple(MODELS)


def _build_on_meta(name: str, num_classes: int, kwargs: Mapping[str, Any]) -> nn.Module:
    """The architecture with shapes only (``meta`` device: nothing allocated, no RNG used).

    Raises ValueError: unknown name, invalid option, or more than MAX_PARAMETERS scalars.
    """
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    try:
        with torch.device("meta"):
            skeleton = MODELS[name].builder(num_classes, **kwargs)
    except TypeError as exc:
        raise ValueError(f"invalid options for model {name!r}: {exc}") from exc
    except RuntimeError as exc:  # e.g. "Storage size calculation overflowed"
        raise ValueError(f"model {name!r} with {dict(kwargs)} cannot be built: {exc}") from exc
    size = state_size(skeleton)
    if size > MAX_PARAMETERS:
        raise ValueError(
            f"model {name!r} with {num_classes} classes and options {dict(kwargs)} would hold "
            f"{size:,} parameters and buffers; at most MAX_PARAMETERS = {MAX_PARAMETERS:,} "
            "are allowed"
        )
    return skeleton


def build_model(name: str, num_classes: int = DEFAULT_NUM_CLASSES, *, seed: int | None = None,
                device: str | torch.device | None = None, **kwargs) -> nn.Module:
    """Build a registered architecture with fresh weights.

    The architecture is first built on the ``meta`` device (no memory, no RNG) to check
    its options and its size against :data:`MAX_PARAMETERS`; only then are weights made.

    Args:
        name: one of :data:`MODEL_NAMES`.
        num_classes: number of logits C.
        seed: if given, an int in ``[0, MAX_SEED]``: initialise the weights from
            ``torch.manual_seed(seed)`` without touching the global RNG state (so equal
            seeds give equal weights).
        device: ``"meta"`` returns the shape-only skeleton (no weights; ``seed`` unused);
            otherwise None (CPU).
        **kwargs: architecture options (e.g. ``channels=(8, 16)`` for ``cnn``).

    Returns:
        The model (train mode, float32, CPU), mapping ``(B, 1, 28, 28) -> (B, num_classes)``.

    Raises:
        ValueError: unknown name, invalid option or seed, or a model larger than
            :data:`MAX_PARAMETERS`.
    """
    if seed is not None:
        seed = check_seed(seed)
    skeleton = _build_on_meta(name, num_classes, kwargs)
    if device is not None:
        if torch.device(device).type != "meta":
            raise ValueError(f"device must be None (CPU) or 'meta', got {device!r}")
        return skeleton
    builder = MODELS[name].builder
    if seed is None:
        return builder(num_classes, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(num_classes, **kwargs)


def state_size(model: nn.Module) -> int:
    """Number of scalars in ``model.state_dict()`` (parameters and buffers, e.g. BatchNorm
    running statistics); works on a ``meta`` model."""
    return sum(t.numel() for t in model.state_dict().values())


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe_models() -> str:
    """One line per registered model: ``name  description``."""
    width = max(len(n) for n in MODEL_NAMES)
    return "\n".join(f"{n:<{width}}  {MODELS[n].description}" for n in MODEL_NAMES)
