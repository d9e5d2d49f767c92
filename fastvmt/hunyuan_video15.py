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

from typing import Iterable, Optional, Sequence, Tuple

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

from .processors import LocalWindowSettings, grid_from_input_shape, rotary_key, select_blocks

BLOCK_LIST = "transformer_blocks"


def token_grid(transformer, hidden_states_shape: Sequence[int]) -> Tuple[int, int, int]:
    """(T, Hg, Wg) video tokens of a HunyuanVideo 1.5 input (B, C, F, H, W) under its patch sizes."""
    _, _, frames, height, width = hidden_states_shape
    patch, patch_t = transformer.config.patch_size, transformer.config.patch_size_t
    return (frames // patch_t, height // patch, width // patch)


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
        from fastvmt_kernels import joint_local_attention

        text_len = encoder_hidden_states.shape[1]
        query, key, value = (
            proj(hidden_states).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:  # RoPE on the video tokens only
            query, key = (apply_rotary_emb(x, image_rotary_emb, sequence_dim=1) for x in (query, key))
        text = [proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
        if attn.norm_added_q is not None:
            text[0] = attn.norm_added_q(text[0])
        if attn.norm_added_k is not None:
            text[1] = attn.norm_added_k(text[1])
        query, key, value = (torch.cat([x, t], dim=1) for x, t in zip((query, key, value), text))
        out = joint_local_attention(
            query, key, value, self.token_grid(rotary_key(image_rotary_emb)), self.tile, self.window,
            num_global=text_len, global_position="suffix",
            global_key_mask=_text_key_mask(attention_mask, query.shape[0], text_len), backend=self.backend,
        )
        out = out.flatten(2, 3).to(query.dtype)
        hidden_states, encoder_hidden_states = out[:, :-text_len], out[:, -text_len:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


read_grid = grid_from_input_shape(token_grid)
PROCESSOR = HunyuanVideo15LocalAttnProcessor


def processor_keys(transformer, blocks: Optional[Iterable[int]] = None) -> Sequence[str]:
    """Processor keys of the joint attention of ``blocks`` (None: all) of ``transformer.transformer_blocks``; used by
    ``fastvmt.apply_local_attention`` for a ``HunyuanVideo15Transformer3DModel``."""
    chosen = select_blocks(len(getattr(transformer, BLOCK_LIST)), blocks)
    return [f"{BLOCK_LIST}.{i}.attn.processor" for i in chosen]
