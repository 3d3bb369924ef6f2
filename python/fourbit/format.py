"""The fourbit int4 weight format. This module is the one owner of its layout.

A weight matrix W [N, K] (N output features, K input features) is stored as

    w[n, perm[k]] = q[n, k] * s[n, g] + m[n, g],      g = k // group_size

- q is an unsigned 4-bit integer in [0, 15].
- s (scale) and m (offset) are kept per group of ``group_size`` consecutive (stored) input
  channels of one output row, each in fp32, bf16 or fp16 (not necessarily the same one).
  Dequantizing is one fused multiply-add per weight, computed in fp32.
- Symmetric mode is the special case m = -8 * s (q - 8 is a signed int4 in [-8, 7]).
  llama.cpp Q4_1 (d, m) maps exactly (s = d); Q4_0 maps to m = -8 * d.
- Lossless imports. An upstream format's weight is reproduced exactly, in fp32, by keeping
  s in its own dtype and m in fp32 where the 16-bit dtype cannot hold it: GPTQ/AWQ/
  compressed-tensors integer zero points z give m = -z * s (an fp16 s times a 4-bit z is
  exact in fp32, rarely in fp16); GGUF Q4_K's d * sc and dmin * min products need fp32 s and
  m; HQQ's float zero gives m = -z * s, exact in fp32. q * s is exact in fp32 in every case,
  so q * s + m rounds once, as the upstream dequantization does.
- perm (optional, int32 [K]): act-order (GPTQ desc_act, compressed-tensors actorder). The
  stored column k holds input channel perm[k], so that the channels of one group are
  contiguous; the layer gathers x[..., perm] before the product. None means the identity.
- group_size is one of 32, 64, 128, 256, or -1 for one group per output row.

Canonical packing (what checkpoints always hold):

- qweight: int32 [N, K_padded // 8]; nibble i (bits 4i..4i+3) of word j holds the q of
  (stored) column 8j + i. The int32 is a container: bit 31 belongs to nibble 7 of the word.
- scales, offsets: [N, num_groups], num_groups = K_padded // group_size (1 when
  group_size == -1).
- K_padded rounds K up to a multiple of the group size (to a multiple of 8 when
  group_size == -1). Padded columns hold q = 0 and are never read: they lie past the K
  columns of any activation, so the padding never changes a result.

A backend may keep its own prepacked layout, made once at load time, as long as it
converts to and from this one exactly. (The CUDA tensor-core kernel dequantizes in x's
16-bit dtype, so there s and m are rounded to it first: the weight it computes with is
the exact one rounded to 16 bits, plus at most one more rounding of m.)

Format versions: 1 (scales and offsets share a dtype, no perm); 2 (this). Version 1
checkpoints are version 2 checkpoints.

Bytes per weight at group_size 128 with fp16 s and m: 0.5 + 2 * 2 / 128 = 0.531 (0.547
with fp32 offsets).
"""

from __future__ import annotations

import sys

import torch

from . import _checks

GROUP_SIZES = (32, 64, 128, 256, -1)
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_NIBBLES = 8  # 4-bit values per int32 word


