"""Drop-in local attention for diffusers' SkyReels-V2 transformer (``SkyReelsV2Transformer3DModel``), diffusion
forcing included.

SkyReels-V2's blocks are Wan's. For diffusion forcing (``num_frame_per_block = f > 1``, set by
``SkyReelsV2DiffusionForcingPipeline`` through ``transformer._set_ar_attention``) its forward passes every block's
self-attention a frame-block-causal mask: a token attends the keys of its own block of f latent frames and of the
blocks before it. :class:`SkyReelsV2LocalAttnProcessor` runs those calls as
:func:`fastvmt_kernels.local_attention` with ``causal_frames=f``: the local window intersected with that mask, at tile
granularity (no mask tensor is read), which needs whole blocks of tiles: ``tile[0]`` divides f and ``window[0]``
covers a block (``>= f / tile[0]`` tiles). Other masked calls, and causal ones whose tile or window do not fit, run the
stock dense path (those with a warning, once per processor). Calls without a mask (``f = 1``) are Wan's
:class:`fastvmt.processors.LocalAttnProcessor`. ``fastvmt.apply_local_attention(transformer, ...)`` installs it through
:data:`PROCESSOR`, :func:`processor_keys`, :data:`read_grid` and :func:`configure`.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Iterable, Optional, Sequence

from .processors import (
    LocalAttnProcessor,
    _self_attention_keys,
    grid_from_input_shape,
    project_self_attention,
    rotary_key,
    token_grid_of,
)

CONFIG_FIELD = "num_frame_per_block"


class SkyReelsV2LocalAttnProcessor(LocalAttnProcessor):
    """SkyReels-V2 self-attention: Wan's local attention, block-causal in time under diffusion forcing (arguments as
    :class:`fastvmt.processors.LocalWindowSettings`)."""

    _warned = False
    _transformer = None  # weak reference to the model whose config gives the frames per causal block (configure)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        frames = self.causal_frames()
        causal = (
            attention_mask is not None  # under diffusion forcing: the model's frame-block-causal mask
            and frames > 1
            and encoder_hidden_states is None
            and self._parallel_config is None
            and self.active()
            and self._fits(frames)
        )
        if not causal:  # Wan's local path without a mask, the stock one with any other
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        from fastvmt_kernels import local_attention

        query, key, value = project_self_attention(attn, hidden_states, rotary_emb)
        grid = self.token_grid(rotary_key(rotary_emb))
        out = local_attention(query, key, value, grid, self.tile, self.window, backend=self.backend,
                              causal_frames=frames)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def causal_frames(self) -> int:
        """Latent frames per diffusion-forcing block of the configured model (1: no causal mask)."""
        model = None if self._transformer is None else self._transformer()
        return 1 if model is None else int(getattr(model.config, CONFIG_FIELD, 1) or 1)

    def _fits(self, frames: int) -> bool:
        """Whether blocks of ``frames`` frames are whole tiles covered by the window; warns (once) when not."""
        tile_t, window_t = self.tile[0], self.window[0]
        if frames % tile_t == 0 and window_t >= frames // tile_t:
            return True
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"SkyReels-V2 local attention: diffusion-forcing blocks of {frames} frames need tile[0] dividing "
                f"{frames} and window[0] >= {frames} / tile[0] time tiles, got tile {self.tile}, window "
                f"{self.window}; the causal self-attention runs dense", stacklevel=3,
            )
        return False


PROCESSOR = SkyReelsV2LocalAttnProcessor
# The token grid of a call: its latent (B, C, T, H, W) under the patch size, as Wan's.
read_grid = grid_from_input_shape(token_grid_of)


def configure(processor: SkyReelsV2LocalAttnProcessor, transformer) -> None:
    """Let ``processor`` read the frames per causal block from ``transformer``'s config at each call (weakly
    referenced: the processor does not keep the model alive)."""
    processor._transformer = weakref.ref(transformer)


def processor_keys(transformer, blocks: Optional[Iterable[int]] = None) -> Sequence[str]:
    """Processor keys of ``blocks[i].attn1`` for ``blocks`` (None: all); used by ``fastvmt.apply_local_attention`` for
    a ``SkyReelsV2Transformer3DModel``."""
    return _self_attention_keys(transformer, blocks)
