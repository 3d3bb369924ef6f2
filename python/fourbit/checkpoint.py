"""Save and load quantized models as safetensors (never pickle).

A checkpoint is one .safetensors file, or, above `max_shard_bytes`, shards
`<stem>-00001-of-0000N-<checkpoint_id>.safetensors` beside an index `<path>.index.json`
(the Hugging Face layout; the id in the names means a save never overwrites a shard the
previous checkpoint still uses). Every file carries the same metadata:

    format          "fourbit"
    format_version  FORMAT_VERSION of format.py
    quantized       JSON {module name: {group_size, symmetric, act_order, in_features, out_features}}
    concat          JSON {module name: [out_features of each part]} for ConcatLinear layers
                    (fused projections whose parts stay apart; absent when there are none)
    int8            JSON {module name: {kind "linear", in_features, out_features, group_size,
                    bias} | {kind "embedding", num_embeddings, embedding_dim, group_size,
                    dtype, tied_to}} for Int8Linear and Int8Embedding layers (absent when
                    there are none); tied_to names the Int8Linear whose weight a tied
                    embedding reads (it stores nothing of its own), or is null
    aliases         JSON {state-dict name: stored name} for tensors shared in the model
                    (tied embeddings are stored once)
    checkpoint_id   sharded only: a random id of the save; every shard carries its index's

Int4Linear layers are stored in the canonical packing (qweight, scales, offsets); int8 layers
as their int8 qweight and scales, in the scales' own dtype (a GGUF Q8_0 head's fp16).

Saves are atomic as a whole. Each file is written under a hidden temporary name, flushed
to disk and renamed into place. The new checkpoint replaces the old in one step, the
commit: the rename of the single file; for shards, the rename of the index (written after
every shard), then the removal of a single file at `<path>`, which load would read first.
Until then the previous checkpoint is untouched and loads, and a failed save removes what
it wrote. Only after the commit are the previous checkpoint's files removed: its shards,
the other layout's file or index, temporaries of a killed save. Saves into one directory
take turns (a lock on it, where the OS has flock).

load_quantized checks every name, shape and dtype, and that all shards come from one
save, before it changes the model, so a model is never half-loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import _checks
from .format import COMPUTE_DTYPES, FORMAT_VERSION, READABLE_FORMAT_VERSIONS, check_perm
from .nn import ConcatLinear, Int4Linear, Int8Embedding, Int8Linear, _set_submodule

try:
    import fcntl
except ImportError:  # Windows: saves into one directory are not serialized
    fcntl = None

DEFAULT_MAX_SHARD_BYTES = 4 << 30


def _concat_modules(model: nn.Module) -> dict[str, list[int]]:
    return {name: m.split_sizes for name, m in model.named_modules() if isinstance(m, ConcatLinear)}


def _quantized_modules(model: nn.Module) -> dict[str, dict]:
    return {name: dict(group_size=m.group_size, symmetric=m.symmetric, act_order=m.act_order,
                       in_features=m.in_features, out_features=m.out_features)
            for name, m in model.named_modules() if isinstance(m, Int4Linear)}


def _int8_modules(model: nn.Module) -> dict[str, dict]:
    names = {id(m): name for name, m in model.named_modules()}
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            out[name] = dict(kind="linear", in_features=m.in_features, out_features=m.out_features,
                             group_size=m.group_size, bias=m.bias is not None)
        elif isinstance(m, Int8Embedding):
            if m.head is not None and id(m.head) not in names:
                raise ValueError(f"{name} is tied to an Int8Linear that is not part of the model")
            out[name] = dict(kind="embedding", num_embeddings=m.num_embeddings, embedding_dim=m.embedding_dim,
                             group_size=m.group_size, dtype=str(m.dtype).removeprefix("torch."),
                             tied_to=names[id(m.head)] if m.head is not None else None)
    return out


_DTYPES = {str(d).removeprefix("torch."): d for d in COMPUTE_DTYPES}


def _int8_swaps(int8: dict, submodule, path: Path) -> dict[str, nn.Module]:
    """The Int8Linear and Int8Embedding modules (on meta) the checkpoint's int8 metadata names,
    each checked against the module of the model it replaces."""
    swaps: dict[str, nn.Module] = {}
    for name, cfg in sorted(int8.items(), key=lambda item: item[1].get("kind") != "linear"):  # heads first
        try:
            old = submodule(name)
        except AttributeError:
            raise ValueError(f"{path} stores module {name!r} as int8, which the model does not have") from None
        try:
            if cfg["kind"] == "linear":
                if not isinstance(old, (nn.Linear, Int8Linear)) or \
                        (old.in_features, old.out_features) != (cfg["in_features"], cfg["out_features"]):
                    raise ValueError(f"Int8Linear({cfg['in_features']}, {cfg['out_features']}) but the model has {old}")
                swaps[name] = Int8Linear(cfg["in_features"], cfg["out_features"], cfg["bias"], cfg["group_size"],
                                         device="meta")
            elif cfg["kind"] == "embedding":
                shape = (cfg["num_embeddings"], cfg["embedding_dim"])
                if not isinstance(old, (nn.Embedding, Int8Embedding)) or \
                        (old.num_embeddings, old.embedding_dim) != shape:
                    raise ValueError(f"Int8Embedding{shape} but the model has {old}")
                dtype = _DTYPES[cfg["dtype"]]
                head = cfg.get("tied_to")
                if head is not None:
                    if not isinstance(swaps.get(head), Int8Linear) or swaps[head].weight.shape != shape or \
                            swaps[head].group_size != cfg["group_size"]:
                        raise ValueError(f"an embedding tied to {head!r}, which the checkpoint does not store as a "
                                         f"matching Int8Linear")
                    swaps[name] = Int8Embedding.tied(swaps[head], dtype)
                else:
                    swaps[name] = Int8Embedding(*shape, cfg["group_size"], dtype, device="meta")
            else:
                raise ValueError(f"unknown int8 kind {cfg['kind']!r}")
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path}: bad int8 metadata for {name!r}: {error!r}") from None
        except ValueError as error:
            raise ValueError(f"{path} stores {name!r} as {error}") from None
    return swaps


# -- writing files atomically -------------------------------------------------------------

def _fsync_dir(directory: Path) -> None:
    """Make the renames in directory durable (a renamed file survives a power loss)."""
    if os.name == "posix":
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) under the hidden name `.<name>.tmp-<pid>` beside path, flush it to disk and
    rename it to path: readers see the old file or the new one, never a part. On any failure
    (a full disk, KeyboardInterrupt) the temporary is removed and path is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace the text file at path in one step (see _write_atomic): a config written beside
    a checkpoint is never seen half-written."""
    path = Path(path)
    _write_atomic(path, lambda tmp: tmp.write_text(text))
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive flock on directory, so that two processes saving one checkpoint take
    turns instead of removing each other's new files as stale."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a file system without locks: save unserialized
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _stale_pattern(path: Path) -> re.Pattern:
    """Names of the files a save to path may leave behind: shards of any earlier save (with or
    without a checkpoint id), the single file and the index, and their temporaries."""
    stem, name = re.escape(path.name[: -len(".safetensors")]), re.escape(path.name)
    shard = rf"{stem}-\d{{5}}-of-\d{{5}}(?:-[0-9a-f]{{16}})?\.safetensors"
    return re.compile(rf"{shard}|{name}|{name}\.index\.json|\.(?:{shard}|{name}|{name}\.index\.json)\.tmp-\d+")


