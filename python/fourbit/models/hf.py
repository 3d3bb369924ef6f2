"""Read Hugging Face model directories: config.json and safetensors (sharded or not)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from .llama import LlamaConfig


def is_fourbit_checkpoint(directory: Path) -> bool:
    """Whether the directory's safetensors were written by fourbit.save_quantized."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return False
    with safe_open(str(files[0]), framework="pt") as f:
        return (f.metadata() or {}).get("format") == "fourbit"


def read_config(directory: Path) -> LlamaConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory} has no config.json: not a Hugging Face model directory")
    return LlamaConfig.from_hf(path)  # errors name the file


class HFCheckpoint:
    """A Hugging Face directory as a LlamaConfig and the tensors of models/llama.py's roles,
    each read when asked for from the memory-mapped files."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.config = read_config(self.directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.directory / file for name, file in weight_map.items()}
        else:
            self._files = {}
            for file in sorted(self.directory.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    self._files.update({name: file for name in f.keys()})
        if not self._files:
            raise ValueError(f"{self.directory} holds no safetensors weights")
        self._open = {}

    def _get(self, name: str):
        if name not in self._files:
            raise ValueError(f"{self.directory} has no tensor {name!r}")
        file = self._files[name]
        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt")
        return self._open[file].get_tensor(name)

    _LAYER_NAMES = {"attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight",
                    **{p: f"self_attn.{p}_proj.weight" for p in "qkvo"},
                    **{p: f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
                    **{f"{p}_bias": f"self_attn.{p}_proj.bias" for p in "qkv"}}
    _MODEL_NAMES = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}

    def tensor_name(self, role: str, layer: int | None = None) -> str:
        """The file's name of the tensor of `role` in layer `layer` (None: the model's ends)."""
        return self._MODEL_NAMES[role] if layer is None else f"model.layers.{layer}.{self._LAYER_NAMES[role]}"

    def model_tensor(self, role: str):
        """The tensor as stored (any dtype safetensors holds: the loader checks it)."""
        return self._get(self.tensor_name(role))

    def layer_tensor(self, i: int, role: str):
        return self._get(self.tensor_name(role, i))
