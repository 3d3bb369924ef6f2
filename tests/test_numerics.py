"""Numerics at the edges (issue 16, item 8): infinite, huge and one-signed activations in the
int4 matmul, and NaN in attention. Each kernel must do what the fp64 reference does with
the same inputs: the same inf / NaN pattern, finite wherever the true result is finite, and
no more error than the reference backend on inputs that make cancellation easy.

The CPU kernels run on every instruction set the machine has (FOURBIT_CPU_ISA): "cpu" over
its small-batch dot-product schedule (M <= 3) and its blocked GEMM (M = 7), and "cpu-int"
(fixed-point activations, what "auto" runs for a few rows), whose rows out of fixed point's
range go to the W4A16 kernel. The attention cases run on every (device, backend) pair,
Triton on the CPU through its interpreter."""

import pytest
import torch

import fourbit
from conftest import backend_cases, need
from fourbit.kv_cache import PagedBatch
from helpers import assert_matmul_accuracy, random_int4_weight, relative_error
from test_ops import CPU_ISAS, force_cpu_isa

ROWS = [1, 2, 3, 7]  # 1-3: the CPU kernel's dot-product schedule; 7: its blocked GEMM
GROUP_SIZES = [32, 64, 128, -1]
MODES = {"offset": False, "symmetric": True}


def matmul_cases(with_reference: bool = True) -> list:
    """(device, backend, isa) for the CPU backends: the reference and the C++ kernels ("cpu",
    "cpu-int") once per instruction set (isa None for the reference). Triton's interpreter is left out (too slow
    for these shapes; it dequantizes before its dot products, as the reference does), and so
    are the GPU kernels for now: no GPU has run these cases yet, and "cuda" takes no fp32."""
    cases = []
    for case in backend_cases("int4_mm", interpreter=False):
        device, backend = case.values
        if device != "cpu" or (backend == "torch" and not with_reference):
            continue
        for isa in CPU_ISAS if backend in ("cpu", "cpu-int") else [None]:
            cases.append(pytest.param(device, backend, isa, id=case.id + (f"-{isa}" if isa else "")))
    return cases


def use(device: str, backend: str, isa: str | None, monkeypatch) -> None:
    """Skip unless backend runs here; for the CPU kernel force its instruction set."""
    need(device, backend)
    if isa is not None:
        force_cpu_isa(isa, monkeypatch)


