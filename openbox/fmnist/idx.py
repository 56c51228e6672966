"""IDX files (the format of MNIST and Fashion-MNIST): read, write, atomic replacement.

Every problem with a file raises :class:`DatasetError` (a ``ValueError``) whose message
names the file and says what was expected and what was found.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import secrets
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = [
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "DatasetError",
    "atomic_target",
    "read_idx",
    "write_idx",
]

# --- IDX format ----------------------------------------------------------------------
# Header: two zero bytes, a dtype byte, a byte giving the number of dimensions, then one
# big-endian uint32 per dimension, then the payload in C order.

IDX_UBYTE = 0x08
IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions (N, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dimension (N,)
IDX_MAGIC_BYTES = 4
IDX_DIM_BYTES = 4
IDX_MAX_DIMS = 255
GZIP_MAGIC = b"\x1f\x8b"
GZIP_SUFFIX = ".gz"
GZIP_LEVEL = 9
TEMP_TOKEN_BYTES = 4


class DatasetError(ValueError):
    """A data file or folder is missing, malformed, or does not match what was expected.

    The message names the file (or folder) and says what was expected and what was found.
    """


# --- IDX reading and writing ---------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    """The decompressed content of an IDX file (gzip detected by name or by content)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the file ({exc})") from exc
    is_gzip = raw[: len(GZIP_MAGIC)] == GZIP_MAGIC
    if path.name.endswith(GZIP_SUFFIX) and not is_gzip:
        raise DatasetError(
            f"{path}: expected a gzip file (first bytes {GZIP_MAGIC.hex()}), "
            f"found first bytes {raw[:2].hex() or '(empty file)'}"
        )
    if not is_gzip:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(
            f"{path}: corrupt gzip data ({type(exc).__name__}: {exc}); "
            "expected a complete gzip stream holding an IDX file"
        ) from exc


def read_idx(path: str | os.PathLike, *, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped or plain).

    Args:
        path: the file; gzip is detected from its content (a name ending ``.gz``
            must hold gzip data).
        expected_magic: if given, the 4-byte magic number the file must carry, e.g.
            :data:`IDX_IMAGES_MAGIC` (0x00000803) or :data:`IDX_LABELS_MAGIC` (0x00000801).

    Returns:
        uint8 array of the shape stored in the header, e.g. ``(N, 28, 28)`` or ``(N,)``.

    Raises:
        DatasetError: missing file, corrupt gzip, wrong magic number or dtype byte,
            truncated header, or a payload shorter or longer than the header says.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < IDX_MAGIC_BYTES:
        raise DatasetError(
            f"{path}: truncated IDX header: expected at least {IDX_MAGIC_BYTES} bytes, "
            f"found {len(data)}"
        )
    (magic,) = struct.unpack(">I", data[:IDX_MAGIC_BYTES])
    if expected_magic is not None and magic != expected_magic:
        raise DatasetError(
            f"{path}: wrong IDX magic number: expected 0x{expected_magic:08x}, found 0x{magic:08x}"
        )
    zeros, dtype_byte, ndim = data[0:2], data[2], data[3]
    if zeros != b"\x00\x00":
        raise DatasetError(
            f"{path}: not an IDX file: expected the magic number to start with two zero "
            f"bytes, found 0x{magic:08x}"
        )
    if dtype_byte != IDX_UBYTE:
        raise DatasetError(
            f"{path}: unsupported IDX dtype byte: expected 0x{IDX_UBYTE:02x} (unsigned byte), "
            f"found 0x{dtype_byte:02x}"
        )
    header_len = IDX_MAGIC_BYTES + IDX_DIM_BYTES * ndim
    if len(data) < header_len:
        raise DatasetError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header_len} bytes, "
            f"found {len(data)}"
        )
    shape = struct.unpack(f">{ndim}I", data[IDX_MAGIC_BYTES:header_len])
    expected_payload = math.prod(shape)
    payload = len(data) - header_len
    if payload != expected_payload:
        kind = "truncated" if payload < expected_payload else "over-long"
        raise DatasetError(
            f"{path}: {kind} IDX payload: header shape {tuple(shape)} needs "
            f"{expected_payload} bytes, found {payload}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape).copy()


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file; gzip it when the name ends ``.gz``.

    The gzip header carries mtime 0 and the file's base name, so equal arrays give
    byte-identical files. The file is written to a temporary name and renamed.

    Args:
        path: destination file.
        array: uint8 array with 1 to 255 dimensions, e.g. images ``(N, 28, 28)``
            (magic 0x00000803) or labels ``(N,)`` (magic 0x00000801).

    Returns:
        The path written.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"write_idx writes uint8 arrays only, got dtype {array.dtype}")
    if not 1 <= array.ndim <= IDX_MAX_DIMS:
        raise ValueError(f"write_idx needs 1..{IDX_MAX_DIMS} dimensions, got {array.ndim}")
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    content = header + np.ascontiguousarray(array).tobytes()
    if path.name.endswith(GZIP_SUFFIX):
        content = _gzip_bytes(content, name=path.name[: -len(GZIP_SUFFIX)])
    _atomic_write(path, content)
    return path


def _gzip_bytes(content: bytes, *, name: str) -> bytes:
    """Deterministic gzip: fixed level, mtime 0, ``name`` as the stored file name."""
    buffer = io.BytesIO()
    with gzip.GzipFile(
        filename=name, mode="wb", fileobj=buffer, compresslevel=GZIP_LEVEL, mtime=0
    ) as gz:
        gz.write(content)
    return buffer.getvalue()


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary file is removed if the block raises, so ``path`` is either the old
    file or the complete new one, never a partial write. The file gets the usual
    permissions (umask), unlike ``tempfile.mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(TEMP_TOKEN_BYTES)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write(path: Path, content: bytes) -> None:
    with atomic_target(path) as tmp, tmp.open("xb") as handle:
        handle.write(content)
