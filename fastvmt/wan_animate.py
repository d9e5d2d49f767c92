"""Drop-in local attention for diffusers' Wan-Animate transformer (``WanAnimateTransformer3DModel``, Wan2.2-Animate).

Wan-Animate's blocks are Wan's, but its latent holds one more frame in front of the T generated ones: the reference
(character) image's latent, frame 0 of the (T + 1)-frame token grid, from which every generated frame takes the
character's appearance (the pipeline drops it after denoising). A local temporal window would hide it from every frame
beyond the window, so :class:`WanAnimateLocalAttnProcessor` keeps it global: through
:func:`fastvmt_kernels.joint_local_attention` with the reference frame's Hg * Wg tokens as the global prefix, a
generated token attends its local window of generated tokens plus the whole reference frame, and the reference frame's
tokens attend every token, as in the stock model. Q, K, V (RoPE over all T + 1 frames), the token grid and the stock
fallbacks are those of :class:`fastvmt.processors.LocalAttnProcessor`; ``tile`` and ``window`` apply to the generated
frames' (T, Hg, Wg) grid. ``fastvmt.apply_local_attention(transformer, ...)`` installs it in the blocks' self-attention
(``attn1``; the cross-attention and the face adapter stay stock) through :data:`PROCESSOR`, :func:`processor_keys` and
:data:`read_grid`.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from .processors import LocalAttnProcessor, _self_attention_keys, grid_from_input_shape, token_grid_of

# Leading latent frames that condition every generated frame: Wan-Animate's reference image.
REFERENCE_FRAMES = 1


class WanAnimateLocalAttnProcessor(LocalAttnProcessor):
    """Wan-Animate self-attention: local among the generated frames, dense to and from the reference frame (arguments
    as :class:`fastvmt.processors.LocalWindowSettings`)."""

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, grid) -> torch.Tensor:
        """q, k, v: (B, L, heads, head_dim), L = (T + 1) * Hg * Wg tokens of ``grid`` in raster order, the reference
        frame first; returns (B, L, heads, head_dim). A call without generated frames attends densely."""
        frames, height, width = grid
        if frames <= REFERENCE_FRAMES:
            return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (query, key, value))).transpose(1, 2)
        from fastvmt_kernels import joint_local_attention

        return joint_local_attention(
            query, key, value, (frames - REFERENCE_FRAMES, height, width), self.tile, self.window,
            num_global=REFERENCE_FRAMES * height * width, global_position="prefix", backend=self.backend,
        )


PROCESSOR = WanAnimateLocalAttnProcessor
# The token grid of a call: its latent (B, 2C + 4, T + 1, H, W) under the patch size, the reference frame included.
read_grid = grid_from_input_shape(token_grid_of)


def processor_keys(transformer, blocks: Optional[Iterable[int]] = None) -> Sequence[str]:
    """Processor keys of ``blocks[i].attn1`` for ``blocks`` (None: all); used by ``fastvmt.apply_local_attention`` for
    a ``WanAnimateTransformer3DModel``."""
    return _self_attention_keys(transformer, blocks)
