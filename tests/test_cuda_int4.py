"""The CUDA int4 kernel (csrc/include/fourbit/int4_mma.cuh) and its prepacked layout.

On the CPU: the prepack round trip is exact, and a lane-by-lane model of the kernel (its
fragment loads, the lop3 magic-number conversion, the mma.sync m16n8k16 fragment layouts of
the PTX ISA, its output mapping) computes the right product from the prepacked words. On a
GPU (marked cuda): the kernel itself against the reference."""

import math

import numpy as np
import pytest
import torch

import fourbit
from fourbit import ops
from fourbit.format import GROUP_SIZES, prepack_mma, unpack_int4, unpack_mma
from helpers import assert_matmul_accuracy, random_int4_weight

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MAGIC = {torch.float16: (0x64006400, 1024.0), torch.bfloat16: (0x43004300, 128.0)}


@pytest.mark.parametrize("shape", [(64, 64), (1000, 576), (37, 1000), (130, 136)], ids=str)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_prepack_round_trip_is_exact(group_size, shape):
    n, k = shape
    weight, _ = random_int4_weight(n, k, group_size, False, torch.float16)
    packed = prepack_mma(weight.qweight, k)
    assert packed.dtype == torch.int32 and packed.shape == (math.ceil(n / 64) * 4, math.ceil(k / 64) * 128)
    assert torch.equal(unpack_mma(packed, n, k), unpack_int4(weight.qweight)[:, :k])


@pytest.mark.parametrize("dtype", HALF_DTYPES.values(), ids=HALF_DTYPES.keys())
def test_magic_number_conversion_is_exact(dtype):
    """(magic | q) read as two halves is magic + q exactly, for every nibble value."""
    magic, value = MAGIC[dtype]
    bits = torch.tensor([(magic | q | (q << 16)) for q in range(16)], dtype=torch.int64)
    halves = to_halves(bits, dtype)
    assert torch.equal(halves, (value + torch.arange(16.0))[:, None].expand(16, 2))


def to_halves(bits: torch.Tensor, dtype) -> torch.Tensor:
    """uint32 values (int64 tensor) -> their (low, high) 16-bit halves as dtype, in fp32."""
    lo, hi = bits & 0xFFFF, (bits >> 16) & 0xFFFF
    as_dtype = lambda v: torch.where(v >= 2**15, v - 2**16, v).to(torch.int16).view(dtype).float()
    return torch.stack([as_dtype(lo), as_dtype(hi)], dim=-1)


def emulate_kernel(x, packed, scales_t, offsets_t, n, group_len):
    """What int4_mma_kernel computes, written lane by lane as the kernel does it (vectorized
    over the 32 lanes), with the operands placed by the PTX ISA's m16n8k16 fragment layouts:
        A (16 x 16): a_i at row g + 8 ((i >> 1) & 1), col 2t + (i & 1) + 8 (i >> 2)
        B (16 x 8):  b_i at row 2t + (i & 1) + 8 (i >> 1), col g
        C (16 x 8):  c_i at row g + 8 (i >> 1), col 2t + (i & 1)
    with g = lane / 4, t = lane % 4. fp32 products and sums; weights rounded to x's dtype
    once, as the kernel's fused multiply-add does."""
    dtype = x.dtype
    m, k = x.shape
    n16s, k_chunks = packed.shape[0], packed.shape[1] // 128
    groups = scales_t.shape[0]
    shift = -1 if groups == 1 else int(math.log2(group_len))
    m_tiles = 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8
    x_smem = torch.zeros(8 * m_tiles, k_chunks * 64)
    x_smem[:m, :k] = x.float()
    words = packed.to(torch.int64).view(n16s, k_chunks, 32, 4) & 0xFFFFFFFF
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    i8 = torch.arange(8)
    a_rows = g[:, None] + 8 * ((i8 >> 1) & 1)                # [32 lanes, 8]
    a_cols = 2 * t[:, None] + (i8 & 1) + 8 * (i8 >> 2)
    i4 = torch.arange(4)
    b_rows = 2 * t[:, None] + (i4 & 1) + 8 * (i4 >> 1)       # [32, 4]
    c_rows, c_cols = g[:, None] + 8 * (i4 >> 1), 2 * t[:, None] + (i4 & 1)   # PTX's C layout
    # ...and where the kernel's epilogue writes c_i: row 8 mt + 2t + (i & 1) of x, feature
    # row_lo = 16 n16 + g for i < 2, row_hi = row_lo + 8 for i >= 2.
    out_m = 2 * t[:, None] + (i4 & 1)
    out_feature = g[:, None] + torch.where(i4 < 2, 0, 8)
    magic, value = MAGIC[dtype]
    out = torch.zeros(8 * m_tiles, n16s * 16)
    for n16 in range(n16s):
        rows = n16 * 16 + g
        for chunk in range(k_chunks):
            for j in range(4):
                kk = chunk * 64 + 16 * j
                group = 0 if shift < 0 else min(kk >> shift, groups - 1)
                scale = lambda r, table: torch.where(r < n, table[group, r.clamp(max=n - 1)].float(), 0.0)
                s_lo, m_lo, s_hi, m_hi = scale(rows, scales_t), scale(rows, offsets_t), \
                    scale(rows + 8, scales_t), scale(rows + 8, offsets_t)
                word = words[n16, chunk, :, j]
                regs = []
                for r in range(4):  # lop3, subtract the magic value, fma with row g (r even) or g + 8
                    q = to_halves(((word >> (4 * r)) & 0x000F000F) | magic, dtype) - value
                    s, o = (s_lo, m_lo) if r % 2 == 0 else (s_hi, m_hi)
                    regs.append((q * s[:, None] + o[:, None]).to(dtype).float())
                a_vals = torch.stack(regs, dim=1).reshape(32, 8)   # a0 a1 | a2 a3 | a4 a5 | a6 a7
                tile_a = torch.zeros(16, 16)
                tile_a[a_rows, a_cols] = a_vals
                for mt in range(m_tiles):
                    xr = x_smem[8 * mt + g]                         # [32, K]: row 8 mt + g of x
                    b_vals = torch.stack([xr[lane, kk + 2 * t], xr[lane, kk + 2 * t + 1],
                                          xr[lane, kk + 2 * t + 8], xr[lane, kk + 2 * t + 9]], dim=1)
                    tile_b = torch.zeros(16, 8)
                    tile_b[b_rows, g[:, None].expand(32, 4)] = b_vals
                    c = (tile_a @ tile_b)[c_rows, c_cols]           # [32, 4] per lane
                    out.index_put_((8 * mt + out_m, n16 * 16 + out_feature), c, accumulate=True)
    return out[:m, :n].to(dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES.values(), ids=HALF_DTYPES.keys())
