"""Benchmark openbox.regions.counterfactual on the packaged demo CNN: seconds per image,
L2 and L-inf, the nearest change of class (target=None), over a few test images of the
packaged sample (the first of each demo class), in float64 with the pixel domain [0, 1].

For each image and norm it prints the distance found in x's own region alone
(``max_regions=1``: one program per class there, or none when no class is reachable
inside it) beside the local search's, whether the result is the region-exact minimum
(``exact_in_region``: the optimum sits on no facet of its region), whether the model's
own forward confirms it, the regions used, and the seconds spent. The machine is noisy:
read the seconds as an order of magnitude.

    python experiments/bench_counterfactual.py [--images 5] [--max-regions 50] [--norms 2,inf]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import openbox
from openbox.fmnist import INPUT_SHAPE, demo_indices, load_demo_model
from openbox.fmnist.data import load_sample
from openbox.regions.counterfactual import counterfactual


def run(ob, x, norm, max_regions):
    t = time.perf_counter()
    try:
        r = counterfactual(ob, x, norm=norm, max_regions=max_regions, progress=False)
    except RuntimeError:
        r = None
    return time.perf_counter() - t, r


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--max-regions", type=int, default=50)
    parser.add_argument("--norms", default="2,inf",
                        help="comma-separated norms to run, of 2 and inf (default: both)")
    args = parser.parse_args(argv)
    norms = [float(v) if v.strip() == "inf" else int(v) for v in args.norms.split(",")]
    if not norms or any(v not in (2, float("inf")) for v in norms):
        parser.error(f"--norms takes 2 and/or inf, got {args.norms!r}")

    model, info = load_demo_model()
    ds = load_sample()
    ob = openbox.OpenBox(model, INPUT_SHAPE, torch.float64, domain=(0.0, 1.0))
    index = demo_indices(ds.labels)[: args.images]
    print(f"demo CNN ({info.path.name}), {len(index)} test images of the packaged sample, "
          f"float64, domain [0, 1], target=None, max_regions={args.max_regions}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'image':>5} {'norm':>4} {'class':>7} {'own region':>10} {'search':>10} "
          f"{'ratio':>6} {'exact':>5} {'verif':>5} {'regions':>7} {'own s':>6} {'s':>6}")
    summary = {}
    for norm in norms:
        rows = []
        for i in index:
            x = ds.images[i]
            t_own, own = run(ob, x, norm, 1)
            t_all, r = run(ob, x, norm, args.max_regions)
            d_own = own.distance if own is not None else float("nan")
            if r is None:
                print(f"{i:>5} {norm:>4} {'-':>7} {d_own:10.5f} {'none':>10}")
                continue
            rows.append((t_all, r, d_own))
            print(f"{i:>5} {norm:>4} {r.source:>3}->{r.target:<3} {d_own:10.5f} "
                  f"{r.distance:10.5f} {r.distance / d_own:6.3f} {str(r.exact_in_region):>5} "
                  f"{str(r.verified):>5} {len(r.regions):>7} {t_own:6.1f} {t_all:6.1f}")
        summary[norm] = rows
    print("summary")
    for norm, rows in summary.items():
        if not rows:
            print(f"  norm {norm}: no counterfactual found")
            continue
        secs = [t for t, _, _ in rows]
        exact = sum(r.exact_in_region for _, r, _ in rows)
        verified = sum(r.verified for _, r, _ in rows)
        ratio = [r.distance / d for _, r, d in rows if d == d]
        ratio_text = f"{statistics.median(ratio):.3f}" if ratio else "n/a"
        print(f"  norm {norm}: {statistics.mean(secs):.1f} s per image (median "
              f"{statistics.median(secs):.1f}, max {max(secs):.1f}); region-exact minimum "
              f"{exact}/{len(rows)}; verified by the model {verified}/{len(rows)}; search / "
              f"own-region distance, median {ratio_text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
