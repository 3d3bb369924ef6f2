"""The int4 GEMV kernel (kernels/int4_matmul.py, int4_gemv_kernel) on its own: launched
directly through Triton's interpreter with its plain nibble conversion (FAST_DEQUANT=False,
the branch the interpreter runs) against an fp64 product computed here from the unpacked q;
and compiled offline with the PTX conversion (FAST_DEQUANT=True) for sm_80 and sm_89, where
its K loop must hold no reduction and no layout conversion (issue 12)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fourbit
from fourbit.backends import devices, triton_import_error
from fourbit.format import padded_k
from helpers import DTYPES, assert_matmul_accuracy

pytestmark = pytest.mark.skipif(triton_import_error() is not None, reason="triton is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = [32, 64, 128, 256, -1]
# (N, K): N never a multiple of BLOCK_N (64 here), K never a multiple of BLOCK_K (256);
# K = 576 takes EVEN_K (whole 16-byte vectors), K = 520 and 1000 the masked loads.
SHAPES = {"N72-K576": (72, 576), "N72-K520": (72, 520), "N40-K1000": (40, 1000)}
TILE = {"BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 2}


def int4_problem(n, k, group_size, symmetric, dtype):
    """q, scales, offsets as the canonical Int4Weight, and the fp64 dense weight and the
    fp64 magnitudes |q s| + |m| (for the error bound), from q by plain arithmetic."""
    k_pad = padded_k(k, group_size)
    glen = k_pad if group_size == -1 else group_size
    q = torch.randint(0, 16, (n, k_pad))
    q[:, k:] = 0
    scales = (torch.rand(n, k_pad // glen) * 0.02 + 0.005).to(dtype)
    offsets = -8 * scales if symmetric else (-torch.rand(n, k_pad // glen) * 0.15).to(dtype)
    s = scales.double().repeat_interleave(glen, dim=1)[:, :k]
    m = offsets.double().repeat_interleave(glen, dim=1)[:, :k]
    qd = q[:, :k].double()
    return fourbit.pack_int4(q), scales, offsets, glen, qd * s + m, (qd * s).abs() + m.abs()


def launch_gemv(x, qweight, scales, offsets, glen, even_k, fast_dequant=False, **tile):
    """int4_gemv_kernel's fp32 output [M, N], launched as the launcher does."""
    import triton
    from fourbit.kernels import int4_matmul as mm

    tile = {**TILE, **tile}
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.zeros(m, n)
    grid = (triton.cdiv(n, tile["BLOCK_N"]), tile["SPLIT_K"], m)
    mm.int4_gemv_kernel[grid](x, qweight, scales, offsets, out, m, n, k, x.stride(0), qweight.stride(0),
                              scales.stride(0), out.stride(0), GROUP_LEN=glen, EVEN_K=even_k,
                              FAST_DEQUANT=fast_dequant, **tile)
    return out


def assert_fp32_exact_math(out, x, dense, magnitude):
    """The kernel's fp32 result against the fp64 product, within the worst-case error of its
    fp32 sums: each term x (q s + m) is summed as s (sum x q) + m (sum x) and passes through at
    most 64 roundings with the test tile and K <= 1024 (a 32-term FMA chain per vector, two
    FMAs and one add per K tile into the accumulator, the reduction over 8 vectors, the
    split-K adds), each of relative size eps, on terms of size |x| (|q s| + |m|)."""
    assert x.shape[1] <= 1024 and TILE["BLOCK_K"] == 256
    ref = x.double() @ dense.T
    bound = 64 * torch.finfo(torch.float32).eps * (x.double().abs() @ magnitude.T)
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g} (bound {bound.flatten()[err.argmax()]:.3g})"
    # Not vacuous: below what one wrong nibble would cost (s |x|, s >= 0.005) at |x| >= 0.5.
    assert bound.max() < 0.005 * 0.5


def need_interpreter():
    if not fourbit.backends.interpreted():
        pytest.skip("direct launches on CPU tensors need Triton's interpreter")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("symmetric", [False, True], ids=["offset", "symmetric"])
@pytest.mark.parametrize("group_size", GROUPS)
def test_gemv_plain_dequant_matches_reference(group_size, symmetric, dtype):
    """FAST_DEQUANT=False, on every group size and mode, EVEN_K and not, M = 4 (one
    program row per row of x): the fp32 output is exact fp32 arithmetic on q s + m."""
    need_interpreter()
    for n, k in [SHAPES["N72-K576"], SHAPES["N72-K520"]]:
        qweight, scales, offsets, glen, dense, magnitude = int4_problem(n, k, group_size, symmetric, dtype)
        x = torch.randn(4, k).to(dtype)
        out = launch_gemv(x, qweight, scales, offsets, glen, even_k=k % 32 == 0)
        assert_fp32_exact_math(out, x, dense, magnitude)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_gemv_rows_and_shapes_through_the_launcher(shape, m):
    """The launcher's gemv path (its EVEN_K choice, the interpreter's config) for M = 1..4,
    against the fp64 product, in bf16 with a group length that is not the tile's."""
    from fourbit.backends import triton_int4

    need_interpreter()
    n, k = shape
    qweight, scales, offsets, glen, dense, _ = int4_problem(n, k, 64, False, torch.bfloat16)
    x = torch.randn(m, k).to(torch.bfloat16)
    out = triton_int4.int4_mm(x, qweight, scales, offsets, glen, None, path="gemv")
    assert_matmul_accuracy(out, x, dense)


