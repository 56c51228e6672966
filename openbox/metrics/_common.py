"""Checks and the model-probability helper every measure shares (private)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

import linearize
from openbox.explainers.base import check_targets


def check_batch(x, name: str = "x", shape: Sequence[int] | None = None) -> Tensor:
    """x: a floating, finite (B, *in) tensor with B >= 1 (and ``in == shape`` when given)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch (B, *input_shape), got shape "
                         f"{tuple(x.shape)}")
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"{name} must have shape (B, {', '.join(map(str, shape))}), got "
                         f"{tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).nonzero().flatten()
        raise ValueError(f"{name} contains NaN or Inf (inputs {bad.tolist()[:10]})")
    return x.detach()


def check_pair(a, b, names: tuple[str, str] = ("a", "b")) -> tuple[Tensor, Tensor]:
    """Two batches of the same shape (B, ...), B >= 1, at least one element per map."""
    a, b = check_batch(a, names[0]), check_batch(b, names[1])
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a[0].numel() == 0:
        raise ValueError(f"{names[0]} and {names[1]} hold empty maps ({tuple(a.shape)})")
    return a, b


def check_target(target, batch: int, classes: int, name: str = "target") -> Tensor:
    """An int or a (B,) integer tensor -> (B,) int64 in [0, classes) (no broadcasting of a
    one-element tensor; :func:`openbox.explainers.base.check_targets`)."""
    return check_targets(target, batch, classes, name=name)


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded torch.Generator (never the global RNG); ValueError for a bad seed."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return torch.Generator(device=device).manual_seed(int(seed))


class ModelProbability:
    """P_model(c | x) = softmax(model(x))[c], computed on a private copy of ``model`` cast to
    ``dtype`` / ``device`` (the user's module is never touched: ``.to`` on it would cast it in
    place). A model with batch-norm or dropout in training mode is rejected
    (:class:`linearize.TrainingModeError`): it is then not a fixed function.

    Calling it on x (N, *in) and c (N,) int64 returns (N,) probabilities, without gradients,
    in chunks of ``batch_size``.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device,
                 batch_size: int = 256):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        linearize.reject_training_mode(model)
        self.model = copy.deepcopy(model).to(dtype=dtype, device=device).eval()
        self.dtype = dtype
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._classes: int | None = None

    def probabilities(self, x: Tensor) -> Tensor:
        """(N, *in) -> (N, C) softmax(model(x))."""
        x = x.to(dtype=self.dtype, device=self.device)
        out = []
        with torch.no_grad():
            for i in range(0, x.shape[0], self.batch_size):
                logits = self.model(x[i : i + self.batch_size])
                if logits.dim() != 2:
                    raise ValueError(f"the model must map (B, *input_shape) to (B, C) logits; "
                                     f"its output is {tuple(logits.shape)}")
                out.append(torch.softmax(logits, dim=1))
        p = torch.cat(out)
        self._classes = int(p.shape[1])
        return p

    def classes(self, x1: Tensor) -> int:
        """C, from one forward pass of the first input (cached)."""
        if self._classes is None:
            self.probabilities(x1[:1])
        return self._classes  # type: ignore[return-value]

    def __call__(self, x: Tensor, target: Tensor) -> Tensor:
        p = self.probabilities(x)
        t = target.to(device=p.device, dtype=torch.int64)
        return p[torch.arange(p.shape[0], device=p.device), t]
