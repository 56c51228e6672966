"""Regenerate the packaged Fashion-MNIST sample in ``openbox/fmnist/_data/`` byte for byte.

The sample is the first ``SAMPLE_PER_CLASS`` (100) images of each class of the test
split, kept in their order in that split (so classes come interleaved), written as two
IDX files gzipped with mtime 0 (the same bytes every run, given the same zlib).

Usage::

    python experiments/make_sample.py [--data DIR] [--out openbox/fmnist/_data]

``--data`` defaults to ``$OPENBOX_DATA_DIR``, else ``../shared/datasets/fashion-mnist``
beside the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import numpy as np

from openbox.fmnist.data import (
    CLASSES,
    DATA_DIR_ENV,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    SAMPLE_FILES,
    SAMPLE_PER_CLASS,
    SPLITS,
    read_idx,
    write_idx,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "fashion-mnist"
DEFAULT_OUT = REPO / "openbox" / "fmnist" / "_data"
SOURCE_SPLIT = "test"


def sample_indices(labels: np.ndarray, per_class: int, num_classes: int) -> np.ndarray:
    """Row indices (sorted, int64) of the first ``per_class`` rows of every class."""
    chosen = []
    for cls in range(num_classes):
        rows = np.flatnonzero(labels == cls)
        if rows.size < per_class:
            raise SystemExit(f"class {cls} has only {rows.size} images; need {per_class}")
        chosen.append(rows[:per_class])
    return np.sort(np.concatenate(chosen))


def find_file(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    raise SystemExit(f"{folder}: missing {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA),
                        help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="destination folder")
    args = parser.parse_args()

    images_name, labels_name = SPLITS[SOURCE_SPLIT]
    images = read_idx(find_file(args.data, images_name), expected_magic=IDX_IMAGES_MAGIC)
    labels = read_idx(find_file(args.data, labels_name), expected_magic=IDX_LABELS_MAGIC)
    rows = sample_indices(labels, SAMPLE_PER_CLASS, len(CLASSES))

    for name, array in zip(SAMPLE_FILES, (images[rows], labels[rows]), strict=True):
        path = write_idx(args.out / name, array)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{path}  {path.stat().st_size:,} bytes  sha256 {digest}  shape {array.shape}")


if __name__ == "__main__":
    main()
