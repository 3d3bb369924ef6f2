"""Triton kernels for int4 weight-only matmul (W4A16) on the canonical fourbit layout.

Layout (python/fourbit/format.py): qweight int32 [N, K_padded/8], nibble i of word j is
column 8j+i; scales/offsets [N, K_padded/GROUP_LEN]; w = q * s + m.

Three kernels, picked by M in python/fourbit/dispatch.py (GEMV_MAX_M, DENSE_MIN_M):
- int4_gemv_kernel: decode (M of 1 to a few). Each program streams a [BLOCK_N, BLOCK_K]
  tile of packed words once with contiguous loads along K and reduces with FMAs on CUDA
  cores; K is split over SPLIT_K programs so a 4096x4096 layer fills every SM, and the
  partial sums meet in an fp32 workspace through atomic adds (no second pass over weights).
- int4_gemm_kernel: larger M. A tiled GEMM on tensor cores (tl.dot); each [BLOCK_K, BLOCK_N]
  weight tile is dequantized in registers inside the K loop, never the whole matrix.
- int4_dequantize_kernel: very large M (prefill of long prompts), where the product is
  compute-bound and cuBLAS's fp16/bf16 GEMM is the fastest engine: the weight is expanded
  once per call into a dense [N, K] buffer and handed to torch.matmul.
"""

import triton
import triton.language as tl

# The kernels are plain @triton.jit functions; the launcher (python/fourbit/backends/
# triton_int4.py) wraps them in triton.autotune over these config lists, or a subset of
# them, by its own tuning policy. Nothing here reads the environment.


# Config choice is a pure function of (configs, shape, dtype, device properties): the
# autotune pruners below call it with the GPU a launch runs on, `make kernel-check` and the
# tests with the recorded properties of every supported GPU (python/fourbit/backends/
# devices.py). `props` is anything with .sms (SM count) and .max_shared_mem (opt-in bytes
# per block); this module imports nothing from the package.

# Triton's interpreter (CPU) runs each program in Python: one small tile, no tuning.
GEMV_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2})
GEMM_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2, "GROUP_M": 4})


def gemv_configs():
    # Tiles of 2K to 8K weights (16 to 64 registers of q per thread at 4 warps).
    tiles = [(16, 256), (16, 512), (32, 128), (32, 256), (64, 128)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=4, num_stages=2)
            for bn, bk in tiles for sk in (1, 2, 4, 8)]


def gemv_shared_bytes(config, x_bytes: int) -> int:
    """An upper bound on the shared memory of a GEMV config (proved against the compiled
    kernels by `make kernel-check`): per stage the x tile and the [BLOCK_N, BLOCK_K/8] packed
    words, plus scales and offsets per word, plus the reduction scratch."""
    bn, bk = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    per_stage = bk * x_bytes + bn * (bk // 8) * (4 + 2 * x_bytes)
    return config.num_stages * per_stage + 4 * bn * 32


def select_gemv(configs, n: int, k: int, x_bytes: int, props):
    """The GEMV configs worth timing for an [N, K] weight on a GPU `props`: every split
    gets at least one K tile, the grid fills the GPU (one program per SM, or the deepest
    split), and the tile fits in shared memory. Never a config that does not fit; raises
    when none does (kernel-check proves every supported GPU keeps several)."""
    fits = [c for c in configs if gemv_shared_bytes(c, x_bytes) <= props.max_shared_mem]
    if not fits:
        raise RuntimeError(f"no int4 GEMV config fits {props.max_shared_mem} bytes of shared memory")
    kept = [c for c in fits
            if c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_K"] <= max(k, c.kwargs["BLOCK_K"])
            and (triton.cdiv(n, c.kwargs["BLOCK_N"]) * c.kwargs["SPLIT_K"] >= props.sms or c.kwargs["SPLIT_K"] == 8)]
    return kept or fits[:1]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for fp16/bf16 activations (tensor cores).
# Small tiles and 2-stage pipelines keep several candidates on the 99 KB parts (RTX 3090/
# 4090/5090); BLOCK_K = 32 tiles (one group per tile at every group size, so no per-weight
# scale tiles) fit every GPU; the deep and wide ones are for the A100 (163 KB) and H100
# (227 KB). Tiles that spill registers on any target are left out or take 8 warps
# (make kernel-check fails on a spill).
GEMM_SHAPES = [
    (16, 64, 32, 4, 3), (16, 64, 64, 4, 3), (16, 64, 64, 4, 4), (16, 64, 128, 4, 2), (16, 128, 64, 4, 2),
    (16, 128, 128, 4, 3),
    (32, 64, 32, 4, 3), (32, 64, 64, 4, 3), (32, 64, 128, 4, 4), (32, 128, 64, 8, 2), (32, 128, 128, 8, 3),
    (64, 64, 32, 4, 3), (64, 64, 64, 4, 3), (64, 64, 128, 4, 3), (64, 128, 32, 4, 4), (64, 128, 64, 8, 2),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 3), (128, 128, 32, 8, 3), (128, 128, 64, 8, 2), (128, 128, 64, 8, 3),
]
# fp32 activations take exact fp32 products on CUDA cores (tl.dot with input_precision
# "ieee"), whose operand layouts hold far more per thread: only these narrow-K tiles stay
# in registers. The pruner gives fp32 these and 16-bit dtypes GEMM_SHAPES.
GEMM_FP32_SHAPES = [(16, 32, 32, 4, 2), (16, 64, 32, 4, 2), (32, 32, 32, 4, 2), (64, 32, 32, 4, 2),
                    (64, 64, 32, 8, 2)]


def _shape(config) -> tuple:
    kw = config.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages


def gemm_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "GROUP_M": 8},
                          num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in GEMM_SHAPES + GEMM_FP32_SHAPES for sk in ((1, 2, 4) if bm <= 32 else (1,))]


def gemm_configs_for(configs, x_bytes: int):
    """The configs of a list meant for activations of x_bytes (fp32: GEMM_FP32_SHAPES)."""
    shapes = set(GEMM_FP32_SHAPES if x_bytes == 4 else GEMM_SHAPES)
    return [c for c in configs if _shape(c) in shapes]


def gemm_shared_bytes(config, x_bytes: int, group_len: int) -> int:
    """An upper bound on the shared memory of a GEMM config (proved against the compiled
    kernels by `make kernel-check`): per pipeline stage an x tile and a tile of int32 words
    (one word per weight position, as the kernel loads them; see int4_gemm_kernel), and
    where a tile spans several groups the [BLOCK_K, BLOCK_N] scales and offsets too."""
    bm, bn, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    per_stage = bm * bk * x_bytes + bk * bn * 4
    if group_len < bk:
        per_stage += 2 * bk * bn * x_bytes
    return config.num_stages * per_stage


def select_gemm(configs, m_bucket: int, n: int, x_bytes: int, group_len: int, props):
    """The GEMM configs worth timing for M rows (M_BUCKET: M rounded up to a power of two)
    against an [N, K] weight on a GPU `props`: the tiles of x's dtype, tiles no taller than M needs, split-K only
    where the tile grid alone would not fill the GPU, and pipelines that fit in shared
    memory. Never a config that does not fit; raises when none does (kernel-check proves
    every supported GPU keeps several for every M)."""
    fits = [c for c in gemm_configs_for(configs, x_bytes)
            if gemm_shared_bytes(c, x_bytes, group_len) <= props.max_shared_mem]
    if not fits:
        raise RuntimeError(f"no int4 GEMM config fits {props.max_shared_mem} bytes of shared memory")
    kept = []
    for c in fits:
        bm, sk = c.kwargs["BLOCK_M"], c.kwargs["SPLIT_K"]
        if bm > max(16, m_bucket) or (m_bucket >= 64 and bm < 64):
            continue
        tiles = triton.cdiv(m_bucket, bm) * triton.cdiv(n, c.kwargs["BLOCK_N"])
        if sk > 1 and tiles >= props.sms:
            continue
        kept.append(c)
    return kept or [min(fits, key=lambda c: (c.kwargs["BLOCK_M"], gemm_shared_bytes(c, x_bytes, group_len)))]


def prune_gemv(configs, named_args, props, **kwargs):
    """triton.autotune's early_config_prune (the launcher binds the launch's device to
    props; constexpr arguments such as GROUP_LEN arrive in kwargs)."""
    return select_gemv(configs, named_args["N"], named_args["K"], named_args["x_ptr"].element_size(), props)


def prune_gemm(configs, named_args, props, **kwargs):
    """triton.autotune's early_config_prune (the launcher binds the launch's device to
    props; constexpr arguments such as GROUP_LEN arrive in kwargs)."""
    group_len = kwargs.get("GROUP_LEN", named_args.get("GROUP_LEN"))
    return select_gemm(configs, named_args["M_BUCKET"], named_args["N"], named_args["x_ptr"].element_size(),
                       group_len, props)


