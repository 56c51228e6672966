"""The packaged demo: a small trained CNN and the images it is shown on.

>>> model, info = load_demo_model()         # 8/16-channel reference CNN, 89.4% test accuracy
>>> ds = load_sample()                      # 1,000 packaged test images
>>> x = ds.images[demo_indices(ds.labels)]  # one image of each of DEMO_CLASSES
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from openbox.fmnist.checkpoints import CheckpointInfo, load_checkpoint
from openbox.fmnist.data import PACKAGE_DATA

__all__ = ["DEMO_CHECKPOINT", "DEMO_CLASSES", "demo_checkpoint", "demo_indices", "load_demo_model"]

DEMO_CHECKPOINT = "demo-cnn.pt"
DEMO_CLASSES = (0, 1, 4, 5, 8, 9)  # T-shirt/top, Trouser, Coat, Sandal, Bag, Ankle boot
"""Classes the demo shows, one image each."""


def demo_checkpoint() -> Path:
    """Path of the packaged demo checkpoint (``openbox/fmnist/_data/demo-cnn.pt``)."""
    package, folder = PACKAGE_DATA
    return Path(str(resources.files(package).joinpath(folder, DEMO_CHECKPOINT)))


def load_demo_model() -> tuple[nn.Module, CheckpointInfo]:
    """The demo CNN (eval mode, float32) and its checkpoint record, read with the same
    checks as any checkpoint (``weights_only=True``, SHA-256 digest)."""
    return load_checkpoint(demo_checkpoint())


def demo_indices(labels: torch.Tensor, classes: Sequence[int] = DEMO_CLASSES) -> list[int]:
    """The first image of each of ``classes`` in ``labels`` (N,), in that order."""
    out = []
    for c in classes:
        hits = (labels == c).nonzero().flatten()
        if len(hits):
            out.append(int(hits[0]))
    return out
