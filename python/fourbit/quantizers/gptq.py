"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): round a linear layer's weights one input channel at a time and
push each rounding error onto the channels not yet rounded, weighted by the inverse Hessian
of the layer's reconstruction error, so that ||X W^T - X W_q^T||^2 over the calibration
inputs X grows as little as it can.

For one output row w the error is (w - v) H (w - v)^T with H = 2 X^T X [K, K]. Rounding
channel j to q_j and re-solving the channels after it (the optimal brain surgeon step) is

    v[j+1:] -= (w_j - q_j) / [H^-1]_jj * [H^-1]_{j, j+1:}       (H^-1 of the channels >= j)

and with U the upper Cholesky factor of H^-1 (H^-1 = U^T U), row j of U holds exactly
those coefficients for every j at once: U[j, j:] / U[j, j]. The update is applied lazily:
within a block of `block_size` channels at once, to the channels after the block in one
matrix product when the block is done.

Groups: a group's scale and zero point are chosen when its first channel is reached, from
the weights as the updates have left them. Groups never straddle a block boundary that
still has updates pending (block_size and the group length are powers of two, so a group
either lies in one block or starts at one), so the blocked result equals the unblocked one.

Act-order: channels are visited by descending diag(H) (the most active first), so the
channels that matter most are rounded while the most others are left to absorb their error.
Two ways to keep groups (as llm-compressor and GPTQModel name them):
- "group" (act_order=True): the groups are runs of the visiting order; the stored Int4Weight
  keeps that order (stored column k is input channel perm[k]) so that the groups are
  contiguous runs of stored columns, as format.py defines them, and the layer gathers
  x[..., perm] on every call.
- "static": each group's grid is chosen up front from the original weights of its own
  channels (in channel order, as round to nearest would); the channels are then visited by
  descending diag(H), each rounded on its own group's fixed grid. The weight is stored in
  channel order with no perm: act-order's accuracy at no cost per call.

