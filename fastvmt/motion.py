"""Motion extraction: truncated transformer passes, head-averaged Q/K, attention motion flows and the guidance loss.

A truncated pass runs the Wan transformer only until the self-attention projections of ``motion_block``: no later
block, no attention of that block, no output head (the official code runs 5 blocks and the head too, quirk Q10).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import unwrap_module
from torch.utils.checkpoint import checkpoint as _checkpoint

from .config import MotionTransferConfig
from .processors import StopForward, attention_phase, capture_qk, current_phase, set_token_grid, token_grid_of


@dataclass
class MotionFlow:
    """An attention motion flow of one video batch.

    Attributes:
        flow: (B, P, S, 2) float32 (dy, dx) displacements in tokens, per frame pair and query token of frame i.
        pairs: (P, 2) int64 (i, j) latent-frame pairs.
        windows: fastvmt recipe only -- the int64 window origins returned by ``motion_flow(return_windows=True)``:
            (B, P, n_tiles, 2), or (B, P, H, n_tiles, 2) per head for ``head_reduce="mean_flow"``.
        key: fastvmt recipe only -- the keys the window loss reads (:func:`window_loss_keys`): (B, F, S, D)
            head-averaged, (B, F, S, H * D) for "mean_logits", or (B, F, S, H, D) for "mean_flow".
    """

    flow: torch.Tensor
    pairs: torch.Tensor
    windows: Optional[torch.Tensor] = None
    key: Optional[torch.Tensor] = None


@contextlib.contextmanager
def _lora_scaled(module: torch.nn.Module, scale: float):
    """Inside the block, the PEFT LoRA layers of ``module`` run at ``scale`` (what ``forward``'s
    ``attention_kwargs={"scale": s}`` does for the whole transformer)."""
    if not USE_PEFT_BACKEND or scale == 1.0:
        yield
        return
    scale_lora_layers(module, scale)
    try:
        yield
    finally:
        unscale_lora_layers(module, scale)


def _in_phase(phase: str, lora_scale: float, layer, *args):
    """``layer(*args)`` under attention phase ``phase``, with its LoRA layers at ``lora_scale``.

    Checkpointed blocks are recomputed inside backward, which on CUDA runs in autograd's device thread, where the
    (thread-local) phase marker of the forward is not set, and after the forward has left any scaling context: the
    recomputation must re-enter the forward's phase and LoRA scale, or a phase-selective processor
    (``apply_local_attention(phases="guidance")``) or a scaled LoRA would recompute something else than the forward
    saved.
    """
    with attention_phase(phase), _lora_scaled(layer, lora_scale):
        return layer(*args)


def _enter_offload_hook(module) -> None:
    """Run the accelerate hook that ``module.forward`` would run first, if any: with diffusers'
    ``enable_model_cpu_offload`` it moves the model to the GPU (and offloads the previous one). A pass that calls the
    blocks directly skips ``forward`` and would otherwise find the weights on the CPU."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None:
        hook.pre_forward(module)


def _run_blocks_manually(
    transformer, latents, timestep, encoder_hidden_states, block, use_checkpoint, encoder_hidden_states_image=None,
    lora_scale: float = 1.0,
) -> None:
    """Wan's forward preamble, blocks [0, block) (optionally checkpointed), then ``block`` (which stops); LoRA
    layers at ``lora_scale`` (``attention_kwargs["scale"]``, as ``forward`` applies it), also when recomputed."""
    if timestep.ndim not in (1, 2):
        raise ValueError(f"timesteps must be (B,) or per token (B, L), got shape {tuple(timestep.shape)}")
    _enter_offload_hook(transformer)
    rotary_emb = transformer.rope(latents)
    with _lora_scaled(transformer.patch_embedding, lora_scale), _lora_scaled(transformer.condition_embedder, lora_scale):
        hidden = transformer.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()
        per_token = timestep.ndim == 2  # Wan2.2 TI2V image-to-video: the clean first frame's tokens at timestep 0
        _, timestep_proj, text, image = transformer.condition_embedder(
            timestep.flatten() if per_token else timestep, encoder_hidden_states, encoder_hidden_states_image,
            timestep_seq_len=timestep.shape[1] if per_token else None,
        )
    timestep_proj = timestep_proj.unflatten(2 if per_token else 1, (6, -1))
    if image is not None:  # image-to-video: the cross-attention context is [image tokens, text tokens]
        text = torch.concat([image, text], dim=1)
    phase = current_phase()
    for layer in transformer.blocks[:block]:
        args = (phase, lora_scale, layer, hidden, text, timestep_proj, rotary_emb)
        if use_checkpoint and torch.is_grad_enabled():
            hidden = _checkpoint(_in_phase, *args, use_reentrant=False)
        else:
            hidden = _in_phase(*args)
    _in_phase(phase, lora_scale, transformer.blocks[block], hidden, text, timestep_proj, rotary_emb)


