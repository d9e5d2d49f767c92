"""Public entry point: :func:`local_attention`."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from .._checks import check_tensors, resolve_backend
from ..index_math import SMALL_DIVMOD_MAX_D, SMALL_DIVMOD_MAX_N
from ..layout import TileLayout
from .reference import local_attention_reference

MAX_GRID_Y = 65535  # CUDA's limit on a launch grid's y dimension (the kernels' batch x heads axis)


def check_head_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_layout: str, kv_layout: str) -> None:
    """Raise a ValueError unless k and v share one shape that matches q's but for the head count, and q's heads H
    are a multiple of the key / value heads H_kv (H_kv = H: multi-head; 1 < H_kv < H: grouped-query; 1: multi-query
    attention). ``q_layout`` / ``kv_layout`` name the expected layouts in the message."""
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape {kv_layout}, got {tuple(k.shape)} and {tuple(v.shape)}")
    heads, heads_kv = q.shape[2], k.shape[2]
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {q_layout} and k, v {kv_layout} must agree in every dim but the heads, got q {tuple(q.shape)} and "
            f"k, v {tuple(k.shape)}"
        )
    if (heads_kv == 0 and heads != 0) or (heads_kv and heads % heads_kv):
        raise ValueError(
            f"q's heads must be a multiple of k's and v's (H = H_kv: multi-head, H = g * H_kv: grouped-query "
            f"attention), got H = {heads}, H_kv = {heads_kv}"
        )


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    tile: Sequence[int],
    window: Sequence[int],
    *,
    scale: Optional[float] = None,
    backend: str = "auto",
    return_lse: bool = False,
    causal_frames: int = 0,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Spatiotemporal local-window attention on a video token grid.

    Args:
        q, k, v: (B, L, H, D), L = T*Hg*Wg tokens in raster order (t, then y, then x) -- Wan2.1's layout.
            One dtype among float16 / bfloat16 / float32, one device. Views (non-contiguous) are accepted.
            k and v may have fewer heads, (B, L, H_kv, D) with H a multiple of H_kv: grouped-query (multi-query
            for H_kv = 1) attention, query head h attending key / value head h // (H / H_kv), as
            ``scaled_dot_product_attention(..., enable_gqa=True)``.
        grid: (T, Hg, Wg) tokens.
        tile: (tt, th, tw) tokens per tile; the last tile along an axis may be partial.
        window: (wt, wh, ww) window size in tiles, each >= 1. See :mod:`fastvmt_kernels.layout` for the rule.
        scale: logit scale, default 1/sqrt(D).
        backend: "auto" (Triton for CUDA tensors, the PyTorch reference otherwise), "triton" (also runs on CPU
            tensors under TRITON_INTERPRET=1) or "torch" (the memory-bounded chunked reference).
        return_lse: also return the fp32 natural-log log-sum-exp, (B, H, L).
        causal_frames: 0 (default), or block-causal time for autoregressive / diffusion-forcing video DiTs: frames
            form causal blocks of ``causal_frames`` frames (a multiple of ``tile[0]``; ``window[0]`` must cover a
            block), and a query attends keys only in its own block and the ``window[0] - causal_frames / tile[0]``
            time tiles before it (the local rule intersected with a frame-block-causal mask; see
            :mod:`fastvmt_kernels.layout`).

    Returns:
        out (B, L, H, D) in q's dtype, or (out, lse) when ``return_lse``. Differentiable w.r.t. q, k, v (the
        gradients of k and v sum over the query heads that share them).
    """
    check_tensors(("q", "k", "v"), (q, k, v), 4, "(B, L, H, D)")
    check_head_groups(q, k, v, "(B, L, H, D)", "(B, L, H_kv, D)")
    layout = TileLayout.create(grid, tile, window, causal_frames)
    if layout.num_tokens != q.shape[1]:
        raise ValueError(f"grid {layout.grid} has {layout.num_tokens} tokens but q has L = {q.shape[1]}")
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                  and 0 < scale < math.inf):
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    chosen = resolve_backend(backend, q.device)
    if chosen == "torch":
        out, lse = local_attention_reference(q, k, v, layout, scale)
    else:
        # The kernels walk boxes of tiles with fastvmt_kernels.index_math: up to SMALL_DIVMOD_MAX_D tiles per axis
        # and fewer than SMALL_DIVMOD_MAX_N tiles per box (a window's key tiles, or the query tiles whose windows
        # hold a key tile: at most 2 w_a per axis at the shifted borders).
        if max(layout.num_tiles) > SMALL_DIVMOD_MAX_D:
            raise ValueError(
                f"the triton backend supports up to {SMALL_DIVMOD_MAX_D} tiles per axis, got {layout.num_tiles} "
                f"(grid {layout.grid}, tile {layout.tile}); use larger tiles or backend='torch'"
            )
        if q.shape[0] * q.shape[2] > MAX_GRID_Y:  # one program row per (batch, head): CUDA's grid y limit
            raise ValueError(
                f"the triton backend runs at most {MAX_GRID_Y} (batch x heads) per call, got B = {q.shape[0]} x "
                f"H = {q.shape[2]}; split the batch or use backend='torch'"
            )
        box_tiles = 1
        for n, w in zip(layout.num_tiles, layout.window_tiles):  # a loop, not a generator: torch.compile traces it
            box_tiles *= min(n, 2 * w)
        if box_tiles >= SMALL_DIVMOD_MAX_N:
            raise ValueError(
                f"the triton backend needs prod_a min(n_a, 2 * w_a) < {SMALL_DIVMOD_MAX_N} tiles (n: tiles, w: "
                f"window tiles per axis), got {box_tiles} for n = {layout.num_tiles}, w = {layout.window_tiles}; "
                "use larger tiles, a smaller window or backend='torch'"
            )
        from .op import MAX_ROW_OFFSET, local_attention_triton

        _, seq, heads, dim = q.shape
        if (seq - 1) * heads * dim + dim > MAX_ROW_OFFSET:  # the largest row offset of a contiguous tensor
            raise ValueError(
                f"the triton backend indexes a batch element's tokens with int32 offsets: (L - 1) * H * D + D must be "
                f"<= {MAX_ROW_OFFSET}, got L, H, D = {seq}, {heads}, {dim}; use backend='torch'"
            )

        out, lse = local_attention_triton(q, k, v, layout, scale)
    return (out, lse) if return_lse else out
