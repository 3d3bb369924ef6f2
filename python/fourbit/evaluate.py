"""How good and how fast a model is: perplexity over fixed-size windows of the default
evaluation text, and decode tokens per second."""

from __future__ import annotations

import math
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
        token_ids: list[int] or int64 tensor [T].
        max_windows: score only the first this many windows.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.int64)
    count = len(ids) // window if max_windows is None else min(len(ids) // window, max_windows)
    if count == 0:
        raise ValueError(f"the text has {len(ids)} tokens: fewer than one window of {window}")
    windows = ids[: count * window].view(count, window)
    total, n = 0.0, 0
    for start in tqdm(range(0, count, batch_size), desc="perplexity", unit="batch", disable=not progress or None):
        chunk = windows[start:start + batch_size].to(model.device)
        logits = model(chunk)[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        n += chunk[:, 1:].numel()
    return math.exp(total / n)


def decode_tokens_per_second(model, prompt: list[int], new_tokens: int = 64, repeats: int = 3,
                             batch: int = 1) -> float:
    """Decode rate of `batch` copies of prompt, in tokens per second per sequence: (time for
    1 + new_tokens tokens - time for 1) / new_tokens, the prefill cancelling out; median over
    repeats, after a warm-up. No stop token: every run decodes the same number of steps."""
    def run(n):
        start = time.perf_counter()
        generate(model, [prompt] * batch, n)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    run(4)
    return statistics.median(new_tokens / (run(1 + new_tokens) - run(1)) for _ in range(repeats))
