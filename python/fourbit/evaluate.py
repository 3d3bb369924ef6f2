"""How good and how fast a model is: perplexity over fixed-size windows of the default
evaluation text, and decode tokens per second."""

from __future__ import annotations

import gc
import math
import numbers
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .generate import generate


def default_text() -> str:
    """The Python documentation topics that ship with CPython (pydoc_data.topics), joined in
    sorted key order: about 465k characters of English prose and code, present wherever
    Python is, so every machine scores the same text."""
    from pydoc_data.topics import topics
    return "\n".join(topics[key] for key in sorted(topics))


@torch.inference_mode()
def perplexity(model, token_ids, window: int = 512, max_windows: int | None = None, batch_size: int = 4,
               progress: bool = True) -> float:
    """exp(mean negative log-likelihood) of token_ids, scored in consecutive, non-overlapping
    windows of `window` tokens (each window predicts its tokens 1 .. window-1 from the ones
    before it, within the window). A trailing partial window is dropped.

    Args:
        model: a Llama (its plain causal forward is used).
        token_ids: list[int] or 1-D integer tensor [T], ids below the model's vocab_size.
        window: tokens per window, at least 2.
        max_windows: score only the first this many windows (None: all; else at least 1).
        batch_size: windows per forward, at least 1.
    Raises:
        TypeError: token_ids not integers, or a window, max_windows or batch_size that is not
            an int.
        ValueError: token_ids not 1-D or outside the vocabulary, a window below 2, a
            max_windows or batch_size below 1, or fewer tokens than one window; each names
            the argument.
    """
    for name, value, low in (("window", window, 2), ("max_windows", max_windows, 1), ("batch_size", batch_size, 1)):
        if value is None and name == "max_windows":
            continue
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    try:
        ids = torch.as_tensor(token_ids)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"token_ids must be a list of token ids (ints) or a 1-D integer tensor: {error}") from None
    if ids.dim() != 1:
        raise ValueError(f"token_ids must be one sequence (1-D), got shape {tuple(ids.shape)}")
    if len(ids) and (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool):
        raise TypeError(f"token_ids must be integer token ids, got dtype {ids.dtype}")
    ids = ids.to(torch.int64)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if len(ids):
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or vocab_size is not None and high >= vocab_size:
            raise ValueError(f"token_ids holds {low if low < 0 else high}, outside the model's vocabulary "
                             f"(ids 0 .. {vocab_size - 1 if vocab_size is not None else 'vocab_size - 1'})")
    count = len(ids) // window if max_windows is None else min(len(ids) // window, max_windows)
    if count == 0:
        raise ValueError(f"token_ids has {len(ids)} tokens: fewer than one window of {window}")
    windows = ids[: count * window].view(count, int(window))
    total, n = 0.0, 0
    for start in tqdm(range(0, count, batch_size), desc="perplexity", unit="batch", disable=not progress or None):
        chunk = windows[start:start + batch_size].to(model.device)
        logits = model(chunk)[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        n += chunk[:, 1:].numel()
    return math.exp(total / n)


def decode_tokens_per_second(model, prompt: list[int], new_tokens: int = 64, repeats: int = 3,
                             batch: int = 1, warmup: bool = True, **generate_kwargs) -> float:
    """Decode rate of `batch` copies of prompt, in tokens per second per sequence: (time for
    1 + new_tokens tokens - time for 1) / new_tokens, the prefill cancelling out; median over
    repeats, after a warm-up of the timed length (which also compiles, with generate_kwargs
    compile=True: the cache of a longer call may have more pages, which is another graph;
    warmup=False skips it where the caller has warmed up). No stop token: every run decodes
    the same number of steps. generate_kwargs go to generate."""
    def run(n):
        gc.collect()  # as timeit does: no pause of the collector (0.3 s after a compile) inside a timing
        start = time.perf_counter()
        generate(model, [prompt] * batch, n, **generate_kwargs)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    if warmup:
        run(1 + new_tokens)
    return statistics.median(new_tokens / (run(1 + new_tokens) - run(1)) for _ in range(repeats))
