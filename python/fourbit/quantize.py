"""How float weights become Int4Weight: round to nearest with per-group min/max (here), GPTQ
and activation-aware scaling on calibration data (fourbit.quantizers); and
Int4WeightOnlyConfig, which says how, and which linear layers of a model are quantized."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import torch
from torch import nn

from .backends import check_backend_name
from .format import COMPUTE_DTYPES, Int4Weight, Int8Weight, check_group_size, int8_group_len, pack_int4, padded_k

_BITS_AS_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _next_toward(t: torch.Tensor, up: bool) -> torch.Tensor:
    """The neighbouring representable value of t in its own dtype (toward +inf if up)."""
    bits = t.view(_BITS_AS_INT[t.dtype])
    # Floats are sign-magnitude: for either sign, adding one to the bit pattern moves the
    # value one step away from zero and subtracting one moves it toward zero.
    away = (t > 0) if up else (t < 0)
    toward_zero = (t < 0) if up else (t > 0)
    stepped = torch.where(away, bits + 1, torch.where(toward_zero, bits - 1, bits))
    out = stepped.view(t.dtype)
    # From zero, step to the smallest subnormal of the right sign.
    tiny = torch.full_like(t, torch.finfo(t.dtype).smallest_normal * torch.finfo(t.dtype).eps)
    return torch.where(t == 0, tiny if up else -tiny, out)


def _store(x: torch.Tensor, dtype: torch.dtype, at_most: torch.Tensor | None = None,
           at_least: torch.Tensor | None = None) -> torch.Tensor:
    """Round fp32 x to dtype, then nudge one step so the stored value keeps the bound."""
    y = x.to(dtype)
    if at_most is not None:
        y = torch.where(y.float() > at_most, _next_toward(y, up=False), y)
    if at_least is not None:
        y = torch.where(y.float() < at_least, _next_toward(y, up=True), y)
    return y


def _check_representable(scales: torch.Tensor, offsets: torch.Tensor, groups: torch.Tensor,
                          dtype: torch.dtype) -> None:
    """Raise unless every q * s (q in 0..15) is finite in fp32 and every q * s + m in dtype.

    The weights of a group run monotonically from m (q = 0) to m + 15 s (s >= 0), so the two
    ends bound them all; checked in fp64, where neither end can overflow.
    """
    s, m = scales.double(), offsets.double()
    fits = (15 * s <= torch.finfo(torch.float32).max) & \
        (torch.maximum(m.abs(), (m + 15 * s).abs()) <= torch.finfo(dtype).max)  # False for NaN, inf
    if not fits.all():
        row, group = (int(i) for i in (~fits).nonzero()[0])
        values = groups[row, group]
        raise ValueError(f"w's row {row}, group {group} spans [{float(values.min()):.4g}, {float(values.max()):.4g}]: "
                         f"int4 with {dtype} scales and offsets cannot represent it (every q * s + m must stay "
                         f"within +-{torch.finfo(dtype).max:.4g}); quantize to a wider dtype or rescale w")


def _check_float_matrix(w, dtype: torch.dtype | None) -> torch.dtype:
    """The scale dtype (dtype, default w's) once w is a non-empty float [N, K] matrix and dtype a
    compute dtype; TypeError / ValueError naming what is wrong otherwise."""
    if not isinstance(w, torch.Tensor) or w.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"w must be a tensor of dtype {COMPUTE_DTYPES}, got "
                        f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
    if w.dim() != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"w must be a non-empty [N, K] matrix, got shape {tuple(w.shape)}")
    dtype = dtype or w.dtype
    if dtype not in COMPUTE_DTYPES:
        raise TypeError(f"dtype must be one of {COMPUTE_DTYPES}, got {dtype}")
    return dtype


def quantize_weight(w: torch.Tensor, group_size: int = 128, symmetric: bool = False,
                    dtype: torch.dtype | None = None) -> Int4Weight:
    """Quantize a float weight matrix to int4 by round-to-nearest.

    Args:
        w: fp32, bf16 or fp16 [N, K] (an nn.Linear weight: out_features x in_features).
        group_size: 32, 64, 128, 256, or -1 for one group per output row.
        symmetric: offsets fixed at -8 * scale (scale = absmax / 7.5 per group);
            otherwise scale = (max - min) / 15 and offset = min per group.
        dtype: dtype of scales and offsets; defaults to w.dtype.
    Returns:
        Int4Weight in the canonical packing. Each weight dequantizes to within half a
        quantization step (s / 2) of the original: s and m are rounded to their storage
        dtype first and nudged by one step so the group's range stays covered.
    Raises:
        TypeError: w is not a float tensor, or dtype is not a compute dtype.
        ValueError: w is not a non-empty [N, K] matrix; w holds NaN or inf (the first one
            is named); or a group's int4 weights would not all be finite: every q * s
            (q in 0..15) must be finite in fp32, where the reference and Triton kernels
            compute it, and every q * s + m in dtype. No scale covers such a group within
            half a step, so the group is named (row, index and range) rather than rounded
            to inf or NaN. In numbers: a group's span (asymmetric) or twice its absmax
            (symmetric) must stay under 3.4e38, and with float16 its values and, symmetric,
            8 s under 65504.
    """
    check_group_size(group_size)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be True or False, got {type(symmetric).__name__} {symmetric!r}")
    dtype = _check_float_matrix(w, dtype)
    wf = w.detach().to(torch.float32)
    if not torch.isfinite(wf).all():
        row, col = (int(i) for i in (~torch.isfinite(wf)).nonzero()[0])
        raise ValueError(f"w contains NaN or inf (w[{row}, {col}] = {float(wf[row, col])}); "
                         f"int4 cannot represent it")

    n, k = wf.shape
    k_pad = padded_k(k, group_size)
    glen = k_pad if group_size == -1 else group_size
    # Pad with copies of the last real column: the group statistics see only real values.
    padded = torch.cat([wf, wf[:, -1:].expand(n, k_pad - k)], dim=1) if k_pad > k else wf
    groups = padded.reshape(n, k_pad // glen, glen)

    if symmetric:
        absmax = groups.abs().amax(dim=-1)
        scales = (absmax / 7.5).to(dtype)
        while True:  # 7.5 s must cover absmax after rounding s to its dtype: step s up
            short = scales.float() * 7.5 < absmax
            if not short.any():
                break
            scales = torch.where(short, _next_toward(scales, up=True), scales)
        offsets = scales * -8  # exact: a power-of-two multiple
        s = scales.float().unsqueeze(-1)
        q = torch.round(groups / torch.where(s == 0, 1.0, s)) + 8
    else:
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
        offsets = _store(lo, dtype, at_most=lo)
        m = offsets.float()
        scales = _store((hi - m) / 15, dtype, at_least=(hi - m) / 15)
        s = scales.float().unsqueeze(-1)
        q = torch.round((groups - m.unsqueeze(-1)) / torch.where(s == 0, 1.0, s))

    _check_representable(scales, offsets, groups, dtype)
    q = q.clamp_(0, 15).to(torch.uint8).reshape(n, k_pad)
    q[:, k:] = 0  # padded columns are never read; keep them zero so files are canonical
    return Int4Weight(pack_int4(q), scales, offsets, group_size, (n, k), symmetric)


def quantize_int8_weight(w: torch.Tensor, group_size: int = -1, dtype: torch.dtype | None = None) -> Int8Weight:
    """Quantize a float weight matrix to symmetric int8 by round-to-nearest: s = absmax / 127
    per group (stored in dtype, nudged up one step where rounding made it smaller, so that
    |q| <= 127), q = round(w / s).

    Args:
        w: fp32, bf16 or fp16 [N, K].
        group_size: -1 (one scale per output row) or a multiple of 32 dividing K.
        dtype: dtype of the scales; defaults to w.dtype.
    Returns:
        Int8Weight; every weight dequantizes to within half a step (s / 2) of the original.
    Raises:
        TypeError: w not a float tensor, dtype not a compute dtype.
        ValueError: w not a non-empty [N, K] matrix, a bad group_size, w holding NaN or inf,
            or a scale dtype cannot hold (absmax / 127 above its largest value).
    """
    dtype = _check_float_matrix(w, dtype)
    n, k = w.shape
    glen = int8_group_len(k, group_size)
    groups = w.detach().to(torch.float32).reshape(n, k // glen, glen)
    if not torch.isfinite(groups).all():
        raise ValueError("w holds NaN or inf; int8 cannot represent it")
    bound = groups.abs().amax(dim=-1) / 127
    if float(bound.max()) > torch.finfo(dtype).max:
        raise ValueError(f"w's absmax {float(bound.max()) * 127:.4g} needs int8 scales beyond {dtype}'s range; "
                         f"use wider scales (dtype=torch.float32)")
    scales = _store(bound, dtype, at_least=bound)
    s = scales.float().unsqueeze(-1)
    q = torch.round(groups / torch.where(s == 0, 1.0, s)).clamp_(-127, 127).to(torch.int8).reshape(n, k)
    return Int8Weight(q, scales, group_size)


METHODS = ("rtn", "gptq", "awq")
CALIBRATED_METHODS = ("gptq", "awq")
AWQ_ROUNDINGS = ("rtn", "gptq")
ACT_ORDERS = ("group", "static")  # besides True (= "group") and False


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """How to quantize a model's linear layers to int4 (W4A16), for quantize_, load_model and
    the `fourbit` command. Every field is checked when the config is made.

    Attributes:
        group_size: int, 32, 64, 128, 256 or -1 (one group per output row).
        symmetric: bool; offsets fixed at -8 * scale.
        backend: str, "auto" or a backend of fourbit.ops.BACKENDS, set on the Int4Linear layers made.
        skip: tuple[str, ...] of fnmatch patterns (a str is one pattern, None none): a layer
            whose qualified name, or its last component, matches one stays float.
        filter: None, or a callable (name: str, module: nn.Linear) -> bool; a layer is
            quantized only where it returns True (and no skip pattern matches).
        method: str, how weights are rounded: "rtn" (round to nearest, per-group min/max:
            float offsets), "gptq" (GPTQ on calibration data) or "awq" (activation-aware
            scales searched on calibration data and folded into the preceding norms and
            linears, then rounded by awq_rounding). "gptq" and "awq" need calibration data
            (quantize_(..., calibration=...)) and use integer zero points (m = -z * s), so
            their layers export to compressed-tensors exactly.
        act_order: False, True, "group" or "static"; "gptq" (or awq_rounding "gptq") only:
            quantize input channels by descending Hessian diagonal. True or "group": groups
            are runs of that order, which the layers keep as their perm (x[..., perm] per call);
            "static": the groups' grids fixed from the original weights first, the layers
            stored in channel order without perm (as llm-compressor's default; no cost per call).
        percdamp: float in [0, 1], GPTQ's damping as a fraction of the Hessian's mean diagonal.
        grid_search: bool, GPTQ rounding only: each group's range shrunk (by up to 25%) where
            that lowers its rounding error weighted by the channels' activation energy
            (diag(H)), rather than always its min/max. On by default; it only changes
            which scales and zero points are chosen.
        awq_rounding: str, "awq" only: how the scaled weights are rounded, "rtn" or "gptq".
        lm_head_int8: None (default: the lm_head stays as it is, float unless the checkpoint
            holds it quantized), or the group size of a symmetric int8 lm_head: -1 for one
            scale per output row, or a multiple of 32 dividing hidden_size. A float lm_head
            (the exact nn.Linear named "lm_head") then becomes an Int8Linear on the int8 kernels
            (round to nearest, scales in the head's dtype): a quarter of the fp32 head's bytes
            per decoded token. A head tied to the embeddings gets its own int8 copy; the
            embedding stays float. Independent of skip, which keeps it from int4.
    """

    group_size: int = 128
    symmetric: bool = False
    backend: str = "auto"
    skip: tuple[str, ...] = ("lm_head",)
    filter: Callable[[str, nn.Module], bool] | None = None
    method: str = "rtn"
    act_order: bool | str = False
    percdamp: float = 0.01
    awq_rounding: str = "gptq"
    grid_search: bool = True
    lm_head_int8: int | None = None

    def __post_init__(self):
        check_group_size(self.group_size)
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be True or False, got {self.symmetric!r}")
        check_backend_name(self.backend)
        skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip or ())
        if not all(isinstance(p, str) for p in skip):
            raise TypeError(f"skip must be fnmatch patterns (str), got {self.skip!r}")
        object.__setattr__(self, "skip", skip)
        if self.filter is not None and not callable(self.filter):
            raise TypeError(f"filter must be None or a callable (name, module) -> bool, got {self.filter!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if not (isinstance(self.act_order, bool) or self.act_order in ACT_ORDERS):
            raise TypeError(f"act_order must be True, False or one of {ACT_ORDERS}, got {self.act_order!r}")
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or \
                not 0 <= self.percdamp <= 1:
            raise ValueError(f"percdamp must be a number in [0, 1], got {self.percdamp!r}")
        if not isinstance(self.grid_search, bool):
            raise TypeError(f"grid_search must be True or False, got {self.grid_search!r}")
        if self.lm_head_int8 is not None and (isinstance(self.lm_head_int8, bool) or
                                              not isinstance(self.lm_head_int8, int) or
                                              not (self.lm_head_int8 == -1 or self.lm_head_int8 > 0 and
                                                   self.lm_head_int8 % 32 == 0)):
            raise ValueError(f"lm_head_int8 must be None, -1 (per output row) or a multiple of 32 (a group "
                             f"size), got {self.lm_head_int8!r}")
        if self.awq_rounding not in AWQ_ROUNDINGS:
            raise ValueError(f"unknown awq_rounding {self.awq_rounding!r}; choose one of {AWQ_ROUNDINGS}")
        if self.act_order and not (self.method == "gptq" or self.method == "awq" and self.awq_rounding == "gptq"):
            raise ValueError(f"act_order applies to GPTQ rounding (method 'gptq', or 'awq' with awq_rounding "
                             f"'gptq'), not method {self.method!r}" + (" with awq_rounding 'rtn'"
                                                                      if self.method == "awq" else ""))

    @classmethod
    def from_dict(cls, options: Mapping) -> Int4WeightOnlyConfig:
        """The config a mapping of field names to values describes (missing fields keep their
        defaults); an unknown key raises TypeError naming it and the closest field."""
        names = [f.name for f in fields(cls)]
        unknown = [k for k in options if k not in names]
        if unknown:
            hints = "".join(f" ({k!r}: did you mean {close[0]!r}?)" for k in unknown
                            if (close := difflib.get_close_matches(str(k), names, n=1)))
            raise TypeError(f"unknown Int4WeightOnlyConfig option(s) {unknown}{hints}; "
                            f"the options are {names}")
        return cls(**options)

    def quantizes(self, name: str, module: nn.Module) -> bool:
        """Whether the layer at qualified name `name` is one this config quantizes: an exact
        nn.Linear (subclasses such as nn.MultiheadAttention's out_proj, whose weight the parent
        reads directly, are left alone), matched by no skip pattern, and accepted by filter."""
        if type(module) is not nn.Linear or self.int8_head(name, module):
            return False
        last = name.rsplit(".", 1)[-1]
        if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(last, p) for p in self.skip):
            return False
        return self.filter is None or bool(self.filter(name, module))

    def int8_head(self, name: str, module: nn.Module) -> bool:
        """Whether the layer at `name` is the float lm_head this config makes int8 (lm_head_int8)."""
        return self.lm_head_int8 is not None and type(module) is nn.Linear and name.rsplit(".", 1)[-1] == "lm_head"


def as_config(config) -> Int4WeightOnlyConfig:
    """config if it is an Int4WeightOnlyConfig; the config a dict of its fields describes."""
    if isinstance(config, Int4WeightOnlyConfig):
        return config
    if isinstance(config, Mapping):
        return Int4WeightOnlyConfig.from_dict(config)
    raise TypeError(f"expected an Int4WeightOnlyConfig or a dict of its fields, got {config!r}")
