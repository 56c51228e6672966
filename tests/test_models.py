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
from openbox.fmnist.training import TrainingDivergedError, TrainResult, evaluate, train

PIECEWISE_LINEAR = (nn.Sequential, nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU,
                    nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)
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


@pytest.mark.parametrize("seed", [2**70, 2**63, -1, True, 1.5, "0"])
def test_seed_out_of_range_is_named(seed, split):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63 - 1\]"):
        build_model("cnn", seed=seed)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63 - 1\]"):
        train(build_model("plnn", seed=0), split[0], epochs=1, seed=seed, progress=False)


def test_largest_seed_is_accepted():
    assert models.MAX_SEED == 2**63 - 1
    a, b = build_model("plnn", seed=models.MAX_SEED), build_model("plnn", seed=models.MAX_SEED)
    assert torch.equal(a.fc.weight, b.fc.weight)


def test_absurd_sizes_are_refused_before_allocating(monkeypatch):
    initialise = nn.init.kaiming_uniform_

    def no_real_weights(tensor, *args, **kwargs):
        if not tensor.is_meta:
            raise AssertionError(f"a {tuple(tensor.shape)} weight tensor was allocated")
        return initialise(tensor, *args, **kwargs)

    # kaiming init of a real Conv2d of this size would need 1.4 TB; on meta it costs nothing
    monkeypatch.setattr(nn.init, "kaiming_uniform_", no_real_weights)
    with pytest.raises(ValueError, match=r"'cnn' .*channels': \[200000, 200000\].* would hold "
                                         r"360,101,800,012 parameters and buffers; at most "
                                         r"MAX_PARAMETERS = 50,000,000"):
        build_model("cnn", channels=[200000, 200000])
    monkeypatch.undo()
    with pytest.raises(ValueError, match="MAX_PARAMETERS"):
        build_model("plnn", 10**8)
    with pytest.raises(ValueError, match="cannot be built: Storage size calculation overflowed"):
        build_model("cnn", channels=[10**18, 1])
    with pytest.raises(ValueError, match=r"hidden must be 1 to 64 positive integers, got "
                                         r"1,000,000 entries"):
        build_model("plnn", hidden=[1] * 10**6)
    with pytest.raises(ValueError, match="at most 5 widths fit a 28x28 image"):
        build_model("gap", channels=[4] * 6)
    deepest = build_model("gap", channels=[4] * 5).eval()
    assert deepest(torch.zeros(1, *INPUT_SHAPE)).shape == (1, 10)
    with pytest.raises(ValueError, match="batch_norm must be True or False, got 'yes'"):
        build_model("cnn", batch_norm="yes")
    with pytest.raises(ValueError, match=r"channels must be 2 positive integers, got \(8.5, 16\)"):
        build_model("cnn", channels=[8.5, 16])
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        build_model("cnn", 2.5)


def test_meta_build_and_state_size():
    skeleton = build_model("cnn", device="meta", channels=(4, 8))
    assert all(t.is_meta for t in skeleton.state_dict().values())
    real = build_model("cnn", channels=(4, 8))
    assert models.state_size(skeleton) == models.state_size(real) == sum(
        t.numel() for t in real.state_dict().values())
    with pytest.raises(ValueError, match="device must be None"):
        build_model("cnn", device="cpu")


# --- training --------------------------------------------------------------------------


@pytest.mark.parametrize(("lr", "where", "step"), [
    (1e30, "at epoch 1/2, step 2/2: the loss is nan", 2),
    # the loss stays finite; the BN statistics overflow: only the end-of-epoch check sees it
    (1e10, "in epoch 1/2: bn2.running_var hold NaN or infinite values", None),
    (1e38, "at epoch 1/2, step 1/2: the update overflows the weights' dtype", 1),
])
def test_diverging_training_raises(split, lr, where, step):
    train_set, _ = split
    model = build_model("cnn", seed=0, channels=(4, 8))
    with pytest.raises(TrainingDivergedError) as err:
        train(model, train_set.subset(torch.arange(64)), epochs=2, batch_size=32, lr=lr,
              seed=0, progress=False)
    message = str(err.value)
    assert message.startswith(f"training diverged {where}"), message
    assert message.endswith(f"Try a lower learning rate (lr was {lr:g}).")
    assert isinstance(err.value, RuntimeError)
    assert (err.value.epoch, err.value.step, err.value.lr) == (1, step, lr)
    assert torch.are_deterministic_algorithms_enabled() is False  # the context was left


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 0.0, -1e-3])
def test_non_finite_or_non_positive_lr_is_refused(split, lr):
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        train(build_model("plnn", seed=0), split[0], epochs=1, lr=lr, progress=False)


def test_save_refuses_non_finite_weights(tmp_path):
    model = build_model("cnn", seed=0, channels=(4, 8))
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("nan")
        model.bn2.running_var[0] = float("inf")
    with pytest.raises(CheckpointError, match=r"refusing to save: 2 state_dict entries hold NaN "
                                              r"or infinite values \(conv1.weight, "
                                              r"bn2.running_var\)"):
        save_checkpoint(tmp_path / "nan.pt", model, arch="cnn", arch_kwargs={"channels": [4, 8]},
                        num_classes=10)
    assert list(tmp_path.iterdir()) == []


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


def resave(src: Path, dst: Path, *, redigest: bool = True, **changes) -> Path:
    """Copy a checkpoint with ``changes`` (values, or callables editing the record).

    ``redigest``: recompute the digest, as a forger would, so that only the check under
    test can object; False leaves the file's digest as it was.
    """
    record = torch.load(src, weights_only=True)
    for key, value in changes.items():
        if callable(value):
            value(record)
        else:
            record[key] = value
    if redigest:
        record["sha256"] = checkpoints.record_digest(record)
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
    assert record["format"] == checkpoints.CHECKPOINT_FORMAT and record["version"] == 2
    assert record["sha256"] == info.sha256 == checkpoints.record_digest(record)
    assert info.version == 2 and "state_dict_sha256" not in record


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

    tampered = resave(path, tmp_path / "t.pt", redigest=False, tamper=bump)
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
    """Remove one buffer (resave fixes the digest, so only the architecture check objects)."""
    del record["state_dict"]["bn2.running_var"]


def test_wrong_input_shape(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointError, match=r"input_shape \(3, 32, 32\).*expected \(1, 28, 28\)"):
        load_checkpoint(resave(path, tmp_path / "s.pt", input_shape=[3, 32, 32]))


def test_missing_keys_and_wrong_format(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointError, match="'num_classes' missing"):
        load_checkpoint(resave(path, tmp_path / "nc.pt", redigest=False,
                               tamper=lambda r: r.pop("num_classes")))
    with pytest.raises(CheckpointError, match="expected format tag 'openbox-checkpoint'"):
        load_checkpoint(resave(path, tmp_path / "f.pt", format="something"))
    with pytest.raises(CheckpointError, match="unsupported checkpoint version 99"):
        load_checkpoint(resave(path, tmp_path / "v.pt", version=99))
    with pytest.raises(CheckpointError, match=r"unexpected fields 'extra'"):
        load_checkpoint(resave(path, tmp_path / "e.pt", extra=1))
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
    evil = resave(path, tmp_path / "evil.pt", redigest=False, metadata={"x": Payload()})
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