def _remove_stale(path: Path, keep: set[str]) -> None:
    """After a commit: remove every file of an earlier checkpoint at path (see _stale_pattern)
    that the new one (the names in keep) does not use."""
    pattern = _stale_pattern(path)
    for file in path.parent.iterdir():
        if file.name not in keep and pattern.fullmatch(file.name):
            file.unlink(missing_ok=True)


def _save_shards(shards: list[dict[str, torch.Tensor]], path: Path, metadata: dict[str, str]) -> list[Path]:
    """Write shards under new names, then the index, then remove a single file at path: that
    removal, or the index's rename where there was none, commits the save."""
    metadata = dict(metadata, checkpoint_id=secrets.token_hex(8))
    stem, count = path.name[: -len(".safetensors")], len(shards)
    files = [path.with_name(f"{stem}-{i:05d}-of-{count:05d}-{metadata['checkpoint_id']}.safetensors")
             for i in range(1, count + 1)]
    index = path.with_name(path.name + ".index.json")
    weight_map = {name: file.name for file, shard in zip(files, shards) for name in shard}
    written: list[Path] = []
    try:
        for file, shard in zip(files, shards):
            _write_atomic(file, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata=metadata))
            written.append(file)
        _fsync_dir(path.parent)  # every shard is durable before the index names it
        text = json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=1)
        _write_atomic(index, lambda tmp: tmp.write_text(text))
    except BaseException:
        for file in written:  # nothing names them: the previous checkpoint is as it was
            file.unlink(missing_ok=True)
        raise
    path.unlink(missing_ok=True)
    return files + [index]


