"""Every knob of motion-transfer guidance in one validated dataclass.

Two recipes share one code path:

- ``recipe="fastvmt"`` (default): FastVMT (arXiv 2602.05551) with the official code's bugs fixed -- Q/K from block 14
  averaged per head (Q1), sliding-window AMF over the pairs ``j in [i, i + span)`` on absolute displacements
  (Q2-Q4), 10 AdamW iterations per guided step on an fp32 master latent (Q8) with lr 0.003 -> 0.0021, gradient reuse
  (only iterations ``j % reuse_interval == 0`` run the transformer), passes truncated at the motion block (Q10).
- ``recipe="ditflow"``: DiTFlow (arXiv 2412.07776) for side-by-side runs -- global AMF over all ordered frame pairs,
  hard-argmax reference at a clean latent, masked MSE, Adam lr 0.002 -> 0.001 across the guided steps (constant inside
  a step), 5 iterations, no reuse, temperature 2, attention logits averaged over heads (DiTFlow's code).

Fields left as ``None`` take the recipe's value in ``__post_init__``; after construction every field is concrete.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

RECIPES = ("fastvmt", "ditflow")
WINDOW_SOURCES = ("own", "reference")
HEAD_REDUCTIONS = ("mean_qk", "mean_flow", "mean_logits")  # = fastvmt_kernels.motion_flow.HEAD_REDUCTIONS
DITFLOW_HEAD_REDUCTIONS = ("mean_logits", "mean_qk")
LR_SCHEDULES = ("within_step", "across_steps")
INIT_LATENTS = ("noise", "reference")
KERNEL_BACKENDS = ("auto", "triton", "torch")
REFERENCE_CURRENT_T = "current_t"

# Recipe presets for the fields that default to None.
_RECIPE_DEFAULTS = {
    "fastvmt": dict(
        inner_iters=10,
        lr_start=0.003,
        lr_end=0.0021,
        lr_schedule="within_step",
        weight_decay=0.01,
        reuse_interval=3,
        temperature=1.0,
        head_reduce="mean_qk",
        reference_noise=REFERENCE_CURRENT_T,
    ),
    "ditflow": dict(
        inner_iters=5,
        lr_start=0.002,
        lr_end=0.001,
        lr_schedule="across_steps",
        weight_decay=0.0,
        reuse_interval=1,
        temperature=2.0,
        head_reduce="mean_logits",
        reference_noise=0.0,
    ),
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class MotionTransferConfig:
    """Motion-transfer guidance settings (defaults: the FastVMT recipe with the official code's bugs fixed).

    Attributes:
        recipe: "fastvmt" (sliding-window AMF + corresponding-window loss, gradient reuse) or "ditflow" (global AMF,
            hard-argmax reference, masked MSE, Adam). Fields below marked *recipe* default to the recipe's value.
        motion_block: transformer block whose self-attention Q/K (after norm and RoPE) define the motion; guidance
            passes run the transformer only up to this block's attention projections.
        guided_steps: number of leading denoising steps (of those actually run) that are preceded by guidance.
        inner_iters: *recipe* (10 / 5) optimisation iterations per guided step.
        lr_start, lr_end: *recipe* learning rate at the first and last iteration ("within_step": 0.003 -> 0.0021
            linearly over the inner iterations of every guided step) or at the first and last guided step
            ("across_steps": 0.002 -> 0.001, constant inside a step).
        lr_schedule: *recipe* "within_step" or "across_steps".
        weight_decay: *recipe* decoupled (AdamW) weight decay on the fp32 master latent (0.01 / 0.0 = Adam).
        betas, eps: Adam moments' decay rates and denominator epsilon (PyTorch defaults).
        reuse_interval: *recipe* only iterations ``j % reuse_interval == 0`` run a forward+backward pass; the others
            repeat the AdamW update with the cached gradient and run no transformer forward (3 / 1 = no reuse).
        carry_gradient_across_steps: reuse the last cached gradient at iteration 0 of the next guided step too (the
            paper's wording); False recomputes at iteration 0 as the official code does.
        span: temporal pairs ``(i, j)`` with ``i <= j < i + span`` (fastvmt only).
        tile: (th, tw) query tile in tokens for the sliding-window AMF (fastvmt only).
        window: side of the square key window in tokens (fastvmt only).
        temperature: *recipe* inverse temperature multiplying the scaled logits (1.0 / 2.0).
        head_reduce: *recipe* ("mean_qk" / "mean_logits") how the heads' Q and K make one flow: "mean_qk" averages Q
            and K over heads before the AMF (FastVMT's intent); "mean_logits" averages the per-head attention logits
            before each softmax (DiTFlow's code), i.e. one dot product over the heads' concatenated channels with
            temperature / sqrt(H); "mean_flow" computes a flow per head and averages the flows (fastvmt only).
        window_source: "own" (each video's coarse pass picks its windows: the paper) or "reference" (the generated
            video's fine pass uses the windows the reference picked, so both soft argmaxes run over the same keys:
            the bias of a windowed soft argmax towards the window centre cancels in the loss, and the guidance
            passes skip the coarse pass). The window loss uses the same windows (fastvmt only).
        amf_weight, window_weight: loss weights of the AMF and corresponding-window terms (5 and 1; fastvmt only).
        reference_noise: *recipe* noise level of the reference pass: "current_t" re-noises the reference at the current
            timestep with a fixed noise draw (the official code), or a float sigma in [0, 1) for a fixed level
            (0.0 = the clean latent, as DiTFlow and the FastVMT paper describe); a fixed level is computed once.
        init_latent: "noise" starts from pure noise; "reference" starts from the reference latent noised to
            ``init_strength`` (SDEdit, as the official code with 0.75), skipping the first denoising steps.
        init_strength: in (0, 1]; with "reference", the last ``round(init_strength * num_inference_steps)`` steps run.
        gradient_checkpointing: recompute the truncated blocks during backward to save memory; "auto" turns it on
            when the estimated activations of a gradient pass exceed 80% of the free CUDA memory (never on CPU).
        kernel_backend: backend for ``fastvmt_kernels`` calls ("auto": Triton on CUDA, torch otherwise).
    """

    recipe: str = "fastvmt"
    motion_block: int = 14
    guided_steps: int = 10
    inner_iters: Optional[int] = None
    lr_start: Optional[float] = None
    lr_end: Optional[float] = None
    lr_schedule: Optional[str] = None
    weight_decay: Optional[float] = None
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    reuse_interval: Optional[int] = None
    carry_gradient_across_steps: bool = False
    span: int = 4
    tile: Tuple[int, int] = (3, 4)
    window: int = 21
    temperature: Optional[float] = None
    head_reduce: Optional[str] = None
    window_source: str = "own"
    amf_weight: float = 5.0
    window_weight: float = 1.0
    reference_noise: Union[str, float, None] = None
    init_latent: str = "noise"
    init_strength: float = 0.75
    gradient_checkpointing: Union[bool, str] = "auto"
    kernel_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        for name, value in _RECIPE_DEFAULTS[self.recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def need_int(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

        def need_positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            ok = _is_number(value) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
            if not ok:
                bound = ">= 0" if allow_zero else "> 0"
                raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")

        need_int("motion_block", 0)
        need_int("guided_steps", 0)
        need_int("inner_iters", 1)
        need_int("reuse_interval", 1)
        need_int("span", 1)
        need_int("window", 1)
        need_positive("lr_start", allow_zero=True)
        need_positive("lr_end", allow_zero=True)
        need_positive("weight_decay", allow_zero=True)
        need_positive("eps")
        need_positive("temperature")
        need_positive("amf_weight", allow_zero=True)
        need_positive("window_weight", allow_zero=True)
        if self.recipe == "fastvmt" and self.amf_weight == 0 and self.window_weight == 0:  # ditflow ignores both
            raise ValueError("amf_weight and window_weight are both 0: the guidance loss would be identically zero")
        if self.recipe == "fastvmt" and self.amf_weight == 0 and self.span <= 2:
            raise ValueError(f"amf_weight is 0 and span is {self.span}: the window loss compares windows of successive "
                             "target frames j > i, which needs span >= 3, so the guidance loss would be identically zero")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.head_reduce not in HEAD_REDUCTIONS:
            raise ValueError(f"head_reduce must be one of {HEAD_REDUCTIONS}, got {self.head_reduce!r}")
        if self.recipe == "ditflow" and self.head_reduce not in DITFLOW_HEAD_REDUCTIONS:
            raise ValueError(f"the ditflow recipe takes head_reduce in {DITFLOW_HEAD_REDUCTIONS} (its global AMF and "
                             f"hard-argmax reference are one map per video), got {self.head_reduce!r}")
        if self.window_source not in WINDOW_SOURCES:
            raise ValueError(f"window_source must be one of {WINDOW_SOURCES}, got {self.window_source!r}")
        if self.init_latent not in INIT_LATENTS:
            raise ValueError(f"init_latent must be one of {INIT_LATENTS}, got {self.init_latent!r}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}")
        if not (_is_number(self.init_strength) and 0 < self.init_strength <= 1):
            raise ValueError(f"init_strength must be in (0, 1], got {self.init_strength!r}")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else None
        if betas is None or len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = betas
        tile = tuple(self.tile) if isinstance(self.tile, (tuple, list)) else None
        if tile is None or len(tile) != 2 or not all(_is_int(t) and t >= 1 for t in tile):
            raise ValueError(f"tile must be two ints >= 1 (rows, cols) in tokens, got {self.tile!r}")
        self.tile = tile
        ref = self.reference_noise
        if not (ref == REFERENCE_CURRENT_T or (_is_number(ref) and 0 <= ref < 1)):
            raise ValueError(
                f"reference_noise must be {REFERENCE_CURRENT_T!r} or a sigma in [0, 1) (0 = clean reference), got {ref!r}"
            )
        if not isinstance(self.carry_gradient_across_steps, bool):
            raise ValueError(f"carry_gradient_across_steps must be a bool, got {self.carry_gradient_across_steps!r}")
        if not (isinstance(self.gradient_checkpointing, bool) or self.gradient_checkpointing == "auto"):
            raise ValueError(f"gradient_checkpointing must be a bool or 'auto', got {self.gradient_checkpointing!r}")

    # ------------------------------------------------------------------ schedule helpers
    @property
    def reference_is_fixed(self) -> bool:
        """True when the reference pass uses one fixed noise level (its flow is then computed once)."""
        return self.reference_noise != REFERENCE_CURRENT_T

    def learning_rate(self, guided_index: int, iteration: int, guided_total: Optional[int] = None) -> float:
        """Learning rate of inner ``iteration`` (0-based) at guided step ``guided_index`` (0-based) of
        ``guided_total`` guided steps (default ``guided_steps``; fewer when the run has fewer denoising steps, e.g.
        ``init_latent="reference"``: "across_steps" then still ends at ``lr_end``)."""
        if self.lr_schedule == "within_step":
            frac = iteration / (self.inner_iters - 1) if self.inner_iters > 1 else 0.0
        else:
            total = self.guided_steps if guided_total is None else guided_total
            frac = guided_index / (total - 1) if total > 1 else 0.0
        return self.lr_start + (self.lr_end - self.lr_start) * frac

    def computes_gradient(self, iteration: int, has_cached_gradient: bool) -> bool:
        """Whether inner ``iteration`` runs a forward+backward pass (else it reuses the cached gradient)."""
        if iteration == 0 and self.carry_gradient_across_steps and has_cached_gradient:
            return False
        return iteration % self.reuse_interval == 0

    @property
    def gradient_iterations(self) -> int:
        """Inner iterations that run a forward+backward pass over all ``guided_steps`` (carried gradients counted);
        the other ``guided_steps * inner_iters - gradient_iterations`` reuse the cached gradient."""
        count, cached = 0, False
        for _ in range(self.guided_steps):
            for j in range(self.inner_iters):
                if self.computes_gradient(j, cached):
                    count, cached = count + 1, True
        return count

    def replace(self, **changes) -> "MotionTransferConfig":
        """A validated copy with ``changes`` applied. Changing ``recipe`` switches the recipe-dependent fields that
        still hold the old recipe's presets to the new recipe's (fields set to other values, and those in
        ``changes``, are kept), so ``MotionTransferConfig().replace(recipe="ditflow")`` equals
        ``MotionTransferConfig(recipe="ditflow")``. A ``head_reduce`` the new recipe does not take ("mean_flow" for
        ditflow) switches to its preset too."""
        new_recipe = changes.get("recipe", self.recipe)
        if new_recipe != self.recipe and self.recipe in _RECIPE_DEFAULTS:
            for name, preset in _RECIPE_DEFAULTS[self.recipe].items():
                if name not in changes and getattr(self, name) == preset:
                    changes[name] = None  # __post_init__ fills in the new recipe's preset
            refused = new_recipe == "ditflow" and self.head_reduce not in DITFLOW_HEAD_REDUCTIONS
            if refused and "head_reduce" not in changes:
                changes["head_reduce"] = None
        return dataclasses.replace(self, **changes)