Grid search (grid_search=True, the calibrated methods' default): a group's range may be
shrunk, up to 25%, where that lowers the group's rounding error weighted by each channel's
diag(H) (the mean square of its activation); clipping a few large weights rounds the rest
on a finer grid. On SmolLM2 at g64 it took GPTQ "static" from 16.59 to 16.27 perplexity
(bench/results/quantizers.md has the full table).

The grid: integer zero points, w = (q - z) * s with q in [0, 15]. Symmetric: s = absmax /
7.5, z = 8. Asymmetric: the group's range widened to include 0, s = (max - min) / 15,
z = round(-min / s). s is rounded to the scale dtype first, and in fp32 to 20 significant
bits, so that z * s (a 4-bit integer times s) is exact in fp32: the offsets m = -z * s are
exact, and the weight exports to compressed-tensors (and GPTQ) with no loss.
"""

from __future__ import annotations

import torch

from ..format import COMPUTE_DTYPES, Int4Weight, check_group_size, group_len, pack_int4, padded_k

DEFAULT_BLOCK_SIZE = 128
DEFAULT_PERCDAMP = 0.01


def _store_scale(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """s rounded to dtype (bf16/fp16: then z * s is exact in fp32); fp32 scales lose their low
    4 mantissa bits (toward zero), which leaves 20 significant bits: z * s exact in fp32 too.
    Returned in s's own (compute) dtype."""
    stored = s.to(dtype)
    if dtype == torch.float32:
        stored = (stored.view(torch.int32) & ~0xF).view(torch.float32)
    return stored.to(s.dtype)


def grid(w: torch.Tensor, symmetric: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and integer zero point of each row of one group of weights.

    Args:
        w: [N, G] float (the group's current weights, G real channels).
        symmetric: z = 8 and s = absmax / 7.5; else the range [min(w, 0), max(w, 0)].
        dtype: the dtype the scales will be stored in.
    Returns:
        (s, z), each [N] in w's dtype: s >= 0 representable in dtype, z an integer in [0, 15].
    """
    if symmetric:
        s = _store_scale(w.abs().amax(dim=1) / 7.5, dtype)
        return s, torch.full_like(s, 8.0)
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    s = _store_scale((hi - lo) / 15, dtype)
    z = torch.round(-lo / torch.where(s == 0, 1.0, s)).clamp(0, 15)
    return s, z


SHRINKS = torch.linspace(1.0, 0.75, 26).tolist()  # the ranges search_grid tries, widest first


def search_grid(w: torch.Tensor, symmetric: bool, dtype: torch.dtype,
                importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grid()'s (s, z) for each row of one group of weights, its range shrunk by the factor
    (of SHRINKS) that minimizes the importance-weighted squared rounding error of the row:
    clipping the largest weights a little rounds all the others on a finer grid.

    Args:
        w: [N, G] float, the group's weights.
        importance: [G] or [N, G] float >= 0, how much each channel's error counts (diag(H):
            the mean square of its activation).
    """
    best_s, best_z = grid(w, symmetric, dtype)
    best = _rounding_error(w, best_s, best_z, importance)
    for shrink in SHRINKS[1:]:
        s, z = grid(w * shrink, symmetric, dtype)
        error = _rounding_error(w, s, z, importance)
        better = error < best
        best = torch.where(better, error, best)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def _rounding_error(w, s, z, importance) -> torch.Tensor:
    """sum over each row of importance * (w - its rounding on the grid (s, z))^2: [N]."""
    s, z = s.unsqueeze(1), z.unsqueeze(1)
    return ((w - (round_to_grid(w, s, z) - z) * s) ** 2 * importance).sum(dim=1)


def round_to_grid(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """q = clamp(round(w / s) + z, 0, 15) for weights w [N, ...] and s, z [N] (or broadcastable)."""
    return (torch.round(w / torch.where(s == 0, 1.0, s)) + z).clamp(0, 15)


def _is_power_of_two(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0 and n & (n - 1) == 0


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + percdamp * mean(diag H) * I)^-1 (H^-1 = U^T U).

    Raises ValueError when the damped H is not positive definite (say percdamp)."""
    h = hessian.clone()
    damp = percdamp * h.diagonal().mean()
    h.diagonal().add_(damp)
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
    if int(info) != 0:
        raise ValueError(f"GPTQ: the damped Hessian ({h.shape[0]} channels, percdamp {percdamp}) is not positive "
                         f"definite; raise percdamp or give more calibration data")
    return factor


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, group_size: int = 128, symmetric: bool = False,
                  act_order: bool = False, percdamp: float = DEFAULT_PERCDAMP,
                  block_size: int = DEFAULT_BLOCK_SIZE, dtype: torch.dtype | None = None,
                  grid_search: bool = False) -> Int4Weight:
    """Quantize one linear layer's weight by GPTQ.

    Args:
        w: float [N, K] (an nn.Linear weight). Computed in fp32, or fp64 when w or hessian is fp64.
        hessian: [K, K], 2 X^T X of the layer's inputs X [tokens, K] (any positive multiple of it:
            damping is relative). Channels with H_jj == 0 (never active) are dead: their weights
            are set to 0.
        group_size: 32, 64, 128, 256 or -1 (one group per row).
        symmetric: z = 8 (m = -8 s); else integer zero points.
        act_order: False (channel order); True or "group": visit channels by descending
            diag(H), groups are runs of that order and the result carries it as perm;
            "static": the same visiting order on grids fixed from the original weights, the
            result in channel order without perm (module docstring).
        percdamp: damping, as a fraction of the mean of diag(H), added to the diagonal.
        block_size: channels per lazy update block, a power of two.
        dtype: the scales' dtype (the offsets' too, where m = -z s is exact in it; else fp32);
            default w's dtype (fp32 for fp64 w).
        grid_search: each group's grid by search_grid (its range shrunk where that lowers
            the diag(H)-weighted rounding error), else its min/max range.
    Returns:
        Int4Weight of shape (N, K).
    """
    check_group_size(group_size)
    if not (act_order is False or act_order is True or act_order in ("group", "static")):
        raise ValueError(f"act_order must be False, True, 'group' or 'static', got {act_order!r}")
    if not _is_power_of_two(block_size):
        raise ValueError(f"block_size must be a power of two, got {block_size!r}")
    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point or w.dim() != 2 or 0 in w.shape:
        raise ValueError(f"w must be a non-empty float [N, K] matrix, got {getattr(w, 'shape', w)!r}")
    n, k = w.shape
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian must be [K, K] = {(k, k)}, got {tuple(getattr(hessian, 'shape', ()))}")
    dtype = dtype or (w.dtype if w.dtype in COMPUTE_DTYPES else torch.float32)
    if dtype not in COMPUTE_DTYPES:
        raise TypeError(f"dtype must be one of {COMPUTE_DTYPES}, got {dtype}")
    compute = torch.float64 if torch.float64 in (w.dtype, hessian.dtype) else torch.float32
    weights = w.detach().to(compute).clone()
    if not torch.isfinite(weights).all():
        raise ValueError("w contains NaN or inf; int4 cannot represent it")
    h = hessian.detach().to(device=w.device, dtype=compute).clone()
    if not torch.isfinite(h).all():
        raise ValueError("the Hessian contains NaN or inf (calibration activations overflowed?)")

    dead = h.diagonal() == 0
    h[dead, dead] = 1
    weights[:, dead] = 0
    glen = group_len(k, group_size)
    k_pad = padded_k(k, group_size)
    static = fixed = None
    if act_order == "static":  # every group's grid now, from the weights as they are
        importance = h.diagonal() if grid_search else None
        fixed = tuple(t.to(compute) for t in _rtn_codes(weights, group_size, symmetric, dtype, importance)[1:])
    perm = None
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        weights, h = weights[:, perm], h[perm][:, perm]
        if fixed is not None:  # visited column j's grid: the one of channel perm[j]'s group
            group_of = perm.to(weights.device) // glen
            static = (fixed[0][:, group_of], fixed[1][:, group_of])
    importance = h.diagonal().clone() if grid_search and static is None else None  # in visiting order
    u = inverse_hessian_factor(h, percdamp)
    del h

    q = torch.zeros(n, k_pad, dtype=torch.uint8, device=w.device)
    scales = torch.zeros(n, k_pad // glen, dtype=compute, device=w.device)
    zeros = torch.zeros_like(scales)
    threads = torch.get_num_threads()
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        block = weights[:, i1:i2].clone()   # contiguous: the column loop's updates stay in cache
        errors = torch.empty_like(block)
        # The column loop is thousands of small ops: on the CPU, threads only add their
        # synchronization (measured 10-20x slower with 2 threads); the block products keep them.
        if w.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            if static is None:
                _quantize_block(block, errors, weights, q, scales, zeros, u, i1, i2, k, glen, symmetric, dtype,
                                importance)
            else:
                _quantize_block_static(block, errors, q, static, u, i1, i2)
        finally:
            torch.set_num_threads(threads)
        if i2 < k:
            weights[:, i2:].addmm_(errors, u[i1:i2, i2:], alpha=-1)
    if static is None:
        return _int4_weight(q, scales, zeros, group_size, (n, k), symmetric, dtype, perm)
    codes = torch.zeros_like(q)
    codes[:, perm.to(q.device)] = q[:, :k]   # back to channel order
    return _int4_weight(codes, *fixed, group_size, (n, k), symmetric, dtype)


def _quantize_block(block, errors, weights, q, scales, zeros, u, i1, i2, k, glen, symmetric, dtype,
                    importance) -> None:
    """GPTQ's column loop over channels i1 .. i2 - 1 (block: their current weights, updated in
    place; errors: the scaled rounding errors, for the update of the channels after the block;
    importance: diag(H) [K] in visiting order for search_grid, or None for grid)."""
    if i1 % glen:  # the block starts inside a group: that group's grid was chosen earlier
        s, z = scales[:, i1 // glen], zeros[:, i1 // glen]
    for j in range(i2 - i1):
        col = i1 + j
        if col % glen == 0:  # a new group: its grid from the weights as they are now
            end = min(col + glen, k)
            current = block[:, j:end - i1] if end <= i2 else weights[:, col:end]  # past the block: no update pending
            s, z = grid(current, symmetric, dtype) if importance is None else \
                search_grid(current, symmetric, dtype, importance[col:end])
            scales[:, col // glen], zeros[:, col // glen] = s, z
        _round_column(block, errors, q, u, j, col, i2, s, z)


def _quantize_block_static(block, errors, q, grid_of_column, u, i1, i2) -> None:
    """GPTQ's column loop over stored columns i1 .. i2 - 1 on fixed grids (act_order "static"):
    grid_of_column = (s, z), each [N, K] in the visiting order."""
    s_all, z_all = grid_of_column
    for j in range(i2 - i1):
        col = i1 + j
        s, z = s_all[:, col], z_all[:, col]
        _round_column(block, errors, q, u, j, col, i2, s, z)


def _round_column(block, errors, q, u, j, col, i2, s, z) -> None:
    """Round column j of the block (stored column col) on the grid (s, z) into q, and push its
    scaled error onto the block's later columns (the rest of the step after the block)."""
    wj = block[:, j]
    qj = round_to_grid(wj, s, z)
    q[:, col] = qj.to(torch.uint8)
    err = (wj - (qj - z) * s) / u[col, col]
    block[:, j:].addr_(err, u[col, col:i2], alpha=-1)
    errors[:, j] = err


