"""Save and load trained reference models, safely and strictly.

A checkpoint is one ``torch.save`` file holding a dict of plain data only (tensors,
str, int, float, bool, None, lists, dicts), so it loads with
``torch.load(path, weights_only=True)`` and never runs pickled code::

    {
        "format": "openbox-checkpoint",        # CHECKPOINT_FORMAT
        "version": 2,                          # CHECKPOINT_VERSION
        "arch": "cnn",                         # a name in openbox.fmnist.models.MODEL_NAMES
        "arch_kwargs": {"channels": [8, 16]},  # options for build_model (lists, not tuples)
        "num_classes": 10,
        "input_shape": [1, 28, 28],            # (C, H, W) of one input
        "state_dict": {name: tensor, ...},     # the model's state_dict, on CPU
        "metadata": {"dataset": ..., "accuracy": ..., "epochs": ..., "seed": ...,
                     "torch_version": "2.13.0+cpu", ...},
        "sha256": "ab12...",                   # record_digest: every field above
    }

The digest covers the whole record (:func:`record_digest`): the canonical JSON of every
field but the state dict, then the state dict's names, dtypes, shapes and bytes.
Version 1 files (written before the digest covered more than the weights) still load:
they carry ``"state_dict_sha256"`` (:func:`state_dict_digest`, the state dict only) in
place of ``"sha256"``, so their ``arch``, ``arch_kwargs``, ``num_classes`` and
``metadata`` are checked by every other test below but not by a digest.

:func:`load_checkpoint` checks, in this order, and raises :class:`CheckpointError`
naming the file and the problem on any failure (nothing mismatched is accepted
silently):

1. the path is a regular file (a directory or FIFO is named as such; a FIFO is never
   read, it would block) and a zip archive whose entries hold at most
   :data:`MAX_ARCHIVE_BYTES` in all;
2. ``torch.load(..., weights_only=True)`` succeeds; format tag, version, exactly the
   expected fields with the expected types, plain data in ``arch_kwargs`` and
   ``metadata`` (at most :data:`MAX_PLAIN_VALUES` values);
3. the digest;
4. the architecture, built on the ``meta`` device (no memory): its size is within
   :data:`openbox.fmnist.models.MAX_PARAMETERS`, and the state dict has exactly its
   names and shapes; every floating-point entry is finite;
5. only then is memory allocated: the weights are loaded strictly and a dry run checks
   that the declared input shape gives ``(1, num_classes)`` logits.

Text read from a file never reaches the caller raw: strings in the returned
``metadata`` and every file-derived name in an error message have their non-printable
characters (ANSI escapes, newlines, bidirectional overrides, ...) replaced by visible
escapes (:func:`printable_text`).
"""

from __future__ import annotations

import hashlib
import io
import json
import numbers
import os
import re
import stat
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from openbox.fmnist.idx import atomic_target
from openbox.fmnist.models import INPUT_SHAPE, MAX_PARAMETERS, MODEL_NAMES, build_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "MAX_ARCHIVE_BYTES",
    "MAX_PLAIN_VALUES",
    "SUPPORTED_VERSIONS",
    "CheckpointError",
    "CheckpointInfo",
    "load_checkpoint",
    "printable_text",
    "record_digest",
    "save_checkpoint",
    "state_dict_digest",
]

CHECKPOINT_FORMAT = "openbox-checkpoint"
CHECKPOINT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
DIGEST_FIELDS = {1: "state_dict_sha256", 2: "sha256"}
"""Version -> the field holding its digest (v1: state dict only; v2: the whole record)."""
DIGESTED_FIELDS = ("format", "version", "arch", "arch_kwargs", "num_classes", "input_shape",
                   "metadata")  # and the state dict, hashed after them
