"""Save and load quantized models as safetensors (never pickle).

A checkpoint is one .safetensors file, or, above `max_shard_bytes`, shards
`<stem>-00001-of-0000N.safetensors` beside an index `<path>.index.json` (the Hugging Face
layout). Every file carries the same metadata:

    format          "fourbit"
    format_version  FORMAT_VERSION of format.py
    quantized       JSON {module name: {group_size, symmetric, in_features, out_features}}
    aliases         JSON {state-dict name: stored name} for tensors shared in the model
                    (tied embeddings are stored once)

Int4Linear layers are stored in the canonical packing (qweight, scales, offsets).
Files are written to a temporary name and renamed, so a checkpoint is never half-written;
load_quantized checks every name, shape and dtype before it changes the model, so a
model is never half-loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .format import FORMAT_VERSION
from .nn import Int4Linear, _set_submodule

DEFAULT_MAX_SHARD_BYTES = 4 << 30


def _quantized_modules(model: nn.Module) -> dict[str, dict]:
    return {name: dict(group_size=m.group_size, symmetric=m.symmetric,
                       in_features=m.in_features, out_features=m.out_features)
            for name, m in model.named_modules() if isinstance(m, Int4Linear)}


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_quantized(model: nn.Module, path: str | os.PathLike,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write model's state (Int4Linear layers in the canonical format) to safetensors.

    Args:
        model: a model, usually after quantize_.
        path: the .safetensors file to write; above max_shard_bytes, shards are written
            beside it with an index at `<path>.index.json` instead.
        max_shard_bytes: largest shard size in bytes.
    Returns:
        The files written (shards, then the index when sharded).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path}")
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            raise ValueError(f"cannot save {name}: it is on the meta device and holds no data")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:  # shared tensor (tied weights): store once
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    metadata = {"format": "fourbit", "format_version": str(FORMAT_VERSION),
                "quantized": json.dumps(_quantized_modules(model)), "aliases": json.dumps(aliases)}

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        _atomic_save(shards[0], path, metadata)
        return [path]
    stem, written, weight_map = path.name[: -len(".safetensors")], [], {}
    for i, shard in enumerate(shards, 1):
        shard_path = path.with_name(f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors")
        _atomic_save(shard, shard_path, metadata)
        weight_map.update({name: shard_path.name for name in shard})
        written.append(shard_path)
    index = path.with_name(path.name + ".index.json")
    tmp = index.with_name(f".{index.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=1))
    os.replace(tmp, index)
    return written + [index]


def _checkpoint_files(path: Path) -> tuple[dict[str, str], dict[str, Path]]:
    """(metadata, {tensor name: file}) of a single-file or sharded checkpoint."""
    index = path if path.name.endswith(".index.json") else path.with_name(path.name + ".index.json")
    try:
        if path.is_file() and not path.name.endswith(".index.json"):
            with safe_open(str(path), framework="pt") as f:
                return f.metadata() or {}, {name: path for name in f.keys()}
        if index.is_file():
            data = json.loads(index.read_text())
            return data.get("metadata", {}), {n: index.parent / f for n, f in data["weight_map"].items()}
    except Exception as error:  # safetensors reports corrupt headers with its own error type
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {error}") from error
    raise FileNotFoundError(f"no checkpoint at {path} (nor an index at {index})")


def _read_metadata(metadata: dict[str, str], path: Path) -> tuple[dict, dict]:
    if metadata.get("format") != "fourbit":
        raise ValueError(f"{path} is not a fourbit checkpoint (metadata format={metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ValueError(f"{path} has fourbit format version {version!r}; this fourbit reads "
                         f"version {FORMAT_VERSION}")
    return json.loads(metadata.get("quantized", "{}")), json.loads(metadata.get("aliases", "{}"))


def load_quantized(model: nn.Module, path: str | os.PathLike, device=None) -> nn.Module:
    """Load a checkpoint written by save_quantized into model, in place.

    The layers the checkpoint lists as quantized are swapped for Int4Linear first, so model
    may be the float architecture built on the meta device (`with torch.device("meta"):`):
    its float weights are never materialized. Every tensor name, shape and dtype is checked
    before the model changes.

    Args:
        model: the architecture the checkpoint was saved from (meta, CPU or CUDA).
        path: the .safetensors file, or its sharded form's base path or index.
        device: where the loaded tensors go (default: CPU).
    Returns:
        model.
    """
    path = Path(path)
    device = torch.device(device or "cpu")
    metadata, files = _checkpoint_files(path)
    quantized, aliases = _read_metadata(metadata, path)

    # The modules to swap in, built on meta: they describe the expected names and shapes.
    swaps = {}
    for name, cfg in quantized.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path} quantizes module {name!r}, which the model does not have") from None
        if not isinstance(old, (nn.Linear, Int4Linear)) or \
                (old.in_features, old.out_features) != (cfg["in_features"], cfg["out_features"]):
            raise ValueError(f"{path} stores {name!r} as Int4Linear({cfg['in_features']}, "
                             f"{cfg['out_features']}) but the model has {old}")
        swaps[name] = Int4Linear(cfg["in_features"], cfg["out_features"], old.bias is not None,
                                 cfg["group_size"], cfg["symmetric"], device="meta")
    expected = {n: t for n, t in model.state_dict().items()
                if not any(n.startswith(s + ".") for s in swaps)}
    for name, module in swaps.items():
        expected.update({f"{name}.{k}": t for k, t in module.state_dict().items()})

    stored = set(files) | set(aliases)
    missing, extra = sorted(set(expected) - stored), sorted(stored - set(expected))
    if missing or extra:
        raise ValueError(f"{path} does not match the model: missing tensors {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected tensors {extra[:8]}"
                         f"{' ...' if len(extra) > 8 else ''}")

    loaded: dict[str, torch.Tensor] = {}
    try:
        for file in sorted(set(files.values())):
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for name in f.keys():
                    if files.get(name) == file:
                        loaded[name] = f.get_tensor(name)
    except Exception as error:
        raise ValueError(f"could not read the tensors of {path}: {error}") from error
    for name, target in aliases.items():
        if target not in loaded:
            raise ValueError(f"{path}: alias {name!r} points to {target!r}, which is not stored")
        loaded[name] = loaded[target]
    for name, t in loaded.items():
        # Shapes must match; float tensors load in their stored dtype (assign=True below).
        want = expected[name]
        if tuple(t.shape) != tuple(want.shape) or t.dtype.is_floating_point != want.dtype.is_floating_point:
            raise ValueError(f"{path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, the model "
                             f"expects {want.dtype} {tuple(want.shape)}")

    # Everything checked: now change the model.
    for name, module in swaps.items():
        module.backend = getattr(model.get_submodule(name), "backend", "auto")
        _set_submodule(model, name, module)
    model.load_state_dict(loaded, strict=True, assign=True)
    return model
