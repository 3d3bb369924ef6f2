"""int8 weight-only: the int8_mm op (reference and C++ CPU kernel, every instruction set this
CPU has), Int8Linear / Int8Embedding, GGUF Q8_0 embeddings and heads loaded as int8 exactly
(one copy for a tied pair), checkpoints, quantize_'s lm_head_int8 option, and bad input."""

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

import fourbit
from fourbit import Int8Embedding, Int8Linear, Int8Weight
from fourbit.backends import _C, available_backends
from fourbit.format import dequantize_int8
from helpers import TinyLM, assert_matmul_accuracy, relative_error

HAS_CPU_KERNEL = "cpu" in available_backends("cpu", "int8_mm")
needs_kernel = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="fourbit._C has no int8_mm_cpu (not built)")


def _isas() -> list[str]:
    """The instruction sets the CPU kernel can run here (FOURBIT_CPU_ISA forces each)."""
    if not HAS_CPU_KERNEL:
        return []
    found = []
    for isa in ("portable", "avx2", "avx512"):
        os.environ["FOURBIT_CPU_ISA"] = isa
        try:
            _C.int8_mm_cpu(torch.ones(1, 32), torch.ones(1, 32, dtype=torch.int8), torch.ones(1, 1), 32)
            found.append(isa)
        except RuntimeError:
            pass
        finally:
            del os.environ["FOURBIT_CPU_ISA"]
    return found


ISAS = _isas()


def random_weight(n: int, k: int, group_size: int, scale_dtype=torch.float16) -> Int8Weight:
    """Random int8 q over the whole range [-128, 127] and positive scales near 0.01."""
    glen = k if group_size == -1 else group_size
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    scales = (0.005 + 0.01 * torch.rand(n, k // glen)).to(scale_dtype)
    return Int8Weight(q, scales, group_size)


# (N, K, group_size): the SmolLM2 head's K = 576 with Q8_0 groups, K not a multiple of 64,
# per-channel rows of odd length (no whole register), and wider groups.
SHAPES = [(1000, 576, 32), (96, 160, 32), (33, 77, -1), (64, 96, -1), (50, 192, 64), (40, 256, 128), (7, 4096, -1)]
SHAPE_IDS = [f"N{n}-K{k}-g{g}" for n, k, g in SHAPES]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_kernel)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 16, 17], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_int8_linear_matches_fp64(backend, dtype, m, shape):
    """Every backend is as close to the fp64 product as torch's matmul in x's dtype is
    (M <= 16: the dot-product schedule; 17: dequantized panels and at::mm)."""
    n, k, g = shape
    weight = random_weight(n, k, g)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n) if m % 2 else None
    out = fourbit.int8_linear(x, weight, bias, backend=backend)
    assert_matmul_accuracy(out, x, weight.dequantize(torch.float64), None if bias is None else bias.double())


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scale_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m", [1, 4, 7, 33], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", SHAPES[:4], ids=SHAPE_IDS[:4])
def test_cpu_kernel_every_isa_matches_reference(monkeypatch, isa, scale_dtype, m, shape):
    """Each instruction set's kernel against the reference on fresh data, scales in each dtype
    (fp16 and bf16 widened in the kernel, fp32 as they are)."""
    monkeypatch.setenv("FOURBIT_CPU_ISA", isa)
    n, k, g = shape
    weight = random_weight(n, k, g, scale_dtype)
    x = torch.randn(m, k)
    out = fourbit.int8_linear(x, weight, backend="cpu")
    assert_matmul_accuracy(out, x, weight.dequantize(torch.float64))


@needs_kernel
def test_non_contiguous_and_batched_input():
    weight = random_weight(64, 192, 32)
    x = torch.randn(3, 5, 384)[..., ::2]  # strided last dimension
    out = fourbit.int8_linear(x, weight, backend="cpu")
    ref = fourbit.int8_linear(x.contiguous(), weight, backend="torch")
    assert out.shape == (3, 5, 64)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("m", [1, 40], ids=["dot", "panels"])
