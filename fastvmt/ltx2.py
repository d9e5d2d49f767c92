"""Drop-in local attention for diffusers' LTX-2 audio-video transformer (``LTX2VideoTransformer3DModel``).

Each LTX-2 block attends the video tokens among themselves (``attn1``: RMS-normed Q / K with the 3-D RoPE,
interleaved or split, an optional per-head output gate, and on LTX-2.3-style blocks the spatio-temporal guidance
perturbation), the audio tokens among themselves (``audio_attn1``), the text (``attn2``, ``audio_attn2``) and each
modality the other (``audio_to_video_attn``, ``video_to_audio_attn``). :class:`LTX2LocalAttnProcessor` replaces the
video self-attention only: the audio sequence is short and one-dimensional, and the cross-attentions are dense by
nature. It builds Q, K, V, gates and perturbation exactly as ``LTX2PerturbedAttnProcessor`` (which, without a
perturbation mask, is ``LTX2AudioVideoAttnProcessor``) and attends through :func:`fastvmt_kernels.local_attention`.

The token grid of a call is its ``num_frames`` x ``height`` x ``width`` latent size under the patch size (LTX-2's
pipelines pass these beside ``video_coords``). Tokens past the grid are conditioning tokens that
``LTX2ConditionPipeline`` (keyframes at later latent frames) and ``LTX2ICLoraPipeline`` (keyframes, reference videos)
append: they stay global, as the suffix of :func:`fastvmt_kernels.joint_local_attention` -- every video token attends
its window plus all of them, and they attend everything -- so a keyframe keeps conditioning the whole video. Calls
with a self-attention mask (``video_self_attention_mask``: the IC-LoRA pipeline's with per-token conditioning
strength), without a known grid (``video_coords`` alone), with
fewer tokens than the grid, under diffusers context parallelism or outside ``phases`` run the stock processor (the
unknown and short cases with a warning, once per processor); so do spatio-temporal-guidance calls that perturb every
video (they attend nothing). ``fastvmt.apply_local_attention(transformer, ...)`` installs it through
:data:`PROCESSOR`, :func:`processor_keys` and :func:`read_grid`.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import torch
from diffusers.models.transformers.transformer_ltx2 import (
    LTX2PerturbedAttnProcessor,
    apply_interleaved_rotary_emb,
    apply_split_rotary_emb,
)

from .ltx_video import BLOCK_LIST, GRID_ARGUMENTS, warn_dense_once
from .processors import LocalWindowSettings, _self_attention_keys, rotary_key

MODEL_NAME = "LTX-2"
ROTARY = {"interleaved": apply_interleaved_rotary_emb, "split": apply_split_rotary_emb}


def read_grid(transformer, args, kwargs) -> Optional[Tuple[int, int, int]]:
    """(T, Hg, Wg) video tokens of an LTX-2 forward call: its latent ``num_frames``, ``height``, ``width`` (keyword
    arguments, as diffusers' LTX-2 pipelines pass them) over the transformer's patch sizes, rounded up as its RoPE
    positions are; None when the call does not give them."""
    sizes = [kwargs.get(name) for name in GRID_ARGUMENTS]
    if any(size is None for size in sizes):
        return None
    rope = transformer.rope
    patches = (rope.patch_size_t, rope.patch_size, rope.patch_size)
    return tuple(-(-int(size) // patch) for size, patch in zip(sizes, patches))


def _all_perturbed(perturbation_mask: Optional[torch.Tensor], all_perturbed) -> bool:
    """Whether a spatio-temporal-guidance call perturbs every video (its attention output is then the values alone),
    decided as ``LTX2PerturbedAttnProcessor`` decides it."""
    if all_perturbed is None:
        return perturbation_mask is not None and bool(torch.all(perturbation_mask == 0))
    return bool(all_perturbed)


class LTX2LocalAttnProcessor(LocalWindowSettings, LTX2PerturbedAttnProcessor):
    """LTX-2 video self-attention through :func:`fastvmt_kernels.local_attention` (arguments as
    :class:`LocalWindowSettings`); conditioning tokens appended past the grid stay global (module docstring).

    Serves the blocks of both LTX-2 processor kinds: its call signature is ``LTX2PerturbedAttnProcessor``'s, whose
    stock path is ``LTX2AudioVideoAttnProcessor``'s when no ``perturbation_mask`` is given.
    """

    _warned = False

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        query_rotary_emb=None,
        key_rotary_emb=None,
        perturbation_mask: Optional[torch.Tensor] = None,
        all_perturbed=None,
    ) -> torch.Tensor:
        stock = (attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb, key_rotary_emb,
                 perturbation_mask, all_perturbed)
        local = (
            encoder_hidden_states is None
            and attention_mask is None
            and self._parallel_config is None
            and self.active()
        )
        grid = self.token_grid(rotary_key(query_rotary_emb), required=False) if local else None
        tokens = hidden_states.size(1)
        if local and (grid is None or tokens < grid[0] * grid[1] * grid[2]):
            warn_dense_once(self, MODEL_NAME, grid, tokens, "positions given as video_coords alone, or fewer tokens "
                            "than the grid")
            local = False
        if not local or _all_perturbed(perturbation_mask, all_perturbed):
            return super().__call__(*stock)

        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if query_rotary_emb is not None:
            rotate = ROTARY[attn.rope_type]
            query = rotate(query, query_rotary_emb)
            key = rotate(key, key_rotary_emb if key_rotary_emb is not None else query_rotary_emb)
        out = self.attend(*(x.unflatten(2, (attn.heads, -1)) for x in (query, key, value)), grid)
        out = out.flatten(2, 3).to(query.dtype)
        if perturbation_mask is not None:  # perturbed videos (mask 0) take the values instead of attention
            out = torch.lerp(value, out, perturbation_mask)
        if gate_logits is not None:
            gates = 2.0 * torch.sigmoid(gate_logits)  # (B, N, heads): 1 for zero-initialised gate logits
            out = (out.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out))

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, grid) -> torch.Tensor:
        """q, k, v: (B, N, heads, head_dim) after norm and RoPE; the first L = T * Hg * Wg tokens are ``grid``'s in
        raster order, the N - L after them global conditioning tokens. Returns (B, N, heads, head_dim)."""
        from fastvmt_kernels import joint_local_attention, local_attention

        extra = query.size(1) - grid[0] * grid[1] * grid[2]
        if extra == 0:
            return local_attention(query, key, value, grid, self.tile, self.window, backend=self.backend)
        return joint_local_attention(query, key, value, grid, self.tile, self.window, num_global=extra,
                                     global_position="suffix", backend=self.backend)


PROCESSOR = LTX2LocalAttnProcessor


def processor_keys(transformer, blocks: Optional[Iterable[int]] = None) -> Sequence[str]:
    """Processor keys of ``transformer_blocks[i].attn1`` (video self-attention) for ``blocks`` (None: all); used by
    ``fastvmt.apply_local_attention`` for an ``LTX2VideoTransformer3DModel``."""
    return _self_attention_keys(transformer, blocks, BLOCK_LIST)
