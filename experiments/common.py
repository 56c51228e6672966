"""What every study of the paper pipeline shares: settings, data, cached training, tables.

The pipeline (``python -m experiments``) regenerates every table and figure of ``paper/``.
Each study is a module with ``run(ctx) -> None`` that writes its files through
:class:`Context`; tables are written as CSV (full precision, ``repr`` of floats, byte-stable
across runs on one machine) and Markdown (3 significant digits). Measured times go only to
tables whose name ends in ``-timing`` (they differ between runs; nothing else may).

Trained checkpoints are cached in ``experiments/.cache/`` (git-ignored) under a name that
holds a digest of everything that determines the weights (architecture, options, task,
data source, epochs, batch size, lr, seed, constraints), so a changed setting retrains and
an unchanged one loads the checked checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from openbox.fmnist import data as fdata
from openbox.fmnist.checkpoints import load_checkpoint, save_checkpoint
from openbox.fmnist.models import build_model
from openbox.fmnist.training import evaluate, train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "paper"
DEFAULT_CACHE = ROOT / "experiments" / ".cache"


@dataclass(frozen=True)
class Settings:
    """Sizes of every study; :data:`FULL` for the paper, :data:`QUICK` for CI's smoke run."""

    name: str
    # 12.1: the OpenBox paper's PLNN on the binary tasks
    plnn_epochs: int
    plnn_train_limit: int | None      # training images per task (None: all)
    exactness_images: int             # per task: LIME vs openbox exactness
    consistency_images: int           # per task: nearest-neighbour consistency
    feature_images: int               # decision-feature figure rows
    # 12.2: the reference CNN on 10 classes
    cnn_channels: tuple[int, int]
    cnn_epochs: int
    cnn_train_limit: int | None
    compare_images: int               # every method x every measure
    compare_expensive_images: int     # methods costing seconds per call (openbox-ig, LIME, ...)
    exact_images: int                 # facets, radii, regions on segments
    inscribed_images: int             # the region's own inscribed radius (one LP each)
    segment_images: int               # regions crossed on the segment to the nearest neighbour
    ig_images: int                    # exact IG against Captum's IG
    ig_steps: tuple[int, ...]
    # 13: the architecture study
    study_epochs: int
    study_train_limit: int | None
    study_images: int
    study_pairs: int
    # options of the sampling methods (tiny for quick runs) and the measures of the costly ones
    method_options: dict = field(default_factory=dict)
    expensive_measures: tuple[str, ...] | None = None   # None: every measure
    ig_measures: tuple[str, ...] = ("exactness", "local_fidelity", "seed_stability",
                                    "consistency", "faithfulness")
    study_inscribed: int = 3          # inscribed-radius LPs per model
    study_lime: int = 10              # LIME exactness / consistency images per model
    study_width: str = "full"         # "full" zoo widths; "tiny" for quick runs
    plane_max_regions: int = 1500
    plane_extent: float = 0.02


FULL = Settings(
    name="full", plnn_epochs=10, plnn_train_limit=None, exactness_images=500,
    consistency_images=100, feature_images=3, cnn_channels=(8, 16), cnn_epochs=3,
    cnn_train_limit=None, compare_images=20, compare_expensive_images=5, exact_images=100,
    inscribed_images=5, segment_images=10, ig_images=3, ig_steps=(50, 1000, 4000), study_epochs=2,
    study_train_limit=20000, study_images=50, study_pairs=10,
)
QUICK = Settings(
    name="quick", plnn_epochs=1, plnn_train_limit=600, exactness_images=6,
    consistency_images=4, feature_images=2, cnn_channels=(4, 8), cnn_epochs=1,
    cnn_train_limit=600, compare_images=2, compare_expensive_images=1, exact_images=4,
    inscribed_images=1, segment_images=1, ig_images=1, ig_steps=(50, 200), study_epochs=2,
    study_train_limit=300, study_images=3, study_pairs=2,
    method_options={"lime": {"num_samples": 60}, "lime-patches": {"n_samples": 40},
                    "kernelshap": {"n_samples": 40}, "meaningful-perturbation": {"steps": 20},
                    "smoothgrad": {"nt_samples": 5}, "integrated-gradients": {"n_steps": 20}},
    expensive_measures=("exactness", "local_fidelity", "faithfulness", "consistency"),
    ig_measures=("exactness", "faithfulness"),
    study_inscribed=1, study_lime=2, study_width="tiny", plane_max_regions=200,
    plane_extent=0.005,
)
SEED = 0
"""The one seed: training, subsets, every sampling method and measure."""


