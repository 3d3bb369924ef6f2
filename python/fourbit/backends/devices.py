"""What a kernel's tile choice needs to know about a GPU: DeviceProps, the recorded
properties of the GPUs fourbit promises to run on (RECORDED), and current(device) for the
one a launch runs on.

Config pruning (kernels/int4_matmul.py) and attention tile choice (triton_attention.py)
are pure functions of a DeviceProps, so the tests and `make kernel-check` run them for an
RTX 3090, an RTX 4090, an A100, an H100 and an RTX 5090 on a machine without any GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import torch


@dataclasses.dataclass(frozen=True)
class DeviceProps:
    """name; capability (major, minor); sms: streaming multiprocessors; max_shared_mem: the
    opt-in shared memory one block may use, in bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin)."""

    name: str
    capability: tuple[int, int]
    sms: int
    max_shared_mem: int

    @property
    def arch(self) -> int:
        """The capability as Triton's target number: (8, 9) -> 89."""
        return 10 * self.capability[0] + self.capability[1]


# From cudaGetDeviceProperties on each part (the CUDA programming guide's table of compute
# capabilities gives the same opt-in limits: 99 KB on sm_86/89/120, 163 KB on sm_80, 227 KB
# on sm_90).
RECORDED = {
    "rtx3090": DeviceProps("NVIDIA GeForce RTX 3090", (8, 6), 82, 101376),
    "rtx4090": DeviceProps("NVIDIA GeForce RTX 4090", (8, 9), 128, 101376),
    "a100": DeviceProps("NVIDIA A100-SXM4-80GB", (8, 0), 108, 166912),
    "h100": DeviceProps("NVIDIA H100 80GB HBM3", (9, 0), 132, 232448),
    "rtx5090": DeviceProps("NVIDIA GeForce RTX 5090", (12, 0), 170, 101376),
}

# The interpreter (and any CPU tensor): one SM, no shared-memory limit worth pruning by.
INTERPRETER = DeviceProps("Triton interpreter", (0, 0), 1, 1 << 30)


def _optin_shared_mem(p, capability: tuple[int, int]) -> int:
    # torch names it shared_memory_per_block_optin (older builds: none; then fall back to
    # the architecture's documented limit, or the 48 KB every CUDA GPU gives a block).
    for attr in ("shared_memory_per_block_optin", "max_shared_memory_per_block_optin"):
        value = getattr(p, attr, None)
        if value:
            return int(value)
    by_arch = {props.capability: props.max_shared_mem for props in RECORDED.values()}
    return by_arch.get(capability, 49152)


@functools.cache
def _cuda_props(index: int) -> DeviceProps:
    p = torch.cuda.get_device_properties(index)
    capability = (p.major, p.minor)
    return DeviceProps(p.name, capability, p.multi_processor_count, _optin_shared_mem(p, capability))


def current(device: torch.device | int | None = None) -> DeviceProps:
    """The DeviceProps of a CUDA device (the current one when None); INTERPRETER for a CPU
    device or when no CUDA GPU is visible."""
    if isinstance(device, torch.device) and device.type != "cuda":
        return INTERPRETER
    if not torch.cuda.is_available():
        return INTERPRETER
    if device is None:
        index = torch.cuda.current_device()
    elif isinstance(device, int):
        index = device
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_props(index)
