"""One fused, in-place AdamW step (torch.optim.AdamW semantics) as a single Triton kernel.

Used by gradient reuse: the reuse iterations of motion transfer apply a cached gradient to the fp32 master latent
without any transformer forward, so the whole iteration is this one elementwise kernel (one read of param, grad and
both moments, one write of param and both moments) instead of torch.optim's ~10 separate kernels.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._checks import check_backend
from .device_limits import device_guard

BLOCK_SIZE = 1024
NUM_WARPS = 4
GRAD_DTYPES = (torch.float32, torch.bfloat16)


@triton.jit
def _adamw_kernel(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, numel,
    decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, inv_bias_correction2_sqrt, eps,
    BLOCK: tl.constexpr,
):
    """In place over BLOCK elements: decoupled decay, moment updates, bias-corrected step (fp32 math).

    ``1 - beta`` arrives precomputed in float64 on the host: in fp32 on the device, 1 - fp32(0.999) is off by
    1.3e-5 relative (cancellation), which the second moment would inherit.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    param = tl.load(param_ptr + offs, mask=mask, other=0.0)
    grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
    param = param * decay
    exp_avg = exp_avg + (grad - exp_avg) * one_minus_beta1
    exp_avg_sq = exp_avg_sq * beta2 + grad * grad * one_minus_beta2
    denom = tl.sqrt_rn(exp_avg_sq) * inv_bias_correction2_sqrt + eps  # IEEE sqrt, as torch
    param = param - step_size * exp_avg / denom
    tl.store(param_ptr + offs, param, mask=mask)
    tl.store(exp_avg_ptr + offs, exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, exp_avg_sq, mask=mask)


def _validate(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay) -> None:
    named = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != param.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected param's shape {tuple(param.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if t.device != param.device:
            raise ValueError(f"{name} is on {t.device}, param on {param.device}: all must share one device")
        accepted = GRAD_DTYPES if name == "grad" else (torch.float32,)
        if t.dtype not in accepted:
            raise ValueError(f"{name} has dtype {t.dtype}; accepted: {', '.join(str(d) for d in accepted)}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"step must be an int >= 1 (the step number after increment), got {step!r}")
    for name, value, lo, hi in (("beta1", beta1, 0.0, 1.0), ("beta2", beta2, 0.0, 1.0)):
        if not lo <= value < hi:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


def fused_adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    backend: str = "auto",
) -> None:
    """One in-place AdamW update of ``param`` and its moments, as ``torch.optim.AdamW`` (amsgrad=False).

    ``param *= 1 - lr * weight_decay``; ``m = beta1 m + (1 - beta1) g``; ``v = beta2 v + (1 - beta2) g^2``;
    ``param -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)``.

    Args:
        param, exp_avg, exp_avg_sq: fp32 tensors of one shape (any), contiguous, one device; updated in place.
        grad: same shape, fp32 or bf16 (upcast in the kernel); not modified (may be a cached gradient reused).
        step: the step number after increment (1 for the first update), which sets the bias corrections.
        lr, beta1, beta2, eps, weight_decay: as torch.optim.AdamW.
        backend: "auto" (Triton on CUDA, torch otherwise), "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch".
    """
    check_backend(backend)
    _validate(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay)
    decay = 1.0 - lr * weight_decay
    step_size = lr / (1.0 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    use_triton = backend == "triton" or (backend == "auto" and param.device.type == "cuda")
    if use_triton and param.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {param.device}")
    if not use_triton:
        with torch.no_grad():  # an optimiser step: param may be a leaf that requires grad (an nn.Parameter)
            g = grad.float()
            param.mul_(decay)
            exp_avg.lerp_(g, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)
        return
    numel = param.numel()
    if numel == 0:
        return
    with device_guard(param):
        _adamw_kernel[(triton.cdiv(numel, BLOCK_SIZE),)](
            param, grad, exp_avg, exp_avg_sq, numel,
            decay, beta1, beta2, 1.0 - beta1, 1.0 - beta2, step_size, 1.0 / bias_correction2_sqrt, eps,
            BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS,
        )
    # Written behind autograd's back: bump the version counters as an in-place torch op would, so a graph that
    # saved these tensors before the step fails loudly in backward instead of using the new values.
    torch.autograd.graph.increment_version([t for t in (param, exp_avg, exp_avg_sq) if not t.is_inference()])


def inspect_specs(shared_memory: Optional[int] = None):
    """GPU configuration of the AdamW kernel (fp32 state, bf16 gradient) for the compile report (the same on every
    device: ``shared_memory`` is not used)."""
    from .inspect import KernelSpec

    signature = {name: "fp32" for name in _adamw_kernel.arg_names}
    signature.update(
        {"param_ptr": "*fp32", "grad_ptr": "*bf16", "exp_avg_ptr": "*fp32", "exp_avg_sq_ptr": "*fp32",
         "numel": "i32", "BLOCK": "constexpr"}
    )
    return [
        KernelSpec(
            "adamw_step fp32 state bf16 grad",
            _adamw_kernel,
            signature,
            {"BLOCK": BLOCK_SIZE},
            divisible=["param_ptr", "grad_ptr", "exp_avg_ptr", "exp_avg_sq_ptr"],
            num_warps=NUM_WARPS,
            num_stages=1,
            expects_mma=False,
        )
    ]
