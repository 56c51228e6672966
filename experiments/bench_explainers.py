"""Seconds per explanation of every method of :mod:`openbox.explainers`, in one run, with
openbox's own time as the unit (the cost column of the comparison).

    python experiments/bench_explainers.py [--checkpoint CKPT] [--n 8] [--repeats 3]
                                           [--methods a,b,...] [--threads T]

Model: the packaged demo CNN (conv-BN-ReLU-maxpool x2 + linear) unless ``--checkpoint``
names another. Images: the first ``--n`` of the packaged test sample, explained for their
predicted class. Every method runs ``--repeats`` times on the same batch (batched methods in
one call, LIME / KernelSHAP one input at a time, as the library allows), after one untimed
warm-up call; the table gives the min and median seconds per explanation and the ratio of
the min to openbox's min. The machine is noisy (2 cores): run alone and read the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from openbox import explainers
from openbox.fmnist import INPUT_SHAPE, load_demo_model
from openbox.fmnist.data import load_sample
from openbox.loading import load_checkpoint_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="a checkpoint (default: the demo CNN)")
    p.add_argument("--n", type=int, default=8, help="images per call")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method")
    p.add_argument("--methods", default="all", help="comma-separated names, or all")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        loaded = load_checkpoint_model(args.checkpoint)
        model, what = loaded.model, loaded.description
    else:
        model, info = load_demo_model()
        what = f"the demo CNN ({info.arch}, {dict(info.arch_kwargs)})"
    names = explainers.names() if args.methods == "all" else tuple(args.methods.split(","))
    x = load_sample().images[: args.n].float()
    with torch.no_grad():
        target = model(x).argmax(1)
    print(f"# seconds per explanation: {what}, {args.n} images, {args.repeats} repeats, "
          f"{torch.get_num_threads()} torch threads", flush=True)
    rows, skipped = [], []
    for name in names:
        try:
            ex = explainers.get(name, model, input_shape=INPUT_SHAPE, progress=False)
        except explainers.UnsupportedModelError as err:   # e.g. cam without a GAP head
            skipped.append((name, str(err).split(";")[0]))
            print(f"  {name:<24} not applicable: {skipped[-1][1]}", file=sys.stderr, flush=True)
            continue
        ex.explain(x[:1], target[:1])                     # warm-up (imports, caches)
        times = []
        for r in range(args.repeats):
            start = time.perf_counter()
            ex.explain(x, target, seed=r)
            times.append((time.perf_counter() - start) / args.n)
        rows.append((name, min(times), statistics.median(times), ex.batched))
        print(f"  {name:<24} min {min(times):9.4f} s   median {statistics.median(times):9.4f} s",
              file=sys.stderr, flush=True)
    unit = dict((r[0], r[1]) for r in rows).get("openbox")
    print("\n| method | batched | min s / explanation | median s / explanation | min / openbox |")
    print("|---|---|---:|---:|---:|")
    for name, lo, med, batched in rows:
        ratio = f"{lo / unit:.2f}" if unit else "n/a"
        print(f"| {name} | {'yes' if batched else 'no'} | {lo:.4f} | {med:.4f} | {ratio} |")
    for name, why in skipped:
        print(f"| {name} | | not applicable: {why} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
