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
import stat
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = [
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "MAX_IDX_PAYLOAD",
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
READ_CHUNK = 1 << 20  # bytes decompressed per read: bounds the transient copies
MAX_IDX_PAYLOAD = 2**31
"""Most payload bytes a header may announce (2 GiB; Fashion-MNIST's training images are
47 MB). Checked before anything is allocated."""


class DatasetError(ValueError):
    """A data file or folder is missing, malformed, or does not match what was expected.

    The message names the file (or folder) and says what was expected and what was found.
    """


# --- IDX reading and writing ---------------------------------------------------------


def _open_failure(path: Path, exc: OSError) -> DatasetError:
    if isinstance(exc, FileNotFoundError):
        return DatasetError(f"{path}: no such file")
    if isinstance(exc, IsADirectoryError):
        return DatasetError(f"{path}: is a directory, not an IDX file")
    return DatasetError(f"{path}: cannot read the file ({exc})")


@contextlib.contextmanager
def _idx_stream(path: Path) -> Iterator[tuple[BinaryIO, int | None]]:
    """The file's decompressed content as a stream, and its size when it is not gzipped.

    gzip is detected by content (a name ending ``.gz`` must hold gzip data) and
    decompressed lazily, so reading N bytes costs O(N) memory whatever the stream holds.
    Only regular files are opened (a FIFO would block the reader).
    """
    try:
        info = path.stat()
    except OSError as exc:
        raise _open_failure(path, exc) from None
    if stat.S_ISDIR(info.st_mode):
        raise DatasetError(f"{path}: is a directory, not an IDX file")
    if not stat.S_ISREG(info.st_mode):
        raise DatasetError(f"{path}: is not a regular file (a FIFO, socket or device?); "
                           "expected an IDX file")
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise _open_failure(path, exc) from exc
    with handle:
        start = handle.read(len(GZIP_MAGIC))
        handle.seek(0)
        is_gzip = start == GZIP_MAGIC
        if path.name.endswith(GZIP_SUFFIX) and not is_gzip:
            raise DatasetError(
                f"{path}: expected a gzip file (first bytes {GZIP_MAGIC.hex()}), "
                f"found first bytes {start.hex() or '(empty file)'}"
            )
        if not is_gzip:
            yield handle, info.st_size
            return
        try:
            with gzip.GzipFile(fileobj=handle, mode="rb") as stream:
                yield stream, None
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise DatasetError(
                f"{path}: corrupt gzip data ({type(exc).__name__}: {exc}); "
                "expected a complete gzip stream holding an IDX file"
            ) from exc


def _read_chunks(stream: BinaryIO, size: int) -> list[bytes]:
    """Up to ``size`` bytes of ``stream`` (fewer only at its end), in chunks of at most
    READ_CHUNK bytes."""
    chunks, left = [], size
    while left > 0:
        chunk = stream.read(min(left, READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return chunks


def _read_up_to(stream: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes of ``stream``: fewer only at its end."""
    return b"".join(_read_chunks(stream, size))


def _read_into(stream: BinaryIO, out: memoryview) -> int:
    """Fill ``out`` from ``stream`` in chunks; the number of bytes read (short at its end)."""
    done = 0
    while done < len(out):
        n = stream.readinto(out[done:done + READ_CHUNK])
        if not n:
            break
        done += n
    return done


def read_idx(path: str | os.PathLike, *, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped or plain).

    The header is read first and bounds everything after it: exactly the announced
    payload is read (at most :data:`MAX_IDX_PAYLOAD` bytes), then one byte more to detect
    an over-long file. A gzip stream is decompressed as it is read, so a small file
    inflating to gigabytes costs no more memory than its header announces.

    Args:
        path: the file; gzip is detected from its content (a name ending ``.gz``
            must hold gzip data).
        expected_magic: if given, the 4-byte magic number the file must carry, e.g.
            :data:`IDX_IMAGES_MAGIC` (0x00000803) or :data:`IDX_LABELS_MAGIC` (0x00000801).

    Returns:
        uint8 array of the shape stored in the header, e.g. ``(N, 28, 28)`` or ``(N,)``.

    Raises:
        DatasetError: missing file, a directory or other non-regular file, corrupt gzip,
            wrong magic number or dtype byte, truncated header, a header announcing more
            than :data:`MAX_IDX_PAYLOAD` bytes, or a payload shorter or longer than the
            header says.
    """
    path = Path(path)
    try:
        with _idx_stream(path) as (stream, plain_size):
            return _read_idx_stream(path, stream, plain_size, expected_magic)
    except DatasetError:
        raise
    except OSError as exc:  # a read failing half-way (disk, network file system, ...)
        raise DatasetError(f"{path}: cannot read the file ({exc})") from exc


def _read_idx_stream(path: Path, stream: BinaryIO, plain_size: int | None,
                     expected_magic: int | None) -> np.ndarray:
    head = _read_up_to(stream, IDX_MAGIC_BYTES)
    if len(head) < IDX_MAGIC_BYTES:
        raise DatasetError(
            f"{path}: truncated IDX header: expected at least {IDX_MAGIC_BYTES} bytes, "
            f"found {len(head)}"
        )
    (magic,) = struct.unpack(">I", head)
    if expected_magic is not None and magic != expected_magic:
        raise DatasetError(
            f"{path}: wrong IDX magic number: expected 0x{expected_magic:08x}, found 0x{magic:08x}"
        )
    zeros, dtype_byte, ndim = head[0:2], head[2], head[3]
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
    dims = _read_up_to(stream, header_len - IDX_MAGIC_BYTES)
    if len(dims) < header_len - IDX_MAGIC_BYTES:
        raise DatasetError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header_len} bytes, "
            f"found {IDX_MAGIC_BYTES + len(dims)}"
        )
    shape = struct.unpack(f">{ndim}I", dims)
    expected_payload = math.prod(shape)
    if expected_payload > MAX_IDX_PAYLOAD:
        raise DatasetError(
            f"{path}: IDX header announces shape {tuple(shape)}, {expected_payload:,} bytes; "
            f"at most {MAX_IDX_PAYLOAD:,} bytes are read (the Fashion-MNIST training images "
            "are 47,040,000)"
        )
    if plain_size is not None and plain_size - header_len != expected_payload:
        found = plain_size - header_len  # known before reading anything
        kind = "truncated" if found < expected_payload else "over-long"
        raise DatasetError(
            f"{path}: {kind} IDX payload: header shape {tuple(shape)} needs "
            f"{expected_payload} bytes, found {found}"
        )
    if plain_size is not None:  # the size is known to match: fill one buffer in place
        payload = np.empty(expected_payload, dtype=np.uint8)
        found = _read_into(stream, memoryview(payload))
    else:  # a gzip stream may end early: hold only what it delivers until it is complete
        chunks = _read_chunks(stream, expected_payload)
        found = sum(len(chunk) for chunk in chunks)
    if found < expected_payload:
        raise DatasetError(
            f"{path}: truncated IDX payload: header shape {tuple(shape)} needs "
            f"{expected_payload} bytes, found {found}"
        )
    if stream.read(1):  # one byte tells over-long; reading on could inflate gigabytes
        raise DatasetError(
            f"{path}: over-long IDX payload: header shape {tuple(shape)} needs "
            f"{expected_payload} bytes, found more"
        )
    if plain_size is None:
        payload = np.empty(expected_payload, dtype=np.uint8)
        offset = 0
        for chunk in chunks:
            payload[offset:offset + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
            offset += len(chunk)
    return payload.reshape(shape)


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
