"""The ``openbox`` command line, end to end, on the packaged files.

A few commands run as ``python -m openbox.cli ...`` in a temporary folder, as a user
would run them; the rest run in-process through ``cli.main``. Exit codes, stdout,
stderr and the files written are checked, and the numbers written are compared with
``OpenBox`` and the model computed here. Argument checks must happen before any work:
those tests replace the work (training, explaining) with a function that fails the
test if it is called.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from PIL import Image

import openbox
from openbox import cli
from openbox.engine import OpenBox, VerificationReport
from openbox.fmnist import training
from openbox.fmnist.checkpoints import load_checkpoint
from openbox.fmnist.data import CLASSES, DATA_DIR_ENV, load_sample, write_idx
from openbox.fmnist.demo import DEMO_CLASSES, demo_checkpoint, demo_indices

DEMO = demo_checkpoint()
TIMEOUT_S = 300  # a hung command fails the test instead of the whole run
EXPLAIN_INDEX = 7  # a Trouser, predicted Trouser
NETS = """
from openbox.fmnist.models import build_model


def make():
    return build_model("cnn", 10, channels=[8, 16])
"""


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


def main_error(capsys, *args: str) -> str:
    """Run main() in-process; assert exit 2 and return its one 'openbox: error:' line."""
    assert cli.main(list(args)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("openbox: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 50


def model_logits(x: torch.Tensor) -> torch.Tensor:
    model, _ = load_checkpoint(DEMO)
    with torch.no_grad():
        return model.double()(x.double())


@pytest.fixture
def no_work(monkeypatch):
    """Training and explaining fail the test if they start."""
    def fail(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(training, "train", fail)
    monkeypatch.setattr(OpenBox, "explain", fail)
    monkeypatch.setattr(OpenBox, "__init__", fail)


@pytest.fixture
def user_model(tmp_path, monkeypatch):
    """A module 'user_nets' and the demo's weights as a plain state dict, in the cwd."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user_nets.py").write_text(NETS)
    model, _ = load_checkpoint(DEMO)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    monkeypatch.delitem(sys.modules, "user_nets", raising=False)
    return tmp_path


def tiny_data(folder: Path, n_train: int = 200, n_test: int = 100) -> Path:
    """IDX files of the packaged sample's images, in a fixed random order, in ``folder``
    (created): ``n_train`` for the train split, the next ``n_test`` for the test split."""
    folder.mkdir(parents=True, exist_ok=True)
    sample = load_sample()
    pixels = (sample.images[:, 0] * 255).round().to(torch.uint8).numpy()
    labels = sample.labels.to(torch.uint8).numpy()
    order = np.random.default_rng(0).permutation(len(labels))
    for prefix, rows in (("train", order[:n_train]), ("t10k", order[n_train:n_train + n_test])):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", pixels[rows])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels[rows])
    return folder


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
    # a progress bar over the images, on stderr only
    assert "demo:" in proc.stderr and "image/s" in proc.stderr and "%|" not in proc.stdout