@dataclass
class Context:
    """Where a study writes, what it may read, and the shared caches."""

    settings: Settings
    out: Path
    cache: Path
    data_dir: Path | None
    progress: bool = True
    written: list[Path] = field(default_factory=list)
    _datasets: dict[str, fdata.Dataset] = field(default_factory=dict)

    # -- data ------------------------------------------------------------------------------

    def dataset(self, split: str) -> fdata.Dataset:
        """The Fashion-MNIST split (``train`` / ``test``) from the data folder; without one,
        the packaged 1,000-image sample split 700 / 300 (quick runs only)."""
        if split not in self._datasets:
            if self.data_dir is not None:
                self._datasets[split] = fdata.load_fashion_mnist(split, self.data_dir)
            else:
                if self.settings is FULL:
                    raise SystemExit("the full run needs Fashion-MNIST: pass --data DIR or set "
                                     f"{fdata.DATA_DIR_ENV}")
                s = fdata.load_sample()
                g = torch.Generator().manual_seed(SEED)
                order = torch.randperm(len(s), generator=g)
                part = order[:700] if split == "train" else order[700:]
                part = part.sort().values
                self._datasets[split] = fdata.Dataset(
                    s.images[part], s.labels[part], s.classes,
                    f"{s.source}, {'first 700' if split == 'train' else 'last 300'} of a seeded "
                    "permutation")
        return self._datasets[split]

    @property
    def data_source(self) -> str:
        return "Fashion-MNIST IDX files" if self.data_dir is not None else \
            "the packaged 1,000-image test sample (700 train / 300 test)"

    # -- training --------------------------------------------------------------------------

    def trained(self, arch: str, arch_kwargs: dict, train_set: fdata.Dataset,
                test_set: fdata.Dataset, *, epochs: int, batch_size: int, lr: float = 1e-3,
                tag: str, train_options: dict | None = None,
                limit: int | None = None, describe: dict | None = None
                ) -> tuple[torch.nn.Module, dict]:
        """A model trained with these settings: from the cache, or trained now and cached.

        ``describe``: plain data that identifies what ``train_options`` cannot show by value
        (a penalty's parameters); it joins the cache key. Returns the model (eval mode) and
        its metadata (test accuracy, epochs, ...)."""
        train_options = dict(train_options or {})
        if limit is not None and limit < len(train_set):
            g = torch.Generator().manual_seed(SEED)
            keep = torch.randperm(len(train_set), generator=g)[:limit].sort().values
            train_set = fdata.Dataset(train_set.images[keep], train_set.labels[keep],
                                      train_set.classes, f"{train_set.source} [{limit} seeded]")
        key = {"arch": arch, "arch_kwargs": arch_kwargs, "classes": list(train_set.classes),
               "n_train": len(train_set), "source": train_set.source, "epochs": epochs,
               "batch_size": batch_size, "lr": lr, "seed": SEED,
               "train_options": {k: _plain(v) for k, v in train_options.items()},
               "describe": describe or {}}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = self.cache / f"{tag}-{digest}.pt"
        if path.is_file():
            model, info = load_checkpoint(path)
            return model.eval(), dict(info.metadata)
        self.log(f"training {tag} ({arch} {arch_kwargs}, {len(train_set):,} images, "
                 f"{epochs} epoch(s))")
        model = build_model(arch, len(train_set.classes), seed=SEED, **arch_kwargs)
        result = train(model, train_set, test_set, epochs=epochs, batch_size=batch_size, lr=lr,
                       seed=SEED, progress=self.progress, **train_options)
        meta = {"test_accuracy": float(result.final_test_accuracy), "epochs": epochs,
                "n_train": len(train_set), "classes": list(train_set.classes),
                "seconds": result.total_seconds, "key": key}
        self.cache.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, model, arch=arch, arch_kwargs=arch_kwargs,
                        num_classes=len(train_set.classes), metadata=meta)
        return model.eval(), meta

    # -- output ----------------------------------------------------------------------------

    def table(self, name: str, rows: Sequence[dict[str, Any]], *, caption: str = "",
              columns: Sequence[str] | None = None) -> Path:
        """Write ``name``.csv (full precision) and ``name``.md (caption + table)."""
        if name.endswith("-timing") is False and any(
                "seconds" in c or c.endswith("_s") for c in (columns or rows[0].keys())):
            raise AssertionError(f"{name}: time columns belong in a *-timing table")
        columns = list(columns or rows[0].keys())
        csv_path = self.out / f"{name}.csv"
        with csv_path.open("w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(columns)
            for row in rows:
                w.writerow([_csv_cell(row.get(c)) for c in columns])
        md = [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
        md += ["| " + " | ".join(_md_cell(row.get(c)) for c in columns) + " |" for row in rows]
        md_path = self.out / f"{name}.md"
        md_path.write_text((caption + "\n\n" if caption else "") + "\n".join(md) + "\n")
        self.written += [csv_path, md_path]
        return csv_path

    def figure(self, name: str, fig) -> Path:
        """Save a matplotlib Figure as ``name``.png (fixed metadata: byte-stable PNGs)."""
        path = self.out / f"{name}.png"
        fig.savefig(path, dpi=110, metadata={"Software": None})
        self.written.append(path)
        return path

    def log(self, message: str) -> None:
        tqdm.write(f"[experiments] {message}", file=sys.stderr)

    def bar(self, iterable, **kwargs):
        return tqdm(iterable, disable=not self.progress, leave=False, file=sys.stderr, **kwargs)


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def seeded_subset(n_total: int, n: int, seed: int = SEED) -> list[int]:
    """n indices of range(n_total), drawn without replacement with ``seed``, sorted."""
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_total, generator=g)[: min(n, n_total)].tolist())


