"""The OpenBox paper's binary tasks (openbox.fmnist.tasks) and PLNN-NS training (the
``l1`` / ``nonnegative`` / ``penalty`` options of openbox.fmnist.training.train), and the
``openbox train --task/--l1/--nonnegative`` flags that reach the checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from openbox import cli, loading
from openbox.fmnist import training
from openbox.fmnist.checkpoints import load_checkpoint
from openbox.fmnist.data import (
    BINARY_TASKS,
    CLASSES,
    binary_subset,
    load_fashion_mnist,
    load_sample,
)
from openbox.fmnist.models import build_model
from openbox.fmnist.tasks import TASK_NAMES, TASKS, BinaryTask, binary_task, get_task, load_task
from openbox.fmnist.training import check_constraints, plnn_ns_layers, train
from tests.test_cli import tiny_data

HIDDEN = [16, 8]  # a small plnn: fc1 784->16, fc2 16->8, fc 8->2
NS_LAYERS = ("fc2", "fc")
BATCH = 50
EPOCHS = 2
PUSH = 10.0  # the test penalty's slope on one bias


@pytest.fixture(scope="module")
def sample():
    return load_sample()


@pytest.fixture(scope="module")
def boots(sample):
    """FMNIST-1 on the packaged sample: 200 images, labels 0 (Ankle boot) / 1 (Bag)."""
    return binary_task(sample, "fmnist-1")


def small_plnn(seed: int = 0) -> nn.Module:
    return build_model("plnn", 2, seed=seed, hidden=HIDDEN)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def l1_norm(model: nn.Module, names) -> float:
    modules = dict(model.named_modules())
    return float(sum(modules[n].weight.detach().abs().sum() for n in names))


# --------------------------------------------------------------------------- tasks


def test_the_registry_holds_the_papers_two_tasks():
    assert TASK_NAMES == ("fmnist-1", "fmnist-2")
    assert TASKS["fmnist-1"] == BinaryTask("fmnist-1", classes=(9, 8),
                                           class_names=("Ankle boot", "Bag"))
    assert TASKS["fmnist-2"] == BinaryTask("fmnist-2", classes=(4, 2),
                                           class_names=("Coat", "Pullover"))
    for task in TASKS.values():  # the same order as data.py's older table
        assert BINARY_TASKS[task.name] == task.classes
        assert task.class_names == tuple(CLASSES[c] for c in task.classes)
    assert TASKS["fmnist-1"].description == "Ankle boot (9) -> 0 vs Bag (8) -> 1"


@pytest.mark.parametrize("name", TASK_NAMES)
def test_a_task_keeps_exactly_its_two_classes_in_order_relabelled_0_1(sample, name):
    task = TASKS[name]
    first, second = task.classes
    keep = (sample.labels == first) | (sample.labels == second)  # the direct filter
    sub = binary_task(sample, name)
    assert len(sub) == int(keep.sum()) == 200
    assert torch.equal(sub.images, sample.images[keep])  # same images, same order
    assert torch.equal(sub.labels, (sample.labels[keep] == second).to(torch.int64))
    assert sub.labels.dtype == torch.int64 and sub.images.dtype == torch.float32
    assert torch.equal(sub.class_counts(), torch.tensor([100, 100]))
    assert sub.classes == task.class_names and sub.num_classes == 2
    assert name in sub.source and sample.source in sub.source
    # the label of each kept image names the class it came from
    originals = sample.labels[keep]
    assert [sub.classes[int(y)] for y in sub.labels] == [CLASSES[int(c)] for c in originals]
    # a BinaryTask works as well as its name, and agrees with data.binary_subset
    again = binary_task(sample, task)
    older = binary_subset(sample, name)
    assert torch.equal(again.images, sub.images) and torch.equal(again.labels, sub.labels)
    assert torch.equal(older.images, sub.images) and torch.equal(older.labels, sub.labels)


def test_an_unknown_task_is_refused_with_the_list_of_tasks(sample, tmp_path):
    for bad in ("fmnist-3", "FMNIST-1", "", 1):
        with pytest.raises(ValueError, match="unknown task") as info:
            binary_task(sample, bad)
        assert "fmnist-1" in str(info.value) and "fmnist-2" in str(info.value)
        assert "Ankle boot" in str(info.value)
    # checked before any file is read: the folder does not exist
    with pytest.raises(ValueError, match="unknown task 'fmnist-3'"):
        load_task("fmnist-3", "train", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")


def test_a_task_needs_a_ten_class_dataset(boots):
    with pytest.raises(ValueError, match="needs a 10-class Fashion-MNIST Dataset"):
        binary_task(boots, "fmnist-2")


def test_a_binary_task_checks_its_classes():
    with pytest.raises(ValueError, match="two distinct labels"):
        BinaryTask("x", classes=(9, 9), class_names=("Ankle boot", "Ankle boot"))
    with pytest.raises(ValueError, match="class_names must be"):
        BinaryTask("x", classes=(9, 8), class_names=("Bag", "Ankle boot"))


def test_load_task_reads_a_split_and_selects_the_task(tmp_path):
    data = tiny_data(tmp_path / "data")
    for split in ("train", "test"):
        full = load_fashion_mnist(split, data)
        got = load_task("fmnist-2", split, data)
        want = binary_task(full, "fmnist-2")
        assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
        assert got.classes == ("Coat", "Pullover") and len(got) > 0


# --------------------------------------------------------------------------- PLNN-NS layers


def test_plnn_ns_layers_are_every_weight_layer_but_the_first():
    assert plnn_ns_layers(build_model("plnn", 2, device="meta")) == ("fc2", "fc3", "fc")
    assert plnn_ns_layers(small_plnn()) == NS_LAYERS
    assert plnn_ns_layers(build_model("lenet", device="meta")) == ("conv2", "fc1", "fc2", "fc")
    with pytest.raises(ValueError, match="at least 2"):
        plnn_ns_layers(nn.Sequential(nn.Flatten(), nn.Linear(784, 2)))


# --------------------------------------------------------------------------- training


def test_nonnegative_layers_stay_nonnegative_while_the_others_go_negative(boots):
    model = small_plnn()
    assert float(model.fc2.weight.detach().min()) < 0
    assert float(model.fc.weight.detach().min()) < 0  # at start
    result = train(model, boots, epochs=EPOCHS, batch_size=BATCH, seed=0, progress=False,
                   nonnegative=NS_LAYERS)
    for name in NS_LAYERS:
        weight = getattr(model, name).weight.detach()
        assert float(weight.min()) >= 0, name
        assert bool((weight == 0).any()), name  # projected, not merely drifted
    assert float(model.fc1.weight.detach().min()) < 0  # the unconstrained input layer
    assert result.nonnegative == NS_LAYERS and result.l1 == 0.0 and result.l1_layers == ()
    assert result.options() == {"l1": 0.0, "l1_layers": [], "nonnegative": list(NS_LAYERS),
                                "penalty": None}
    assert result.train_penalty == [0.0] * EPOCHS


def test_l1_shrinks_the_constrained_weights(boots):
    norms = {}
    for lam in (0.0, 0.05):
        model = small_plnn(seed=1)
        result = train(model, boots, epochs=EPOCHS, batch_size=BATCH, seed=2, progress=False,
                       nonnegative=NS_LAYERS, l1=lam)
        norms[lam] = l1_norm(model, NS_LAYERS)
        assert result.l1 == lam
        assert result.l1_layers == (NS_LAYERS if lam > 0 else ())
        if lam > 0:  # the recorded penalty is the L1 term's mean over the epoch
            assert all(p > 0 for p in result.train_penalty)
    assert norms[0.05] < norms[0.0], norms
    # l1_layers chooses other layers (here without any non-negativity)
    plain, penalised = small_plnn(seed=1), small_plnn(seed=1)
    train(plain, boots, epochs=EPOCHS, batch_size=BATCH, seed=2, progress=False)
    result = train(penalised, boots, epochs=EPOCHS, batch_size=BATCH, seed=2, progress=False,
                   l1=0.05, l1_layers=["fc1"])
    assert result.l1_layers == ("fc1",) and result.nonnegative == ()
    assert l1_norm(penalised, ["fc1"]) < l1_norm(plain, ["fc1"])
    assert float(penalised.fc1.weight.detach().min()) < 0


def reference_training(model: nn.Module, dataset, *, epochs: int, batch_size: int, lr: float,
                       seed: int) -> None:
    """Plain minibatch Adam on the cross-entropy, as train() did before the new options."""
    shuffle = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(dataset), generator=shuffle)
            for start in range(0, len(dataset), batch_size):
                index = order[start:start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss_fn(model(dataset.images[index]), dataset.labels[index]).backward()
                optimizer.step()
    model.eval()


def test_the_defaults_train_exactly_as_before(boots):
    plain, explicit, reference = small_plnn(seed=4), small_plnn(seed=4), small_plnn(seed=4)
    a = train(plain, boots, epochs=EPOCHS, batch_size=BATCH, seed=3, progress=False)
    b = train(explicit, boots, epochs=EPOCHS, batch_size=BATCH, seed=3, progress=False,
              l1=0.0, nonnegative=(), l1_layers=None, penalty=None)
    reference_training(reference, boots, epochs=EPOCHS, batch_size=BATCH,
                       lr=training.DEFAULT_LR, seed=3)
    wa, wb, wr = weights(plain), weights(explicit), weights(reference)
    assert wa.keys() == wb.keys() == wr.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
        assert torch.equal(wa[key], wr[key]), key
    assert a.train_loss == b.train_loss and a.train_accuracy == b.train_accuracy
    assert a.options() == {"l1": 0.0, "l1_layers": [], "nonnegative": [], "penalty": None}
    # a zero l1 with layers named is no L1 term at all
    named = small_plnn(seed=4)
    train(named, boots, epochs=EPOCHS, batch_size=BATCH, seed=3, progress=False, l1=0.0,
          l1_layers=["fc1"])
    assert all(torch.equal(v, wa[k]) for k, v in weights(named).items())


def test_the_penalty_hook_is_called_and_its_gradient_reaches_the_model(boots):
    calls = []

    def push_bias_up(model, images, logits, epoch):
        value = -PUSH * model.fc.bias[0]
        calls.append((epoch, tuple(images.shape), tuple(logits.shape), logits.requires_grad,
                      float(value.detach())))
        return value

    def push_bias_down(model, images, logits, epoch):
        return PUSH * model.fc.bias[0]

    start = float(small_plnn(seed=5).fc.bias.detach()[0])
    up, down = small_plnn(seed=5), small_plnn(seed=5)
    result = train(up, boots, epochs=EPOCHS, batch_size=BATCH, seed=0, progress=False,
                   penalty=push_bias_up)
    train(down, boots, epochs=EPOCHS, batch_size=BATCH, seed=0, progress=False,
          penalty=push_bias_down)
    steps = len(boots) // BATCH
    assert len(calls) == EPOCHS * steps
    assert [c[0] for c in calls] == [e for e in range(1, EPOCHS + 1) for _ in range(steps)]
    assert all(c[1] == (BATCH, 1, 28, 28) and c[2] == (BATCH, 2) and c[3] for c in calls)
    # the push's gradient (+-PUSH) dominates the cross-entropy's on that bias, and Adam
    # then moves it by about lr per step, each way as the penalty says
    travel = training.DEFAULT_LR * EPOCHS * steps
    assert float(up.fc.bias.detach()[0]) - start > 0.9 * travel
    assert start - float(down.fc.bias.detach()[0]) > 0.9 * travel
    assert result.penalty.endswith("push_bias_up")
    for epoch, recorded in enumerate(result.train_penalty, start=1):  # equal batches
        values = [c[4] for c in calls if c[0] == epoch]
        assert recorded == pytest.approx(sum(values) / len(values), rel=1e-12, abs=0)
    assert result.options()["penalty"] == result.penalty


def test_a_penalty_that_is_not_a_scalar_tensor_is_refused(boots):
    def vector(model, images, logits, epoch):
        return logits.sum(dim=0)

    with pytest.raises(ValueError, match=r"must return a scalar floating-point tensor.*\(2,\)"):
        train(small_plnn(), boots, epochs=1, batch_size=BATCH, progress=False, penalty=vector)
    with pytest.raises(ValueError, match="got a float"):
        train(small_plnn(), boots, epochs=1, batch_size=BATCH, progress=False,
              penalty=lambda *args: 1.0)


@pytest.mark.parametrize(("options", "needles"), [
    ({"nonnegative": ["fc9"]}, ["unknown module(s) ['fc9']", "'fc1'"]),
    ({"nonnegative": ["relu1"]}, ["['relu1'] have no weight parameter", "'fc2'"]),
    ({"nonnegative": ["fc2", "flatten"]}, ["['flatten']"]),
    ({"nonnegative": "fc2"}, ["sequence of module names"]),
    ({"nonnegative": [2]}, ["module names (str)"]),
    ({"l1_layers": ["fc7"], "l1": 0.1}, ["l1_layers: unknown module(s) ['fc7']"]),
    ({"l1": -0.1, "nonnegative": ["fc"]}, ["l1 must be a finite number >= 0"]),
    ({"l1": float("nan"), "nonnegative": ["fc"]}, ["l1 must be a finite number >= 0"]),
    ({"l1": True, "nonnegative": ["fc"]}, ["l1 must be a finite number >= 0"]),
    ({"l1": 0.1}, ["needs layers to penalise"]),
    ({"penalty": 5}, ["penalty must be callable"]),
])
def test_bad_options_are_refused_before_training(boots, options, needles):
    model = small_plnn()
    before = weights(model)
    with pytest.raises(ValueError) as info:
        train(model, boots, epochs=1, batch_size=BATCH, progress=False, **options)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    assert all(torch.equal(v, before[k]) for k, v in weights(model).items())


def test_check_constraints_normalises_the_names():
    checked = check_constraints(small_plnn(), l1=0.5, nonnegative=["fc", "fc2", "fc"])
    assert checked.nonnegative == ("fc", "fc2") and checked.l1_layers == ("fc", "fc2")
    assert check_constraints(small_plnn(), l1=0, nonnegative=["fc"]).l1_layers == ()


# --------------------------------------------------------------------------- command line


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--model", "plnn", "--hidden",
            *map(str, HIDDEN), "--epochs", "1", "--batch-size", "20", *extra]


def test_the_cli_trains_plnn_ns_on_a_task_and_records_it(tmp_path, capsys):
    data, out = tiny_data(tmp_path / "data"), tmp_path / "ns.pt"
    code = cli.main(train_args(data, out, "--task", "fmnist-1", "--l1", "0.01",
                               "--nonnegative", "all-but-first"))
    assert code == 0, capsys.readouterr().err
    model, info = load_checkpoint(out)
    assert info.num_classes == 2 and info.arch_kwargs == {"hidden": HIDDEN}
    meta = info.metadata
    assert meta["task"] == "fmnist-1" and meta["task_classes"] == [9, 8]
    assert meta["classes"] == ["Ankle boot", "Bag"]
    assert meta["l1"] == 0.01 and meta["nonnegative"] == list(NS_LAYERS)
    assert meta["l1_layers"] == list(NS_LAYERS)
    train_set = binary_task(load_fashion_mnist("train", data), "fmnist-1")
    test_set = binary_task(load_fashion_mnist("test", data), "fmnist-1")
    assert meta["train_images"] == len(train_set) and meta["test_images"] == len(test_set)
    for name in NS_LAYERS:
        assert float(getattr(model, name).weight.detach().min()) >= 0
    assert loading.load_checkpoint_model(out).class_names == ("Ankle boot", "Bag")
    assert "task fmnist-1" in capsys.readouterr().out
    # explicit names, and no task: a 10-class model with the defaults recorded
    out2 = tmp_path / "plain.pt"
    assert cli.main(train_args(data, out2, "--nonnegative", "fc")) == 0
    _, info2 = load_checkpoint(out2)
    assert info2.num_classes == 10 and info2.metadata["task"] is None
    assert info2.metadata["nonnegative"] == ["fc"] and info2.metadata["l1"] == 0.0
    assert info2.metadata["l1_layers"] == []


def test_the_cli_reproduces_the_papers_setting(tmp_path, capsys, monkeypatch):
    """--model plnn --task fmnist-1 --epochs 10 --batch-size 1000: 784-256-128-100-2, Adam."""
    seen = {}

    def record(model, train_set, test_set, **kwargs):
        seen.update(model=model, train_set=train_set, kwargs=kwargs)
        result = training.TrainResult(train_loss=[0.0], train_accuracy=[0.5],
                                      test_accuracy=[0.5], seconds=[0.0], train_penalty=[0.0])
        return result

    monkeypatch.setattr(training, "train", record)
    data = tiny_data(tmp_path / "data")
    assert cli.main(["train", "--data", str(data), "--out", str(tmp_path / "p.pt"), "--model",
                     "plnn", "--task", "fmnist-1", "--epochs", "10", "--batch-size", "1000"]) == 0
    linears = [m for m in seen["model"].modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 256), (256, 128), (128, 100), (100, 2)]
    kwargs = seen["kwargs"]
    assert kwargs["epochs"] == 10 and kwargs["batch_size"] == 1000
    assert kwargs["lr"] == training.DEFAULT_LR
    assert kwargs["l1"] == 0.0 and kwargs["nonnegative"] == ()
    assert seen["train_set"].classes == ("Ankle boot", "Bag")
    assert set(seen["train_set"].labels.tolist()) <= {0, 1}
    _, info = load_checkpoint(tmp_path / "p.pt")
    assert info.metadata["optimizer"] == "Adam" and info.metadata["task"] == "fmnist-1"


@pytest.mark.parametrize(("extra", "needles"), [
    (["--nonnegative", "fc9"], ["--nonnegative fc9", "unknown module(s) ['fc9']"]),
    (["--nonnegative", "fc2,relu1"], ["['relu1'] have no weight parameter"]),
    (["--nonnegative", "fc2,,fc"], ["found an empty name"]),
    (["--l1", "0.1"], ["--l1 0.1", "--nonnegative all-but-first"]),
    (["--l1", "-1", "--nonnegative", "fc"], ["--l1 must be a finite number >= 0"]),
    (["--l1", "nan", "--nonnegative", "fc"], ["--l1 must be a finite number >= 0"]),
])
def test_bad_cli_constraints_are_refused_before_training(tmp_path, capsys, monkeypatch, extra,
                                                         needles):
    def fail(*args, **kwargs):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(training, "train", fail)
    monkeypatch.setattr(cli, "load_fashion_mnist", fail)  # and before the data are read
    out = tmp_path / "x.pt"
    assert cli.main(train_args(tmp_path / "nowhere", out, *extra)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("openbox: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()


def test_an_unknown_cli_task_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "x.pt"), "--task", "fmnist-3"]) == 2
    err = capsys.readouterr().err
    assert "fmnist-3" in err and "fmnist-1" in err and "fmnist-2" in err


def test_a_non_finite_penalty_stops_training_as_divergence(boots):
    def nan(model, images, logits, epoch):
        return logits.new_tensor(float("nan"))

    with pytest.raises(training.TrainingDivergedError, match="epoch 1/1, step 1/"):
        train(small_plnn(), boots, epochs=1, batch_size=BATCH, progress=False, penalty=nan)


def test_the_cli_trains_with_the_mmr_penalty_and_records_it(tmp_path, capsys, monkeypatch):
    from openbox.fmnist.regularisers import MMRPenalty

    seen = {}
    real = training.train

    def spy(model, train_set, test_set, **kwargs):
        seen.update(kwargs)
        return real(model, train_set, test_set, **kwargs)

    monkeypatch.setattr(training, "train", spy)
    data, out = tiny_data(tmp_path / "data"), tmp_path / "mmr.pt"
    code = cli.main(train_args(data, out, "--mmr", "0.5", "--mmr-gamma", "0.02", "--mmr-k",
                               "3", "--mmr-ramp-epochs", "0", "--mmr-probes", "3",
                               "--mmr-examples", "4"))
    assert code == 0, capsys.readouterr().err
    p = seen["penalty"]
    assert isinstance(p, MMRPenalty)
    assert (p.weight, p.gamma, p.k, p.ramp_epochs, p.probes, p.max_examples) == (
        0.5, 0.02, 3, 0.0, 3, 4)
    _, info = load_checkpoint(out)
    assert info.metadata["mmr"] == {"weight": 0.5, "gamma": 0.02, "k": 3, "ramp_epochs": 0.0,
                                    "probes": 3, "max_examples": 4}
    assert "MMR penalty weight 0.5" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--mmr-k", "3"], "--mmr-k needs --mmr WEIGHT"),
    (["--mmr", "0.5", "--mmr-probes", "2"], "--mmr:"),
])
def test_the_cli_refuses_bad_mmr_options_before_training(tmp_path, capsys, monkeypatch, argv,
                                                         needle):
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("training started"))
    data = tiny_data(tmp_path / "data")
    assert cli.main(train_args(data, tmp_path / "x.pt", *argv)) == 2
    assert needle in capsys.readouterr().err