def test_demo_help_says_how_many_images_it_shows(demo_run, capsys):
    _, proc = demo_run
    assert cli.main(["demo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    n = int(re.search(r"Explain (\d+) packaged test images", text).group(1))
    assert n == len(DEMO_CLASSES) == int(re.search(r"explaining (\d+) images",
                                                   proc.stdout).group(1))
    assert all(CLASSES[c] in text for c in DEMO_CLASSES)


# --------------------------------------------------------------------------- explain


@pytest.fixture(scope="module")
def explain_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("explain")
    return cwd, run("explain", str(DEMO), "--index", str(EXPLAIN_INDEX), "--out", "ex",
                    "--target", "trouser", "--versus", "PULLOVER", "--save", "e.npz", cwd=cwd)


def test_explain_writes_images_and_a_complete_json(explain_run):
    cwd, proc = explain_run
    assert proc.returncode == 0, proc.stderr
    out = cwd / "ex"
    assert_png(out / "input.png")
    assert_png(out / "features.png")
    rec = json.loads((out / "explanation.json").read_text())
    sample = load_sample()
    label = int(sample.labels[EXPLAIN_INDEX])
    assert rec["input"] == {"data": rec["input"]["data"], "data_dir": None,
                            "index": EXPLAIN_INDEX}
    assert "packaged" in rec["input"]["data"] and "packaged" in proc.stdout
    assert rec["label"] == label and rec["label_name"] == CLASSES[label]
    want = model_logits(sample.images[EXPLAIN_INDEX : EXPLAIN_INDEX + 1])[0]
    np.testing.assert_allclose(rec["explanation"]["logits"], want.numpy(), rtol=0, atol=1e-10)
    assert rec["predicted"] == int(want.argmax()) and rec["correct"] is True
    assert rec["model"]["kind"] == "checkpoint" and rec["model"]["checkpoint"] == str(DEMO)
    assert rec["model"]["description"] == "cnn (channels 8/16)"
    assert len(rec["region_key"]) == 16 and int(rec["region_key"], 16) >= 0
    radius = rec["certified_radius"]
    assert 0 <= radius["linf"] <= radius["l2"]
    if rec["explanation"]["n_tight"] > 0:
        assert radius["l2"] == 0.0 and radius["linf"] == 0.0
    v = rec["verification"]
    assert v["ok"] is True and v["max_abs_error"] <= 1e-10 and v["atol"] == 1e-10
    assert rec["dtype"] == "float64" and rec["tolerances"]["verify_rtol"] == 1e-10
    assert rec["inscribed_radius"]["value"] is None
    assert "--inscribed" in rec["inscribed_radius"]["note"]
    # class names: --target trouser --versus PULLOVER
    f = rec["decision_features"]
    assert (f["target"], f["versus"]) == (CLASSES.index("Trouser"), CLASSES.index("Pullover"))
    assert f["logit_gap"] == pytest.approx(float(want[1] - want[2]), abs=1e-10)
    assert "decision features of Trouser vs Pullover" in proc.stdout
    assert "ex/explanation.json" in proc.stdout and "e.npz" in proc.stdout


def test_explain_save_writes_the_arrays_of_the_explanation(explain_run):
    cwd, proc = explain_run
    assert proc.returncode == 0, proc.stderr
    model, _ = load_checkpoint(DEMO)
    ob = OpenBox(model, (1, 28, 28), dtype=torch.float64, domain=(0.0, 1.0))
    x = load_sample().images[EXPLAIN_INDEX : EXPLAIN_INDEX + 1].double()
    e = ob.explain(x)
    radii = ob.radius_pair(x)
    with np.load(cwd / "e.npz", allow_pickle=False) as z:
        assert z["weight"].shape == (10, 1, 28, 28)
        np.testing.assert_array_equal(z["weight"], e.weight[0].numpy())
        np.testing.assert_array_equal(z["bias"], e.bias[0].numpy())
        np.testing.assert_array_equal(z["input"], x[0].numpy())
        np.testing.assert_allclose(z["contrast"], (e.weight[0, 1] - e.weight[0, 2]).numpy(),
                                   rtol=0, atol=0)
        assert bytes(z["region_key"]) == bytes(e.region_key[0])
        assert str(z["region_key_digest"]) == str(e.region_key[0])
        assert float(z["certified_radius_l2"]) == float(radii.l2[0])
        assert float(z["certified_radius_linf"]) == float(radii.linf[0])
        assert int(z["target"]) == 1 and str(z["versus"]) == "2"


def test_explain_of_a_misclassified_image_in_process(tmp_path, capsys):
    """Sample image 2 is a Shirt the demo CNN calls a T-shirt/top."""
    assert cli.main(["explain", str(DEMO), "--index", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "label Shirt, predicted T-shirt/top" in out
    rec = json.loads((tmp_path / "explanation.json").read_text())
    assert rec["correct"] is False and rec["label_name"] == "Shirt"


def test_explain_and_verify_a_users_own_model_and_image(user_model, capsys):
    cwd = user_model
    sample = load_sample()
    pixels = (sample.images[EXPLAIN_INDEX, 0] * 255).round().to(torch.uint8).numpy()
    Image.fromarray(pixels).save(cwd / "seven.png")
    proc = run("explain", "--model", "user_nets:make", "--weights", "w.pt", "--image",
               "seven.png", "--out", "u", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads((cwd / "u" / "explanation.json").read_text())
    assert rec["model"]["kind"] == "factory" and rec["model"]["factory"] == "user_nets:make"
    assert rec["input"] == {"image": "seven.png"} and rec["label"] is None
    want = model_logits(sample.images[EXPLAIN_INDEX : EXPLAIN_INDEX + 1])[0]
    np.testing.assert_allclose(rec["explanation"]["logits"], want.numpy(), rtol=0, atol=1e-10)
    assert rec["predicted_name"] == "Trouser"  # a 10-class model gets Fashion-MNIST's names
    assert "image file seven.png, explained with user_nets:make" in proc.stdout
    # verify, in-process (imports user_nets from the cwd)
    assert cli.main(["verify", "--model", "user_nets:make", "--weights", "w.pt",
                     "--n", "3"]) == 0
    assert "3/3 pass in float64" in capsys.readouterr().out


def test_model_arguments_are_checked(user_model, capsys, no_work):
    out = str(user_model / "o")
    for args, needle in [
        ([str(DEMO), "--model", "user_nets:make", "--weights", "w.pt"], "not both"),
        (["--model", "user_nets:make"], "--model user_nets:make needs --weights FILE"),
        (["--weights", "w.pt"], "--weights w.pt needs --model MODULE:FACTORY"),
        ([], "expected a checkpoint CKPT"),
        (["--model", "user_nets:nope", "--weights", "w.pt"], "has no attribute 'nope'"),
        (["--model", "user_nets:make", "--weights", str(DEMO)], "openbox checkpoint"),
    ]:
        assert needle in main_error(capsys, "explain", *args, "--index", "0", "--out", out)
        assert needle in main_error(capsys, "verify", *args)
    assert not Path(out).exists()


def test_bad_image_files(tmp_path, capsys, no_work):
    Image.fromarray(np.zeros((28, 28, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    line = main_error(capsys, "explain", str(DEMO), "--image", str(tmp_path / "rgb.png"),
                      "--out", str(tmp_path / "o"))
    assert "rgb.png" in line and "mode RGB is not greyscale" in line
    np.save(tmp_path / "big.npy", np.full((28, 28), 255.0))
    line = main_error(capsys, "explain", str(DEMO), "--image", str(tmp_path / "big.npy"),
                      "--out", str(tmp_path / "o"))
    assert "big.npy" in line and "divide by 255" in line
    line = main_error(capsys, "explain", str(DEMO), "--image", str(tmp_path / "rgb.png"),
                      "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert "--image FILE needs neither" in line
    assert cli.main(["explain", str(DEMO), "--image", "a.png", "--index", "0", "--out",
                     "o"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_inverted_image_is_warned_about(tmp_path, capsys):
    x = 1 - load_sample().images[0, 0].double().numpy()
    np.save(tmp_path / "inverted.npy", x)
    assert cli.main(["explain", str(DEMO), "--image", str(tmp_path / "inverted.npy"),
                     "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "openbox: warning:" in err and "light border" in err


# --------------------------------------------------------------------------- classes


@pytest.mark.parametrize(("args", "needles"), [
    (["--target", "4", "--versus", "coat"], ["--target and --versus are both class 4 (Coat)"]),
    (["--target", "Coat", "--versus", "COAT"], ["both class 4"]),
    (["--target", "jacket"], ["--target 'jacket' is not a class", "4 'Coat'"]),
    (["--target", "s"], ["ambiguous", "'Sandal', 'Shirt', 'Sneaker'"]),
    (["--versus", "10"], ["--versus 10 is out of range", "10 classes"]),
    (["--target", "-1"], ["--target -1 is out of range"]),
])
def test_bad_classes_are_refused_before_any_work(tmp_path, capsys, no_work, args, needles):
    line = main_error(capsys, "explain", str(DEMO), "--index", "0", "--out",
                      str(tmp_path / "o"), *args)
    for needle in needles:
        assert needle in line, (needle, line)
    assert not (tmp_path / "o").exists()


def test_versus_the_predicted_class_is_refused_before_explaining(tmp_path, capsys,
                                                                 monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("explain ran")

    monkeypatch.setattr(OpenBox, "explain", fail)
    # sample image 0 is a Coat, predicted Coat
    line = main_error(capsys, "explain", str(DEMO), "--index", "0", "--out",
                      str(tmp_path / "o"), "--versus", "coat")
    assert "the model predicts Coat here" in line and "give --target too" in line


def test_class_names_resolve():
    names = list(CLASSES)
    resolve = cli._resolve_class
    assert [resolve(v, "--t", 10, names) for v in ("Coat", "coat", "t-shirt", "TSHIRT/top",
                                                   "ankle", "9", " 3 ")] == [4, 4, 0, 0, 9, 9, 3]
    assert resolve(None, "--t", 10, names) is None
    with pytest.raises(cli.UsageError, match="classes have no names"):
        resolve("coat", "--t", 10, None)


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
    assert "verify:" in proc.stderr and "image/s" in proc.stderr  # the progress bar
    assert "%|" not in proc.stdout


def failing_verify(self: OpenBox, x: torch.Tensor, **kwargs) -> VerificationReport:
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


def test_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "no-such.pt"
    line = main_error(capsys, "explain", str(missing), "--index", "0", "--out", str(tmp_path))
    assert str(missing) in line and "no such checkpoint" in line
    assert str(missing) in main_error(capsys, "verify", str(missing))


def test_tampered_checkpoint(tmp_path):
    rec = torch.load(DEMO, map_location="cpu", weights_only=True)
    rec["state_dict"]["conv1.weight"][0, 0, 0, 0] += 0.01  # digest left as it was
    tampered = tmp_path / "tampered.pt"
    torch.save(rec, tampered)
    proc = run("explain", str(tampered), "--index", "0", "--out", "o", cwd=tmp_path)
    assert_clean_error(proc, str(tampered), "digest")
    assert not (tmp_path / "o").exists()


def test_index_out_of_range(tmp_path, capsys, no_work):
    line = main_error(capsys, "explain", str(DEMO), "--index", "99999", "--out",
                      str(tmp_path / "o"))
    assert "--index 99999 is out of range" in line and "1,000 images" in line
    line = main_error(capsys, "explain", str(DEMO), "--index", "-1", "--out",
                      str(tmp_path / "o"))
    assert "--index -1 is out of range" in line
    assert not (tmp_path / "o").exists()


def test_bad_arguments_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--model", "resnet9000", "--out", "x.pt"]) == 2
    assert "invalid choice: 'resnet9000'" in capsys.readouterr().err
    assert cli.main(["explain", str(DEMO), "--out", "o"]) == 2  # --index or --image
    assert "one of the arguments --index --image is required" in capsys.readouterr().err
    assert cli.main(["explain", str(DEMO), "--index", "0", "--out", "o", "--dtype", "f16"]) == 2


def test_train_without_data_says_how_to_point_at_it(tmp_path):
    proc = run("train", "--out", "x.pt", "--epochs", "1", cwd=tmp_path)
    assert_clean_error(proc, "--data", DATA_DIR_ENV, "../shared/datasets/fashion-mnist")


def test_usage_errors_in_process(capsys, tmp_path, monkeypatch, no_work):
    monkeypatch.chdir(tmp_path)
    assert cli.main([]) == 2
    assert "holds 1,000 images" in main_error(capsys, "verify", str(DEMO), "--n", "5000")
    (tmp_path / "file").write_text("")
    line = main_error(capsys, "explain", str(DEMO), "--index", "0", "--out", "file")
    assert "is not a folder" in line
    line = main_error(capsys, "train", "--model", "plnn", "--channels", "3", "4", "--out",
                      "x.pt")
    assert "unexpected keyword argument 'channels'" in line
    assert not Path("o").exists() and not Path("x.pt").exists()


# --------------------------------------------------------------------------- checked first


@pytest.mark.parametrize(("args", "needles"), [
    (["--out", ""], ["--out is empty"]),
    (["--out", "  "], ["--out is empty"]),
    (["--out", "file/x.pt"], ["file is a file, not a folder"]),
    (["--out", "folder"], ["--out folder is a folder"]),
    (["--out", "x.pt", "--device", "meta"], ["openbox trains on cpu, cuda, mps, not on 'meta'",
                                             "available here: cpu"]),
    (["--out", "x.pt", "--device", "nonsense"], ["--device 'nonsense' is not a torch device"]),
    (["--out", "x.pt", "--epochs", "0"], ["--epochs and --batch-size must be >= 1"]),
    (["--out", "x.pt", "--lr", "inf"], ["--lr finite and > 0", "inf"]),
    (["--out", "x.pt", "--lr", "nan"], ["--lr finite and > 0"]),
])
def test_train_arguments_are_checked_before_training(tmp_path, monkeypatch, capsys, no_work,
                                                     args, needles):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    (tmp_path / "folder").mkdir()
    tiny_data(tmp_path / "data")
    line = main_error(capsys, "train", "--data", "data", *args)
    for needle in needles:
        assert needle in line, (needle, line)
    assert not list(tmp_path.rglob("*.pt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_train_on_cuda_without_cuda(tmp_path, monkeypatch, capsys, no_work):
    monkeypatch.chdir(tmp_path)
    line = main_error(capsys, "train", "--out", "x.pt", "--device", "cuda")
    assert "--device cuda: this torch build or machine has no CUDA" in line


def test_unwritable_output_folders_are_refused_before_work(tmp_path, monkeypatch, capsys,
                                                           no_work):
    monkeypatch.chdir(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        targets = [] if os.geteuid() == 0 else [str(locked / "sub" / "x.pt")]  # root writes
        if Path("/proc/self").is_dir():  # not writable even by root
            targets.append("/proc/openbox-test/x.pt")
        assert targets, "no unwritable folder to test with on this machine"
        for target in targets:
            line = main_error(capsys, "train", "--out", target)
            assert f"--out {target}: cannot write in" in line, line
            folder = str(Path(target).parent)
            line = main_error(capsys, "explain", str(DEMO), "--index", "0", "--out", folder)
            assert f"--out {folder}: cannot write in" in line, line
    finally:
        locked.chmod(0o700)


def test_explain_save_is_checked_before_work(tmp_path, capsys, no_work):
    out = str(tmp_path / "o")
    line = main_error(capsys, "explain", str(DEMO), "--index", "0", "--out", out,
                      "--save", str(tmp_path / "e.json"))
    assert "the file name must end in .npz" in line
    line = main_error(capsys, "explain", str(DEMO), "--index", "0", "--out", out,
                      "--save", str(tmp_path))
    assert "is a folder" in line
    assert not Path(out).exists()


def test_an_empty_test_split_is_refused_before_training(tmp_path, capsys, no_work):
    data = tiny_data(tmp_path / "data", n_test=0)
    out = tmp_path / "x.pt"
    line = main_error(capsys, "train", "--data", str(data), "--out", str(out))
    assert "the test split" in line and "holds no images" in line
    assert not out.exists()
    line = main_error(capsys, "verify", str(DEMO), "--data", str(data))
    assert "holds no images" in line


def test_training_that_diverges_exits_2(tmp_path, capsys, monkeypatch):
    diverged = getattr(training, "TrainingDivergedError", None)
    if diverged is None:
        pytest.skip("openbox.fmnist.training has no TrainingDivergedError yet")

    def blow_up(*args, **kwargs):
        raise diverged("loss is nan at epoch 1, step 3; lower --lr", epoch=1, step=3, lr=10.0)

    monkeypatch.setattr(training, "train", blow_up)
    data = tiny_data(tmp_path / "data")
    line = main_error(capsys, "train", "--data", str(data), "--out", str(tmp_path / "x.pt"),
                      "--lr", "10")
    assert "loss is nan at epoch 1" in line
    assert not (tmp_path / "x.pt").exists()


# --------------------------------------------------------------------------- train


def test_train_on_a_tiny_data_folder(tmp_path):
    tiny_data(tmp_path / "data")
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


def option_entries(help_text: str) -> dict[str, str]:
    """Option name -> its whole help entry (continuation lines joined)."""
    entries: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        m = re.match(r"^  (-{1,2}[\w-]+|[A-Z]+)\b", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_help_of_every_command(capsys, tmp_path):
    proc = run("--help", cwd=tmp_path)  # once through the interpreter, as a user runs it
    assert proc.returncode == 0 and "explain" in proc.stdout
    for command in ("train", "explain", "verify", "demo", "segment", "plane", "census",
                    "equivalent"):
        assert cli.main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert f"usage: openbox {command}" in out and "--help" in out
        entries = option_entries(out)
        assert "-h" in entries and "--out" in entries or command in (
            "verify", "census", "equivalent")
        for entry in entries.values():
            assert "(default: None)" not in entry and "(default: False)" not in entry, entry
            assert entry.lower().count("default") <= 1, entry
        if command == "train":
            assert "(default: 5)" in entries["--epochs"]
            assert "(default: 128)" in entries["--batch-size"]
            assert "(default:" not in entries["--out"]  # required
        if command == "explain":
            assert "(default: the predicted class)" in entries["--target"]
            assert "(default: rest)" in entries["--versus"]
            assert "default" not in entries["--index"]


def test_version():
    proc = run("--version", cwd=Path.cwd())
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"openbox {metadata.version('openbox')}"


# --------------------------------------------------------------------------- segment, plane

TINY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 6), nn.ReLU(), nn.Linear(6, 10))
"""


@pytest.fixture
def tiny_model(tmp_path, monkeypatch):
    """A module 'tiny_nets' with a small MLP on 28 x 28 images and its weights, in the cwd."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny_nets.py").write_text(TINY)
    monkeypatch.delitem(sys.modules, "tiny_nets", raising=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 6), torch.nn.ReLU(),
                                torch.nn.Linear(6, 10))
    torch.save(model.state_dict(), tmp_path / "t.pt")
    return tmp_path, model


def test_segment_writes_pieces_that_match_the_library(tiny_model, capsys):
    cwd, model = tiny_model
    assert cli.main(["segment", "--model", "tiny_nets:make", "--weights", "t.pt", "--from", "3",
                     "--to", "8", "--out", "seg"]) == 0
    out = capsys.readouterr().out
    assert_png(cwd / "seg" / "segment.png")
    rows = (cwd / "seg" / "segment.csv").read_text().splitlines()
    assert rows[0] == "t_start,t_end,region,prediction"
    ob = OpenBox(model, (1, 28, 28), domain=(0.0, 1.0))
    x = load_sample().images
    pieces = openbox.regions.segment(ob, x[3], x[8], progress=False)
    assert len(rows) - 1 == len(pieces) and f"{len(pieces):,} linear pieces" in out
    for row, p in zip(rows[1:], pieces):
        t0, t1, key, pred = row.split(",")
        assert float(t0) == p.t_start and float(t1) == p.t_end
        assert key == p.region_key.digest and int(pred) == p.prediction


def test_plane_writes_a_map(tiny_model, capsys):
    cwd, _ = tiny_model
    assert cli.main(["plane", "--model", "tiny_nets:make", "--weights", "t.pt", "--index", "3",
                     "--directions", "towards:8,9", "--extent", "0.5", "--out", "pl"]) == 0
    out = capsys.readouterr().out
    assert_png(cwd / "pl" / "plane.png")
    m = re.search(r"([\d,]+) regions .* coverage ([\d.]+), complete", out)
    assert m and int(m.group(1).replace(",", "")) >= 1
    assert abs(float(m.group(2)) - 1) < 1e-9


@pytest.mark.parametrize(("args", "needle"), [
    (["segment", "--from", "3", "--to", "3", "--out", "o"], "the same image"),
    (["segment", "--from", "3", "--to", "5000", "--out", "o"], "5000"),
    (["plane", "--index", "3", "--directions", "towards:3", "--out", "o"], "is --index itself"),
    (["plane", "--index", "3", "--directions", "sideways", "--out", "o"], "expected random"),
    (["plane", "--index", "3", "--extent", "0", "--out", "o"], "--extent must be > 0"),
    (["plane", "--index", "3", "--starts", "0", "--out", "o"], "--starts must be >= 1"),
    (["plane", "--index", "3", "--dtype", "float32", "--out", "o"], "need --dtype float64"),
])
def test_segment_and_plane_arguments(tiny_model, capsys, args, needle):
    line = main_error(capsys, *args[:1], "--model", "tiny_nets:make", "--weights", "t.pt",
                      *args[1:])
    assert needle in line


def test_census_prints_the_tables_and_writes_the_histogram(tiny_model, capsys):
    cwd, model = tiny_model
    assert cli.main(["census", "--model", "tiny_nets:make", "--weights", "t.pt", "--n", "200",
                     "--plot", "c.png", "--csv", "c.csv"]) == 0
    out = capsys.readouterr().out
    assert_png(cwd / "c.png")
    from openbox.regions import census

    ob = OpenBox(model, (1, 28, 28), domain=(0.0, 1.0))
    sample = load_sample()
    want = census(ob, sample.images[:200], sample.labels[:200], progress=False)
    assert f"{want.n_regions:,}" in out or str(want.n_regions) in out
    rows = (cwd / "c.csv").read_text().splitlines()
    assert len(rows) - 1 == want.n_regions
    assert main_error(capsys, "census", "--model", "tiny_nets:make", "--weights", "t.pt",
                      "--n", "0").endswith("--n must be >= 1, got 0")


def test_equivalent_on_a_segment_finds_a_perturbed_copy(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from openbox.fmnist.checkpoints import save_checkpoint as save
    from openbox.fmnist.models import build_model

    model = build_model("plnn", 10, hidden=[12, 8], seed=0).eval()
    paths = {}
    for name, delta in (("a", 0.0), ("same", 0.0), ("moved", 1e-3)):
        m = copy.deepcopy(model)
        with torch.no_grad():  # the output bias: a difference everywhere
            m.fc.bias[0] += delta
        paths[name] = tmp_path / f"{name}.pt"
        save(paths[name], m, arch="plnn", arch_kwargs={"hidden": [12, 8]}, num_classes=10)
    a, same, moved = (str(paths[k]) for k in ("a", "same", "moved"))
    assert cli.main(["equivalent", a, same, "--index", "0", "--to", "1"]) == 0
    assert "equivalent" in capsys.readouterr().out.lower()
    assert cli.main(["equivalent", a, moved, "--index", "0", "--to", "1"]) == 1
    assert "counterexample" in capsys.readouterr().out
    assert main_error(capsys, "equivalent", a, same, "--index", "0",
                      "--eps", "-1").endswith("--eps must be finite and > 0, got -1.0")