def median(values) -> float:
    t = torch.as_tensor(values, dtype=torch.float64).flatten()
    t = t[~torch.isnan(t)]
    return float(t.median()) if t.numel() else float("nan")


def _plain(v):
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if callable(v):
        return getattr(v, "__qualname__", repr(v))
    return v


def _csv_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, torch.Tensor):
        return _csv_cell(v.item())
    return str(v)


def _md_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    if math.isnan(v):
        return "n/a"
    if v == 0:
        return "0"
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e5 else f"{v:.2e}"


def settings_table(ctx: Context) -> list[dict]:
    """The settings as rows (name, value), for ``settings.csv``."""
    return [{"setting": k, "value": json.dumps(v)} for k, v in asdict(ctx.settings).items()] + [
        {"setting": "data", "value": ctx.data_source}, {"setting": "seed", "value": str(SEED)},
        {"setting": "torch_threads", "value": str(torch.get_num_threads())},
    ]


def data_dir_from(arg: str | None) -> Path | None:
    """--data, else $OPENBOX_DATA_DIR, else ../shared/datasets/fashion-mnist if present."""
    for candidate in (arg, os.environ.get(fdata.DATA_DIR_ENV),
                      str(ROOT.parent / "shared" / "datasets" / "fashion-mnist")):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


Study = Callable[[Context], None]


def accuracy(model, dataset: fdata.Dataset) -> float:
    return float(evaluate(model, dataset))
