"""openbox.loading: a user's own model (MODULE:FACTORY + a state dict) and image files.

Loaded models are checked against the module they were saved from (same outputs on
the same seeded inputs); loaded images against the arrays they were written from.
Every failure must name the file or spec and say what is wrong.
"""

from __future__ import annotations

import hashlib
import itertools
import textwrap
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from openbox.fmnist.data import load_sample
from openbox.fmnist.demo import demo_checkpoint
from openbox.loading import (
    ImageError,
    ModelLoadError,
    describe_arch,
    load_checkpoint_model,
    load_image,
    load_model_factory,
    looks_inverted,
)

_names = itertools.count()

NETS = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 26 * 26, 4))


def make_wide():
    return nn.Sequential(nn.Conv2d(1, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 26 * 26, 4))


def make_one_logit():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1))


def make_rgb():
    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 26 * 26, 4))


def broken():
    raise RuntimeError("no GPU today")


def not_a_model():
    return 42


class Zoo:
    @staticmethod
    def small():
        return make()


CONSTANT = 3
"""


def write_module(folder, source=NETS) -> str:
    """A uniquely named module in ``folder`` (imports are cached by name)."""
    name = f"user_nets_{next(_names)}"
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    return name


def reference_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 26 * 26, 4))


@pytest.fixture
def user(tmp_path, monkeypatch):
    """(module name, weights path, the trained reference model) in a temporary cwd."""
    monkeypatch.chdir(tmp_path)
    name = write_module(tmp_path)
    model = reference_model()
    with torch.no_grad():  # weights differ from what the factory builds: loading matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    return name, weights, model.eval()


def outputs(model, seed=0):
    x = torch.rand((5, 1, 28, 28), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


# --------------------------------------------------------------------------- models


def test_factory_and_state_dict_give_the_saved_model(user):
    name, weights, model = user
    loaded = load_model_factory(f"{name}:make", weights)
    assert not loaded.model.training and loaded.num_classes == 4
    assert loaded.input_shape == (1, 28, 28) and loaded.class_names is None
    torch.testing.assert_close(outputs(loaded.model), outputs(model), rtol=0, atol=0)
    assert loaded.description == f"{name}:make"
    assert loaded.provenance == {
        "kind": "factory", "factory": f"{name}:make", "weights": str(weights),
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }


def test_factory_from_a_file_path_and_a_nested_attribute(user):
    name, weights, model = user
    for spec in (f"{name}.py:make", f"{name}:Zoo.small"):
        loaded = load_model_factory(spec, weights)
        torch.testing.assert_close(outputs(loaded.model), outputs(model), rtol=0, atol=0)


def test_checkpoint_model_keeps_the_checkpoints_facts():
    loaded = load_checkpoint_model(demo_checkpoint())
    assert loaded.description == "cnn (channels 8/16)" and loaded.num_classes == 10
    assert loaded.provenance["kind"] == "checkpoint"
    assert loaded.provenance["checkpoint_sha256"] and loaded.provenance["arch"] == "cnn"
    assert describe_arch("cnn", {}) == "cnn"
    assert describe_arch("cnn", {"channels": [4, 8], "pool": "avg"}) == \
        "cnn (channels 4/8, pool avg)"


@pytest.mark.parametrize(("spec", "needles"), [
    ("{name}", ["expected MODULE:FACTORY"]),
    (":make", ["expected MODULE:FACTORY"]),
    ("no_such_module_xyz:make", ["no module named 'no_such_module_xyz'"]),
    ("{name}:nope", ["has no attribute 'nope'", "make"]),
    ("{name}:Zoo.large", ["Zoo has no attribute 'large'"]),
    ("{name}:CONSTANT", ["CONSTANT is a int, not a callable"]),
    ("{name}:broken", ["calling broken() failed", "RuntimeError: no GPU today"]),
    ("{name}:not_a_model", ["returned a int, expected a torch.nn.Module"]),
    ("{name}:make_wide", ["does not fit", "size mismatch for 3 entries",
                          "0.weight is (3, 1, 3, 3) in the file, (5, 1, 3, 3) in the model"]),
    ("{name}:make_one_logit", ["missing 2 entries", "unexpected 4 entries"]),
    ("missing_file.py:make", ["no such file missing_file.py"]),
])
def test_bad_factories_are_named(user, spec, needles):
    name, weights, _ = user
    with pytest.raises(ModelLoadError) as info:
        load_model_factory(spec.format(name=name), weights)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_a_module_whose_own_import_fails_is_told_apart_from_a_missing_one(tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = write_module(tmp_path, "import not_installed_dependency_xyz\n")
    with pytest.raises(ModelLoadError, match=f"importing {name} failed: ModuleNotFoundError"):
        load_model_factory(f"{name}:make", tmp_path / "w.pt")


def test_models_that_do_not_give_logits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = write_module(tmp_path)
    cases = {
        "make_rgb": (nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 26 * 26, 4)),
                     "the model fails on an input of shape (1, 1, 28, 28)"),
        "make_one_logit": (nn.Sequential(nn.Flatten(), nn.Linear(784, 1)),
                           "expected logits of shape (1, C) with C >= 2"),
    }
    for factory, (model, needle) in cases.items():
        weights = tmp_path / f"{factory}.pt"
        torch.save(model.state_dict(), weights)
        with pytest.raises(ModelLoadError) as info:
            load_model_factory(f"{name}:{factory}", weights)
        assert needle in str(info.value), str(info.value)


def test_bad_weight_files_are_named(user, tmp_path):
    name, weights, model = user
    spec = f"{name}:make"
    cases = {}
    cases["missing.pt"] = "no such file"
    (tmp_path / "garbage.pt").write_bytes(b"not a zip at all")
    cases["garbage.pt"] = "not a torch.save file"
    data = weights.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    cases["truncated.pt"] = "not a torch.save file"
    torch.save(model, tmp_path / "pickled-module.pt")  # a whole module: pickled code
    cases["pickled-module.pt"] = "torch.load(weights_only=True) refused or failed"
    torch.save([p.detach() for p in model.parameters()], tmp_path / "list.pt")
    cases["list.pt"] = "holds a list, not a state dict"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "record.pt")
    cases["record.pt"] = "training record with a 'state_dict' entry"
    torch.save(torch.load(demo_checkpoint(), weights_only=True), tmp_path / "ckpt.pt")
    cases["ckpt.pt"] = "this is an openbox checkpoint; pass it as the CKPT argument"
    for file, needle in cases.items():
        with pytest.raises(ModelLoadError) as info:
            load_model_factory(spec, tmp_path / file)
        assert needle in str(info.value) and file in str(info.value), (file, str(info.value))


def test_a_corrupted_member_of_the_archive_is_refused(user, tmp_path):
    name, weights, _ = user
    bad = tmp_path / "corrupt.pt"
    with zipfile.ZipFile(weights) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            content = src.read(item)
            if item.filename.endswith("data.pkl"):
                content = content[:10]  # the pickle that says what the tensors are, cut
            dst.writestr(item, content)
    with pytest.raises(ModelLoadError, match="refused or failed"):
        load_model_factory(f"{name}:make", bad)


# --------------------------------------------------------------------------- images


def write_png(path, array: np.ndarray, mode: str | None = None):
    Image.fromarray(array, mode=mode).save(path)
    return path


def test_png_pixels_are_scaled_as_the_dataset_scales_them(tmp_path):
    sample = load_sample()
    image = sample.images[7, 0]
    pixels = (image * 255).round().to(torch.uint8).numpy()
    x = load_image(write_png(tmp_path / "seven.png", pixels))
    assert x.shape == (1, 28, 28) and x.dtype == torch.float64
    # bit for bit the dataset's own float32 tensor, widened
    assert torch.equal(x, sample.images[7].double())


def test_16_bit_and_bilevel_pngs(tmp_path):
    rng = np.random.default_rng(0)
    deep = rng.integers(0, 65536, size=(28, 28), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    want = torch.from_numpy(deep.astype(np.float32) / np.float32(65535)).double()
    assert torch.equal(load_image(tmp_path / "deep.png")[0], want)
    bits = rng.integers(0, 2, size=(28, 28)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "bits.png")
    assert torch.equal(load_image(tmp_path / "bits.png")[0], torch.from_numpy(bits).double())


def test_npy_arrays_are_taken_as_they_are(tmp_path):
    a = np.random.default_rng(1).random((28, 28))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", a[None].astype(np.float32))
    assert torch.equal(load_image(tmp_path / "a.npy")[0], torch.from_numpy(a))
    assert torch.equal(load_image(tmp_path / "b.npy")[0],
                       torch.from_numpy(a.astype(np.float32)).double())


def test_bad_images_are_named(tmp_path):
    rng = np.random.default_rng(2)
    grey = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    cases = {}
    write_png(tmp_path / "rgb.png", np.stack([grey] * 3, axis=-1))
    cases["rgb.png"] = "PNG mode RGB is not greyscale"
    write_png(tmp_path / "small.png", grey[:, :27])
    cases["small.png"] = "27 x 28 pixels; expected 28 x 28"
    Image.fromarray(grey).save(tmp_path / "jpeg.png", format="JPEG")
    cases["jpeg.png"] = "a JPEG file named .png"
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG but not really")
    cases["garbage.png"] = "not a readable PNG"
    cases["missing.png"] = "no such file"
    (tmp_path / "photo.jpg").write_bytes(b"")
    cases["photo.jpg"] = "expected a .png or .npy file"
    nan = rng.random((28, 28))
    nan[3, 4] = nan[5, 6] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    cases["nan.npy"] = "2 values are NaN or infinite"
    np.save(tmp_path / "bytes.npy", grey)
    cases["bytes.npy"] = (f"values in [{grey.min()}, {grey.max()}]; expected pixels in [0, 1]; "
                          "divide by 255")
    np.save(tmp_path / "negative.npy", rng.random((28, 28)) - 0.5)
    cases["negative.npy"] = "expected pixels in [0, 1]"
    np.save(tmp_path / "shape.npy", rng.random((3, 28, 28)))
    cases["shape.npy"] = "shape (3, 28, 28); expected (28, 28) or (1, 28, 28)"
    np.save(tmp_path / "bool.npy", rng.random((28, 28)) > 0.5)
    cases["bool.npy"] = "dtype bool; expected a real"
    np.save(tmp_path / "object.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    cases["object.npy"] = "not a readable .npy array"
    for file, needle in cases.items():
        with pytest.raises(ImageError) as info:
            load_image(tmp_path / file)
        assert needle in str(info.value) and file in str(info.value), (file, str(info.value))


def test_inverted_images_are_recognised():
    x = load_sample().images[0].double()
    assert not looks_inverted(x) and looks_inverted(1 - x)
