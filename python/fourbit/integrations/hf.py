"""fourbit as a Hugging Face transformers quantizer: quant_method "fourbit".

Importing this module registers FourbitConfig and FourbitHfQuantizer with transformers
(register_quantization_config / register_quantizer; importing or registering again is a
no-op). Usage:

    from transformers import AutoModelForCausalLM
    from fourbit.integrations.hf import FourbitConfig
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=FourbitConfig(group_size=128))
    model.save_pretrained(out)  # config.json quantization_config {"quant_method": "fourbit", ...}
    model = AutoModelForCausalLM.from_pretrained(out)  # int4 again (import this module first)

Loading with a FourbitConfig quantizes while the weights stream in: transformers builds the
model on the meta device, the quantizer fixes which layers become int4 before any weight is
read, and each such weight, once read onto the device it is bound for, is quantized by
fourbit's RTN (quantize_weight, the one load_model and quantize_ use) and its layer replaced
by an Int4Linear; the float model never exists there. (A layer stays a meta nn.Linear until
its weight arrives: transformers routes a checkpoint tensor only to a name the meta model has.)
Selected: every exact nn.Linear and transformers' Conv1D (GPT-2's transposed linear, whose
weight is stored [in, out]) outside modules_to_not_convert, matched as transformers matches it
(a module path from the root such as "model.layers.1.self_attn", a regex, or a name suffix
such as "mlp.down_proj"; default ["lm_head"]), and outside the model's _keep_in_fp32_modules.
A layer whose weight is tied to another tensor (a tied lm_head) stays float. Biases stay
float, frozen like Int4Linear's own. A weight int4 cannot hold (NaN, inf) fails the load:
transformers' load report names the tensor and quantize_weight's error.

save_pretrained writes the Int4Linear buffers as they are (canonical qweight, scales,
offsets, and perm where a layer has one) with the config above; from_pretrained on that
directory builds empty Int4Linear layers for the layers the checkpoint stores as int4 and
loads the buffers bit-exactly, in the dtypes they were saved in. model.dequantize() turns
the Int4Linear layers back into nn.Linear. generate, torch.compile (fullgraph) and adapters
trained beside the frozen Int4Linear layers work (int4_mm is differentiable in x). Weights
are quantized in the dtype from_pretrained loads them in; scales and offsets take it.

Tested with transformers 5.24.0 (its 5.x loading API: param_needs_quantization and a
quantize op, ConversionOps, run on each weight as it is materialized).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers.modeling_utils import PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..format import FORMAT_VERSION, READABLE_FORMAT_VERSIONS
from ..nn import Int4Linear, _set_submodule
from ..quantize import Int4WeightOnlyConfig, quantize_weight

QUANT_METHOD = "fourbit"
TESTED_TRANSFORMERS_VERSION = "5.24.0"

try:  # the 5.x loading API (weights converted by ops as they load)
    from transformers.core_model_loading import ConversionOps
except ImportError as error:
    raise ImportError(f"fourbit.integrations.hf needs transformers 5 (tested with {TESTED_TRANSFORMERS_VERSION}), "
                      f"found {transformers.__version__}") from error


class FourbitConfig(QuantizationConfigMixin):
    """How transformers' from_pretrained quantizes a model with fourbit (quant_method "fourbit").

    Args:
        group_size: 32, 64, 128, 256, or -1 (one group per output row).
        symmetric: offsets fixed at -8 * scale.
        modules_to_not_convert: module patterns that stay float, as transformers matches them
            (a module path prefix, a regex, or a name suffix); None means ["lm_head"].
        backend: "auto" or a backend name of fourbit.ops, set on every Int4Linear made.
        format_version: the fourbit format version of a saved checkpoint (format.py).
        quant_method: "fourbit" (present in saved configs).
    Raises:
        ValueError, TypeError: an impossible value, an unknown key or another quant_method, named.
    """

    def __init__(self, group_size: int = 128, symmetric: bool = False,
                 modules_to_not_convert: Iterable[str] | None = None, backend: str = "auto",
                 format_version: int = FORMAT_VERSION, quant_method: str = QUANT_METHOD, **unknown):
        if unknown:
            raise TypeError(f"unknown FourbitConfig option(s) {sorted(unknown)}; the options are group_size, "
                            "symmetric, modules_to_not_convert, backend, format_version, quant_method")
        if quant_method != QUANT_METHOD:
            raise ValueError(f"FourbitConfig is quant_method {QUANT_METHOD!r}, got {quant_method!r}")
        if format_version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(f"fourbit format version {format_version!r} is not one this fourbit reads "
                             f"({READABLE_FORMAT_VERSIONS}); upgrade fourbit")
        if modules_to_not_convert is None:
            modules_to_not_convert = ["lm_head"]
        elif isinstance(modules_to_not_convert, str):
            modules_to_not_convert = [modules_to_not_convert]
        modules_to_not_convert = list(modules_to_not_convert)
        if not all(isinstance(p, str) for p in modules_to_not_convert):
            raise TypeError(f"modules_to_not_convert must be module patterns (str), got {modules_to_not_convert!r}")
        Int4WeightOnlyConfig(group_size=group_size, symmetric=symmetric, backend=backend)  # checks the values
        self.quant_method = quant_method
        self.group_size, self.symmetric, self.backend = group_size, symmetric, backend
        self.modules_to_not_convert = modules_to_not_convert
        self.format_version = format_version


class FourbitQuantize(ConversionOps):
    """The quantize op transformers runs on each checkpoint tensor the quantizer selects, once
    it is on its device: the weight becomes an Int4Linear in place of its layer."""

    def __init__(self, hf_quantizer: FourbitHfQuantizer):
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(self, input_dict: dict, model: nn.Module | None = None, missing_keys: set | None = None,
                **kwargs) -> dict:
        left = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module_name, _, tensor_name = name.rpartition(".")
            if tensor_name != "weight" or module_name not in self.hf_quantizer.targets:
                left[name] = value  # transformers sets what is left as usual
                continue
            self.hf_quantizer.quantize_layer(model, module_name, value)
            if missing_keys is not None:
                missing_keys.discard(name)
        return left


def _flag_initialized(module: nn.Module) -> None:
    """Mark module and its own tensors as loaded, so transformers' weight init skips them."""
    module._is_hf_initialized = True
    for tensor in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)):
        tensor._is_hf_initialized = True


