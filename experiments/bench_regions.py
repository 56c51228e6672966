"""Benchmark the region walks, measured side by side in one run (the machine is noisy: read
the ratios).

1. segment: pieces/s of the batched walk against the sequential walk on the same pairs of
   test images (and that both give the same pieces).
2. plane: regions/s of the exact 2-D slice map through a test image.
3. exact integrated gradients against Captum's IntegratedGradients: Captum's max relative
   error against the exact attribution and its time at 50, 200, 1,000 and 4,000 steps
   (riemann_trapezoid and gausslegendre), and the exact IG's time.

    python experiments/bench_regions.py [--checkpoint CKPT] [--data DIR] [--pairs 3]

Without a checkpoint the packaged demo CNN (8/16 channels) is used; pass a 16/32-channel
reference CNN checkpoint (``openbox train --model cnn``) for the issue's setting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import openbox
from openbox.fmnist import INPUT_SHAPE, load_checkpoint, load_demo_model, load_fashion_mnist
from openbox.fmnist.data import load_sample


def timed(fn, repeats=1):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def segment_section(ob, images, pairs, walkers, repeats):
    print("1. segment between test images 2i and 2i+1: the batched walk against the walk "
          "before the line pass (method='pointwise', one configuration pass of the point "
          f"per step); best of {repeats}")
    ratios = []
    for i in range(pairs):
        x0, x1 = images[2 * i], images[2 * i + 1]
        t_old, old = timed(lambda x0=x0, x1=x1: openbox.regions.segment(
            ob, x0, x1, method="pointwise", progress=False), repeats)
        t_bat, bat = timed(lambda x0=x0, x1=x1: openbox.regions.segment(
            ob, x0, x1, walkers=walkers, progress=False), repeats)
        same = [p.region_key for p in old] == [p.region_key for p in bat]
        gap = max(abs(a.t_end - b.t_end) for a, b in zip(old, bat)) if same else float("nan")
        ratios.append(t_old / t_bat)
        print(f"  pair {i}: {len(bat)} pieces (pointwise {len(old)}); pointwise "
              f"{len(old) / t_old:7.0f} pieces/s, batched ({walkers} walkers) "
              f"{len(bat) / t_bat:7.0f} pieces/s, ratio {t_old / t_bat:5.1f}x; same keys "
              f"{same}, max breakpoint gap {gap:.1e}")
    print(f"  ratio batched / pointwise: min {min(ratios):.1f}x, median "
          f"{statistics.median(ratios):.1f}x (target >= 7x)")


def plane_section(ob, images, extent, triples, repeats):
    print(f"2. plane through test image i spanned by the directions towards i+1 and i+2, "
          f"extent +-{extent:g}: after one warm-up map, min and median of {repeats} runs; "
          "against the same walk one region per pass (batch=1, starts=1), run once")
    rates = []
    for k in range(triples):
        x0, x1, x2 = images[3 * k], images[3 * k + 1], images[3 * k + 2]
        ext = (-extent, extent, -extent, extent)

        def run(**kw):
            return openbox.regions.plane(ob, x0, x1 - x0, x2 - x0, ext, progress=False, **kw)

        run()  # warm-up: lazy imports, caches, first kernel calls
        times = []
        for _ in range(repeats):
            t, pm = timed(run)
            times.append(t)
        t_one, one = timed(lambda: run(batch=1, starts=1))
        same = {p.region_key for p in one.polygons} == {p.region_key for p in pm.polygons}
        best, mid = min(times), statistics.median(times)
        rates.append(len(pm) / mid)
        print(f"  images {3 * k}-{3 * k + 2}: {len(pm)} regions, coverage {pm.coverage:.15f}, "
              f"{best:.2f} s min, {mid:.2f} s median: {len(pm) / best:.0f} regions/s max, "
              f"{len(pm) / mid:.0f} median; one region per pass {len(one) / t_one:.0f} "
              f"regions/s ({t_one / mid:.1f}x slower), same regions {same}")
    print(f"  regions/s (medians): min {min(rates):.0f}, median {statistics.median(rates):.0f} "
          "(target >= 1,000)")


def ig_section(ob, model, x, steps_list):
    from captum.attr import IntegratedGradients

    print("3. integrated gradients of one test image, zero baseline, predicted class")
    with torch.no_grad():
        target = int(ob.program(x.to(ob.dtype)).argmax())
    t_exact, (exact, pieces) = timed(lambda: openbox.regions.integrated_gradients(
        ob, x, None, target, progress=False, return_pieces=True))
    ref = model.double()
    with torch.no_grad():
        gap = float(ref(x.double())[0, target] - ref(torch.zeros_like(x).double())[0, target])
    print(f"  exact IG: {int(pieces[0])} pieces, {t_exact:.2f} s, completeness error "
          f"{abs(float(exact.sum()) - gap):.1e}")
    ig = IntegratedGradients(ref)
    scale = float(exact.abs().max())
    rows = []
    for method in ("riemann_trapezoid", "gausslegendre"):
        for steps in steps_list:
            t, approx = timed(lambda s=steps, m=method: ig.attribute(
                x.double(), target=target, n_steps=s, method=m, internal_batch_size=500))
            err = float((approx - exact).abs().max()) / scale
            rows.append((method, steps, err, t))
            print(f"  captum {method:17s} {steps:5d} steps: max rel error {err:.1e}, "
                  f"{t:6.2f} s ({t / t_exact:5.2f}x the exact IG's time)")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="default: the packaged demo CNN")
    ap.add_argument("--data", default=None, help="Fashion-MNIST folder (default: the sample)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1, help="segment timings: best of N")
    ap.add_argument("--walkers", type=int, default=openbox.regions.segment.__kwdefaults__[
        "walkers"])
    ap.add_argument("--steps", type=int, nargs="+", default=[50, 200, 1000, 4000])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--skip-ig", action="store_true")
    ap.add_argument("--plane-extent", type=float, default=0.004)
    ap.add_argument("--planes", type=int, default=2)
    ap.add_argument("--plane-repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, info = load_checkpoint(args.checkpoint) if args.checkpoint else load_demo_model()
    images = (load_fashion_mnist("test", args.data).images if args.data
              else load_sample().images)
    ob = openbox.OpenBox(model, INPUT_SHAPE, dtype=torch.float64, domain=(0.0, 1.0))
    print(f"{info.arch} {info.arch_kwargs}, float64, {args.threads} threads, "
          f"torch {torch.__version__}")
    if args.pairs:
        segment_section(ob, images, args.pairs, args.walkers, args.repeats)
    if args.planes:
        plane_section(ob, images, args.plane_extent, args.planes, args.plane_repeats)
    if not args.skip_ig:
        ig_section(ob, model, images[:1], args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
