"""Benchmark the region census, measured side by side in one run (the machine is noisy:
read the ratios).

For each data set: images/s of the model's own forward (float64, the OpenBox's reference
copy, and float32, the model as loaded), of the bare configuration pass
(``ob.configure`` per batch, the census's floor) and of :func:`openbox.regions.census`
(with its nearest-neighbour statistics on up to 2,000 inputs, and without), the best
and the median of the repeats; the ratio census / forward of the best (target >= 0.3),
the census's own overhead over the bare pass, the number of regions, and the peak RSS
growth during the census.

    python experiments/bench_census.py [--data DIR] [--train] [--repeats 3]

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
from openbox.regions.census import DIGEST_BYTES, census


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


def forward_time(model, x, dtype, batch):
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            model(x[i : i + batch].to(dtype))
    return time.perf_counter() - t


def configure_time(ob, x, batch):
    t = time.perf_counter()
    for i in range(0, x.shape[0], batch):
        ob.configure(ob.check_input(x[i : i + batch]))
    return time.perf_counter() - t


def census_run(ob, x, y, batch, neighbours_n=2000):
    """(seconds, census, peak RSS growth in MB or None)."""
    exact = reset_peak()
    base = rss_kb() if exact else peak_kb()
    t = time.perf_counter()
    c = census(ob, x, y, batch_size=batch, progress=False, neighbours_n=neighbours_n)
    elapsed = time.perf_counter() - t
    growth = (peak_kb() - base) / 1024
    return elapsed, c, growth if exact or growth > 0 else None


def bench(name, model, ob, x, y, repeats, batch):
    n = x.shape[0]
    print(f"\n== {name}: {n:,} images, batches of {batch}, {torch.get_num_threads()} threads")
    m32 = model.float().eval()
    forward_time(ob.reference, x[:batch], ob.dtype, batch)  # warm-up
    census(ob, x[: 2 * batch], y[: 2 * batch], batch_size=batch, progress=False)
    t64, t32, tcfg, tc, tc0 = [], [], [], [], []
    c, growth = None, None
    for r in range(repeats):  # interleaved, best of each
        t64.append(forward_time(ob.reference, x, ob.dtype, batch))
        t32.append(forward_time(m32, x, torch.float32, batch))
        tcfg.append(configure_time(ob, x, batch))
        elapsed, c_r, g = census_run(ob, x, y, batch)
        tc.append(elapsed)
        tc0.append(census_run(ob, x, y, batch, neighbours_n=0)[0])
        if r == 0:
            c, growth = c_r, g
    f64, f32, fcfg, fc, fc0 = (n / min(t) for t in (t64, t32, tcfg, tc, tc0))
    m64, m32_, mcfg, mc, mc0 = (n / statistics.median(t) for t in (t64, t32, tcfg, tc, tc0))
    print("  images/s                          best   median")
    print(f"  forward float64 (reference copy) {f64:9.0f} {m64:8.0f}")
    print(f"  forward float32 (model)          {f32:9.0f} {m32_:8.0f}")
    print(f"  configure pass (float64)         {fcfg:9.0f} {mcfg:8.0f}")
    print(f"  census (float64)                 {fc:9.0f} {mc:8.0f}")
    print(f"  census without neighbours        {fc0:9.0f} {mc0:8.0f}")
    print(f"  ratio census / forward float64: {fc / f64:.3f} (target >= 0.3); census / "
          f"forward float32: {fc / f32:.3f}; census / configure pass: {fc / fcfg:.3f} (without "
          f"neighbours {fc0 / fcfg:.3f})")
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
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)

    model, info = load_demo_model()
    ob = openbox.OpenBox(model, INPUT_SHAPE, dtype=torch.float64)
    print(f"demo CNN: {ob}")
    ds = load_sample()
    bench("packaged sample", model, ob, ds.images, ds.labels, args.repeats, args.batch)
    data_dir = args.data or os.environ.get(DATA_DIR_ENV)
    if data_dir:
        test = load_fashion_mnist("test", data_dir, progress=False)
        bench(f"test split ({data_dir})", model, ob, test.images, test.labels,
              max(1, args.repeats - 1), args.batch)
        if args.train:
            train = load_fashion_mnist("train", data_dir, progress=False)
            print(f"\n== train split: {len(train):,} images, one census run")
            elapsed, c, growth = census_run(ob, train.images, train.labels, args.batch)
            print(f"  census {len(train) / elapsed:.0f} images/s; {c.summary()}; peak RSS "
                  f"growth {'n/a' if growth is None else f'{growth:.1f} MB'}")
            print("\n" + c.layer_table())
    else:
        print(f"\n(no data folder: pass --data DIR or set ${DATA_DIR_ENV} for the 10,000 "
              "test images)")


if __name__ == "__main__":
    main()
