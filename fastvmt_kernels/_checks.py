"""Input validation shared by the public kernel entry points (explicit ValueErrors)."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("auto", "triton", "torch")


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is one of BACKENDS, else raise a ValueError listing them."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_tensors(names: Sequence[str], tensors: Iterable[torch.Tensor], rank: int, layout_doc: str) -> None:
    """Check that every tensor has ``rank`` dims, one supported dtype shared by all, and one device."""
    tensors = list(tensors)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape {layout_doc}, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must have {rank} dims {layout_doc}, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; accepted: float16, bfloat16, float32")
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        got = ", ".join(f"{n}={t.dtype}" for n, t in zip(names, tensors))
        raise ValueError(f"{', '.join(names)} must share one dtype, got {got}")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        got = ", ".join(f"{n}={t.device}" for n, t in zip(names, tensors))
        raise ValueError(f"{', '.join(names)} must be on one device, got {got}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' for CUDA tensors, 'torch' otherwise."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend
