"""openbox.fmnist.checkpoints against hostile and damaged files: the digest covers the whole
record, nothing is allocated before the file is known to fit, text is made printable,
and paths that are not regular files are named as such."""

from __future__ import annotations

import os
import sys
import threading
import types

import pytest
import torch
from test_models import resave as forge

from openbox.fmnist import checkpoints, models
from openbox.fmnist.checkpoints import (
    CheckpointError,
    load_checkpoint,
    printable_text,
    record_digest,
    save_checkpoint,
    state_dict_digest,
)
from openbox.fmnist.demo import demo_checkpoint
from openbox.fmnist.models import build_model

FIFO_WAIT_S = 10.0
HOSTILE_TEXT = "T-shirt\x1b[31m\x1b]0;pwned\x07\nopenbox: forged line\u202e\x00\x7f\x85"


@pytest.fixture
def saved(tmp_path):
    """A small cnn checkpoint; returns its path."""
    model = build_model("cnn", 10, seed=0, channels=(4, 8)).eval()
    return save_checkpoint(tmp_path / "m.pt", model, arch="cnn", arch_kwargs={"channels": [4, 8]},
                           num_classes=10, metadata={"dataset": "sample", "seed": 0})




# --- the digest covers every field -------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("arch_kwargs", {"channels": [4, 8], "batch_norm": True}),
    ("num_classes", 9),
    ("metadata", {"dataset": "sample", "seed": 1}),
    ("input_shape", [1, 28, 29]),
    ("arch", "gap"),
])
def test_any_field_edited_fails_the_digest(saved, tmp_path, field, value):
    edited = forge(saved, tmp_path / "edited.pt", redigest=False, **{field: value})
    with pytest.raises(CheckpointError, match=r"sha256 digest mismatch.*the record \(fields and "
                                              r"weights\) hash to") as err:
        load_checkpoint(edited)
    assert str(edited) in str(err.value)


def test_record_digest_is_canonical(saved):
    record = torch.load(saved, weights_only=True)
    reordered = dict(reversed(list(record.items())))
    reordered["metadata"] = dict(reversed(list(record["metadata"].items())))
    assert record_digest(reordered) == record_digest(record) == record["sha256"]
    assert record_digest({**record, "metadata": {**record["metadata"], "seed": 0.0}}) != \
        record["sha256"]  # 0 and 0.0 are different values


def test_version_1_files_still_load_with_their_state_dict_digest(saved, tmp_path):
    def as_version_1(record):
        record["version"] = 1
        del record["sha256"]
        record["state_dict_sha256"] = state_dict_digest(record["state_dict"])

    old = forge(saved, tmp_path / "v1.pt", redigest=False, tamper=as_version_1)
    model, info = load_checkpoint(old)
    assert info.version == 1 and info.sha256 == state_dict_digest(model.state_dict())
    assert info.arch_kwargs == {"channels": [4, 8]}

    def bump(record):
        record["state_dict"]["fc.bias"][0] += 1.0

    tampered = forge(old, tmp_path / "v1-tampered.pt", redigest=False, tamper=bump)
    with pytest.raises(CheckpointError, match="state_dict_sha256 digest mismatch.*the weights"):
        load_checkpoint(tampered)


def test_packaged_demo_is_version_2():
    _, info = load_checkpoint(demo_checkpoint())
    record = torch.load(demo_checkpoint(), weights_only=True)
    assert info.version == record["version"] == checkpoints.CHECKPOINT_VERSION == 2
    assert info.sha256 == record["sha256"] == record_digest(record)


# --- nothing is allocated before the file is known to fit --------------------------------


def test_forged_huge_architecture_is_refused_without_allocating(saved, tmp_path, monkeypatch):
    # the weights of a (4, 8) cnn in a small file that asks for channels [200000, 200000]:
    # building that model for real would need 1.4 TB
    forged = forge(saved, tmp_path / "huge.pt", arch_kwargs={"channels": [200000, 200000]})
    assert forged.stat().st_size < 64_000
    real_build = checkpoints.build_model

    def meta_only(*args, device=None, **kwargs):
        if device is None:
            raise AssertionError(f"a real model was built for {kwargs}")
        return real_build(*args, device=device, **kwargs)

    monkeypatch.setattr(checkpoints, "build_model", meta_only)
    with pytest.raises(CheckpointError, match=r"would hold 360,101,800,012 parameters and "
                                              r"buffers; at most MAX_PARAMETERS = 50,000,000"):
        load_checkpoint(forged)


