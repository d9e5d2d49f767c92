"""Drop-in local attention for diffusers' HunyuanVideo 1.5 transformer (joint video + text attention, padded text).

HunyuanVideo 1.5 attends [video, text] in one sequence in each of its dual-stream blocks, the text (Qwen2.5-VL and
byT5 tokens, and image tokens for image-to-video, valid ones first) with its own projections, and masks the padded
text tokens. :class:`HunyuanVideo15LocalAttnProcessor` builds Q, K, V exactly as ``HunyuanVideo15AttnProcessor2_0``
and replaces the dense attention with :func:`fastvmt_kernels.joint_local_attention`: text as suffix global tokens,
their padding as ``global_key_mask``. ``fastvmt.apply_local_attention(transformer, ...)`` installs it when given a
``HunyuanVideo15Transformer3DModel`` (its text token refiner keeps the stock processor).

The stock processor also hides every key from a padded text *query* (its output there is zeros); here a padded
text query attends the unmasked keys. No other token attends a padded one, so the video and valid text outputs do
not depend on it (a full window reproduces the stock transformer's output; a test checks it).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

from .hunyuan_video import attend_with_text_suffix, text_qkv, token_grid
from .processors import LocalWindowSettings, grid_from_input_shape, select_blocks

BLOCK_LIST = "transformer_blocks"


def _text_key_mask(attention_mask: Optional[torch.Tensor], batch: int, text_len: int) -> Optional[torch.Tensor]:
    """The text tokens' key mask (B, text_len) bool from HunyuanVideo 1.5's (B, text_len) text mask (bool or 0 / 1;
    the stock processor pads it with True over the video tokens); None if there is none. Other shapes raise."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != (batch, text_len):
        raise ValueError(
            "HunyuanVideo15LocalAttnProcessor supports HunyuanVideo 1.5's (B, text tokens) text mask "
            f"({batch}, {text_len}), got shape {tuple(attention_mask.shape)}"
        )
    return attention_mask.bool()


class HunyuanVideo15LocalAttnProcessor(LocalWindowSettings, HunyuanVideo15AttnProcessor2_0):
    """HunyuanVideo 1.5 joint attention with local video self-attention (arguments as :class:`LocalWindowSettings`).

    Calls without text (``encoder_hidden_states`` None) or outside ``phases`` run the stock dense processor.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None or not self.active():
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        text_len = encoder_hidden_states.shape[1]
        query, key, value = (
            proj(hidden_states).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:  # RoPE on the video tokens only
            query, key = (apply_rotary_emb(x, image_rotary_emb, sequence_dim=1) for x in (query, key))
        text = text_qkv(attn, encoder_hidden_states)
        query, key, value = (torch.cat([x, t], dim=1) for x, t in zip((query, key, value), text))
        key_mask = _text_key_mask(attention_mask, query.shape[0], text_len)
        return attend_with_text_suffix(self, attn, query, key, value, text_len, key_mask, image_rotary_emb)


read_grid = grid_from_input_shape(token_grid)
PROCESSOR = HunyuanVideo15LocalAttnProcessor


def processor_keys(transformer, blocks: Optional[Iterable[int]] = None) -> Sequence[str]:
    """Processor keys of the joint attention of ``blocks`` (None: all) of ``transformer.transformer_blocks``; used by
    ``fastvmt.apply_local_attention`` for a ``HunyuanVideo15Transformer3DModel``."""
    chosen = select_blocks(len(getattr(transformer, BLOCK_LIST)), blocks)
    return [f"{BLOCK_LIST}.{i}.attn.processor" for i in chosen]
