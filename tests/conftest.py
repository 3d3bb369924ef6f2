import os
import zlib

import torch

# Without a GPU, Triton kernels run through Triton's interpreter. It must be chosen before
# triton is first imported (fourbit imports it lazily, after this).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, tune over a few configs only (kernels/int4_matmul.py): correctness, not speed.
os.environ.setdefault("FOURBIT_TRITON_TUNE", "quick")

import pytest  # noqa: E402

# Parametrize device-aware tests with this: the CUDA case is marked and skipped without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    """Random data differs between tests and is reproducible for each (seeded by its id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