@contextlib.contextmanager
def _run_uncompiled(*modules: torch.nn.Module):
    """Inside the block, ``modules`` compiled with ``Module.compile`` (diffusers' ``compile_repeated_blocks``,
    ``transformer.compile()``) run their eager ``forward``.

    A truncated pass ends with :class:`StopForward`, raised in the motion block's self-attention: an exception that
    a compiled region cannot carry out (``fullgraph=True`` refuses it, otherwise it breaks the graph). Only the
    modules the exception passes through run eagerly -- the motion block (up to its Q/K projections) and a
    whole-model-compiled transformer; the blocks before the motion block keep their compiled code.
    """
    saved = [(module, module._compiled_call_impl) for module in modules
             if getattr(module, "_compiled_call_impl", None) is not None]
    for module, _ in saved:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, compiled in saved:
            module._compiled_call_impl = compiled


def truncated_qk(
    transformer,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    block: int,
    *,
    gradient_checkpointing: bool = False,
    attention_kwargs: Optional[Dict[str, Any]] = None,
    encoder_hidden_states_image: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Q and K of ``blocks[block]``'s self-attention (after norm and RoPE) from a pass that stops right there.

    Args:
        transformer: diffusers ``WanTransformer3DModel``.
        latents: (B, C, F, H, W) transformer input (in the transformer's dtype; for image-to-video the noisy latent
            and the image condition concatenated on channels, as ``WanImageToVideoPipeline`` feeds it).
        timestep: (B,) timesteps, or (B, L) per token (Wan2.2 TI2V image-to-video).
        encoder_hidden_states: (B, T, text_dim) prompt embeddings.
        encoder_hidden_states_image: (B, T_img, image_dim) image-encoder embeddings (Wan2.1 I2V), or None.
        block: motion block index.
        gradient_checkpointing: recompute blocks [0, block) in backward (runs the blocks directly, with the LoRA
            scale ``attention_kwargs["scale"]`` applied as ``forward`` does, also in the recomputation); otherwise the
            pass goes through ``transformer.forward`` unchanged (hooks, LoRA scale, attention kwargs apply).

    Returns:
        q, k: (B, F', S, heads, head_dim), F' latent frames after temporal patching, S = Hg * Wg tokens per frame.
    """
    transformer = unwrap_module(transformer)  # a torch.compile(transformer) wrapper: its model
    grid = token_grid_of(transformer, latents.shape)
    with capture_qk(transformer, block, stop=True) as capture, _run_uncompiled(transformer, transformer.blocks[block]):
        try:
            if gradient_checkpointing:
                set_token_grid(transformer, latents.shape)
                _run_blocks_manually(
                    transformer, latents, timestep, encoder_hidden_states, block, True, encoder_hidden_states_image,
                    lora_scale=float((attention_kwargs or {}).get("scale", 1.0)),
                )
            else:
                saved_flag = getattr(transformer, "gradient_checkpointing", False)
                transformer.gradient_checkpointing = False  # a checkpointed motion block could not be replayed
                try:
                    transformer(
                        hidden_states=latents,
                        timestep=timestep,
                        encoder_hidden_states=encoder_hidden_states,
                        encoder_hidden_states_image=encoder_hidden_states_image,
                        attention_kwargs=attention_kwargs,
                        return_dict=False,
                    )
                finally:
                    transformer.gradient_checkpointing = saved_flag
        except StopForward:
            pass
        else:
            raise RuntimeError(f"the truncated pass finished without reaching block {block}'s self-attention")
        q, k = capture.query, capture.key
    b, _, heads, dim = q.shape
    frames, rows, cols = grid
    shape = (b, frames, rows * cols, heads, dim)
    return q.reshape(shape), k.reshape(shape)


def window_loss_keys(k: torch.Tensor, head_reduce: str) -> torch.Tensor:
    """The keys the corresponding-window loss compares, from per-head k (B, F, S, H, D).

    "mean_qk": the head-averaged keys (B, F, S, D) the flow used; "mean_flow": per head (B, F, S, H, D) with per-head
    windows (the loss is averaged over heads); "mean_logits": the concatenated channels scaled by 1 / sqrt(H),
    (B, F, S, H * D), so that the squared distance is the mean over heads of the per-head squared distances (the
    "mean_flow" loss's scale).
    """
    if head_reduce == "mean_qk":
        return k.mean(dim=3)
    if head_reduce == "mean_logits":
        return k.flatten(-2) / math.sqrt(k.shape[3])
    return k


def compute_flow(
    q: torch.Tensor,
    k: torch.Tensor,
    frame_shape: Tuple[int, int],
    config: MotionTransferConfig,
    *,
    reference: bool,
    windows: Optional[torch.Tensor] = None,
) -> MotionFlow:
    """The recipe's attention motion flow of per-head q, k (B, F, S, H, D).

    fastvmt: :func:`fastvmt_kernels.motion_flow` (sliding windows over pairs ``i <= j < i + span``), soft-argmax for
    both videos; ``windows`` (another flow's ``.windows``, batch 1 or B) replaces the coarse pass. ditflow: global
    AMF over all ordered pairs, hard argmax for the reference (``reference=True``).
    """
    from fastvmt_kernels.motion_flow import motion_flow, reduce_heads

    if config.recipe == "ditflow":  # head_reduce "mean_logits" (DiTFlow's) or "mean_qk" (checked by the config)
        from .losses import ditflow_flow

        q, k, temperature = reduce_heads(q, k, config.head_reduce, config.temperature)
        flow, pairs = ditflow_flow(q, k, frame_shape, temperature=temperature, hard=reference,
                                   backend=config.kernel_backend)
        return MotionFlow(flow=flow, pairs=pairs)

    if windows is not None and windows.shape[0] != q.shape[0]:
        windows = windows.expand(q.shape[0], *windows.shape[1:])
    flow, pairs, windows = motion_flow(
        q,
        k,
        frame_shape,
        tile=config.tile,
        window=config.window,
        span=config.span,
        temperature=config.temperature,
        backend=config.kernel_backend,
        head_reduce=config.head_reduce,
        return_windows=True,
        windows=windows,
    )
    return MotionFlow(flow=flow, pairs=pairs, windows=windows, key=window_loss_keys(k, config.head_reduce))


def motion_loss(
    generated: MotionFlow, reference: MotionFlow, frame_shape: Tuple[int, int], config: MotionTransferConfig
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The recipe's guidance loss and its parts (floats, for logging).

    fastvmt: ``amf_weight * amf_loss + window_weight * corresponding_window_loss`` (windows of the generated video);
    ditflow: masked MSE between the flows.
    """
    from . import losses

    if config.recipe == "ditflow":
        loss = losses.ditflow_loss(generated.flow, reference.flow)
        return loss, {"loss": float(loss.detach()), "amf": float(loss.detach())}
    amf = losses.amf_loss(generated.flow, reference.flow, generated.pairs, config.span)
    total = config.amf_weight * amf
    parts = {"amf": float(amf.detach())}
    if config.window_weight > 0:
        window_term = losses.corresponding_window_loss(
            generated.key, generated.windows, generated.pairs, frame_shape, config.window
        )
        total = total + config.window_weight * window_term
        parts["window"] = float(window_term.detach())
    parts["loss"] = float(total.detach())
    return total, parts
