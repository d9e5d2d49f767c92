"""Drop-in local attention for diffusers' LTX-Video transformer (``LTXVideoTransformer3DModel``).

LTX-Video's blocks attend the video tokens among themselves (``attn1``, RMS-normed Q / K with its 3-D RoPE) and
the text through a separate cross-attention (``attn2``), like Wan. Its transformer takes packed tokens
(B, T * Hg * Wg, C) in raster order (frame, row, column) plus the grid as ``num_frames``, ``height``, ``width`` (the
sizes its RoPE is built on). :class:`LTXVideoLocalAttnProcessor` computes Q, K, V exactly as
``LTXVideoAttnProcessor`` and replaces the dense self-attention with :func:`fastvmt_kernels.local_attention`;
``fastvmt.apply_local_attention(transformer, ...)`` installs it (through :data:`PROCESSOR`, :func:`processor_keys`
and :func:`read_grid`).
"""
from __future__ import annotations

import warnings
from typing import Iterable, Optional, Sequence, Tuple

from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor, apply_rotary_emb

from .processors import LocalWindowSettings, _self_attention_keys, rotary_key

BLOCK_LIST = "transformer_blocks"
GRID_ARGUMENTS = ("num_frames", "height", "width")


def read_grid(transformer, args, kwargs) -> Optional[Tuple[int, int, int]]:
    """(T, Hg, Wg) tokens of an LTX-Video forward call: its ``num_frames``, ``height``, ``width`` (the grid its RoPE
    uses; keyword arguments, as diffusers' LTX pipelines pass them), or None when the call does not give them."""
    sizes = [kwargs.get(name) for name in GRID_ARGUMENTS]
    if any(size is None for size in sizes):
        return None
    return tuple(int(size) for size in sizes)


def warn_dense_once(processor, model_name: str, grid: Optional[Tuple[int, int, int]], tokens: int, causes: str) -> None:
    """Warn, once per ``processor`` (its ``_warned`` flag), that a call of ``tokens`` tokens whose token ``grid`` is
    unknown (None) or does not fit it runs the stock dense self-attention; ``causes`` names the usual reasons."""
    if processor._warned:
        return
    processor._warned = True
    what = "gives no num_frames / height / width" if grid is None else \
        f"has grid {grid} ({grid[0] * grid[1] * grid[2]} tokens) for a sequence of {tokens}"
    warnings.warn(f"{model_name} local attention: the call {what} ({causes}); its self-attention runs dense",
                  stacklevel=3)


class LTXVideoLocalAttnProcessor(LocalWindowSettings, LTXVideoAttnProcessor):
    """LTX-Video self-attention through :func:`fastvmt_kernels.local_attention` (arguments as
    :class:`LocalWindowSettings`).

    Cross-attention calls (``encoder_hidden_states`` given), attention masks, diffusers context parallelism and calls
    outside ``phases`` run the stock ``LTXVideoAttnProcessor``; so do calls whose token grid is unknown or does not
    describe the sequence (with a warning, once per processor): ``LTXConditionPipeline`` passes positions
    (``video_coords``) instead of ``num_frames`` / ``height`` / ``width`` and may append conditioning tokens, and
    ``LTXI2VLongMultiPromptPipeline`` passes a 1 x 1 x 1 grid with them.
    """

    _warned = False

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        local = (
            encoder_hidden_states is None
            and attention_mask is None
            and self._parallel_config is None
            and self.active()
        )
        grid = self.token_grid(rotary_key(image_rotary_emb), required=False) if local else None
        if local and (grid is None or hidden_states.size(1) != grid[0] * grid[1] * grid[2]):
            warn_dense_once(self, "LTX-Video", grid, hidden_states.size(1),
                            "positions given as video_coords, or conditioning tokens appended")
            local = False
        if not local:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from fastvmt_kernels import local_attention

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query, key = apply_rotary_emb(query, image_rotary_emb), apply_rotary_emb(key, image_rotary_emb)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        out = local_attention(query, key, value, grid, self.tile, self.window, backend=self.backend)
        out = out.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


PROCESSOR = LTXVideoLocalAttnProcessor


def processor_keys(transformer, blocks: Optional[Iterable[int]] = None) -> Sequence[str]:
    """Processor keys of ``transformer_blocks[i].attn1`` (self-attention) for ``blocks`` (None: all); used by
    ``fastvmt.apply_local_attention`` for an ``LTXVideoTransformer3DModel``."""
    return _self_attention_keys(transformer, blocks, BLOCK_LIST)
