"""The CPU implementations of the schemas (csrc/cpu/routes.cpp): calls for the C++ backends
run their kernels without entering Python; every other call on CPU tensors reaches the op's
Python router (ops.py), its exceptions intact. Checked by installing routes that record and
refuse, so a call that reaches Python is seen, then putting ops.py's routers back."""

import pytest
import torch

import fourbit
from fourbit import dispatch, ops
from fourbit.backends import _C
from test_attention import PagedSetup

pytestmark = pytest.mark.skipif(_C is None, reason="the C++ extension is not built")


class ReachedPython(LookupError):
    pass


@pytest.fixture
def python_calls():
    """Routes that record each op reaching Python and raise ReachedPython; ops.py's own
    routers are installed again afterwards. int4_kernel_rows = 8: "cpu" int4_mm from 8 rows
    goes to Python."""
    calls = []

    def refuse(name):
        def route(*args):
            calls.append((name, args[-1]))
            raise ReachedPython(name)
        return route
    _C.install_cpu_routes({name: refuse(name) for name in ops._IMPLS}, 8)
    try:
        yield calls
    finally:
        _C.install_cpu_routes(ops._IMPLS, min(dispatch.CPU_DENSE_MIN_M.values()))


def int4_args(m, k=256, n=48, group_len=64):
    weight = fourbit.quantize_weight(torch.randn(n, k), group_len)
    return torch.randn(m, k), weight.qweight, weight.scales, weight.offsets, weight.group_len


def test_the_cpu_kernels_run_without_python(python_calls):
    """Each C++ backend's call gives the kernel's own result, bit for bit, and no call
    reaches Python."""
    x, q, s, o, g = int4_args(3)
    bias = torch.randn(48)
    assert torch.equal(torch.ops.fourbit.int4_mm(x, q, s, o, g, bias, "cpu"), _C.int4_mm_cpu(x, q, s, o, g, bias))
    assert torch.equal(torch.ops.fourbit.int4_mm(x, q, s, o, g, None, "cpu-a8"), _C.int4_a8_mm_cpu(x, q, s, o, g))
    w8 = torch.randint(-127, 128, (40, 64), dtype=torch.int8)
    s8 = torch.rand(40, 2) / 64
    assert torch.equal(torch.ops.fourbit.int8_mm(x[:, :64], w8, s8, 32, None, "cpu"),
                       _C.int8_mm_cpu(x[:, :64], w8, s8, 32))
    setup = PagedSetup([5, 19], 2, 64, 16, torch.float32)
    q_attn = torch.randn(2, 4, 64)
    assert torch.equal(
        torch.ops.fourbit.paged_attention(q_attn, setup.k_cache, setup.v_cache, setup.block_tables, setup.seq_lens,
                                          0.125, "cpu"),
        _C.paged_attention_cpu(q_attn, setup.k_cache, setup.v_cache, setup.block_tables, setup.seq_lens, 0.125))
    starts = torch.tensor([0, 2, 5], dtype=torch.int32)
    q_pre = torch.randn(5, 4, 64)
    args = (setup.k_cache, setup.v_cache, setup.block_tables, setup.seq_lens, starts, 3, 0.125)
    assert torch.equal(torch.ops.fourbit.paged_prefill_attention(q_pre, *args, "cpu"),
                       _C.paged_prefill_attention_cpu(q_pre, *args))
    k_new, v_new = torch.randn(2, 2, 64), torch.randn(2, 2, 64)
    slots = torch.tensor([3, -1], dtype=torch.int64)
    torch.ops.fourbit.write_kv(k_new, v_new, setup.k_cache, setup.v_cache, slots, "cpu")
    assert torch.equal(setup.k_cache[0, 3], k_new[0]) and torch.equal(setup.v_cache[0, 3], v_new[0])
    assert python_calls == []


def test_every_other_call_reaches_the_python_router(python_calls):
    """The reference backend of each op, and "cpu" int4_mm from int4_kernel_rows rows (where
    dispatch.cpu_int4_path may pick the dense path), go to Python; the route's own exception
    comes back as itself."""
    x, q, s, o, g = int4_args(3)
    with pytest.raises(ReachedPython):
        torch.ops.fourbit.int4_mm(x, q, s, o, g, None, "torch")
    x8, q8, s8, o8, g8 = int4_args(8)
    with pytest.raises(ReachedPython):
        torch.ops.fourbit.int4_mm(x8, q8, s8, o8, g8, None, "cpu")
    with pytest.raises(ReachedPython):
        torch.ops.fourbit.int8_mm(x, torch.zeros(4, 256, dtype=torch.int8), torch.ones(4, 1), 256, None, "torch")
    setup = PagedSetup([5], 2, 64, 16, torch.float32)
    with pytest.raises(ReachedPython):
        torch.ops.fourbit.paged_attention(torch.randn(1, 4, 64), setup.k_cache, setup.v_cache, setup.block_tables,
                                          setup.seq_lens, 0.125, "torch")
    with pytest.raises(ReachedPython):
        torch.ops.fourbit.paged_prefill_attention(torch.randn(1, 4, 64), setup.k_cache, setup.v_cache,
                                                  setup.block_tables, setup.seq_lens,
                                                  torch.tensor([0, 1], dtype=torch.int32), 1, 0.125, "torch")
    with pytest.raises(ReachedPython):
        torch.ops.fourbit.write_kv(torch.randn(1, 2, 64), torch.randn(1, 2, 64), setup.k_cache, setup.v_cache,
                                   torch.tensor([0]), "torch")
    assert python_calls == [("int4_mm", "torch"), ("int4_mm", "cpu"), ("int8_mm", "torch"),
                            ("paged_attention", "torch"), ("paged_prefill_attention", "torch"), ("write_kv", "torch")]


def test_the_python_router_computes_what_it_did():
    """With ops.py's routers installed, the reference backend through the C++ route equals
    the reference called directly (the arguments cross unchanged, None bias included)."""
    x, q, s, o, g = int4_args(5)
    for bias in (None, torch.randn(48)):
        assert torch.equal(torch.ops.fourbit.int4_mm(x, q, s, o, g, bias, "torch"),
                           fourbit.reference.int4_mm(x, q, s, o, g, bias))


def test_install_cpu_routes_refuses_incomplete_routes():
    """A refused install names what is missing and leaves the installed routes whole."""
    def refuse(*args):
        raise ReachedPython
    with pytest.raises(ValueError, match="no Python implementation given for write_kv"):
        _C.install_cpu_routes({name: refuse for name in ops._IMPLS if name != "write_kv"}, 8)
    with pytest.raises(ValueError, match="implementation of int4_mm is not callable"):
        _C.install_cpu_routes({**{name: refuse for name in ops._IMPLS}, "int4_mm": 3}, 8)
    x, q, s, o, g = int4_args(2)
    assert torch.equal(torch.ops.fourbit.int4_mm(x, q, s, o, g, None, "torch"),
                       fourbit.reference.int4_mm(x, q, s, o, g, None))