FIELD_TYPES: dict[str, type] = {
    "format": str,
    "version": int,
    "arch": str,
    "arch_kwargs": dict,
    "num_classes": int,
    "input_shape": list,
    "state_dict": dict,
    "metadata": dict,
}
MAX_ARCHIVE_BYTES = MAX_PARAMETERS * 8 + (64 << 20)
"""Most bytes the archive's entries may hold once extracted: the largest model in
float64 plus 64 MiB of pickle and metadata. Checked from the zip directory, before
``torch.load`` allocates anything."""
MAX_PLAIN_VALUES = 100_000
"""Most values (strings, numbers, lists, dicts) ``arch_kwargs`` and ``metadata`` may hold
together, counted as they are walked: a pickle can share one list many times over, and
the digest would expand every copy."""
MAX_PLAIN_DEPTH = 32  # nesting of lists and dicts in arch_kwargs and metadata
MAX_INPUT_DIMS = 8
MAX_SHOWN = 80  # characters of a file-derived value quoted in a message
DRY_RUN_BATCH = 1
MAX_LISTED = 3  # entries named in a mismatch message before "and N more"
WEIGHTS_ONLY_MARKER = "WeightsUnpickler error:"  # torch's line naming the refused global
ALLOWLIST_ADVICE = " Please use"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, unsafe, malformed or does not fit its
    architecture. The message names the file and says what is wrong."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about its model (everything but the weights).

    Attributes:
        path: the file read.
        arch, arch_kwargs, num_classes: rebuild with
            ``build_model(arch, num_classes, **arch_kwargs)``.
        input_shape: ``(C, H, W)`` of one input, e.g. ``(1, 28, 28)``.
        metadata: free-form plain data (dataset, accuracy, epochs, seed, torch_version,
            ...); every string in it (keys too) is :func:`printable_text`.
        sha256: the digest the file carries and was checked against: of the whole record
            (:func:`record_digest`) for version 2, of the state dict only
            (:func:`state_dict_digest`) for version 1.
        version: the file's format version (1 or 2).
    """

    path: Path
    arch: str
    arch_kwargs: dict[str, Any]
    num_classes: int
    input_shape: tuple[int, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    version: int = CHECKPOINT_VERSION


# --- text from files -----------------------------------------------------------------


def printable_text(text: str) -> str:
    """``text`` with each non-printable character replaced by its Python escape.

    Non-printable as ``str.isprintable`` says: control characters (ESC, newline, tab,
    DEL, C1 controls), format characters (bidirectional overrides, zero-width
    characters) and separators other than the ASCII space. ESC becomes the four
    characters ``\\x1b``, a newline ``\\n``, U+202E ``\\u202e``; so text from a file can
    neither drive a terminal nor forge output lines, and what it held stays visible.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _shown(value: Any) -> str:
    """A file-derived value for a message: its repr (which escapes control characters),
    cut to MAX_SHOWN characters."""
    text = printable_text(repr(value))
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text):,} chars)"


def _printable_data(value: Any) -> Any:
    """A copy of plain data with every string (dict keys too) made printable_text."""
    if isinstance(value, str):
        return printable_text(value)
    if isinstance(value, list):
        return [_printable_data(v) for v in value]
    if isinstance(value, dict):
        return {printable_text(k): _printable_data(v) for k, v in value.items()}
    return value


def _loaded_plain(value: Any, where: str) -> Any:
    """A copy of file-read ``value`` if it is plain data (dict with str keys, list, str,
    int, float, bool, None: exactly what :func:`save_checkpoint` writes); ValueError
    naming the first offending place otherwise, or when it holds more than
    MAX_PLAIN_VALUES values or nests deeper than MAX_PLAIN_DEPTH."""
    count = 0

    def walk(v: Any, where: str, depth: int) -> Any:
        nonlocal count
        count += 1
        if count > MAX_PLAIN_VALUES:
            raise ValueError(f"arch_kwargs and metadata hold more than {MAX_PLAIN_VALUES:,} "
                             "values")
        if depth > MAX_PLAIN_DEPTH:
            raise ValueError(f"{where} is nested more than {MAX_PLAIN_DEPTH} levels deep")
        if v is None or type(v) in (bool, int, float, str):
            return v
        if type(v) is list:
            return [walk(x, f"{where}[{i}]", depth + 1) for i, x in enumerate(v)]
        if type(v) is dict:
            out = {}
            for key, x in v.items():
                if type(key) is not str:
                    raise ValueError(f"{where} has a key of type {type(key).__name__}, "
                                     "expected str")
                out[key] = walk(x, f"{where}[{_shown(key)}]", depth + 1)
            return out
        raise ValueError(f"{where} is a {type(v).__name__}; checkpoints hold only str, int, "
                         "float, bool, None, lists and dicts there")

    return walk(value, where, 0)


# --- digests -------------------------------------------------------------------------


def _hash_state_dict(digest: Any, state_dict: Mapping[str, torch.Tensor]) -> None:
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{_shown(name)}] is a {type(tensor).__name__}, "
                            "not a tensor")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        header = f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0{flat.numel()}\0"
        digest.update(header.encode("utf-8", "surrogatepass"))
        digest.update(flat.view(torch.uint8).numpy().tobytes())


