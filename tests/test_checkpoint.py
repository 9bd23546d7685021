"""Checkpoint files: safetensors by hand (round trips, interop with the reference package, every
corruption refused with a UserError) and atomic writes (a failed save leaves the old file)."""
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from scratchlm import checkpoint
from scratchlm.checkpoint import (atomic_write_bytes, load_safetensors, read_json, save_safetensors,
                                  write_json_atomic)
from scratchlm.errors import UserError


def assert_same_arrays(expected: dict, actual: dict):
    """Same names, dtypes, shapes and bytes (bytes, so NaNs and -0.0 count too)."""
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        assert got.tobytes() == np.ascontiguousarray(want).tobytes(), name


def some_tensors():
    return {
        "scalar_f64": np.array(3.25),                                   # 0-d
        "empty_f32": np.zeros((0, 3), dtype=np.float32),                # no bytes at all
        "weight": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        "half": np.array([1.5, -2.0, np.inf], dtype=np.float16),
        "ids": np.array([[1, -2], [3, 2**40]], dtype=np.int64),
        "small": np.array([-1, 7], dtype=np.int32),
        "bytes": np.arange(5, dtype=np.uint8),
        "mask": np.array([True, False, True]),
        "strided": np.arange(20, dtype=np.float64).reshape(4, 5)[:, ::2],   # not contiguous
    }


def test_round_trip_of_several_dtypes_and_shapes(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = some_tensors()
    save_safetensors(path, tensors, metadata={"format": "np", "iter": "12"})
    loaded, metadata = load_safetensors(path)
    assert_same_arrays(tensors, loaded)
    assert metadata == {"format": "np", "iter": "12"}
    assert all(a.flags.writeable and a.flags.c_contiguous for a in loaded.values())


def test_layout_header_padded_and_tensors_aligned(tmp_path):
    path = tmp_path / "m.safetensors"
    save_safetensors(path, some_tensors())
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__")                   # the checksum is always there
    for name, info in header.items():
        itemsize = np.dtype(checkpoint._DTYPES[info["dtype"]]).itemsize
        assert info["data_offsets"][0] % itemsize == 0, name


def test_big_endian_input_is_stored_little_endian(tmp_path):
    path = tmp_path / "be.safetensors"
    big = np.arange(4, dtype=">f4")
    save_safetensors(path, {"x": big})
    loaded, _ = load_safetensors(path)
    assert loaded["x"].dtype == np.float32 and np.array_equal(loaded["x"], big)


def test_bf16_is_read_as_float32(tmp_path):
    values = np.array([1.0, -2.5, 0.15625, np.inf], dtype=np.float32)   # exactly representable in bf16
    bits = (values.view(np.uint32) >> 16).astype("<u2")
    header = {"x": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}
    path = write_raw(tmp_path, header, bits.tobytes())
    loaded, _ = load_safetensors(path)
    assert loaded["x"].dtype == np.float32 and np.array_equal(loaded["x"], values)


def test_save_refuses_reserved_name_and_non_string_metadata(tmp_path):
    with pytest.raises(ValueError):
        save_safetensors(tmp_path / "a.safetensors", {"__metadata__": np.zeros(1)})
    with pytest.raises(TypeError):
        save_safetensors(tmp_path / "a.safetensors", {"x": np.zeros(1)}, metadata={"step": 3})
    with pytest.raises(ValueError):
        save_safetensors(tmp_path / "a.safetensors", {"x": np.zeros(1, dtype=np.complex64)})


# ---------------------------------------------------------------- interop with the reference package

def test_files_we_write_load_with_the_safetensors_package(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "ours.safetensors"
    tensors = some_tensors()
    save_safetensors(path, tensors, metadata={"k": "v"})
    assert_same_arrays(tensors, st_numpy.load_file(str(path)))


def test_files_the_safetensors_package_writes_load_with_ours(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "theirs.safetensors"
    tensors = {k: np.ascontiguousarray(v) for k, v in some_tensors().items()}
    st_numpy.save_file(tensors, str(path), metadata={"format": "np"})
    loaded, metadata = load_safetensors(path)
    assert_same_arrays(tensors, loaded)
    assert metadata == {"format": "np"}


# ---------------------------------------------------------------- property: random dicts round-trip

_dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int32, np.int8, np.uint8,
                           np.uint16, np.bool_])
_arrays = _dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0,
                                                                     max_side=4)))
_names = st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__")


