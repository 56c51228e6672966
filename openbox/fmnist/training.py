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

Constraints and penalties (PLNN-NS)
-----------------------------------
The OpenBox paper (Chu et al., KDD 2018) compares a plain PLNN with a PLNN-NS, a PLNN
trained with non-negative and sparse constraints. ``train`` provides both, off by default
(the defaults run exactly the plain training above, bit for bit):

* ``nonnegative=(names...)``: after every optimizer step the ``weight`` of each named
  module is projected onto ``w >= 0`` (``weight.clamp_(min=0)``); biases stay free;
* ``l1=lam``: ``lam * sum |w|`` over the ``weight`` of the ``l1_layers`` (by default the
  ``nonnegative`` ones; weights only, never biases) is added to each step's loss;
* ``penalty=fn``: a generic hook, ``fn(model, images, logits, epoch)`` returning a scalar
  tensor added to each step's loss (for regularisers written elsewhere).

:func:`plnn_ns_layers` names the layers the paper constrains. Our reading of the paper
(it describes PLNN-NS in a sentence, without a per-layer list): non-negative weights in
the hidden-to-hidden and output layers, i.e. every weight layer but the first (the
input layer, whose weights stay signed so that decision features can be negative), and
the L1 penalty on those same weights for sparsity. That is a reading, not a quotation:
pass other names to ``nonnegative`` / ``l1_layers`` for other readings.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from openbox.fmnist.data import Dataset
from openbox.fmnist.models import check_seed

__all__ = [
    "Penalty",
    "TrainConstraints",
    "TrainResult",
    "TrainingDivergedError",
    "check_constraints",
    "evaluate",
    "non_finite_entries",
    "plnn_ns_layers",
    "train",
]

DEFAULT_BATCH_SIZE = 128
DEFAULT_EVAL_BATCH_SIZE = 1000
DEFAULT_LR = 1e-3
MAX_NAMED = 3  # tensors named in a divergence message before "and N more"
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Module types :func:`plnn_ns_layers` counts as weight layers."""

Penalty = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``penalty(model, images, logits, epoch) -> scalar tensor``: images ``(B, 1, 28, 28)`` on
the training device, logits ``(B, C)`` (with their graph), epoch 1-based."""


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
        train_penalty: mean over the epoch's training examples of what was added to the
            cross-entropy (the L1 term plus the ``penalty`` hook); 0.0 without either.
        l1: the L1 coefficient used (0.0: none).
        l1_layers: module names whose weights the L1 term covered (empty when ``l1 == 0``).
        nonnegative: module names whose weights were kept >= 0.
        penalty: the hook's qualified name (e.g. ``"mmr_penalty"``), or None.
    """

    train_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    train_penalty: list[float] = field(default_factory=list)
    l1: float = 0.0
    l1_layers: tuple[str, ...] = ()
    nonnegative: tuple[str, ...] = ()
    penalty: str | None = None

    @property
    def epochs(self) -> int:
        return len(self.train_loss)

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds))

    @property
    def final_test_accuracy(self) -> float | None:
        return self.test_accuracy[-1] if self.test_accuracy else None

    def options(self) -> dict[str, object]:
        """The constraint options as plain data (for checkpoint metadata):
        ``{"l1": float, "l1_layers": [str], "nonnegative": [str], "penalty": str | None}``."""
        return {"l1": self.l1, "l1_layers": list(self.l1_layers),
                "nonnegative": list(self.nonnegative), "penalty": self.penalty}


@dataclass(frozen=True)
class TrainConstraints:
    """Checked constraint options (see :func:`check_constraints`).

    Attributes:
        l1: the L1 coefficient, finite and >= 0.
        l1_layers: module names whose weights the L1 term covers (empty when ``l1 == 0``).
        nonnegative: module names whose weights are projected onto ``w >= 0``.
    """

    l1: float = 0.0
    l1_layers: tuple[str, ...] = ()
    nonnegative: tuple[str, ...] = ()


def _module_names(model: nn.Module, names: Sequence[str], option: str) -> tuple[str, ...]:
    """``names`` as a tuple without repeats, each a module of ``model`` with a ``weight``
    parameter; ValueError naming the offenders otherwise."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise ValueError(f"{option} must be a sequence of module names (e.g. ('fc2', 'fc')), "
                         f"got {names!r}")
    modules = dict(model.named_modules())
    bad_type = [n for n in names if not isinstance(n, str)]
    if bad_type:
        raise ValueError(f"{option} must hold module names (str), got {bad_type!r}")
    unknown = [n for n in names if n not in modules or n == ""]
    if unknown:
        known = [n for n in modules if n]
        raise ValueError(f"{option}: unknown module(s) {unknown}; the model has {known}")
    weightless = [n for n in names
                  if not isinstance(getattr(modules[n], "weight", None), nn.Parameter)]
    if weightless:
        with_weight = [n for n, m in modules.items()
                       if n and isinstance(getattr(m, "weight", None), nn.Parameter)]
        raise ValueError(f"{option}: module(s) {weightless} have no weight parameter; modules "
                         f"with one: {with_weight}")
    return tuple(dict.fromkeys(names))


