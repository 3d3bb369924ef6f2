"""fourbit's GGUF reader against the gguf package's GGUFReader on the embedded SmolLM2 file
and on files written with gguf.GGUFWriter."""

import re
import struct

import numpy as np
import pytest

from fourbit.gguf_file import GGUFFile

gguf = pytest.importorskip("gguf")


def test_metadata_and_tensors_match_gguf_reader(smollm_path):
    ours = GGUFFile(smollm_path)
    reader = gguf.GGUFReader(str(smollm_path))
    expected = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert ours.metadata == expected
    assert list(ours.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        mine = ours.tensors[t.name]
        assert mine.type == int(t.tensor_type) and mine.type_name == t.tensor_type.name
        assert mine.shape == tuple(int(d) for d in reversed(t.shape))
        assert np.array_equal(mine.data, np.asarray(t.data).reshape(-1).view(np.uint8))


def test_written_file_round_trips(tmp_path):
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_uint32("llama.block_count", 3)
    writer.add_float32("x.scale", 0.5)
    writer.add_string("x.name", "naïve ✓")
    writer.add_array("x.list", [1, 2, 3])
    writer.add_array("x.words", ["a", "bc", ""])
    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    b = np.arange(10, dtype=np.float16)
    writer.add_tensor("a", a)
    writer.add_tensor("b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    f = GGUFFile(path)
    assert f.metadata["llama.block_count"] == 3 and f.metadata["x.scale"] == 0.5
    assert f.metadata["x.name"] == "naïve ✓" and f.metadata["x.list"] == [1, 2, 3]
    assert f.metadata["x.words"] == ["a", "bc", ""]
    assert f.tensors["a"].shape == (4, 6) and np.array_equal(f.tensors["a"].data.view(np.float32).reshape(4, 6), a)
    assert np.array_equal(f.tensors["b"].data.view(np.float16), b)


def test_bad_files_raise(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF\x09\x00\x00\x00" + b"\0" * 16)
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(tmp_path / "x.gguf")
    (tmp_path / "y.gguf").write_bytes(b"nothing")
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(tmp_path / "y.gguf")


def test_truncated_file_raises(smollm_path, tmp_path):
    data = smollm_path.read_bytes()
    for keep in (0.5, 0.0001):
        (tmp_path / "t.gguf").write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(ValueError, match="truncated|not a readable GGUF"):
            GGUFFile(tmp_path / "t.gguf")


# --- damaged files: each a ValueError naming the file and the field, as llama.cpp refuses them ---

F32, Q4_0, U32, STRING, ARRAY = 0, 2, 4, 8, 9


def _string(text) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def _kv(key, kind: int, payload: bytes) -> bytes:
    return _string(key) + struct.pack("<I", kind) + payload


def _u32(key, value: int) -> bytes:
    return _kv(key, U32, struct.pack("<I", value))


def _tensor_info(name, dims, ggml_type=F32, offset=0) -> bytes:
    return (_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", ggml_type, offset))


def gguf_bytes(kvs=(), infos=(), data=b"", version=3, tensor_count=None, kv_count=None) -> bytes:
    """A GGUF file written by hand, field by field, so that any field can be wrong (the data
    starts at the default alignment of 32)."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if tensor_count is None else tensor_count,
                                 len(kvs) if kv_count is None else kv_count)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % 32) + data


GOOD_KVS = [_u32("llama.block_count", 3), _kv("x.name", STRING, _string("naïve")),
            _kv("x.list", ARRAY, struct.pack("<IQ", U32, 2) + struct.pack("<2I", 7, 8)),
            _kv("x.words", ARRAY, struct.pack("<IQ", STRING, 2) + _string("a") + _string(""))]
GOOD_INFOS = [_tensor_info("w", [4, 2]), _tensor_info("b", [4], offset=32)]
GOOD_DATA = np.arange(8, dtype=np.float32).tobytes() + np.arange(4, dtype=np.float32).tobytes()


def test_hand_written_file_reads_as_gguf_reads_it(tmp_path):
    """gguf_bytes, which writes the damaged files below, writes a good one both readers accept."""
    path = tmp_path / "good.gguf"
    path.write_bytes(gguf_bytes(GOOD_KVS, GOOD_INFOS, GOOD_DATA))
    f = GGUFFile(path)
    assert f.metadata == {"llama.block_count": 3, "x.name": "naïve", "x.list": [7, 8], "x.words": ["a", ""]}
    assert f.tensors["w"].shape == (2, 4) and f.tensors["b"].shape == (4,)
    assert np.array_equal(f.tensors["w"].data.view(np.float32), np.arange(8, dtype=np.float32))
    assert np.array_equal(f.tensors["b"].data.view(np.float32), np.arange(4, dtype=np.float32))
    reader = gguf.GGUFReader(str(path))
    assert {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")} \
        == f.metadata
    assert [t.name for t in reader.tensors] == list(f.tensors)


def _nested(depth: int) -> bytes:
    """An array of one array of ... of no uint32s, `depth` arrays deep."""
    inner = struct.pack("<IQ", U32, 0)
    for _ in range(depth - 1):
        inner = struct.pack("<IQ", ARRAY, 1) + inner
    return inner


BAD_FILES = {
    # the header
    "version": (dict(version=9), r"version field is 9"),
    "kv-count-past-the-end": (dict(kv_count=2**62), r"metadata_kv_count: 4611686018427387904 entries"),
    "tensor-count-past-the-end": (dict(tensor_count=2**40), r"tensor_count: 1099511627776 entries"),
    # metadata
    "alignment-0": (dict(kvs=[_u32("general.alignment", 0)]), r"general.alignment: is 0: .*power of two"),
    "alignment-not-power-of-two": (dict(kvs=[_u32("general.alignment", 48)]), r"general.alignment: is 48"),
    "alignment-a-string": (dict(kvs=[_kv("general.alignment", STRING, _string("32"))]),
                           r"general.alignment: is '32'"),
    "key-length-past-the-end": (dict(kvs=[struct.pack("<Q", 2**60) + b"k" * 13]),
                                r"truncated: metadata key 0 needs 1152921504606846976 bytes"),
    "string-length-past-the-end": (dict(kvs=[_kv("x.name", STRING, struct.pack("<Q", 2**40) + b"abc")]),
                                   r"truncated: metadata 'x.name' needs 1099511627776 bytes"),
    "array-count-past-the-end": (dict(kvs=[_kv("x.list", ARRAY, struct.pack("<IQ", U32, 2**61))]),
                                 r"metadata 'x.list' count: 2305843009213693952 items"),
    "string-array-count-past-the-end": (dict(kvs=[_kv("x.words", ARRAY, struct.pack("<IQ", STRING, 2**50))]),
                                        r"metadata 'x.words' count: 1125899906842624 items"),
    "array-string-past-the-end": (dict(kvs=[_kv("x.words", ARRAY, struct.pack("<IQ", STRING, 2) + _string("a")
                                                + struct.pack("<Q", 2**33))]),
                                  r"truncated: metadata 'x.words'\[1\] needs"),
    "unknown-value-type": (dict(kvs=[_kv("x.bad", 99, b"\0" * 8)]), r"metadata 'x.bad': unknown GGUF metadata type 99"),
    "unknown-array-item-type": (dict(kvs=[_kv("x.list", ARRAY, struct.pack("<IQ", 13, 1) + b"\0" * 8)]),
                                r"metadata 'x.list': unknown GGUF metadata type 13"),
    "arrays-nested-too-deep": (dict(kvs=[_kv("x.deep", ARRAY, _nested(9))]), r"metadata 'x.deep'.*nested more than 8"),
    "duplicate-key": (dict(kvs=[_u32("x.n", 1), _u32("x.n", 2)]), r"metadata 'x.n': the key appears twice"),
    "key-not-utf8": (dict(kvs=[_u32(b"x.\xff", 1)]), r"metadata key 0: not valid UTF-8"),
    # the tensor table
    "n-dims-absurd": (dict(infos=[_string("w") + struct.pack("<I", 2**31) + b"\0" * 64]),
                      r"tensor 'w' n_dims: is 2147483648"),
    "dims-wrap-to-0": (dict(infos=[_tensor_info("w", [2**32, 2**32])]), r"tensor 'w' dims: \[4294967296, 4294967296\]"),
    "dims-wrap-to-small": (dict(infos=[_tensor_info("w", [2**63 + 1, 2])]), r"tensor 'w' dims: "),
    "dim-0": (dict(infos=[_tensor_info("w", [4, 0])]), r"tensor 'w' dims: \[4, 0\]"),
    "unknown-tensor-type": (dict(infos=[_tensor_info("w", [4], ggml_type=999)]), r"tensor 'w' type: unknown ggml"),
    "row-not-whole-blocks": (dict(infos=[_tensor_info("w", [33, 2], ggml_type=Q4_0)], data=b"\0" * 64),
                             r"tensor 'w' dims: the first dimension, 33, is not a multiple of the Q4_0 block of 32"),
    "offset-not-aligned": (dict(infos=[_tensor_info("w", [4], offset=4)], data=b"\0" * 32), r"tensor 'w' offset: 4"),
    "duplicate-tensor": (dict(infos=[_tensor_info("w", [4]), _tensor_info("w", [4], offset=32)], data=b"\0" * 48),
                         r"tensor 'w': the name appears twice"),
    "data-past-the-end": (dict(infos=[_tensor_info("w", [4, 2])], data=b"\0" * 16),
                          r"truncated: tensor 'w' data \(32 bytes at offset \d+\) ends past the end"),
    "offset-past-the-end": (dict(infos=[_tensor_info("w", [4], offset=2**40)], data=b"\0" * 16),
                            r"truncated: tensor 'w' data"),
}


@pytest.mark.parametrize("fields, named", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_damaged_file_is_a_value_error_naming_file_and_field(tmp_path, fields, named):
    """Never an internal struct, numpy, ZeroDivision, Recursion or Overflow error, nor a file
    accepted with a tensor whose size wrapped around: a ValueError with the path and the field."""
    path = tmp_path / "bad.gguf"
    path.write_bytes(gguf_bytes(**fields))
    with pytest.raises(ValueError) as error:
        GGUFFile(path)
    assert str(path) in str(error.value)
    assert re.search(named, str(error.value)), str(error.value)


def test_deep_nesting_is_refused_before_the_stack_runs_out(tmp_path):
    path = tmp_path / "deep.gguf"
    path.write_bytes(gguf_bytes([_kv("x.deep", ARRAY, _nested(100_000))]))
    with pytest.raises(ValueError, match="nested more than 8"):
        GGUFFile(path)
    path.write_bytes(gguf_bytes([_kv("x.deep", ARRAY, _nested(8))]))  # the deepest allowed
    assert GGUFFile(path).metadata["x.deep"] == [[[[[[[[]]]]]]]]