@settings(max_examples=40, deadline=None)
@given(tensors=st.dictionaries(_names, _arrays, max_size=5),
       metadata=st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
def test_random_dicts_round_trip_exactly(tmp_path_factory, tensors, metadata):
    path = tmp_path_factory.mktemp("prop") / "t.safetensors"
    save_safetensors(path, tensors, metadata=metadata)
    loaded, loaded_metadata = load_safetensors(path)
    assert_same_arrays(tensors, loaded)
    assert loaded_metadata == (metadata or {})


# ---------------------------------------------------------------- corruption: always a UserError

def write_raw(folder, header, data: bytes, header_bytes: bytes | None = None, length: int | None = None):
    """A hand-made safetensors file; ``header_bytes``/``length`` override the honest ones."""
    body = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path = folder / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def good_header():
    return {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "I64", "shape": [1], "data_offsets": [8, 16]}}


def _with(change):
    """A builder: the good header with ``change`` applied, and the 16 data bytes it describes."""
    def build(folder):
        header = good_header()
        change(header)
        return write_raw(folder, header, bytes(16))
    return build


def _set(name, field, value):
    return _with(lambda h: h[name].__setitem__(field, value))


def _short_file(folder):
    path = folder / "bad.safetensors"
    path.write_bytes(b"\1\0\0")
    return path


_DUPLICATE = (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
              b'"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}')

# every corruption the reader must refuse: name -> builder(folder) -> path of the bad file
CORRUPTIONS = {
    "truncated data": lambda d: write_raw(d, good_header(), bytes(10)),
    "trailing bytes": lambda d: write_raw(d, good_header(), bytes(24)),
    "huge header length": lambda d: write_raw(d, good_header(), bytes(16), length=2**40),
    "header length past end": lambda d: write_raw(d, good_header(), bytes(16), length=10_000),
    "shorter than 8 bytes": _short_file,
    "overlapping offsets": _set("b", "data_offsets", [4, 12]),
    "gap in coverage": lambda d: write_raw(d, {**good_header(), "b": {"dtype": "I64", "shape": [1],
                                                                      "data_offsets": [12, 20]}}, bytes(20)),
    "wrong span size": _set("a", "shape", [3]),
    "end before begin": _set("a", "data_offsets", [8, 0]),
    "duplicate key": lambda d: write_raw(d, None, bytes(16), header_bytes=_DUPLICATE),
    "bad JSON": lambda d: write_raw(d, None, bytes(16), header_bytes=b'{"a": {"dtype": "F32", '),
    "not UTF-8": lambda d: write_raw(d, None, bytes(16), header_bytes=b'{"\xff": 1}'),
    "header not an object": lambda d: write_raw(d, None, bytes(16), header_bytes=b"[1, 2]"),
    "unknown dtype": _set("a", "dtype", "F33"),
    "negative dimension": _set("a", "shape", [-2]),
    "float offset": _set("a", "data_offsets", [0, 8.0]),
    "metadata not strings": _with(lambda h: h.__setitem__("__metadata__", {"step": 3})),
    "unreadable dtype": lambda d: write_raw(d, {"a": {"dtype": "F8_E4M3", "shape": [2],
                                                      "data_offsets": [0, 2]}}, bytes(2)),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_every_corruption_is_a_one_line_user_error(tmp_path, case):
    path = CORRUPTIONS[case](tmp_path)
    with pytest.raises(UserError) as info:
        load_safetensors(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


@pytest.mark.parametrize("case", sorted(set(CORRUPTIONS) - {"unreadable dtype"}))
def test_the_reference_package_refuses_the_same_files(tmp_path, case):
    """Our corruption cases are real ones: the reference reader rejects each of them too."""
    st_numpy = pytest.importorskip("safetensors.numpy")
    path = CORRUPTIONS[case](tmp_path)
    with pytest.raises(Exception):
        st_numpy.load_file(str(path))


def test_the_untouched_good_file_loads(tmp_path):
    """The corruption fixtures start from a valid file: make sure that file itself passes."""
    path = write_raw(tmp_path, good_header(), bytes(16))
    loaded, _ = load_safetensors(path)
    assert loaded["a"].tolist() == [0.0, 0.0] and loaded["b"].tolist() == [0]


def test_truncated_message_names_both_sizes(tmp_path):
    path = write_raw(tmp_path, good_header(), bytes(10))
    with pytest.raises(UserError, match="truncated: header says 16 bytes of data, file has 10"):
        load_safetensors(path)


def test_missing_file_and_folder_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="folder"):
        load_safetensors(tmp_path)


# ---------------------------------------------------------------- JSON and atomic writes

def test_json_round_trip_and_errors(tmp_path):
    path = tmp_path / "trainer.json"
    obj = {"iter": 3, "best_val_loss": 1.25, "rng": {"state": [1, 2]}, "name": "ünïcode"}
    write_json_atomic(path, obj)
    assert read_json(path) == obj
    with pytest.raises(UserError, match="does not exist"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text('{"iter": 3,')
    with pytest.raises(UserError, match="not valid JSON"):
        read_json(tmp_path / "broken.json")


def test_atomic_write_creates_missing_folders(tmp_path):
    path = tmp_path / "runs" / "x" / "blob.bin"
    atomic_write_bytes(path, b"hello")
    assert path.read_bytes() == b"hello"


@pytest.mark.parametrize("writer", ["bytes", "json", "safetensors"])
def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch, writer):
    path = tmp_path / "file"
    path.write_bytes(b"previous contents")

    def broken_replace(src, dst):
        raise OSError("disk on fire")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        if writer == "bytes":
            atomic_write_bytes(path, b"new")
        elif writer == "json":
            write_json_atomic(path, {"new": 1})
        else:
            save_safetensors(path, {"w": np.ones(3)})
    assert path.read_bytes() == b"previous contents"
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_failure_while_serialising_keeps_previous_file(tmp_path):
    """An error in the middle of writing (not at the rename) also cleans up after itself."""
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"w": np.ones(3)})
    before = path.read_bytes()
    with pytest.raises(ValueError):
        save_safetensors(path, {"w": np.ones(3), "z": np.zeros(2, dtype=object)})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"not json": object()})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


