"""Checkpoints on disk: safetensors for arrays, JSON for everything else; atomic, never pickle.

The safetensors format, written and read here by hand (it is small, and worth knowing):

    bytes 0..8        N, the header length: an unsigned 64-bit little-endian integer
    bytes 8..8+N      the header: UTF-8 JSON, padded with spaces to a multiple of 8
                        {"wte.weight": {"dtype": "F32", "shape": [50257, 768],
                                        "data_offsets": [0, 154389504]},
                         ...,
                         "__metadata__": {"format": "np"}}        (optional, str -> str)
    bytes 8+N..end    the data buffer: every tensor's bytes, C order, little-endian;
                      ``data_offsets`` are [begin, end) relative to the buffer's start

Reading applies the checks of the reference implementation, because a checkpoint is input from
outside: the header length is bounded (100 MB) and fits in the file; the header is valid JSON
with no duplicate keys; each tensor's span holds exactly ``itemsize * prod(shape)`` bytes; the
spans, sorted, start at 0, neither overlap nor leave gaps, and end exactly at the end of the file.
Any failure is a ``UserError``: one line naming the file and what is wrong with it.

Writing is atomic: bytes go to a temporary file in the same folder, which is fsynced and then
renamed over the target (``os.replace`` is atomic on POSIX and Windows), and the folder is fsynced
so the rename itself survives a power cut. A crash leaves either the old file or the new one.

    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> save_safetensors(path, {"w": np.eye(2, dtype=np.float32)}, metadata={"step": "3"})
    >>> tensors, metadata = load_safetensors(path)
    >>> tensors["w"].tolist(), metadata
    ([[1.0, 0.0], [0.0, 1.0]], {'step': '3'})
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
from typing import IO, Any, Iterator

import numpy as np

from scratchlm import backend
from scratchlm.errors import UserError

# The reference implementation refuses headers above 100 MB: a hostile length field must not
# make us allocate gigabytes before we have checked anything.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype name -> NumPy dtype (little-endian). BF16 and F8 have no NumPy dtype;
# BF16 is read (widened to float32), the F8 formats are refused with a clear message.
_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),   # raw bits; widened to float32 after reading
}
_ITEMSIZE_OF_UNREADABLE = {"F8_E4M3": 1, "F8_E5M2": 1}
# NumPy dtype (kind, itemsize) -> safetensors name, for writing.
_NAME_OF = {(dt.kind, dt.itemsize): name for name, dt in _DTYPES.items() if name != "BF16"}

_FIX = "re-save it or pick another run"


# ---------------------------------------------------------------- atomic writes

def _fsync_directory(directory: str) -> None:
    """Make a rename inside ``directory`` durable (POSIX; Windows cannot open folders: skip)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0o022)          # the only way to read it is to set it, then put it back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces ``path`` only if the ``with`` block finishes.

    The temporary file lives in the target's folder (a rename across file systems is not
    atomic) and is removed if anything fails, so an interrupted save leaves no litter and the
    previous file untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; a run file gets the mode any file the user creates gets
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise
    _fsync_directory(directory)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename, fsync folder."""
    with _atomic_file(path) as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON (plus a final newline) to ``path`` atomically."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing, unreadable or invalid file is a ``UserError`` naming it."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; check the path (is it the right run folder?)") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}; check the path and its permissions") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text, so not JSON; re-save it or pick another file") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                        "fix or re-save it") from None


# ---------------------------------------------------------------- safetensors: write

def _as_little_endian_host_array(name: str, array) -> tuple[str, np.ndarray]:
    """A backend array -> (safetensors dtype name, C-contiguous little-endian NumPy array)."""
    host = np.asarray(backend.to_numpy(array), order="C")   # (ascontiguousarray would make 0-d 1-d)
    key = (host.dtype.kind, host.dtype.itemsize)
    if key not in _NAME_OF:
        raise ValueError(f"tensor {name!r} has dtype {host.dtype}, which safetensors cannot store")
    if host.dtype.byteorder == ">":       # big-endian host data: the format is little-endian
        host = host.astype(host.dtype.newbyteorder("<"))
    return _NAME_OF[key], host


def save_safetensors(path: str | os.PathLike, tensors: dict[str, Any],
                     metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (NumPy or CuPy arrays, any dtype safetensors knows) to ``path`` atomically.

    Tensors are laid out by decreasing item size, then by name, so every tensor starts at an
    offset that is a multiple of its item size (the header is padded to 8 bytes): a reader that
    maps the file can view each tensor in place without copying.
    """
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map str to str (convert numbers with str())")
    entries = []
    for name, array in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved by the safetensors format; rename that tensor")
        dtype_name, host = _as_little_endian_host_array(name, array)
        entries.append((name, dtype_name, host))
    entries.sort(key=lambda e: (-e[2].dtype.itemsize, e[0]))

    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype_name, host in entries:
        header[name] = {"dtype": dtype_name, "shape": list(host.shape),
                        "data_offsets": [offset, offset + host.nbytes]}
        offset += host.nbytes
    header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    with _atomic_file(path) as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for _, _, host in entries:
            if host.nbytes:
                f.write(memoryview(host).cast("B"))   # the array's own bytes: no tobytes() copy


# ---------------------------------------------------------------- safetensors: read

def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(Exception):
    pass