def _int4_weight(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 shape: tuple[int, int], symmetric: bool, dtype: torch.dtype,
                 perm: torch.Tensor | None = None) -> Int4Weight:
    """An Int4Weight from q [N, K_pad], scales and integer zero points [N, groups]: offsets
    m = -z * s in dtype where that is exact for every group (always when symmetric), else fp32."""
    s = scales.to(torch.float32)
    m = -(zeros.to(torch.float32) * s)      # exact in fp32 (see _store_scale)
    offsets = m.to(dtype)
    if dtype != torch.float32 and not torch.equal(offsets.float(), m):
        offsets = m
    return Int4Weight(pack_int4(q), scales.to(dtype), offsets, group_size, shape, symmetric,
                      None if perm is None else perm.to(torch.int32))


def rtn_quantize(w: torch.Tensor, group_size: int = 128, symmetric: bool = False,
                 dtype: torch.dtype | None = None) -> Int4Weight:
    """Round to nearest on GPTQ's grid (integer zero points), one group at a time: what GPTQ
    does with an identity Hessian, and what AWQ rounds its scaled weights with."""
    check_group_size(group_size)
    n, k = w.shape
    dtype = dtype or (w.dtype if w.dtype in COMPUTE_DTYPES else torch.float32)
    q, scales, zeros = _rtn_codes(w.detach().float(), group_size, symmetric, dtype)
    return _int4_weight(q, scales, zeros, group_size, (n, k), symmetric, dtype)