def test_cpu_kernel_under_inference_mode(m):
    """The panel schedule's worker threads run ATen under the caller's inference mode."""
    weight = random_weight(100, 64, 32)
    x = torch.randn(m, 64)
    with torch.inference_mode():
        out = fourbit.int8_linear(x, weight, backend="cpu")
    assert_matmul_accuracy(out, x, weight.dequantize(torch.float64))


def test_auto_picks_cpu_kernel_when_built():
    from fourbit.dispatch import choose_int8_backend
    assert choose_int8_backend(torch.device("cpu"), torch.float32, 1, 49152, 576) == ("cpu" if HAS_CPU_KERNEL
                                                                                       else "torch")
    assert choose_int8_backend(torch.device("cpu"), torch.float32, 0, 8, 32) == "torch"


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_kernel)])
def test_opcheck(backend):
    """The schema, fake, implementation and autograd registration agree."""
    if not hasattr(torch.ops.fourbit, "int8_mm"):
        pytest.skip("fourbit._C predates the int8_mm schema")
    w = random_weight(40, 96, 32)
    x = torch.randn(3, 96, requires_grad=True)
    torch.library.opcheck(torch.ops.fourbit.int8_mm.default, (x, w.qweight, w.scales, 32, torch.randn(40), backend))


def test_gradient_flows_to_x_and_bias():
    w = random_weight(24, 64, 32)
    x = torch.randn(5, 64, dtype=torch.float64).float().requires_grad_()
    bias = torch.randn(24, requires_grad=True)
    fourbit.int8_linear(x, w, bias).square().sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    (x2 @ w.dequantize().T + b2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bias.grad, b2.grad, rtol=1e-4, atol=1e-4)


# ---- quantizing and the modules ----

