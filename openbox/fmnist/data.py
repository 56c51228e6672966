"""Fashion-MNIST: IDX files, the dataset container, a packaged sample, binary tasks.

Where the data comes from
-------------------------
``load_fashion_mnist(split, data_dir)`` reads the four standard IDX files
(``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``; the uncompressed
names without ``.gz`` work as well) from the first of these folders that is given:

1. the ``data_dir`` argument (the CLI's ``--data DIR``);
2. the environment variable ``OPENBOX_DATA_DIR`` (:data:`DATA_DIR_ENV`);
3. the user cache, ``$XDG_CACHE_HOME/openbox/fashion-mnist``, by default
   ``~/.cache/openbox/fashion-mnist``.

Only when the files are missing there *and* ``download=True`` does the loader fetch
the official release (:data:`MIRRORS`, checked against the official MD5 sums in
:data:`FILES`) into that folder. Without internet access point the loader at an
offline copy, e.g. ``../shared/datasets/fashion-mnist`` beside the repository.
``load_sample()`` needs no folder at all: it reads 1,000 test images shipped inside
the package (``openbox/fmnist/_data/``).

What the loader returns
-----------------------
A :class:`Dataset`: ``images`` float32 ``(N, 1, 28, 28)`` with pixels in ``[0, 1]``
(uint8 / 255, no normalisation: the explanation engine's input box is ``[0, 1]``),
``labels`` int64 ``(N,)``, the class names and a description of the source.

Every problem with the files raises :class:`DatasetError` (a ``ValueError``) whose
message names the file and says what was expected and what was found.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from openbox.fmnist.idx import (
    GZIP_SUFFIX,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    DatasetError,
    atomic_target,
    read_idx,
    write_idx,
)

__all__ = [
    "BINARY_TASKS",
    "CLASSES",
    "DATA_DIR_ENV",
    "FILES",
    "INPUT_SHAPE",
    "MIRRORS",
    "SAMPLE_PER_CLASS",
    "SPLITS",
    "Dataset",
    "DatasetError",
    "atomic_target",
    "binary_subset",
    "default_cache_dir",
    "download_fashion_mnist",
    "load_fashion_mnist",
    "load_sample",
    "read_idx",
    "read_pair",
    "resolve_data_dir",
    "select_classes",
    "write_idx",
]

# --- Fashion-MNIST facts -------------------------------------------------------------

CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Class names, indexed by label 0..9."""

INPUT_SHAPE: tuple[int, int, int] = (1, 28, 28)
"""(channels, height, width) of a Fashion-MNIST image, as every reference model takes it."""
IMAGE_SIZE = INPUT_SHAPE[1]
PIXEL_MAX = 255.0  # uint8 pixels are divided by this, giving [0, 1]

SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
"""Split name -> (images file, labels file), the official names."""

FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
"""Official file name -> MD5 of the official release (zalandoresearch/fashion-mnist README)."""

MIRRORS: tuple[str, ...] = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
"""Official download locations, tried in order; a file is kept only if its MD5 matches."""

BINARY_TASKS: dict[str, tuple[int, int]] = {
    "fmnist-1": (9, 8),  # Ankle boot -> 0, Bag -> 1
    "fmnist-2": (4, 2),  # Coat -> 0, Pullover -> 1
}
"""The OpenBox paper's two-class tasks: name -> (class that becomes 0, class that becomes 1)."""

DATA_DIR_ENV = "OPENBOX_DATA_DIR"
CACHE_SUBDIR = ("openbox", "fashion-mnist")
OFFLINE_HINT = (
    f"pass --data DIR or set {DATA_DIR_ENV} to a folder holding the four IDX files, "
    "e.g. ../shared/datasets/fashion-mnist"
)

DOWNLOAD_CHUNK = 1 << 16
DOWNLOAD_TIMEOUT_S = 30.0

# --- packaged sample -----------------------------------------------------------------

