"""openbox.fmnist.data: IDX files, folders, download errors, offline copy, sample, binary tasks."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import struct
import threading
import tracemalloc
import urllib.error
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openbox.fmnist import data, idx
from openbox.fmnist.data import (
    CLASSES,
    DATA_DIR_ENV,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    SPLITS,
    Dataset,
    DatasetError,
    binary_subset,
    load_fashion_mnist,
    load_sample,
    read_idx,
    select_classes,
    write_idx,
)

REPO = Path(__file__).resolve().parents[1]
# the full data: $OPENBOX_DATA_DIR if set (as CI and users set it), else ../shared beside
# the clone
OFFLINE_DIR = Path(os.environ.get(DATA_DIR_ENV) or REPO.parent / "shared" / "datasets"
                   / "fashion-mnist")
needs_offline = pytest.mark.skipif(
    not all((OFFLINE_DIR / name).is_file() for pair in SPLITS.values() for name in pair),
    reason=f"full Fashion-MNIST not found at {OFFLINE_DIR} (set {DATA_DIR_ENV}; CI has it at "
    "../shared)",
)


GZIP_WBITS = 31  # zlib's gzip container
BLOCK = 1 << 20
BOMB_BYTES = 50 << 20
FEW_MB = 4 << 20
FIFO_WAIT_S = 10.0


def random_images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray,
                *, gz: bool = True) -> None:
    """Write one split under the official names (or the names without .gz)."""
    for name, array in zip(SPLITS[split], (images, labels), strict=True):
        write_idx(folder / (name if gz else name.removesuffix(".gz")), array)


@pytest.fixture
def no_data_env(monkeypatch, tmp_path):
    """No $OPENBOX_DATA_DIR and an empty private cache, whatever the machine has."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path


# --- IDX round trips -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize("kind", ["images", "labels"])
def test_idx_round_trip(tmp_path, suffix, kind):
    rng = np.random.default_rng(0)
    array = random_images(rng, 7) if kind == "images" else rng.integers(0, 10, 7, dtype=np.uint8)
    magic = IDX_IMAGES_MAGIC if kind == "images" else IDX_LABELS_MAGIC
    path = write_idx(tmp_path / f"{kind}-idx-ubyte{suffix}", array)
    back = read_idx(path, expected_magic=magic)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, array)
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == (suffix == ".gz")


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_idx_round_trip_any_shape(tmp_path_factory, shape, seed):
    array = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    path = write_idx(tmp_path_factory.mktemp("idx") / "a.gz", array)
    np.testing.assert_array_equal(read_idx(path), array)


def test_gzip_output_is_deterministic(tmp_path):
    array = random_images(np.random.default_rng(1), 3)
    a = write_idx(tmp_path / "a" / "x-idx3-ubyte.gz", array).read_bytes()
    b = write_idx(tmp_path / "b" / "x-idx3-ubyte.gz", array).read_bytes()
    assert a == b
    assert a[4:8] == b"\x00\x00\x00\x00"  # gzip mtime field


def test_write_idx_rejects_non_uint8(tmp_path):
    with pytest.raises(TypeError, match="uint8"):
        write_idx(tmp_path / "f.gz", np.zeros(3, dtype=np.float32))


# --- malformed files -------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_payload(tmp_path, gz):
    content = idx_bytes(random_images(np.random.default_rng(2), 4))[:-10]
    path = tmp_path / ("t.gz" if gz else "t")
    path.write_bytes(gzip.compress(content) if gz else content)
    with pytest.raises(DatasetError, match=r"truncated IDX payload") as err:
        read_idx(path)
    message = str(err.value)
    assert str(path) in message
    assert "(4, 28, 28) needs 3136 bytes, found 3126" in message


def test_over_long_payload(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.arange(5, dtype=np.uint8)) + b"\x00")
    with pytest.raises(DatasetError, match=r"over-long IDX payload.*needs 5 bytes, found 6"):
        read_idx(path)


