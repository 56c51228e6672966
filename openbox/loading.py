"""Loading what a user brings: their own model (a factory and a state dict) and image files.

>>> m = load_model_factory("mynets:make_cnn", "weights.pt")   # -> LoadedModel
>>> m = load_checkpoint_model("cnn.pt")                       # an 'openbox train' checkpoint
>>> x = load_image("coat.png")                                # (1, 28, 28) float64 in [0, 1]

A model factory is ``MODULE:FACTORY``: ``MODULE`` is an importable module name (the
current folder is searched first, as ``python -m`` does) or the path of a ``.py`` file;
``FACTORY`` is a callable in it (dotted for nested attributes, e.g. ``Nets.small``) that
takes no arguments and returns a :class:`torch.nn.Module`. The weights file is a state
dict saved with ``torch.save(model.state_dict(), path)``; it is read with
``torch.load(path, weights_only=True)`` (no pickled code runs) and must fit the model
exactly: no missing, unexpected or mis-shaped entries.

Images are Fashion-MNIST-like: 28 x 28 greyscale, light object on a black background,
pixels in [0, 1]. A PNG must be 8- or 16-bit greyscale (PIL mode ``L``, ``I;16``) or
bilevel (``1``); pixel values are divided by the mode's maximum (255 for ``L``), exactly
as the IDX reader does. A ``.npy`` array must have shape (28, 28) or (1, 28, 28), a real
dtype and finite values in [0, 1]. PIL (Pillow) is a dependency of matplotlib, so it is
always installed alongside openbox.

Every failure raises :class:`ModelLoadError` or :class:`ImageError` (both ValueError)
with a message naming the file or spec and what is wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from openbox.fmnist.checkpoints import state_dict_problems
from openbox.fmnist.data import INPUT_SHAPE

__all__ = [
    "IMAGE_SHAPE",
    "ImageError",
    "LoadedModel",
    "ModelLoadError",
    "describe_arch",
    "load_checkpoint_model",
    "load_image",
    "load_model_factory",
    "looks_inverted",
]

IMAGE_SHAPE = INPUT_SHAPE
"""(C, H, W) of one Fashion-MNIST image, the input shape a factory's model is checked on
(the dataset kit's own INPUT_SHAPE)."""
PNG_MODES = {"L": 255, "I;16": 65535, "I;16L": 65535, "I;16B": 65535, "1": 1}
"""Greyscale PNG modes accepted, with the value that maps to intensity 1."""
IMAGE_SUFFIXES = (".png", ".npy")
MAX_LISTED = 3  # names shown in a mismatch message before "and N more"
INVERTED_BORDER_MEAN = 0.5
"""An image whose one-pixel border averages above this looks dark-on-light (inverted)."""


class ModelLoadError(ValueError):
    """A model factory or its weights could not be loaded; the message says why."""


class ImageError(ValueError):
    """An image file is missing, unreadable or not a 28 x 28 greyscale image in [0, 1]."""


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready to explain, and where it came from.

    Attributes:
        model: the network, in eval mode, on the CPU.
        description: a short name for titles, e.g. ``"cnn (channels 8/16)"`` or
            ``"mynets:make_cnn"``.
        input_shape: (C, H, W) of one input.
        num_classes: number of logits.
        class_names: names indexed by class, when the file says them; else None.
        provenance: plain data for records: kind (``"checkpoint"`` or ``"factory"``),
            file paths and their SHA-256 digests, architecture.
    """

    model: nn.Module
    description: str
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def describe_arch(arch: str, arch_kwargs: Mapping[str, Any]) -> str:
    """``"cnn"``, ``"cnn (channels 8/16)"``, ``"cnn (channels 8/16, pool avg)"``."""
    if not arch_kwargs:
        return arch
    parts = [
        f"{k} {'/'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
        for k, v in arch_kwargs.items()
    ]
    return f"{arch} ({', '.join(parts)})"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _listed(names: list[str]) -> str:
    more = len(names) - MAX_LISTED
    shown = ", ".join(names[:MAX_LISTED])
    return f"{shown} and {more} more" if more > 0 else shown


def _one_line(exc: BaseException) -> str:
    """``Type: first informative line`` of an exception (torch's refusals run long)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else '(no message)'}"


# --- checkpoints -------------------------------------------------------------------------


def load_checkpoint_model(path: str | os.PathLike) -> LoadedModel:
    """A checkpoint written by ``openbox train`` (checked as
    :func:`openbox.fmnist.checkpoints.load_checkpoint` checks it; CheckpointError on any
    fault)."""
    from openbox.fmnist.checkpoints import load_checkpoint

    model, info = load_checkpoint(Path(path))
    names = info.metadata.get("classes")
    names = (tuple(str(n) for n in names)
             if isinstance(names, list) and len(names) == info.num_classes else None)
    return LoadedModel(
        model=model,
        description=describe_arch(info.arch, info.arch_kwargs),
        input_shape=tuple(info.input_shape),
        num_classes=info.num_classes,
        class_names=names,
        provenance={
            "kind": "checkpoint",
            "checkpoint": str(info.path),
            "checkpoint_sha256": info.sha256,
            "arch": info.arch,
            "arch_kwargs": info.arch_kwargs,
            "metadata": info.metadata,
        },
    )


# --- factories and state dicts -----------------------------------------------------------


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """The current folder first on sys.path while importing (as ``python -m`` has it;
    a console script does not)."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _import(module: str, spec: str):
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise ModelLoadError(f"--model {spec}: no such file {path}")
        name = f"_openbox_user_{path.stem}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise ModelLoadError(f"--model {spec}: cannot import {path} as a Python file")
        mod = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(mod)
        except Exception as exc:  # the user's code may raise anything
            raise ModelLoadError(f"--model {spec}: importing {path} failed: "
                                 f"{_one_line(exc)}") from exc
        return mod
    try:
        with _cwd_on_path():
            return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            raise ModelLoadError(
                f"--model {spec}: no module named {exc.name!r} (searched the current folder "
                "and sys.path; a file path such as nets.py:make_cnn also works)"
            ) from exc
        raise ModelLoadError(f"--model {spec}: importing {module} failed: "
                             f"{_one_line(exc)}") from exc
    except Exception as exc:
        raise ModelLoadError(f"--model {spec}: importing {module} failed: "
                             f"{_one_line(exc)}") from exc


def _factory(spec: str):
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ModelLoadError(f"--model {spec!r}: expected MODULE:FACTORY, e.g. "
                             "mynets:make_cnn or nets.py:make_cnn")
    obj = _import(module, spec)
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = module if i == 0 else ".".join(attr.split(".")[:i])
            callables = sorted(n for n in dir(obj) if not n.startswith("_")
                               and callable(getattr(obj, n, None)))
            hint = f"; it has {_listed(callables)}" if callables else ""
            raise ModelLoadError(f"--model {spec}: {where} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"--model {spec}: {attr} is a {type(obj).__name__}, not a "
                             "callable that returns a torch.nn.Module")
    return obj


def _state_dict(path: Path, spec: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"--weights {path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(
            f"--weights {path}: not a torch.save file ({path.stat().st_size:,} bytes that are "
            "not the zip archive torch.save writes: truncated, corrupted or another format)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (bad zip member), ...
        raise ModelLoadError(
            f"--weights {path}: torch.load(weights_only=True) refused or failed "
            f"({_one_line(exc)}); save the weights with torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(obj, Mapping) and obj.get("format") == "openbox-checkpoint":
        raise ModelLoadError(f"--weights {path}: this is an openbox checkpoint; pass it as "
                             "the CKPT argument, without --model and --weights")
    if not isinstance(obj, Mapping):
        raise ModelLoadError(f"--weights {path}: holds a {type(obj).__name__}, not a state "
                             "dict; save it with torch.save(model.state_dict(), path)")
    bad = [repr(k) for k, v in obj.items() if not isinstance(k, str)
           or not isinstance(v, torch.Tensor)]
    if bad:
        nested = [k for k in ("state_dict", "model_state_dict", "model") if k in obj]
        hint = (f"; it looks like a training record with a {nested[0]!r} entry: save "
                "model.state_dict() itself" if nested else "")
        raise ModelLoadError(f"--weights {path}: not a state dict (names -> tensors): "
                             f"{len(bad)} entries are not, e.g. {_listed(bad)}{hint}")
    return dict(obj)


def _fit(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """How ``state`` differs from ``model.state_dict()`` (names, shapes); '' if it fits."""
    return state_dict_problems(model.state_dict(), state)


def load_model_factory(
    spec: str, weights: str | os.PathLike, *, input_shape: tuple[int, ...] = IMAGE_SHAPE
) -> LoadedModel:
    """``MODULE:FACTORY`` called with no arguments, with the state dict in ``weights``.

    Args:
        spec: ``"package.module:factory"`` or ``"path/to/file.py:factory"``.
        weights: a file written by ``torch.save(model.state_dict(), path)``.
        input_shape: (C, H, W) of one input; the model must map (1, *input_shape) to
            (1, C) logits with C >= 2.

    Returns:
        A :class:`LoadedModel` (eval mode, CPU; ``class_names`` None).

    Raises:
        ModelLoadError: bad spec, missing module or attribute, a factory that fails or
            returns no Module, a missing, corrupted, unsafe or non-state-dict weights
            file, a state dict that does not fit, or a model whose output is not (1, C).
    """
    factory = _factory(spec)
    path = Path(weights)
    state = _state_dict(path, spec)
    try:
        model = factory()
    except Exception as exc:
        raise ModelLoadError(f"--model {spec}: calling {spec.partition(':')[2]}() failed: "
                             f"{_one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"--model {spec}: the factory returned a {type(model).__name__}, "
                             "expected a torch.nn.Module")
    problems = _fit(model, state)
    if problems:
        raise ModelLoadError(f"--weights {path} does not fit the model of --model {spec}: "
                             f"{problems}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        raise ModelLoadError(f"--weights {path} does not load into the model of --model "
                             f"{spec}: {' '.join(str(exc).split())}") from exc
    model = model.to("cpu").eval()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    probe = torch.zeros(1, *input_shape, dtype=dtype)
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as exc:
        raise ModelLoadError(f"--model {spec}: the model fails on an input of shape "
                             f"{tuple(probe.shape)}: {_one_line(exc)}") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1 \
            or out.shape[1] < 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelLoadError(f"--model {spec}: expected logits of shape (1, C) with C >= 2 "
                             f"for an input of shape {tuple(probe.shape)}, got {shape}")
    return LoadedModel(
        model=model,
        description=spec,
        input_shape=tuple(input_shape),
        num_classes=int(out.shape[1]),
        provenance={"kind": "factory", "factory": spec, "weights": str(path),
                    "weights_sha256": _sha256(path)},
    )


# --- images ------------------------------------------------------------------------------


def _png(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode, fmt, size = img.mode, img.format, img.size
            if fmt != "PNG":
                raise ImageError(f"--image {path}: a {fmt} file named .png; expected a PNG")
            if mode not in PNG_MODES:
                raise ImageError(
                    f"--image {path}: PNG mode {mode} is not greyscale; expected 8-bit "
                    "greyscale (mode L) or 16-bit (I;16); convert it, e.g. "
                    "PIL.Image.open(f).convert('L').save(g)"
                )
            pixels = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageError(f"--image {path}: not a readable PNG ({_one_line(exc)})") from exc
    if size != (IMAGE_SHAPE[2], IMAGE_SHAPE[1]):
        raise ImageError(f"--image {path}: {size[0]} x {size[1]} pixels; expected "
                         f"{IMAGE_SHAPE[2]} x {IMAGE_SHAPE[1]}")
    # float32 division, as the IDX reader scales uint8 pixels: the same image gives the
    # same tensor from a PNG as from the dataset
    return (pixels.astype(np.float32) / np.float32(PNG_MODES[mode])).astype(np.float64)


def _npy(path: Path) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ImageError(f"--image {path}: not a readable .npy array ({_one_line(exc)})") \
            from exc
    if not isinstance(a, np.ndarray):
        raise ImageError(f"--image {path}: holds a {type(a).__name__}, expected one array")
    if a.dtype.kind not in "fiu":
        raise ImageError(f"--image {path}: dtype {a.dtype}; expected a real (float or integer) "
                         "array")
    if a.shape not in (IMAGE_SHAPE[1:], IMAGE_SHAPE):
        raise ImageError(f"--image {path}: shape {a.shape}; expected {IMAGE_SHAPE[1:]} or "
                         f"{IMAGE_SHAPE}")
    a = a.astype(np.float64).reshape(IMAGE_SHAPE[1:])
    bad = ~np.isfinite(a)
    if bad.any():
        raise ImageError(f"--image {path}: {int(bad.sum())} values are NaN or infinite")
    if a.min() < 0 or a.max() > 1:
        hint = "; divide by 255 if the values are 0..255" if a.max() > 1 else ""
        raise ImageError(f"--image {path}: values in [{a.min():g}, {a.max():g}]; expected "
                         f"pixels in [0, 1]{hint}")
    return a


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """A 28 x 28 greyscale image file as a float64 tensor (1, 28, 28) in [0, 1].

    ``.png``: 8/16-bit greyscale or bilevel, divided by 255 (65535, 1) in float32 as the
    IDX reader does, then widened. ``.npy``: shape (28, 28) or (1, 28, 28), finite,
    in [0, 1], taken as it is (float64 keeps every bit).

    Raises:
        ImageError: missing file, unknown suffix, unreadable file, wrong size, mode,
            shape or dtype, NaN / Inf, values outside [0, 1].
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ImageError(f"--image {path}: expected a .png or .npy file")
    if not path.is_file():
        raise ImageError(f"--image {path}: no such file")
    pixels = _png(path) if suffix == ".png" else _npy(path)
    return torch.from_numpy(np.ascontiguousarray(pixels)).reshape(IMAGE_SHAPE)


def looks_inverted(x: torch.Tensor) -> bool:
    """True when x (1, H, W) has a light border (mean > 0.5): dark-on-light, the opposite
    of Fashion-MNIST's light object on black."""
    img = x.reshape(x.shape[-2:])
    border = torch.cat([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    return float(border.double().mean()) > INVERTED_BORDER_MEAN