def fp64_reference(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """x @ W.T in fp64 on the exact weights (inf * w, inf - inf and inf * 0 as IEEE says)."""
    return x.double() @ dense.T


@pytest.mark.parametrize("device,backend,isa", matmul_cases())
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("m", ROWS)
def test_infinite_activations_give_the_reference_pattern(m, group_size, mode, isa, backend, device, monkeypatch):
    """Row 0 of x holds +inf in one column and -inf in another: an output is NaN where the
    two columns' weights have the same sign (inf - inf) or one is exactly 0 (inf * 0; the
    symmetric mode has w = 0 at q = 8), else +-inf. The last row (m > 1) holds one +inf: +-inf
    by the sign of the weight, NaN where it is 0. The other rows stay finite and accurate."""
    use(device, backend, isa, monkeypatch)
    n, k = 96, 1000
    weight, dense = random_int4_weight(n, k, group_size, mode, torch.float16, device)
    x = torch.randn(m, k, device=device)
    cols = torch.randperm(k)[:2]
    x[0, cols[0]], x[0, cols[1]] = float("inf"), float("-inf")
    if m > 1:
        x[m - 1, cols[1]] = float("inf")
    out, ref = fourbit.int4_linear(x, weight, backend=backend).double(), fp64_reference(x, dense)
    assert torch.isnan(ref).any() and torch.isinf(ref).any(), "the case must exercise both"
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    assert torch.equal(out[torch.isinf(ref)], ref[torch.isinf(ref)])  # the signs too
    finite_rows = torch.isfinite(x).all(1)
    if finite_rows.any():
        assert_matmul_accuracy(out[finite_rows].float(), x[finite_rows], dense)


@pytest.mark.parametrize("device,backend,isa", matmul_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("m", ROWS)
def test_huge_activations_stay_finite(m, group_size, dtype, isa, backend, device, monkeypatch):
    """Activations near 1e36 (fp32 and bf16 hold them) against symmetric weights: every
    product x w and the true sums are far below fp32's 3.4e38, so the output must be finite
    and accurate, however the kernel groups its sums."""
    use(device, backend, isa, monkeypatch)
    n, k = 64, 4096
    weight, dense = random_int4_weight(n, k, group_size, True, torch.float16, device)
    x = (1e36 * (0.5 + 0.5 * torch.rand(m, k, device=device))).to(dtype)
    x[-1] *= torch.randint(0, 2, (k,), device=device) * 2 - 1  # mixed signs too
    assert fp64_reference(x, dense).abs().max() < 1e38
    assert_matmul_accuracy(fourbit.int4_linear(x, weight, backend=backend), x, dense)


ONE_SIGNED = {
    "constant": lambda m, k: torch.full((m, k), float(torch.rand(()) + 0.1)),
    "uniform": lambda m, k: torch.rand(m, k),
    "relu": lambda m, k: torch.relu(torch.randn(m, k)),
}


@pytest.mark.parametrize("device,backend,isa", matmul_cases(with_reference=False))
@pytest.mark.parametrize("activations", ONE_SIGNED.values(), ids=ONE_SIGNED.keys())
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("m", ROWS)
def test_one_signed_activations_as_accurate_as_the_reference(m, group_size, mode, activations, isa, backend,
                                                              device, monkeypatch):
    """Constant or non-negative fp32 activations (where sum x q and sum x are large and of
    one sign, so a kernel that applies the offset through per-group sums of x cancels):
    relative error against fp64 at most twice that of backend="torch" on the same inputs."""
    use(device, backend, isa, monkeypatch)
    n, k = 256, 4096
    weight, dense = random_int4_weight(n, k, group_size, mode, torch.float16, device)
    x = activations(m, k).to(device)
    ref = fp64_reference(x, dense)
    err = relative_error(fourbit.int4_linear(x, weight, backend=backend), ref)
    err_torch = relative_error(fourbit.int4_linear(x, weight, backend="torch"), ref)
    assert err <= 2 * err_torch, f"relative error {err:.3g} vs the reference backend's {err_torch:.3g}"


# ---- Attention: NaN in, NaN out; nothing out of slots no query sees ----

OP_OF = {"decode": "paged_attention", "prefill": "paged_prefill_attention"}
ATTENTION_CASES = [pytest.param(kind, *case.values, marks=case.marks, id=f"{kind}-{case.id}")
                   for kind in OP_OF for case in backend_cases(OP_OF[kind])]


def random_paged_batch(kind, device, seq_lens=(5, 40, 23), new=(3, 17, 1), heads=4, kv_heads=2, head_dim=64,
                       block_size=16, dtype=torch.float32):
    """(q, k_cache, v_cache, batch, [(first token, last position + 1) per sequence]) for
    random sequences in shuffled pages; decode when kind == "decode" (one query each)."""
    if kind == "decode":
        new = (1,) * len(seq_lens)
    pages_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(pages_per_seq) + 2  # spare pages that no sequence uses
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    pages = torch.randperm(num_blocks).tolist()
    block_tables = torch.zeros(len(seq_lens), max(pages_per_seq) + 1, dtype=torch.int32)
    for b, count in enumerate(pages_per_seq):
        block_tables[b, :count] = torch.tensor(pages[:count], dtype=torch.int32)
        pages = pages[count:]
    starts = torch.tensor([0, *new], dtype=torch.int32).cumsum(0).to(torch.int32)
    batch = PagedBatch.from_tensors(
        slot_mapping=torch.full((int(starts[-1]),), -1, dtype=torch.int64, device=device),
        block_tables=block_tables.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=None if kind == "decode" else starts.to(device), num_blocks=num_blocks, block_size=block_size)
    q = torch.randn(int(starts[-1]), heads, head_dim, dtype=dtype, device=device)
    return q, k_cache, v_cache, batch, block_tables


def attend(kind, q, k_cache, v_cache, batch, backend):
    op = fourbit.paged_attention if kind == "decode" else fourbit.paged_prefill_attention
    return op(q, k_cache, v_cache, batch, backend=backend)


@pytest.mark.parametrize("kind,device,backend", ATTENTION_CASES)
@pytest.mark.parametrize("whole_head", [False, True], ids=["one-element", "whole-head"])
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")  # the Triton interpreter, on the NaN row
def test_nan_query_gives_nan_out(whole_head, kind, backend, device):
    """A NaN in one query head (one element, or all of them: every score NaN, which an
    online softmax whose running max ignores NaN would turn into 0) makes exactly that
    head's output NaN (every element), in decode and prefill alike; every other token and
    head stays finite."""
    need(device, backend, OP_OF[kind])
    q, k_cache, v_cache, batch, _ = random_paged_batch(kind, device)
    token, head = int(torch.randint(0, q.shape[0], ())), int(torch.randint(0, q.shape[1], ()))
    q[token, head, slice(None) if whole_head else int(torch.randint(0, q.shape[2], ()))] = float("nan")
    out = attend(kind, q, k_cache, v_cache, batch, backend)
    expected = torch.zeros(q.shape[:2], dtype=torch.bool, device=device)
    expected[token, head] = True
    assert torch.isnan(out[token, head]).all()
    assert torch.equal(torch.isnan(out).any(-1), expected)
    assert torch.isfinite(out[~expected]).all()


@pytest.mark.parametrize("kind,device,backend", ATTENTION_CASES)
def test_nan_in_slots_past_every_sequence_does_not_leak(kind, backend, device):
    """Slots past a sequence's end and pages no sequence holds keep what they held before
    (a freed sequence's keys and values, NaN or inf included): no output may change."""
    need(device, backend, OP_OF[kind])
    q, k_cache, v_cache, batch, block_tables = random_paged_batch(kind, device)
    clean = attend(kind, q, k_cache, v_cache, batch, backend)
    block_size = k_cache.shape[1]
    seq_lens = batch.seq_lens.cpu().tolist()
    stale = torch.ones(k_cache.shape[:2], dtype=torch.bool)  # [num_blocks, block_size]
    for b, n in enumerate(seq_lens):
        for t in range(n):
            stale[block_tables[b, t // block_size], t % block_size] = False
    stale = stale.to(device)
    k_dirty, v_dirty = k_cache.clone(), v_cache.clone()
    k_dirty[stale] = float("nan")
    v_dirty[stale] = float("nan")
    k_dirty[stale.nonzero()[0, 0], stale.nonzero()[0, 1]] = float("inf")
    out = attend(kind, q, k_dirty, v_dirty, batch, backend)
    assert torch.isfinite(out).all()
    assert torch.equal(out, clean)


@pytest.mark.parametrize("device,backend", backend_cases("paged_prefill_attention"))
def test_nan_in_a_new_token_reaches_only_the_queries_after_it(backend, device):
    """Causality holds for NaN too: a NaN key and value at the last new token of a prefill
    chunk make that token's output NaN and leave the earlier queries of its sequence (which
    do not see it) finite and unchanged."""
    need(device, backend, "paged_prefill_attention")
    q, k_cache, v_cache, batch, block_tables = random_paged_batch("prefill", device)
    clean = attend("prefill", q, k_cache, v_cache, batch, backend)
    b, block_size = 1, k_cache.shape[1]
    position = int(batch.seq_lens[b]) - 1  # sequence b's last token, its last query
    first, last = int(batch.query_start_loc[b]), int(batch.query_start_loc[b + 1]) - 1
    page, row = int(block_tables[b, position // block_size]), position % block_size
    k_cache[page, row], v_cache[page, row] = float("nan"), float("nan")
    out = attend("prefill", q, k_cache, v_cache, batch, backend)
    nan_tokens = torch.isnan(out).any(-1).any(-1).nonzero().flatten().tolist()
    assert nan_tokens == [last] and last > first
    assert torch.equal(torch.cat([out[:last], out[last + 1:]]), torch.cat([clean[:last], clean[last + 1:]]))
