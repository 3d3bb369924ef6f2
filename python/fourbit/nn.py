"""Drop-in modules: Int4Linear, and quantize_ to swap a model's nn.Linear layers."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .format import COMPUTE_DTYPES, Int4Weight, check_group_size, group_len, padded_k
from .ops import BACKENDS, check_activation, linear
from .quantize import Int4WeightOnlyConfig, as_config, quantize_weight


class Int4Linear(nn.Module):
    """A linear layer with int4 weights (W4A16): y = x @ W.T + b, W in the fourbit format.

    Buffers (the canonical format, what state_dict and checkpoints hold):
        qweight: int32 [out_features, K_padded / 8]
        scales:  [out_features, num_groups] in the compute dtype
        offsets: [out_features, num_groups], same dtype (-8 * scales when symmetric)
    Parameter:
        bias: [out_features] or None

    Attributes:
        backend: "auto" or a forced backend name (see fourbit.ops); may be changed at any time.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 symmetric: bool = False, dtype: torch.dtype | None = None, device=None,
                 backend: str = "auto"):
        super().__init__()
        check_group_size(group_size)
        dtype = dtype or torch.get_default_dtype()
        if dtype not in COMPUTE_DTYPES:
            raise TypeError(f"dtype must be one of {COMPUTE_DTYPES}, got {dtype}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric, self.backend = group_size, symmetric, backend
        k_pad = padded_k(in_features, group_size)
        groups = k_pad // group_len(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(out_features, k_pad // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("offsets", torch.zeros(out_features, groups, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear_module: nn.Linear, group_size: int = 128, symmetric: bool = False,
                    backend: str = "auto") -> "Int4Linear":
        """Quantize an nn.Linear (round to nearest); scales keep the linear's dtype."""
        w = linear_module.weight
        if w.device.type == "meta":
            raise ValueError("cannot quantize a linear layer on the meta device: it holds no "
                             "weights (load a quantized checkpoint with fourbit.load_quantized)")
        weight = quantize_weight(w, group_size=group_size, symmetric=symmetric)
        module = cls(linear_module.in_features, linear_module.out_features, linear_module.bias is not None,
                     group_size, symmetric, dtype=w.dtype, device="meta", backend=backend)
        module.load_weight(weight, linear_module.bias)
        return module

    def load_weight(self, weight: Int4Weight, bias: torch.Tensor | None = None) -> None:
        """Take an Int4Weight (and bias) as this layer's weights, replacing the buffers."""
        if weight.shape != (self.out_features, self.in_features) or weight.group_size != self.group_size:
            raise ValueError(f"weight {weight} does not fit Int4Linear({self.in_features}, "
                             f"{self.out_features}, group_size={self.group_size})")
        self.qweight, self.scales, self.offsets = weight.qweight, weight.scales, weight.offsets
        self.symmetric = weight.symmetric
        if self.bias is not None:
            if bias is None:
                raise ValueError("this Int4Linear has a bias; pass it")
            self.bias = nn.Parameter(bias.detach().to(weight.device), requires_grad=False)

    @property
    def weight(self) -> Int4Weight:
        return Int4Weight(self.qweight, self.scales, self.offsets, self.group_size,
                          (self.out_features, self.in_features), self.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_activation(x, self.in_features, self.qweight.device)
        return linear(x, self.qweight, self.scales, self.offsets,
                      group_len(self.in_features, self.group_size), self.bias, self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}, dtype={self.scales.dtype}, backend={self.backend!r}")


def linear_targets(model: nn.Module, config: Int4WeightOnlyConfig | None = None) -> list[str]:
    """Qualified names of the layers quantize_(model, config) would replace (those for which
    config.quantizes(name, module); default config: every exact nn.Linear but lm_head)."""
    config = config or Int4WeightOnlyConfig()
    return [name for name, mod in model.named_modules() if config.quantizes(name, mod)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def quantize_(model: nn.Module, config: Int4WeightOnlyConfig | None = None, **options) -> nn.Module:
    """Replace, in place, the nn.Linear layers of model that config quantizes with Int4Linear.

    Args:
        model: any nn.Module; its linear layers are quantized on the device they are on.
        config: an Int4WeightOnlyConfig (or a dict of its fields); default Int4WeightOnlyConfig().
        **options: instead of config, its fields as keywords: group_size (int, default 128),
            symmetric (bool), skip (fnmatch patterns, default ("lm_head",)), backend (str,
            default "auto"), filter (callable (name, module) -> bool), method (str, "rtn").
    Returns:
        model, with Int4Linear layers in place of the replaced ones.
    Raises:
        TypeError: both a config and keywords, or an unknown keyword (named).
        ValueError: an impossible value (named), as Int4WeightOnlyConfig raises it.
    """
    if config is not None and options:
        raise TypeError(f"quantize_ takes a config or keywords, not both (got a config and {sorted(options)})")
    config = Int4WeightOnlyConfig.from_dict(options) if config is None else as_config(config)
    if model is None or isinstance(model, (nn.Linear, Int4Linear)):
        raise TypeError("quantize_ takes a model containing linear layers; use Int4Linear.from_linear "
                        "for a single nn.Linear")
    targets = linear_targets(model, config)
    for name in tqdm(targets, desc="quantize_", unit="layer", disable=True if len(targets) < 16 else None):
        layer = model.get_submodule(name)
        _set_submodule(model, name, Int4Linear.from_linear(layer, group_size=config.group_size,
                                                           symmetric=config.symmetric, backend=config.backend))
    return model


TUNE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@torch.inference_mode()
def tune(model: nn.Module, rows=TUNE_ROWS, dtype: torch.dtype | None = None) -> int:
    """Run every distinct Int4Linear shape of model once per row count, so autotuned kernels
    pick their configs now instead of on the first real request.

    The Triton kernels keep what they measured in Triton's on-disk cache (TRITON_CACHE_DIR,
    default ~/.triton/cache): a later process on the same GPU and software starts tuned.
    Ship that directory with a deployment to skip tuning there too.

    Args:
        model: a model with Int4Linear layers (after quantize_ or load_quantized), on its device.
        rows: the numbers of rows M (batch x tokens) to tune for; autotuning buckets M by
            powers of two, so powers of two cover every M.
        dtype: activation dtype; defaults to each layer's scale dtype.
    Returns:
        The number of (shape, M) cases run.
    """
    seen, cases = set(), 0
    for module in model.modules():
        if not isinstance(module, Int4Linear):
            continue
        dt = dtype or module.scales.dtype
        key = (module.in_features, module.out_features, module.group_size, dt, module.qweight.device, module.backend)
        if key in seen:
            continue
        seen.add(key)
        for m in rows:
            module(torch.randn(m, module.in_features, device=module.qweight.device, dtype=dt))
            cases += 1
    return cases