# ---------------------------------------------------------------- checksum of the tensor bytes

def _data_section(raw: bytes) -> tuple[int, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, raw[8 + n:]


def test_checksum_is_the_sha256_of_the_data_section(tmp_path):
    """Oracle: hashlib over the bytes after the header, computed here independently of the writer."""
    import hashlib
    path = tmp_path / "model.safetensors"
    save_safetensors(path, some_tensors(), metadata={"step": "3"})
    raw = path.read_bytes()
    start, data = _data_section(raw)
    header = json.loads(raw[8:start])
    assert header["__metadata__"] == {"step": "3", checkpoint.CHECKSUM_KEY: hashlib.sha256(data).hexdigest()}
    assert load_safetensors(path)[1] == {"step": "3"}            # the checksum is not handed to callers


def test_every_flipped_byte_of_the_tensor_data_is_refused(tmp_path):
    """Flip one bit in each byte of the data section in turn (the header stays intact): every file
    is refused with the one-line message. The same flip in a file without a checksum loads
    silently as other weights -- the failure the checksum exists for."""
    path = tmp_path / "model.safetensors"
    tensors = {"wte.weight": np.linspace(-1, 1, 48, dtype=np.float32).reshape(6, 8),
               "ln.bias": np.arange(5, dtype=np.float64), "ids": np.array([3, 1, 2], dtype=np.int16)}
    save_safetensors(path, tensors)
    good = path.read_bytes()
    start, data = _data_section(good)
    assert len(data) == 48 * 4 + 5 * 8 + 3 * 2
    for k in range(len(data)):
        damaged = bytearray(good)
        damaged[start + k] ^= 1 << (k % 8)
        path.write_bytes(bytes(damaged))
        with pytest.raises(UserError) as info:
            load_safetensors(path)
        assert str(info.value).startswith(f"{path}: tensor data does not match its checksum; the file is damaged")
        assert "\n" not in str(info.value)
    path.write_bytes(good)
    assert_same_arrays(tensors, load_safetensors(path)[0])

    header = json.loads(good[8:start])
    del header["__metadata__"]
    unchecked = write_raw(tmp_path, header, bytes(data[:0]) + bytes([data[0] ^ 1]) + data[1:])
    loaded, metadata = load_safetensors(unchecked)          # an older file: no checksum, loads as it is
    assert metadata == {} and loaded["ln.bias"][0] != tensors["ln.bias"][0]


def test_files_without_a_checksum_still_load(tmp_path):
    """Older runs and files from other writers carry no checksum: they load unchecked."""
    path = write_raw(tmp_path, {"__metadata__": {"format": "pt"}, **good_header()}, bytes(16))
    loaded, metadata = load_safetensors(path)
    assert metadata == {"format": "pt"} and loaded["a"].tolist() == [0.0, 0.0]


def test_the_checksum_key_is_reserved(tmp_path):
    with pytest.raises(ValueError, match=checkpoint.CHECKSUM_KEY):
        save_safetensors(tmp_path / "a.safetensors", {"x": np.zeros(1)}, metadata={checkpoint.CHECKSUM_KEY: "0"})