@pytest.mark.parametrize("case", [(1, 64, 64, 32, False), (3, 80, 192, 64, True), (9, 64, 136, -1, False),
                                  (17, 130, 256, 128, False), (33, 16, 128, 128, True)], ids=str)
def test_kernel_model_computes_the_product(case, dtype):
    """The layout, the conversion and the fragment mappings the kernel relies on, checked
    together on the CPU: the model above, fed the prepacked words, gives x @ W.T."""
    m, n, k, group_size, symmetric = case
    weight, dense = random_int4_weight(n, k, group_size, symmetric, dtype)
    x = torch.randn(m, k).to(dtype)
    packed = prepack_mma(weight.qweight, k)
    out = emulate_kernel(x, packed, weight.scales.t().contiguous(), weight.offsets.t().contiguous(), n,
                         weight.group_len)
    assert_matmul_accuracy(out, x, dense)


# ---- the kernel itself, on a GPU ----

def need_cuda_kernel():
    if "cuda" not in fourbit.available_backends("cuda"):
        pytest.skip("fourbit._C was built without the CUDA kernels")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES.values(), ids=HALF_DTYPES.keys())
@pytest.mark.parametrize("symmetric", [False, True], ids=["offset", "symmetric"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_cuda_group_sizes_and_modes(group_size, symmetric, dtype):
    need_cuda_kernel()
    weight, dense = random_int4_weight(200, 1000, group_size, symmetric, dtype, "cuda")
    for m in (1, 7, 16, 33, 64):
        x = torch.randn(m, 1000, device="cuda").to(dtype)
        bias = torch.randn(200, device="cuda").to(dtype)
        assert_matmul_accuracy(fourbit.int4_linear(x, weight, bias, backend="cuda"), x, dense, bias)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES.values(), ids=HALF_DTYPES.keys())
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 15, 16, 17, 31, 32, 40, 63, 64, 65, 130])
def test_cuda_every_m(m, dtype):
    need_cuda_kernel()
    weight, dense = random_int4_weight(256, 512, 128, False, dtype, "cuda")
    x = torch.randn(m, 512, device="cuda").to(dtype)
    assert_matmul_accuracy(fourbit.int4_linear(x, weight, backend="cuda"), x, dense)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(8, 32), (40, 72), (1000, 576), (4096, 4096), (4096, 14336), (28672, 4096)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_cuda_shapes_from_below_a_tile_to_beyond_l2(shape):
    need_cuda_kernel()
    n, k = shape
    group = 32 if k % 64 else 128
    weight, dense = random_int4_weight(n, k, group, False, torch.float16, "cuda")
    for m in (1, 16):
        x = torch.randn(m, k, device="cuda").half()
        assert_matmul_accuracy(fourbit.int4_linear(x, weight, backend="cuda"), x, dense)


@pytest.mark.cuda
def test_cuda_prepack_round_trip_and_cache():
    need_cuda_kernel()
    from fourbit import cuda_backend
    weight, _ = random_int4_weight(300, 1000, 64, False, torch.bfloat16, "cuda")
    packed = prepack_mma(weight.qweight, 1000)
    assert torch.equal(unpack_mma(packed, 300, 1000).cpu(), unpack_int4(weight.qweight.cpu())[:, :1000])
    first = cuda_backend.prepacked(weight.qweight, weight.scales, weight.offsets, weight.group_len, 1000, torch.bfloat16)
    again = cuda_backend.prepacked(weight.qweight, weight.scales, weight.offsets, weight.group_len, 1000, torch.bfloat16)
    assert first[0] is again[0]  # made once per weight and dtype


@pytest.mark.cuda
def test_cuda_rejects_fp32_and_checks_inputs():
    need_cuda_kernel()
    weight, _ = random_int4_weight(64, 128, 32, False, torch.float16, "cuda")
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        fourbit.int4_linear(torch.randn(2, 128, device="cuda"), weight, backend="cuda")
    x = torch.randn(2, 128, device="cuda").half()
    packed = prepack_mma(weight.qweight, 128)
    with pytest.raises(RuntimeError, match="rows"):
        ops._C.int4_mm_cuda(x, packed, weight.scales.t().contiguous(), weight.offsets.t().contiguous(), 200, 32, None)
    with pytest.raises(RuntimeError, match="K = 64"):
        ops._C.int4_mm_cuda(x[:, :64], packed[:, :0], weight.scales.t().contiguous(), weight.offsets.t().contiguous(),
                            64, 32, None)