def check_group_size(group_size: int) -> None:
    """Raise ValueError unless group_size is one the format supports."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")


def padded_k(k: int, group_size: int) -> int:
    """K rounded up to whole groups (to whole int32 words when group_size == -1)."""
    check_group_size(group_size)
    multiple = _NIBBLES if group_size == -1 else group_size
    return -(-k // multiple) * multiple


def group_len(k: int, group_size: int) -> int:
    """Input channels per group, as kernels see it: K_padded for one group per row."""
    return padded_k(k, group_size) if group_size == -1 else group_size


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values into the canonical int32 words.

    Args:
        q: integer tensor [N, K] with values in [0, 15], K a multiple of 8.
    Returns:
        int32 [N, K // 8]; nibble i (bits 4i..4i+3) of word j is column 8j + i.
    """
    _checks.tensor("q", q)
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise TypeError(f"pack_int4 expects q to be an integer tensor, got {q.dtype}")
    if q.dim() != 2 or q.shape[1] % _NIBBLES:
        raise ValueError(f"pack_int4 expects q as [N, K] with K a multiple of 8, got {tuple(q.shape)}")
    if q.numel():
        low, high = torch.aminmax(q)
        if int(low) < 0 or int(high) > 15:
            raise ValueError("pack_int4: the values of q must lie in [0, 15]")
    assert sys.byteorder == "little", "fourbit's packing helpers assume a little-endian host"
    n, k = q.shape
    # Byte t of the little-endian words holds columns 2t (low nibble) and 2t + 1 (high).
    pairs = q.to(torch.uint8).reshape(n, k // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous().view(torch.int32)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4.

    Args:
        qweight: int32 [N, K // 8] in the canonical packing.
    Returns:
        uint8 [N, K] with values in [0, 15].
    """
    _checks.tensor("qweight", qweight)
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise TypeError(f"unpack_int4 expects qweight as int32 [N, K/8], got {qweight.dtype} {tuple(qweight.shape)}")
    # Byte t of the little-endian words holds columns 2t (low nibble) and 2t + 1 (high).
    assert sys.byteorder == "little", "fourbit's packing helpers assume a little-endian host"
    b = qweight.contiguous().view(torch.uint8)
    return torch.stack((b & 0xF, b >> 4), dim=-1).reshape(qweight.shape[0], -1)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_len: int,
               k: int, dtype: torch.dtype = torch.float32, perm: torch.Tensor | None = None) -> torch.Tensor:
    """w = q * s + m, computed in fp32, returned as dtype [N, k] (padding dropped), its
    columns in input-channel order (stored column j is channel perm[j]).

    group_len is the number of input channels per group (K_padded for one group per row).
    """
    n = qweight.shape[0]
    q = unpack_int4(qweight).view(n, -1, group_len).to(torch.float32)
    w = torch.addcmul(offsets.to(torch.float32).unsqueeze(-1), q, scales.to(torch.float32).unsqueeze(-1))
    w = w.view(n, -1)[:, :k]
    if perm is not None:
        w = torch.empty_like(w).index_copy_(1, perm.to(device=w.device, dtype=torch.int64), w)
    return w.to(dtype)


def check_perm(perm: torch.Tensor, k: int) -> torch.Tensor:
    """perm as int32 [k] after checking that it is a permutation of range(k) (one host read:
    done once, when a weight is made or loaded)."""
    _checks.tensor("perm", perm)
    if perm.dtype not in (torch.int32, torch.int64) or tuple(perm.shape) != (k,):
        raise ValueError(f"perm must be an int32 or int64 permutation of the K = {k} input channels, got "
                         f"{perm.dtype} {tuple(perm.shape)}")
    if not torch.equal(torch.sort(perm.to(torch.int64)).values, torch.arange(k, device=perm.device)):
        raise ValueError(f"perm must hold each of the K = {k} input channels exactly once")
    return perm.to(torch.int32)


class Int4Weight:
    """An int4-quantized weight matrix in the canonical packing (see the module docstring).

    Attributes:
        qweight: int32 [N, K_padded // 8], canonical nibble order.
        scales:  [N, num_groups], fp32, bf16 or fp16.
        offsets: [N, num_groups], fp32, bf16 or fp16 (m = -8 s when symmetric; fp32 where an
            import needs it to be exact).
        group_size: 32, 64, 128, 256 or -1 (one group per output row).
        symmetric: True when every offset is -8 * scale.
        shape: (N, K) of the original, unpadded matrix.
        perm: None, or int32 [K]: stored column k is input channel perm[k] (act-order).
    """

    __slots__ = ("qweight", "scales", "offsets", "group_size", "symmetric", "shape", "perm")

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                 group_size: int, shape: tuple[int, int], symmetric: bool = False,
                 perm: torch.Tensor | None = None):
        check_group_size(group_size)
        for name, t in (("qweight", qweight), ("scales", scales), ("offsets", offsets)):
            _checks.tensor(name, t)
        if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2:
            raise ValueError(f"shape must be (N, K), got {shape!r}")
        n, k = (_checks.positive_int(f"shape[{i}]", d) for i, d in enumerate(shape))
        _checks.boolean("symmetric", symmetric)
        k_pad = padded_k(k, group_size)
        groups = 1 if group_size == -1 else k_pad // group_size
        if qweight.dtype != torch.int32:
            raise TypeError(f"qweight must be int32, got {qweight.dtype}")
        if tuple(qweight.shape) != (n, k_pad // _NIBBLES):
            raise ValueError(f"qweight must be [N, K_padded/8] = {(n, k_pad // _NIBBLES)} for shape "
                             f"{(n, k)} and group_size {group_size}, got {tuple(qweight.shape)}")
        for name, t in (("scales", scales), ("offsets", offsets)):
            if t.dtype not in COMPUTE_DTYPES:
                raise TypeError(f"{name} must be one of {COMPUTE_DTYPES}, got {t.dtype}")
            if tuple(t.shape) != (n, groups):
                raise ValueError(f"{name} must be [N, num_groups] = {(n, groups)}, got {tuple(t.shape)}")
        if perm is not None:
            perm = check_perm(perm, k)
        devices = {t.device for t in (qweight, scales, offsets) + ((perm,) if perm is not None else ())}
        if len(devices) > 1:
            raise ValueError(f"qweight, scales, offsets and perm must be on one device, got "
                             f"{sorted(map(str, devices))}")
        self.qweight, self.scales, self.offsets, self.perm = qweight, scales, offsets, perm
        self.group_size, self.symmetric, self.shape = group_size, bool(symmetric), (n, k)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the scales are stored in (the offsets may be fp32 where that is exact)."""
        return self.scales.dtype

    @property
    def group_len(self) -> int:
        """Input channels per group as kernels see it (K_padded when group_size == -1)."""
        return group_len(self.shape[1], self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float matrix [N, K] this weight stands for (input channels in their own
        order), computed in fp32."""
        return dequantize(self.qweight, self.scales, self.offsets, self.group_len, self.shape[1], dtype, self.perm)

    def to(self, device) -> Int4Weight:
        return Int4Weight(self.qweight.to(device), self.scales.to(device), self.offsets.to(device),
                          self.group_size, self.shape, self.symmetric,
                          None if self.perm is None else self.perm.to(device))

    def __repr__(self) -> str:
        n, k = self.shape
        offsets = "" if self.offsets.dtype == self.scales.dtype else f", offsets={self.offsets.dtype}"
        act_order = "" if self.perm is None else ", act_order=True"
        return (f"Int4Weight(shape=({n}, {k}), group_size={self.group_size}, symmetric={self.symmetric}, "
                f"dtype={self.dtype}{offsets}{act_order}, device={self.device})")


def _same_perm(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def concat_rows(weights: list[Int4Weight]) -> Int4Weight:
    """Stack int4 weights along N (fused projections such as qkv): exact, since every row
    carries its own words, scales and offsets. All must share K, group size, dtypes, device
    and perm (can_concat_rows says whether they do)."""
    first = weights[0]
    for w in weights[1:]:
        if not can_concat_rows(first, w):
            raise ValueError(f"cannot concatenate {w} with {first}: K, group size, dtypes, device and act-order "
                             f"permutation must match")
    cat = lambda name: torch.cat([getattr(w, name) for w in weights])
    return Int4Weight(cat("qweight"), cat("scales"), cat("offsets"), first.group_size,
                      (sum(w.shape[0] for w in weights), first.shape[1]), all(w.symmetric for w in weights),
                      first.perm)


def can_concat_rows(a: Int4Weight, b: Int4Weight) -> bool:
    """Whether two int4 weights stack along N into one without changing either."""
    key = lambda v: (v.shape[1], v.group_size, v.scales.dtype, v.offsets.dtype, v.device)  # noqa: E731
    return key(a) == key(b) and _same_perm(a.perm, b.perm)


def with_common_dtypes(weights: list[Int4Weight]) -> list[Int4Weight]:
    """The weights with their scales (and, separately, offsets) in one dtype: where they
    differ, float32, which holds every fp16 and bf16 value exactly."""
    def common(name):
        dtypes = {getattr(w, name).dtype for w in weights}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32
    s_dtype, m_dtype = common("scales"), common("offsets")
    return [Int4Weight(w.qweight, w.scales.to(s_dtype), w.offsets.to(m_dtype), w.group_size, w.shape, w.symmetric,
                       w.perm) for w in weights]


def select_rows(weight: Int4Weight, index: torch.Tensor) -> Int4Weight:
    """The rows weight[index] (a permutation or subset of output features), exactly."""
    index = index.to(weight.device)
    return Int4Weight(weight.qweight[index], weight.scales[index], weight.offsets[index], weight.group_size,
                      (len(index), weight.shape[1]), weight.symmetric, weight.perm)


# ---- The CUDA kernel's prepacked layout (csrc/include/fourbit/int4_mma.cuh) ----
#
# The kernel multiplies with mma.sync.m16n8k16, the weights as the A operand (16 output
# features x 16 input channels per instruction) and the activations as B. Lane l of a warp
# (g = l // 4, t = l % 4) holds the A elements a0..a7 of a 16 x 16 tile at
#     rows  g (a0 a1 a4 a5) and g + 8 (a2 a3 a6 a7),
#     cols  2t, 2t + 1 (a0-a3) and 2t + 8, 2t + 9 (a4-a7),
# as four half2 registers (a0 a1), (a2 a3), (a4 a5), (a6 a7). Prepacking puts those eight
# q of one tile in one int32 word so that one lop3 per register pair makes them halves:
# nibble p of the word holds a_i with p = h + 2 kh + 4 e, where h picks the row (g or g + 8),
# kh the column half (2t or 2t + 8) and e the column parity. Four consecutive 16-column
# tiles (64 columns) make a lane's 16 bytes, so a warp reads 512 contiguous bytes per 16 x 64
# block: int32 [N_pad / 16, K_pad / 64, 32 lanes, 4 tiles], N and K zero-padded to 64.

MMA_TILE_N, MMA_TILE_K = 64, 64  # the kernel's block of output features, and its K chunk


def _mma_view(q: torch.Tensor) -> torch.Tensor:
    """q [N_pad, K_pad] -> [N_pad/16, K_pad/64, g, t, tile, e, kh, h]: one lane's word per
    (n16, k64, g, t, tile), its nibbles in the last three axes (position h + 2 kh + 4 e)."""
    n, k = q.shape
    q = q.view(n // 16, 2, 8, k // 64, 4, 2, 4, 2)     # [n16, h, g, k64, tile, kh, t, e]
    return q.permute(0, 3, 2, 6, 4, 7, 5, 1)            # [n16, k64, g, t, tile, e, kh, h]


def prepack_mma(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """The canonical qweight int32 [N, K_padded / 8] of a K-column weight as the CUDA kernel
    reads it: int32 [N_pad / 16, K_pad / 64 * 128], N and K padded (with q = 0) to multiples of 64."""
    n = qweight.shape[0]
    n_pad, k_pad = -(-n // MMA_TILE_N) * MMA_TILE_N, -(-k // MMA_TILE_K) * MMA_TILE_K
    q = torch.zeros(n_pad, k_pad, dtype=torch.int64, device=qweight.device)
    q[:n, :k] = unpack_int4(qweight)[:, :k].to(torch.int64)
    nibbles = _mma_view(q).reshape(n_pad // 16, k_pad // 64, 32, 4, 8)
    words = (nibbles << (4 * torch.arange(8, device=q.device))).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).view(n_pad // 16, -1)


def unpack_mma(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of prepack_mma: q uint8 [n, k] (the padding dropped)."""
    n16, words = packed.shape
    k_pad = words // 128 * 64
    shifts = 4 * torch.arange(8, device=packed.device)
    nibbles = (packed.to(torch.int64).view(n16, k_pad // 64, 32, 4, 1) >> shifts) & 0xF
    q = torch.empty(n16 * 16, k_pad, dtype=torch.uint8, device=packed.device)
    _mma_view(q).copy_(nibbles.view(n16, k_pad // 64, 8, 4, 4, 2, 2, 2))
    return q[:n, :k]


def prepack_mma_weight(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                       k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A canonical weight of K = k columns in the CUDA kernel's layout: (packed int32
    [N_pad / 16, K_pad / 64 * 128], scales and offsets transposed to [groups, N], dtypes kept)."""
    return prepack_mma(qweight, k), scales.t().contiguous(), offsets.t().contiguous()


def unpack_mma_weight(packed: torch.Tensor, scales_t: torch.Tensor, offsets_t: torch.Tensor, n: int, k: int,
                      k_padded: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of prepack_mma_weight, exactly: canonical (qweight int32 [n, k_padded / 8],
    scales, offsets [n, groups]); the K padding holds q = 0, as the format requires."""
    q = torch.zeros(n, k_padded, dtype=torch.uint8, device=packed.device)
    q[:, :k] = unpack_mma(packed, n, k)
    return pack_int4(q), scales_t.t().contiguous(), offsets_t.t().contiguous()


# ---- The int8 weight-only format (GGUF Q8_0, int8 embeddings and heads) ----
#
#     w[n, k] = q[n, k] * s[n, k // group_len]
#
# q int8 [N, K] (row-major, no packing), s [N, K / group_len] in fp32, bf16 or fp16. group_size
# -1 is one scale per output row (group_len = K, any K); otherwise a multiple of 32 dividing K
# (GGUF Q8_0: 32, with fp16 scales, so that q * s is exact in fp32 and the import is lossless).

def int8_group_len(k: int, group_size: int) -> int:
    """Input channels per int8 scale: K for group_size -1, else group_size, which must be a
    positive multiple of 32 dividing K (ValueError otherwise)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"int8 group_size must be an int (-1 or a multiple of 32), got {group_size!r}")
    if k < 1:
        raise ValueError(f"an int8 weight needs K >= 1 input channels, got {k}")
    if group_size == -1:
        return k
    if group_size <= 0 or group_size % 32 or k % group_size:
        raise ValueError(f"int8 group_size must be -1 (one scale per row) or a multiple of 32 dividing "
                         f"K = {k}, got {group_size}")
    return group_size


class Int8Weight:
    """An int8 weight-only matrix: w = q * s per group (see the section comment above).

    Attributes:
        qweight: int8 [N, K].
        scales: [N, K / group_len], fp32, bf16 or fp16.
        group_size: -1 (one scale per row) or a multiple of 32 dividing K.
        shape: (N, K).
    """

    __slots__ = ("qweight", "scales", "group_size", "shape")

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, group_size: int):
        _checks.tensor("qweight", qweight)
        _checks.tensor("scales", scales)
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise TypeError(f"qweight must be int8 [N, K], got {qweight.dtype} {tuple(qweight.shape)}")
        n, k = qweight.shape
        glen = int8_group_len(k, group_size)
        if scales.dtype not in COMPUTE_DTYPES:
            raise TypeError(f"scales must be one of {COMPUTE_DTYPES}, got {scales.dtype}")
        if tuple(scales.shape) != (n, k // glen):
            raise ValueError(f"scales must be [N, K / group_len] = {(n, k // glen)}, got {tuple(scales.shape)}")
        if qweight.device != scales.device:
            raise ValueError(f"qweight and scales must be on one device, got {qweight.device} and {scales.device}")
        self.qweight, self.scales, self.group_size, self.shape = qweight, scales, group_size, (n, k)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the scales are stored in."""
        return self.scales.dtype

    @property
    def group_len(self) -> int:
        return int8_group_len(self.shape[1], self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] in dtype: q * s computed in fp32 (exact for 16-bit scales), then cast."""
        return dequantize_int8(self.qweight, self.scales, self.group_len).to(dtype)

    def to(self, device) -> Int8Weight:
        return Int8Weight(self.qweight.to(device), self.scales.to(device), self.group_size)

    def __repr__(self) -> str:
        return f"Int8Weight(shape={self.shape}, group_size={self.group_size}, scales={self.scales.dtype})"


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, group_len: int) -> torch.Tensor:
    """fp32 [N, K] = q * s, scale s[n, g] over columns g * group_len .. (g + 1) * group_len - 1
    (any leading dimensions of rows: an embedding's gathered rows too)."""
    *rows, k = qweight.shape
    groups = scales.shape[-1]
    w = qweight.float().reshape(*rows, groups, group_len) * scales.float().unsqueeze(-1)
    return w.reshape(*rows, k)
