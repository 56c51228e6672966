"""Save and load trained reference models, safely and strictly.

A checkpoint is one ``torch.save`` file holding a dict of plain data only (tensors,
str, int, float, bool, None, lists, dicts), so it loads with
``torch.load(path, weights_only=True)`` and never runs pickled code::

    {
        "format": "openbox-checkpoint",        # CHECKPOINT_FORMAT
        "version": 1,                          # CHECKPOINT_VERSION
        "arch": "cnn",                         # a name in openbox.fmnist.models.MODEL_NAMES
        "arch_kwargs": {"channels": [8, 16]},  # options for build_model (lists, not tuples)
        "num_classes": 10,
        "input_shape": [1, 28, 28],            # (C, H, W) of one input
        "state_dict": {name: tensor, ...},     # the model's state_dict, on CPU
        "state_dict_sha256": "ab12...",        # see state_dict_digest
        "metadata": {"dataset": ..., "accuracy": ..., "epochs": ..., "seed": ...,
                     "torch_version": "2.13.0+cpu", ...},
    }

:func:`load_checkpoint` rebuilds the model from ``arch``/``arch_kwargs``/``num_classes``,
checks everything (format, version, keys and types, digest, that the state dict fits
the architecture exactly, that the declared input shape gives ``(1, num_classes)``
logits) and raises :class:`CheckpointError` naming the file and the problem on any
failure. Nothing mismatched is accepted silently.
"""

from __future__ import annotations

import hashlib
import io
import numbers
import os
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from openbox.fmnist.idx import atomic_target
from openbox.fmnist.models import INPUT_SHAPE, MODEL_NAMES, build_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "CheckpointInfo",
    "load_checkpoint",
    "save_checkpoint",
    "state_dict_digest",
]

CHECKPOINT_FORMAT = "openbox-checkpoint"
CHECKPOINT_VERSION = 1
SUPPORTED_VERSIONS = (CHECKPOINT_VERSION,)
DIGEST_FIELD = "state_dict_sha256"
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "version": int,
    "arch": str,
    "arch_kwargs": dict,
    "num_classes": int,
    "input_shape": list,
    "state_dict": dict,
    DIGEST_FIELD: str,
    "metadata": dict,
}
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
        metadata: free-form plain data (dataset, accuracy, epochs, seed, torch_version, ...).
        sha256: digest of the state dict (:func:`state_dict_digest`).
    """

    path: Path
    arch: str
    arch_kwargs: dict[str, Any]
    num_classes: int
    input_shape: tuple[int, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""


def state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and raw bytes, in sorted name order.

    Independent of device and of the order entries were inserted; any change to a
    value, a shape, a dtype or a name changes it.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a tensor")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        header = f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0{flat.numel()}\0"
        digest.update(header.encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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


def _fit_problems(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str:
    """One line saying how ``found`` differs from ``expected`` (names, shapes); '' if it fits."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
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


