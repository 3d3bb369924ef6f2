import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fourbit
from fourbit.format import GROUP_SIZES, Int4Weight, pack_int4, padded_k, unpack_int4


def pack_by_bit_loop(q: torch.Tensor) -> torch.Tensor:
    """The packing rule spelled out one nibble at a time: nibble i of word j = column 8j+i."""
    n, k = q.shape
    words = torch.zeros(n, k // 8, dtype=torch.int64)
    for j in range(k // 8):
        for i in range(8):
            words[:, j] |= q[:, 8 * j + i].to(torch.int64) << (4 * i)
    return (words - ((words >> 31) << 32)).to(torch.int32)


@given(n=st.integers(1, 9), words=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_pack_follows_the_nibble_rule_and_round_trips(n, words, seed):
    q = torch.randint(0, 16, (n, 8 * words), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (n, words)
    assert torch.equal(packed, pack_by_bit_loop(q))
    assert torch.equal(unpack_int4(packed), q)


def test_pack_extremes_use_the_sign_bit():
    q = torch.full((2, 8), 15, dtype=torch.uint8)
    q[1] = torch.tensor([0, 0, 0, 0, 0, 0, 0, 8])
    assert pack_int4(q).tolist() == [[-1], [-(2**31)]]
    assert torch.equal(unpack_int4(pack_int4(q)), q)


@pytest.mark.parametrize("k,group_size,expected", [
    (4096, 128, 4096), (576, 128, 640), (1000, 32, 1024), (1000, -1, 1000), (1001, -1, 1008), (11008, 256, 11008),
    (11000, 256, 11008)])
def test_padded_k(k, group_size, expected):
    assert padded_k(k, group_size) == expected


@pytest.mark.parametrize("bad", [0, 16, 48, 100, 512, -2, 128.0, True])
def test_group_size_outside_the_set_is_rejected(bad):
    with pytest.raises(ValueError, match="group_size"):
        fourbit.quantize_weight(torch.randn(8, 256), group_size=bad)
    with pytest.raises(ValueError, match="group_size"):
        fourbit.Int4Linear(256, 8, group_size=bad)


def test_int4weight_checks_its_tensors():
    w = fourbit.quantize_weight(torch.randn(16, 256), group_size=128)
    with pytest.raises(ValueError, match="qweight"):
        Int4Weight(w.qweight[:, :-1], w.scales, w.offsets, 128, (16, 256))
    with pytest.raises(TypeError, match="qweight"):
        Int4Weight(w.qweight.to(torch.int64), w.scales, w.offsets, 128, (16, 256))
    with pytest.raises(ValueError, match="scales"):
        Int4Weight(w.qweight, w.scales[:, :1], w.offsets, 128, (16, 256))
    with pytest.raises(TypeError, match="offsets must be one of"):
        Int4Weight(w.qweight, w.scales, w.offsets.int(), 128, (16, 256))
    with pytest.raises(ValueError, match="one device"):
        Int4Weight(w.qweight, w.scales, w.offsets.to("meta"), 128, (16, 256))


def test_int4weight_attributes_and_to():
    w = fourbit.quantize_weight(torch.randn(24, 1000, dtype=torch.bfloat16), group_size=-1, symmetric=True)
    assert w.shape == (24, 1000) and w.group_size == -1 and w.symmetric and w.group_len == 1000
    assert w.qweight.shape == (24, 125) and w.scales.shape == (24, 1) and w.offsets.dtype == torch.bfloat16
    assert torch.equal(w.offsets, -8 * w.scales)
    moved = w.to("meta")
    assert moved.device.type == "meta" and moved.shape == w.shape and moved.group_size == -1
    assert w.dequantize(torch.bfloat16).dtype == torch.bfloat16 and w.dequantize().shape == (24, 1000)


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_dequantize_matches_the_formula(group_size):
    n, k = 12, 520
    k_pad = padded_k(k, group_size)
    glen = k_pad if group_size == -1 else group_size
    q = torch.randint(0, 16, (n, k_pad), dtype=torch.uint8)
    s = torch.rand(n, k_pad // glen) + 0.1
    m = torch.randn(n, k_pad // glen)
    w = Int4Weight(pack_int4(q), s, m, group_size, (n, k))
    cols = torch.arange(k) // glen
    product, offset = q[:, :k].double() * s.double()[:, cols], m.double()[:, cols]
    # Exact in fp64; fp32 may round the product and the sum: one ulp of each term at most.
    ulp = torch.finfo(torch.float32).eps * (product.abs() + offset.abs())
    assert ((w.dequantize().double() - (product + offset)).abs() <= ulp).all()


def test_concat_and_select_rows_are_exact():
    a = fourbit.quantize_weight(torch.randn(6, 100), group_size=32)
    b = fourbit.quantize_weight(torch.randn(4, 100), group_size=32)
    from fourbit.format import concat_rows, select_rows
    both = concat_rows([a, b])
    assert both.shape == (10, 100)
    assert torch.equal(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    perm = torch.randperm(10)
    assert torch.equal(select_rows(both, perm).dequantize(), both.dequantize()[perm])
    with pytest.raises(ValueError, match="K, group size"):
        concat_rows([a, fourbit.quantize_weight(torch.randn(4, 100), group_size=64)])
