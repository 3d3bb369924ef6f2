"""Gradients through int4_linear (issue 16, item 10): x and bias get the gradient of
x @ W.T + b on every backend, the int4 weight stays frozen, and an adapter (LoRA) trains
over a quantized model. References are computed here in fp64 on weights unpacked with plain
bit arithmetic, not with fourbit's dequantize. opcheck with inputs that require grad (the
autograd registration, the backward under AOT dispatch) is in test_ops.py::test_opcheck."""

import copy
import types

import pytest
import torch
from torch import nn

import fourbit
from conftest import backend_cases, need
from fourbit import ops
from helpers import DTYPES, TinyLM, assert_matmul_accuracy, random_int4_weight, relative_error

# Every (device, backend) pair with an int4 kernel, Triton on the CPU through its interpreter
# (the shapes below are small for it).
CASES = backend_cases("int4_mm")
SHAPES = {"N48-K320": (48, 320), "N37-K1000": (37, 1000)}
ROWS = [1, 3, 17]  # the CPU kernel's dot-product schedule (M <= 3) and its blocked GEMM


def skip_unsupported(backend: str, dtype: torch.dtype) -> None:
    if backend == "cuda" and dtype == torch.float32:
        pytest.skip("the cuda kernel takes fp16 / bf16 activations only")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("m", ROWS)
def test_grads_of_x_and_bias_match_fp64(m, shape, dtype, backend, device):
    """x.grad = grad_out @ W and bias.grad = grad_out summed over rows, as accurate as plain
    PyTorch in x's dtype (the matmul rule of DESIGN.md), for x of any batch shape."""
    need(device, backend)
    skip_unsupported(backend, dtype)
    n, k = shape
    weight, dense = random_int4_weight(n, k, 64, False, dtype, device)
    x = torch.randn(m, 2, k, device=device).to(dtype).requires_grad_()
    bias = torch.randn(n, device=device).to(dtype).requires_grad_()
    out = fourbit.int4_linear(x, weight, bias, backend=backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert x.grad is not None and x.grad.dtype == dtype and x.grad.shape == x.shape
    g = grad_out.reshape(-1, n)
    assert_matmul_accuracy(x.grad.reshape(-1, k), g, dense.T)  # g @ dense, against fp64
    ref_bias, plain_bias = g.double().sum(0), g.sum(0)
    assert bias.grad.dtype == dtype
    assert relative_error(bias.grad, ref_bias) <= (2 * relative_error(plain_bias, ref_bias)
                                                   + 4 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("device,backend", CASES)
def test_no_bias_grad_unless_asked(backend, device):
    """Only what requires grad gets one: x without bias, bias without x."""
    need(device, backend)
    dtype = torch.bfloat16
    weight, dense = random_int4_weight(32, 128, 32, True, dtype, device)
    bias = torch.randn(32, device=device).to(dtype)
    x = torch.randn(3, 128, device=device).to(dtype).requires_grad_()
    fourbit.int4_linear(x, weight, bias, backend=backend).sum().backward()
    assert bias.grad is None and x.grad is not None
    assert_matmul_accuracy(x.grad, torch.ones(3, 32, device=device, dtype=dtype), dense.T)
    x = x.detach()
    bias.requires_grad_()
    fourbit.int4_linear(x, weight, bias, backend=backend).sum().backward()
    assert x.grad is None and torch.equal(bias.grad, torch.full_like(bias, 3))


@pytest.mark.parametrize("device,backend", CASES)
def test_the_int4_weight_is_frozen(backend, device):
    """Asking for a gradient of the scales or offsets is an error that says why; a backward
    through the weight leaves its tensors as they were."""
    need(device, backend)
    weight, _ = random_int4_weight(32, 128, 32, False, torch.bfloat16, device)
    before = [t.clone() for t in (weight.qweight, weight.scales, weight.offsets)]
    x = torch.randn(2, 128, device=device).bfloat16().requires_grad_()
    fourbit.int4_linear(x, weight, backend=backend).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, (weight.qweight, weight.scales, weight.offsets)))
    weight.scales.requires_grad_()
    out = fourbit.int4_linear(x, weight, backend=backend).sum()
    with pytest.raises(RuntimeError, match="frozen"):
        out.backward()


