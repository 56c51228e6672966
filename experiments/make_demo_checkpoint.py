"""Train the small demo CNN and write ``openbox/fmnist/_data/demo-cnn.pt``.

Trains ``cnn`` (narrow: 8 and 16 channels by default) on the full Fashion-MNIST
training split for a couple of epochs, seeded, reports test accuracy, and saves an
``openbox.fmnist.checkpoints`` file that the offline demo loads in seconds.

Usage::

    python experiments/make_demo_checkpoint.py --data ../shared/datasets/fashion-mnist

``--data`` defaults to ``$OPENBOX_DATA_DIR``, else ``../shared/datasets/fashion-mnist``
beside the repository. The result is reproducible on the same machine and thread
count (``--threads``); across machines the float32 reductions may round differently.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from openbox.fmnist.checkpoints import load_checkpoint, save_checkpoint
from openbox.fmnist.data import DATA_DIR_ENV, load_fashion_mnist
from openbox.fmnist.models import INPUT_SHAPE, build_model, count_parameters
from openbox.fmnist.training import evaluate, train

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "fashion-mnist"
DEFAULT_OUT = REPO / "openbox" / "fmnist" / "_data" / "demo-cnn.pt"
ARCH = "cnn"
DEFAULT_CHANNELS = (8, 16)
DEFAULT_EPOCHS = 2
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 2e-3
DEFAULT_SEED = 0
MAX_BYTES = 200_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA),
                        help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--channels", type=int, nargs=2, default=DEFAULT_CHANNELS)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    train_set = load_fashion_mnist("train", args.data)
    test_set = load_fashion_mnist("test", args.data)
    arch_kwargs = {"channels": list(args.channels)}
    model = build_model(ARCH, train_set.num_classes, seed=args.seed, **arch_kwargs)
    print(f"{ARCH} {arch_kwargs}: {count_parameters(model):,} parameters; "
          f"{len(train_set):,} training / {len(test_set):,} test images from {args.data}")

    started = time.perf_counter()
    result = train(model, train_set, test_set, epochs=args.epochs, batch_size=args.batch_size,
                   lr=args.lr, seed=args.seed, device=args.device, progress=not args.no_progress)
    seconds = time.perf_counter() - started
    accuracy = result.test_accuracy[-1]

    save_checkpoint(
        args.out, model.to("cpu"), arch=ARCH, arch_kwargs=arch_kwargs,
        num_classes=train_set.num_classes, input_shape=INPUT_SHAPE,
        metadata={
            "dataset": "fashion-mnist (offline copy, ../shared/datasets/fashion-mnist)",
            "train_images": len(train_set),
            "test_images": len(test_set),
            "test_accuracy": accuracy,
            "train_accuracy": result.train_accuracy[-1],
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "optimizer": "Adam",
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "script": "experiments/make_demo_checkpoint.py",
        },
    )
    reloaded, info = load_checkpoint(args.out)
    check = evaluate(reloaded, test_set)
    size = args.out.stat().st_size
    print(f"test accuracy {accuracy:.4f} (reloaded: {check:.4f}); trained in {seconds:.1f} s; "
          f"wrote {args.out} ({size:,} bytes, sha256 of weights {info.sha256[:16]}...)")
    if size > MAX_BYTES:
        raise SystemExit(f"{args.out} is {size:,} bytes; the packaged demo must stay under "
                         f"{MAX_BYTES:,}")


if __name__ == "__main__":
    main()
