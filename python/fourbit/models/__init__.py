"""Model definitions (llama.py) and checkpoint readers (gguf.py, hf.py, loader.py)."""

from .llama import Llama, LlamaConfig, PagedContext
from .loader import load_model, load_tokenizer, resolve_source, save_model

__all__ = ["Llama", "LlamaConfig", "PagedContext", "load_model", "load_tokenizer", "resolve_source", "save_model"]
