"""Plain-PyTorch reference of the coarse-to-fine attention motion flow (fp32 math, differentiable).

Memory-bounded: frame pairs are processed in chunks whose largest intermediate (the gathered window keys,
``(B, C, n_tiles, l_y*l_x, D)`` fp32) stays under CHUNK_BYTES; with gradients each chunk's fine pass is
recomputed in backward (activation checkpointing), so no chunk's intermediates outlive it. No S x S map is
ever formed unless the window is the whole frame (then the fine pass *is* the S x S soft-argmax of one chunk, computed
densely without gathering the keys per tile).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from .geometry import FlowGeometry, make_pairs

# Upper bound on the bytes of the largest fp32 intermediate of one chunk of pairs.
CHUNK_BYTES = 1 << 28
FP32_BYTES = 4


def coarse_origins(
    q: torch.Tensor, k: torch.Tensor, pair_i: torch.Tensor, pair_j: torch.Tensor, geo: FlowGeometry, logit_scale: float
) -> torch.Tensor:
    """Window origins of the coarse pass, no gradient.

    Args:
        q, k: (B, F, S, D).
        pair_i, pair_j: (C,) int64 frame indices of the chunk's pairs.
        geo: geometry; logit_scale: temperature / sqrt(D).

    Returns:
        (B, C, n_tiles, 2) int64 origins (oy, ox).
    """
    b = q.shape[0]
    if geo.covers_frame:
        return torch.zeros(b, pair_i.numel(), geo.num_tiles, 2, dtype=torch.int64, device=q.device)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):  # fp32 also in an autocast region
        index, valid = geo.tile_tokens(q.device)
        qt = q[:, pair_i].float()[:, :, index]  # (B, C, n_tiles, T, D)
        weights = valid.float() / valid.sum(1, keepdim=True).float()  # (n_tiles, T)
        q_rep = torch.einsum("bcntd,nt->bcnd", qt, weights)
        logits = torch.einsum("bcnd,bcsd->bcns", q_rep, k[:, pair_j].float()) * logit_scale
        centres = torch.softmax(logits, dim=-1) @ geo.token_positions(q.device)  # (B, C, n_tiles, 2)
        return geo.origins_from_centres(centres)


def fine_flow(
    q: torch.Tensor,
    k: torch.Tensor,
    pair_i: torch.Tensor,
    pair_j: torch.Tensor,
    origins: torch.Tensor,
    geo: FlowGeometry,
    logit_scale: float,
) -> torch.Tensor:
    """Fine pass: soft-argmax of every query over its tile's window; differentiable w.r.t. q and k.

    Args:
        q, k: (B, F, S, D); pair_i, pair_j: (C,) int64; origins: (B, C, n_tiles, 2) int64.

    Returns:
        (B, C, S, 2) fp32 absolute flow (dy, dx), raster order of frame i's tokens.
    """
    if geo.covers_frame:  # every window is the whole frame: one dense S x S soft-argmax per pair, no key gather
        return _global_fine_flow(q, k, pair_i, pair_j, geo, logit_scale)
    b, _, seq, dim = q.shape
    c = pair_i.numel()
    index, valid = geo.tile_tokens(q.device)
    n, t = index.shape
    qt = q[:, pair_i].float()[:, :, index]  # (B, C, n, T, D)
    offsets = geo.window_offsets(q.device)  # (W, 2)
    win_pos = origins[:, :, :, None, :] + offsets  # (B, C, n, W, 2) int64
    win_tok = win_pos[..., 0] * geo.frame[1] + win_pos[..., 1]  # (B, C, n, W)
    kj = k[:, pair_j].float()  # (B, C, S, D)
    kw = torch.gather(kj, 2, win_tok.reshape(b, c, -1, 1).expand(-1, -1, -1, dim)).reshape(b, c, n, -1, dim)
    with torch.autocast(q.device.type, enabled=False):  # fp32 also in an autocast region
        probs = torch.softmax(torch.einsum("bcntd,bcnwd->bcntw", qt, kw) * logit_scale, dim=-1)
        expected = probs @ win_pos.float()  # (B, C, n, T, 2)
    flow_tiles = expected - geo.token_positions(q.device)[index]  # minus query positions (n, T, 2)
    order = index[valid]  # every token once, tile-major
    inverse = torch.argsort(order)
    return flow_tiles[:, :, valid][:, :, inverse]


def _global_fine_flow(q, k, pair_i, pair_j, geo: FlowGeometry, logit_scale: float) -> torch.Tensor:
    """The fine pass when every window is the whole frame: (B, C, S, 2) dense soft-argmax, raster order.

    Equal to the tiled gather of :func:`fine_flow` (whose window keys would be the frame's keys once per tile, e.g.
    104 copies for 4 x 4 tiles of a 30 x 52 frame), without the copies."""
    pos = geo.token_positions(q.device)
    with torch.autocast(q.device.type, enabled=False):  # fp32 also in an autocast region
        logits = torch.einsum("bcsd,bctd->bcst", q[:, pair_i].float(), k[:, pair_j].float()) * logit_scale
        return torch.softmax(logits, dim=-1) @ pos - pos


def chunk_pairs_for(batch: int, dim: int, geo: FlowGeometry) -> int:
    """Pairs per chunk so that the gathered window keys and the coarse logits (for whole-frame windows: the S x S
    logits and the pair's query and key copies) stay under CHUNK_BYTES."""
    if geo.covers_frame:
        per_pair = FP32_BYTES * batch * geo.num_tokens * (geo.num_tokens + 2 * dim)
    else:
        per_pair = FP32_BYTES * batch * geo.num_tiles * max(geo.window_size * dim, geo.num_tokens)
    return max(1, CHUNK_BYTES // max(1, per_pair))


def motion_flow_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    geo: FlowGeometry,
    span: int,
    temperature: float,
    origins: Optional[torch.Tensor] = None,
    chunk_pairs: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coarse-to-fine motion flow by chunked gathers (see :func:`fastvmt_kernels.motion_flow` for semantics).

    Args:
        q, k: (B, F, S, D), any float dtype; math in fp32 (also inside an autocast region).
        geo: frame / tile / window geometry; span: temporal extent; temperature: logit multiplier.
        origins: optional (B, P, n_tiles, 2) int64 window origins to use instead of the coarse pass.
        chunk_pairs: pairs per chunk; default from CHUNK_BYTES.

    Returns:
        flow (B, P, S, 2) fp32, pairs (P, 2) int64, origins (B, P, n_tiles, 2) int64.
    """
    b, f, _, dim = q.shape
    pairs = make_pairs(f, span, q.device)
    logit_scale = temperature / math.sqrt(dim)
    chunk = chunk_pairs or chunk_pairs_for(b, dim, geo)
    need_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    flows, windows = [], []
    for start in range(0, pairs.shape[0], chunk):
        pair_i, pair_j = pairs[start : start + chunk].unbind(1)
        if origins is None:
            chunk_origins = coarse_origins(q, k, pair_i, pair_j, geo, logit_scale)
        else:
            chunk_origins = origins[:, start : start + chunk]
        args = (q, k, pair_i, pair_j, chunk_origins, geo, logit_scale)
        flows.append(checkpoint(fine_flow, *args, use_reentrant=False) if need_grad else fine_flow(*args))
        windows.append(chunk_origins)
    return torch.cat(flows, dim=1), pairs, torch.cat(windows, dim=1)