def _rtn_codes(w: torch.Tensor, group_size: int, symmetric: bool, dtype: torch.dtype,
               importance: torch.Tensor | None = None):
    """(q uint8 [N, K_pad], s, z [N, groups]) of round to nearest on the integer-zero grid;
    the grids by search_grid when importance [K] is given, else by grid."""
    n, k = w.shape
    glen, k_pad = group_len(k, group_size), padded_k(k, group_size)
    pad = k_pad - k
    # the last group's grid from its real channels only: pad with copies of its last channel
    padded = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1) if pad else w
    groups = padded.view(n, -1, glen)
    if importance is None:
        s, z = grid(groups.reshape(-1, glen), symmetric, dtype)
    else:  # the padding's copies count for nothing
        weights = torch.nn.functional.pad(importance.to(w.dtype), (0, pad)).view(1, -1, glen)
        s, z = search_grid(groups.reshape(-1, glen), symmetric, dtype,
                           weights.expand(n, -1, -1).reshape(-1, glen))
    s, z = s.view(n, -1), z.view(n, -1)
    q = round_to_grid(groups, s.unsqueeze(-1), z.unsqueeze(-1)).to(torch.uint8).view(n, k_pad)
    q[:, k:] = 0
    return q, s, z


def fake_quantize(w: torch.Tensor, group_size: int, symmetric: bool, dtype: torch.dtype) -> torch.Tensor:
    """The weight round to nearest on the integer-zero grid makes of w [N, K], in w's dtype
    (AWQ's search evaluates candidate scales with it)."""
    n, k = w.shape
    q, s, z = _rtn_codes(w.float(), group_size, symmetric, dtype)
    glen = group_len(k, group_size)
    wq = (q.view(n, -1, glen).float() - z.unsqueeze(-1)) * s.unsqueeze(-1)
    return wq.view(n, -1)[:, :k].to(w.dtype)


class Hessian:
    """H = 2 X^T X / tokens of a linear layer's inputs, accumulated over calibration batches
    (fp32 sums of fp32 products; the mean keeps the magnitude that of one token)."""

    def __init__(self, k: int, device):
        self.sum = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        self.sum.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def value(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.tokens, 1))
