"""The CUDA int4 kernel (csrc/include/fourbit/int4_mma.cuh) and its prepacked layout.

On the CPU: the prepack round trip is exact, and a lane-by-lane model of the kernel (its
fragment loads, the lop3 magic-number conversion, the mma.sync m16n8k16 fragment layouts of
the PTX ISA, its output mapping) computes the right product from the prepacked words. On a
GPU (marked cuda): the kernel itself against the reference."""

import math
import re
from pathlib import Path

import pytest
import torch

import fourbit
from fourbit import ops
from fourbit.format import GROUP_SIZES, prepack_mma, unpack_int4, unpack_mma
from helpers import assert_matmul_accuracy, random_int4_weight

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
KERNEL_SOURCE = Path(__file__).parents[1] / "csrc/include/fourbit/int4_mma.cuh"


def kernel_magic() -> dict:
    """The magic words and the values the kernel subtracts, read from the kernel's own source
    (csrc/include/fourbit/int4_mma.cuh: kMagic and magic_value() of each dtype's traits), so
    the tests below check the constants the kernel really uses."""
    source = KERNEL_SOURCE.read_text()
    found = re.findall(r"kMagic = (0x[0-9a-fA-F]+)u;.*?\n.*?magic_value\(\) \{ return (__float2half2_rn|"
                       r"__float2bfloat162_rn)\(([0-9.]+)f\)", source)
    by_dtype = {"__float2half2_rn": torch.float16, "__float2bfloat162_rn": torch.bfloat16}
    magic = {by_dtype[fn]: (int(word, 16), float(value)) for word, fn, value in found}
    assert set(magic) == {torch.float16, torch.bfloat16}, f"magic constants not found in {KERNEL_SOURCE}"
    return magic


MAGIC = kernel_magic()


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
    """(magic | q) read as two halves is value + q exactly, for every nibble value, with the
    kernel's own constants (kernel_magic reads them from its source): a wrong magic word or
    subtracted value in the kernel fails here."""
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
                scale = lambda r, table, group=group: torch.where(r < n, table[group, r.clamp(max=n - 1)].float(), 0.0)
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
def test_cuda_prepack_round_trip():
    need_cuda_kernel()
    weight, _ = random_int4_weight(300, 1000, 64, False, torch.bfloat16, "cuda")
    packed = prepack_mma(weight.qweight, 1000)
    assert torch.equal(unpack_mma(packed, 300, 1000).cpu(), unpack_int4(weight.qweight.cpu())[:, :1000])


# ---- prepack at load: Int4Linear holds one layout ----

def layer_bytes(layer) -> int:
    return sum(b.numel() * b.element_size() for b in layer.buffers())


@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_int4linear_mma_layout_round_trips_exactly(group_size):
    """Converted to the CUDA kernel's layout (what a forced "cuda" layer on a GPU holds), an
    Int4Linear keeps one layout only (buffer sizes of the mma layout, no canonical copy), and
    state_dict / weight give back the canonical tensors bit for bit. Runs on the CPU by
    calling the conversion directly."""
    linear = torch.nn.Linear(1000, 200, dtype=torch.float16)
    layer = fourbit.Int4Linear.from_linear(linear, group_size=group_size)
    canonical = {k: v.clone() for k, v in layer.state_dict().items()}
    layer._set_layout("mma")
    n_pad, k_pad = 256, 1024
    groups = canonical["scales"].shape[1]
    assert layer.layout == "mma"
    assert layer.qweight.shape == (n_pad // 16, k_pad // 64 * 128) and layer.scales.shape == (groups, 200)
    assert layer_bytes(layer) == n_pad * k_pad // 2 + 2 * groups * 200 * 2  # words, scales, offsets
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, canonical[name]), name
    assert torch.equal(layer.weight.qweight, canonical["qweight"])
    # Loading a canonical state dict into an mma-layout layer converts it; the layer stays in its layout.
    other = fourbit.Int4Linear(1000, 200, group_size=group_size, dtype=torch.float16)
    other._set_layout("mma")
    other.load_state_dict(canonical)
    for name, tensor in other.state_dict().items():
        assert torch.equal(tensor, canonical[name]), name
    layer._set_layout("canonical")
    assert all(torch.equal(t, canonical[k]) for k, t in layer.state_dict().items())


def test_int4linear_layout_follows_backend_and_device():
    """The CUDA layout is taken only by a "cuda" layer on a CUDA device; on the CPU (or with
    any other backend) the layer keeps the canonical layout, so nothing converts by mistake."""
    layer = fourbit.Int4Linear.from_linear(torch.nn.Linear(256, 64), group_size=64)
    layer.backend = "cuda"
    assert layer.layout == "canonical" and layer._wanted_layout() == "canonical"
    layer.backend = "auto"
    assert layer.layout == "canonical"


@pytest.mark.cuda
def test_forced_cuda_layer_holds_one_layout_on_the_gpu():
    """The GPU weight memory of a forced "cuda" Int4Linear equals one layout: the mma words
    and transposed scales/offsets, no canonical copy; moving it back to the CPU restores the
    canonical layout exactly, and its output matches the reference."""
    need_cuda_kernel()
    linear = torch.nn.Linear(1000, 200, dtype=torch.float16)
    layer = fourbit.Int4Linear.from_linear(linear, group_size=128)
    canonical = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.backend = "cuda"
    layer.cuda()
    assert layer.layout == "mma" and all(b.is_cuda for b in layer.buffers())
    groups = canonical["scales"].shape[1]
    assert layer_bytes(layer) == 256 * 1024 // 2 + 2 * groups * 200 * 2
    x = torch.randn(5, 1000, device="cuda").half()
    ref = fourbit.int4_linear(x, fourbit.Int4Weight(*(canonical[n].cuda() for n in ("qweight", "scales", "offsets")),
                                                    128, (200, 1000)), layer.bias, backend="torch")
    torch.testing.assert_close(layer(x), ref, rtol=2e-3, atol=2e-3)
    layer.cpu()
    assert layer.layout == "canonical"
    assert all(torch.equal(t, canonical[k]) for k, t in layer.state_dict().items())


@pytest.mark.cuda
def test_forced_cuda_on_weights_made_in_inference_mode():
    """The CLI quantizes and runs under torch.inference_mode(): a forced "cuda" layer made
    there must run (no cache keyed by tensor versions, which inference tensors lack)."""
    need_cuda_kernel()
    with torch.inference_mode():
        layer = fourbit.Int4Linear.from_linear(torch.nn.Linear(256, 64, dtype=torch.float16, device="cuda"),
                                               group_size=64, backend="cuda")
        x = torch.randn(3, 256, device="cuda").half()
        torch.testing.assert_close(layer(x), fourbit.int4_linear(x, layer.weight, backend="torch"),
                                   rtol=2e-3, atol=2e-3)


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
