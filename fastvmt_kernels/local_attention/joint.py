"""Local attention inside a joint sequence of video tokens and global (e.g. text) tokens.

MMDiT-style video DiTs (CogVideoX, HunyuanVideo, Mochi) attend text and video tokens in one sequence instead of a
separate cross-attention. :func:`joint_local_attention` keeps that contract while the video-to-video part runs
block-sparse: each video query attends its local window of video keys (the rule of :func:`local_attention`) plus
every global key; each global query attends the whole sequence densely. The two parts of a video query's softmax
are merged exactly through their log-sum-exps (the local kernel's LSE is differentiable), so the result equals
one softmax over the union of keys.

The video queries' global part runs on the Triton kernels too when the local part does and no global key is masked
(:func:`_video_to_global_kernels`): the video queries, cut into chunks of ``num_global`` tokens, attend the global
keys through :func:`local_attention` with a window covering them (views of q, k, v; no copy of q's size). That keeps
thousands of global tokens (a reference frame of Wan-Animate's, 1,560 tokens at 480p) on the tensor cores with no
logits block in memory. Masked global keys (text padding) take a dense fp32 block instead (:func:`_video_to_global`),
which suits hundreds of them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .._checks import check_tensors, resolve_backend
from ..index_math import SMALL_DIVMOD_MAX_D
from ..layout import TileLayout
from .interface import MAX_GRID_Y, check_head_groups, local_attention

GLOBAL_POSITIONS = ("prefix", "suffix")
# Logit given to masked global keys: finite, so a row whose global keys are all masked gets the merge weight
# exp(_MASKED_LOGIT - lse) = 0 for them instead of a 0 * NaN from an all -inf softmax.
_MASKED_LOGIT = -1e30
# Video queries per chunk of the dense video-to-global block: its fp32 logits take H * chunk * num_global * 4 bytes
# (24 heads x 8192 x 256 text tokens: 201 MB, instead of 2.9 GB for HunyuanVideo's 118,800 video tokens at 720p).
GLOBAL_QUERY_CHUNK = 8192
# Tokens per tile of the global keys' 1-D layout on the Triton path (the forward kernel's 128-row query blocks).
GLOBAL_KERNEL_TILE = 128


def _video_to_global(q_video, k_glob, v_glob, key_mask, scale):
    """Softmax attention of the video queries over the global keys alone, GLOBAL_QUERY_CHUNK queries at a time.

    q_video: (B, L, H, D); k_glob, v_glob: (B, G, H_kv, D), H a multiple of H_kv; key_mask: (B, G) bool or None.
    Returns out (B, L, H, D) fp32 and its natural-log log-sum-exp (B, H, L) fp32, both differentiable.
    """
    k_f, v_f = k_glob.float(), v_glob.float()
    group = q_video.shape[2] // k_glob.shape[2]
    if group > 1:  # grouped-query heads: repeat the few global keys / values per query head
        k_f, v_f = (t.repeat_interleave(group, dim=2) for t in (k_f, v_f))
    outs, lses = [], []
    with torch.autocast(q_video.device.type, enabled=False):  # fp32 also in an autocast region
        for start in range(0, q_video.shape[1], GLOBAL_QUERY_CHUNK):
            q_f = q_video[:, start : start + GLOBAL_QUERY_CHUNK].float()
            logits = torch.einsum("blhd,bghd->bhlg", q_f, k_f) * scale
            if key_mask is not None:
                logits = logits.masked_fill(~key_mask[:, None, None, :], _MASKED_LOGIT)
            lse = logits.logsumexp(-1)
            outs.append(torch.einsum("bhlg,bghd->blhd", (logits - lse[..., None]).exp(), v_f))
            lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


def _kernels_take_global_block(q_video: torch.Tensor, num_global: int) -> bool:
    """Whether :func:`_video_to_global_kernels` can launch for these video queries (B, L, H, D): one program row per
    (chunk of num_global queries, head) of a batch element within CUDA's grid limit, and the global keys' tiles within
    the kernels' index arithmetic."""
    _, num_video, heads, _ = q_video.shape
    chunks = -(-num_video // num_global)
    return chunks * heads <= MAX_GRID_Y and -(-num_global // min(GLOBAL_KERNEL_TILE, num_global)) <= SMALL_DIVMOD_MAX_D


def _chunks_to_global(q, k, v, scale, backend):
    """Dense attention of n chunks of G queries each over the same G global keys, on the Triton kernels.

    q: (1, n * G, H, D); k, v: (1, G, H_kv, D). Chunk c becomes batch entry c of a :func:`local_attention` call on a
    (1, 1, G) grid whose window covers every tile (q and k, v as views: k, v expanded with batch stride 0; autograd
    sums the chunks' dk, dv). Returns out (1, n * G, H, D) and lse (1, H, n * G) fp32 natural log.
    """
    num_global, (heads, head_dim) = k.shape[1], q.shape[2:]
    chunks = q.shape[1] // num_global
    tile = min(GLOBAL_KERNEL_TILE, num_global)
    out, lse = local_attention(
        q.reshape(chunks, num_global, heads, head_dim), k.expand(chunks, -1, -1, -1), v.expand(chunks, -1, -1, -1),
        (1, 1, num_global), (1, 1, tile), (1, 1, -(-num_global // tile)), scale=scale, backend=backend,
        return_lse=True,
    )
    return out.reshape(1, chunks * num_global, heads, head_dim), lse.transpose(0, 1).reshape(1, heads, -1)


def _video_to_global_kernels(q_video, k_glob, v_glob, scale, backend):
    """Softmax attention of the video queries over all global keys, on the Triton kernels (no key mask).

    Per batch element, the video queries are cut into chunks of G = num_global tokens that attend the G global keys
    (:func:`_chunks_to_global`): the whole chunks as a view of q, the last partial one zero-padded to G (a copy of at
    most G queries, whose padding rows are dropped). Nothing of the size of q is copied, so nothing such is saved
    for backward either.

    q_video: (B, L, H, D); k_glob, v_glob: (B, G, H_kv, D). Returns out (B, L, H, D) in q's dtype and its natural-log
    log-sum-exp (B, H, L) fp32, both differentiable.
    """
    num_video, num_global = q_video.shape[1], k_glob.shape[1]
    whole = num_video - num_video % num_global  # queries in whole chunks
    outs, lses = [], []
    for b in range(q_video.shape[0]):
        q, k, v = (t[b : b + 1] for t in (q_video, k_glob, v_glob))
        parts = [_chunks_to_global(q[:, :whole], k, v, scale, backend)] if whole else []
        if whole < num_video:  # the last, partial chunk: its rows padded up to G with zero queries
            rest = num_video - whole
            out, lse = _chunks_to_global(F.pad(q[:, whole:], (0, 0, 0, 0, 0, num_global - rest)), k, v, scale, backend)
            parts.append((out[:, :rest], lse[..., :rest]))
        outs.append(torch.cat([out for out, _ in parts], dim=1))
        lses.append(torch.cat([lse for _, lse in parts], dim=2))
    return torch.cat(outs), torch.cat(lses)


def joint_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    tile: Sequence[int],
    window: Sequence[int],
    *,
    num_global: int,
    global_position: str = "prefix",
    global_key_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over a joint sequence of ``num_global`` global tokens and L = T*Hg*Wg video tokens.

    Args:
        q, k, v: (B, N, H, D), N = num_global + L. The global tokens come first (``global_position="prefix"``,
            CogVideoX's [text, video]) or last (``"suffix"``, HunyuanVideo's [video, text]); the video tokens are
            in raster order (t, then y, then x). One dtype among float16 / bfloat16 / float32, one device.
            k and v may have fewer heads, (B, N, H_kv, D) with H a multiple of H_kv (grouped-query attention, as
            in :func:`local_attention`).
        grid, tile, window: the video token grid (T, Hg, Wg), tiles (tt, th, tw) and window in tiles (wt, wh, ww),
            exactly as :func:`local_attention`.
        num_global: number of global tokens, 0 <= num_global < N (0 gives plain local attention).
        global_key_mask: optional (B, num_global) bool, True where a global key may be attended (e.g. the text
            padding mask); masked global keys are attended by no query. Video keys are never masked here.
        scale: logit scale, default 1/sqrt(D).
        backend: backend of the video-to-video part ("auto", "triton", "torch"; see :func:`local_attention`).

    Returns:
        out: (B, N, H, D) in q's dtype, in the input's token order. Differentiable w.r.t. q, k, v.

    A video query attends the video keys of its window plus every unmasked global key; a global query attends every
    unmasked global key and all video keys. The video queries' global part is merged with the local part by
    log-sum-exp. It runs on the Triton kernels when the local part does and no key mask is given (any num_global;
    see :func:`_video_to_global_kernels`), else as a dense fp32 block, GLOBAL_QUERY_CHUNK queries at a time
    (meant for hundreds of global tokens, e.g. padded text).
    """
    check_tensors(("q", "k", "v"), (q, k, v), 4, "(B, N, H, D)")
    check_head_groups(q, k, v, "(B, N, H, D)", "(B, N, H_kv, D)")
    batch, total, _, head_dim = q.shape
    if isinstance(num_global, bool) or not isinstance(num_global, int) or not 0 <= num_global < total:
        raise ValueError(f"num_global must be an int in [0, N) = [0, {total}), got {num_global!r}")
    if global_position not in GLOBAL_POSITIONS:
        raise ValueError(f"global_position must be one of {GLOBAL_POSITIONS}, got {global_position!r}")
    layout = TileLayout.create(grid, tile, window)
    num_video = total - num_global
    if layout.num_tokens != num_video:
        raise ValueError(
            f"grid {layout.grid} has {layout.num_tokens} tokens but q holds N - num_global = {total} - {num_global} "
            f"= {num_video} video tokens"
        )
    if global_key_mask is not None:
        if not isinstance(global_key_mask, torch.Tensor) or global_key_mask.dtype != torch.bool:
            raise ValueError("global_key_mask must be a bool tensor of shape (B, num_global)")
        if tuple(global_key_mask.shape) != (batch, num_global):
            raise ValueError(
                f"global_key_mask must have shape (B, num_global) = ({batch}, {num_global}), "
                f"got {tuple(global_key_mask.shape)}"
            )
        if global_key_mask.device != q.device:
            raise ValueError(f"global_key_mask is on {global_key_mask.device}, q on {q.device}")

    prefix = global_position == "prefix"
    video = slice(num_global, total) if prefix else slice(0, num_video)
    q_video = q[:, video]
    out_video, lse_local = local_attention(
        q_video, k[:, video], v[:, video], grid, tile, window, scale=scale, backend=backend, return_lse=True
    )
    if num_global == 0:
        return out_video
    scale = head_dim**-0.5 if scale is None else scale
    glob = slice(0, num_global) if prefix else slice(num_video, total)
    k_glob, v_glob = k[:, glob], v[:, glob]

    # Video queries x global keys (on the kernels, or a dense fp32 block in chunks of queries), merged with the local
    # part by LSE.
    if (global_key_mask is None and resolve_backend(backend, q.device) == "triton"
            and _kernels_take_global_block(q_video, num_global)):
        out_glob, lse_glob = _video_to_global_kernels(q_video, k_glob, v_glob, scale, backend)
    else:
        out_glob, lse_glob = _video_to_global(q_video, k_glob, v_glob, global_key_mask, scale)
    lse = torch.logaddexp(lse_local, lse_glob)
    weight_local = (lse_local - lse).exp().transpose(1, 2)[..., None]  # (B, L, H, 1)
    weight_glob = (lse_glob - lse).exp().transpose(1, 2)[..., None]
    out_video = (out_video.float() * weight_local + out_glob.float() * weight_glob).to(q.dtype)

    # Global queries: dense over the whole sequence (masked global keys excluded).
    attn_mask = None
    if global_key_mask is not None:
        video_ok = torch.ones(batch, num_video, dtype=torch.bool, device=q.device)
        keys_ok = torch.cat([global_key_mask, video_ok] if prefix else [video_ok, global_key_mask], dim=1)
        attn_mask = keys_ok[:, None, None, :]  # (B, 1, 1, N): broadcast over heads and queries
    out_global = F.scaled_dot_product_attention(
        q[:, glob].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale,
        enable_gqa=k.shape[2] != q.shape[2],
    ).transpose(1, 2)
    return torch.cat([out_global, out_video] if prefix else [out_video, out_global], dim=1)
