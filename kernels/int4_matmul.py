"""Triton kernels for int4 weight-only matmul (W4A16) on the canonical fourbit layout.

Layout (python/fourbit/format.py): qweight int32 [N, K_padded/8], nibble i of word j is
column 8j+i; scales/offsets [N, K_padded/GROUP_LEN]; w = q * s + m.

Three kernels, picked by M in python/fourbit/dispatch.py (GEMV_MAX_M, DENSE_MIN_M):
- int4_gemv_kernel: decode (M of 1 to a few). Each program streams a [BLOCK_N, BLOCK_K]
  tile of packed words once, in 16-byte vectors along K, converts the nibbles in registers
  and accumulates with FMAs on CUDA cores, each thread on its own (the K loop moves no data
  between threads; one reduction after it); K is split over SPLIT_K programs so a 4096x4096
  layer fills every SM, and the partial sums meet in an fp32 workspace through atomic adds
  (no second pass over weights).
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

# Triton's interpreter (CPU) runs each program in Python: one tile, no tuning. The GEMV's
# tile is a wide one: the interpreter pays per op, and that kernel's loop is unrolled over
# the 32 weights of a vector, whatever the tile.
GEMV_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 2})
GEMM_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2, "GROUP_M": 4})


# (BLOCK_N, BLOCK_K) of the GEMV at 4 warps (int4_gemv_kernel): a tile is BLOCK_N x BLOCK_K/32
# vectors of 16 bytes, at least one per thread (BLOCK_N * BLOCK_K >= 4096), so a thread holds
# BLOCK_N * BLOCK_K / 4096 rows of one vector column, and the x values and their sum it
# converts per vector serve that many rows. BLOCK_K stays at most 256: wider, a 16-byte chunk
# of fp16 x along the tile ([1, BLOCK_K/32, 8]) has as many elements as the program has
# threads and the compiler spreads it one element per thread, unlike the words (a layout
# conversion in the loop).
GEMV_TILES = [(16, 256), (32, 256), (64, 128), (64, 256), (128, 256)]


def gemv_configs():
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=4, num_stages=2)
            for bn, bk in GEMV_TILES for sk in (1, 2, 4, 8)]


# Scales and offsets need not share x's dtype (format.py: exact imports keep fp32 offsets
# beside fp16 scales): the estimates take s_bytes, the wider of the two element sizes
# (default x_bytes), and the pruners read it from the launch's s_ptr and m_ptr.

def gemv_shared_bytes(config, x_bytes: int, s_bytes: int | None = None) -> int:
    """An upper bound on the shared memory of a GEMV config (proved against the compiled
    kernels by `make kernel-check`): the K loop exchanges nothing between threads (the
    compiled kernels use a few hundred bytes, for the one reduction after it), so this is
    what a software pipeline could stage per stage (the x tile, the packed words, one scale
    and offset per row and vector), plus the final reduction's scratch."""
    bn, bk = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    per_stage = bk * x_bytes + bn * bk // 2 + 2 * bn * (bk // 32) * (s_bytes or x_bytes)
    return config.num_stages * per_stage + 4 * bn * (bk // 32)


def select_gemv(configs, n: int, k: int, x_bytes: int, props, s_bytes: int | None = None):
    """The GEMV configs worth timing for an [N, K] weight on a GPU `props`: every split
    gets at least one K tile, the grid fills the GPU (one program per SM, or the deepest
    split), and the tile fits in shared memory; where that leaves fewer than two (a layer
    too small to fill the GPU), also the grids within half the largest. Never a config that does not fit; raises
    when none does (kernel-check proves every supported GPU keeps several)."""
    fits = [c for c in configs if gemv_shared_bytes(c, x_bytes, s_bytes) <= props.max_shared_mem]
    if not fits:
        raise RuntimeError(f"no int4 GEMV config fits {props.max_shared_mem} bytes of shared memory")

    def programs(c):
        return triton.cdiv(n, c.kwargs["BLOCK_N"]) * c.kwargs["SPLIT_K"]

    split = [c for c in fits if c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_K"] <= max(k, c.kwargs["BLOCK_K"])]
    kept = [c for c in split if programs(c) >= props.sms or c.kwargs["SPLIT_K"] == 8]
    if len(kept) < 2 and split:
        most = max(map(programs, split))
        kept += [c for c in split if 2 * programs(c) >= most and c not in kept]
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


def gemm_shared_bytes(config, x_bytes: int, group_len: int, s_bytes: int | None = None) -> int:
    """An upper bound on the shared memory of a GEMM config (proved against the compiled
    kernels by `make kernel-check`): per pipeline stage an x tile and a tile of int32 words
    (one word per weight position, as the kernel loads them; see int4_gemm_kernel), and
    where a tile spans several groups the [BLOCK_K, BLOCK_N] scales and offsets too."""
    bm, bn, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    per_stage = bm * bk * x_bytes + bk * bn * 4
    if group_len < bk:
        per_stage += 2 * bk * bn * (s_bytes or x_bytes)
    return config.num_stages * per_stage


def select_gemm(configs, m_bucket: int, n: int, x_bytes: int, group_len: int, props, s_bytes: int | None = None):
    """The GEMM configs worth timing for M rows (M_BUCKET: M rounded up to a power of two)
    against an [N, K] weight on a GPU `props`: the tiles of x's dtype, tiles no taller than M needs, split-K only
    where the tile grid alone would not fill the GPU, and pipelines that fit in shared
    memory. Never a config that does not fit; raises when none does (kernel-check proves
    every supported GPU keeps several for every M)."""
    fits = [c for c in gemm_configs_for(configs, x_bytes)
            if gemm_shared_bytes(c, x_bytes, group_len, s_bytes) <= props.max_shared_mem]
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
    return kept or [min(fits, key=lambda c: (c.kwargs["BLOCK_M"], gemm_shared_bytes(c, x_bytes, group_len, s_bytes)))]


def _s_bytes(named_args) -> int:
    return max(named_args["s_ptr"].element_size(), named_args["m_ptr"].element_size())


def prune_gemv(configs, named_args, props, **kwargs):
    """triton.autotune's early_config_prune (the launcher binds the launch's device to
    props; constexpr arguments such as GROUP_LEN arrive in kwargs)."""
    return select_gemv(configs, named_args["N"], named_args["K"], named_args["x_ptr"].element_size(), props,
                       _s_bytes(named_args))


def prune_gemm(configs, named_args, props, **kwargs):
    """triton.autotune's early_config_prune (the launcher binds the launch's device to
    props; constexpr arguments such as GROUP_LEN arrive in kwargs)."""
    group_len = kwargs.get("GROUP_LEN", named_args.get("GROUP_LEN"))
    return select_gemm(configs, named_args["M_BUCKET"], named_args["N"], named_args["x_ptr"].element_size(),
                       group_len, props, _s_bytes(named_args))


@triton.jit
def _unstack4(t, A: tl.constexpr, B: tl.constexpr):
    """[A, B, 4] -> (t[..., 0], ..., t[..., 3]): the last axis lies in one thread's registers
    (see int4_gemv_kernel), so this is register renaming, not data movement."""
    even, odd = tl.split(tl.reshape(t, [A, B, 2, 2]))
    t0, t2 = tl.split(even)
    t1, t3 = tl.split(odd)
    return t0, t1, t2, t3


@triton.jit
def _unstack8(t, A: tl.constexpr, B: tl.constexpr):
    """[A, B, 8] -> (t[..., 0], ..., t[..., 7]), like _unstack4."""
    even, odd = tl.split(tl.reshape(t, [A, B, 2, 2, 2]))
    e0, e1 = tl.split(even)
    o0, o1 = tl.split(odd)
    t0, t4 = tl.split(e0)
    t2, t6 = tl.split(e1)
    t1, t5 = tl.split(o0)
    t3, t7 = tl.split(o1)
    return t0, t1, t2, t3, t4, t5, t6, t7


@triton.jit
def _nibble(word, high, i: tl.constexpr, FAST_DEQUANT: tl.constexpr):
    """Nibble i of each int32 word as an fp32 q in [0, 15] (high: word >> 20). Both branches
    give the same, exact value (every q is an integer below 2^24)."""
    if FAST_DEQUANT:
        # The magic-number conversion: two instructions (lop3, fadd), no integer-to-float
        # unit. The fp32 number 2^(23 - b) has an ulp of 2^-b and a zero mantissa, so ORing in
        # the nibble q where it lies (bits b..b+3) makes the float 2^(23 - b) + q exactly, and
        # subtracting 2^(23 - b) leaves q exactly. A mantissa holds bits 0..22: nibbles 0..4
        # (b = 0..16) come from the word itself, 5..7 from word >> 20 (b = 0, 4, 8). lop3's
        # lookup table 0xEA is (a & b) | c.
        if i < 5:
            b: tl.constexpr = 4 * i
            src = word
        else:
            b: tl.constexpr = 4 * i - 20
            src = high
        bits = tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
            [src, tl.full(src.shape, 15 << b, tl.int32), tl.full(src.shape, (150 - b) << 23, tl.int32)],
            dtype=tl.int32, is_pure=True, pack=1)
        return bits.to(tl.float32, bitcast=True) - float(1 << (23 - b))
    else:
        return ((word >> (4 * i)) & 0xF).to(tl.float32)


@triton.jit
def int4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, m_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_sn, stride_om,
    GROUP_LEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr = True, FAST_DEQUANT: tl.constexpr = True,
):
    # One program: BLOCK_N output features of one row of x, over every SPLIT_K-th K tile.
    #
    # A tile is [BLOCK_N, V] vectors of 16 bytes: 4 packed words, 32 consecutive weights of one
    # row, which always lie in one group (the smallest group is 32). The words are loaded as a
    # [BLOCK_N, V, 4] tensor, contiguous along the last axis, so each thread holds whole vectors
    # (one 128-bit load each) and _unstack4 hands out its 4 words as [BLOCK_N, V] tensors in
    # that same layout. x is loaded per word c in 16-byte chunks, [1, V, XC] (XC = 8 halves or
    # 4 floats): the compiler lays such a load out like the words (V along the same lanes, XC
    # in registers), so its unstacked [1, V] values broadcast along the rows with no layout
    # conversion. Everything in the K loop is elementwise in one layout: no reduction, no
    # shuffle, no shared memory.
    #
    # Per vector: p = sum x q (one FMA per weight, in a thread's registers), and with the
    # vector's scale s and offset m (loaded once per row and vector: once per group, never per
    # word) sum x (q s + m) = s p + m sum x: two FMAs per 32 weights, plus sum x, shared by
    # every row a thread holds. The [BLOCK_N, V] accumulator is reduced once, after the loop.
    #
    # EVEN_K (the launcher's): K is a multiple of 32 and so are qweight's rows, whose stride is
    # a multiple of 4 words: whole vectors and whole x chunks are in bounds or out together.
    # Otherwise every word and column is masked on its own (odd shapes only; slower loads).
    # FAST_DEQUANT: the magic-number nibble conversion of _nibble (inline PTX; the launcher
    # turns it off under Triton's CPU interpreter, which cannot run PTX).
    V: tl.constexpr = BLOCK_K // 32
    XC: tl.constexpr = 128 // x_ptr.dtype.element_ty.primitive_bitwidth
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_v = tl.arange(0, V)
    offs_c = tl.arange(0, 4)
    offs_e = tl.arange(0, XC)
    if EVEN_K:
        stride_qn = tl.multiple_of(stride_qn, 4)
    x_row = x_ptr + row * stride_xm
    acc = tl.zeros([BLOCK_N, V], dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        # Word c of vector v is word k0 / 8 + 4 v + c of the row.
        word = k0 // 8 + 4 * offs_v[None, :, None] + offs_c[None, None, :]              # [1, V, 4]
        if EVEN_K:
            w_mask = n_mask[:, None, None] & (k0 + 32 * offs_v[None, :, None] < K)
        else:
            # Words at or past column K hold q = 0 and meet x = 0: the mask guards the row end.
            w_mask = n_mask[:, None, None] & (word * 8 < K)
        words = tl.load(qw_ptr + offs_n[:, None, None] * stride_qn + word, mask=w_mask, other=0,
                        eviction_policy="evict_first")                                   # read once
        ws = _unstack4(words, BLOCK_N, V)
        p = tl.zeros([BLOCK_N, V], dtype=tl.float32)
        xsum = tl.zeros([1, V], dtype=tl.float32)
        for c in tl.static_range(4):
            high = ws[c] >> 20
            for h in tl.static_range(8 // XC):
                col = k0 + 32 * offs_v[None, :, None] + 8 * c + XC * h                        # [1, V, 1]
                if EVEN_K:
                    x_mask = col < K
                else:
                    x_mask = col + offs_e[None, None, :] < K
                xh = tl.load(x_row + col + offs_e[None, None, :], mask=x_mask, other=0.0).to(tl.float32)
                if XC == 8:
                    xs = _unstack8(xh, 1, V)
                else:
                    xs = _unstack4(xh, 1, V)
                for e in tl.static_range(XC):
                    p += xs[e] * _nibble(ws[c], high, XC * h + e, FAST_DEQUANT)
                    xsum += xs[e]
        # Vector v is in group (k0 + 32 v) // GROUP_LEN = k0 // GROUP_LEN + 32 v // GROUP_LEN: for a
        # power-of-two GROUP_LEN up to BLOCK_K, k0 is a multiple of it; for a longer group the
        # vectors of a tile never straddle two (k0 % GROUP_LEN + 32 v < GROUP_LEN); one group per
        # row (any length) is group 0 throughout. The [BLOCK_N, V] scale tile is built apart
        # from the word indices so the compiler lays it out like the accumulator: each thread
        # loads one scale and offset per row and vector it holds, whatever the group length.
        sm = offs_n[:, None] * stride_sn + (k0 // GROUP_LEN + (32 * offs_v[None, :]) // GROUP_LEN)
        sm_mask = n_mask[:, None] & (32 * offs_v[None, :] < K - k0)
        s = tl.load(s_ptr + sm, mask=sm_mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + sm, mask=sm_mask, other=0.0).to(tl.float32)
        acc += s * p
        acc += m * xsum
    out = tl.sum(acc, axis=1)
    out_ptrs = out_ptr + row * stride_om + offs_n
    if SPLIT_K == 1:
        tl.store(out_ptrs, out, mask=n_mask)
    else:
        tl.atomic_add(out_ptrs, out, mask=n_mask, sem="relaxed")


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