@triton.jit
def int4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, m_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_sn, stride_om,
    GROUP_LEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # One program: BLOCK_N output features of one row of x, over every SPLIT_K-th K tile.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    # Column 8j + i of a tile sits in word j, nibble i: keep the tile 3D as [n, j, i] so the
    # packed words are loaded as they lie in memory (contiguous along K) and each nibble is
    # a shift of the same register, with no reshuffle.
    offs_j = tl.arange(0, BLOCK_K // 8)
    shifts = 4 * tl.arange(0, 8)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        words_k = k0 // 8 + offs_j
        k_cols = k0 + offs_j[:, None] * 8 + tl.arange(0, 8)[None, :]              # [BK/8, 8]
        x = tl.load(x_ptr + row * stride_xm + k_cols, mask=k_cols < K, other=0.0).to(tl.float32)
        # Padded words past K/8 hold q = 0 and x is 0 there: the mask only guards the buffer end.
        words = tl.load(qw_ptr + offs_n[:, None] * stride_qn + words_k[None, :],
                        mask=n_mask[:, None] & (words_k[None, :] * 8 < K), other=0,
                        eviction_policy="evict_first")                               # read once
        q = ((words[:, :, None] >> shifts[None, None, :]) & 0xF).to(tl.float32)    # [BN, BK/8, 8]
        if GROUP_LEN >= BLOCK_K:
            # The whole tile lies in one group (group lengths are powers of two or one group).
            g = k0 // GROUP_LEN
            s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
            # sum_k x (q s + m) = s sum_k x q + m sum_k x: one FMA per weight, scale per row.
            xq = tl.sum(tl.sum(q * x[None, :, :], axis=2), axis=1)
            acc += s * xq + m * tl.sum(tl.sum(x, axis=1), axis=0)
        else:
            # Several groups per tile; GROUP_LEN is a multiple of 8, so word j is in one group.
            g = (k0 + offs_j * 8) // GROUP_LEN
            sm_mask = n_mask[:, None] & (words_k[None, :] * 8 < K)
            s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=sm_mask, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=sm_mask, other=0.0).to(tl.float32)
            w = q * s[:, :, None] + m[:, :, None]
            acc += tl.sum(tl.sum(w * x[None, :, :], axis=2), axis=1)
    out_ptrs = out_ptr + row * stride_om + offs_n
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc, mask=n_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=n_mask, sem="relaxed")


@triton.jit
def int4_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, m_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_sn, stride_om, M_BUCKET,
    GROUP_LEN: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Tiles are visited GROUP_M rows of tiles at a time so neighbouring programs share
    # weight tiles in L2 (the Triton matmul tutorial's grouped ordering).
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    rows_in_group = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * num_n)) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    # Row r of a [BLOCK_K, BLOCK_N] weight tile is column k0 + r: word (k0 + r) // 8, nibble
    # r % 8. Eight rows read the same word (served from L1); each row of the matrix is
    # still read from DRAM once, in whole 32-byte sectors along K.
    shifts = (offs_k % 8) * 4
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        words = tl.load(qw_ptr + offs_n[None, :] * stride_qn + (k // 8)[:, None],
                        mask=n_mask[None, :] & k_mask[:, None], other=0)
        q = ((words >> shifts[:, None]) & 0xF).to(tl.float32)                      # [BK, BN]
        if GROUP_LEN >= BLOCK_K:
            g = k0 // GROUP_LEN
            s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            m = tl.load(m_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        else:
            g = k // GROUP_LEN
            sm_mask = n_mask[None, :] & k_mask[:, None]
            s = tl.load(s_ptr + offs_n[None, :] * stride_sn + g[:, None], mask=sm_mask, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + offs_n[None, :] * stride_sn + g[:, None], mask=sm_mask, other=0.0).to(tl.float32)
        w = q * s + m
        if FP32_DOT:  # exact fp32 products, not tf32
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        else:  # tensor cores: the weights rounded to x's dtype, as a dense matmul would hold them
            acc = tl.dot(x, w.to(x.dtype), acc)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")


@triton.jit
def int4_dequantize_kernel(
    qw_ptr, s_ptr, m_ptr, w_ptr,
    N, K,
    stride_qn, stride_sn, stride_wn,
    GROUP_LEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # w[n, k] = q * s + m in w's dtype, for the large-M path that hands the dense matrix to
    # cuBLAS. Each program writes a [BLOCK_N, BLOCK_K] tile; the packed words are read once
    # as they lie ([n, j] along K) and nibble i of word j lands on column 8j + i through a
    # [BLOCK_N, BLOCK_K/8, 8] view, so stores stay contiguous along K.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = pid_k * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    n_mask = offs_n < N
    k_cols = offs_j[:, None] * 8 + tl.arange(0, 8)[None, :]                          # [BK/8, 8]
    words = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_j[None, :],
                    mask=n_mask[:, None] & (offs_j[None, :] * 8 < K), other=0)
    q = ((words[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 0xF).to(tl.float32)
    g = (offs_j * 8) // GROUP_LEN                                                     # word j: one group
    sm_mask = n_mask[:, None] & (offs_j[None, :] * 8 < K)
    s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=sm_mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=sm_mask, other=0.0).to(tl.float32)
    w = q * s[:, :, None] + m[:, :, None]
    w_ptrs = w_ptr + offs_n[:, None, None] * stride_wn + k_cols[None, :, :]
    tl.store(w_ptrs, w.to(w_ptr.dtype.element_ty), mask=n_mask[:, None, None] & (k_cols < K)[None, :, :])
