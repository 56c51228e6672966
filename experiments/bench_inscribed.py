"""Benchmark the region's inscribed (Chebyshev) radius against building the region.

For each of a few packaged sample images: the polytope build (``OpenBox.polytope``), the
inscribed radius by the old method (``method="clarabel"``, row generation seeded by the
nearest rows) and by the new default (``method="sparse"``: the whole LP as one sparse
matrix, QDLDL), wall time and the process's user / system CPU time of each
(``resource.getrusage``), min and median over repeats, the ratios new/build and old/new and
the relative radius difference. Printed as a Markdown table.

"old" runs Clarabel as it ran before this change (its own default ``max_threads=0``, one
faer thread per core, which spin when the cores are shared: most of its time was system
CPU); "old 1t" is the same method with the project's new one-thread setting.

    python experiments/bench_inscribed.py [--images 0 1 2] [--repeats 3] [--no-old]
        [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from openbox import OpenBox
from openbox.fmnist import load_demo_model, load_sample
from openbox.geometry import lp


def _timed(fn):
    """(value, wall s, user s, system s) of fn()."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    value = fn()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return value, wall, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime


def _inscribed(ob, x, method, threads=None):
    poly = ob.polytope(x)  # a fresh polytope: radii are cached per object
    saved = dict(lp._CLARABEL_SETTINGS)
    if threads is not None:
        lp._CLARABEL_SETTINGS["max_threads"] = threads
    try:
        return _timed(lambda: poly.inscribed_radius(method=method))
    finally:
        lp._CLARABEL_SETTINGS.clear()
        lp._CLARABEL_SETTINGS.update(saved)


def _mm(values) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-old", action="store_true", help="skip the old methods (slow)")
    ap.add_argument("--checkpoint", help="a checkpoint (openbox.fmnist) instead of the demo CNN")
    args = ap.parse_args()
    if args.checkpoint:
        from openbox.fmnist.checkpoints import load_checkpoint

        model, _ = load_checkpoint(args.checkpoint)
    else:
        model, _ = load_demo_model()
    ob = OpenBox(model, (1, 28, 28), dtype=torch.float64, domain=(0.0, 1.0))
    images = load_sample().images
    methods = [("new", "sparse", None)]
    if not args.no_old:
        methods += [("old", "clarabel", 0), ("old 1t", "clarabel", None)]
    print(f"torch threads {torch.get_num_threads()}; wall, user, sys: min / median over "
          f"{args.repeats} repeats (s)\n")
    head = ["image", "rows", "build wall", "build user", "build sys"]
    for name, _, _ in methods:
        head += [f"{name} wall", f"{name} user", f"{name} sys"]
    head += ["new/build", "old/new", "old 1t/new", "rel diff old", "radius"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for i in args.images:
        x = images[i : i + 1].double()
        build = [_timed(lambda x=x: ob.polytope(x)) for _ in range(args.repeats)]
        rows = build[0][0].n_constraints
        runs = {name: [_inscribed(ob, x, method, thr) for _ in range(args.repeats)]
                for name, method, thr in methods}
        cells = [str(i), str(rows)] + [_mm([b[k] for b in build]) for k in (1, 2, 3)]
        for name, _, _ in methods:
            cells += [_mm([t[k] for t in runs[name]]) for k in (1, 2, 3)]
        med = {name: statistics.median(t[1] for t in runs[name]) for name in runs}
        build_med = statistics.median(b[1] for b in build)
        r_new = runs["new"][0][0]
        cells.append(f"{med['new'] / build_med:.1f}")
        if "old" in runs:
            r_old = runs["old"][0][0]
            cells += [f"{med['old'] / med['new']:.1f}", f"{med['old 1t'] / med['new']:.1f}",
                      f"{abs(r_new - r_old) / abs(r_old):.1e}"]
        else:
            cells += ["-", "-", "-"]
        cells.append(f"{r_new:.10g}")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
