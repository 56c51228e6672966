"""Benchmark of the openbox core on the reference CNN and real Fashion-MNIST test images.

Prints, measured side by side in one run (these machines are noisy, so read the
ratios, not the absolute figures):

1. LLC throughput of ``OpenBox.explain`` vs the faster of two autograd baselines on
   the same model and dtype: ``torch.func.vmap(jacrev)`` and batched autograd with
   one-hot ``grad_outputs`` (C backward passes). Target ratio >= 1.0.
2. Full polytope (A, d) time for one input vs one forward pass of n + 1 = 785 images
   through the model (the floor). Target <= 1.5x.
3. Certified-radius throughput (images/s) and peak memory, measured in a fresh
   process, against the memory the full polytope of one image takes: on real images
   (on facets: radius 0 without a push) and on jittered ones inside their regions.

Usage:
    python experiments/bench_core.py --data ../shared/datasets/fashion-mnist [--n 1000]
        [--checkpoint ckpt.pt] [--dtype float32] [--threads 2]

Without --checkpoint the reference CNN (16/32 channels) is trained for one epoch
(seed 0) and cached under runs/bench-cnn.pt.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

import openbox
from openbox.fmnist.checkpoints import load_checkpoint, save_checkpoint
from openbox.fmnist.data import load_fashion_mnist
from openbox.fmnist.models import INPUT_SHAPE, build_model
from openbox.fmnist.training import train

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def reference_model(args) -> torch.nn.Module:
    if args.checkpoint:
        return load_checkpoint(args.checkpoint)[0]
    path = ROOT / "runs" / "bench-cnn.pt"
    if path.exists():
        return load_checkpoint(path)[0]
    print("training the reference CNN (16/32 channels) for one epoch, seed 0 ...")
    model = build_model("cnn", seed=0)
    result = train(model, load_fashion_mnist("train", args.data),
                   load_fashion_mnist("test", args.data), epochs=1, seed=0, progress=False)
    print(f"  test accuracy {result.final_test_accuracy:.4f} in {result.total_seconds:.0f} s")
    path.parent.mkdir(exist_ok=True)
    save_checkpoint(path, model, arch="cnn", num_classes=10,
                    metadata={"epochs": 1, "seed": 0, "purpose": "bench_core"})
    return model


def best_of(fn, repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def vmap_jacrev(model, x):
    return torch.func.vmap(torch.func.jacrev(lambda z: model(z[None])[0]))(x)


def batched_autograd(model, x, batch: int):
    out = []
    for i in range(0, len(x), batch):
        xi = x[i : i + batch].clone().requires_grad_(True)
        y = model(xi)
        c = y.shape[1]
        onehot = torch.eye(c, dtype=y.dtype).unsqueeze(1).expand(c, len(xi), c)
        (g,) = torch.autograd.grad(y, xi, onehot, is_grads_batched=True)
        out.append(g.transpose(0, 1))
    return torch.cat(out)


def check_weights(model, ob, x, e, batch):
    """W_openbox against autograd for every image: at x itself off facets; on a facet at
    x + t u (u the tie-break direction), whose region is the tie-broken one at x, for the
    largest t in 1e-3 .. 1e-8 that lands off every facet with the same key."""
    err = torch.zeros(len(x), dtype=torch.float64)
    checked = torch.zeros(len(x), dtype=torch.bool)
    inside = ~e.on_boundary
    if bool(inside.any()):
        err[inside] = (batched_autograd(model, x[inside], batch) - e.weight[inside]).abs() \
            .flatten(1).amax(1).double()
        checked |= inside
    todo = (~checked).nonzero().flatten()
    # x + t u leaves [0, 1] where pixels are 0: look there without the domain (same program,
    # direction and key context)
    free = openbox.OpenBox(model, INPUT_SHAPE, dtype=ob.dtype, direction=ob.direction)
    for t in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8):
        if todo.numel() == 0:
            break
        xt = x[todo] + t * ob.direction
        et = free.explain(xt)
        same = torch.tensor([a == e.region_key[int(i)] for a, i in zip(et.region_key, todo)])
        ok = same & ~et.on_boundary
        if bool(ok.any()):
            hit = todo[ok]
            w = batched_autograd(model, xt[ok], batch)
            err[hit] = (w - e.weight[hit]).abs().flatten(1).amax(1).double()
            checked[hit] = True
        todo = (~checked).nonzero().flatten()
    print(f"  check: max |W_openbox - W_autograd| = {float(err[checked].max()):.2e} on "
          f"{int(checked.sum())}/{len(x)} images ({int(inside.sum())} at x, the others at "
          f"x + t u); {len(x) - int(checked.sum())} could not be checked")
    if not bool(checked.all()):
        print(f"  UNCHECKED images: {(~checked).nonzero().flatten().tolist()[:20]}")


def llc_section(model, ob, x, batch, repeats):
    n = len(x)
    t_ob = best_of(lambda: ob.explain(x), repeats)
    t_vj = best_of(lambda: torch.cat([vmap_jacrev(model, x[i : i + batch])
                                      for i in range(0, n, batch)]), repeats)
    t_bw = best_of(lambda: batched_autograd(model, x, batch), repeats)
    with torch.no_grad():
        t_fw = best_of(lambda: model(x), repeats)
    e = ob.explain(x)
    check_weights(model, ob, x, e, batch)
    best = min(t_vj, t_bw)
    print(f"  model forward        {n / t_fw:10.0f} images/s")
    print(f"  vmap(jacrev)         {n / t_vj:10.0f} images/s")
    print(f"  autograd, C passes   {n / t_bw:10.0f} images/s")
    print(f"  OpenBox.explain      {n / t_ob:10.0f} images/s   (exact, tie-broken, with keys)")
    print(f"  ratio explain / faster baseline = {best / t_ob:.2f}  (target >= 1.0)")
    print(f"  images on a facet: {int(e.on_boundary.sum())}/{n}, "
          f"median tight facets {int(e.n_tight.median())}")
    return best / t_ob


def polytope_section(model, ob, x, n_images, repeats):
    floor_in = torch.rand((785, *INPUT_SHAPE), dtype=x.dtype)
    with torch.no_grad():
        t_floor = best_of(lambda: model(floor_in), repeats)
    ratios, times = [], []
    poly = None
    for i in range(n_images):
        t = best_of(lambda i=i: ob.polytope(x[i]), repeats)
        times.append(t)
        ratios.append(t / t_floor)
        poly = ob.polytope(x[i])
    mib = poly.nbytes / 2**20
    print(f"  one forward of 785 images (floor)   {1e3 * t_floor:8.1f} ms")
    print(f"  full polytope of one image          {1e3 * statistics.median(times):8.1f} ms "
          f"(median of {n_images} images)")
    print(f"  ratio polytope / floor = {statistics.median(ratios):.2f}  (target <= 1.5)")
    print(f"  constraints: {poly.n_constraints} rows x {poly.dim} ({mib:.0f} MiB), "
          f"tight at x: {len(poly.tight_rows())}")
    return statistics.median(ratios), mib


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the process's peak RSS (Linux: clear_refs 5) and return the current RSS, KiB."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def _peak_rss() -> int:
    """Peak RSS since the last reset, KiB."""
    return _status_kib("VmHWM")


def _radius_child(args, queue):
    torch.set_num_threads(args.threads)
    model = reference_model(args)
    dtype = DTYPES[args.dtype]
    x = load_fashion_mnist("test", args.data).images[: args.radius_n].to(dtype)
    ob = openbox.OpenBox(model, INPUT_SHAPE, dtype=dtype, domain=(0.0, 1.0))
    # Real images sit on facets (radius 0 at once). Jittered copies (+U(0, 1e-2) per pixel)
    # are inside their regions and cost one basis push each: time those, and the memory.
    g = torch.Generator().manual_seed(0)
    jitter = x[: args.jitter_n] + 1e-2 * torch.rand(x[: args.jitter_n].shape, generator=g,
                                                     dtype=dtype)
    jitter = jitter.clamp(max=1.0)  # stay in the declared domain [0, 1]
    base = _reset_peak_rss()
    ob.certified_radius(jitter[:1])  # warm-up
    t1 = time.perf_counter()
    rj = ob.certified_radius(jitter, norm=2)
    dt_in = (time.perf_counter() - t1) / len(jitter)
    peak = _peak_rss()
    t0 = time.perf_counter()
    r = ob.certified_radius(x, norm=2)
    dt = time.perf_counter() - t0
    queue.put((dt, (peak - base) / 1024, int((r == 0).sum()), len(x), dt_in,
               int((rj > 0).sum()), len(jitter), float(rj.median())))


def radius_section(args, polytope_mib):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_radius_child, args=(args, queue))
    p.start()
    dt, extra_mib, zero, n, dt_in, inside, n_j, r_med = queue.get()
    p.join()
    print(f"  real images: {n / dt:.0f} images/s ({zero}/{n} on a facet: radius 0, no push)")
    print(f"  jittered images inside their regions ({inside}/{n_j}): {1 / dt_in:.2f} images/s "
          f"(median L2 radius {r_med:.2e})")
    print(f"  peak memory growth {extra_mib:.0f} MiB while certifying them, vs "
          f"{polytope_mib:.0f} MiB for one polytope's A")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="Fashion-MNIST folder (or OPENBOX_DATA_DIR)")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--n", type=int, default=1000, help="test images for the LLC benchmark")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--batch", type=int, default=256, help="images per batch, all methods")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--polytopes", type=int, default=5, help="images for the polytope timing")
    ap.add_argument("--radius-n", type=int, default=100)
    ap.add_argument("--jitter-n", type=int, default=8, help="off-facet images for the radius")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    model = reference_model(args).to(dtype).eval()
    x = load_fashion_mnist("test", args.data).images[: args.n].to(dtype)
    ob = openbox.OpenBox(model, INPUT_SHAPE, dtype=dtype, domain=(0.0, 1.0),
                         batch_size=args.batch)
    print(f"reference CNN on {len(x)} Fashion-MNIST test images, {args.dtype}, "
          f"{args.threads} threads, torch {torch.__version__}")
    print("1. local linear classifiers")
    llc_section(model, ob, x, args.batch, args.repeats)
    print("2. full polytope (A, d)")
    _, mib = polytope_section(model, ob, x, args.polytopes, args.repeats)
    print("3. certified radius")
    radius_section(args, mib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