def state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and raw bytes, in sorted name order.

    Independent of device and of the order entries were inserted; any change to a
    value, a shape, a dtype or a name changes it. The digest of version 1 files.
    """
    digest = hashlib.sha256()
    _hash_state_dict(digest, state_dict)
    return digest.hexdigest()


def record_digest(record: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint record (version 2): every field but the digest itself.

    Hashes the canonical JSON (sorted keys, no spaces, ASCII only) of
    ``format, version, arch, arch_kwargs, num_classes, input_shape, metadata``, a NUL
    byte (which that JSON never contains), then the state dict as
    :func:`state_dict_digest` does. Any change to any field changes it.
    """
    header = {name: record[name] for name in DIGESTED_FIELDS}
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=True)
    digest = hashlib.sha256()
    digest.update(text.encode("ascii"))
    digest.update(b"\0")
    _hash_state_dict(digest, record["state_dict"])
    return digest.hexdigest()


# --- fitting a state dict to an architecture -------------------------------------------


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain data (tuples become lists); TypeError naming ``where`` otherwise."""
    # exact builtin types: subclasses (torch.__version__ is a TorchVersion, numpy
    # scalars) would be pickled as their own class and refused by weights_only loading
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for key, v in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a non-string key {key!r}")
            out[key] = _plain(v, f"{where}[{key!r}]")
        return out
    raise TypeError(
        f"{where} is a {type(value).__name__}; checkpoints hold only str, int, float, bool, "
        "None, lists and dicts"
    )


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    more = len(names) - MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown


def state_dict_problems(expected: Mapping[str, torch.Tensor],
                        found: Mapping[str, torch.Tensor]) -> str:
    """One line saying how ``found`` differs from ``expected`` (names, shapes); '' if it fits.

    ``expected`` may live on the meta device: only names and shapes are read.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [printable_text(k) for k in found if k not in expected]
    mis_shaped = [
        f"{k} is {tuple(found[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in found and tuple(found[k].shape) != tuple(v.shape)
    ]
    parts = []
    if mis_shaped:
        parts.append(f"size mismatch for {len(mis_shaped)} entries ({_listed(mis_shaped)})")
    if missing:
        parts.append(f"missing {len(missing)} entries ({_listed(missing)})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} entries ({_listed(unexpected)})")
    return "; ".join(parts)


def _non_finite(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point entries holding a NaN or an infinity."""
    return [printable_text(name) for name, tensor in state_dict.items()
            if (tensor.is_floating_point() or tensor.is_complex())
            and not bool(torch.isfinite(tensor).all())]


def _rebuild(arch: str, arch_kwargs: dict, num_classes: int, input_shape: tuple[int, ...],
             state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Check the state dict against the architecture on the meta device, then build the
    model, load the weights strictly and check the output shape.

    Raises ValueError with the reason (callers add the file name).
    """
    if arch not in MODEL_NAMES:
        raise ValueError(f"unknown architecture {_shown(arch)}; expected one of {MODEL_NAMES}")
    if tuple(input_shape) != INPUT_SHAPE:
        raise ValueError(
            f"input_shape {tuple(input_shape)} does not match the {arch!r} architecture: "
            f"expected {INPUT_SHAPE}"
        )
    try:  # shapes only: the size bound and every check below run before any allocation
        skeleton = build_model(arch, num_classes, device="meta", **arch_kwargs)
    except ValueError as exc:
        raise ValueError(printable_text(str(exc))) from exc
    problems = state_dict_problems(skeleton.state_dict(), state_dict)
    if problems:
        raise ValueError(f"state_dict does not fit architecture {arch!r} {arch_kwargs} with "
                         f"{num_classes} classes: {problems}")
    broken = _non_finite(state_dict)
    if broken:
        raise ValueError(f"{len(broken)} state_dict entries hold NaN or infinite values "
                         f"({_listed(broken)}); such a model computes nothing meaningful")
    model = skeleton.to_empty(device="cpu")  # every entry is overwritten just below
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        message = printable_text(" ".join(str(exc).split()))
        raise ValueError(f"state_dict does not fit architecture {arch!r} {arch_kwargs}: "
                         f"{message}") from exc
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(DRY_RUN_BATCH, *input_shape))
    if tuple(out.shape) != (DRY_RUN_BATCH, num_classes):
        raise ValueError(f"model gives output shape {tuple(out.shape)}, expected "
                         f"{(DRY_RUN_BATCH, num_classes)}")
    return model


