"""Calibrated quantization, one decoder layer at a time (as GPTQ runs it).

The calibration batch goes through the model up to its first decoder layer (the inputs of
that layer are caught and the forward stopped); then, for each layer in turn:

1. (method "awq") activation-aware scales are searched on the layer's float inputs and
   folded into the layer's norms and linears (awq.py);
2. the layer runs on the calibration inputs with hooks on its target linears, which sum
   each one's Hessian 2 X^T X (method "gptq");
3. its target linears are quantized (GPTQ from those Hessians, or round to nearest) and
   replaced by the caller's int4 layers;
4. the quantized layer runs again and its outputs become the next layer's inputs, so each
   layer is calibrated on what the quantized layers before it actually produce.

Only one layer's inputs and outputs (tokens x hidden) are held at a time. The decoder
layers are the children of the model's nn.ModuleList that holds the target linears; target
linears outside every layer (none by default: lm_head is skipped) are calibrated at the end
by one more forward of the whole, already quantized, model.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import awq as awq_
from .gptq import Hessian, gptq_quantize, rtn_quantize

CALIBRATION_SEQ_LEN = 512
CALIBRATION_SEQS = 128
BATCH_SIZE = 8  # calibration sequences per forward


def default_calibration_text(chars: int = 600_000) -> str:
    """The docstrings of CPython's standard library (modules, classes and functions, read from
    the source files without importing them, files in sorted order), up to about `chars`
    characters: English prose and code present wherever Python is, and not the text
    fourbit.evaluate scores perplexity on (pydoc_data.topics, the language reference)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages", "pydoc_data"}
    pieces, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    pieces.append(doc)
                    total += len(doc) + 2
        if total >= chars:
            break
    return "\n\n".join(pieces)