@pytest.mark.parametrize("group_size", [-1, 32, 64], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_int8_within_half_a_step(group_size, dtype):
    w = torch.randn(48, 128).to(dtype)
    q = fourbit.quantize_int8_weight(w, group_size)
    assert q.qweight.dtype == torch.int8 and q.scales.dtype == dtype and int(q.qweight.abs().max()) <= 127
    glen = 128 if group_size == -1 else group_size
    step = q.scales.float().repeat_interleave(glen, dim=1)
    assert ((q.dequantize() - w.float()).abs() <= step / 2 * (1 + 1e-6)).all()


def test_int8_linear_module_matches_functional():
    lin = nn.Linear(96, 40, bias=True)
    layer = Int8Linear.from_linear(lin, group_size=32)
    x = torch.randn(2, 3, 96)
    torch.testing.assert_close(layer(x), fourbit.int8_linear(x, layer.weight, layer.bias, backend="torch"))
    assert "group_size=32" in repr(layer)


def test_embedding_is_the_rows_of_the_weight_exactly():
    w = random_weight(100, 64, 32)
    emb = Int8Embedding(100, 64, 32, dtype=torch.float32, device="meta")
    emb.load_weight(w)
    ids = torch.tensor([[3, 99, 0], [5, 5, 42]])
    assert torch.equal(emb(ids), w.dequantize()[ids])
    emb.dtype = torch.bfloat16
    assert torch.equal(emb(ids), w.dequantize()[ids].to(torch.bfloat16))


def test_tied_embedding_reads_its_head_wherever_it_goes():
    head = Int8Linear(64, 100, group_size=32, device="meta")
    head.load_weight(random_weight(100, 64, 32))
    emb = Int8Embedding.tied(head, torch.float32)
    assert emb.head is head and not list(emb.buffers())
    model = nn.ModuleDict(dict(embed=emb, head=head))
    moved = copy.deepcopy(model).to(torch.device("cpu"))
    assert moved["embed"].head is moved["head"]
    ids = torch.tensor([1, 2, 3])
    assert torch.equal(moved["embed"](ids), head.weight.dequantize()[ids])


def test_torch_compile_fullgraph():
    """torch.compile traces Int8Embedding and Int8Linear in one graph (the op through its fake)."""
    head = Int8Linear(64, 100, group_size=32, device="meta")
    head.load_weight(random_weight(100, 64, 32))
    emb = Int8Embedding.tied(head, torch.float32)

    def f(ids):
        return head(emb(ids) * 0.5)

    ids = torch.tensor([[1, 2, 3, 4]])
    compiled = torch.compile(f, fullgraph=True, backend="eager" if os.environ.get("FOURBIT_COMPILE_EAGER") else
                             "inductor")
    torch.testing.assert_close(compiled(ids), f(ids))


# ---- quantize_: lm_head_int8 ----

def test_quantize_lm_head_int8_is_off_by_default():
    model = fourbit.quantize_(TinyLM())
    assert type(model.lm_head) is nn.Linear


@pytest.mark.parametrize("tied", [False, True], ids=["separate", "tied"])
@pytest.mark.parametrize("group_size", [-1, 32], ids=lambda g: f"g{g}")
def test_quantize_lm_head_int8(tied, group_size):
    model = TinyLM(tied=tied)
    head = model.lm_head.weight.detach().clone()
    fourbit.quantize_(model, lm_head_int8=group_size)
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.group_size == group_size
    assert isinstance(model.layers[0].down_proj, fourbit.Int4Linear)
    assert type(model.embed_tokens) is nn.Embedding  # a tied head's embedding stays float
    assert torch.equal(model.embed_tokens.weight.detach(), head) == tied
    assert relative_error(model.lm_head.weight.dequantize(), head) < 0.01
    model(torch.tensor([[1, 2, 3]]))


def test_lm_head_int8_is_checked():
    for bad in (0, 48, 16, True, "32"):
        with pytest.raises((ValueError, TypeError), match="lm_head_int8"):
            fourbit.Int4WeightOnlyConfig(lm_head_int8=bad)


# ---- checkpoints ----

def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    model = fourbit.quantize_(TinyLM(), lm_head_int8=32)
    fourbit.save_quantized(model, tmp_path / "m.safetensors")
    with torch.device("meta"):
        fresh = TinyLM()
    fourbit.load_quantized(fresh, tmp_path / "m.safetensors")
    assert isinstance(fresh.lm_head, Int8Linear)
    assert torch.equal(fresh.lm_head.qweight, model.lm_head.qweight)
    assert torch.equal(fresh.lm_head.scales, model.lm_head.scales) and fresh.lm_head.scales.dtype == torch.float32
    ids = torch.tensor([[4, 8, 15, 16]])
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


# ---- GGUF Q8_0 ----

@pytest.fixture(scope="module")
def q8_files(tmp_path_factory):
    """GGUF files of a small Llama (Q4_K / Q6_K layers): token_embd Q8_0 tied (no output.weight),
    and token_embd and output.weight both Q8_0 (separate); each with its F32 twin (every tensor
    through gguf's own dequantization)."""
    gguf = pytest.importorskip("gguf")  # noqa: F841
    from test_gguf_kquants import CONFIG, METADATA, _d, dequantized, q4_k_m_tensors, random_blocks, write_gguf
    rng = np.random.default_rng(88)
    tmp = tmp_path_factory.mktemp("q8")
    tensors = q4_k_m_tensors(rng)
    del tensors["output.weight"]
    write_gguf(tmp / "tied.gguf", tensors, METADATA)
    write_gguf(tmp / "tied-f32.gguf", dequantized(tensors), METADATA)
    tensors["output.weight"] = ("Q8_0", random_blocks(rng, "Q8_0", CONFIG["vocab"], CONFIG["hidden"],
                                                      _d(rng, 2e-4, 6e-4)))
    write_gguf(tmp / "separate.gguf", tensors, METADATA)
    write_gguf(tmp / "separate-f32.gguf", dequantized(tensors), METADATA)
    return tmp


@pytest.mark.parametrize("kind", ["tied", "separate"])
def test_q8_0_loads_as_int8_exactly(q8_files, kind):
    """The int8 embedding and head hold the file's q and fp16 d; dequantized they equal the
    float load (int8=False) bit for bit, and the logits agree with the all-F32 twin's within
    fp32 rounding (the int4 and int8 kernels' summation order against torch's matmul)."""
    model = fourbit.load_model(q8_files / f"{kind}.gguf", device="cpu", dtype=torch.float32)
    ref = fourbit.load_model(q8_files / f"{kind}.gguf", device="cpu", dtype=torch.float32, int8=False)
    assert isinstance(model.embed_tokens, Int8Embedding) and isinstance(model.lm_head, Int8Linear)
    assert type(ref.embed_tokens) is nn.Embedding and type(ref.lm_head) is nn.Linear
    assert model.lm_head.scales.dtype == torch.float16 and model.lm_head.group_size == 32
    assert model.dtype == torch.float32
    assert torch.equal(model.embed_tokens.weight.dequantize(), ref.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight.dequantize(), ref.lm_head.weight)
    if kind == "tied":  # one int8 copy: the embedding reads the head's
        assert model.embed_tokens.head is model.lm_head
        assert not [n for n in model.state_dict() if n.startswith("embed_tokens.")]
    ids = torch.tensor([[1, 17, 250, 3, 99, 42, 7, 318]])
    twin = fourbit.load_model(q8_files / f"{kind}-f32.gguf", device="cpu", dtype=torch.float32)
    ref64 = copy.deepcopy(twin).double()
    with torch.no_grad():
        out, plain, exact = model(ids), twin(ids), ref64(ids)
    err, err_plain = relative_error(out, exact), relative_error(plain, exact)
    assert err <= 2 * err_plain + 4 * torch.finfo(torch.float32).eps, (err, err_plain)
    prompts = [[1, 17, 250, 3], [5, 6]]
    assert fourbit.generate(model, prompts, max_new_tokens=6) == fourbit.generate(ref, prompts, max_new_tokens=6)


def test_quantize_false_keeps_q8_0_float(q8_files):
    model = fourbit.load_model(q8_files / "tied.gguf", device="cpu", quantize=False)
    assert type(model.embed_tokens) is nn.Embedding and model.lm_head.weight is model.embed_tokens.weight


def test_load_model_lm_head_int8_quantizes_a_float_tied_head(q8_files):
    """quantize=dict(lm_head_int8=...) on a float tied head (the Q8_0 embedding read as fp32):
    the head becomes its own Int8Linear, the embedding stays float."""
    model = fourbit.load_model(q8_files / "tied.gguf", device="cpu", int8=False, quantize=dict(lm_head_int8=-1))
    assert type(model.embed_tokens) is nn.Embedding and isinstance(model.lm_head, Int8Linear)
    assert model.lm_head.group_size == -1
    assert relative_error(model.lm_head.weight.dequantize(), model.embed_tokens.weight) < 0.01


@pytest.mark.parametrize("kind", ["tied", "separate"])
def test_q8_0_model_saves_and_loads_back_unchanged(q8_files, tmp_path, kind):
    model = fourbit.load_model(q8_files / f"{kind}.gguf", device="cpu", dtype=torch.float32)
    back = fourbit.load_model(fourbit.save_model(model, tmp_path / "saved"), device="cpu", dtype=torch.float32)
    assert isinstance(back.embed_tokens, Int8Embedding) and isinstance(back.lm_head, Int8Linear)
    assert (back.embed_tokens.head is back.lm_head) == (kind == "tied")
    assert torch.equal(back.lm_head.qweight, model.lm_head.qweight)
    assert torch.equal(back.lm_head.scales, model.lm_head.scales) and back.lm_head.scales.dtype == torch.float16
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        assert torch.equal(model(ids), back(ids))


def test_embedded_model_logits_match_the_fp32_head(smollm_path):
    """SmolLM2-135M's tied Q8_0 embedding as int8 (the default) against its fp32 dequantization:
    the same weights, so the logits differ by fp32 rounding only, and greedy decoding agrees."""
    model = fourbit.load_model(smollm_path, device="cpu")
    ref = fourbit.load_model(smollm_path, device="cpu", int8=False)
    assert model.embed_tokens.head is model.lm_head and type(ref.lm_head) is nn.Linear
    assert model.lm_head.qweight.numel() == 49152 * 576
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 28, 198]])
    with torch.no_grad():
        out, plain = model(ids), ref(ids)
    assert relative_error(out, plain) < 1e-5
    prompts = [[1, 504, 3458, 314]]
    assert fourbit.generate(model, prompts, max_new_tokens=6) == fourbit.generate(ref, prompts, max_new_tokens=6)


