"""fourbit's GGUF reader against the gguf package's GGUFReader on the embedded SmolLM2 file
and on files written with gguf.GGUFWriter."""

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