class FourbitHfQuantizer(HfQuantizer):
    """transformers' quantizer for FourbitConfig (see the module docstring).

    Attributes:
        targets: qualified names of the layers that are (or become, as their weights load)
            Int4Linear, fixed before the weights load.
    """

    requires_calibration = False
    quantization_config: FourbitConfig

    def __init__(self, quantization_config: FourbitConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.targets: set[str] = set()

    # -- which layers --------------------------------------------------------------------

    def _float_targets(self, model: PreTrainedModel) -> dict[str, nn.Module]:
        """The layers the config quantizes: exact nn.Linear and Conv1D, not skipped, not tied."""
        skip = self.get_modules_to_not_convert(model, self.quantization_config.modules_to_not_convert,
                                               model._keep_in_fp32_modules)
        tied = {key.removesuffix(".weight") for pair in model.all_tied_weights_keys.items() for key in pair}
        return {name: module for name, module in model.named_modules()
                if type(module) in (nn.Linear, Conv1D) and name not in tied
                and should_convert_module(name, skip)}

    @staticmethod
    def _stored_int4_layers(model: PreTrainedModel, checkpoint_files) -> dict[str, bool] | None:
        """{module name: has perm} for the layers a safetensors checkpoint stores as int4 (a
        `<name>.qweight`), read from the files' headers; None for other checkpoints."""
        if not checkpoint_files or not all(str(f).endswith(".safetensors") for f in checkpoint_files):
            return None
        keys = set()
        for file in checkpoint_files:
            with safe_open(str(file), framework="pt") as f:
                keys.update(f.keys())
        modules, prefix = dict(model.named_modules()), model.base_model_prefix
        layers = {}
        for key in sorted(k for k in keys if k.endswith(".qweight")):
            stored = key.removesuffix(".qweight")
            # The checkpoint of a head model read into its base model, or the other way round.
            for name in (stored, stored.removeprefix(f"{prefix}."), f"{prefix}.{stored}"):
                if name in modules:
                    if type(modules[name]) not in (nn.Linear, Conv1D):
                        raise ValueError(f"the checkpoint stores {stored!r} as int4, but the model's "
                                         f"{name!r} is a {type(modules[name]).__name__}, not a linear layer")
                    layers[name] = f"{stored}.perm" in keys
                    break
        return layers

    def _process_model_before_weight_loading(self, model: PreTrainedModel, checkpoint_files=None, **kwargs):
        config = self.quantization_config
        if not self.pre_quantized:
            self.targets = set(self._float_targets(model))
        else:
            stored = self._stored_int4_layers(model, checkpoint_files)
            if stored is None:  # no safetensors headers to read: the layers the config selects
                stored = dict.fromkeys(self._float_targets(model), False)
            for name, act_order in stored.items():
                module = model.get_submodule(name)
                n, k = (module.nf, module.nx) if isinstance(module, Conv1D) else (module.out_features,
                                                                                  module.in_features)
                _set_submodule(model, name, Int4Linear(
                    k, n, bias=module.bias is not None, group_size=config.group_size, symmetric=config.symmetric,
                    dtype=module.weight.dtype, device="meta", backend=config.backend, act_order=act_order))
            self.targets = set(stored)
        _guard_weight_init(model)
        return model

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        return not self.pre_quantized and tensor_name == "weight" and module_name in self.targets

    def get_quantize_ops(self) -> FourbitQuantize:
        return FourbitQuantize(self)

    # -- quantizing and loading ----------------------------------------------------------

    def quantize_layer(self, model: nn.Module, name: str, w: torch.Tensor) -> Int4Linear:
        """Replace the float layer `name` of model by an Int4Linear holding its weight w (as read
        from the checkpoint, on its device) quantized by round to nearest. A bias already
        loaded is kept; one still to come replaces a zero placeholder when it arrives."""
        config = self.quantization_config
        module = model.get_submodule(name)
        if isinstance(module, Conv1D):
            w = w.t()  # Conv1D computes x @ W + b with W [in, out]
        weight = quantize_weight(w, group_size=config.group_size, symmetric=config.symmetric)
        layer = Int4Linear(w.shape[1], w.shape[0], bias=module.bias is not None, group_size=config.group_size,
                           symmetric=config.symmetric, dtype=w.dtype, device="meta", backend=config.backend)
        bias = module.bias
        if bias is not None and bias.device.type == "meta":
            bias = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        layer.load_weight(weight, bias)
        _flag_initialized(layer)
        _set_submodule(model, name, layer)
        return layer

    def get_new_dtype(self, converter, param, dtype):
        # Int4Linear scales and offsets keep the dtypes they were saved in (fp32 offsets of an
        # exact import would not survive a cast to fp16); other tensors are cast as usual.
        for target in getattr(converter, "target_patterns", ()):
            module_name, _, tensor_name = target.rpartition(".")
            if tensor_name in ("scales", "offsets") and module_name in self.targets:
                return None
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs):
        _unguard_weight_init(model)
        for module in model.modules():
            if isinstance(module, Int4Linear):
                if module.bias is not None:
                    module.bias.requires_grad_(False)
                module.backend = module.backend  # the layout its backend wants, now that it holds weights
        return model

    def _dequantize(self, model: PreTrainedModel, dtype=None):
        for name, module in list(model.named_modules()):
            if isinstance(module, Int4Linear):
                dt = dtype or module.dtype
                linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                   dtype=dt, device=module.qweight.device)
                linear.weight.data.copy_(module.weight.dequantize(dt))
                if module.bias is not None:
                    linear.bias.data.copy_(module.bias)
                _set_submodule(model, name, linear)
        return model

    # -- what transformers asks -----------------------------------------------------------

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("fourbit int4 layers cannot be offloaded to disk; drop 'disk' from the device_map")

    @property
    def quantized_element_size(self) -> float:
        """About the bytes per quantized weight: half a byte plus 16-bit s and m per group."""
        group_size = self.quantization_config.group_size
        return 0.5 + (4 / group_size if group_size > 0 else 0.0)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters train beside the frozen Int4Linear layers (int4_mm is differentiable in x)

    @property
    def is_compileable(self) -> bool:
        return True


