"""Write a fourbit Llama as a compressed-tensors checkpoint (quant_method "compressed-tensors",
format "pack-quantized", as llm-compressor saves it), which transformers (with the
compressed-tensors package) and vLLM load, and which fourbit reads back exactly.

The directory holds config.json (the model's Hugging Face config with a quantization_config)
and model.safetensors with Hugging Face names: fourbit's fused qkv_proj and gate_up_proj are
split back into q/k/v_proj and gate/up_proj (rows are independent, so the split is exact).
For each int4 linear layer `<layer>` (W [N, K]):

    weight_packed      int32 [N, ceil(K/8)]: nibble i of word j holds column 8j + i as the
                       signed code x = q - 8 plus 8, i.e. fourbit's q itself (the canonical
                       packing, with input channels in their own order).
    weight_scale       [N, groups] in the export dtype; groups = ceil(K / group_size) for the
                       "group" strategy, 1 for "channel" (fourbit group_size -1).
    weight_zero_point  asymmetric layers only: int32 [ceil(N/8), groups], packed along N the
                       same way, each the signed zero point z - 8 plus 8, i.e. z.
    weight_shape       int64 [2]: (N, K).
    weight_g_idx       act-order layers only: int32 [K], the group of each input channel.

compressed-tensors dequantizes (x - zero) * scale = (q - z) * s; fourbit's weight is
q * s + m. A layer exports exactly when every s is held by the export dtype and every
m == -z * s in fp32 for an integer z in [0, 15] (symmetric layers, m = -8 s, always do;
GPTQ / AWQ / compressed-tensors imports do by construction). Other layers (fourbit's own
round-to-nearest asymmetric layers store a float min; GGUF Q4_1 / Q4_K layers too) are an
error naming them, or with dense_fallback=True float weights (their exact dequantization)
listed in the config's `ignore`, never re-rounded.

Act-order: compressed-tensors "group" act-order (weight_g_idx) was removed from the
compressed-tensors package itself in its 2026 releases (0.19 refuses actorder "group");
older releases and vLLM's readers of those checkpoints take it. An act-order layer whose
permutation keeps its groups contiguous exports without it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import _directory_lock, _fsync_dir, _remove_stale, _write_atomic
from .format import COMPUTE_DTYPES, Int4Weight, pack_int4, select_rows, unpack_int4
from .nn import ConcatLinear, Int4Linear, Int8Embedding, Int8Linear

QUANT_METHOD = "compressed-tensors"
PACKED = "pack-quantized"
# The compressed-tensors release whose layout and config this writer follows.
COMPRESSED_TENSORS_VERSION = "0.19.0"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclasses.dataclass(frozen=True)
class Scheme:
    """What a quantized layer's compressed-tensors scheme says about its weights."""
    strategy: str          # "group" or "channel"
    group_size: int | None  # None for "channel"
    symmetric: bool
    actorder: str | None   # "group" (weight_g_idx written) or None

    def weights(self) -> dict:
        """The scheme's `weights` object, with the keys llm-compressor writes."""
        return {"num_bits": 4, "type": "int", "symmetric": self.symmetric, "strategy": self.strategy,
                "group_size": self.group_size, "actorder": self.actorder, "block_structure": None,
                "dynamic": False, "observer": "memoryless_minmax", "observer_kwargs": {}, "scale_dtype": None,
                "zp_dtype": None if self.symmetric else "torch.int8"}


@dataclasses.dataclass
class ExportedLayer:
    """One Hugging Face linear module as it will be written."""
    name: str                           # "model.layers.0.self_attn.q_proj"
    tensors: dict[str, torch.Tensor]    # by full name
    scheme: Scheme | None               # None: a float layer (in `ignore`)


