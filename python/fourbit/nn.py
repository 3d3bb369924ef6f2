"""Drop-in modules: Int4Linear, Int8Linear and Int8Embedding (int8 weight-only: GGUF Q8_0,
int8 heads), and quantize_ to swap a model's nn.Linear layers."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from . import _checks
from .backends import check_backend_name
from .format import (
    COMPUTE_DTYPES,
    Int4Weight,
    Int8Weight,
    check_group_size,
    dequantize_int8,
    group_len,
    int8_group_len,
    padded_k,
    prepack_mma_weight,
    unpack_mma_weight,
)
from .kv_cache import PagedBatch
from .ops import check_activation, linear, linear_int8, paged_attention, paged_prefill_attention, write_kv
from .quantize import CALIBRATED_METHODS, Int4WeightOnlyConfig, as_config, quantize_int8_weight, quantize_weight
from .quantizers import calibration_ids, quantize_calibrated


class Int4Linear(nn.Module):
    """A linear layer with int4 weights (W4A16): y = x @ W.T + b, W in the fourbit format.

    Buffers, in the layout of the backend that runs the layer (`layout`):
        "canonical" (backends torch, cpu, triton, and "auto"), what Int4Weight holds:
            qweight: int32 [out_features, K_padded / 8]
            scales:  [out_features, num_groups], fp32, bf16 or fp16
            offsets: [out_features, num_groups], fp32, bf16 or fp16 (-8 * scales when
                symmetric; fp32 where an import needs it to be exact, see format.py)
            perm:    int32 [in_features] with act_order (x[..., perm] is what the stored
                columns multiply), else None
        "mma" (backend "cuda" on a CUDA device), the CUDA kernel's own (format.prepack_mma_weight):
            qweight: int32 [N_pad / 16, K_pad / 64 * 128]; scales, offsets: [num_groups, out_features]
    The layer converts once, when its weights are loaded, it is moved, or its backend is
    set, and holds one layout only. state_dict, `weight` and checkpoints are canonical always.
    Parameter:
        bias: [out_features] or None

    Attributes:
        backend: "auto" or a forced backend name (see fourbit.ops); may be changed at any time.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 symmetric: bool = False, dtype: torch.dtype | None = None, device=None,
                 backend: str = "auto", act_order: bool = False):
        super().__init__()
        check_group_size(group_size)
        in_features = _checks.positive_int("in_features", in_features)
        out_features = _checks.positive_int("out_features", out_features)
        _checks.boolean("bias", bias)
        _checks.boolean("symmetric", symmetric)
        _checks.boolean("act_order", act_order)
        dtype = dtype or torch.get_default_dtype()
        if dtype not in COMPUTE_DTYPES:
            raise TypeError(f"dtype must be one of {COMPUTE_DTYPES}, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric = group_size, symmetric
        self.layout = "canonical"
        k_pad = padded_k(in_features, group_size)
        groups = k_pad // group_len(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(out_features, k_pad // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("offsets", torch.zeros(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device) if act_order else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.backend = backend

    @classmethod
    def from_linear(cls, linear_module: nn.Linear, group_size: int = 128, symmetric: bool = False,
                    backend: str = "auto") -> Int4Linear:
        """Quantize an nn.Linear (round to nearest); scales keep the linear's dtype."""
        w = linear_module.weight
        if w.device.type == "meta":
            raise ValueError("cannot quantize a linear layer on the meta device: it holds no "
                             "weights (load a quantized checkpoint with fourbit.load_quantized)")
        weight = quantize_weight(w, group_size=group_size, symmetric=symmetric)
        module = cls(linear_module.in_features, linear_module.out_features, linear_module.bias is not None,
                     group_size, symmetric, dtype=w.dtype, device="meta", backend=backend)
        module.load_weight(weight, linear_module.bias)
        return module

    # -- the layout of the buffers --------------------------------------------------------

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, backend: str) -> None:
        self._backend = check_backend_name(backend)
        self._relayout()

    def _wanted_layout(self) -> str:
        """The CUDA kernel reads its own layout; every other backend the canonical one."""
        return "mma" if self._backend == "cuda" and self.qweight.device.type == "cuda" else "canonical"

    def _canonical(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight, scales, offsets) in the canonical layout, converted if need be."""
        if self.layout == "canonical":
            return self.qweight, self.scales, self.offsets
        return unpack_mma_weight(self.qweight, self.scales, self.offsets, self.out_features, self.in_features,
                                 padded_k(self.in_features, self.group_size))

    def _set_layout(self, layout: str) -> None:
        """Convert the buffers to layout ("canonical" or "mma"), replacing them: one copy held."""
        if layout == self.layout:
            return
        qweight, scales, offsets = self._canonical()
        if layout == "mma":
            qweight, scales, offsets = prepack_mma_weight(qweight, scales, offsets, self.in_features)
        self.qweight, self.scales, self.offsets = qweight, scales, offsets
        self.layout = layout

    def _relayout(self) -> None:
        if self.qweight.device.type != "meta":
            self._set_layout(self._wanted_layout())

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .cpu(), .half(): move the buffers, then take the layout the backend
        # wants on the new device (the CUDA layout means nothing on the CPU).
        module = super()._apply(fn, recurse)
        self._relayout()
        return module

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != "canonical":
            for name, tensor in zip(("qweight", "scales", "offsets"), self._canonical()):
                destination[prefix + name] = tensor

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # state dicts and checkpoints are canonical: load into canonical buffers, then convert.
        self._set_layout("canonical")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._relayout()

    # -- weights --------------------------------------------------------------------------

    def load_weight(self, weight: Int4Weight, bias: torch.Tensor | None = None) -> None:
        """Take an Int4Weight (and bias) as this layer's weights, replacing the buffers, and
        convert them to the layout of the layer's backend."""
        if not isinstance(weight, Int4Weight):
            raise TypeError(f"weight must be a fourbit.Int4Weight, got {type(weight).__name__}")
        if weight.shape != (self.out_features, self.in_features) or weight.group_size != self.group_size:
            raise ValueError(f"weight {weight} does not fit Int4Linear({self.in_features}, "
                             f"{self.out_features}, group_size={self.group_size})")
        self.layout = "canonical"
        self.qweight, self.scales, self.offsets = weight.qweight, weight.scales, weight.offsets
        self.perm = weight.perm
        self.symmetric = weight.symmetric
        if self.bias is not None:
            if bias is None:
                raise ValueError("this Int4Linear has a bias; pass it")
            self.bias = nn.Parameter(bias.detach().to(weight.device), requires_grad=False)
        self._relayout()

    @property
    def weight(self) -> Int4Weight:
        """The weight in the canonical layout (converted if the buffers hold another)."""
        qweight, scales, offsets = self._canonical()
        return Int4Weight(qweight, scales, offsets, self.group_size, (self.out_features, self.in_features),
                          self.symmetric, self.perm)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the scales (the offsets may be fp32 where that is exact)."""
        return self.scales.dtype

    @property
    def act_order(self) -> bool:
        """Whether the stored input channels are permuted (perm)."""
        return self.perm is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_activation(x, self.in_features, self.qweight.device)
        if self.perm is not None:  # act-order: the stored columns multiply x[..., perm]
            x = x.index_select(-1, self.perm)
        return linear(x, self.qweight, self.scales, self.offsets, self.out_features,
                      group_len(self.in_features, self.group_size), self.bias, self._backend, self.layout)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}, dtype={self.scales.dtype}, backend={self.backend!r}"
                + (f", offsets={self.offsets.dtype}" if self.offsets.dtype != self.scales.dtype else "")
                + (", act_order=True" if self.perm is not None else ""))


def _int8_buffers(module: nn.Module, n: int, k: int, group_size: int, dtype, device) -> None:
    module.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8, device=device))
    module.register_buffer("scales", torch.ones(n, k // int8_group_len(k, group_size), dtype=dtype, device=device))


def _compute_dtype(dtype) -> torch.dtype:
    dtype = dtype or torch.get_default_dtype()
    if dtype not in COMPUTE_DTYPES:
        raise TypeError(f"dtype must be one of {COMPUTE_DTYPES}, got {dtype}")
    return dtype


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (W8A16): y = x @ W.T + b, W = q * s per group
    (format.Int8Weight): GGUF Q8_0 tensors load into it exactly, and a float lm_head can be
    quantized to it (Int4WeightOnlyConfig.lm_head_int8).

    Buffers: qweight int8 [out_features, in_features]; scales [out_features, in_features /
    group_len] in fp32, bf16 or fp16 (group_len = in_features for group_size -1).
    Parameter: bias [out_features] or None. Attribute backend: "auto", "torch" or "cpu".
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = -1,
                 dtype: torch.dtype | None = None, device=None, backend: str = "auto"):
        super().__init__()
        in_features = _checks.positive_int("in_features", in_features)
        out_features = _checks.positive_int("out_features", out_features)
        _checks.boolean("bias", bias)
        int8_group_len(in_features, group_size)
        dtype = _compute_dtype(dtype)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        _int8_buffers(self, out_features, in_features, group_size, dtype, device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.backend = check_backend_name(backend)

    @classmethod
    def from_linear(cls, linear_module: nn.Linear, group_size: int = -1, backend: str = "auto") -> Int8Linear:
        """Quantize an nn.Linear to symmetric int8 (round to nearest, quantize_int8_weight);
        the scales keep the linear's dtype."""
        w = linear_module.weight
        if w.device.type == "meta":
            raise ValueError("cannot quantize a linear layer on the meta device: it holds no weights")
        module = cls(linear_module.in_features, linear_module.out_features, linear_module.bias is not None,
                     group_size, dtype=w.dtype, device="meta", backend=backend)
        module.load_weight(quantize_int8_weight(w, group_size), linear_module.bias)
        return module

    def load_weight(self, weight: Int8Weight, bias: torch.Tensor | None = None) -> None:
        """Take an Int8Weight (and bias) as this layer's weights, replacing the buffers."""
        if not isinstance(weight, Int8Weight):
            raise TypeError(f"weight must be a fourbit.Int8Weight, got {type(weight).__name__}")
        if weight.shape != (self.out_features, self.in_features) or weight.group_size != self.group_size:
            raise ValueError(f"weight {weight} does not fit Int8Linear({self.in_features}, {self.out_features}, "
                             f"group_size={self.group_size})")
        self.qweight, self.scales = weight.qweight, weight.scales
        if self.bias is not None:
            if bias is None:
                raise ValueError("this Int8Linear has a bias; pass it")
            self.bias = nn.Parameter(bias.detach().to(weight.device), requires_grad=False)

    @property
    def weight(self) -> Int8Weight:
        return Int8Weight(self.qweight, self.scales, self.group_size)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the scales."""
        return self.scales.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_activation(x, self.in_features, self.qweight.device)
        return linear_int8(x, self.qweight, self.scales, int8_group_len(self.in_features, self.group_size),
                           self.bias, self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, scales={self.scales.dtype}, backend={self.backend!r}")


class Int8Embedding(nn.Module):
    """Token embeddings stored as int8 rows (format.Int8Weight): forward(ids) = (q * s)[ids],
    dequantized in fp32 (exact for 16-bit scales) and returned in `dtype`.

    It holds its own buffers (qweight int8 [num_embeddings, embedding_dim], scales
    [num_embeddings, embedding_dim / group_len]), or, made by Int8Embedding.tied(head), none:
    it then looks up the rows of an Int8Linear head's weight, so a tied embedding and lm_head
    keep one int8 copy (the head's, which its state dict and checkpoints hold) wherever the
    model is moved.

    Attributes:
        dtype: the dtype of the embeddings returned (the model's activation dtype).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int = -1,
                 dtype: torch.dtype | None = None, device=None, scales_dtype: torch.dtype | None = None):
        super().__init__()
        self.num_embeddings = _checks.positive_int("num_embeddings", num_embeddings)
        self.embedding_dim = _checks.positive_int("embedding_dim", embedding_dim)
        int8_group_len(embedding_dim, group_size)
        self.group_size, self.dtype = group_size, _compute_dtype(dtype)
        self._tied = ()
        _int8_buffers(self, num_embeddings, embedding_dim, group_size, _compute_dtype(scales_dtype or dtype), device)

    @classmethod
    def tied(cls, head: Int8Linear, dtype: torch.dtype | None = None) -> Int8Embedding:
        """An embedding reading the rows of head's int8 weight (the vocabulary is its out_features)."""
        if not isinstance(head, Int8Linear):
            raise TypeError(f"head must be an Int8Linear, got {type(head).__name__}")
        module = cls(head.out_features, head.in_features, head.group_size, dtype, device="meta")
        del module.qweight, module.scales  # the head's are used instead
        module._tied = (head,)  # a tuple: not registered as a submodule (the model holds the head)
        return module

    @property
    def head(self) -> Int8Linear | None:
        """The Int8Linear whose weight this embedding reads, or None when it holds its own."""
        return self._tied[0] if self._tied else None

    def load_weight(self, weight: Int8Weight) -> None:
        """Take an Int8Weight as this (untied) embedding's rows."""
        if self._tied:
            raise ValueError("this Int8Embedding reads its head's weight; load the head instead")
        if not isinstance(weight, Int8Weight):
            raise TypeError(f"weight must be a fourbit.Int8Weight, got {type(weight).__name__}")
        if weight.shape != (self.num_embeddings, self.embedding_dim) or weight.group_size != self.group_size:
            raise ValueError(f"weight {weight} does not fit Int8Embedding({self.num_embeddings}, "
                             f"{self.embedding_dim}, group_size={self.group_size})")
        self.qweight, self.scales = weight.qweight, weight.scales

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        owner = self._tied[0] if self._tied else self
        return owner.qweight, owner.scales

    @property
    def weight(self) -> Int8Weight:
        return Int8Weight(*self._tensors(), self.group_size)

    @property
    def device(self) -> torch.device:
        return self._tensors()[0].device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        qweight, scales = self._tensors()
        rows = qweight[input_ids]                                   # [..., embedding_dim] int8
        return dequantize_int8(rows, scales[input_ids], int8_group_len(self.embedding_dim, self.group_size)
                               ).to(self.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, group_size={self.group_size}, dtype={self.dtype}"
                + (", tied to its head" if self._tied else ""))


class ConcatLinear(nn.Module):
    """Projections of one input run side by side: y = cat([part(x) for part in parts], -1).

    The loader builds one where a model fuses projections (q/k/v, gate/up) whose checkpoint
    parts cannot become one Int4Linear (an int4 q and k beside a Q6_K v in a Q4_K_M GGUF, or
    parts of different group sizes or act-order permutations): each part keeps its own form,
    int4 parts on the int4 kernels, and nothing is quantized again.

    Attributes:
        parts: nn.ModuleList of Int4Linear / nn.Linear, all with in_features inputs.
        in_features, out_features: as the fused linear's (out_features = the parts' sum).
    """

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        if not parts or len({p.in_features for p in parts}) != 1:
            raise ValueError("ConcatLinear needs one or more linear parts with the same in_features")
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    @property
    def split_sizes(self) -> list[int]:
        """out_features of each part, in order."""
        return [p.out_features for p in self.parts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


class PagedAttention(nn.Module):
    """Attention of one layer over a paged KV cache: write the step's new K and V to the
    layer's pages, then attend (decode or prefill, as the step's PagedBatch says).

    Args:
        num_heads, num_kv_heads, head_dim: query heads, K/V heads (num_heads a multiple:
            GQA), and head size.
        scale: softmax scale, default head_dim ** -0.5.
        backend: "auto" or a forced backend for the three paged ops.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 backend: str = "auto"):
        super().__init__()
        num_heads, num_kv_heads, head_dim = (_checks.positive_int(name, v) for name, v in
                                             (("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                                              ("head_dim", head_dim)))
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        check_backend_name(backend)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.backend = scale, backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, batch: PagedBatch, backend: str | None = None) -> torch.Tensor:
        """
        Args:
            q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim],
                the step's new tokens in the cache's dtype.
            k_cache, v_cache: this layer's pages [num_blocks, block_size, num_kv_heads, head_dim].
            batch: the step's PagedBatch (PagedKVCache.plan), planned once for all layers.
            backend: overrides self.backend for this call.
        Returns:
            [num_tokens, num_heads, head_dim] in q's dtype.
        """
        backend = backend or self.backend
        write_kv(k, v, k_cache, v_cache, batch, backend=backend)
        attend = paged_attention if batch.decode else paged_prefill_attention
        return attend(q, k_cache, v_cache, batch, self.scale, backend=backend)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"


def linear_targets(model: nn.Module, config: Int4WeightOnlyConfig | None = None) -> list[str]:
    """Qualified names of the layers quantize_(model, config) would replace (those for which
    config.quantizes(name, module); default config: every exact nn.Linear but lm_head)."""
    config = config or Int4WeightOnlyConfig()
    return [name for name, mod in model.named_modules() if config.quantizes(name, mod)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def quantize_(model: nn.Module, config: Int4WeightOnlyConfig | None = None, *, calibration=None,
              tokenizer=None, **options) -> nn.Module:
    """Replace, in place, the nn.Linear layers of model that config quantizes with Int4Linear.

    Args:
        model: any nn.Module; its linear layers are quantized on the device they are on. The
            calibrated methods run model(token_ids [B, T]) and quantize the layers of its
            decoder-layer list (the nn.ModuleList holding the linears) one layer at a time.
        config: an Int4WeightOnlyConfig (or a dict of its fields); default Int4WeightOnlyConfig().
        calibration: method "gptq" / "awq" only (and required there): token ids, an integer
            tensor [S, T] (S sequences of T tokens), or text (a str or a list of str) that
            `tokenizer` encodes, cut into up to 128 sequences of 512 tokens.
        tokenizer: with text calibration, an object with encode(text) -> list[int], such as
            fourbit.load_tokenizer(source).
        **options: instead of config, its fields as keywords: group_size (int, default 128),
            symmetric (bool), skip (fnmatch patterns, default ("lm_head",)), backend (str,
            default "auto"), filter (callable (name, module) -> bool), method (str, "rtn",
            "gptq" or "awq"), act_order, percdamp, awq_rounding, lm_head_int8 (None, or the
            int8 group size of the float lm_head: -1 per row or a multiple of 32; off by default).
    Returns:
        model, with Int4Linear layers in place of the replaced ones (and an Int8Linear lm_head
        with lm_head_int8).
    Raises:
        TypeError: both a config and keywords, or an unknown keyword (named); calibration of
            another type, or text without a tokenizer.
        ValueError: an impossible value (named), as Int4WeightOnlyConfig raises it; a calibrated
            method without calibration, or calibration with method "rtn".
    """
    if config is not None and options:
        raise TypeError(f"quantize_ takes a config or keywords, not both (got a config and {sorted(options)})")
    config = Int4WeightOnlyConfig.from_dict(options) if config is None else as_config(config)
    if not isinstance(model, nn.Module) or isinstance(model, (nn.Linear, Int4Linear)):
        raise TypeError("quantize_ takes a model containing linear layers; use Int4Linear.from_linear "
                        "for a single nn.Linear")
    targets = linear_targets(model, config)
    int8_heads = [name for name, mod in model.named_modules() if config.int8_head(name, mod)]
    if config.method in CALIBRATED_METHODS:
        if calibration is None:
            raise ValueError(f"method {config.method!r} needs calibration data: quantize_(model, config, "
                             f"calibration=token_ids [S, T] or texts, tokenizer=...)")
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        ids = calibration_ids(calibration, tokenizer, vocab_size)

        def replace(name, linear, weight):
            module = Int4Linear(linear.in_features, linear.out_features, linear.bias is not None, config.group_size,
                                config.symmetric, dtype=linear.weight.dtype, device="meta", backend=config.backend)
            module.load_weight(weight, linear.bias)
            _set_submodule(model, name, module)

        quantize_calibrated(model, config, targets, ids, replace)
        _int8_heads(model, int8_heads, config)
        return model
    if calibration is not None:
        raise ValueError("calibration data is for the calibrated methods ('gptq', 'awq'); method 'rtn' uses none")
    for name in tqdm(targets, desc="quantize_", unit="layer", disable=True if len(targets) < 16 else None):
        layer = model.get_submodule(name)
        _set_submodule(model, name, Int4Linear.from_linear(layer, group_size=config.group_size,
                                                           symmetric=config.symmetric, backend=config.backend))
    _int8_heads(model, int8_heads, config)
    return model


def _int8_heads(model: nn.Module, names: list[str], config: Int4WeightOnlyConfig) -> None:
    """config.lm_head_int8: the float lm_head layers named become Int8Linear (a tied head gets
    its own int8 copy; the embedding it was tied to stays float)."""
    backend = config.backend if config.backend in ("torch", "cpu") else "auto"
    for name in names:
        _set_submodule(model, name, Int8Linear.from_linear(model.get_submodule(name), config.lm_head_int8, backend))


TUNE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@torch.inference_mode()
def tune(model: nn.Module, rows=TUNE_ROWS, dtype: torch.dtype | None = None) -> int:
    """Run every distinct Int4Linear shape of model once per row count, so autotuned kernels
    pick their configs now instead of on the first real request.

    The Triton kernels keep what they measured in Triton's on-disk cache (TRITON_CACHE_DIR,
    default ~/.triton/cache): a later process on the same GPU and software starts tuned.
    Ship that directory with a deployment to skip tuning there too.

    Args:
        model: a model with Int4Linear layers (after quantize_ or load_quantized), on its device.
        rows: the numbers of rows M (batch x tokens) to tune for; autotuning buckets M by
            powers of two, so powers of two cover every M.
        dtype: activation dtype; defaults to each layer's scale dtype.
    Returns:
        The number of (shape, M) cases run.
    """
    _checks.module("model", model)
    seen, cases = set(), 0
    for module in model.modules():
        if not isinstance(module, Int4Linear):
            continue
        dt = dtype or module.scales.dtype
        key = (module.in_features, module.out_features, module.group_size, dt, module.qweight.device, module.backend)
        if key in seen:
            continue
        seen.add(key)
        for m in rows:
            module(torch.randn(m, module.in_features, device=module.qweight.device, dtype=dt))
            cases += 1
    return cases