# -- transformers' weight init, with int4 layers ------------------------------------------
# transformers runs each module's _init_weights after loading, and the init functions skip
# tensors flagged as loaded. Some parents init a child's weight themselves (GPT-2's
# attention and MLP: c_proj.weight): an Int4Linear's `weight` is an Int4Weight, not a
# tensor. A module with Int4Linear children whose own tensors all loaded is marked
# initialized instead (the shortcut transformers takes for remote code); the children are
# initialized, or not, on their own.

def _guarded_init(original):
    def init(module: nn.Module, is_custom_code: bool = False):
        own = itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False))
        if any(isinstance(child, Int4Linear) for child in module.children()) and \
                all(getattr(t, "_is_hf_initialized", False) for t in own):
            module._is_hf_initialized = True
            return
        original(module, is_custom_code)
    init.fourbit_original = original
    return init


def _guard_weight_init(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and "_initialize_weights" not in vars(module):
            module._initialize_weights = _guarded_init(module._initialize_weights)


def _unguard_weight_init(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(vars(module).get("_initialize_weights"), "fourbit_original"):
            del module._initialize_weights


# -- registration ---------------------------------------------------------------------------

def register() -> None:
    """Register FourbitConfig and FourbitHfQuantizer as transformers' "fourbit" (done on
    import). Idempotent; after a reload of this module its new classes replace the old ones.
    Raises RuntimeError if another package registered "fourbit"."""
    for mapping, register_fn, cls in ((AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config, FourbitConfig),
                                      (AUTO_QUANTIZER_MAPPING, register_quantizer, FourbitHfQuantizer)):
        present = mapping.get(QUANT_METHOD)
        if present is None:
            register_fn(QUANT_METHOD)(cls)
        elif (present.__module__, present.__qualname__) == (cls.__module__, cls.__qualname__):
            mapping[QUANT_METHOD] = cls
        else:
            raise RuntimeError(f"transformers already has a quantization method {QUANT_METHOD!r}: "
                               f"{present.__module__}.{present.__qualname__}")


register()