def test_truncated_header(tmp_path):
    path = tmp_path / "h"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 1]))  # 3 dims announced, 1 given
    with pytest.raises(DatasetError, match=r"truncated IDX header: 3 dimensions need 16 bytes"):
        read_idx(path)


def test_wrong_magic(tmp_path):
    labels = write_idx(tmp_path / "labels.gz", np.zeros(3, dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"expected 0x00000803, found 0x00000801") as err:
        read_idx(labels, expected_magic=IDX_IMAGES_MAGIC)
    assert str(labels) in str(err.value)


def test_not_idx_at_all(tmp_path):
    path = tmp_path / "text"
    path.write_bytes(b"hello world")
    with pytest.raises(DatasetError, match="two zero bytes"):
        read_idx(path)


def test_wrong_dtype_byte(tmp_path):
    path = tmp_path / "floats"
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 2) + b"\x00" * 8)
    with pytest.raises(DatasetError, match=r"expected 0x08 \(unsigned byte\), found 0x0d"):
        read_idx(path)


def test_corrupted_gzip(tmp_path):
    good = write_idx(tmp_path / "good.gz", random_images(np.random.default_rng(3), 20))
    raw = bytearray(good.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 16] = bytes(16)
    bad = tmp_path / "bad.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="corrupt gzip data") as err:
        read_idx(bad)
    assert str(bad) in str(err.value)


def test_truncated_gzip_stream(tmp_path):
    good = write_idx(tmp_path / "good.gz", random_images(np.random.default_rng(4), 20))
    bad = tmp_path / "cut.gz"
    bad.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="corrupt gzip data"):
        read_idx(bad)


def test_gz_name_without_gzip_content(tmp_path):
    path = tmp_path / "plain.gz"
    path.write_bytes(idx_bytes(np.zeros(2, dtype=np.uint8)))
    with pytest.raises(DatasetError, match="expected a gzip file"):
        read_idx(path)


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        read_idx(tmp_path / "nothing.gz")


