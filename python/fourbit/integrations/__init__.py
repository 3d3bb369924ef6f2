"""Integrations of fourbit into other frameworks, each imported on its own (they import the
framework): fourbit.integrations.hf, the Hugging Face transformers quantizer, and
fourbit.integrations.vllm, the vLLM quantization method (registered by its entry point)."""
