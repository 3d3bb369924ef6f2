"""A GGUF file (llama.cpp's format, versions 2 and 3): its metadata and memory-mapped tensors.

Reading only what is asked: the key-value header is parsed with struct and numpy, tensors
are numpy views of the mapped file. gguf.GGUFReader gives the same values but slices one
numpy array per vocabulary string: about 2 s for a 49k-token vocabulary against 0.05 s
here, paid by every load of a model and of its tokenizer. The gguf package is still used
(lazily) to dequantize the block types fourbit does not read itself.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct

import numpy as np

# Metadata value types of fixed size, as struct formats; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

# ggml tensor types fourbit reads itself: name, weights per block, bytes per block.
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34),
         30: ("BF16", 1, 2)}


@dataclasses.dataclass
class GGUFTensor:
    name: str
    type: int                  # ggml type number (TYPES, or any the gguf package knows)
    type_name: str
    shape: tuple[int, ...]     # outermost first, as torch: a weight is (N, K)
    data: np.ndarray           # uint8 [bytes] view of the mapped file


def _block_layout(ggml_type: int) -> tuple[str, int, int]:
    if ggml_type in TYPES:
        return TYPES[ggml_type]
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        kind = GGMLQuantizationType(ggml_type)
        return (kind.name, *GGML_QUANT_SIZES[kind])
    except (ImportError, ValueError, KeyError):
        raise ValueError(f"unknown ggml tensor type {ggml_type} (install the gguf package for more types)") from None


class GGUFFile:
    """metadata: {key: value}; tensors: {name: GGUFTensor}, in file order."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as file:
            header = file.read(24)
            self._order = "<" if header[4:6] != b"\0\0" else ">"  # versions are small: big-endian starts 00 00
            if len(header) < 24 or header[:4] != b"GGUF" or \
                    struct.unpack_from(self._order + "I", header, 4)[0] not in (2, 3):
                raise ValueError(f"{path} is not a GGUF file (version 2 or 3)")
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self._offset = 24
        try:
            tensor_count, kv_count = struct.unpack_from(self._order + "QQ", self._map, 8)
            self.metadata = {}
            for _ in range(kv_count):
                key = self._read(_STRING)
                self.metadata[key] = self._read(self._scalar("I"))
            infos = []
            for _ in range(tensor_count):
                name = self._read(_STRING)
                dims = [self._scalar("Q") for _ in range(self._scalar("I"))]
                infos.append((name, dims, self._scalar("I"), self._scalar("Q")))
            alignment = self.metadata.get("general.alignment", 32)
            start = -(-self._offset // alignment) * alignment
            self.tensors = {}
            for name, dims, ggml_type, offset in infos:
                type_name, block, block_bytes = _block_layout(ggml_type)
                count = int(np.prod(dims)) if dims else 1
                nbytes = count // block * block_bytes
                if start + offset + nbytes > len(self._map):
                    raise ValueError(f"{path} is truncated: tensor {name} ends past the end of the file")
                data = np.frombuffer(self._map, np.uint8, nbytes, start + offset)
                self.tensors[name] = GGUFTensor(name, ggml_type, type_name, tuple(int(d) for d in reversed(dims)), data)
        except (struct.error, UnicodeDecodeError, IndexError) as error:
            raise ValueError(f"{path} is not a readable GGUF file: {error}") from error

    def _scalar(self, fmt: str):
        value = struct.unpack_from(self._order + fmt, self._map, self._offset)[0]
        self._offset += struct.calcsize(fmt)
        return value

    def _read(self, kind: int):
        if kind == _STRING:
            size = self._scalar("Q")
            self._offset += size
            return str(self._map[self._offset - size:self._offset], "utf-8")
        if kind == _ARRAY:
            item_kind, count = self._scalar("I"), self._scalar("Q")
            if item_kind not in _SCALARS:
                return [self._read(item_kind) for _ in range(count)]
            dtype = np.dtype(self._order + _SCALARS[item_kind])
            values = np.frombuffer(self._map, dtype, count, self._offset).tolist()
            self._offset += count * dtype.itemsize
            return values
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF metadata type {kind}")
        return self._scalar(_SCALARS[kind])


def read_gguf_metadata(path) -> dict:
    """The key-value metadata of a GGUF file."""
    return GGUFFile(path).metadata
