"""Regenerate every table and figure of ``paper/`` and the paper itself.

    python -m experiments [--quick] [--out paper] [--cache experiments/.cache]
                          [--data DIR] [--only plnn,cnn,...] [--no-progress]

Seeded and deterministic: two runs on one machine write byte-identical CSV tables, except
the ``*-timing.csv`` ones. ``--quick`` runs the same pipeline on tiny settings (CI runs it;
without a data folder it uses the packaged test sample). Trained checkpoints are cached
(see :mod:`experiments.common`). The full run needs Fashion-MNIST (``--data``,
``$OPENBOX_DATA_DIR`` or ``../shared/datasets/fashion-mnist``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from experiments.common import (
    DEFAULT_CACHE,
    DEFAULT_OUT,
    FULL,
    QUICK,
    Context,
    data_dir_from,
    settings_table,
)

STUDIES = {
    "plnn": "experiments.plnn_study",     # the OpenBox paper's setting (binary tasks, PLNN)
    "cnn": "experiments.cnn_study",       # every explainer x measure on the reference CNN
    "arch": "experiments.architecture_study",  # which CNNs are interpretable (issue 13)
}
"""Study name -> module with ``run(ctx)``, in run order; the paper is written last."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke run)")
    p.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="trained-checkpoint cache")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder")
    p.add_argument("--only", default=None, help="comma-separated studies (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--paper-only", action="store_true",
                   help="only rewrite paper.md from the tables already in --out")
    args = p.parse_args(argv)
    settings = QUICK if args.quick else FULL
    out = Path(args.out) if args.out else DEFAULT_OUT
    names = list(STUDIES) if args.only is None else args.only.split(",")
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        p.error(f"unknown study {unknown}; the studies are {', '.join(STUDIES)}")
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(settings, out, Path(args.cache), data_dir_from(args.data),
                  progress=not args.no_progress)
    torch.manual_seed(0)
    started = time.perf_counter()
    ctx.log(f"{settings.name} run on {ctx.data_source}, {torch.get_num_threads()} threads, "
            f"writing to {out}")
    if args.paper_only:
        from experiments import paper

        ctx.log(f"wrote {paper.write(ctx)}")
        return 0
    ctx.table("settings", settings_table(ctx), caption="Settings of this run.")
    for name in names:
        t = time.perf_counter()
        ctx.log(f"study {name} ...")
        importlib.import_module(STUDIES[name]).run(ctx)
        ctx.log(f"study {name} done in {time.perf_counter() - t:.0f} s")
    from experiments import paper

    paper.write(ctx)
    ctx.log(f"wrote {len(ctx.written)} files in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