def calibration_ids(calibration, tokenizer=None, vocab_size: int | None = None,
                    seq_len: int = CALIBRATION_SEQ_LEN, num_seqs: int = CALIBRATION_SEQS) -> torch.Tensor:
    """The calibration batch as token ids int64 [S, T].

    Args:
        calibration: an integer tensor [S, T] of token ids (used as it is), or text: a str or a
            list of str, encoded with tokenizer (each text's ids back to back) and cut into
            up to num_seqs sequences of seq_len tokens (one shorter sequence if there are fewer).
        tokenizer: for text, any object with encode(text) -> list[int] (fourbit.load_tokenizer's).
        vocab_size: if given, every id must be below it.
    Raises:
        TypeError: calibration of another type, or text without a tokenizer.
        ValueError: an empty batch, ids not [S, T], negative or past the vocabulary.
    """
    if isinstance(calibration, str):
        calibration = [calibration]
    if isinstance(calibration, Sequence) and not isinstance(calibration, torch.Tensor):
        if not calibration or not all(isinstance(t, str) for t in calibration):
            raise TypeError("calibration text must be a str or a non-empty list of str")
        if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
            raise TypeError("calibration text needs a tokenizer (an object with encode(text) -> list[int]): "
                            "pass tokenizer=, e.g. fourbit.load_tokenizer(source)")
        ids = [i for text in calibration for i in tokenizer.encode(text)]
        if not ids:
            raise ValueError("the calibration text encodes to no tokens")
        count = min(num_seqs, max(len(ids) // seq_len, 1))
        length = min(seq_len, len(ids))
        calibration = torch.tensor(ids[: count * length], dtype=torch.int64).view(count, length)
    if not isinstance(calibration, torch.Tensor):
        raise TypeError(f"calibration must be token ids (an integer tensor [S, T]) or text (str or list of str), "
                        f"got {type(calibration).__name__}")
    if calibration.dtype.is_floating_point or calibration.dtype.is_complex or calibration.dtype == torch.bool:
        raise TypeError(f"calibration token ids must be integers, got {calibration.dtype}")
    if calibration.dim() != 2 or 0 in calibration.shape:
        raise ValueError(f"calibration token ids must be a non-empty [S, T] batch, got shape "
                         f"{tuple(calibration.shape)}")
    low, high = int(calibration.min()), int(calibration.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise ValueError(f"calibration holds token id {low if low < 0 else high}, outside the model's vocabulary"
                         + (f" (0 .. {vocab_size - 1})" if vocab_size is not None else ""))
    return calibration.to(torch.int64)


class _Caught(Exception):
    pass


def _decoder_layers(model: nn.Module, targets: list[str]) -> tuple[str, nn.ModuleList] | None:
    """(name, list) of the nn.ModuleList whose children hold the most target linears."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            prefix = f"{name}." if name else ""
            count = sum(t.startswith(prefix) for t in targets)
            if count > best_count:
                best, best_count = (name, module), count
    return best


def _catch_inputs(model: nn.Module, first: nn.Module, ids: torch.Tensor, device) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first decoder layer is called with, one entry per calibration batch."""
    caught = []

    def hook(module, args, kwargs):
        caught.append((args, kwargs))
        raise _Caught

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], BATCH_SIZE):
            try:
                model(ids[start:start + BATCH_SIZE].to(device))
            except _Caught:
                pass
    finally:
        handle.remove()
    if len(caught) != -(-ids.shape[0] // BATCH_SIZE):
        raise RuntimeError("calibration: the model's forward did not reach its first decoder layer")
    return caught


def _run(layer: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    outputs = []
    for args, kwargs in inputs:
        out = layer(*args, **kwargs)
        outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outputs


def _hessians(root: nn.Module, names: list[str], run: Callable[[], object]) -> dict[str, Hessian]:
    """Each named linear's Hessian over the inputs it sees while run() runs."""
    hessians, handles = {}, []
    for name in names:
        linear = root.get_submodule(name)
        hessians[name] = h = Hessian(linear.in_features, linear.weight.device)
        handles.append(linear.register_forward_pre_hook(lambda m, args, h=h: h.add(args[0])))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def _quantize_linears(root: nn.Module, prefix: str, names: list[str], config, hessians: dict | None,
                      replace: Callable[[str, nn.Linear, object], None]) -> None:
    for name in names:
        linear = root.get_submodule(name)
        w = linear.weight
        if hessians is not None:
            weight = gptq_quantize(w, hessians[name].value(), config.group_size, config.symmetric,
                                   config.act_order, config.percdamp, dtype=w.dtype,
                                   grid_search=config.grid_search)
        else:
            weight = rtn_quantize(w, config.group_size, config.symmetric, dtype=w.dtype)
        replace(prefix + name, linear, weight)


@torch.no_grad()
def quantize_calibrated(model: nn.Module, config, targets: list[str], ids: torch.Tensor,
                        replace: Callable[[str, nn.Linear, object], None], progress: bool | None = None) -> None:
    """Quantize model's target linears (qualified names) by config.method ("gptq" or "awq")
    on calibration ids [S, T], layer by layer; replace(name, linear, Int4Weight) puts each
    quantized layer in place (nn.quantize_ makes the Int4Linear)."""
    device = next(iter(model.parameters())).device
    use_gptq = config.method == "gptq" or (config.method == "awq" and config.awq_rounding == "gptq")
    found = _decoder_layers(model, targets)
    done: set[str] = set()
    if found is not None:
        list_name, layers = found
        inputs = _catch_inputs(model, layers[0], ids, device)
        bar = tqdm(range(len(layers)), desc=f"quantize_ ({config.method})", unit="layer",
                   disable=not progress if progress is not None else None)
        for i in bar:
            layer = layers[i]
            prefix = f"{list_name}.{i}." if list_name else f"{i}."
            names = [t[len(prefix):] for t in targets if t.startswith(prefix)]
            if config.method == "awq":
                awq_.scale_layer(layer, inputs, config)
            hessians = None
            if use_gptq and names:
                hessians = _hessians(layer, names, lambda layer=layer, inputs=inputs: _run(layer, inputs))
            _quantize_linears(layer, prefix, names, config, hessians, replace)
            done.update(prefix + n for n in names)
            if i + 1 < len(layers):
                outputs = _run(layer, inputs)
                inputs = [((out, *args[1:]), kwargs) for out, (args, kwargs) in zip(outputs, inputs)]
            del hessians
        del inputs
    rest = [t for t in targets if t not in done]
    if rest:  # linears outside the decoder layers: one forward of the (quantized) model
        def run_model():
            for start in range(0, ids.shape[0], BATCH_SIZE):
                model(ids[start:start + BATCH_SIZE].to(device))
        hessians = _hessians(model, rest, run_model) if use_gptq else None
        _quantize_linears(model, "", rest, config, hessians, replace)