@pytest.mark.parametrize("group_size", [64, -1])
def test_backward_of_the_cuda_layout_is_that_of_the_canonical_one(group_size):
    """The "cuda" backend's weight is in its own layout (format.prepack_mma_weight); the
    backward converts it back, exactly: the same grad_x, bit for bit, as from the canonical
    weight. Runs the shared backward directly, so no GPU is needed."""
    n, k = 37, 1000
    weight, _ = random_int4_weight(n, k, group_size, False, torch.bfloat16)
    grad_out = torch.randn(5, n).bfloat16()

    def grad_x(backend, tensors):
        ctx = types.SimpleNamespace(saved_tensors=tensors, needs_input_grad=(True,) + (False,) * 6,
                                    group_len=weight.group_len, backend=backend, k=k, x_dtype=torch.bfloat16,
                                    bias_dtype=None)
        return ops._int4_mm_backward(ctx, grad_out)[0]

    canonical = (weight.qweight, weight.scales, weight.offsets)
    mma = fourbit.format.prepack_mma_weight(*canonical, k)
    assert torch.equal(grad_x("cuda", mma), grad_x("cpu", canonical))


# ---- An adapter trained over a quantized model ----

class LoRA(nn.Module):
    """base(x) + B(A(x)) * alpha / rank around a frozen layer; A and B trainable."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, rank: int = 4, alpha: float = 8.0):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.a = nn.Linear(in_features, rank, bias=False)
        self.b = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.b.weight, std=0.02)  # not LoRA's zeros: A gets a gradient at step 0 too

    def forward(self, x):
        return self.base(x) + self.b(self.a(x)) * self.scale


def add_adapters(model: nn.Module) -> nn.Module:
    """Freeze model and wrap each of its Int4Linear layers in a LoRA adapter."""
    model.requires_grad_(False)
    for name, layer in list(model.named_modules()):
        if isinstance(layer, fourbit.Int4Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, LoRA(layer, layer.in_features, layer.out_features))
    return model


def unpacked_dense(layer: fourbit.Int4Linear) -> torch.Tensor:
    """The layer's weight in fp64 from its canonical tensors by plain bit arithmetic:
    q[n, 8 j + i] = nibble i of word j, w = q * s + m per group."""
    weight = layer.weight
    words = weight.qweight.cpu().to(torch.int64) & 0xFFFFFFFF
    q = ((words[:, :, None] >> (4 * torch.arange(8))) & 0xF).flatten(1)
    s = weight.scales.cpu().double().repeat_interleave(weight.group_len, dim=1)
    m = weight.offsets.cpu().double().repeat_interleave(weight.group_len, dim=1)
    return (q * s + m)[:, :layer.in_features]


def dense_twin(model: nn.Module) -> nn.Module:
    """A copy of the adapted model in fp64 with each frozen Int4Linear replaced by an
    nn.Linear holding the same weight (unpacked_dense), on the CPU."""
    twin = copy.deepcopy(model).cpu()
    for adapter in [m for m in twin.modules() if isinstance(m, LoRA)]:
        base = adapter.base
        dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        dense.weight.data = unpacked_dense(base).float()
        if base.bias is not None:
            dense.bias.data = base.bias.detach().cpu().float()
        adapter.base = dense.requires_grad_(False)
    return twin.double()


def adapter_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten().cpu().double() for p in model.parameters() if p.requires_grad])


def next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values != ("cpu", "triton")])
def test_lora_adapter_trains_over_int4_layers(backend, device):
    """A small LM quantized to int4 (every layer but lm_head), frozen, with a LoRA adapter on
    each int4 layer. The adapters' gradients (which reach the first layers only through the
    int4 layers above) match those of the same model with dense fp64 weights, as closely as
    the fp32 dense model's do; a few Adam steps on a fixed batch make the loss fall; the int4
    buffers and biases never change and get no gradient."""
    need(device, backend)
    dtype = torch.float32 if backend != "cuda" else torch.bfloat16
    model = TinyLM(vocab=96, dim=64, hidden=160, layers=2, heads=4, bias=True).to(dtype)
    fourbit.quantize_(model, group_size=32, backend=backend)
    model = add_adapters(model).to(device)
    frozen = {name: t.clone() for name, t in model.named_buffers()}
    frozen.update({name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad})
    ids = torch.randint(0, 96, (4, 24), device=device)

    twin, twin_plain = dense_twin(model), dense_twin(model).to(dtype)  # fp64, and in the model's dtype
    for net, tokens in ((model, ids), (twin, ids.cpu()), (twin_plain, ids.cpu())):
        next_token_loss(net, tokens).backward()
    ref, grads, plain = adapter_grads(twin), adapter_grads(model), adapter_grads(twin_plain)
    first = adapter_grads(model.layers[0])  # reaches layer 0 only through int4 layers and the residual
    assert first.abs().sum() > 0
    assert relative_error(grads, ref) <= 2 * relative_error(plain, ref) + 4 * torch.finfo(dtype).eps

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = next_token_loss(model, ids)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    for name, t in list(model.named_buffers()) + list(model.named_parameters()):
        if name in frozen:
            assert torch.equal(t, frozen[name]), name
            assert getattr(t, "grad", None) is None, name