def check_constraints(model: nn.Module, *, l1: float = 0.0, nonnegative: Sequence[str] = (),
                      l1_layers: Sequence[str] | None = None) -> TrainConstraints:
    """Check :func:`train`'s constraint options against ``model`` (nothing is changed).

    Args:
        model: the model to be trained.
        l1: L1 coefficient, a finite number >= 0.
        nonnegative: names (as in ``model.named_modules()``) of modules with a ``weight``
            parameter, to be kept >= 0.
        l1_layers: names of modules whose weights the L1 term covers; None: the
            ``nonnegative`` ones.

    Returns:
        A :class:`TrainConstraints` with the names deduplicated in the given order.

    Raises:
        ValueError: ``l1`` negative or not finite; an unknown module name or a module
            without a weight (named, with the names that would do); ``l1 > 0`` with no
            layer for it.
    """
    if isinstance(l1, bool) or not (isinstance(l1, numbers.Real) and math.isfinite(l1)
                                    and l1 >= 0):
        raise ValueError(f"l1 must be a finite number >= 0, got {l1!r}")
    nonneg = _module_names(model, nonnegative, "nonnegative")
    covered = nonneg if l1_layers is None else _module_names(model, l1_layers, "l1_layers")
    if l1 > 0 and not covered:
        raise ValueError(f"l1 = {l1:g} > 0 needs layers to penalise: name them with l1_layers "
                         "(or nonnegative, which l1_layers defaults to)")
    return TrainConstraints(l1=float(l1), l1_layers=covered if l1 > 0 else (),
                            nonnegative=nonneg)


def plnn_ns_layers(model: nn.Module) -> tuple[str, ...]:
    """The layers the OpenBox paper's PLNN-NS constrains, by our reading of the paper:
    every weight layer (``Linear``, ``Conv1d/2d/3d``) but the first, in registration order
    (the forward order of the kit's ``nn.Sequential`` models).

    For ``build_model("plnn")`` (784-256-128-100-C) that is ``("fc2", "fc3", "fc")``: the
    hidden-to-hidden and output layers get non-negative weights (and the L1 penalty),
    the input layer ``fc1`` stays signed. See the module docstring.

    Raises:
        ValueError: the model has fewer than two weight layers (nothing would be left).
    """
    names = tuple(n for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS))
    if len(names) < 2:
        raise ValueError(f"PLNN-NS constrains every weight layer but the first; the model has "
                         f"{len(names)} weight layer(s) ({list(names)}), expected at least 2")
    return names[1:]


