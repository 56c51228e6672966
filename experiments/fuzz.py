"""Fuzz linearize + openbox with seeded random architectures (tests/fuzz_models.py).

    python experiments/fuzz.py --n 5000 --seed 1            # a long run, 2 processes
    python experiments/fuzz.py --seed 1 --case 123          # one case: model, inputs, failures

Prints every failure with its reproducer, then a summary: statuses (architectures torch
rejects are counted, not checked), failures per check, failures per known bug
(fuzz_models.KNOWN_BUGS; 'other' is anything else) with one reproducer each, and timing.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import fuzz_models as fm  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402


def _init_worker():
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")


def _run(args):
    seed, index = args
    o = fm.run_case(seed, index)
    c = o.case
    # send back what the summary needs (models and tensors stay in the worker)
    return dict(index=index, status=o.status, family=c.family, motifs=c.motifs,
                reason=c.reason, failures=o.failures, seconds=o.seconds, notes=o.notes)


def one_case(seed: int, index: int) -> int:
    warnings.filterwarnings("ignore")
    o = fm.run_case(seed, index)
    print(fm.describe(o.case))
    print(f"status: {o.status} ({o.seconds:.2f} s); notes: {o.notes}")
    for f in o.failures:
        print(f"  [{fm.known_bug(f, o.failures)}] {f}")
    return 1 if o.failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="architectures to draw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="first case index")
    p.add_argument("--case", type=int, default=None, help="run one case verbosely")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--quiet", action="store_true", help="summary only, no failure lines")
    a = p.parse_args(argv)
    if a.case is not None:
        return one_case(a.seed, a.case)

    jobs = [(a.seed, i) for i in range(a.start, a.start + a.n)]
    t0 = time.perf_counter()
    results = []
    if a.jobs > 1:
        with mp.get_context("spawn").Pool(a.jobs, initializer=_init_worker) as pool:
            for r in tqdm(pool.imap_unordered(_run, jobs, chunksize=4), total=len(jobs),
                          desc="fuzz", unit="arch"):
                results.append(r)
    else:
        _init_worker()
        for j in tqdm(jobs, desc="fuzz", unit="arch"):
            results.append(_run(j))
    wall = time.perf_counter() - t0
    results.sort(key=lambda r: r["index"])

    status = collections.Counter(r["status"] for r in results)
    by_check = collections.Counter()
    arch_by_check = collections.defaultdict(set)
    arch_by_bug = collections.defaultdict(set)
    first_by_bug = {}
    rejected = collections.Counter()
    notes = collections.Counter()
    for r in results:
        notes.update(r["notes"])
        if r["status"] == "rejected":
            rejected[r["reason"].split(":")[0] + ": " + r["reason"].split(":", 1)[-1][:60]] += 1
        for f in r["failures"]:
            by_check[f.check] += 1
            arch_by_check[f.check].add(r["index"])
            bug = fm.known_bug(f, r["failures"])
            arch_by_bug[bug].add(r["index"])
            first_by_bug.setdefault(bug, f)
            if not a.quiet:
                tqdm.write(f"[{bug}] {f}")

    checked = sum(v for k, v in status.items() if k in ("ok", "failed", "declined"))
    print(f"\n=== fuzz: seed {a.seed}, cases {a.start}..{a.start + a.n - 1}: {len(results)} "
          f"architectures in {wall:.1f} s ({a.jobs} processes)")
    print(f"checked {checked}: ok {status['ok']}, failed {status['failed']}, declined "
          f"(UnsupportedLayerError for an all-padding window) {status['declined']}; "
          f"rejected by torch {status['rejected']}; non-finite output {status['nonfinite']}")
    fam = collections.Counter((r["family"], r["status"]) for r in results)
    print("by family: " + "; ".join(
        f"{f} {sum(v for (g, _), v in fam.items() if g == f)} (failed {fam[(f, 'failed')]})"
        for f in fm.FAMILIES))
    if by_check:
        print("failures by check (failures / architectures):")
        for c, v in by_check.most_common():
            print(f"  {c:18s} {v:6d} / {len(arch_by_check[c]):5d}")
    print("architectures failing, by known bug:")
    for bug in [*fm.KNOWN_BUGS, "other"]:
        archs = arch_by_bug.get(bug, set())
        what = fm.KNOWN_BUGS.get(bug, "not one of the known bugs")
        print(f"  ({bug}) {len(archs):5d}  {what}")
        if archs:
            print(f"        e.g. {first_by_bug[bug]}".replace("\n", "\n        "))
    times = [r["seconds"] for r in results if r["status"] in ("ok", "failed", "declined")]
    if times:
        slow = max(results, key=lambda r: r["seconds"])
        print(f"check time per architecture: median {statistics.median(times):.3f} s, "
              f"max {slow['seconds']:.2f} s (case {slow['index']})")
    print(f"notes: {dict(notes)}")
    if rejected:
        print("most common torch rejections: " + "; ".join(
            f"{v} x {k}" for k, v in rejected.most_common(4)))
    return 1 if by_check else 0


if __name__ == "__main__":
    sys.exit(main())