def save_quantized(model: nn.Module, path: str | os.PathLike,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write model's state (Int4Linear layers in the canonical format) to safetensors,
    atomically: the previous checkpoint at path, single-file or sharded, loads until the new
    one is complete, and its files are removed after (see the module docstring).

    Args:
        model: a model, usually after quantize_.
        path: the .safetensors file to write; above max_shard_bytes, shards are written
            beside it with an index at `<path>.index.json` instead.
        max_shard_bytes: largest shard size in bytes, a positive int.
    Returns:
        The files written (shards, then the index when sharded).
    Raises:
        ValueError: a path not ending in .safetensors, a bad max_shard_bytes, or a tensor
            on the meta device. OSError from the file system (a full disk): the previous
            checkpoint is left as it was.
    """
    _checks.module("model", model)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path}")
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
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
    if concat := _concat_modules(model):
        metadata["concat"] = json.dumps(concat)
    if int8 := _int8_modules(model):
        metadata["int8"] = json.dumps(int8)

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
    with _directory_lock(path.parent):
        if len(shards) == 1:
            _write_atomic(path, lambda tmp: save_file(shards[0], str(tmp), metadata=metadata))
            written = [path]
        else:
            written = _save_shards(shards, path, metadata)
        _fsync_dir(path.parent)  # the commit is durable before the old files go
        _remove_stale(path, {file.name for file in written})
    return written


# -- loading ------------------------------------------------------------------------------

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
    if version not in [str(v) for v in READABLE_FORMAT_VERSIONS]:
        raise ValueError(f"{path} has fourbit format version {version!r}; this fourbit reads "
                         f"versions {READABLE_FORMAT_VERSIONS}")
    return (json.loads(metadata.get("quantized", "{}")), json.loads(metadata.get("aliases", "{}")),
            json.loads(metadata.get("concat", "{}")), json.loads(metadata.get("int8", "{}")))


def _read_tensors(path: Path, metadata: dict[str, str], files: dict[str, Path],
                  device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors files maps, each from its file; every shard must carry the index's metadata
    (its checkpoint_id: one save) and hold the tensors the index puts in it."""
    loaded: dict[str, torch.Tensor] = {}
    for file in sorted(set(files.values())):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                file_metadata = f.metadata() or {}
                names = [name for name in files if files[name] == file]
                missing = sorted(set(names) - set(f.keys()))
                tensors = {name: f.get_tensor(name) for name in names if name not in missing}
        except Exception as error:
            raise ValueError(f"could not read the tensors of {path}: {error}") from error
        if file != path and file_metadata != metadata:
            raise ValueError(f"{path}: shard {file.name} is not from the save its index describes "
                             f"(checkpoint_id {file_metadata.get('checkpoint_id')!r}, the index has "
                             f"{metadata.get('checkpoint_id')!r}): the checkpoint mixes two saves")
        if missing:
            raise ValueError(f"{path}: the index puts tensors {missing[:8]} in {file.name}, which does not hold them")
        loaded.update(tensors)
    return loaded


def load_quantized(model: nn.Module, path: str | os.PathLike, device=None) -> nn.Module:
    """Load a checkpoint written by save_quantized into model, in place.

    The layers the checkpoint lists as quantized are swapped for Int4Linear first, so model
    may be the float architecture built on the meta device (`with torch.device("meta"):`):
    its float weights are never materialized. Every tensor name, shape and dtype is checked
    before the model changes: integer tensors (qweight: int32 [out_features, K_padded / 8])
    must have the model's dtype; float tensors load in their stored dtype, and each
    Int4Linear's scales and offsets ([out_features, num_groups]) are each fp32, bf16 or
    fp16, and its perm (act-order layers) a permutation of its input channels.

    Args:
        model: the architecture the checkpoint was saved from (meta, CPU or CUDA).
        path: the .safetensors file, or its sharded form's base path or index.
        device: where the loaded tensors go (default: CPU).
    Raises:
        FileNotFoundError: no checkpoint at path. ValueError: an unreadable or foreign
            file, shards of two saves, or a tensor missing, unexpected, or of the wrong
            shape or dtype, each named; the model is then unchanged.
    Returns:
        model.
    """
    _checks.module("model", model)
    path = Path(path)
    device = torch.device(device or "cpu")
    metadata, files = _checkpoint_files(path)
    quantized, aliases, concat, int8 = _read_metadata(metadata, path)

    # The modules to swap in, built on meta: they describe the expected names and shapes.
    # ConcatLinear layers first (their float parts), then the Int4Linear ones, which may be
    # parts of those: looked up in the staged modules, never in the model, which stays as it is.
    staged = {}
    for name, sizes in concat.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path} splits module {name!r}, which the model does not have") from None
        if not isinstance(old, (nn.Linear, ConcatLinear)) or old.out_features != sum(sizes) or \
                not all(isinstance(r, int) and r > 0 for r in sizes):
            raise ValueError(f"{path} splits {name!r} into parts of {sizes} rows but the model has {old}")
        staged[name] = ConcatLinear([nn.Linear(old.in_features, rows, bias=getattr(old, "bias", None) is not None,
                                               device="meta") for rows in sizes])

    def submodule(name: str) -> nn.Module:
        for prefix, module in staged.items():
            if name.startswith(prefix + "."):
                return module.get_submodule(name[len(prefix) + 1:])
        return model.get_submodule(name)

    swaps = {}
    for name, cfg in quantized.items():
        try:
            old = submodule(name)
        except AttributeError:
            raise ValueError(f"{path} quantizes module {name!r}, which the model does not have") from None
        if not isinstance(old, (nn.Linear, Int4Linear)) or \
                (old.in_features, old.out_features) != (cfg["in_features"], cfg["out_features"]):
            raise ValueError(f"{path} stores {name!r} as Int4Linear({cfg['in_features']}, "
                             f"{cfg['out_features']}) but the model has {old}")
        swaps[name] = Int4Linear(cfg["in_features"], cfg["out_features"], old.bias is not None,
                                 cfg["group_size"], cfg["symmetric"], device="meta",
                                 act_order=cfg.get("act_order", False))
    swaps.update(_int8_swaps(int8, submodule, path))
    for name, module in swaps.items():  # parts of a staged ConcatLinear go into it now
        prefix = next((p for p in staged if name.startswith(p + ".")), None)
        if prefix is not None:
            parent, _, attr = name[len(prefix) + 1:].rpartition(".")
            setattr(staged[prefix].get_submodule(parent), attr, module)
    replaced = {**staged, **{n: m for n, m in swaps.items() if not any(n.startswith(p + ".") for p in staged)}}
    expected = {n: t for n, t in model.state_dict().items()
                if not any(n.startswith(s + ".") for s in replaced)}
    for name, module in replaced.items():
        expected.update({f"{name}.{k}": t for k, t in module.state_dict().items()})

    stored = set(files) | set(aliases)
    missing, extra = sorted(set(expected) - stored), sorted(stored - set(expected))
    if missing or extra:
        raise ValueError(f"{path} does not match the model: missing tensors {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected tensors {extra[:8]}"
                         f"{' ...' if len(extra) > 8 else ''}")

    loaded = _read_tensors(path, metadata, files, device)
    for name, target in aliases.items():
        if target not in loaded:
            raise ValueError(f"{path}: alias {name!r} points to {target!r}, which is not stored")
        loaded[name] = loaded[target]
    for name, t in loaded.items():
        # Shapes must match, integer dtypes too; float tensors load in their stored dtype
        # (assign=True below).
        want = expected[name]
        dtype_ok = t.dtype.is_floating_point if want.dtype.is_floating_point else t.dtype == want.dtype
        if tuple(t.shape) != tuple(want.shape) or not dtype_ok:
            raise ValueError(f"{path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, the model "
                             f"expects {want.dtype} {tuple(want.shape)}")
    for name in swaps:  # the int4 and int8 formats' rules for the other tensors of a layer
        for part in ("scales", "offsets") if isinstance(swaps[name], Int4Linear) else ("scales",):
            if f"{name}.{part}" not in loaded:  # a tied Int8Embedding stores nothing
                continue
            t = loaded[f"{name}.{part}"]
            if t.dtype not in COMPUTE_DTYPES:
                raise ValueError(f"{path}: tensor '{name}.{part}' is {t.dtype}; {part} are one "
                                 f"of {COMPUTE_DTYPES}")
        if f"{name}.perm" in loaded:
            try:
                loaded[f"{name}.perm"] = check_perm(loaded[f"{name}.perm"], swaps[name].in_features)
            except ValueError as error:
                raise ValueError(f"{path}: tensor '{name}.perm': {error}") from None

    # Everything checked: now change the model.
    for name, module in replaced.items():
        if isinstance(module, (Int4Linear, Int8Linear)):
            module.backend = getattr(model.get_submodule(name), "backend", "auto")
        _set_submodule(model, name, module)
    model.load_state_dict(loaded, strict=True, assign=True)
    return model
