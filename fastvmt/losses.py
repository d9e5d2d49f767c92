"""Motion losses on top of :func:`fastvmt_kernels.motion_flow`: FastVMT's weighted AMF and window losses, DiTFlow's.

Layouts: flows are (B, P, S, 2) fp32 (dy, dx) per token of frame i in raster order; pairs (P, 2) int64 (i, j);
keys k are (B, F, S, D) (or (B, F, S, H, D) with per-head windows for ``head_reduce="mean_flow"``).
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch

from fastvmt_kernels import motion_flow
from fastvmt_kernels.motion_flow import FlowGeometry

# Bytes of fp32 logits one chunk of the hard (argmax) DiTFlow reference may hold.
HARD_CHUNK_BYTES = 1 << 28


def amf_pair_weights(pairs: torch.Tensor, span: int, min_weight: float = 0.8) -> torch.Tensor:
    """(P,) fp32 weights, linear in the frame distance d = j - i: 1.0 at d = 0 down to ``min_weight`` at d = span - 1.

    This is the official code's ``linspace(1, min_weight, span)[j - i]`` (the paper's 1 - 0.2 (d - 1) / (sf - 1)
    shifted so that the self pair has weight 1). With ``span == 1`` every weight is 1.
    """
    if not isinstance(span, int) or span < 1:
        raise ValueError(f"span must be an int >= 1, got {span!r}")
    distance = (pairs[:, 1] - pairs[:, 0]).float()
    if distance.numel() and (distance.min() < 0 or distance.max() > span - 1):
        raise ValueError(f"pairs must satisfy 0 <= j - i < span = {span}, got distances in "
                         f"[{int(distance.min())}, {int(distance.max())}]")
    if span == 1:
        return torch.ones_like(distance)
    return 1.0 - (1.0 - min_weight) * distance / (span - 1)


def amf_loss(flow_gen: torch.Tensor, flow_ref: torch.Tensor, pairs: torch.Tensor, span: int) -> torch.Tensor:
    """Weighted AMF loss: mean over pairs of ``w_(j-i) * sum over tokens and (dy, dx) of (gen - ref)^2``.

    Args:
        flow_gen: (B, P, S, 2), differentiable; flow_ref: (B, P, S, 2), a target (detached here).
        pairs: (P, 2) int64, as returned with the flows; span: the span they were computed with.

    Returns:
        A scalar: the per-sample loss averaged over the batch. The squared norm is a sum over tokens (not a mean),
        as the paper and the official code.
    """
    if flow_gen.shape != flow_ref.shape or flow_gen.dim() != 4 or flow_gen.shape[-1] != 2:
        raise ValueError(f"flow_gen and flow_ref must both be (B, P, S, 2), got {tuple(flow_gen.shape)} and "
                         f"{tuple(flow_ref.shape)}")
    if pairs.shape != (flow_gen.shape[1], 2):
        raise ValueError(f"pairs must be (P, 2) = ({flow_gen.shape[1]}, 2), got {tuple(pairs.shape)}")
    per_pair = (flow_gen.float() - flow_ref.detach().float()).square().sum(dim=(2, 3))  # (B, P)
    return (per_pair * amf_pair_weights(pairs, span).to(per_pair.device)).mean()


def _window_means(k: torch.Tensor, windows: torch.Tensor, pairs: torch.Tensor, geo: FlowGeometry) -> torch.Tensor:
    """(B, P, n_tiles, D) mean key of every selected window, by a summed-area table over each frame of k."""
    b, f, _, d = k.shape
    hf, wf = geo.frame
    ly, lx = geo.window_sides
    table = torch.zeros(b, f, hf + 1, wf + 1, d, dtype=torch.float32, device=k.device)
    table[:, :, 1:, 1:] = k.float().reshape(b, f, hf, wf, d).cumsum(2).cumsum(3)
    frames = pairs[:, 1].view(1, -1, 1).expand(b, -1, windows.shape[2])  # (B, P, n) frame j
    batch = torch.arange(b, device=k.device).view(-1, 1, 1).expand_as(frames)
    oy, ox = windows[..., 0], windows[..., 1]
    box = table[batch, frames, oy + ly, ox + lx] - table[batch, frames, oy, ox + lx]
    box = box - table[batch, frames, oy + ly, ox] + table[batch, frames, oy, ox]
    return box / (ly * lx)


def corresponding_window_loss(
    k: torch.Tensor,
    windows: torch.Tensor,
    pairs: torch.Tensor,
    frame_shape: Sequence[int],
    window: Union[int, Sequence[int]],
) -> torch.Tensor:
    """FastVMT's corresponding-window loss in the paper's form.

    For frame i with targets j_1 < j_2 < ... < j_N (the pairs (i, j) with j > i), ``Kbar(p, j)`` is the mean key over
    the window that tile p of frame i selected in frame j (mean over the l_y*l_x window positions). The loss is
    ``mean over frames i with N >= 2 of mean over tiles p of mean over t of ||Kbar(p, j_(t+1)) - Kbar(p, j_t)||^2``
    (squared L2 over channels), averaged over the batch. Gradient reaches k only; windows are integer constants.

    The official code differs (quirk Q11): it averages over the D channels instead of the window positions and
    uses the non-squared L2 norm over the window positions. This follows the paper.

    Args:
        k: (B, F, S, D) keys of the generated video; or (B, F, S, H, D) with per-head windows (B, P, H, n_tiles, 2)
            (``head_reduce="mean_flow"``), in which case the loss is averaged over heads.
        windows: (B, P, n_tiles, 2) int64 window origins returned by ``motion_flow(..., return_windows=True)``.
        pairs: (P, 2) int64 pairs returned with them.
        frame_shape: (Hf, Wf); window: the window the flow was computed with (int or (wy, wx)).

    Returns:
        A scalar (0 with a graph to k when no frame has two targets, e.g. span <= 2).
    """
    if k.dim() == 5:
        b, f, s, h, d = k.shape
        if windows.dim() != 5 or windows.shape[2] != h:
            raise ValueError(f"5-D k (B, F, S, H, D) needs windows (B, P, H, n_tiles, 2), got {tuple(windows.shape)}")
        k = k.permute(0, 3, 1, 2, 4).reshape(b * h, f, s, d)
        windows = windows.transpose(1, 2).reshape(b * h, *windows.shape[1:2], *windows.shape[3:])
    geo = FlowGeometry.create(frame_shape, (1, 1), window)
    if k.dim() != 4 or k.shape[2] != geo.num_tokens:
        raise ValueError(f"k must be (B, F, S, D) with S = {geo.num_tokens} for frame_shape {geo.frame}, "
                         f"got {tuple(k.shape)}")
    if windows.dim() != 4 or windows.shape[:2] != (k.shape[0], pairs.shape[0]) or windows.shape[-1] != 2:
        raise ValueError(f"windows must be (B, P, n_tiles, 2) = ({k.shape[0]}, {pairs.shape[0]}, n_tiles, 2), "
                         f"got {tuple(windows.shape)}")
    means = _window_means(k, windows, pairs.to(k.device), geo)  # (B, P, n, D)
    per_frame = []
    for i in pairs[:, 0].unique().tolist():
        rows = ((pairs[:, 0] == i) & (pairs[:, 1] > i)).nonzero().flatten()
        rows = rows[torch.argsort(pairs[rows, 1])]
        if rows.numel() < 2:
            continue
        targets = means[:, rows.to(k.device)]  # (B, N, n, D)
        diffs = (targets[:, 1:] - targets[:, :-1]).square().sum(-1)  # (B, N - 1, n)
        per_frame.append(diffs.mean(dim=(1, 2)))
    if not per_frame:
        return k.sum() * 0.0
    return torch.stack(per_frame, dim=1).mean()


def _all_pairs(num_frames: int, device) -> torch.Tensor:
    """(F*F, 2) int64 all ordered pairs (i, j), ordered by i then j."""
    idx = torch.arange(num_frames, device=device)
    return torch.stack(torch.meshgrid(idx, idx, indexing="ij"), dim=-1).reshape(-1, 2)


def _hard_global_flow(q: torch.Tensor, k: torch.Tensor, geo: FlowGeometry, pairs: torch.Tensor) -> torch.Tensor:
    """(B, P, S, 2) position of the arg-max key minus the query position, chunked over pairs, no gradient."""
    b, _, s, _ = q.shape
    pos = geo.token_positions(q.device)
    chunk = max(1, HARD_CHUNK_BYTES // (4 * b * s * s))
    out = []
    with torch.no_grad():
        for start in range(0, pairs.shape[0], chunk):
            i, j = pairs[start : start + chunk].unbind(1)
            logits = torch.einsum("bcsd,bctd->bcst", q[:, i].float(), k[:, j].float())
            out.append(pos[logits.argmax(-1)] - pos)
    return torch.cat(out, dim=1)


def ditflow_flow(
    q: torch.Tensor,
    k: torch.Tensor,
    frame_shape: Sequence[int],
    temperature: float = 2.0,
    hard: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DiTFlow's global AMF over all ordered frame pairs, self pairs and j < i included.

    Args:
        q, k: (B, F, S, D): head-averaged, or the heads' concatenated channels that
            ``fastvmt_kernels.motion_flow.reduce_heads(..., "mean_logits", tau)`` returns with its temperature
            (DiTFlow's logit averaging).
        frame_shape: (Hf, Wf); temperature: logit multiplier (DiTFlow uses 2).
        hard: arg-max instead of soft-argmax (DiTFlow's reference; no gradient).
        backend: as :func:`fastvmt_kernels.motion_flow` (soft version only).

    Returns:
        flow (B, F*F, S, 2) fp32 and pairs (F*F, 2) int64 ordered by i then j.
    """
    geo = FlowGeometry.create(frame_shape, (1, 1), 1)
    if q.dim() != 4 or q.shape != k.shape or q.shape[2] != geo.num_tokens:
        raise ValueError(f"q, k must both be (B, F, S, D) with S = {geo.num_tokens}, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    f = q.shape[1]
    pairs = _all_pairs(f, q.device)
    if hard:
        return _hard_global_flow(q, k, geo, pairs), pairs
    kwargs = dict(tile=(4, 4), window=max(geo.frame), temperature=temperature, backend=backend)
    forward, fwd_pairs = motion_flow(q, k, geo.frame, span=f, **kwargs)  # i <= j
    if f == 1:
        return forward, pairs
    # j < i, each pair once: queries of frames F-1..1 against keys of frames F-2..0; the call's pair (a, b), a <= b,
    # is query frame F-1-a and key frame F-2-b <= F-2-a.
    backward, rev_pairs = motion_flow(q.flip(1)[:, :-1], k.flip(1)[:, 1:], geo.frame, span=f - 1, **kwargs)
    bwd_pairs = torch.stack([(f - 1) - rev_pairs[:, 0], (f - 2) - rev_pairs[:, 1]], dim=1)
    flow = torch.cat([forward, backward], dim=1)
    slot = torch.cat([fwd_pairs[:, 0] * f + fwd_pairs[:, 1], bwd_pairs[:, 0] * f + bwd_pairs[:, 1]])
    return flow[:, torch.argsort(slot)], pairs


def ditflow_loss(flow_gen: torch.Tensor, flow_ref: torch.Tensor) -> torch.Tensor:
    """DiTFlow's masked MSE ("threshloss"): mean of (gen - ref)^2 over both components of the tokens whose
    reference displacement is non-zero.

    flow_gen, flow_ref: (..., 2). The mask is per token and pair, as DiTFlow's code keeps ``norm(ref, dim=-1) > 0``
    (a token moving only sideways keeps its vertical component in the loss). Returns 0 (with a graph) when every
    reference displacement is 0. flow_ref is a target (detached).
    """
    if flow_gen.shape != flow_ref.shape or flow_ref.shape[-1:] != (2,):
        raise ValueError(f"flow_gen and flow_ref must have one shape (..., 2), got {tuple(flow_gen.shape)} and "
                         f"{tuple(flow_ref.shape)}")
    ref = flow_ref.detach().float()
    moving = (ref != 0).any(dim=-1)  # norm > 0
    if not moving.any():
        return flow_gen.sum() * 0.0
    return (flow_gen.float()[moving] - ref[moving]).square().mean()
