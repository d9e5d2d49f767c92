"""Drop-in local attention for diffusers' CogVideoX transformers (joint text + video attention).

CogVideoX attends its text tokens and video tokens in one sequence, [text, video]. :class:`CogVideoXLocalAttnProcessor`
computes Q, K, V exactly as ``CogVideoXAttnProcessor2_0`` and replaces the dense attention with
:func:`fastvmt_kernels.joint_local_attention`: video queries attend their local window of video keys plus all text
keys; text queries attend everything. ``fastvmt.apply_local_attention(transformer, ...)`` installs it when given a
``CogVideoXTransformer3DModel`` (through :data:`PROCESSOR`, :func:`processor_keys` and :data:`read_grid`).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

from .processors import LocalWindowSettings, _self_attention_keys, grid_from_input_shape, rotary_key

BLOCK_LIST = "transformer_blocks"


def token_grid(transformer, hidden_states_shape: Sequence[int]) -> Tuple[int, int, int]:
    """(T, Hg, Wg) video tokens of a CogVideoX input (B, F, C, H, W) under its patch sizes (patch_size_t None = 1)."""
    _, frames, _, height, width = hidden_states_shape
    patch = transformer.config.patch_size
    patch_t = transformer.config.patch_size_t or 1
    return (frames // patch_t, height // patch, width // patch)


class CogVideoXLocalAttnProcessor(LocalWindowSettings, CogVideoXAttnProcessor2_0):
    """CogVideoX joint attention with local video self-attention (arguments as :class:`LocalWindowSettings`).

    Calls with an attention mask, cross-attention modules, or outside ``phases`` run the stock dense processor.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None or attn.is_cross_attention or not self.active():
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from fastvmt_kernels import joint_local_attention

        text_len = encoder_hidden_states.size(1)
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query, key, value = (proj(joint).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:  # RoPE on the video tokens only, (B, N, H, D): sequence_dim=1
            query, key = (
                torch.cat([x[:, :text_len], apply_rotary_emb(x[:, text_len:], image_rotary_emb, sequence_dim=1)], 1)
                for x in (query, key)
            )
        out = joint_local_attention(
            query, key, value, self.token_grid(rotary_key(image_rotary_emb)), self.tile, self.window, num_global=text_len,
            global_position="prefix", backend=self.backend,
        )
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(query)))
        encoder_hidden_states, hidden_states = out.split([text_len, out.size(1) - text_len], dim=1)
        return hidden_states, encoder_hidden_states


read_grid = grid_from_input_shape(token_grid)
PROCESSOR = CogVideoXLocalAttnProcessor


def processor_keys(transformer, blocks: Optional[Iterable[int]] = None) -> Sequence[str]:
    """Processor keys of ``transformer_blocks[i].attn1`` for ``blocks`` (None: all); used by
    ``fastvmt.apply_local_attention`` for a ``CogVideoXTransformer3DModel``."""
    return _self_attention_keys(transformer, blocks, BLOCK_LIST)
