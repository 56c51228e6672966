"""Benchmark the region census, measured side by side in one run (the machine is noisy:
read the ratios).

For each data set: images/s of the model's own forward (float64, the OpenBox's reference
copy, and float32, the model as loaded), of the bare configuration pass
(``ob.configure`` per batch, one at a time) and of :func:`openbox.regions.census`
(with its nearest-neighbour statistics on up to 2,000 inputs, without them, and one
batch at a time, ``workers=1``: by default it configures batches side by side), the best
and the median of the repeats, by the wall clock and by the process's CPU time (which
other processes on a shared machine disturb less); the ratio census / forward of the
best (target >= 0.3), the census's own overhead over the bare pass, the number of
regions, and the peak RSS growth during the census. Every figure of a table is at the
same batch size (``--batch``). Last, the configure pass with the first max-pool decided by
table (``openbox.configuration.POOL_TABLE``) against the rule on every window, batch by
batch interleaved.

First, on the packaged sample, a scan of batch sizes (``--batches``): forward float64,
configure pass and census (no neighbours) at each, then the census at its best batch size
against the forward at *its own* best batch size, as well as at the same one.

    python experiments/bench_census.py [--data DIR] [--train] [--repeats 3] [--batch 64]

Data: the 1,000 packaged sample images always; the 10,000 test images when ``--data``
or ``$OPENBOX_DATA_DIR`` names a Fashion-MNIST folder; with ``--train`` also the 60,000
training images (one census run, to show that memory stays bounded).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

import openbox
from openbox.fmnist import DATA_DIR_ENV, INPUT_SHAPE, load_demo_model, load_fashion_mnist
from openbox.fmnist.data import load_sample
from openbox.regions.census import (
    CENSUS_BATCH,
    CENSUS_WORKERS,
    DIGEST_BYTES,
    census,
    default_workers,
)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux: clear_refs 5); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_kb() -> int:
    hwm = _status_kb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_kb() -> int:
    rss = _status_kb("VmRSS")
    return rss if rss is not None else peak_kb()


class Clock:
    """Wall-clock and process CPU seconds of a block (``with Clock() as c: ...; c.wall``)."""

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def forward_time(model, x, dtype, batch) -> Clock:
    with torch.no_grad(), Clock() as c:
        for i in range(0, x.shape[0], batch):
            model(x[i : i + batch].to(dtype))
    return c


def configure_time(ob, x, batch) -> Clock:
    with Clock() as c:
        for i in range(0, x.shape[0], batch):
            ob.configure(ob.check_input(x[i : i + batch]))
    return c


def table_ab(ob, x, batch) -> tuple[float, float]:
    """(images/s with max-pool tables, without) of the configure pass, batch by batch
    interleaved (both see the machine in the same state; the order alternates)."""
    from openbox import configuration as cf

    before = cf.POOL_TABLE
    spent = {True: 0.0, False: 0.0}
    try:
        for flag in (True, True, False):  # the table built, both paths warm
            cf.POOL_TABLE = flag
            ob.configure(ob.check_input(x[:batch]))
        for j, i in enumerate(range(0, x.shape[0], batch)):
            xb = ob.check_input(x[i : i + batch])
            for flag in ((True, False) if j % 2 else (False, True)):
                cf.POOL_TABLE = flag
                t = time.perf_counter()
                ob.configure(xb)
                spent[flag] += time.perf_counter() - t
    finally:
        cf.POOL_TABLE = before
    return x.shape[0] / spent[True], x.shape[0] / spent[False]


def census_run(ob, x, y, batch, neighbours_n=2000, workers=None):
    """(Clock, census, peak RSS growth in MB or None)."""
    exact = reset_peak()
    base = rss_kb() if exact else peak_kb()
    with Clock() as t:
        c = census(ob, x, y, batch_size=batch, progress=False, neighbours_n=neighbours_n,
                   workers=workers)
    growth = (peak_kb() - base) / 1024
    return t, c, growth if exact or growth > 0 else None


def rates(n, clocks, what):
    """(best, median) images/s of the repeats by ``what`` ("wall" or "cpu")."""
    ts = [getattr(c, what) for c in clocks]
    return n / min(ts), n / statistics.median(ts)


def scan_batches(model, ob, x, y, sizes, repeats):
    """Forward float64, configure pass and census (no neighbours) at each batch size,
    interleaved; prints the table and returns {size: (forward, configure, census)} best
    images/s by the wall clock and by CPU time."""
    n = x.shape[0]
    print(f"\n== batch sizes, packaged sample ({n:,} images, census without neighbours; "
          f"best of {repeats})")
    for b in sizes:  # warm-up
        forward_time(ob.reference, x[:b], ob.dtype, b)
        configure_time(ob, x[:b], b)
    runs = {b: ([], [], []) for b in sizes}
    for _ in range(repeats):
        for b in sizes:
            f, c, s = runs[b]
            f.append(forward_time(ob.reference, x, ob.dtype, b))
            c.append(configure_time(ob, x, b))
            s.append(census_run(ob, x, y, b, neighbours_n=0)[0])
    best = {}
    print("  batch | wall: forward64 configure census  census/fwd | cpu: forward64 configure "
          "census  census/fwd")
    for b in sizes:
        w = [rates(n, r, "wall")[0] for r in runs[b]]
        c = [rates(n, r, "cpu")[0] for r in runs[b]]
        best[b] = (w, c)
        print(f"  {b:5d} | {w[0]:15.0f} {w[1]:9.0f} {w[2]:6.0f} {w[2] / w[0]:11.3f} | "
              f"{c[0]:14.0f} {c[1]:9.0f} {c[2]:6.0f} {c[2] / c[0]:11.3f}")
    for what, k in (("wall", 0), ("cpu", 1)):
        fb = max(sizes, key=lambda b: best[b][k][0])
        cb = max(sizes, key=lambda b: best[b][k][2])
        print(f"  {what}: census best at batch {cb} ({best[cb][k][2]:.0f}/s), forward float64 "
              f"best at batch {fb} ({best[fb][k][0]:.0f}/s): census(best) / forward(best) "
              f"{best[cb][k][2] / best[fb][k][0]:.3f}; at the same batch {cb}: "
              f"{best[cb][k][2] / best[cb][k][0]:.3f}")
    return best


def bench(name, model, ob, x, y, repeats, batch, forward_batch=None):
    """The table at one batch size; with ``forward_batch`` (the forward's own best batch
    size in the scan) also the forward float64 at that size, and the census against it."""
    n = x.shape[0]
    workers = CENSUS_WORKERS or default_workers(ob)
    print(f"\n== {name}: {n:,} images, batches of {batch}, {torch.get_num_threads()} threads, "
          f"the census {workers} batches at once")
    m32 = model.float().eval()
    forward_time(ob.reference, x[:batch], ob.dtype, batch)  # warm-up
    census(ob, x[: 2 * batch], y[: 2 * batch], batch_size=batch, progress=False)
    t64, t32, tcfg, tc, tc0, tc1, tbest = [], [], [], [], [], [], []
    c, growth = None, None
    for r in range(repeats):  # interleaved, best of each
        if forward_batch is not None and forward_batch != batch:
            tbest.append(forward_time(ob.reference, x, ob.dtype, forward_batch))
        t64.append(forward_time(ob.reference, x, ob.dtype, batch))
        t32.append(forward_time(m32, x, torch.float32, batch))
        tcfg.append(configure_time(ob, x, batch))
        elapsed, c_r, g = census_run(ob, x, y, batch)
        tc.append(elapsed)
        tc0.append(census_run(ob, x, y, batch, neighbours_n=0)[0])
        tc1.append(census_run(ob, x, y, batch, workers=1)[0])
        if r == 0:
            c, growth = c_r, g
    print("  images/s                          wall best median | cpu best median")
    names = ["forward float64 (reference copy)", "forward float32 (model)         ",
             "configure pass (float64)        ", "census (float64)                ",
             "census without neighbours       ", "census, one batch at a time     "]
    figures = {}
    for name, clocks in zip(names, (t64, t32, tcfg, tc, tc0, tc1)):
        w, cpu = rates(n, clocks, "wall"), rates(n, clocks, "cpu")
        figures[name.strip()] = (w[0], cpu[0])
        print(f"  {name} {w[0]:9.0f} {w[1]:6.0f} | {cpu[0]:8.0f} {cpu[1]:6.0f}")
    if tbest:
        w, cpu = rates(n, tbest, "wall"), rates(n, tbest, "cpu")
        fb = f"forward float64, batch {forward_batch}"
        print(f"  {fb:32s} {w[0]:9.0f} {w[1]:6.0f} | {cpu[0]:8.0f} {cpu[1]:6.0f}")
        best64 = (w[0], cpu[0])
    for what, k in (("wall", 0), ("cpu", 1)):
        f64, f32, fcfg, fc, fc0, fc1 = (v[k] for v in figures.values())
        print(f"  {what}: census / forward float64: {fc / f64:.3f} (target >= 0.3)"
              + (f", / forward float64 at its best batch {forward_batch}: "
                 f"{fc / best64[k]:.3f}" if tbest else "")
              + f"; census / forward float32: {fc / f32:.3f}; census / configure pass: "
              f"{fc / fcfg:.3f} (without neighbours {fc0 / fcfg:.3f}); {workers} batches at "
              f"once / one at a time: {fc / fc1:.2f} (one at a time / forward float64: "
              f"{fc1 / f64:.3f})")
    with_t, without = table_ab(ob, x, batch)
    print(f"  configure pass with max-pool tables {with_t:.0f}/s, without (the rule on every "
          f"window) {without:.0f}/s, batch by batch interleaved: {with_t / without:.2f}x")
    stored = c.digests.nbytes + c.layer_digests.nbytes + c.n_tight.nbytes + \
        c.predictions.nbytes + (0 if c.labels is None else c.labels.nbytes)
    print(f"  {c.summary()}")
    print(f"  stored per input: {stored / n:.0f} bytes ({DIGEST_BYTES}-byte digests of "
          f"{len(c.layers) + 1} keys, facets, prediction, label); peak RSS growth during the "
          f"census: {'n/a' if growth is None else f'{growth:.1f} MB'}")
    print("\n" + c.layer_table())
    print("\n" + c.to_markdown(top=5))
    return c


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: "
                   f"${DATA_DIR_ENV} if set)")
    p.add_argument("--train", action="store_true", help="also census the 60,000 training "
                   "images (one run)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=None, help="batch size of the tables "
                   "(default: the census's own default, "
                   f"{CENSUS_BATCH or 'the OpenBox batch_size'})")
    p.add_argument("--batches", default="16,32,64,128,256", help="batch sizes to scan on "
                   "the packaged sample (comma-separated; empty: no scan)")
    args = p.parse_args(argv)

    model, info = load_demo_model()
    ob = openbox.OpenBox(model, INPUT_SHAPE, dtype=torch.float64)
    batch = args.batch or CENSUS_BATCH or ob.batch_size
    print(f"demo CNN: {ob}")
    ds = load_sample()
    sizes = [int(b) for b in args.batches.split(",") if b.strip()]
    fwd_best = None
    if sizes:
        scan = scan_batches(model, ob, ds.images, ds.labels, sizes, args.repeats)
        fwd_best = max(sizes, key=lambda b: scan[b][0][0])  # by the wall clock
    bench("packaged sample", model, ob, ds.images, ds.labels, args.repeats, batch, fwd_best)
    data_dir = args.data or os.environ.get(DATA_DIR_ENV)
    if data_dir:
        test = load_fashion_mnist("test", data_dir, progress=False)
        bench(f"test split ({data_dir})", model, ob, test.images, test.labels,
              max(1, args.repeats - 1), batch, fwd_best)
        if args.train:
            train = load_fashion_mnist("train", data_dir, progress=False)
            print(f"\n== train split: {len(train):,} images, one census run")
            elapsed, c, growth = census_run(ob, train.images, train.labels, batch)
            print(f"  census {len(train) / elapsed.wall:.0f} images/s (cpu "
                  f"{len(train) / elapsed.cpu:.0f}); {c.summary()}; peak RSS "
                  f"growth {'n/a' if growth is None else f'{growth:.1f} MB'}")
            print("\n" + c.layer_table())
    else:
        print(f"\n(no data folder: pass --data DIR or set ${DATA_DIR_ENV} for the 10,000 "
              "test images)")


if __name__ == "__main__":
    main()
