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


# ---- the embedded model (SmolLM2-135M-Instruct, Q4_1 GGUF) and its peer ----

@pytest.fixture(scope="session")
def smollm_path():
    from fourbit.models import resolve_source
    try:
        return resolve_source("smollm2-135m")
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def smollm(smollm_path):
    """fourbit's SmolLM2 on the CPU in fp32: its Q4_1 layers as Int4Linear."""
    import fourbit
    return fourbit.load_model(smollm_path, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm_hf(smollm_path):
    """The peer: Hugging Face transformers' LlamaForCausalLM from the same GGUF, dequantized, fp32."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name,
                                                              dtype=torch.float32)
    model.generation_config.eos_token_id = None  # stop only where the test says
    return model.eval()


# ---- the (device, backend) pairs that exist, for parametrizing kernel tests ----
# A backend runs on these device types at all (whether it is built here is checked by need()):
# Triton on the CPU through its interpreter, the C++ kernels on the CPU, the CUDA ones on CUDA.
# "cpu-int" (fixed-point activations) is here because "auto" runs it for a few rows: it must
# pass every W4A16 accuracy test; "cpu-a8" (W4A8, other numerics) has its own (test_int4_a8.py).
DEVICE_BACKENDS = {"cpu": ("torch", "cpu", "cpu-int", "triton"), "cuda": ("torch", "triton", "cuda")}


def backend_cases(op: str = "int4_mm", interpreter: bool = True) -> list:
    """pytest params (device, backend), id "device-backend", for every pair that implements op
    on a device type that exists; CUDA pairs marked `cuda`. interpreter=False leaves out
    Triton on the CPU (its interpreter is too slow for big shapes; test_triton.py covers it)."""
    from fourbit.backends import KERNELS
    cases = []
    for device, backends in DEVICE_BACKENDS.items():
        for backend in backends:
            if backend != "torch" and backend not in KERNELS[op]:
                continue
            if device == "cpu" and backend == "triton" and not interpreter:
                continue
            marks = [pytest.mark.cuda] if device == "cuda" else []
            cases.append(pytest.param(device, backend, marks=marks, id=f"{device}-{backend}"))
    return cases


def need(device: str, backend: str, op: str = "int4_mm") -> None:
    """Skip unless backend runs op on device in this installation (built, importable)."""
    from fourbit.backends import unavailable
    reason = unavailable(backend, torch.device(device), op)
    if reason:
        pytest.skip(f"backend {backend!r} cannot run {op} on {device} here: {reason}")
