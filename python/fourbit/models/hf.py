"""Read Hugging Face model directories: config.json and safetensors (sharded or not), float
or int4 (GPTQ, AWQ, compressed-tensors, AutoRound: the config's quantization_config says which,
and formats/ converts each quantized linear layer into an Int4Weight exactly)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from . import formats
from .llama import LlamaConfig

LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


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


class HFCheckpoint(formats.Tensors):
    """A Hugging Face directory as a LlamaConfig and the tensors of models/llama.py's roles,
    each read when asked for from the memory-mapped files. In an int4 checkpoint a quantized
    linear layer's role reads as an Int4Weight, converted when asked for (one layer at a time)."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.config = read_config(self.directory)
        config_path = self.directory / "config.json"
        self.format = formats.detect(json.loads(config_path.read_text(encoding="utf-8")).get("quantization_config"),
                                     str(config_path))
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

    def has(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> torch.Tensor:
        if name not in self._files:
            prefix = name.rpartition(".")[0] + "."
            others = sorted(n for n in self._files if n.startswith(prefix))
            hint = f" (it has {', '.join(others)}" + (f"; the {self.format.description} quantization_config "
                                                      f"decides which a layer has)" if self.format else ")")
            raise ValueError(f"{self.directory} has no tensor {name!r}" + (hint if others else ""))
        file = self._files[name]
        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt")
        return self._open[file].get_tensor(name)

    _LAYER_NAMES = {"attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight",
                    **{p: f"self_attn.{p}_proj.weight" for p in "qkvo"},
                    **{p: f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
                    **{f"{p}_bias": f"self_attn.{p}_proj.bias" for p in "qkv"}}
    _MODEL_NAMES = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}

    def _float_name(self, role: str, layer: int | None) -> str:
        return self._MODEL_NAMES[role] if layer is None else f"model.layers.{layer}.{self._LAYER_NAMES[role]}"

    def _quantized_layer(self, role: str, layer: int | None) -> str | None:
        """The module name of a linear role the checkpoint quantizes, else None."""
        if self.format is None or (role not in LINEAR_ROLES and role != "lm_head"):
            return None
        module = self._float_name(role, layer).removesuffix(".weight")
        return module if self.format.weight_name(module) is not None else None

    def tensor_name(self, role: str, layer: int | None = None) -> str:
        """The file's name of the tensor of `role` in layer `layer` (None: the model's ends):
        for a quantized layer, its main packed tensor."""
        module = self._quantized_layer(role, layer)
        return self._float_name(role, layer) if module is None else self.format.weight_name(module)

    def _shape(self, role: str) -> tuple[int, int]:
        """(N, K) of a linear role's weight."""
        c = self.config
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        return {"q": (q, c.hidden_size), "k": (kv, c.hidden_size), "v": (kv, c.hidden_size),
                "o": (c.hidden_size, q), "gate": (c.intermediate_size, c.hidden_size),
                "up": (c.intermediate_size, c.hidden_size), "down": (c.hidden_size, c.intermediate_size),
                "lm_head": (c.vocab_size, c.hidden_size)}[role]

    def _read(self, role: str, layer: int | None):
        module = self._quantized_layer(role, layer)
        if module is None:
            return self.get(self._float_name(role, layer))
        weight = self.format.read(module, self._shape(role), self)
        bias = f"{module}.bias"
        if self.has(bias) and not (role in ("q", "k", "v") and self.config.attention_bias):
            # Old GPTQ writers store a bias for every layer; one this model has no place for
            # must be zero, or the checkpoint means another model.
            if bool(self.get(bias).ne(0).any()):
                raise ValueError(f"checkpoint tensor {bias!r} is not zero, but this model's {role} projection "
                                 f"has no bias")
        return weight

    def model_tensor(self, role: str):
        """The tensor as stored (any dtype safetensors holds: the loader checks it), or the
        Int4Weight of a quantized lm_head."""
        return self._read(role, None)

    def layer_tensor(self, i: int, role: str):
        return self._read(role, i)
