"""Public entry point: :func:`motion_flow` (coarse-to-fine local attention motion flow, FastVMT's AMF)."""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple, Union

import torch

from .._checks import check_tensors, resolve_backend
from ..index_math import SMALL_DIVMOD_MAX_D, SMALL_DIVMOD_MAX_N
from .geometry import FlowGeometry, make_pairs
from .reference import motion_flow_reference

HEAD_REDUCTIONS = ("mean_qk", "mean_flow", "mean_logits")
# Head dims the Triton kernels compile for: multiples of TRITON_DIM_MULTIPLE up to TRITON_MAX_DIM.
TRITON_DIM_MULTIPLE = 16
TRITON_MAX_DIM = 256
TRITON_INDEX_SLACK = 256  # key positions a kernel may index past the last token of a frame (one block)


def _validate(q, k, geo: FlowGeometry, span, temperature, head_reduce) -> None:
    rank = q.dim() if isinstance(q, torch.Tensor) else -1
    if rank not in (4, 5):
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q must have 4 dims (B, F, S, D) or 5 dims (B, F, S, H, D), got {got}")
    check_tensors(("q", "k"), (q, k), rank, "(B, F, S, D) or (B, F, S, H, D)")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[2] != geo.num_tokens:
        raise ValueError(f"frame_shape {geo.frame} has {geo.num_tokens} tokens but q has S = {q.shape[2]}")
    if min(q.shape) < 1:
        raise ValueError(f"q must not be empty, got shape {tuple(q.shape)}")
    if not isinstance(span, int) or isinstance(span, bool) or span < 1:
        raise ValueError(f"span must be an int >= 1, got {span!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive finite float, got {temperature!r}")
    if head_reduce not in HEAD_REDUCTIONS:
        raise ValueError(f"head_reduce must be one of {HEAD_REDUCTIONS}, got {head_reduce!r}")
    if rank == 4 and head_reduce != "mean_qk":
        raise ValueError(
            f"head_reduce={head_reduce!r} needs per-head q, k of shape (B, F, S, H, D); "
            f"got 4-D q {tuple(q.shape)} (already head-averaged: use head_reduce='mean_qk')"
        )