def _hf_modules(model) -> list[tuple[str, str, list[tuple[str, int]]]]:
    """(fourbit module, Hugging Face prefix, [(HF module name, rows)]) for every linear layer,
    the parts of a fused one in row order."""
    c = model.config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out = []
    for i in range(c.num_layers):
        hf = f"model.layers.{i}"
        out += [(f"layers.{i}.self_attn.qkv_proj", hf, [(f"{hf}.self_attn.{p}_proj", r)
                                                        for p, r in (("q", q), ("k", kv), ("v", kv))]),
                (f"layers.{i}.self_attn.o_proj", hf, [(f"{hf}.self_attn.o_proj", c.hidden_size)]),
                (f"layers.{i}.mlp.gate_up_proj", hf, [(f"{hf}.mlp.{p}_proj", c.intermediate_size)
                                                      for p in ("gate", "up")]),
                (f"layers.{i}.mlp.down_proj", hf, [(f"{hf}.mlp.down_proj", c.hidden_size)])]
    if not c.tie_word_embeddings:
        out.append(("lm_head", "", [("lm_head", c.vocab_size)]))
    return out


def _exact_in(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return bool(torch.equal(t.to(dtype).to(torch.float32), t.to(torch.float32)))


def integer_zero_points(weight: Int4Weight, dtype: torch.dtype) -> tuple[torch.Tensor | None, str, str]:
    """(z uint8 [N, groups], "", "") when w = (q - z) * s exactly with every s held by dtype and
    z an integer in [0, 15] (m == -z * s in fp32); else (None, why not, where first)."""
    s, m = weight.scales.to(torch.float32), weight.offsets.to(torch.float32)
    if not _exact_in(s, dtype):
        return None, f"scales not all representable in {dtype}", f"scales {weight.scales.dtype}"
    zero_scale = s == 0
    z = torch.where(zero_scale, torch.full_like(s, 8.0), torch.round(-m / torch.where(zero_scale, 1.0, s)))
    in_range = (z >= 0) & (z <= 15)
    z = z.clamp(0, 15)
    exact = in_range & (-(z * s) == m)
    if not bool(exact.all()):
        row, group = (int(i) for i in (~exact).nonzero()[0])
        return None, ("offsets that are not -z * scale for an integer zero point z in [0, 15] (a float minimum, "
                      "as fourbit's asymmetric round-to-nearest and GGUF Q4_1 / Q4_K store)"), \
            f"row {row}, group {group}: scale {float(s[row, group])!r}, offset {float(m[row, group])!r}"
    return z.to(torch.uint8), "", ""


def _g_idx(weight: Int4Weight) -> torch.Tensor | None:
    """int32 [K]: the group of each input channel in channel order, or None when the groups
    are contiguous (no perm, one group per row, or a perm that only moves channels within
    their groups)."""
    if weight.perm is None or weight.group_size == -1:
        return None
    k = weight.shape[1]
    stored_group = torch.arange(k, dtype=torch.int32, device=weight.device) // weight.group_size
    g_idx = torch.empty_like(stored_group).index_copy_(0, weight.perm.to(torch.int64), stored_group)
    return None if torch.equal(g_idx, stored_group) else g_idx


def _int4_tensors(name: str, weight: Int4Weight, z: torch.Tensor, dtype: torch.dtype) -> tuple[dict, Scheme]:
    """The compressed-tensors tensors of one exportable layer (see the module docstring)."""
    n, k = weight.shape
    q = unpack_int4(weight.qweight)[:, :k]
    if weight.perm is not None:  # stored column j is input channel perm[j]: back to channel order
        q = torch.empty_like(q).index_copy_(1, weight.perm.to(torch.int64), q)
    words = -(-k // 8)
    q = torch.nn.functional.pad(q, (0, 8 * words - k))
    groups = 1 if weight.group_size == -1 else -(-k // weight.group_size)
    tensors = {f"{name}.weight_packed": pack_int4(q),
               f"{name}.weight_scale": weight.scales[:, :groups].to(dtype).contiguous(),
               f"{name}.weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    symmetric = bool((z[:, :groups] == 8).all())
    if not symmetric:
        zt = torch.nn.functional.pad(z[:, :groups].t(), (0, 8 * -(-n // 8) - n))  # [groups, N padded]
        tensors[f"{name}.weight_zero_point"] = pack_int4(zt).t().contiguous()
    g_idx = _g_idx(weight)
    if g_idx is not None:
        tensors[f"{name}.weight_g_idx"] = g_idx
    channel = weight.group_size == -1
    scheme = Scheme("channel" if channel else "group", None if channel else weight.group_size, symmetric,
                    None if g_idx is None else "group")
    return tensors, scheme


def _dense(name: str, w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A float weight in dtype where that holds it exactly, else in fp32."""
    return {f"{name}.weight": (w.to(dtype) if _exact_in(w, dtype) else w.to(torch.float32)).contiguous()}


def plan_export(model, dtype: torch.dtype, dense_fallback: bool = False) -> list[ExportedLayer]:
    """Every linear layer of model as Hugging Face modules and the tensors to write.

    Raises:
        ValueError: int4 layers that compressed-tensors cannot hold exactly (named, with why),
            unless dense_fallback, which writes them as float.
    """
    layers, refused = [], {}
    for module_name, _, parts in _hf_modules(model):
        fused = model.get_submodule(module_name)
        offset = 0
        for i, (hf_name, rows) in enumerate(parts):
            if isinstance(fused, ConcatLinear):  # the parts kept apart: part i holds these rows
                module, lo, start = fused.parts[i], 0, rows
            else:
                module, lo, start = fused, offset, offset + rows
            offset += rows
            bias = getattr(module, "bias", None)
            part_bias = None if bias is None else bias.detach()[lo:start]
            if isinstance(module, Int4Linear):
                weight = select_rows(module.weight, torch.arange(lo, start, device=module.qweight.device)).to("cpu")
                z, why, where = integer_zero_points(weight, dtype)
                if z is None:
                    if not dense_fallback:
                        refused.setdefault(why, []).append(f"{hf_name} ({where})")
                        continue
                    layer = ExportedLayer(hf_name, _dense(hf_name, weight.dequantize(), dtype), None)
                else:
                    tensors, scheme = _int4_tensors(hf_name, weight, z, dtype)
                    layer = ExportedLayer(hf_name, tensors, scheme)
            elif isinstance(module, Int8Linear):  # int8 (a GGUF Q8_0 head): its exact float weight
                w = module.weight.dequantize()[lo:start].to("cpu")
                layer = ExportedLayer(hf_name, _dense(hf_name, w, dtype), None)
            else:
                w = module.weight.detach()[lo:start].to("cpu")
                layer = ExportedLayer(hf_name, {f"{hf_name}.weight": w.to(dtype).contiguous()}, None)
            if part_bias is not None:
                layer.tensors[f"{hf_name}.bias"] = part_bias.to("cpu", dtype).contiguous()
            layers.append(layer)
    if refused:
        count = sum(len(names) for names in refused.values())
        reasons = "; ".join(f"{len(names)} with {why}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                            for why, names in refused.items())
        raise ValueError(f"{count} int4 layers cannot be written as compressed-tensors exactly (it dequantizes "
                         f"(q - z) * scale with integer zero points z): {reasons}. Pass dense_fallback=True "
                         f"(`fourbit convert --dense-fallback`) to write them as float layers instead, exactly")
    return layers


def quantization_config(layers: list[ExportedLayer]) -> dict:
    """The config.json quantization_config for the planned layers: one config group per
    distinct scheme (targets ["Linear"] when there is one, else the modules' names) and every
    float linear layer in `ignore`."""
    schemes: dict[Scheme, list[str]] = {}
    for layer in layers:
        if layer.scheme is not None:
            schemes.setdefault(layer.scheme, []).append(layer.name)
    ignore = [layer.name for layer in layers if layer.scheme is None]
    ordered = sorted(schemes.items(), key=lambda item: -len(item[1]))
    groups = {}
    for i, (scheme, names) in enumerate(ordered):
        groups[f"group_{i}"] = {"targets": ["Linear"] if len(ordered) == 1 else names, "weights": scheme.weights(),
                                "input_activations": None, "output_activations": None, "format": PACKED}
    return {"quant_method": QUANT_METHOD, "format": PACKED, "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {}, "version": COMPRESSED_TENSORS_VERSION}


def _model_dtype(model) -> torch.dtype:
    return model.dtype


def save_compressed_tensors(model, directory, tokenizer=None, *, dense_fallback: bool = False,
                            dtype: torch.dtype | None = None) -> Path:
    """Write model as a compressed-tensors pack-quantized Hugging Face directory.

    Args:
        model: a fourbit Llama (fourbit.load_model), with Int4Linear and float linear layers.
        directory: where config.json and model.safetensors (and the tokenizer) go.
        tokenizer: a fourbit Tokenizer to write beside them, or None.
        dense_fallback: write int4 layers compressed-tensors cannot hold exactly as float
            layers (their exact dequantization, in dtype where it holds it, else fp32) listed
            in `ignore`, instead of raising.
        dtype: the dtype of the scales and float tensors, and the config's torch_dtype;
            default the model's float dtype. Every scale must be representable in it.
    Raises:
        ValueError: layers that do not export exactly (see plan_export), or a float tensor
            dtype cannot hold. Nothing is written then.
    Returns:
        directory.
    """
    from .models.llama import Llama

    if not isinstance(model, Llama):
        raise TypeError(f"model must be a fourbit Llama (fourbit.load_model), got {type(model).__name__}")
    if not isinstance(dense_fallback, bool):
        raise TypeError(f"dense_fallback must be True or False, got {dense_fallback!r}")
    dtype = dtype or _model_dtype(model)
    if dtype not in COMPUTE_DTYPES:
        raise TypeError(f"dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")
    layers = plan_export(model, dtype, dense_fallback)
    tensors = {}
    for layer in layers:
        tensors.update(layer.tensors)
    embed = model.embed_tokens  # an int8 one (GGUF Q8_0) as its exact float rows
    embed_weight = embed.weight.dequantize() if isinstance(embed, Int8Embedding) else embed.weight
    ends = {"model.embed_tokens.weight": embed_weight, "model.norm.weight": model.norm.weight}
    for i, block in enumerate(model.layers):
        ends[f"model.layers.{i}.input_layernorm.weight"] = block.input_layernorm.weight
        ends[f"model.layers.{i}.post_attention_layernorm.weight"] = block.post_attention_layernorm.weight
    inexact = [name for name, t in ends.items() if not _exact_in(t.detach(), dtype)]
    if inexact:
        raise ValueError(f"float tensors {inexact[:8]} are {ends[inexact[0]].dtype} values that {dtype} does not "
                         f"hold: export with dtype={ends[inexact[0]].dtype}")
    tensors.update({name: t.detach().to("cpu", dtype).contiguous() for name, t in ends.items()})
    for name, t in tensors.items():
        if t.device.type == "meta":
            raise ValueError(f"cannot save {name}: it is on the meta device and holds no data")

    config = model.config.to_hf()
    config.update(dtype=_DTYPE_NAMES[dtype], torch_dtype=_DTYPE_NAMES[dtype])
    if any(layer.scheme is not None for layer in layers):  # else a float checkpoint: no quantization_config
        config["quantization_config"] = quantization_config(layers)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path, config_path = directory / "model.safetensors", directory / "config.json"
    with _directory_lock(directory):
        # Both files written under temporary names first, then renamed in turn: a failure
        # before the renames leaves the previous checkpoint as it was.
        weights_tmp = directory / f".model.safetensors.export-{os.getpid()}"
        config_tmp = directory / f".config.json.export-{os.getpid()}"
        try:
            _write_atomic(weights_tmp, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
            _write_atomic(config_tmp, lambda tmp: tmp.write_text(json.dumps(config, indent=1)))
            _fsync_dir(directory)
            os.replace(weights_tmp, path)
            os.replace(config_tmp, config_path)
        finally:
            weights_tmp.unlink(missing_ok=True)
            config_tmp.unlink(missing_ok=True)
        _fsync_dir(directory)
        _remove_stale(path, {path.name})  # an earlier sharded save's files
    if tokenizer is not None:
        tokenizer.to_hf(directory)
    return directory

