"""Train and evaluate classifiers on a :class:`openbox.fmnist.data.Dataset`.

``train`` is plain minibatch Adam on the cross-entropy, deterministic given ``seed``
on a given machine and thread count: the shuffling order comes from its own
``torch.Generator``, the global RNG is seeded inside a ``fork_rng`` block (so the
caller's RNG state is untouched), and ``torch.use_deterministic_algorithms`` is on
(warn-only) for the duration. Data stay where they are and each batch is moved to
``device``, so CUDA works when present.

Training that diverges stops at once: a non-finite loss at any step, or non-finite
parameters or buffers after any epoch, raises :class:`TrainingDivergedError`, so a
NaN model never reaches a checkpoint (and :func:`~openbox.fmnist.checkpoints.save_checkpoint`
refuses one anyway).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from openbox.fmnist.data import Dataset
from openbox.fmnist.models import check_seed

__all__ = ["TrainResult", "TrainingDivergedError", "evaluate", "non_finite_entries", "train"]

DEFAULT_BATCH_SIZE = 128
DEFAULT_EVAL_BATCH_SIZE = 1000
DEFAULT_LR = 1e-3
MAX_NAMED = 3  # tensors named in a divergence message before "and N more"


class TrainingDivergedError(RuntimeError):
    """Training produced a non-finite loss, parameter or buffer (NaN or infinity).

    The message says at which epoch and step and suggests a lower learning rate.
    Attributes: ``epoch`` (1-based), ``step`` (1-based within the epoch, or None when
    found by the end-of-epoch check), ``lr``.
    """

    def __init__(self, message: str, *, epoch: int, step: int | None, lr: float):
        super().__init__(message)
        self.epoch, self.step, self.lr = epoch, step, lr


def non_finite_entries(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``model`` (state-dict names)
    that hold a NaN or an infinity; empty when all are finite."""
    return [name for name, tensor in model.state_dict().items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


@dataclass
class TrainResult:
    """What happened during :func:`train`, one entry per epoch.

    Attributes:
        train_loss: mean cross-entropy over the epoch's training examples (the model
            in train mode, weights changing during the epoch).
        train_accuracy: fraction of training examples classified correctly during the epoch.
        test_accuracy: accuracy on the test set after the epoch (eval mode); empty when
            no test set was given.
        seconds: wall-clock seconds of the epoch (including its test evaluation).
    """

    train_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        return len(self.train_loss)

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds))

    @property
    def final_test_accuracy(self) -> float | None:
        return self.test_accuracy[-1] if self.test_accuracy else None


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seed the global RNG (restored afterwards) and turn on deterministic algorithms."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        # warn_only: an op without a deterministic kernel warns instead of failing, and
        # CUDA's cuBLAS workspace setting is not required.
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
             *, device: str | torch.device | None = None) -> float:
    """Fraction of ``dataset`` that ``model`` classifies correctly (argmax of the logits).

    Args:
        model: maps float32 ``(B, 1, 28, 28)`` to logits ``(B, C)``.
        dataset: images float32 ``(N, 1, 28, 28)``, labels int64 ``(N,)``.
        batch_size: images per forward pass.
        device: where to run; default the device of the model's parameters.

    Returns:
        Accuracy in ``[0, 1]``. The model is evaluated in eval mode and put back in the
        mode it was in.
    """
    if len(dataset) == 0:
        raise ValueError(f"cannot evaluate on an empty dataset ({dataset.source})")
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for start in range(0, len(dataset), batch_size):
            images = dataset.images[start:start + batch_size].to(device)
            labels = dataset.labels[start:start + batch_size].to(device)
            correct += int((model(images).argmax(dim=1) == labels).sum())
    finally:
        model.train(was_training)
    return correct / len(dataset)