# ---- bad input ----

def test_bad_inputs_raise_clear_errors():
    w = random_weight(16, 64, 32)
    with pytest.raises(TypeError, match="x must be float32"):
        fourbit.int8_linear(torch.ones(2, 64, dtype=torch.int32), w)
    with pytest.raises(ValueError, match="K = 64"):
        fourbit.int8_linear(torch.randn(2, 65), w)
    with pytest.raises(TypeError, match="Int8Weight"):
        fourbit.int8_linear(torch.randn(2, 64), w.qweight)
    with pytest.raises(ValueError, match="bias must have shape"):
        fourbit.int8_linear(torch.randn(2, 64), w, torch.randn(3))
    with pytest.raises(TypeError, match="qweight must be int8"):
        Int8Weight(w.qweight.int(), w.scales, 32)
    with pytest.raises(ValueError, match="multiple of 32 dividing"):
        Int8Weight(w.qweight, w.scales, 16)
    with pytest.raises(ValueError, match="multiple of 32 dividing"):
        Int8Weight(torch.zeros(4, 80, dtype=torch.int8), torch.ones(4, 2), 64)
    with pytest.raises(ValueError, match=r"scales must be \[N, K / group_len\]"):
        Int8Weight(w.qweight, w.scales[:, :1], 32)
    with pytest.raises(TypeError, match="scales must be one of"):
        Int8Weight(w.qweight, w.scales.double(), 32)
    with pytest.raises(RuntimeError, match="cannot run here"):
        fourbit.int8_linear(torch.randn(2, 64), w, backend="triton")
    with pytest.raises(ValueError, match="NaN or inf"):
        fourbit.quantize_int8_weight(torch.tensor([[float("nan")] * 32]))
    with pytest.raises(ValueError, match="meta device"):
        Int8Linear.from_linear(nn.Linear(32, 4, device="meta"))