# --- saving --------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, arch: str,
                    arch_kwargs: Mapping[str, Any] | None = None, num_classes: int,
                    input_shape: tuple[int, ...] = INPUT_SHAPE,
                    metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s weights with everything needed to rebuild it (version 2).

    The weights are checked first: they must be finite and load into a fresh
    ``build_model(arch, num_classes, **arch_kwargs)`` (a checkpoint that cannot be
    loaded is never written). The file is written to a temporary name, read back with
    :func:`load_checkpoint`'s checks, and renamed.

    Args:
        path: destination (``.pt``).
        model: the trained model (any device; weights are stored on CPU).
        arch: a name in :data:`openbox.fmnist.models.MODEL_NAMES`.
        arch_kwargs: the options the model was built with (plain data).
        num_classes: number of logits.
        input_shape: ``(C, H, W)`` of one input.
        metadata: plain data to keep with it (dataset, accuracy, epochs, seed, ...);
            ``torch_version`` is added unless present. Stored as given; readers get
            its strings through :func:`printable_text`.

    Returns:
        The path written.

    Raises:
        CheckpointError: a parameter or buffer holds NaN or infinity (named), the model
            does not fit ``arch``/``arch_kwargs``/``num_classes``, or the kwargs or
            metadata are not plain data. Nothing is written then.
    """
    path = Path(path)
    try:
        kwargs = _plain(dict(arch_kwargs or {}), "arch_kwargs")
        meta = _plain(dict(metadata or {}), "metadata")
    except TypeError as exc:
        raise CheckpointError(f"{path}: cannot save: {exc}") from exc
    meta.setdefault("torch_version", str(torch.__version__))
    # clone: a view would drag its whole underlying storage into the file
    state = OrderedDict((k, v.detach().to("cpu").clone()) for k, v in model.state_dict().items())
    try:
        _rebuild(arch, kwargs, int(num_classes), tuple(input_shape), state)
    except ValueError as exc:
        raise CheckpointError(f"{path}: refusing to save: {exc}") from exc
    record: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": arch,
        "arch_kwargs": kwargs,
        "num_classes": int(num_classes),
        "input_shape": [int(s) for s in input_shape],
        "state_dict": state,
        "metadata": meta,
    }
    record[DIGEST_FIELDS[CHECKPOINT_VERSION]] = record_digest(record)
    # save to memory: torch.save names the archive after the file, and the temporary
    # name would make equal checkpoints differ byte-wise
    buffer = io.BytesIO()
    torch.save(record, buffer)
    with atomic_target(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
        _read_checked(tmp)  # what is written must load: fail here, not at the reader's
    return path


# --- loading -------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    """The informative line of a torch.load error (its refusals run to many lines)."""
    lines = [ANSI_ESCAPE.sub("", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if line.startswith(WEIGHTS_ONLY_MARKER):
            # drop torch's advice to allowlist the global: a checkpoint never needs that
            refused = line[len(WEIGHTS_ONLY_MARKER):].split(ALLOWLIST_ADVICE)[0].strip()
            return printable_text(f"refused to unpickle: {refused}")  # names from the file
    return printable_text(lines[0]) if lines else "(no message)"


def load_checkpoint(path: str | os.PathLike,
                    map_location: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointInfo]:
    """Load a checkpoint written by :func:`save_checkpoint` (version 2, or a version 1 file).

    Reads with ``torch.load(..., weights_only=True)`` (no arbitrary code) and checks
    everything listed in the module docstring before the model's weights are allocated.

    Args:
        path: the checkpoint file.
        map_location: device for the returned model.

    Returns:
        ``(model, info)``: the model in eval mode on ``map_location``, and a
        :class:`CheckpointInfo` (its metadata strings made :func:`printable_text`).

    Raises:
        CheckpointError: on any failure, naming the file and what is wrong.
    """
    model, info = _read_checked(Path(path))
    model.to(map_location)
    return model, info


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file; CheckpointError otherwise.

    Opened non-blocking and checked with fstat, so a FIFO is refused without waiting
    for a writer (and without a race between a check and the open).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open the checkpoint ({exc.strerror or exc})") \
            from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
        raise CheckpointError(f"{path}: is not a regular file (a FIFO, socket or device?); "
                              "expected a checkpoint file")
    return os.fdopen(fd, "rb")


def _load_record(path: Path) -> Any:
    """torch.load of ``path`` (weights only) after checking what the archive holds."""
    with _open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if not zipfile.is_zipfile(handle):
            raise CheckpointError(
                f"{path}: not a torch checkpoint: expected the zip archive torch.save writes, "
                f"found {size} bytes that are not one (truncated, or another kind of file)"
            )
        try:
            handle.seek(0)
            with zipfile.ZipFile(handle) as archive:
                extracted = sum(entry.file_size for entry in archive.infolist())
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a torch checkpoint: unreadable zip archive "
                                  f"({printable_text(str(exc))})") from exc
        if extracted > MAX_ARCHIVE_BYTES:
            raise CheckpointError(
                f"{path}: the archive's entries hold {extracted:,} bytes once extracted; a "
                f"checkpoint holds at most {MAX_ARCHIVE_BYTES:,} (a model of at most "
                f"{MAX_PARAMETERS:,} parameters and buffers)"
            )
        handle.seek(0)
        try:
            return torch.load(handle, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types: UnpicklingError, RuntimeError, ...
            raise CheckpointError(
                f"{path}: not a loadable openbox checkpoint (torch.load with weights_only=True "
                f"failed: {type(exc).__name__}: {_reason(exc)})"
            ) from exc


def _check_fields(path: Path, record: Any) -> int:
    """Format, version and the fields' presence and types; returns the version."""
    if not isinstance(record, dict):
        raise CheckpointError(
            f"{path}: expected a dict with format {CHECKPOINT_FORMAT!r}, found a "
            f"{type(record).__name__}"
        )
    if record.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: expected format tag {CHECKPOINT_FORMAT!r}, found "
            f"{_shown(record.get('format'))}"
        )
    version = record.get("version")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{path}: unsupported checkpoint version {_shown(version)}; this openbox "
            f"reads versions {SUPPORTED_VERSIONS}"
        )
    kinds = {**FIELD_TYPES, DIGEST_FIELDS[version]: str}
    problems = [
        f"{key!r} missing" if key not in record
        else f"{key!r} is a {type(record[key]).__name__}, expected {kind.__name__}"
        for key, kind in kinds.items()
        if key not in record or not isinstance(record[key], kind)
        or (kind is int and isinstance(record[key], bool))
    ]
    unexpected = [_shown(key) for key in record if key not in kinds]
    if unexpected:
        problems.append(f"unexpected fields {_listed(unexpected)} (a version {version} "
                        f"record holds exactly {', '.join(kinds)})")
    if problems:
        raise CheckpointError(f"{path}: malformed checkpoint: {'; '.join(problems)}")
    return version