def train(model: nn.Module, train_set: Dataset, test_set: Dataset | None = None, *,
          epochs: int, batch_size: int = DEFAULT_BATCH_SIZE, lr: float = DEFAULT_LR,
          seed: int = 0, device: str | torch.device = "cpu", progress: bool = True) -> TrainResult:
    """Train ``model`` in place with Adam on the cross-entropy.

    Args:
        model: maps float32 ``(B, 1, 28, 28)`` to logits ``(B, C)``; moved to ``device``.
        train_set: training data; labels must be ``< C``.
        test_set: if given, accuracy on it is measured after every epoch.
        epochs: passes over ``train_set`` (reshuffled each epoch; the last batch may be short).
        batch_size: examples per step.
        lr: Adam learning rate, finite and > 0.
        seed: an int in ``[0, 2**63 - 1]``; fixes the shuffling order and any use of the
            global RNG; same seed, same initial weights, same machine -> same trained weights.
        device: e.g. ``"cpu"`` or ``"cuda"``; each batch is moved there.
        progress: show a tqdm bar per epoch.

    Returns:
        A :class:`TrainResult`. The model is left in eval mode on ``device``.

    Raises:
        ValueError: bad ``epochs``, ``batch_size``, ``lr`` or ``seed``, or an empty dataset.
        TrainingDivergedError: the loss became NaN or infinite at some step, or a
            parameter or buffer did by the end of an epoch. The model's weights are then
            garbage: do not save them.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if isinstance(lr, bool) or not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    seed = check_seed(seed)
    if len(train_set) == 0:
        raise ValueError(f"cannot train on an empty dataset ({train_set.source})")
    device = torch.device(device)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(seed)
    result = TrainResult()
    n = len(train_set)
    steps = math.ceil(n / batch_size)
    with _deterministic(seed):
        for epoch in range(1, epochs + 1):
            started = time.perf_counter()
            model.train()
            order = torch.randperm(n, generator=shuffle)
            loss_sum, correct = 0.0, 0
            bar = tqdm(range(0, n, batch_size), desc=f"epoch {epoch}/{epochs}", unit="batch",
                       disable=not progress, leave=False)
            for step, start in enumerate(bar, start=1):
                index = order[start:start + batch_size]
                images = train_set.images[index].to(device, non_blocking=True)
                labels = train_set.labels[index].to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                logits = model(images)
                loss = loss_fn(logits, labels)
                value = float(loss.detach())  # the one host sync per step, needed anyway
                if not math.isfinite(value):
                    bar.close()
                    raise TrainingDivergedError(
                        f"training diverged at epoch {epoch}/{epochs}, step {step}/{steps}: "
                        f"the loss is {value}, so the model is unusable (do not save it). "
                        f"Try a lower learning rate (lr was {lr:g}).",
                        epoch=epoch, step=step, lr=lr)
                loss.backward()
                try:
                    optimizer.step()
                except RuntimeError as exc:  # lr * update beyond float32: no finite weights
                    if "overflow" not in str(exc):
                        raise
                    bar.close()
                    raise TrainingDivergedError(
                        f"training diverged at epoch {epoch}/{epochs}, step {step}/{steps}: the "
                        f"update overflows the weights' dtype ({exc}), so the model is "
                        f"unusable (do not save it). Try a lower learning rate (lr was {lr:g}).",
                        epoch=epoch, step=step, lr=lr) from exc
                loss_sum += value * len(index)
                correct += int((logits.detach().argmax(dim=1) == labels).sum())
                bar.set_postfix(loss=f"{loss_sum / min(start + batch_size, n):.4f}", refresh=False)
            bar.close()
            broken = non_finite_entries(model)
            if broken:  # the last step's update is seen by no loss: check the weights
                shown = ", ".join(broken[:MAX_NAMED])
                more = f" and {len(broken) - MAX_NAMED} more" if len(broken) > MAX_NAMED else ""
                raise TrainingDivergedError(
                    f"training diverged in epoch {epoch}/{epochs}: {shown}{more} hold NaN or "
                    "infinite values after the epoch's last step, so the model is unusable "
                    f"(do not save it). Try a lower learning rate (lr was {lr:g}).",
                    epoch=epoch, step=None, lr=lr)
            result.train_loss.append(loss_sum / n)
            result.train_accuracy.append(correct / n)
            if test_set is not None:
                result.test_accuracy.append(evaluate(model, test_set, device=device))
            result.seconds.append(time.perf_counter() - started)
            if progress:
                test = (f", test accuracy {result.test_accuracy[-1]:.4f}"
                        if test_set is not None else "")
                tqdm.write(f"epoch {epoch}/{epochs}: loss {result.train_loss[-1]:.4f}, train "
                           f"accuracy {result.train_accuracy[-1]:.4f}{test} "
                           f"({result.seconds[-1]:.1f} s)")
    model.eval()
    return result