def gzip_stream(header: bytes, zeros: int) -> bytes:
    """gzip of ``header`` then ``zeros`` zero bytes, compressed piece by piece (the
    inflated content never exists in memory)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, GZIP_WBITS)
    parts = [packer.compress(header)]
    block = bytes(BLOCK)
    for start in range(0, zeros, BLOCK):
        parts.append(packer.compress(block[:min(BLOCK, zeros - start)]))
    parts.append(packer.flush())
    return b"".join(parts)


def test_gzip_bomb_is_refused_without_inflating(tmp_path):
    # a valid header announcing (10, 28, 28), then 50 MB of zeros: ~50 KB on disk
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 10, 28, 28)
    path = tmp_path / "bomb-idx3-ubyte.gz"
    path.write_bytes(gzip_stream(header, BOMB_BYTES))
    assert path.stat().st_size < BOMB_BYTES // 100
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=r"over-long IDX payload.*\(10, 28, 28\) needs "
                                               r"7840 bytes, found more") as err:
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value)
    assert peak < FEW_MB, f"read_idx held {peak:,} bytes at once for a 7,840-byte payload"


def test_header_announcing_an_absurd_size(tmp_path):
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2**16, 2**16, 2**16)
    for path in (tmp_path / "absurd-idx3-ubyte", tmp_path / "absurd-idx3-ubyte.gz"):
        path.write_bytes(gzip.compress(header + bytes(100)) if path.suffix else header)
        with pytest.raises(DatasetError, match=r"announces shape \(65536, 65536, 65536\), "
                                               r"281,474,976,710,656 bytes; at most "
                                               r"2,147,483,648") as err:
            read_idx(path)
        assert str(path) in str(err.value)
    assert idx.MAX_IDX_PAYLOAD == 2**31


def test_short_gzip_payload_holds_only_what_arrived(tmp_path):
    # announces 2 GiB (allowed) but delivers 1 MB: the reader must not reserve 2 GiB
    header = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 2**31)
    path = tmp_path / "short.gz"
    path.write_bytes(gzip_stream(header, 1 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=r"truncated IDX payload.*needs 2147483648 "
                                               r"bytes, found 1048576"):
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < FEW_MB


def test_directory_and_fifo_are_named_not_opened(tmp_path):
    with pytest.raises(DatasetError, match="is a directory"):
        read_idx(tmp_path)
    if not hasattr(os, "mkfifo"):
        return
    fifo = tmp_path / "fifo-idx1-ubyte"
    os.mkfifo(fifo)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(catch(read_idx, fifo)), daemon=True)
    reader.start()
    reader.join(FIFO_WAIT_S)
    if reader.is_alive():  # unblock the reader before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_idx blocked on a FIFO")
    assert isinstance(outcome[0], DatasetError) and "is not a regular file" in str(outcome[0])


def catch(function, *args):
    try:
        return function(*args)
    except Exception as exc:  # returned for the test to inspect
        return exc


def test_count_mismatch_between_images_and_labels(tmp_path):
    rng = np.random.default_rng(5)
    write_split(tmp_path, "test", random_images(rng, 5), np.zeros(4, dtype=np.uint8))
    with pytest.raises(DatasetError, match="expected the same N, found 5 images and 4 labels"):
        load_fashion_mnist("test", tmp_path)


def test_label_out_of_range(tmp_path):
    rng = np.random.default_rng(6)
    write_split(tmp_path, "test", random_images(rng, 2), np.array([3, 10], dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"expected labels 0..9, found 10"):
        load_fashion_mnist("test", tmp_path)


def test_unknown_split(tmp_path):
    with pytest.raises(DatasetError, match="unknown split 'validation'"):
        load_fashion_mnist("validation", tmp_path)


# --- folders ---------------------------------------------------------------------------


def tiny_split(folder: Path, n: int, *, gz: bool = True) -> None:
    rng = np.random.default_rng(n)
    write_split(folder, "test", random_images(rng, n), rng.integers(0, 10, n, dtype=np.uint8),
                gz=gz)


def test_loader_layout_and_scaling(tmp_path):
    rng = np.random.default_rng(7)
    images = random_images(rng, 6)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = np.arange(6, dtype=np.uint8)
    write_split(tmp_path, "test", images, labels)
    ds = load_fashion_mnist("test", tmp_path)
    assert ds.images.shape == (6, 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == list(range(6))
    assert ds.classes == CLASSES
    assert ds.images[0, 0, 0, 0] == 0.0 and ds.images[0, 0, 0, 1] == 1.0
    torch.testing.assert_close(ds.images[:, 0], torch.from_numpy(images).float() / 255,
                               rtol=0, atol=0)
    assert str(tmp_path) in ds.source


def test_uncompressed_files_are_read(tmp_path):
    tiny_split(tmp_path, 3, gz=False)
    assert len(load_fashion_mnist("test", tmp_path)) == 3


def test_resolution_order(monkeypatch, tmp_path):
    explicit, env, cache = tmp_path / "explicit", tmp_path / "env", tmp_path / "xdg"
    tiny_split(explicit, 2)
    tiny_split(env, 3)
    tiny_split(cache / "openbox" / "fashion-mnist", 4)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv(DATA_DIR_ENV, str(env))
    assert len(load_fashion_mnist("test", explicit)) == 2
    assert len(load_fashion_mnist("test")) == 3
    monkeypatch.delenv(DATA_DIR_ENV)
    assert len(load_fashion_mnist("test")) == 4


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.default_cache_dir() == tmp_path / "openbox" / "fashion-mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "openbox" / "fashion-mnist"


def test_missing_files_without_download(no_data_env):
    with pytest.raises(DatasetError) as err:
        load_fashion_mnist("train")
    message = str(err.value)
    assert str(no_data_env / "xdg-cache" / "openbox" / "fashion-mnist") in message
    assert "train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz" in message
    assert f"set {DATA_DIR_ENV}" in message and "--data DIR" in message
    assert "../shared/datasets/fashion-mnist" in message


def test_missing_files_in_explicit_dir(no_data_env):
    folder = no_data_env / "empty"
    folder.mkdir()
    with pytest.raises(DatasetError, match=r"given as data_dir.*t10k-images-idx3-ubyte\.gz"):
        load_fashion_mnist("test", folder)


# --- download (never touches the network) ----------------------------------------------


def failing_fetch(url, handle, *, progress, desc):
    raise urllib.error.URLError("no route to host")


def test_download_failure_says_what_to_do(no_data_env, monkeypatch):
    monkeypatch.setattr(data, "_fetch", failing_fetch)
    with pytest.raises(DatasetError) as err:
        load_fashion_mnist("test", download=True, progress=False)
    message = str(err.value)
    assert "could not download Fashion-MNIST file t10k-images-idx3-ubyte.gz" in message
    assert "no route to host" in message
    assert data.MIRRORS[0] in message and data.MIRRORS[1] in message
    assert f"set {DATA_DIR_ENV}" in message and "--data DIR" in message
    cache = no_data_env / "xdg-cache" / "openbox" / "fashion-mnist"
    assert list(cache.iterdir()) == []  # no partial files left behind


def test_download_unreachable_url(tmp_path):
    missing = (tmp_path / "no-such-mirror").as_uri() + "/"
    with pytest.raises(DatasetError, match=f"{DATA_DIR_ENV}"):
        data.download_fashion_mnist(tmp_path / "dest", names=["t10k-labels-idx1-ubyte.gz"],
                                    mirrors=[missing], progress=False)
    assert list((tmp_path / "dest").iterdir()) == []


def test_download_checksum_mismatch_is_discarded(tmp_path):
    def wrong_bytes(url, handle, *, progress, desc):
        handle.write(b"not the real file")

    official = data.FILES["t10k-labels-idx1-ubyte.gz"]
    with pytest.raises(DatasetError, match=f"MD5 mismatch, expected {official}"):
        data.download_fashion_mnist(tmp_path, names=["t10k-labels-idx1-ubyte.gz"],
                                    progress=False, fetch=wrong_bytes)
    assert list(tmp_path.iterdir()) == []


def test_download_keeps_file_when_checksum_matches(tmp_path, monkeypatch):
    labels = gzip.compress(idx_bytes(np.arange(10, dtype=np.uint8)), mtime=0)
    images = gzip.compress(idx_bytes(random_images(np.random.default_rng(8), 10)), mtime=0)
    served = {"t10k-labels-idx1-ubyte.gz": labels, "t10k-images-idx3-ubyte.gz": images}
    fake_sums = {name: hashlib.md5(blob).hexdigest() for name, blob in served.items()}
    monkeypatch.setattr(data, "FILES", {**data.FILES, **fake_sums})
    calls = []

    def serve(url, handle, *, progress, desc):
        calls.append(url)
        if url.startswith("http://first/"):
            raise urllib.error.URLError("first mirror down")
        handle.write(served[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(data, "_fetch", serve)
    monkeypatch.setattr(data, "MIRRORS", ("http://first/", "http://second/"))
    ds = load_fashion_mnist("test", tmp_path / "dl", download=True, progress=False)
    assert len(ds) == 10 and ds.labels.tolist() == list(range(10))
    assert calls[0].startswith("http://first/") and calls[1].startswith("http://second/")
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == sorted(served)


# --- the offline copy and the packaged sample ------------------------------------------


@needs_offline
def test_offline_copy():
    train = load_fashion_mnist("train", OFFLINE_DIR)
    test = load_fashion_mnist("test", OFFLINE_DIR)
    assert train.images.shape == (60000, 1, 28, 28)
    assert test.images.shape == (10000, 1, 28, 28)
    assert train.class_counts().tolist() == [6000] * 10
    assert test.class_counts().tolist() == [1000] * 10
    assert 0.0 <= float(test.images.min()) and float(test.images.max()) <= 1.0


def test_sample_loads_without_a_folder(no_data_env):
    sample = load_sample()
    assert isinstance(sample, Dataset)
    assert sample.images.shape == (1000, 1, 28, 28) and sample.images.dtype == torch.float32
    assert sample.class_counts().tolist() == [100] * 10
    assert float(sample.images.min()) == 0.0 and float(sample.images.max()) == 1.0
    assert sample.classes == CLASSES
    image, label = sample[0]
    assert image.shape == (1, 28, 28) and isinstance(label, int)


def test_sample_is_small():
    folder = Path(data.__file__).parent / "_data"
    total = sum((folder / name).stat().st_size for name in data.SAMPLE_FILES)
    assert total < 1_000_000


@needs_offline
def test_sample_is_first_hundred_per_class_of_offline_test():
    test = load_fashion_mnist("test", OFFLINE_DIR)
    rows = torch.cat([torch.nonzero(test.labels == c).flatten()[:100] for c in range(10)])
    rows = rows.sort().values
    sample = load_sample()
    assert torch.equal(sample.labels, test.labels[rows])
    assert torch.equal(sample.images, test.images[rows])


@needs_offline
def test_make_sample_regenerates_packaged_files(tmp_path, monkeypatch):
    script_path = REPO / "experiments" / "make_sample.py"
    spec = importlib.util.spec_from_file_location("make_sample", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr("sys.argv", ["make_sample.py", "--data", str(OFFLINE_DIR),
                                     "--out", str(tmp_path)])
    script.main()
    packaged = Path(data.__file__).parent / "_data"
    for name in data.SAMPLE_FILES:
        assert (tmp_path / name).read_bytes() == (packaged / name).read_bytes(), name


# --- subsets ---------------------------------------------------------------------------


@pytest.mark.parametrize(("task", "zero", "one"), [("fmnist-1", 9, 8), ("fmnist-2", 4, 2)])
def test_binary_subsets(task, zero, one):
    sample = load_sample()
    sub = binary_subset(sample, task)
    assert sub.classes == (CLASSES[zero], CLASSES[one])
    assert len(sub) == 200 and sub.class_counts().tolist() == [100, 100]
    assert sub.labels.dtype == torch.int64 and set(sub.labels.tolist()) == {0, 1}
    assert torch.equal(sub.images[sub.labels == 0], sample.images[sample.labels == zero])
    assert torch.equal(sub.images[sub.labels == 1], sample.images[sample.labels == one])
    keep = (sample.labels == zero) | (sample.labels == one)
    assert torch.equal(sub.images, sample.images[keep])  # original order kept


def test_select_classes_by_name_and_errors():
    sample = load_sample()
    sub = select_classes(sample, ["Bag", "Trouser", "Coat"])
    assert sub.classes == ("Bag", "Trouser", "Coat") and len(sub) == 300
    assert torch.equal(sub.images[sub.labels == 1], sample.images[sample.labels == 1])
    with pytest.raises(ValueError, match="unknown class 'Hat'"):
        select_classes(sample, ["Hat", "Bag"])
    with pytest.raises(ValueError, match="distinct"):
        select_classes(sample, [8, "Bag"])
    with pytest.raises(ValueError, match="unknown binary task"):
        binary_subset(sample, "fmnist-3")
    with pytest.raises(ValueError, match="10-class"):
        binary_subset(sub, "fmnist-1")


def test_subset_and_dataset_validation():
    sample = load_sample()
    part = sample.subset(torch.arange(10))
    assert len(part) == 10 and torch.equal(part.images, sample.images[:10])
    with pytest.raises(ValueError, match="same N"):
        Dataset(sample.images[:3], sample.labels[:2], CLASSES, "x")
