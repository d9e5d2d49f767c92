"""The latent optimisation of one guided denoising step, with gradient reuse.

At guided step g, an fp32 master copy of the latent is optimised for ``inner_iters`` iterations with AdamW (fresh
moments every step, as the official code). Iteration j runs a truncated forward + backward only when
``config.computes_gradient(j, ...)`` (``j % reuse_interval == 0``); the other iterations repeat the update with the
cached gradient through :func:`fastvmt_kernels.fused_adamw_step` and run no transformer forward at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .config import MotionTransferConfig

# loss_fn(latent) -> (loss, parts): latent is the (B, C, F, H, W) fp32 leaf being optimised.
LossFn = Callable[[torch.Tensor], Tuple[torch.Tensor, Dict[str, float]]]


@dataclass
class GuidanceState:
    """What persists across the guided steps of one video.

    Attributes:
        cached_gradient: the last computed fp32 gradient (read at iteration 0 only with
            ``carry_gradient_across_steps``).
        history: one dict per inner iteration: ``step`` (denoising index), ``guided_step``, ``iteration``, ``lr``,
            ``computed`` (whether a gradient was computed) and the loss parts of computed iterations.
        gradient_passes: number of forward+backward passes run so far.
    """

    cached_gradient: Optional[torch.Tensor] = None
    history: List[Dict[str, float]] = field(default_factory=list)
    gradient_passes: int = 0


def latent_gradient(loss_fn: LossFn, master: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
    """d loss / d latent at ``master`` (fp32, same shape); parameters get no gradient."""
    with torch.enable_grad():
        leaf = master.detach().requires_grad_(True)
        loss, parts = loss_fn(leaf)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"guidance loss is not finite ({float(loss)}): lower the learning rate")
        (grad,) = torch.autograd.grad(loss, leaf)
    return grad.float().contiguous(), parts


def guidance_step(
    latents: torch.Tensor,
    loss_fn: LossFn,
    config: MotionTransferConfig,
    state: GuidanceState,
    *,
    step_index: int,
    guided_index: int,
    guided_total: Optional[int] = None,
    progress=None,
) -> torch.Tensor:
    """Optimise ``latents`` for one guided denoising step and return them in their dtype.

    Args:
        latents: (B, C, F, H, W) current denoising latent.
        loss_fn: builds the guidance loss of a latent (truncated passes inside).
        config: the motion-transfer settings (schedule, optimiser, reuse).
        state: per-video :class:`GuidanceState` (cached gradient, history), updated in place.
        step_index: denoising step index (for the history); guided_index: 0-based guided step of ``guided_total``
            guided steps in this run (default ``config.guided_steps``; the "across_steps" learning-rate schedule).
        progress: optional progress bar with ``update()``.
    """
    from fastvmt_kernels import fused_adamw_step

    master = latents.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)
    exp_avg = torch.zeros_like(master)
    exp_avg_sq = torch.zeros_like(master)
    beta1, beta2 = config.betas
    for iteration in range(config.inner_iters):
        lr = config.learning_rate(guided_index, iteration, guided_total)
        record: Dict[str, float] = dict(step=step_index, guided_step=guided_index, iteration=iteration, lr=lr)
        computed = config.computes_gradient(iteration, state.cached_gradient is not None)
        if computed:
            state.cached_gradient, parts = latent_gradient(loss_fn, master)
            state.gradient_passes += 1
            record.update(parts)
        record["computed"] = computed
        fused_adamw_step(
            master,
            state.cached_gradient,
            exp_avg,
            exp_avg_sq,
            iteration + 1,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            backend=config.kernel_backend,
        )
        state.history.append(record)
        if progress is not None:
            progress.update()
            if "loss" in record:
                progress.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
    return master.to(latents.dtype)
