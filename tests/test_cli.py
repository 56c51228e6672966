"""The ``openbox`` command line, end to end in subprocesses, on the packaged files.

Each command runs as ``python -m openbox.cli ...`` in a temporary folder, as a user
would run it; exit codes, stdout, stderr and the files written are checked. The exit
code of a failed verification is tested in-process, with a report that fails (the
engine itself is not corrupted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from openbox import cli
from openbox.engine import OpenBox, VerificationReport
from openbox.fmnist.checkpoints import load_checkpoint
from openbox.fmnist.data import CLASSES, DATA_DIR_ENV, load_sample, write_idx
from openbox.fmnist.demo import DEMO_CLASSES, demo_checkpoint, demo_indices

DEMO = demo_checkpoint()
TIMEOUT_S = 300  # a hung command fails the test instead of the whole run


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``openbox ARGS`` in a subprocess; one torch thread, no data folder configured."""
    environ = {k: v for k, v in os.environ.items() if k != DATA_DIR_ENV}
    environ.update({"OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(cwd / "cache")})
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "openbox.cli", *args], cwd=cwd, env=environ, capture_output=True,
        text=True, timeout=TIMEOUT_S,
    )


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, one 'openbox: error:' line naming every needle, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("openbox: error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 50


# --------------------------------------------------------------------------- demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("demo")
    return cwd, run("demo", "--out", "out", cwd=cwd)


def test_demo_writes_the_figure_and_a_summary_of_every_image(demo_run):
    cwd, proc = demo_run
    assert proc.returncode == 0, proc.stderr
    out = cwd / "out"
    assert_png(out / cli.DEMO_FIGURE)
    summary = (out / cli.DEMO_SUMMARY).read_text()
    sample = load_sample()
    for index in demo_indices(sample.labels):
        row = next(line for line in summary.splitlines() if line.split()[:1] == [str(index)])
        assert CLASSES[int(sample.labels[index])][:12] in row and " ok " in row, row
    assert len(demo_indices(sample.labels)) == len(DEMO_CLASSES)
    assert f"{len(DEMO_CLASSES)}/{len(DEMO_CLASSES)} explanations verified exact" in summary
    assert f"out/{cli.DEMO_FIGURE}" in proc.stdout and f"out/{cli.DEMO_SUMMARY}" in proc.stdout


# --------------------------------------------------------------------------- explain


EXPLAIN_INDEX = 7


@pytest.fixture(scope="module")
def explain_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("explain")
    return cwd, run("explain", str(DEMO), "--index", str(EXPLAIN_INDEX), "--out", "ex", cwd=cwd)


def test_explain_writes_images_and_a_complete_json(explain_run):
    cwd, proc = explain_run
    assert proc.returncode == 0, proc.stderr
    out = cwd / "ex"
    assert_png(out / "input.png")
    assert_png(out / "features.png")
    record = json.loads((out / "explanation.json").read_text())
    for key in ("checkpoint", "index", "label", "label_name", "predicted", "predicted_name",
                "logits", "region_key", "certified_radius", "certified_radius_note", "n_tight",
                "n_tight_relu", "n_tight_pool", "inscribed_radius", "inscribed_radius_note",
                "verification", "polytope", "dtype", "tolerances", "data", "decision_features"):
        assert key in record, key
    sample = load_sample()
    assert record["index"] == EXPLAIN_INDEX and record["label"] == int(sample.labels[7])
    assert record["label_name"] == CLASSES[record["label"]]
    logits = record["logits"]
    assert len(logits) == 10 and record["predicted"] == int(np.argmax(logits))
    assert record["predicted_name"] == CLASSES[record["predicted"]]
    # the logits are the model's own
    model, _ = load_checkpoint(DEMO)
    with torch.no_grad():
        want = model.double()(sample.images[7:8].double())[0]
    np.testing.assert_allclose(logits, want.numpy(), rtol=0, atol=1e-10)
    assert len(record["region_key"]) == 16 and int(record["region_key"], 16) >= 0
    radius = record["certified_radius"]
    assert radius["l2"] >= 0 and radius["linf"] >= 0 and radius["linf"] <= radius["l2"]
    assert record["n_tight"] == record["n_tight_relu"] + record["n_tight_pool"]
    if record["n_tight"] > 0:
        assert radius["l2"] == 0.0 and radius["linf"] == 0.0
    v = record["verification"]
    assert v["passed"] is True and v["max_abs_error"] <= 1e-10 and v["atol"] == 1e-10
    assert record["dtype"] == "float64" and record["tolerances"]["verify_rtol"] == 1e-10
    assert record["inscribed_radius"] is None and "--inscribed" in record["inscribed_radius_note"]
    poly = record["polytope"]
    assert poly["n_constraints"] > 0 and poly["n_zero_rows_dropped"] >= 0
    assert poly["n_inputs"] == 784 and poly["domain"] == [0.0, 1.0]
    gap = record["decision_features"]
    assert gap["target"] == record["predicted"] and abs(gap["delta"]) <= 1e-10
    assert "packaged" in record["data"] and record["data_dir"] is None
    assert "packaged" in proc.stdout and "ex/explanation.json" in proc.stdout


# --------------------------------------------------------------------------- verify


def test_verify_prints_a_table_and_exits_0(tmp_path):
    proc = run("verify", str(DEMO), "--n", "5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["index"])
    rows = lines[header + 1 : header + 6]
    assert [int(r.split()[0]) for r in rows] == [0, 1, 2, 3, 4]
    assert all(r.rstrip().endswith("ok") for r in rows)
    assert "5/5 pass in float64" in proc.stdout


def failing_verify(self: OpenBox, x: torch.Tensor) -> VerificationReport:
    n = x.shape[0]
    err = torch.full((n,), 0.5, dtype=x.dtype)
    return VerificationReport(
        max_abs_error=0.5, logits=torch.zeros(n, 10, dtype=x.dtype), llc_error=err,
        program_error=torch.zeros(n, dtype=x.dtype),
        passed=torch.tensor([True] + [False] * (n - 1)), rtol=1e-10, atol=1e-10,
        dtype=x.dtype, n_tight=torch.zeros(n, dtype=torch.int64),
    )


def test_verify_exit_code_is_1_when_a_check_fails(monkeypatch, capsys):
    assert cli.main(["verify", str(DEMO), "--n", "3"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(OpenBox, "verify", failing_verify)
    assert cli.main(["verify", str(DEMO), "--n", "3"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL") == 2 and "1/3 pass" in out


# --------------------------------------------------------------------------- errors


def main_error(capsys, *args: str) -> str:
    """Run main() in-process; assert exit 2 and return its one 'openbox: error:' line."""
    assert cli.main(list(args)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("openbox: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "no-such.pt"
    line = main_error(capsys, "explain", str(missing), "--index", "0", "--out", str(tmp_path))
    assert str(missing) in line and "no such checkpoint" in line
    assert str(missing) in main_error(capsys, "verify", str(missing))


def test_tampered_checkpoint(tmp_path):
    record = torch.load(DEMO, map_location="cpu", weights_only=True)
    record["state_dict"]["conv1.weight"][0, 0, 0, 0] += 0.01  # digest left as it was
    tampered = tmp_path / "tampered.pt"
    torch.save(record, tampered)
    proc = run("explain", str(tampered), "--index", "0", "--out", "o", cwd=tmp_path)
    assert_clean_error(proc, str(tampered), "digest")
    assert not (tmp_path / "o").exists()


def test_index_out_of_range(tmp_path, capsys):
    line = main_error(capsys, "explain", str(DEMO), "--index", "99999", "--out", str(tmp_path))
    assert "--index 99999 is out of range" in line and "1,000 images" in line
    line = main_error(capsys, "explain", str(DEMO), "--index", "-1", "--out", str(tmp_path))
    assert "--index -1 is out of range" in line
    assert not (tmp_path / "explanation.json").exists()


def test_bad_arguments_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--model", "resnet9000", "--out", "x.pt"]) == 2
    assert "invalid choice: 'resnet9000'" in capsys.readouterr().err
    assert cli.main(["explain", str(DEMO), "--out", "o"]) == 2  # --index is required
    assert "--index" in capsys.readouterr().err
    assert cli.main(["explain", str(DEMO), "--index", "0", "--out", "o", "--dtype", "f16"]) == 2


def test_train_without_data_says_how_to_point_at_it(tmp_path):
    proc = run("train", "--out", "x.pt", "--epochs", "1", cwd=tmp_path)
    assert_clean_error(proc, "--data", DATA_DIR_ENV, "../shared/datasets/fashion-mnist")


def test_usage_errors_in_process(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main([]) == 2
    assert cli.main(["verify", str(DEMO), "--n", "5000"]) == 2
    assert "holds 1,000 images" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert cli.main(["explain", str(DEMO), "--index", "0", "--out", str(tmp_path / "file")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert cli.main(["train", "--model", "plnn", "--channels", "3", "4", "--out", "x.pt"]) == 2
    assert "unexpected keyword argument 'channels'" in capsys.readouterr().err
    assert cli.main(["explain", str(DEMO), "--index", "0", "--out", "o", "--target", "10"]) == 2
    assert "--target 10 is out of range" in capsys.readouterr().err
    assert not Path("o").exists()


# --------------------------------------------------------------------------- train


def test_train_on_a_tiny_data_folder(tmp_path):
    sample = load_sample()
    pixels = (sample.images[:, 0] * 255).round().to(torch.uint8).numpy()
    labels = sample.labels.to(torch.uint8).numpy()
    order = np.random.default_rng(0).permutation(len(labels))
    data = tmp_path / "data"
    for prefix, rows in (("train", order[:200]), ("t10k", order[200:300])):
        write_idx(data / f"{prefix}-images-idx3-ubyte.gz", pixels[rows])
        write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", labels[rows])
    proc = run("train", "--model", "cnn", "--channels", "4", "8", "--data", "data",
               "--epochs", "1", "--batch-size", "50", "--out", "ckpt/tiny.pt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout and "train accuracy" in proc.stdout
    model, info = load_checkpoint(tmp_path / "ckpt" / "tiny.pt")
    assert info.arch == "cnn" and info.arch_kwargs == {"channels": [4, 8]}
    assert info.metadata["train_images"] == 200 and info.metadata["test_images"] == 100
    assert 0.0 <= info.metadata["test_accuracy"] <= 1.0
    assert f"{info.metadata['test_accuracy']:.4f}" in proc.stdout
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


# --------------------------------------------------------------------------- help


def test_help_of_every_command(capsys, tmp_path):
    proc = run("--help", cwd=tmp_path)  # once through the interpreter, as a user runs it
    assert proc.returncode == 0 and "explain" in proc.stdout
    for command in ("train", "explain", "verify", "demo"):
        assert cli.main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert f"usage: openbox {command}" in out and "--help" in out