def reduce_heads(
    q: torch.Tensor, k: torch.Tensor, head_reduce: str, temperature: float
) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Per-head q, k (B, F, S, H, D) -> the (q, k, temperature) the flow of ``head_reduce`` is computed from.

    - "mean_qk": q and k averaged over heads, (B, F, S, D); temperature unchanged (FastVMT).
    - "mean_logits": heads' channels concatenated, (B, F, S, H * D), temperature / sqrt(H): the logits
      ``temperature * (q_cat . k_cat) / sqrt(H * D) / sqrt(H)`` equal the per-head logits
      ``temperature * q_h . k_h / sqrt(D)`` averaged over heads, DiTFlow's head handling.
    - "mean_flow": unchanged (each head's flow is computed, then the flows are averaged).
    4-D inputs (already reduced by the caller) are returned unchanged.
    """
    if q.dim() != 5 or head_reduce == "mean_flow":
        return q, k, temperature
    if head_reduce == "mean_qk":
        return q.mean(dim=3), k.mean(dim=3), temperature
    if head_reduce == "mean_logits":
        heads = q.shape[3]
        return q.flatten(-2), k.flatten(-2), temperature / math.sqrt(heads)
    raise ValueError(f"head_reduce must be one of {HEAD_REDUCTIONS}, got {head_reduce!r}")


def triton_unsupported_reason(q: torch.Tensor, geo: FlowGeometry) -> Optional[str]:
    """None when the Triton kernels take (B, F, S, D) inputs ``q`` of frames ``geo``, else the reason they do not."""
    dim = q.shape[-1]
    if dim % TRITON_DIM_MULTIPLE or dim > TRITON_MAX_DIM:
        return f"the triton backend needs D a multiple of {TRITON_DIM_MULTIPLE} up to {TRITON_MAX_DIM}, got D = {dim}"
    # The kernels' index arithmetic (fastvmt_kernels.index_math) covers frames below these sizes.
    if geo.frame[1] > SMALL_DIVMOD_MAX_D or geo.num_tokens + TRITON_INDEX_SLACK >= SMALL_DIVMOD_MAX_N:
        return (
            f"the triton backend supports frames up to {SMALL_DIVMOD_MAX_D} tokens wide and "
            f"{SMALL_DIVMOD_MAX_N - TRITON_INDEX_SLACK - 1} tokens in all, got {geo.frame}"
        )
    return None


def _needs_deterministic_gradients(q: torch.Tensor, k: torch.Tensor) -> bool:
    """True when ``torch.use_deterministic_algorithms(True)`` is set and a gradient of q or k will be taken: the
    triton backward accumulates dk with fp32 atomics, so ``backend="auto"`` then takes the torch reference."""
    return (
        torch.are_deterministic_algorithms_enabled()
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad)
    )


def _checked_windows(windows, q, geo: FlowGeometry, span: int, head_reduce: str) -> torch.Tensor:
    """Given window origins, which must have the shape ``return_windows`` gives and lie where the coarse pass can put
    them (checked eagerly; inside a compiled graph, where that data-dependent check cannot be traced, clamped into
    range as the kernels clamp them)."""
    b, f = q.shape[:2]
    num_pairs = int(make_pairs(f, span, "cpu").shape[0])
    per_head = q.dim() == 5 and head_reduce == "mean_flow"
    expected = (b, num_pairs) + ((q.shape[3],) if per_head else ()) + (geo.num_tiles, 2)
    layout = "(B, P, H, n_tiles, 2)" if per_head else "(B, P, n_tiles, 2)"
    if not isinstance(windows, torch.Tensor) or windows.dtype != torch.int64:
        got = windows.dtype if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(f"windows must be an int64 tensor {layout} as returned by return_windows=True, got {got}")
    if tuple(windows.shape) != expected:
        raise ValueError(f"windows must be {layout} = {expected} for these q, span and tile, got {tuple(windows.shape)}")
    if windows.device != q.device:
        raise ValueError(f"windows must be on q's device {q.device}, got {windows.device}")
    max_y, max_x = geo.max_origin
    if torch.compiler.is_compiling():
        return torch.stack((windows[..., 0].clamp(0, max_y), windows[..., 1].clamp(0, max_x)), dim=-1)
    outside = (windows < 0).any() | (windows[..., 0] > max_y).any() | (windows[..., 1] > max_x).any()
    if bool(outside):  # one device-to-host read per call
        raise ValueError(
            f"window origins must lie in [0, {geo.max_origin}] (frame {geo.frame} minus window sides "
            f"{geo.window_sides}), got values in [{int(windows.min())}, {int(windows.max())}]"
        )
    return windows


def _flow_4d(q, k, geo, span, temperature, backend, windows=None):
    """(flow, pairs, windows) for head-averaged (B, F, S, D) inputs on the chosen backend.

    windows: optional (B, P, n_tiles, 2) origins that replace the coarse pass.
    """
    if backend == "torch":
        return motion_flow_reference(q, k, geo, span, float(temperature), origins=windows)
    unsupported = triton_unsupported_reason(q, geo)
    if unsupported:
        raise ValueError(unsupported + "; use backend='torch' (or 'auto')")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {q.device}")
    from .op import motion_flow_triton

    return motion_flow_triton(q, k, geo, span, float(temperature), windows)


def motion_flow(
    q: torch.Tensor,
    k: torch.Tensor,
    frame_shape: Sequence[int],
    *,
    tile: Sequence[int] = (3, 4),
    window: Union[int, Sequence[int]] = 21,
    span: int = 4,
    temperature: float = 1.0,
    backend: str = "auto",
    head_reduce: str = "mean_qk",
    return_windows: bool = False,
    windows: Optional[torch.Tensor] = None,
) -> Union[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Attention motion flow (AMF) between frame pairs by a coarse-to-fine windowed soft-argmax.

    For every pair (i, j) with ``0 <= i < F`` and ``i <= j < min(F, i + span)`` (ordered by i, then j):

    - **Coarse pass** (no gradient): frame i is cut into tiles of ``tile = (th, tw)`` tokens from the top-left
      (the last row / column of tiles may be partial). Each tile's mean query attends all S keys of frame j with
      logits ``temperature * q.k / sqrt(D)``; the softmax-weighted mean key position ``c = (c_y, c_x)`` picks the
      window origin ``o_a = clamp(floor(c_a + 0.5) - window_a // 2, 0, frame_a - l_a)`` with
      ``l_a = min(window_a, frame_a)`` (the origin is clamped, not the coordinates).
    - **Fine pass**: every query token p of the tile takes the softmax of ``temperature * q_p.k / sqrt(D)`` over the
      ``l_y x l_x`` keys of the window; ``flow[b, pair, p] = E[key position] - position(p)``, absolute (dy, dx)
      in token units. A window covering the frame gives the global (DiTFlow) soft-argmax AMF.

    Gradients reach q and k through the fine pass only; window origins are constants.

    Heads: 4-D q, k are head-averaged by the caller (FastVMT's ``mean_qk``). 5-D q, k (B, F, S, H, D) take
    ``head_reduce="mean_qk"`` (q and k averaged over heads here), ``"mean_flow"`` (each head runs its own coarse
    and fine pass; the flows are averaged over heads) or ``"mean_logits"`` (DiTFlow's: the per-head logits
    ``temperature * q_h.k_h / sqrt(D)`` are averaged over heads before each softmax, computed as one dot product over
    the heads' concatenated channels, D' = H * D, with temperature / sqrt(H); see :func:`reduce_heads`).

    Args:
        q, k: (B, F, S, D) or (B, F, S, H, D); S = Hf * Wf tokens of one frame in raster order (y, then x).
            float16 / bfloat16 / float32, one dtype and one device.
        frame_shape: (Hf, Wf) tokens per frame.
        tile: (th, tw) tokens per tile.
        window: window side in tokens, an int or (wy, wx); each >= 1 (a window larger than the frame is clamped).
        span: temporal extent (>= 1): frame i is paired with i, ..., i + span - 1.
        temperature: positive logit multiplier.
        backend: "auto" (Triton for CUDA tensors the kernels take, the PyTorch reference otherwise, e.g. for
            ``mean_logits`` with H * D > 256, or for differentiable inputs under
            ``torch.use_deterministic_algorithms(True)``), "triton" (CUDA, or CPU under TRITON_INTERPRET=1; D --
            H * D for ``mean_logits`` -- a multiple of 16 up to 256; its backward accumulates dk with fp32 atomics,
            so under that flag it raises, or warns with ``warn_only=True``, as torch's nondeterministic ops do) or
            "torch" (chunked fp32 reference, any D).
        head_reduce: "mean_qk", "mean_flow" or "mean_logits" (the last two for 5-D inputs only), see above.
        return_windows: also return the window origins.
        windows: optional window origins to use instead of the coarse pass, in the layout ``return_windows`` gives
            (e.g. another video's windows, so that two flows are soft-argmaxes over the same key windows and the
            window-centre bias of the soft argmax cancels between them). int64, on q's device, each origin in
            ``[0, frame_a - l_a]`` (checked eagerly with one device-to-host read; inside ``torch.compile``, where
            the check cannot be traced, clamped into that range).

    Returns:
        ``flow`` (B, P, S, 2) float32, (dy, dx) per token of frame i in raster order; ``pairs`` (P, 2) int64 on q's
        device; with ``return_windows`` also ``windows`` int64 (oy, ox) origins: (B, P, n_tiles, 2) for 4-D inputs,
        ``mean_qk`` and ``mean_logits``, (B, P, H, n_tiles, 2) for ``mean_flow`` (one origin per head); tiles in raster order over
        the ``(ceil(Hf / th), ceil(Wf / tw))`` tile grid of frame i.
    """
    geo = FlowGeometry.create(frame_shape, tile, window)
    _validate(q, k, geo, span, temperature, head_reduce)
    if windows is not None:
        windows = _checked_windows(windows, q, geo, span, head_reduce)
    q, k, temperature = reduce_heads(q, k, head_reduce, temperature)
    chosen = resolve_backend(backend, q.device)
    if backend == "auto" and chosen == "triton" and triton_unsupported_reason(q, geo):
        chosen = "torch"  # e.g. mean_logits over Wan's 12 x 128 channels (D' = 1536)
    if backend == "auto" and chosen == "triton" and _needs_deterministic_gradients(q, k):
        chosen = "torch"  # the triton backward's dk atomics are not deterministic
    if q.dim() == 4:
        flow, pairs, windows = _flow_4d(q, k, geo, span, temperature, chosen, windows)
    else:
        b, f, s, h, d = q.shape
        per_head = lambda t: t.permute(0, 3, 1, 2, 4).reshape(b * h, f, s, d)  # noqa: E731
        if windows is not None:  # (B, P, H, n, 2) -> (B * H, P, n, 2)
            windows = windows.transpose(1, 2).reshape(b * h, *windows.shape[1:2], *windows.shape[3:])
        flow, pairs, windows = _flow_4d(per_head(q), per_head(k), geo, span, temperature, chosen, windows)
        flow = flow.reshape(b, h, *flow.shape[1:]).mean(dim=1)
        windows = windows.reshape(b, h, *windows.shape[1:]).transpose(1, 2)
    return (flow, pairs, windows) if return_windows else (flow, pairs)