def _penalty_name(penalty: Penalty) -> str:
    name = getattr(penalty, "__qualname__", None) or type(penalty).__qualname__
    return str(name)


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
          seed: int = 0, device: str | torch.device = "cpu", progress: bool = True,
          l1: float = 0.0, nonnegative: Sequence[str] = (),
          l1_layers: Sequence[str] | None = None,
          penalty: Penalty | None = None) -> TrainResult:
    """Train ``model`` in place with Adam on the cross-entropy (plus optional penalties).

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
        l1: coefficient ``lam`` of the L1 term ``lam * sum |w|`` added to each step's loss,
            summed over the ``weight`` parameters (not the biases) of ``l1_layers``;
            finite and >= 0; 0 (the default) adds nothing.
        nonnegative: names of modules (``model.named_modules()``) with a ``weight``
            parameter: after every optimizer step those weights are projected onto
            ``w >= 0`` (``clamp_(min=0)``; biases stay free). E.g.
            ``plnn_ns_layers(model)``.
        l1_layers: the modules the L1 term covers; None (default): ``nonnegative``.
        penalty: called as ``penalty(model, images, logits, epoch)`` at every step (images
            ``(B, 1, 28, 28)`` on ``device``, logits ``(B, C)`` with their graph, epoch
            1-based); must return a scalar tensor, which is added to the loss and
            backpropagated with it.

    With the defaults (``l1=0``, no ``nonnegative``, no ``penalty``) the steps are exactly
    those of plain cross-entropy training: same seed, same weights, bit for bit.

    Returns:
        A :class:`TrainResult`, the options recorded in it. The model is left in eval mode
        on ``device``.

    Raises:
        ValueError: bad ``epochs``, ``batch_size``, ``lr``, ``seed``, ``l1``,
            ``nonnegative`` or ``l1_layers`` (see :func:`check_constraints`), a
            ``penalty`` that is not callable, or an empty dataset; all before any step.
            Also (during the first step) a ``penalty`` that does not return a scalar
            tensor.
        TrainingDivergedError: the loss became NaN or infinite at some step, or a
            parameter or buffer did by the end of an epoch. The model's weights are then
            garbage: do not save them.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if isinstance(lr, bool) or not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    seed = check_seed(seed)
    constraints = check_constraints(model, l1=l1, nonnegative=nonnegative,
                                    l1_layers=l1_layers)
    if penalty is not None and not callable(penalty):
        raise ValueError(f"penalty must be callable as penalty(model, images, logits, epoch) "
                         f"or None, got {penalty!r}")
    if len(train_set) == 0:
        raise ValueError(f"cannot train on an empty dataset ({train_set.source})")
    device = torch.device(device)
    model.to(device)
    modules = dict(model.named_modules())
    l1_weights = [modules[n].weight for n in constraints.l1_layers]
    clamped = [modules[n].weight for n in constraints.nonnegative]
    regularised = bool(l1_weights) or penalty is not None
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(seed)
    result = TrainResult(l1=constraints.l1, l1_layers=constraints.l1_layers,
                         nonnegative=constraints.nonnegative,
                         penalty=None if penalty is None else _penalty_name(penalty))
    n = len(train_set)
    steps = math.ceil(n / batch_size)
    with _deterministic(seed):
        for epoch in range(1, epochs + 1):
            started = time.perf_counter()
            model.train()
            order = torch.randperm(n, generator=shuffle)
            loss_sum, penalty_sum, correct = 0.0, 0.0, 0
            bar = tqdm(range(0, n, batch_size), desc=f"epoch {epoch}/{epochs}", unit="batch",
                       disable=not progress, leave=False)
            for step, start in enumerate(bar, start=1):
                index = order[start:start + batch_size]
                images = train_set.images[index].to(device, non_blocking=True)
                labels = train_set.labels[index].to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                logits = model(images)
                loss = loss_fn(logits, labels)
                if regularised:  # else the plain loss, untouched (bit-for-bit defaults)
                    cross_entropy = loss
                    extra = _extra_loss(model, images, logits, epoch, constraints.l1,
                                        l1_weights, penalty)
                    loss = cross_entropy + extra
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
                if clamped:
                    with torch.no_grad():
                        for weight in clamped:
                            weight.clamp_(min=0)
                if regularised:  # record the cross-entropy and the penalty apart
                    value = float(cross_entropy.detach())
                    penalty_sum += float(extra.detach()) * len(index)
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
            result.train_penalty.append(penalty_sum / n)
            result.train_accuracy.append(correct / n)
            if test_set is not None:
                result.test_accuracy.append(evaluate(model, test_set, device=device))
            result.seconds.append(time.perf_counter() - started)
            if progress:
                test = (f", test accuracy {result.test_accuracy[-1]:.4f}"
                        if test_set is not None else "")
                extra_text = (f" + penalty {result.train_penalty[-1]:.4f}"
                              if regularised else "")
                tqdm.write(f"epoch {epoch}/{epochs}: loss {result.train_loss[-1]:.4f}"
                           f"{extra_text}, train accuracy {result.train_accuracy[-1]:.4f}{test} "
                           f"({result.seconds[-1]:.1f} s)")
    model.eval()
    return result


def _extra_loss(model: nn.Module, images: torch.Tensor, logits: torch.Tensor, epoch: int,
                l1: float, l1_weights: Sequence[torch.Tensor],
                penalty: Penalty | None) -> torch.Tensor:
    """The L1 term plus the penalty hook's value: a scalar tensor on the logits' device."""
    extra = logits.new_zeros(())
    if l1_weights:
        extra = extra + l1 * sum(w.abs().sum() for w in l1_weights)
    if penalty is not None:
        value = penalty(model, images, logits, epoch)
        if not isinstance(value, torch.Tensor) or value.numel() != 1 \
                or not value.is_floating_point():
            shown = (f"a {value.dtype} tensor of shape {tuple(value.shape)}"
                     if isinstance(value, torch.Tensor) else f"a {type(value).__name__}")
            raise ValueError(f"penalty {_penalty_name(penalty)} must return a scalar "
                             f"floating-point tensor (added to the loss), got {shown}")
        extra = extra + value.reshape(())
    return extra