def test_state_dict_shapes_are_checked_before_allocating(saved, tmp_path, monkeypatch):
    # within the size bound but not what the weights are: refused from shapes alone
    forged = forge(saved, tmp_path / "wide.pt", arch_kwargs={"channels": [512, 512]})
    initialise = torch.nn.init.kaiming_uniform_

    def meta_only(tensor, *args, **kwargs):
        if not tensor.is_meta:
            raise AssertionError(f"a {tuple(tensor.shape)} weight was allocated and initialised")
        return initialise(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", meta_only)
    monkeypatch.setattr(torch.nn.Module, "to_empty", no_allocation)
    with pytest.raises(CheckpointError, match=r"does not fit architecture 'cnn'.*size mismatch "
                                              r"for 13 entries \(conv1.weight is \(4, 1, 3, 3\) "
                                              r"in the file, \(512, 1, 3, 3\) in the model"):
        load_checkpoint(forged)


def no_allocation(self, *args, **kwargs):
    raise AssertionError("memory was allocated for the model")


def test_archive_larger_than_the_bound_is_refused_before_torch_load(saved, monkeypatch):
    monkeypatch.setattr(checkpoints, "MAX_ARCHIVE_BYTES", 1_000)
    monkeypatch.setattr(checkpoints.torch, "load", no_allocation)
    with pytest.raises(CheckpointError, match=r"entries hold [\d,]+ bytes once extracted; a "
                                              r"checkpoint holds at most 1,000"):
        load_checkpoint(saved)


def test_archive_bound_fits_the_largest_model():
    assert checkpoints.MAX_ARCHIVE_BYTES >= models.MAX_PARAMETERS * 8


def test_shared_sublists_cannot_expand_exponentially(saved, tmp_path):
    # 25 levels of [x, x]: a few hundred bytes of pickle, 2**25 values once walked
    bomb: list = [0]
    for _ in range(25):
        bomb = [bomb, bomb]
    forged = forge(saved, tmp_path / "laughs.pt", redigest=False,
                   metadata={"dataset": "sample", "classes": bomb})
    assert forged.stat().st_size < 64_000
    with pytest.raises(CheckpointError, match="hold more than 100,000 values"):
        load_checkpoint(forged)
    deep: list = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(CheckpointError, match=r"metadata\['x'\](\[0\])+ is nested more than 32"):
        load_checkpoint(forge(saved, tmp_path / "deep.pt", redigest=False, metadata={"x": deep}))


def test_non_plain_metadata_is_refused(saved, tmp_path):
    forged = forge(saved, tmp_path / "tensor.pt", redigest=False,
                   metadata={"note": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"metadata\['note'\] is a Tensor; checkpoints hold "
                                              r"only str, int"):
        load_checkpoint(forged)


def test_non_finite_weights_in_a_file_are_refused(saved, tmp_path):
    def poison(record):
        record["state_dict"]["conv2.weight"][0, 0, 0, 0] = float("nan")

    with pytest.raises(CheckpointError, match=r"1 state_dict entries hold NaN or infinite values "
                                              r"\(conv2.weight\)"):
        load_checkpoint(forge(saved, tmp_path / "nan.pt", tamper=poison))


# --- text from a file reaches nobody raw -------------------------------------------------


def test_printable_text():
    assert printable_text("Ankle boot") == "Ankle boot"
    assert printable_text("a\x1b[2Jb\nc\u202ed") == "a\\x1b[2Jb\\nc\\u202ed"
    assert printable_text(HOSTILE_TEXT).isprintable()


def test_metadata_text_is_made_printable(saved, tmp_path):
    names = [HOSTILE_TEXT] + [f"class {i}" for i in range(1, 10)]
    forged = forge(saved, tmp_path / "ansi.pt",
                   metadata={"classes": names, "dataset\x1b[8m": "\u202eevil\r\nline"})
    _, info = load_checkpoint(forged)
    texts = [*info.metadata, *info.metadata["classes"], info.metadata["dataset\\x1b[8m"]]
    assert all(text.isprintable() for text in texts), texts
    assert info.metadata["classes"][0] == (
        "T-shirt\\x1b[31m\\x1b]0;pwned\\x07\\nopenbox: forged line\\u202e\\x00\\x7f\\x85")
    assert info.metadata["dataset\\x1b[8m"] == "\\u202eevil\\r\\nline"


def test_file_derived_names_in_errors_are_printable(saved, tmp_path):
    def add_entry(record):
        record["state_dict"]["fc.weight\x1b[2J\nopenbox: all good"] = torch.zeros(1)

    cases = {
        "entry": forge(saved, tmp_path / "entry.pt", tamper=add_entry),
        "arch": forge(saved, tmp_path / "arch.pt", arch="cnn\x1b[2J" + "x" * 1000),
        "kwarg": forge(saved, tmp_path / "kwarg.pt", arch_kwargs={"pool\x1b[2J\n": "max"}),
        "format": forge(saved, tmp_path / "format.pt", redigest=False, format="\x1b[2J"),
    }
    for what, path in cases.items():
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        message = str(err.value)
        assert message.isprintable() and "\x1b" not in message, (what, message)
        assert len(message) < 1_000, (what, len(message))


def test_refused_global_name_is_printable(saved, tmp_path, monkeypatch):
    module = types.ModuleType("evil\x1b[2J")

    class Payload:
        pass

    Payload.__module__ = module.__name__
    Payload.__qualname__ = "Payload"
    module.Payload = Payload
    monkeypatch.setitem(sys.modules, module.__name__, module)
    forged = forge(saved, tmp_path / "global.pt", redigest=False, metadata={"x": Payload()})
    with pytest.raises(CheckpointError, match="refused to unpickle") as err:
        load_checkpoint(forged)
    assert str(err.value).isprintable(), str(err.value)


# --- paths that are not regular files ----------------------------------------------------


def test_directory_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"is a directory, not a checkpoint file") as err:
        load_checkpoint(tmp_path)
    assert "no such" not in str(err.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_named_without_blocking(tmp_path):
    fifo = tmp_path / "ckpt.pt"
    os.mkfifo(fifo)
    outcome: list = []

    def load():
        try:
            load_checkpoint(fifo)
        except Exception as exc:  # handed to the test thread
            outcome.append(exc)

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(FIFO_WAIT_S)
    if reader.is_alive():  # release the blocked reader before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("load_checkpoint blocked on a FIFO")
    assert isinstance(outcome[0], CheckpointError), outcome
    assert "is not a regular file" in str(outcome[0]) and str(fifo) in str(outcome[0])