PACKAGE_DATA = ("openbox.fmnist", "_data")  # (package, folder inside it) holding the shipped files
SAMPLE_FILES = (
    "fashion-mnist-sample-images-idx3-ubyte.gz",
    "fashion-mnist-sample-labels-idx1-ubyte.gz",
)
SAMPLE_PER_CLASS = 100
"""The packaged sample holds this many test images of each class (1,000 in all)."""

# --- the container -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class Dataset:
    """Labelled images in memory.

    Attributes:
        images: float32 ``(N, 1, 28, 28)``, pixels in ``[0, 1]`` (uint8 / 255).
        labels: int64 ``(N,)``, values in ``0 .. len(classes) - 1``.
        classes: class names indexed by label.
        source: where the data came from (folder and split, or the packaged sample).

    ``len(ds)`` and ``ds[i] -> (image (1, 28, 28), label)`` make it usable as a torch
    map-style dataset (e.g. with ``torch.utils.data.DataLoader``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"Dataset needs images (N, C, H, W) and labels (N,) with the same N, got "
                f"images {tuple(self.images.shape)} and labels {tuple(self.labels.shape)}"
            )
        if self.images.dtype != torch.float32 or self.labels.dtype != torch.int64:
            raise ValueError(
                f"Dataset needs float32 images and int64 labels, got {self.images.dtype} "
                f"and {self.labels.dtype}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> torch.Tensor:
        """int64 ``(num_classes,)``: how many images carry each label."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def subset(
        self, indices: torch.Tensor | Sequence[int], *, source: str | None = None
    ) -> Dataset:
        """The rows at ``indices`` (int64 ``(M,)`` or a boolean mask ``(N,)``), same classes."""
        index = torch.as_tensor(indices)
        return Dataset(
            images=self.images[index],
            labels=self.labels[index],
            classes=self.classes,
            source=source or f"{self.source} [subset of {len(index)}]",
        )


def _to_dataset(images: np.ndarray, labels: np.ndarray, source: str, images_path: Path,
                labels_path: Path) -> Dataset:
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DatasetError(
            f"{images_path}: expected images of shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}), "
            f"found {images.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{images_path} and {labels_path}: image and label counts differ: "
            f"expected the same N, found {images.shape[0]} images and {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise DatasetError(
            f"{labels_path}: expected labels 0..{len(CLASSES) - 1}, found {int(labels.max())}"
        )
    image_tensor = torch.from_numpy(images).to(torch.float32).div_(PIXEL_MAX).unsqueeze(1)
    label_tensor = torch.from_numpy(labels).to(torch.int64)
    return Dataset(images=image_tensor, labels=label_tensor, classes=CLASSES, source=source)


def read_pair(images_path: str | os.PathLike, labels_path: str | os.PathLike, *,
              source: str | None = None) -> Dataset:
    """A :class:`Dataset` from one IDX images file (N, 28, 28) and one IDX labels file (N,)."""
    images_path, labels_path = Path(images_path), Path(labels_path)
    images = read_idx(images_path, expected_magic=IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, expected_magic=IDX_LABELS_MAGIC)
    return _to_dataset(images, labels, source or f"{images_path.parent}", images_path, labels_path)


# --- folders, download ---------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/openbox/fashion-mnist``, else ``~/.cache/openbox/fashion-mnist``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base).joinpath(*CACHE_SUBDIR)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The folder to read, and how it was chosen.

    Returns:
        ``(folder, origin)`` with origin ``"argument"`` (``data_dir`` given),
        ``"environment"`` (``$OPENBOX_DATA_DIR`` set and non-empty) or ``"cache"``.
    """
    if data_dir is not None:
        return Path(data_dir).expanduser(), "argument"
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser(), "environment"
    return default_cache_dir(), "cache"


def _find_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` (gzipped), else the uncompressed file, else None."""
    for candidate in (folder / name, folder / name[: -len(GZIP_SUFFIX)]):
        if candidate.is_file():
            return candidate
    return None


