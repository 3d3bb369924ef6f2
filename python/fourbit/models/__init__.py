"""Model definitions and checkpoint loaders (Llama-family, GGUF, Hugging Face)."""
