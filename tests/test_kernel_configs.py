"""Config pruning and attention tile choice against the recorded properties of every
supported GPU (backends/devices.py), on the CPU: the pruners never keep a config that does
not fit, always keep one, and the committed `make kernel-check` table (compiled offline
for every target) says every config they can select fits and does not spill."""

import json
import os
import sys

import pytest
import torch

from fourbit.backends import devices, triton_import_error
from helpers import DTYPES

pytestmark = pytest.mark.skipif(triton_import_error() is not None, reason="triton is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "bench", "results", "kernels-static.json")
GPUS = devices.RECORDED
GROUP_LENS = [32, 64, 128, 256, 4096]
# (N, K) of real 7B/8B layers and awkward ones; M_BUCKET over the whole GEMM range (M 5..511).
LAYERS = {"N4096-K4096": (4096, 4096), "N11008-K4096": (11008, 4096), "N4096-K14336": (4096, 14336),
          "N128256-K4096": (128256, 4096), "N1000-K576": (1000, 576), "N40-K1000": (40, 1000)}
M_BUCKETS = [8, 16, 32, 64, 128, 256, 512]
HEAD_DIMS = [64, 80, 96, 128, 256]


@pytest.fixture(scope="module")
def mm():
    from fourbit.kernels import int4_matmul
    return int4_matmul


def size(dtype):
    return torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("gpu", GPUS.values(), ids=GPUS.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("group_len", GROUP_LENS)
@pytest.mark.parametrize("layer", LAYERS.values(), ids=LAYERS.keys())
def test_gemm_pruner_keeps_only_fitting_configs(mm, layer, group_len, dtype, gpu):
    """The crash of issue 12: on a 99 KB part the pruner fell back to a config that did not
    fit. Now every M keeps at least one config, and every one kept fits."""
    n, _ = layer
    for m_bucket in M_BUCKETS:
        kept = mm.select_gemm(mm.gemm_configs(), m_bucket, n, size(dtype), group_len, gpu)
        assert kept, (m_bucket, n)
        for c in kept:
            assert mm.gemm_shared_bytes(c, size(dtype), group_len) <= gpu.max_shared_mem, (m_bucket, c)
            assert c.kwargs["BLOCK_M"] <= max(16, m_bucket)


@pytest.mark.parametrize("gpu", GPUS.values(), ids=GPUS.keys())
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_pruners_count_fp32_scales_and_offsets_beside_16_bit_x(mm, x_dtype, gpu):
    """Exact imports keep fp32 offsets beside fp16 scales (format version 2): the pruners
    read the wider element size from the launch's s_ptr / m_ptr, and at group 32 (scale tiles
    staged per stage) keep only what fits with 4-byte scale tiles."""
    x = torch.empty(1, 4096, dtype=x_dtype)
    args = {"x_ptr": x, "s_ptr": torch.empty(0, dtype=torch.float16), "m_ptr": torch.empty(0, dtype=torch.float32),
            "N": 4096, "K": 4096, "M_BUCKET": 256}
    kept = mm.prune_gemm(mm.gemm_configs(), args, gpu, GROUP_LEN=32)
    assert kept and all(mm.gemm_shared_bytes(c, 2, 32, 4) <= gpu.max_shared_mem for c in kept)
    wide = [c for c in mm.gemm_configs_for(mm.gemm_configs(), 2) if c.kwargs["BLOCK_K"] > 32]
    assert all(mm.gemm_shared_bytes(c, 2, 32, 4) > mm.gemm_shared_bytes(c, 2, 32) for c in wide)
    kept = mm.prune_gemv(mm.gemv_configs(), args, gpu, GROUP_LEN=32)
    assert kept and all(mm.gemv_shared_bytes(c, 2, 4) <= gpu.max_shared_mem for c in kept)


@pytest.mark.parametrize("gpu", GPUS.values(), ids=GPUS.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_every_gpu_keeps_several_gemm_candidates(mm, dtype, gpu):
    """Small tiles and 2-stage pipelines: even the 99 KB parts time more than one config
    at every M (fp16/bf16)."""
    for m_bucket in M_BUCKETS:
        kept = mm.select_gemm(mm.gemm_configs(), m_bucket, 4096, size(dtype), 32, gpu)
        assert len(kept) >= (2 if dtype != torch.float32 else 1), m_bucket


def test_quick_lists_are_subsets_of_the_production_lists(mm):
    """Tests on a GPU (FOURBIT_TRITON_TUNE=quick) tune over production configs, pruned alike."""
    from fourbit.backends import triton_int4

    full = {str(c) for c in mm.gemm_configs()} | {str(c) for c in mm.gemv_configs()}
    def pick(configs, names, keep):
        return [c for c in configs if tuple(c.kwargs[n] for n in names) in keep]

    quick_gemv = pick(mm.gemv_configs(), ("BLOCK_N", "BLOCK_K", "SPLIT_K"), triton_int4._QUICK_GEMV)
    quick_gemm = pick(mm.gemm_configs(), ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"), triton_int4._QUICK_GEMM)
    assert len(quick_gemv) >= len(triton_int4._QUICK_GEMV) and len(quick_gemm) >= len(triton_int4._QUICK_GEMM)
    assert {str(c) for c in quick_gemv + quick_gemm} <= full


@pytest.mark.parametrize("gpu", GPUS.values(), ids=GPUS.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layer", LAYERS.values(), ids=LAYERS.keys())
def test_gemv_pruner_keeps_only_fitting_configs(mm, layer, dtype, gpu):
    n, k = layer
    kept = mm.select_gemv(mm.gemv_configs(), n, k, size(dtype), gpu)
    assert kept
    assert all(mm.gemv_shared_bytes(c, size(dtype)) <= gpu.max_shared_mem for c in kept)


def test_pruners_as_autotune_sees_them(mm):
    """The autotuner calls early_config_prune(configs, named_args, **constexprs): the
    launcher binds the device, GROUP_LEN arrives as a keyword."""
    x = torch.empty(5, 4096, dtype=torch.float16)
    args = {"x_ptr": x, "s_ptr": x, "m_ptr": x, "M_BUCKET": 8, "N": 4096, "K": 4096}
    kept = mm.prune_gemm(mm.gemm_configs(), args, GPUS["rtx4090"], GROUP_LEN=128)
    assert kept == mm.select_gemm(mm.gemm_configs(), 8, 4096, 2, 128, GPUS["rtx4090"])
    assert mm.prune_gemv(mm.gemv_configs(), args, GPUS["rtx4090"], GROUP_LEN=128)


def test_no_fitting_config_is_an_error_not_a_crash_on_the_device(mm):
    tiny = devices.DeviceProps("tiny", (7, 5), 40, 1024)
    with pytest.raises(RuntimeError, match="shared memory"):
        mm.select_gemm(mm.gemm_configs(), 16, 4096, 2, 128, tiny)


@pytest.mark.parametrize("gpu", GPUS.values(), ids=GPUS.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_attention_tiles_fit(kind, head_dim, dtype, gpu):
    """Prefill crashed at head_dim 256 (and fp32 from 128) on sm_86/89 with fixed 64x64
    tiles: the tiles now follow head_dim, dtype and the GPU."""
    from fourbit.backends.triton_attention import attention_shared_bytes, attention_tiles

    for group in (1, 4, 8):
        bm, bn, warps, stages = attention_tiles(kind, head_dim, dtype, gpu, group=group)
        assert attention_shared_bytes(bm, bn, stages, head_dim, size(dtype)) <= gpu.max_shared_mem
        assert bm >= 16 and bn >= 16 and warps in (4, 8) and stages >= 1
        if kind == "decode":
            assert bm >= group


def test_device_props_of_a_cpu_device():
    assert devices.current(torch.device("cpu")) is devices.INTERPRETER
    assert GPUS["rtx4090"].arch == 89 and GPUS["h100"].arch == 90


@pytest.fixture(scope="module")
def table():
    if not os.path.exists(TABLE):
        pytest.fail("bench/results/kernels-static.json is missing: run `make kernel-check` and commit it")
    with open(TABLE) as f:
        return json.load(f)


def test_committed_table_says_every_selectable_config_fits(table):
    assert table["failures"] == []
    assert table["triton_rows"]
    for row in table["triton_rows"]:
        where = (row["kernel"], row["device"], row["dtype"], row["config"])
        assert "error" not in row, where
        assert row["shared"] <= row["limit"], where
        if row["estimate"] is not None:
            assert row["shared"] <= row["estimate"], where  # the pruner's estimate is an upper bound
        assert not row["spills"], where
    for row in table["cuda_rows"]:
        assert not row["spills"], row


def test_committed_table_covers_the_current_configs(table):
    """Every config the pruners and tile choice can take today is in the committed table:
    changing a config list without rerunning `make kernel-check` fails here."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import kernel_check
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    jobs = {(j["kernel"], j["device"], j["dtype"], j["config"]) for j in kernel_check._jobs()}
    rows = {(r["kernel"], r["device"], r["dtype"], r["config"]) for r in table["triton_rows"]}
    assert jobs <= rows, sorted(jobs - rows)[:10]
    for gpu in GPUS:
        assert any(r["device"] == gpu for r in table["triton_rows"]), gpu


@pytest.mark.parametrize("policy", ["quick", "full"])
def test_autotuners_prune_through_the_launch_device(mm, policy):
    """The launcher's autotuners call the pure pruners with the launch's device (the
    interpreter's properties for a CPU tensor): the same lists and pruners as production."""
    from fourbit.backends import triton_int4

    gemv, gemm = triton_int4._tuned_kernels(policy)
    x = torch.empty(5, 4096, dtype=torch.float16)
    args = {"x_ptr": x, "s_ptr": x, "m_ptr": x, "M_BUCKET": 8, "N": 4096, "K": 4096}
    kept = gemm.early_config_prune(gemm.configs, args, GROUP_LEN=128, FP32_DOT=False)
    assert kept == mm.select_gemm(gemm.configs, 8, 4096, 2, 128, devices.INTERPRETER)
    assert gemv.early_config_prune(gemv.configs, args, GROUP_LEN=128)
