"""openbox.fmnist.models, openbox.fmnist.training, openbox.fmnist.checkpoints."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from openbox.fmnist import checkpoints, models
from openbox.fmnist.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from openbox.fmnist.data import load_sample
from openbox.fmnist.models import INPUT_SHAPE, MODEL_NAMES, MODELS, build_model, count_parameters
from openbox.fmnist.training import TrainResult, evaluate, train

PIECEWISE_LINEAR = (nn.Sequential, nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU,
                    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)
DEMO_CHECKPOINT = Path(models.__file__).parent / "_data" / "demo-cnn.pt"
TRAIN_ROWS = 800  # sample rows used for training; the other 200 are held out
TRAIN_FLOOR = 0.4  # one short epoch must beat chance (0.1) by a real margin


@pytest.fixture(scope="module")
def sample():
    return load_sample()


@pytest.fixture(scope="module")
def split(sample):
    return sample.subset(torch.arange(TRAIN_ROWS)), sample.subset(torch.arange(TRAIN_ROWS, 1000))


# --- models ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("num_classes", [10, 2])
def test_logits_shape(name, num_classes):
    model = build_model(name, num_classes, seed=0).eval()
    out = model(torch.rand(3, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (3, num_classes) and out.dtype == torch.float32


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_only_piecewise_linear_layers(name):
    for path, module in build_model(name).named_modules():
        assert type(module) in PIECEWISE_LINEAR, f"{name}: {path!r} is {type(module).__name__}"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_description_parameter_count_is_true(name):
    spec = MODELS[name]
    stated = re.search(r"([\d,]+) parameters", spec.description)
    assert stated, spec.description
    actual = count_parameters(build_model(name))
    assert int(stated.group(1).replace(",", "")) == actual == spec.default_parameters
    assert "\n" not in spec.description
    assert name in models.describe_models()


def test_architectures_are_as_documented():
    cnn = build_model("cnn")
    assert [type(m).__name__ for m in cnn] == [
        "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
        "Flatten", "Linear"]
    assert (cnn.conv1.in_channels, cnn.conv1.out_channels, cnn.conv1.padding) == (1, 16, (1, 1))
    assert cnn.fc.in_features == 32 * 7 * 7
    plnn = build_model("plnn")
    assert [m.out_features for m in plnn if isinstance(m, nn.Linear)] == [256, 128, 100, 10]
    lenet = build_model("lenet")
    assert sum(isinstance(m, nn.AvgPool2d) for m in lenet) == 2
    assert not any(isinstance(m, nn.MaxPool2d) for m in lenet)
    gap = build_model("gap", 2)
    assert [type(m).__name__ for m in gap][-3:] == ["AdaptiveAvgPool2d", "Flatten", "Linear"]
    assert gap.fc.in_features == gap.conv3.out_channels


def test_model_options():
    narrow = build_model("cnn", channels=(8, 16))
    assert narrow.conv2.out_channels == 16 and narrow.fc.in_features == 16 * 7 * 7
    plain = build_model("cnn", batch_norm=False, pool="avg")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain)
    assert plain(torch.zeros(1, *INPUT_SHAPE)).shape == (1, 10)
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet")
    with pytest.raises(ValueError, match="invalid options for model 'plnn'"):
        build_model("plnn", channels=(1, 2))
    with pytest.raises(ValueError, match="2 positive integers"):
        build_model("cnn", channels=(8,))
    with pytest.raises(ValueError, match="pool must be one of"):
        build_model("cnn", pool="min")


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = build_model("gap", seed=3), build_model("gap", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    c = build_model("gap", seed=4)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


# --- training --------------------------------------------------------------------------


def test_one_epoch_beats_chance_and_is_deterministic(split):
    train_set, test_set = split
    runs = []
    for _ in range(2):
        model = build_model("cnn", seed=0)
        result = train(model, train_set, test_set, epochs=1, batch_size=32, seed=0,
                       progress=False)
        runs.append((model, result))
    (model, result), (again, _) = runs
    assert isinstance(result, TrainResult) and result.epochs == 1
    assert len(result.train_accuracy) == len(result.test_accuracy) == len(result.seconds) == 1
    assert result.test_accuracy[0] >= TRAIN_FLOOR
    assert result.test_accuracy[0] == evaluate(model, test_set, batch_size=64)
    assert not model.training
    for (name, x), y in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_training_seed_changes_the_result_and_rng_is_restored(split):
    train_set, _ = split
    small = train_set.subset(torch.arange(64))
    state = torch.get_rng_state()
    a, b = build_model("plnn", seed=0), build_model("plnn", seed=0)
    train(a, small, epochs=1, batch_size=16, seed=0, progress=False)
    train(b, small, epochs=1, batch_size=16, seed=1, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(a.fc.weight, b.fc.weight)
    assert torch.are_deterministic_algorithms_enabled() is False


def test_train_without_test_set_and_argument_checks(split):
    train_set, _ = split
    model = build_model("plnn", seed=0)
    result = train(model, train_set.subset(torch.arange(32)), epochs=2, batch_size=16,
                   progress=False)
    assert result.epochs == 2 and result.test_accuracy == [] and result.final_test_accuracy is None
    with pytest.raises(ValueError, match="epochs and batch_size must be >= 1"):
        train(model, train_set, epochs=0, progress=False)


def test_evaluate_restores_mode(split):
    _, test_set = split
    model = build_model("cnn", seed=0)
    assert model.training
    accuracy = evaluate(model, test_set)
    assert 0.0 <= accuracy <= 1.0 and model.training


# --- checkpoints -----------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """A small cnn with non-trivial BN statistics, saved; returns (model, path)."""
    model = build_model("cnn", 10, seed=0, channels=(4, 8))
    model.train()
    with torch.no_grad():
        model(torch.rand(16, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1)))
    model.eval()
    path = save_checkpoint(tmp_path / "m.pt", model, arch="cnn", arch_kwargs={"channels": (4, 8)},
                           num_classes=10, input_shape=INPUT_SHAPE,
                           metadata={"dataset": "sample", "accuracy": 0.5, "epochs": 1, "seed": 0})
    return model, path


def resave(src: Path, dst: Path, **changes) -> Path:
    record = torch.load(src, weights_only=True)
    for key, value in changes.items():
        if callable(value):
            value(record)
        else:
            record[key] = value
    torch.save(record, dst)
    return dst


def test_checkpoint_round_trip(saved):
    model, path = saved
    loaded, info = load_checkpoint(path)
    assert not loaded.training
    x = torch.rand(5, *INPUT_SHAPE, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded(x), model(x))
    assert info.arch == "cnn" and info.arch_kwargs == {"channels": [4, 8]}
    assert info.num_classes == 10 and info.input_shape == INPUT_SHAPE
    assert info.metadata["accuracy"] == 0.5 and info.metadata["torch_version"] == torch.__version__
    record = torch.load(path, weights_only=True)  # plain data only
    assert record["format"] == checkpoints.CHECKPOINT_FORMAT and record["version"] == 1
    assert record["state_dict_sha256"] == info.sha256


def test_saving_twice_gives_identical_bytes(saved, tmp_path):
    model, path = saved
    again = save_checkpoint(tmp_path / "other-name.pt", model, arch="cnn",
                            arch_kwargs={"channels": [4, 8]}, num_classes=10,
                            metadata={"dataset": "sample", "accuracy": 0.5, "epochs": 1, "seed": 0})
    assert again.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "other-name.pt"]  # no temp files


def test_tampered_weights_fail_the_digest(saved, tmp_path):
    _, path = saved

    def bump(record):
        record["state_dict"]["fc.weight"][0, 0] += 1e-3

    tampered = resave(path, tmp_path / "t.pt", tamper=bump)
    with pytest.raises(CheckpointError, match="digest mismatch") as err:
        load_checkpoint(tampered)
    assert str(tampered) in str(err.value)


def test_wrong_arch_name(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointError, match=r"unknown architecture 'resnet18'.*'cnn'"):
        load_checkpoint(resave(path, tmp_path / "a.pt", arch="resnet18"))


def test_state_dict_that_does_not_fit(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointError, match=r"does not fit architecture 'cnn'.*size mismatch"):
        load_checkpoint(resave(path, tmp_path / "k.pt", arch_kwargs={"channels": [8, 16]}))
    plnn_mismatch = r"'plnn'.*fc.weight is \(10, 392\).*missing 6.*unexpected 14"
    with pytest.raises(CheckpointError, match=plnn_mismatch):
        load_checkpoint(resave(path, tmp_path / "p.pt", arch="plnn", arch_kwargs={}))
    with pytest.raises(CheckpointError, match=r"missing 1 entries \(bn2.running_var\)"):
        load_checkpoint(resave(path, tmp_path / "r.pt", tamper=drop_running_var))


def drop_running_var(record):
    """Remove one buffer and fix the digest, so only the architecture check can object."""
    del record["state_dict"]["bn2.running_var"]
    record["state_dict_sha256"] = checkpoints.state_dict_digest(record["state_dict"])


def test_wrong_input_shape(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointError, match=r"input_shape \(3, 32, 32\).*expected \(1, 28, 28\)"):
        load_checkpoint(resave(path, tmp_path / "s.pt", input_shape=[3, 32, 32]))


def test_missing_keys_and_wrong_format(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointError, match="'num_classes' missing"):
        load_checkpoint(resave(path, tmp_path / "m.pt", tamper=lambda r: r.pop("num_classes")))
    with pytest.raises(CheckpointError, match="expected format tag 'openbox-checkpoint'"):
        load_checkpoint(resave(path, tmp_path / "f.pt", format="something"))
    with pytest.raises(CheckpointError, match="unsupported checkpoint version 99"):
        load_checkpoint(resave(path, tmp_path / "v.pt", version=99))
    bare = tmp_path / "bare.pt"
    torch.save(build_model("cnn").state_dict(), bare)
    with pytest.raises(CheckpointError, match="expected format tag"):
        load_checkpoint(bare)


def test_truncated_file(saved, tmp_path):
    _, path = saved
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a torch checkpoint") as err:
        load_checkpoint(cut)
    assert str(cut) in str(err.value)


def test_not_a_torch_file_and_missing_file(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_checkpoint(text)
    pickled = tmp_path / "plain-pickle.pt"
    pickled.write_bytes(pickle.dumps({"format": "openbox-checkpoint"}))
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_checkpoint(pickled)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.pt")


class Payload:
    """An arbitrary object: weights_only loading must refuse to rebuild it."""

    def __init__(self):
        self.value = 1


def test_pickled_object_is_refused(saved, tmp_path):
    _, path = saved
    evil = resave(path, tmp_path / "evil.pt", metadata={"x": Payload()})
    with pytest.raises(CheckpointError, match=r"refused to unpickle.*Payload"):
        load_checkpoint(evil)


def test_save_refuses_mismatch_and_non_plain_metadata(tmp_path):
    model = build_model("cnn", seed=0)
    with pytest.raises(CheckpointError, match="refusing to save.*does not fit architecture 'plnn'"):
        save_checkpoint(tmp_path / "x.pt", model, arch="plnn", num_classes=10)
    fc_mismatch = r"refusing to save.*size mismatch for 2 entries \(fc.weight is \(10, 1568\)"
    with pytest.raises(CheckpointError, match=fc_mismatch):
        save_checkpoint(tmp_path / "y.pt", model, arch="cnn", num_classes=5)
    with pytest.raises(CheckpointError, match=r"metadata\['model'\] is a Sequential"):
        save_checkpoint(tmp_path / "z.pt", model, arch="cnn", num_classes=10,
                        metadata={"model": model})
    assert list(tmp_path.iterdir()) == []


def test_packaged_demo_checkpoint(sample):
    assert DEMO_CHECKPOINT.stat().st_size < 200_000
    model, info = load_checkpoint(DEMO_CHECKPOINT)
    assert info.arch == "cnn" and info.num_classes == 10 and info.input_shape == INPUT_SHAPE
    for key in ("dataset", "test_accuracy", "epochs", "seed", "torch_version"):
        assert key in info.metadata, key
    # the sample comes from the test split the demo was evaluated on
    assert evaluate(model, sample) >= 0.8
