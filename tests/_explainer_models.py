"""Small models the explainer and metric tests share, written the ways users write them.

All are float32, eval mode, seeded, with random batch-norm statistics (``randomize_``), on
inputs of shape ``SHAPE`` (1, 12, 12) unless a builder says otherwise, in [0, 1].

- ``tiny_cnn``: conv-BN-ReLU-maxpool x2 + linear (the reference CNN's layout, small).
- ``ReusedReLU``: one ``nn.ReLU`` module called after both convs (Captum's DeepLift and
  GuidedBackprop need one module per use).
- ``FunctionalCNN``: ``F.relu`` / ``torch.relu`` / ``F.max_pool2d`` in ``forward``, no modules.
- ``tiny_gap``: conv-BN-ReLU-maxpool, conv-BN-ReLU, AdaptiveAvgPool2d(1), Flatten, Linear
  (a global-average-pool head: CAM applies).
- ``linear_model``: Flatten + Linear (every gradient method's map is known in closed form).
- ``snapshot`` / ``assert_unchanged``: everything of a module a method could disturb.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests._models import randomize_

SHAPE = (1, 12, 12)
CLASSES = 3


def tiny_cnn(seed: int = 0, *, classes: int = CLASSES, channels=(3, 4),
             size: int = SHAPE[-1]) -> nn.Sequential:
    c1, c2 = channels
    m = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, c1, 3, padding=1), bn1=nn.BatchNorm2d(c1), relu1=nn.ReLU(),
        pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(c1, c2, 3, padding=1), bn2=nn.BatchNorm2d(c2), relu2=nn.ReLU(),
        pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(), fc=nn.Linear(c2 * (size // 4) ** 2, classes),
    ))
    return randomize_(m, seed).eval()


class ReusedReLU(nn.Module):
    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 3 * 3, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        return self.fc(x.flatten(1))


class FunctionalCNN(nn.Module):
    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def reused_relu(seed: int = 0) -> ReusedReLU:
    return randomize_(ReusedReLU(), seed).eval()


def functional_cnn(seed: int = 0) -> FunctionalCNN:
    return randomize_(FunctionalCNN(), seed).eval()


def tiny_gap(seed: int = 0, *, classes: int = CLASSES) -> nn.Sequential:
    m = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 3, 3, padding=1), bn1=nn.BatchNorm2d(3), relu1=nn.ReLU(),
        pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(3, 4, 3, padding=1), bn2=nn.BatchNorm2d(4), relu2=nn.ReLU(),
        gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(4, classes),
    ))
    return randomize_(m, seed).eval()


def linear_model(seed: int = 0, *, classes: int = CLASSES, shape=SHAPE) -> nn.Sequential:
    d = 1
    for s in shape:
        d *= s
    m = nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc=nn.Linear(d, classes)))
    return randomize_(m, seed).eval()


def inputs(n: int = 3, seed: int = 0, shape=SHAPE) -> Tensor:
    """(n, *shape) seeded uniform images in [0, 1]."""
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def snapshot(model: nn.Module) -> dict:
    """Parameters, buffers, training flags, hooks and module types, by path."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    modules = {}
    for path, m in model.named_modules():
        modules[path] = (
            type(m), m.training,
            len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
            len(getattr(m, "_full_backward_hooks", {}) or {}),
            len(getattr(m, "_full_backward_pre_hooks", {}) or {}),
            tuple(sorted(m._modules)),
        )
    grads = {k: (None if p.grad is None else p.grad.clone())
             for k, p in model.named_parameters()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    return {"state": state, "modules": modules, "grads": grads, "flags": flags,
            "model": copy.deepcopy(model)}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["flags"] == before["flags"]
    assert set(after["state"]) == set(before["state"])
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
        assert after["state"][k].dtype == v.dtype
    for k, g in before["grads"].items():
        h = after["grads"][k]
        assert (g is None) == (h is None), k
        if g is not None:
            assert torch.equal(g, h), k