def test_gemv_even_k_is_only_a_fast_path():
    """EVEN_K=True and False give the same fp32 sums where both apply (K % 32 == 0), split-K
    or not: the masked loads change which bytes are read, never a result."""
    need_interpreter()
    qweight, scales, offsets, glen, dense, magnitude = int4_problem(72, 576, 128, False, torch.float16)
    x = torch.randn(2, 576).half()
    for split_k in (1, 2):
        even = launch_gemv(x, qweight, scales, offsets, glen, even_k=True, SPLIT_K=split_k)
        odd = launch_gemv(x, qweight, scales, offsets, glen, even_k=False, SPLIT_K=split_k)
        assert_fp32_exact_math(even, x, dense, magnitude)
        if split_k == 1:  # atomics add in any order; one program per output sums in one order
            assert torch.equal(even, odd)


def test_gemv_nibble_conversions_agree():
    """The magic-number conversion of _nibble (FAST_DEQUANT=True), modelled here bit for bit in
    integer arithmetic, gives every q of every nibble position exactly: the trick's claim."""
    words = torch.randint(-2**31, 2**31 - 1, (4096,), dtype=torch.int64).to(torch.int32)
    high = words >> 20
    for i in range(8):
        src, b = (words, 4 * i) if i < 5 else (high, 4 * i - 20)
        bits = (src & (15 << b)) | ((150 - b) << 23)                          # lop3 0xEA
        value = bits.view(torch.float32) - float(1 << (23 - b))
        q = (words.to(torch.int64) >> (4 * i)) & 0xF
        assert torch.equal(value, q.to(torch.float32)), i


@pytest.mark.parametrize("gpu", devices.RECORDED.values(), ids=devices.RECORDED.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_every_gpu_keeps_several_gemv_configs(dtype, gpu):
    """Every recorded GPU times several GEMV configs for real layer shapes, all of which fit
    its shared memory by the estimate kernel-check proves an upper bound."""
    from fourbit.kernels import int4_matmul as mm

    size = torch.empty((), dtype=dtype).element_size()
    for n, k in [(4096, 4096), (11008, 4096), (4096, 11008), (128256, 4096), (1000, 576)]:
        kept = mm.select_gemv(mm.gemv_configs(), n, k, size, gpu)
        assert len(kept) >= 2, (n, k)
        assert all(mm.gemv_shared_bytes(c, size) <= gpu.max_shared_mem for c in kept)


def test_gemv_tiles_keep_the_loop_layout():
    """The tile shapes the kernel's layout argument needs (int4_gemv_kernel, GEMV_TILES):
    at least one 16-byte vector per thread of 4 warps, and an fp16 x chunk along the tile
    with fewer elements than threads."""
    from fourbit.kernels import int4_matmul as mm

    for c in mm.gemv_configs() + [mm.GEMV_INTERPRETER_CONFIG]:
        bn, bk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        assert bk % 32 == 0 and bn * bk // 32 >= 4 * 32 and bk // 32 * 8 < 4 * 32, c
        assert c.num_warps == 4


_COMPILE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import gemv_figures as gf
from fourbit.kernels import int4_matmul as mm
rows = []
for arch in (80, 89):
    for dtype in ("fp16", "fp32"):
        for group_len in (32, 4096):
            c = gf.compile_gemv(mm.int4_gemv_kernel, arch, dtype, group_len, 64, 256, 4,
                                extra={"EVEN_K": True, "FAST_DEQUANT": True})
            rows.append({"arch": arch, "dtype": dtype, "group": group_len,
                         "cross": gf.cross_thread_ops(c.asm["ttgir"]),
                         "body": len(gf.ttgir_loop_body(c.asm["ttgir"])),
                         "lop3": c.asm["ptx"].count("lop3.b32"),
                         "cvt_rn_f32_s32": c.asm["ptx"].count("cvt.rn.f32.s32")})
print(json.dumps(rows))
"""


@pytest.mark.slow
def test_fast_dequant_loop_is_lean_when_compiled():
    """Compiled offline (no GPU) for sm_80 and sm_89, the FAST_DEQUANT=True kernel's K loop
    holds no tt.reduce, no convert_layout and no shared memory in TTGIR, and its PTX converts
    nibbles with lop3 (no integer-to-float conversion). Compiles in a subprocess: this
    session runs Triton's interpreter, which cannot compile for a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE, os.path.join(ROOT, "bench")], capture_output=True,
                          text=True, env=env, timeout=900)
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        if any(s in proc.stderr for s in ("ptxas", "No such file", "CUDA", "backend")):
            pytest.skip(f"cannot compile for a GPU target here: {tail[0][:200]}")
        pytest.fail(proc.stderr[-3000:])
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 8
    for row in rows:
        assert row["body"] > 50, row  # the loop body was found
        assert row["cross"] == {}, row
        assert row["lop3"] >= 32 and row["cvt_rn_f32_s32"] == 0, row
