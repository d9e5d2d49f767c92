"""Plain-PyTorch reference for block-sparse spatiotemporal local attention.

Memory-bounded: queries are processed in chunks, so no (L, L) fp32 map exists for large L; when
gradients are needed each chunk is recomputed in backward (activation checkpointing), so the
backward is memory-bounded too.  Arithmetic is fp32 whatever the input dtype (also under autocast).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from ..layout import TileLayout

# Upper bound on the fp32 logits held at once by one chunk (bytes).
CHUNK_LOGITS_BYTES = 1 << 28


def _chunk(q_chunk: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """Masked softmax attention of a query chunk. q_chunk: (B, R, H, D); k, v: (B, L, H, D); mask: (R, L).
    In fp32 also inside an autocast region (which would run the einsums in half precision)."""
    with torch.autocast(q_chunk.device.type, enabled=False):
        logits = torch.einsum("brhd,blhd->bhrl", q_chunk.float(), k.float()) * scale
        logits = logits.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)  # (B, H, R)
        probs = torch.exp(logits - lse[..., None])
        out = torch.einsum("bhrl,blhd->brhd", probs, v.float())
    return out, lse


def local_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TileLayout,
    scale: Optional[float] = None,
    chunk_rows: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Local-window attention by chunked dense masked softmax.

    Args:
        q, k, v: (B, L, H, D), L = T*Hg*Wg in raster order; any float dtype. k, v may have H_kv heads with H a
            multiple of H_kv (grouped-query attention: query head h uses key / value head h // (H / H_kv)).
        layout: the grid / tile / window geometry.
        scale: logit scale, default 1/sqrt(D).
        chunk_rows: queries per chunk; default keeps each chunk's logits under CHUNK_LOGITS_BYTES.

    Returns:
        out: (B, L, H, D) in q's dtype, and lse: (B, H, L) fp32 natural-log log-sum-exp.
    """
    b, seq, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if 0 < k.shape[2] < h:  # grouped-query attention: each key / value head serves h / H_kv query heads
        k, v = (t.repeat_interleave(h // k.shape[2], dim=2) for t in (k, v))
    if b * h == 0:  # an empty batch or no heads: empty outputs (0 * anything rows of work)
        return q.new_empty(q.shape[:3] + v.shape[3:]), q.new_empty(b, h, seq, dtype=torch.float32)
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_LOGITS_BYTES // (4 * b * h * seq))
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs, lses = [], []
    for start in range(0, seq, chunk_rows):
        rows = torch.arange(start, min(seq, start + chunk_rows), device=q.device)
        mask = layout.mask_rows(rows)
        q_chunk = q[:, start : start + rows.numel()]
        if need_grad:
            out, lse = checkpoint(_chunk, q_chunk, k, v, mask, scale, use_reentrant=False)
        else:
            out, lse = _chunk(q_chunk, k, v, mask, scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=1).to(q.dtype), torch.cat(lses, dim=2)