def _fetch(url: str, handle, *, progress: bool, desc: str) -> None:
    """Stream ``url`` into the open binary file ``handle`` (tqdm bar unless disabled)."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        total = response.headers.get("Content-Length")
        with tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                  desc=desc, disable=not progress) as bar:
            while chunk := response.read(DOWNLOAD_CHUNK):
                handle.write(chunk)
                bar.update(len(chunk))


class _ChecksumMismatch(ValueError):
    """A downloaded file's MD5 differs from the official one (the file is discarded)."""


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(DOWNLOAD_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_fashion_mnist(folder: str | os.PathLike | None = None, *,
                           names: Sequence[str] | None = None, progress: bool = True,
                           mirrors: Sequence[str] | None = None,
                           fetch: Callable[..., None] | None = None) -> Path:
    """Download the official Fashion-MNIST files that ``folder`` lacks.

    Each file is streamed to a temporary file beside its destination and renamed only
    after its MD5 matches :data:`FILES`; mirrors are tried in order.

    Args:
        folder: destination (default: :func:`default_cache_dir`); created if needed.
        names: which of :data:`FILES` to fetch (default: all four).
        progress: show a tqdm bar per file.
        mirrors: base URLs ending in ``/`` (default :data:`MIRRORS`).
        fetch: ``fetch(url, handle, progress=..., desc=...)`` (tests replace it).

    Returns:
        The folder.

    Raises:
        DatasetError: no mirror delivered a file with the right checksum; the message
            lists each attempt and says how to use an offline copy instead.
    """
    folder = Path(folder) if folder is not None else default_cache_dir()
    fetch = fetch or _fetch
    mirrors = MIRRORS if mirrors is None else mirrors
    for name in names or tuple(FILES):
        if name not in FILES:
            raise ValueError(f"unknown Fashion-MNIST file {name!r}; expected one of {tuple(FILES)}")
        destination = folder / name
        if destination.is_file() and _md5(destination) == FILES[name]:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatasetError(f"{folder}: cannot create the download folder ({exc}); "
                               f"{OFFLINE_HINT}") from exc
        failures = []
        for mirror in mirrors:
            url = mirror + name
            try:
                with atomic_target(destination) as tmp:
                    with tmp.open("xb") as handle:
                        fetch(url, handle, progress=progress, desc=name)
                    found = _md5(tmp)
                    if found != FILES[name]:
                        raise _ChecksumMismatch(
                            f"MD5 mismatch, expected {FILES[name]}, found {found}")
                break
            except (OSError, ValueError, http.client.HTTPException) as exc:
                if isinstance(exc, _ChecksumMismatch):
                    failures.append(f"{url}: {exc}")
                else:
                    failures.append(f"{url}: {type(exc).__name__}: {exc}")
        else:
            attempts = "; ".join(failures) or "no mirrors given"
            raise DatasetError(
                f"could not download Fashion-MNIST file {name} into {folder} ({attempts}). "
                f"Without internet access, {OFFLINE_HINT}."
            )
    return folder


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None, *,
                       download: bool = False, progress: bool = True) -> Dataset:
    """Load a Fashion-MNIST split from IDX files.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        data_dir: folder holding the IDX files; if None, ``$OPENBOX_DATA_DIR``, then the
            user cache (see the module docstring).
        download: when the files are missing from the folder, download the official
            release into it (checked against the official MD5 sums). Off by default.
        progress: show a download progress bar.

    Returns:
        A :class:`Dataset`: images float32 ``(N, 1, 28, 28)`` in ``[0, 1]``, labels int64
        ``(N,)``, ``classes == CLASSES``.

    Raises:
        DatasetError: unknown split, files missing (and not downloaded), or malformed.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: expected one of {tuple(SPLITS)}")
    folder, origin = resolve_data_dir(data_dir)
    names = SPLITS[split]
    found = [_find_file(folder, name) for name in names]
    missing = [name for name, path in zip(names, found, strict=True) if path is None]
    if missing and download:
        download_fashion_mnist(folder, names=missing, progress=progress)
        found = [_find_file(folder, name) for name in names]
        missing = [name for name, path in zip(names, found, strict=True) if path is None]
    if missing:
        how = {"argument": "given as data_dir", "environment": f"from ${DATA_DIR_ENV}",
               "cache": "the user cache; no data_dir given and $" + DATA_DIR_ENV + " unset"}[origin]
        raise DatasetError(
            f"{folder} ({how}) lacks the Fashion-MNIST {split} files: expected "
            f"{' and '.join(missing)} (or the same names without .gz). "
            f"Either {OFFLINE_HINT}, or allow downloading (download=True) on a machine "
            "with internet access."
        )
    images_path, labels_path = found
    return read_pair(images_path, labels_path, source=f"{folder} ({split})")


def load_sample() -> Dataset:
    """The 1,000-image sample shipped in the package (no folder, no network needed).

    The first :data:`SAMPLE_PER_CLASS` images of each class of the offline test split
    (``../shared/datasets/fashion-mnist``), in their order there; see
    ``openbox/fmnist/_data/README.md`` and ``experiments/make_sample.py``.

    Returns:
        A :class:`Dataset` of 1,000 images, 100 per class, same layout as
        :func:`load_fashion_mnist`.
    """
    root = resources.files(PACKAGE_DATA[0]).joinpath(PACKAGE_DATA[1])
    with resources.as_file(root / SAMPLE_FILES[0]) as images_path, \
            resources.as_file(root / SAMPLE_FILES[1]) as labels_path:
        return read_pair(images_path, labels_path, source="openbox packaged sample (test)")


# --- class subsets -------------------------------------------------------------------


def _class_index(cls: int | str, classes: Sequence[str]) -> int:
    if isinstance(cls, str):
        if cls not in classes:
            raise ValueError(f"unknown class {cls!r}; expected one of {tuple(classes)}")
        return classes.index(cls)
    if not 0 <= int(cls) < len(classes):
        raise ValueError(f"class index {cls} out of range 0..{len(classes) - 1}")
    return int(cls)


def select_classes(dataset: Dataset, classes: Sequence[int | str]) -> Dataset:
    """Keep only the images of ``classes`` and relabel them ``0 .. k-1`` in the given order.

    Args:
        dataset: any :class:`Dataset`.
        classes: original labels or class names, e.g. ``(9, 8)`` or ``("Ankle boot", "Bag")``;
            ``classes[i]`` becomes label ``i``.

    Returns:
        A :class:`Dataset` with the kept images in their original order, labels int64 in
        ``0 .. k-1`` and ``classes`` the kept names in the given order.
    """
    index = [_class_index(c, dataset.classes) for c in classes]
    if len(set(index)) != len(index):
        raise ValueError(f"classes must be distinct, got {tuple(classes)}")
    original = torch.tensor(index, dtype=torch.int64)
    keep = (dataset.labels.unsqueeze(1) == original).any(dim=1)
    labels = dataset.labels[keep]
    relabel = torch.full((len(dataset.classes),), -1, dtype=torch.int64)
    relabel[original] = torch.arange(len(index))
    names = tuple(dataset.classes[i] for i in index)
    return Dataset(
        images=dataset.images[keep],
        labels=relabel[labels],
        classes=names,
        source=f"{dataset.source} [{' vs '.join(names)}]",
    )


def binary_subset(dataset: Dataset, task: str) -> Dataset:
    """The OpenBox paper's two-class tasks as a :class:`Dataset` with labels 0/1.

    ``"fmnist-1"``: Ankle boot (9) -> 0, Bag (8) -> 1.
    ``"fmnist-2"``: Coat (4) -> 0, Pullover (2) -> 1.
    (The class named first in the paper becomes 0; see :data:`BINARY_TASKS`.)
    """
    if task not in BINARY_TASKS:
        raise ValueError(f"unknown binary task {task!r}; expected one of {tuple(BINARY_TASKS)}")
    if dataset.classes != CLASSES:
        raise ValueError("binary_subset needs a 10-class Fashion-MNIST Dataset; "
                         f"got classes {dataset.classes}")
    return select_classes(dataset, BINARY_TASKS[task])