def _is_count(value) -> bool:
    """A non-negative JSON integer (bool is an int in Python, but not in JSON)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_header(where: str, raw: bytes) -> tuple[dict[str, dict], dict[str, str]]:
    """Header bytes -> ({name: {"dtype", "shape", "data_offsets"}}, metadata), all checked."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicate_keys)
    except UnicodeDecodeError:
        raise UserError(f"checkpoint {where} has a header that is not UTF-8; {_FIX}") from None
    except _DuplicateKey as exc:
        raise UserError(f"checkpoint {where} names {exc.args[0]!r} twice in its header; {_FIX}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"checkpoint {where} has a header that is not valid JSON ({exc.msg}); "
                        "it is corrupt or not a safetensors file") from None
    if not isinstance(header, dict):
        raise UserError(f"checkpoint {where} has a header that is not a JSON object; {_FIX}")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"checkpoint {where} has __metadata__ that is not a map of strings to strings; {_FIX}")

    for name, info in header.items():
        if not isinstance(info, dict):
            raise UserError(f"checkpoint {where}: entry {name!r} is not an object; {_FIX}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPES and dtype not in _ITEMSIZE_OF_UNREADABLE:
            raise UserError(f"checkpoint {where}: tensor {name!r} has unknown dtype {dtype!r}; {_FIX}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise UserError(f"checkpoint {where}: tensor {name!r} has an invalid shape {shape!r}; {_FIX}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
                or offsets[1] < offsets[0]):
            raise UserError(f"checkpoint {where}: tensor {name!r} has invalid data_offsets {offsets!r}; {_FIX}")
    return header, metadata


def _check_spans(where: str, header: dict[str, dict], data_bytes: int) -> None:
    """Spans sorted by offset must tile [0, data_bytes) exactly, each matching its dtype x shape."""
    position = 0
    for name, info in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        begin, end = info["data_offsets"]
        if begin < position:
            raise UserError(f"checkpoint {where}: tensor {name!r} overlaps the tensor before it "
                            f"(starts at byte {begin}, previous ends at {position}); {_FIX}")
        if begin > position:
            raise UserError(f"checkpoint {where}: bytes {position}..{begin} of the data belong to no tensor "
                            f"(gap before {name!r}); {_FIX}")
        itemsize = _DTYPES[info["dtype"]].itemsize if info["dtype"] in _DTYPES \
            else _ITEMSIZE_OF_UNREADABLE[info["dtype"]]
        expected = itemsize * math.prod(info["shape"])
        if end - begin != expected:
            raise UserError(f"checkpoint {where}: tensor {name!r} of shape {info['shape']} and dtype "
                            f"{info['dtype']} needs {expected} bytes but its span holds {end - begin}; {_FIX}")
        position = end
    if position > data_bytes:
        raise UserError(f"checkpoint {where} is truncated: header says {position} bytes of data, "
                        f"file has {data_bytes}; {_FIX}")
    if position < data_bytes:
        raise UserError(f"checkpoint {where} has {data_bytes - position} bytes after its last tensor "
                        "(the header does not describe them); it is corrupt: " + _FIX)


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file -> ({name: NumPy array}, metadata). Never unpickles.

    Arrays come back writable, aligned and in native byte order; BF16 tensors are widened to
    float32 (exactly: a bfloat16 is the top half of a float32). Every problem with the file is a
    ``UserError`` naming it.
    """
    where = os.fspath(path)
    try:
        f = open(where, "rb")
    except FileNotFoundError:
        raise UserError(f"checkpoint {where} does not exist; check the path or train a model first") from None
    except IsADirectoryError:
        raise UserError(f"checkpoint {where} is a folder, not a file; name the .safetensors file in it") from None
    except OSError as exc:
        raise UserError(f"cannot read checkpoint {where}: {exc.strerror}") from None
    with f:
        file_size = os.fstat(f.fileno()).st_size
        if file_size < 8:
            raise UserError(f"checkpoint {where} is {file_size} bytes, too short to be a safetensors file; {_FIX}")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES:
            raise UserError(f"checkpoint {where} claims a {header_len}-byte header, over the "
                            f"{MAX_HEADER_BYTES // 1_000_000} MB limit: it is corrupt or not a safetensors file")
        if 8 + header_len > file_size:
            raise UserError(f"checkpoint {where} is truncated: its header needs {header_len} bytes, "
                            f"file has {file_size - 8} after the length field; {_FIX}")
        header, metadata = _parse_header(where, f.read(header_len))
        data_bytes = file_size - 8 - header_len
        _check_spans(where, header, data_bytes)

        tensors: dict[str, np.ndarray] = {}
        data_start = 8 + header_len
        for name, info in header.items():
            if info["dtype"] in _ITEMSIZE_OF_UNREADABLE:
                raise UserError(f"checkpoint {where}: tensor {name!r} is {info['dtype']}, which NumPy cannot "
                                "represent; convert the checkpoint to F16/F32 first")
            # Read straight into a fresh array: aligned, writable, no second copy of the file.
            array = np.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
            if array.nbytes:
                f.seek(data_start + info["data_offsets"][0])
                if f.readinto(memoryview(array).cast("B")) != array.nbytes:
                    raise UserError(f"checkpoint {where} changed while being read; {_FIX}")
            if info["dtype"] == "BF16":
                array = (array.astype(np.uint32) << 16).view(np.float32)
            elif not array.dtype.isnative:
                array = array.astype(array.dtype.newbyteorder("="))
            tensors[name] = array
    return tensors, dict(metadata)
