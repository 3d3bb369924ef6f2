"""What the int4 checkpoint readers share: tensor checks that name the tensor as the file
names it, nibble unpacking of upstream words, and the exact conversion of integer codes,
integer zero points and scales into a fourbit Int4Weight.

Every upstream format here dequantizes as w[n, k] = (q[n, k] - z[n, g(k)]) * s[n, g(k)],
with q and z integers in [0, 15] and s a 16-bit (or fp32) float. In fp32 that product is
exact (a 4-bit integer times an 11-bit significand), and so is fourbit's q * s + m with
m = -z * s: both sides are the same real number, representable, so the fused multiply-add
rounds to it. s keeps its dtype; m is stored in s's dtype where that holds every m of the
tensor exactly (z = 8 always does, barring overflow), else in fp32.
"""

from __future__ import annotations

import math
import sys

import torch

from ...format import COMPUTE_DTYPES, Int4Weight, padded_k, unpack_int4

NIBBLES = 8  # 4-bit codes per int32 word
FOURBIT_GROUP_SIZES = (256, 128, 64, 32)  # largest first: the one a tool's group size splits into


class Tensors:
    """The tensors of one checkpoint, by the file's names (what a reader may ask for)."""

    def has(self, name: str) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def words_needed(count: int) -> int:
    return -(-count // NIBBLES)


def check(name: str, tensor: torch.Tensor, dtypes: tuple, shape: tuple[int, ...]) -> torch.Tensor:
    """tensor, after checking its dtype and shape; ValueError naming it otherwise."""
    if tensor.dtype not in dtypes:
        raise ValueError(f"checkpoint tensor {name!r} has dtype {tensor.dtype}; expected one of "
                         f"{tuple(str(d) for d in dtypes)}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}; expected {tuple(shape)}")
    return tensor


def check_scales(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    check(name, tensor, COMPUTE_DTYPES, shape)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"checkpoint tensor {name!r} holds scales that are not finite")
    return tensor


def nibbles(words: torch.Tensor, count: int) -> torch.Tensor:
    """The 4-bit codes of int32 words [R, W], low nibble first along the last axis: uint8
    [R, count] (count <= 8 W; codes past count dropped)."""
    return unpack_int4(words.contiguous())[:, :count]


def nibbles_by_row(words: torch.Tensor) -> torch.Tensor:
    """The codes of int32 words [W, C] packed along the first axis (nibble i of word [w, c]
    is row 8w + i): uint8 [8W, C]."""
    assert sys.byteorder == "little", "the int4 readers assume a little-endian host"
    w, c = words.shape
    b = words.contiguous().view(torch.uint8).view(w, c, 4).permute(0, 2, 1)  # byte t: nibbles 2t, 2t + 1
    q = torch.empty(w, NIBBLES, c, dtype=torch.uint8, device=words.device)
    torch.bitwise_and(b, 0xF, out=q[:, 0::2])
    torch.bitwise_right_shift(b, 4, out=q[:, 1::2])
    return q.view(w * NIBBLES, c)


def pack_by_row(q: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [K, N] (row k = input channel k, K a multiple of 8) as fourbit's canonical
    words int32 [N, K / 8] (nibble i of word j is column 8j + i), two codes per byte."""
    assert sys.byteorder == "little", "the int4 readers assume a little-endian host"
    return (q[0::2] | (q[1::2] << 4)).t().contiguous().view(torch.int32)


def fourbit_group_size(group_size: int, layer: str) -> int:
    """The fourbit group size that holds a tool's group size exactly: -1 stays -1; a tool
    group of g channels is g / f consecutive fourbit groups of the largest f in 256, 128, 64,
    32 that divides g, each with the tool group's scale and zero (so 512 -> 256, 96 -> 32)."""
    if group_size == -1:
        return -1
    for size in FOURBIT_GROUP_SIZES:
        if group_size > 0 and group_size % size == 0:
            return size
    raise ValueError(f"{layer}: group size {group_size} cannot be held by fourbit's group sizes "
                     f"(32, 64, 128, 256 or -1, or a multiple of 32 split into them)")


def groups_of(k: int, group_size: int, layer: str) -> int:
    """Upstream groups along K (the last one may be short), after checking that fourbit can
    hold the group size (before any tensor is read: the error names the layer)."""
    fourbit_group_size(group_size, layer)
    return 1 if group_size == -1 else math.ceil(k / group_size)


def act_order_perm(g_idx: torch.Tensor | None, k: int, group_size: int, groups: int, name: str) -> torch.Tensor | None:
    """The fourbit perm for an upstream g_idx (input channel k uses group g_idx[k]): None when
    the groups are already contiguous (g_idx == k // group_size), else a stable argsort of
    g_idx, which makes them contiguous. Raises ValueError naming the tensor when g_idx is out
    of range or does not give each group group_size channels (the last one the rest)."""
    if g_idx is None:
        return None
    check(name, g_idx, (torch.int32, torch.int64), (k,))
    g_idx = g_idx.to(torch.int64)
    if k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(f"checkpoint tensor {name!r} holds group indices outside [0, {groups})")
    contiguous = torch.zeros(k, dtype=torch.int64) if group_size == -1 else torch.arange(k) // group_size
    if torch.equal(g_idx, contiguous):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], contiguous):
        raise ValueError(f"checkpoint tensor {name!r} does not give every group {group_size} input channels "
                         f"(the last group the rest): not an act-order permutation of contiguous groups")
    return perm.to(torch.int32)