def _rebuild(arch: str, arch_kwargs: dict, num_classes: int, input_shape: tuple[int, ...],
             state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Build the architecture, load the weights strictly, check the output shape.

    Raises ValueError with the reason (callers add the file name).
    """
    if arch not in MODEL_NAMES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {MODEL_NAMES}")
    if tuple(input_shape) != INPUT_SHAPE:
        raise ValueError(
            f"input_shape {tuple(input_shape)} does not match the {arch!r} architecture: "
            f"expected {INPUT_SHAPE}"
        )
    model = build_model(arch, num_classes, **arch_kwargs)
    problems = _fit_problems(model.state_dict(), state_dict)
    if problems:
        raise ValueError(f"state_dict does not fit architecture {arch!r} {arch_kwargs} with "
                         f"{num_classes} classes: {problems}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        message = " ".join(str(exc).split())
        raise ValueError(f"state_dict does not fit architecture {arch!r} {arch_kwargs}: "
                         f"{message}") from exc
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(DRY_RUN_BATCH, *input_shape))
    if tuple(out.shape) != (DRY_RUN_BATCH, num_classes):
        raise ValueError(f"model gives output shape {tuple(out.shape)}, expected "
                         f"{(DRY_RUN_BATCH, num_classes)}")
    return model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, arch: str,
                    arch_kwargs: Mapping[str, Any] | None = None, num_classes: int,
                    input_shape: tuple[int, ...] = INPUT_SHAPE,
                    metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s weights with everything needed to rebuild it.

    The weights are checked first: they must load into a fresh
    ``build_model(arch, num_classes, **arch_kwargs)`` (a checkpoint that cannot be
    loaded is never written). The file is written to a temporary name and renamed.

    Args:
        path: destination (``.pt``).
        model: the trained model (any device; weights are stored on CPU).
        arch: a name in :data:`openbox.fmnist.models.MODEL_NAMES`.
        arch_kwargs: the options the model was built with (plain data).
        num_classes: number of logits.
        input_shape: ``(C, H, W)`` of one input.
        metadata: plain data to keep with it (dataset, accuracy, epochs, seed, ...);
            ``torch_version`` is added unless present.

    Returns:
        The path written.

    Raises:
        CheckpointError: the model does not fit ``arch``/``arch_kwargs``/``num_classes``,
            or the kwargs or metadata are not plain data.
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
    record = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": arch,
        "arch_kwargs": kwargs,
        "num_classes": int(num_classes),
        "input_shape": [int(s) for s in input_shape],
        "state_dict": state,
        DIGEST_FIELD: state_dict_digest(state),
        "metadata": meta,
    }
    # save to memory: torch.save names the archive after the file, and the temporary
    # name would make equal checkpoints differ byte-wise
    buffer = io.BytesIO()
    torch.save(record, buffer)
    with atomic_target(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
        _read_checked(tmp)  # what is written must load: fail here, not at the reader's
    return path


def _reason(exc: BaseException) -> str:
    """The informative line of a torch.load error (its refusals run to many lines)."""
    lines = [ANSI_ESCAPE.sub("", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if line.startswith(WEIGHTS_ONLY_MARKER):
            # drop torch's advice to allowlist the global: a checkpoint never needs that
            refused = line[len(WEIGHTS_ONLY_MARKER):].split(ALLOWLIST_ADVICE)[0].strip()
            return f"refused to unpickle: {refused}"
    return lines[0] if lines else "(no message)"


def load_checkpoint(path: str | os.PathLike,
                    map_location: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointInfo]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Reads with ``torch.load(..., weights_only=True)`` (no arbitrary code), then checks
    the format tag and version, the fields and their types, the state-dict digest,
    the architecture name, that the state dict fits the architecture exactly (no
    missing, unexpected or mis-shaped entries) and the input shape.

    Args:
        path: the checkpoint file.
        map_location: device for the returned model.

    Returns:
        ``(model, info)``: the model in eval mode on ``map_location``, and a
        :class:`CheckpointInfo`.

    Raises:
        CheckpointError: on any failure, naming the file and what is wrong.
    """
    model, info = _read_checked(Path(path))
    model.to(map_location)
    return model, info


def _read_checked(path: Path) -> tuple[nn.Module, CheckpointInfo]:
    """load_checkpoint on CPU."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a torch checkpoint: expected the zip archive torch.save writes, found "
            f"{path.stat().st_size} bytes that are not one (truncated, or another kind of file)"
        )
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types here: UnpicklingError, RuntimeError, ...
        raise CheckpointError(
            f"{path}: not a loadable openbox checkpoint (torch.load with weights_only=True "
            f"failed: {type(exc).__name__}: {_reason(exc)})"
        ) from exc
    if not isinstance(record, dict):
        raise CheckpointError(
            f"{path}: expected a dict with format {CHECKPOINT_FORMAT!r}, found a "
            f"{type(record).__name__}"
        )
    if record.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: expected format tag {CHECKPOINT_FORMAT!r}, found {record.get('format')!r}"
        )
    if record.get("version") not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{path}: unsupported checkpoint version {record.get('version')!r}; this openbox "
            f"reads versions {SUPPORTED_VERSIONS}"
        )
    problems = [
        f"{key!r} missing" if key not in record
        else f"{key!r} is a {type(record[key]).__name__}, expected {kind.__name__}"
        for key, kind in REQUIRED_FIELDS.items()
        if key not in record or not isinstance(record[key], kind)
        or (kind is int and isinstance(record[key], bool))
    ]
    if problems:
        raise CheckpointError(f"{path}: malformed checkpoint: {'; '.join(problems)}")
    state = record["state_dict"]
    try:
        digest = state_dict_digest(state)
    except TypeError as exc:
        raise CheckpointError(f"{path}: malformed state_dict: {exc}") from exc
    if digest != record[DIGEST_FIELD]:
        raise CheckpointError(
            f"{path}: state_dict digest mismatch: the file says sha256 {record[DIGEST_FIELD]}, "
            f"the weights hash to {digest}; the weights were modified or corrupted"
        )
    input_shape = record["input_shape"]
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in input_shape):
        raise CheckpointError(f"{path}: input_shape must be a list of ints, found {input_shape}")
    try:
        model = _rebuild(record["arch"], record["arch_kwargs"], record["num_classes"],
                         tuple(input_shape), state)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    info = CheckpointInfo(
        path=path,
        arch=record["arch"],
        arch_kwargs=dict(record["arch_kwargs"]),
        num_classes=record["num_classes"],
        input_shape=tuple(input_shape),
        metadata=dict(record["metadata"]),
        sha256=digest,
    )
    return model, info
