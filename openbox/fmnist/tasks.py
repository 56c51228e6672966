"""The OpenBox paper's two-class Fashion-MNIST tasks (Chu et al., KDD 2018).

=============  =====================  =====================
task           label 0                label 1
=============  =====================  =====================
``fmnist-1``   Ankle boot (class 9)   Bag (class 8)
``fmnist-2``   Coat (class 4)         Pullover (class 2)
=============  =====================  =====================

Which class is 0: the class the paper names first (its tasks read "Ankle boot vs Bag" and
"Coat vs Pullover") becomes label 0, the second label 1. This is the same order as
:data:`openbox.fmnist.data.BINARY_TASKS` and :func:`openbox.fmnist.data.binary_subset`
(a test keeps the two in step); a model trained on a task therefore has logit 0 for the
first class and logit 1 for the second, and the task's :class:`Dataset` carries the two
names in that order as its ``classes`` (what checkpoints store as their class names).

>>> from openbox.fmnist import load_sample
>>> boots_vs_bags = binary_task(load_sample(), "fmnist-1")   # 200 images, labels 0/1
>>> train_set = load_task("fmnist-1", "train")               # 12,000 images (needs the files)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from openbox.fmnist.data import CLASSES, Dataset, load_fashion_mnist, select_classes

__all__ = ["TASKS", "TASK_NAMES", "BinaryTask", "binary_task", "get_task", "load_task"]


@dataclass(frozen=True)
class BinaryTask:
    """A two-class task made from two Fashion-MNIST classes.

    Attributes:
        name: registry key, e.g. ``"fmnist-1"``.
        classes: the original Fashion-MNIST labels ``(c0, c1)``; ``c0`` becomes label 0 and
            ``c1`` label 1.
        class_names: their names, ``(CLASSES[c0], CLASSES[c1])``.
    """

    name: str
    classes: tuple[int, int]
    class_names: tuple[str, str]

    def __post_init__(self) -> None:
        if (len(self.classes) != 2 or len(set(self.classes)) != 2
                or not all(0 <= c < len(CLASSES) for c in self.classes)):
            raise ValueError(f"task {self.name!r}: classes must be two distinct labels in "
                             f"0..{len(CLASSES) - 1}, got {self.classes!r}")
        expected = tuple(CLASSES[c] for c in self.classes)
        if tuple(self.class_names) != expected:
            raise ValueError(f"task {self.name!r}: class_names must be {expected} for classes "
                             f"{self.classes}, got {self.class_names!r}")

    @property
    def description(self) -> str:
        """One line, e.g. ``"Ankle boot (9) -> 0 vs Bag (8) -> 1"``."""
        (c0, c1), (n0, n1) = self.classes, self.class_names
        return f"{n0} ({c0}) -> 0 vs {n1} ({c1}) -> 1"


TASKS: dict[str, BinaryTask] = {
    task.name: task
    for task in (
        BinaryTask("fmnist-1", classes=(9, 8), class_names=("Ankle boot", "Bag")),
        BinaryTask("fmnist-2", classes=(4, 2), class_names=("Coat", "Pullover")),
    )
}
"""Registry: task name -> :class:`BinaryTask` (the paper's FMNIST-1 and FMNIST-2)."""

TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(task: str | BinaryTask) -> BinaryTask:
    """The :class:`BinaryTask` named ``task`` (a :class:`BinaryTask` is returned as is).

    Raises:
        ValueError: an unknown name; the message lists the registered tasks.
    """
    if isinstance(task, BinaryTask):
        return task
    if not isinstance(task, str) or task not in TASKS:
        known = ", ".join(f"{t.name} ({t.description})" for t in TASKS.values())
        raise ValueError(f"unknown task {task!r}; expected one of: {known}")
    return TASKS[task]


def binary_task(dataset: Dataset, task: str | BinaryTask) -> Dataset:
    """The images of ``task``'s two classes, relabelled 0 / 1.

    Args:
        dataset: a 10-class Fashion-MNIST :class:`Dataset` (``classes == CLASSES``), e.g.
            from :func:`load_fashion_mnist` or :func:`openbox.fmnist.data.load_sample`:
            images float32 ``(N, 1, 28, 28)``, labels int64 ``(N,)`` in ``0..9``.
        task: a name in :data:`TASKS` or a :class:`BinaryTask`.

    Returns:
        A :class:`Dataset` of the ``M`` images labelled ``task.classes[0]`` or
        ``task.classes[1]``, in their original order: images float32 ``(M, 1, 28, 28)``,
        labels int64 ``(M,)`` with ``0`` for the first class and ``1`` for the second,
        ``classes == task.class_names`` and the task named in ``source``.

    Raises:
        ValueError: an unknown task, or a dataset that is not 10-class Fashion-MNIST.
    """
    spec = get_task(task)
    if tuple(dataset.classes) != CLASSES:
        raise ValueError(f"task {spec.name!r} needs a 10-class Fashion-MNIST Dataset (classes "
                         f"{CLASSES}); got classes {tuple(dataset.classes)} from "
                         f"{dataset.source}")
    subset = select_classes(dataset, spec.classes)
    return Dataset(images=subset.images, labels=subset.labels, classes=spec.class_names,
                   source=f"{dataset.source} [task {spec.name}: {spec.description}]")


def load_task(task: str | BinaryTask, split: str = "train",
              data_dir: str | os.PathLike | None = None, *, download: bool = False,
              progress: bool = True) -> Dataset:
    """:func:`binary_task` of :func:`load_fashion_mnist`'s ``split``.

    The task name is checked before any file is read. ``split``, ``data_dir``,
    ``download`` and ``progress`` are :func:`load_fashion_mnist`'s (the train split gives
    12,000 images per task, the test split 2,000).

    Raises:
        ValueError: an unknown task.
        DatasetError: the files are missing or malformed (see :func:`load_fashion_mnist`).
    """
    spec = get_task(task)
    dataset = load_fashion_mnist(split, data_dir, download=download, progress=progress)
    return binary_task(dataset, spec)
