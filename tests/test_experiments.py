"""The paper pipeline: ``python -m experiments --quick`` writes every table and figure, the
tables parse, and two runs from empty caches write byte-identical CSV tables (all but the
``*-timing`` ones, which hold measured times)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import assert_png

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("settings", "plnn-accuracy", "plnn-exactness", "plnn-consistency", "plnn-timing",
          "cnn-accuracy", "cnn-metrics", "cnn-exact", "cnn-ig", "cnn-timing", "arch-study",
          "arch-hamming", "arch-timing")
FIGURES = ("plnn-exactness", "plnn-consistency", "plnn-features", "cnn-grid", "arch-tradeoff",
           "arch-planes")


def _run(out: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "experiments", "--quick", "--out", str(out), "--cache",
         str(cache), "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("experiments")
    procs = [_run(base / f"out{i}", base / f"cache{i}") for i in (1, 2)]
    return base, procs


@pytest.mark.slow
def test_quick_run_writes_every_table_and_figure(two_runs):
    base, procs = two_runs
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    out = base / "out1"
    for name in TABLES:
        with (out / f"{name}.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert rows, name
        md = (out / f"{name}.md").read_text()
        assert md.count("\n|") >= len(rows), name
    for name in FIGURES:
        assert_png(out / f"{name}.png")
    paper = (out / "paper.md").read_text()
    for name in FIGURES:
        assert f"({name}.png)" in paper
    assert "*(table" not in paper                      # every table it names was generated
    # the numbers in the text are the tables' (one spot check: LIME's median exactness)
    with (out / "plnn-exactness.csv").open() as f:
        lime = next(r for r in csv.DictReader(f) if r["task"] == "fmnist-1"
                    and r["method"] == "lime")
    assert f"{float(lime['median']):.2g}"[:3] in paper


@pytest.mark.slow
def test_two_quick_runs_write_identical_tables(two_runs):
    base, procs = two_runs
    assert all(p.returncode == 0 for p in procs)
    a, b = base / "out1", base / "out2"
    names = sorted(p.name for p in a.glob("*.csv"))
    assert names == sorted(p.name for p in b.glob("*.csv"))
    compared = 0
    for name in names:
        if name.endswith("-timing.csv"):
            continue
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
        compared += 1
    assert compared >= sum(not t.endswith("-timing") for t in TABLES)