@needs_kernel
@pytest.mark.parametrize("args, message", [
    ((torch.randn(2, 64), torch.ones(4, 64), torch.ones(4, 2), 32), "qweight must be int8"),
    ((torch.randn(2, 64), torch.ones(4, 64, dtype=torch.int8), torch.ones(4, 3), 32), "scales must be"),
    ((torch.randn(2, 64), torch.ones(4, 64, dtype=torch.int8), torch.ones(4, 4), 16), "group_len must be"),
    ((torch.randn(2, 63), torch.ones(4, 64, dtype=torch.int8), torch.ones(4, 2), 32), "x has K = 63"),
    ((torch.randn(2, 64).int(), torch.ones(4, 64, dtype=torch.int8), torch.ones(4, 2), 32), "x must be float32"),
    ((torch.randn(2, 64), torch.ones(4, 64, dtype=torch.int8), torch.ones(4, 2, dtype=torch.int32), 32),
     "scales must be"),
], ids=["q-dtype", "scales-shape", "group", "k", "x-dtype", "scales-dtype"])
def test_kernel_checks_its_inputs(args, message):
    """The C++ launcher's own checks (TORCH_CHECK), for callers that skip the Python ones."""
    from fourbit.backends import cpu_int8
    with pytest.raises(RuntimeError, match=message):
        cpu_int8.int8_mm(*args)


def test_dequantize_int8_groups_columns():
    q = torch.arange(64, dtype=torch.int8).view(1, 64)
    s = torch.tensor([[1.0, 2.0]])
    w = dequantize_int8(q, s, 32)
    assert torch.equal(w[0, :32], torch.arange(32.0)) and torch.equal(w[0, 32:], 2 * torch.arange(32.0, 64.0))
