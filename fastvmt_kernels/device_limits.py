"""Per-device hardware limits that pick launch configurations (shared memory per block)."""
from __future__ import annotations

import contextlib
import functools

import torch

# Opt-in shared memory per thread block on Hopper (sm_90: H100, H200): 227 KiB. The kernels' largest pipelined
# configurations are sized for it; devices with less take smaller ones.
HOPPER_SHARED_MEMORY_PER_BLOCK = 227 * 1024
# The smallest opt-in limit among the GPUs the kernels are checked for: Ada (sm_89: L40S, RTX 4090) and consumer
# Ampere (sm_86), 99 KiB (A100, sm_80: 163 KiB).
ADA_SHARED_MEMORY_PER_BLOCK = 99 * 1024
A100_SHARED_MEMORY_PER_BLOCK = 163 * 1024  # opt-in maximum per block on sm_80


@functools.lru_cache(maxsize=None)
def _cuda_shared_memory_per_block(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    return int(optin or props.shared_memory_per_block)


def shared_memory_per_block(device: torch.device) -> int:
    """Bytes of shared memory one thread block may use on ``device`` (the opt-in maximum on CUDA devices).

    Non-CUDA tensors (CPU under ``TRITON_INTERPRET=1``) report Hopper's limit, so the interpreter runs the same
    configurations as an H100.
    """
    if device.type != "cuda":
        return HOPPER_SHARED_MEMORY_PER_BLOCK
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_shared_memory_per_block(index)


def has_hopper_shared_memory(device: torch.device) -> bool:
    """Whether ``device`` offers a thread block at least Hopper's shared memory (227 KiB)."""
    return shared_memory_per_block(device) >= HOPPER_SHARED_MEMORY_PER_BLOCK


def device_guard(tensor: torch.Tensor):
    """A context that makes ``tensor``'s CUDA device the current one (Triton launches on the current device: a
    tensor on ``cuda:1`` while ``cuda:0`` is current would be read from the wrong GPU); a no-op for CPU tensors."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()
