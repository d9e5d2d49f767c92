"""Drop-in local attention for diffusers' HunyuanVideo transformers (joint video + text attention, padded text).

HunyuanVideo attends [video, text] in one sequence, in its dual-stream blocks (text with its own projections) and its
single-stream blocks (text concatenated before the projections), with a key mask over the padded text tokens.
:class:`HunyuanVideoLocalAttnProcessor` builds Q, K, V exactly as ``HunyuanVideoAttnProcessor2_0`` and replaces the
dense attention with :func:`fastvmt_kernels.joint_local_attention` (text as suffix global tokens, the text padding
as ``global_key_mask``). ``fastvmt.apply_local_attention(transformer, ...)`` installs it when given a
``HunyuanVideoTransformer3DModel``; ``blocks`` index the dual-stream blocks first, then the single-stream ones.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from .processors import LocalWindowSettings, grid_from_input_shape, rotary_key, select_blocks

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def token_grid(transformer, hidden_states_shape: Sequence[int]) -> Tuple[int, int, int]:
    """(T, Hg, Wg) video tokens of a HunyuanVideo input (B, C, F, H, W) under its patch sizes."""
    _, _, frames, height, width = hidden_states_shape
    patch, patch_t = transformer.config.patch_size, transformer.config.patch_size_t
    return (frames // patch_t, height // patch, width // patch)


def _text_key_mask(attention_mask: Optional[torch.Tensor], batch: int, total: int, text_len: int):
    """The text tokens' key mask (B, text_len) from HunyuanVideo's (B, 1, 1, N) bool mask; None if there is none.

    HunyuanVideo's mask only hides padded text tokens (its video keys are always attended), so only the text part is
    read: checking the video part would cost a host synchronisation per attention call. Other mask forms raise."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool or tuple(attention_mask.shape) != (batch, 1, 1, total):
        raise ValueError(
            "HunyuanVideoLocalAttnProcessor supports HunyuanVideo's (B, 1, 1, N) bool key mask, got "
            f"{attention_mask.dtype} {tuple(attention_mask.shape)}"
        )
    return attention_mask[:, 0, 0, total - text_len :]


def text_qkv(attn, encoder_hidden_states: torch.Tensor):
    """[q, k, v], each (B, N_text, H, D): the text tokens through a dual-stream block's added projections and norms."""
    text = [proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
    if attn.norm_added_q is not None:
        text[0] = attn.norm_added_q(text[0])
    if attn.norm_added_k is not None:
        text[1] = attn.norm_added_k(text[1])
    return text


def attend_with_text_suffix(processor: LocalWindowSettings, attn, query, key, value, text_len: int, key_mask,
                            rotary_emb) -> Tuple[torch.Tensor, torch.Tensor]:
    """(video, text) hidden states of a [video, text] joint attention: q, k, v (B, L + text_len, H, D) through
    :func:`fastvmt_kernels.joint_local_attention` with the text as suffix global tokens (``key_mask`` (B, text_len)
    bool or None), then the block's output projections. ``processor`` gives the tile, window, backend and the token
    grid of the pass (identified by ``rotary_emb``)."""
    from fastvmt_kernels import joint_local_attention

    out = joint_local_attention(
        query, key, value, processor.token_grid(rotary_key(rotary_emb)), processor.tile, processor.window,
        num_global=text_len, global_position="suffix", global_key_mask=key_mask, backend=processor.backend,
    )
    out = out.flatten(2, 3).to(query.dtype)
    hidden_states, encoder_hidden_states = out[:, :-text_len], out[:, -text_len:]
    if getattr(attn, "to_out", None) is not None:
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if getattr(attn, "to_add_out", None) is not None:
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    return hidden_states, encoder_hidden_states


class HunyuanVideoLocalAttnProcessor(LocalWindowSettings, HunyuanVideoAttnProcessor2_0):
    """HunyuanVideo joint attention with local video self-attention (arguments as :class:`LocalWindowSettings`).

    Calls without text (``encoder_hidden_states`` None) or outside ``phases`` run the stock dense processor.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None or not self.active():
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        text_len = encoder_hidden_states.shape[1]
        single_stream = attn.add_q_proj is None  # text goes through the same projections as the video
        joint = torch.cat([hidden_states, encoder_hidden_states], dim=1) if single_stream else hidden_states
        query, key, value = (proj(joint).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:  # RoPE on the video tokens only

            def rope(x):
                return apply_rotary_emb(x, image_rotary_emb, sequence_dim=1)

            if single_stream:
                query, key = (torch.cat([rope(x[:, :-text_len]), x[:, -text_len:]], 1) for x in (query, key))
            else:
                query, key = rope(query), rope(key)
        if not single_stream:
            text = text_qkv(attn, encoder_hidden_states)
            query, key, value = (torch.cat([x, t], dim=1) for x, t in zip((query, key, value), text))
        key_mask = _text_key_mask(attention_mask, query.shape[0], query.shape[1], text_len)
        return attend_with_text_suffix(self, attn, query, key, value, text_len, key_mask, image_rotary_emb)


read_grid = grid_from_input_shape(token_grid)
PROCESSOR = HunyuanVideoLocalAttnProcessor


def processor_keys(transformer, blocks: Optional[Iterable[int]] = None) -> Sequence[str]:
    """Processor keys of the attention of ``blocks`` (None: all; the dual-stream blocks first, then the single-stream
    ones); used by ``fastvmt.apply_local_attention`` for a ``HunyuanVideoTransformer3DModel``."""
    keys = [f"{name}.{i}.attn.processor" for name in BLOCK_LISTS for i in range(len(getattr(transformer, name)))]
    return [keys[i] for i in select_blocks(len(keys), blocks)]