def _check_state_dict(state: dict) -> None:
    """Names are str; values are dense tensors (ValueError otherwise)."""
    for name, tensor in state.items():
        if type(name) is not str:
            raise ValueError(f"a key of type {type(name).__name__}, expected str")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{_shown(name)} is a {type(tensor).__name__}, not a tensor")
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type != "cpu":
            raise ValueError(f"{_shown(name)} is a {tensor.layout} {tensor.dtype} tensor on "
                             f"{tensor.device}; expected a dense CPU tensor")


def _read_checked(path: Path) -> tuple[nn.Module, CheckpointInfo]:
    """load_checkpoint on CPU."""
    record = _load_record(path)
    version = _check_fields(path, record)
    input_shape = record["input_shape"]
    if (len(input_shape) > MAX_INPUT_DIMS
            or not all(type(s) is int for s in input_shape)):
        raise CheckpointError(f"{path}: input_shape must be a list of at most "
                              f"{MAX_INPUT_DIMS} ints, found {_shown(input_shape)}")
    state = record["state_dict"]
    try:
        _check_state_dict(state)
        arch_kwargs = _loaded_plain(record["arch_kwargs"], "arch_kwargs")
        metadata = _loaded_plain(record["metadata"], "metadata")
    except ValueError as exc:
        raise CheckpointError(f"{path}: malformed checkpoint: {exc}") from exc
    digest_field = DIGEST_FIELDS[version]
    try:
        if version == 1:
            digest = state_dict_digest(state)
        else:
            digest = record_digest({**record, "arch_kwargs": arch_kwargs, "metadata": metadata})
    except (TypeError, ValueError, RuntimeError) as exc:  # e.g. an int too long for JSON
        raise CheckpointError(f"{path}: malformed checkpoint: cannot compute its digest "
                              f"({printable_text(str(exc))})") from exc
    if digest != record[digest_field]:
        covered = "the weights" if version == 1 else "the record (fields and weights)"
        raise CheckpointError(
            f"{path}: {digest_field} digest mismatch: the file says "
            f"{_shown(record[digest_field])}, {covered} hash to {digest}; the file was "
            "modified or corrupted"
        )
    try:
        model = _rebuild(record["arch"], arch_kwargs, record["num_classes"],
                         tuple(input_shape), state)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    info = CheckpointInfo(
        path=path,
        arch=record["arch"],
        arch_kwargs=arch_kwargs,
        num_classes=record["num_classes"],
        input_shape=tuple(input_shape),
        metadata=_printable_data(metadata),
        sha256=digest,
        version=version,
    )
    return model, info
