"""A GGUF file (llama.cpp's format, versions 2 and 3): its metadata and memory-mapped tensors.

Reading only what is asked: the key-value header is parsed with struct and numpy, tensors
are numpy views of the mapped file. gguf.GGUFReader gives the same values but slices one
numpy array per vocabulary string: about 2 s for a 49k-token vocabulary against 0.05 s
here, paid by every load of a model and of its tokenizer. The gguf package is still used
(lazily) to dequantize the block types fourbit does not read itself.

A damaged or hostile file is refused with a ValueError naming the file and the field, as
llama.cpp's gguf.cpp refuses it: every count and length is checked against the bytes left
before anything is read or allocated, dims against int64 (in Python integers, which do not
wrap), general.alignment against powers of two, each tensor's data against the file's end.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import struct

import numpy as np

# Metadata value types of fixed size, as struct formats; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# The fewest bytes a value of each type takes (an empty string: its length; an empty array:
# its item type and count), which bound what a count can claim before anything is read.
_MIN_BYTES = {**{kind: struct.calcsize(fmt) for kind, fmt in _SCALARS.items()}, _STRING: 8, _ARRAY: 12}
_MIN_KV_BYTES = 8 + 4 + 1            # key length, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
MAX_DIMS = 4                         # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 8                # arrays of arrays; real files use one level
_INT64_MAX = 2**63 - 1

# ggml tensor types fourbit reads itself: name, weights per block, bytes per block.
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34),
         12: ("Q4_K", 256, 144), 30: ("BF16", 1, 2)}


@dataclasses.dataclass
class GGUFTensor:
    name: str
    type: int                  # ggml type number (TYPES, or any the gguf package knows)
    type_name: str
    shape: tuple[int, ...]     # outermost first, as torch: a weight is (N, K)
    data: np.ndarray           # uint8 [bytes] view of the mapped file


def _block_layout(ggml_type: int) -> tuple[str, int, int] | None:
    """(name, weights per block, bytes per block) of a ggml type, or None if unknown."""
    if ggml_type in TYPES:
        return TYPES[ggml_type]
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        kind = GGMLQuantizationType(ggml_type)
        return (kind.name, *GGML_QUANT_SIZES[kind])
    except (ImportError, ValueError, KeyError):
        return None


class GGUFFile:
    """metadata: {key: value}; tensors: {name: GGUFTensor}, in file order.

    Raises:
        ValueError: not a GGUF file of version 2 or 3, or one whose header or tensor table
            is damaged (truncated, impossible counts, lengths, types, dims, alignment or
            offsets, duplicate keys or names); the message names the file and the field.
    """

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as file:
            header = file.read(24)
            self._order = "<" if header[4:6] != b"\0\0" else ">"  # versions are small: big-endian starts 00 00
            if len(header) < 24 or header[:4] != b"GGUF":
                raise ValueError(f"{path} is not a GGUF file (version 2 or 3): it does not start with 'GGUF' "
                                 "and a 24-byte header")
            version = struct.unpack_from(self._order + "I", header, 4)[0]
            if version not in (2, 3):
                raise ValueError(f"{path} is not a GGUF file (version 2 or 3): its version field is {version}")
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._read_header()
        except ValueError:
            try:
                self._map.close()
            except BufferError:  # tensors already viewing the map keep it open
                pass
            raise

    def _read_header(self) -> None:
        self._offset = 24
        tensor_count, kv_count = struct.unpack_from(self._order + "QQ", self._map, 8)
        self._check_count("metadata_kv_count", kv_count, _MIN_KV_BYTES)
        self._check_count("tensor_count", tensor_count, _MIN_TENSOR_INFO_BYTES)
        self.metadata = {}
        for i in range(kv_count):
            key = self._string(f"metadata key {i}")
            if key in self.metadata:
                raise self._error(f"metadata {key!r}", "the key appears twice")
            self.metadata[key] = self._value(f"metadata {key!r}", self._scalar("I", f"metadata {key!r} type"))
        infos = [self._tensor_info(i) for i in range(tensor_count)]
        alignment = self.metadata.get("general.alignment", 32)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise self._error("general.alignment", f"is {alignment!r}: it must be a power of two")
        start = -(-self._offset // alignment) * alignment
        self.tensors = {}
        for name, dims, ggml_type, offset in infos:
            field = f"tensor {name!r}"
            if name in self.tensors:
                raise self._error(field, "the name appears twice")
            layout = _block_layout(ggml_type)
            if layout is None:
                raise self._error(f"{field} type", f"unknown ggml tensor type {ggml_type} "
                                  "(install the gguf package for more types)")
            type_name, block, block_bytes = layout
            if dims and dims[0] % block:
                raise self._error(f"{field} dims", f"the first dimension, {dims[0]}, is not a multiple of "
                                  f"the {type_name} block of {block} weights")
            if offset % alignment:
                raise self._error(f"{field} offset", f"{offset} is not a multiple of general.alignment "
                                  f"({alignment})")
            nbytes = math.prod(dims) // block * block_bytes
            if start + offset + nbytes > len(self._map):
                raise ValueError(f"{self.path} is truncated: {field} data ({nbytes} bytes at offset {start + offset}) "
                                 f"ends past the end of the file ({len(self._map)} bytes)")
            data = np.frombuffer(self._map, np.uint8, nbytes, start + offset)
            self.tensors[name] = GGUFTensor(name, ggml_type, type_name, tuple(reversed(dims)), data)

    def _error(self, field: str, problem: str) -> ValueError:
        return ValueError(f"{self.path} is not a readable GGUF file: {field}: {problem}")

    def _need(self, nbytes: int, field: str) -> None:
        """Raise unless nbytes more can be read at the current offset."""
        if nbytes > len(self._map) - self._offset:
            raise ValueError(f"{self.path} is truncated: {field} needs {nbytes} bytes at offset {self._offset}, "
                             f"past the end of the file ({len(self._map)} bytes)")

    def _check_count(self, field: str, count: int, min_bytes: int) -> None:
        if count * min_bytes > len(self._map) - self._offset:
            raise self._error(field, f"{count} entries of at least {min_bytes} bytes each cannot fit in the "
                              f"file's {len(self._map)} bytes")

    def _scalar(self, fmt: str, field: str):
        size = struct.calcsize(fmt)
        self._need(size, field)
        value = struct.unpack_from(self._order + fmt, self._map, self._offset)[0]
        self._offset += size
        return value

    def _string(self, field: str) -> str:
        size = self._scalar("Q", f"{field} length")
        self._need(size, field)
        self._offset += size
        try:
            return str(self._map[self._offset - size:self._offset], "utf-8")
        except UnicodeDecodeError as error:
            raise self._error(field, f"not valid UTF-8 ({error})") from None

    def _strings(self, field: str, count: int) -> list[str]:
        """An array of `count` strings: _string's checks in one tight loop (vocabularies have
        tens of thousands)."""
        data, offset, end = self._map, self._offset, len(self._map)
        length = struct.Struct(self._order + "Q").unpack_from
        strings = []
        try:
            for i in range(count):
                if offset + 8 > end or (size := length(data, offset)[0]) > end - offset - 8:
                    self._offset = offset
                    self._need(8 if offset + 8 > end else 8 + size, f"{field}[{i}]")
                strings.append(str(data[offset + 8:offset + 8 + size], "utf-8"))
                offset += 8 + size
        except UnicodeDecodeError as error:
            raise self._error(f"{field}[{len(strings)}]", f"not valid UTF-8 ({error})") from None
        self._offset = offset
        return strings

    def _value(self, field: str, kind: int, depth: int = 0):
        if kind == _STRING:
            return self._string(field)
        if kind == _ARRAY:
            if depth == MAX_ARRAY_NESTING:
                raise self._error(field, f"arrays nested more than {MAX_ARRAY_NESTING} deep")
            item_kind, count = self._scalar("I", f"{field} item type"), self._scalar("Q", f"{field} count")
            if item_kind not in _MIN_BYTES:
                raise self._error(field, f"unknown GGUF metadata type {item_kind} (of the array's items)")
            if count * _MIN_BYTES[item_kind] > len(self._map) - self._offset:
                raise self._error(f"{field} count", f"{count} items of at least {_MIN_BYTES[item_kind]} bytes "
                                  f"each run past the end of the file ({len(self._map)} bytes)")
            if item_kind == _STRING:
                return self._strings(field, count)
            if item_kind == _ARRAY:
                return [self._value(f"{field}[{i}]", item_kind, depth + 1) for i in range(count)]
            dtype = np.dtype(self._order + _SCALARS[item_kind])
            values = np.frombuffer(self._map, dtype, count, self._offset).tolist()
            self._offset += count * dtype.itemsize
            return values
        if kind not in _SCALARS:
            raise self._error(field, f"unknown GGUF metadata type {kind}")
        return self._scalar(_SCALARS[kind], field)

    def _tensor_info(self, i: int) -> tuple[str, list[int], int, int]:
        name = self._string(f"tensor {i} name")
        field = f"tensor {name!r}"
        n_dims = self._scalar("I", f"{field} n_dims")
        if n_dims > MAX_DIMS:
            raise self._error(f"{field} n_dims", f"is {n_dims}: at most {MAX_DIMS}")
        dims = [self._scalar("Q", f"{field} dims") for _ in range(n_dims)]  # innermost first
        if 0 in dims or any(d > _INT64_MAX for d in dims) or math.prod(dims) > _INT64_MAX:
            raise self._error(f"{field} dims", f"{dims} (innermost first) are not a tensor: each must be "
                              f"at least 1 and their product at most 2**63 - 1 (it is {math.prod(dims)})")
        return name, dims, self._scalar("I", f"{field} type"), self._scalar("Q", f"{field} offset")


def read_gguf_metadata(path) -> dict:
    """The key-value metadata of a GGUF file."""
    return GGUFFile(path).metadata