def int4_weight(zeros: torch.Tensor, scales: torch.Tensor, group_size: int, shape: tuple[int, int],
                perm: torch.Tensor | None, layer: str, *, words: torch.Tensor | None = None,
                codes: torch.Tensor | None = None) -> Int4Weight:
    """The Int4Weight of w[n, k] = (q[n, k] - z[n, g]) * s[n, g], g the upstream group of k.

    Args:
        zeros: integer z [N, groups] in [0, 15]; scales: [N, groups] in fp16, bf16 or fp32.
        group_size: the upstream group size (-1: one group per row); groups = ceil(K / it).
        perm: from act_order_perm (None: contiguous groups).
        layer: the module's name, for errors.
        words: q as int32 [ceil(K/8), N] packed along K (nibble i of word [j, n] is
            q[n, 8j + i]; nibbles past K ignored); or
        codes: q as uint8 [K, N] (row k = input channel k).
    """
    n, k = shape
    fb_size = fourbit_group_size(group_size, layer)
    k_pad = padded_k(k, fb_size)
    if words is not None and perm is None and k % NIBBLES == 0:
        qweight = torch.nn.functional.pad(words.t(), (0, k_pad // NIBBLES - words.shape[0]))
    else:
        q = codes if codes is not None else nibbles_by_row(words)
        stored = torch.zeros(k_pad, n, dtype=torch.uint8, device=q.device)  # padding rows: q = 0
        if perm is not None:  # stored row j is input channel perm[j]
            torch.index_select(q, 0, perm.to(torch.int64), out=stored[:k])
        else:
            stored[:k] = q[:k]
        qweight = pack_by_row(stored)
    if fb_size != -1:  # each upstream group as group_size / fb_size fourbit groups
        repeat, fb_groups = group_size // fb_size, k_pad // fb_size
        zeros = zeros.repeat_interleave(repeat, dim=1)[:, :fb_groups]
        scales = scales.repeat_interleave(repeat, dim=1)[:, :fb_groups]
    offsets = -(zeros.to(torch.float32) * scales.to(torch.float32))
    narrow = offsets.to(scales.dtype)
    if torch.equal(narrow.to(torch.float32), offsets):
        offsets = narrow
    return Int4Weight(qweight.contiguous(), scales.contiguous(), offsets.contiguous(), fb_size, (n, k),
                      symmetric=bool((zeros == 8).all()), perm=perm)
