"""Launchers and the ``torch.library`` custom ops of the Triton local-attention kernels.

Ops (traceable by ``torch.compile``, with fake implementations):
    ``fastvmt::local_attention_fwd(q, k, v, grid, tile, window, scale) -> (out, lse)``
    ``fastvmt::local_attention_bwd(dout, q, k, v, out, lse, dlse, grid, tile, window, scale) -> (dq, dk, dv)``
Autograd is registered on the forward op, so gradients flow to q, k, v (and through ``lse`` when it is used).
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch

from ..device_limits import device_guard, shared_memory_per_block
from ..layout import TileLayout
from . import kernels

HEAD_DIM_ACCEPTED = "multiples of 16 up to 256"
# The kernels index a token row as int32 ``row * stride_l + d`` (the batch and head offsets are int64 bases).
MAX_ROW_OFFSET = 2**31 - 1


def check_head_dim(head_dim: int) -> None:
    """Raise a ValueError unless ``head_dim`` is a multiple of 16 in [16, 256]."""
    if head_dim % kernels.HEAD_DIM_MULTIPLE != 0 or not 0 < head_dim <= kernels.MAX_HEAD_DIM:
        raise ValueError(f"head dim D = {head_dim} unsupported by the triton backend; accepted: {HEAD_DIM_ACCEPTED}")


def check_device(t: torch.Tensor) -> None:
    """CUDA tensors run compiled; CPU tensors only under the Triton interpreter (TRITON_INTERPRET=1)."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and kernels.INTERPRET:
        return
    raise ValueError(
        f"triton backend got a tensor on {t.device}; accepted: CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
        "set before triton is imported"
    )


def _row_offsets_fit(t: torch.Tensor) -> bool:
    """Whether every in-kernel row offset ``row * stride_l + d`` of the (B, L, H, D) tensor ``t`` fits in int32."""
    return (t.shape[1] - 1) * t.stride(1) + t.shape[3] <= MAX_ROW_OFFSET


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its head dim is unit-stride and its row offsets fit in int32 (any B/L/H strides are fine),
    else a contiguous copy (whose offsets fit whenever L * H * D does, which the interface checks)."""
    return t if t.stride(-1) == 1 and _row_offsets_fit(t) else t.contiguous()


def _check_output(t: torch.Tensor, name: str) -> None:
    """A pre-allocated output must be writable by the kernels as given."""
    if t.stride(-1) != 1 or not _row_offsets_fit(t):
        raise ValueError(
            f"{name} must have a unit-stride head dim and (L - 1) * stride(1) + D <= {MAX_ROW_OFFSET}, "
            f"got shape {tuple(t.shape)} strides {t.stride()}"
        )


def _strides(t: torch.Tensor) -> Tuple[int, int, int]:
    """(stride_b, stride_l, stride_h) in elements of a (B, L, H, D) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


@functools.lru_cache(maxsize=64)
def _query_range_table(layout: TileLayout, device: torch.device) -> torch.Tensor:
    """int32 [lo_t, lo_y, lo_x, hi_t, hi_y, hi_x] (concatenated per-axis tile ranges), built once per layout.

    For key tile c on an axis, the query tiles whose windows contain c are [lo[c], hi[c]) -- contiguous
    because the window's start and end are monotone in the query tile (block-causal time windows too).
    """
    lows, highs = [], []
    for axis in range(3):
        n = layout.num_tiles[axis]
        tiles = torch.arange(n)
        start, end = layout.window_bounds(axis, tiles)  # window of query tile q: [start[q], end[q])
        contains = (tiles[None, :] >= start[:, None]) & (tiles[None, :] < end[:, None])
        idx = torch.arange(n)[:, None].expand(n, n)  # (query, key)
        lows.append(torch.where(contains, idx, n).min(0).values)
        highs.append(torch.where(contains, idx, -1).max(0).values + 1)
    return torch.cat(lows + highs).to(torch.int32).to(device)


def _window_args(layout: TileLayout) -> Tuple[int, ...]:
    """(w_t, w_y, w_x, half_t, half_y, half_x) with w = min(window, n) and half = (window - 1) // 2."""
    return (*layout.window_tiles, *((w - 1) // 2 for w in layout.window))


def _common(q: torch.Tensor, layout: TileLayout):
    head_dim = q.shape[-1]
    elem = q.element_size()
    constexprs = kernels.layout_constexprs(layout.grid, layout.tile, head_dim, kernels.dot_precision(elem))
    return kernels.kernel_configs(head_dim, elem, shared_memory_per_block(q.device)), constexprs


def kv_group(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query heads per key/value head: H / H_kv of q (B, L, H, D) and k (B, L, H_kv, D) (1 without grouping)."""
    return q.shape[2] // k.shape[2] if k.shape[2] else 1


def _num_tiles(layout: TileLayout) -> int:
    nt, ny, nx = layout.num_tiles
    return nt * ny * nx


def launch_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TileLayout,
    scale: float,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel. q: (B, L, H, D), k, v: (B, L, H_kv, D) with H a multiple of H_kv (views ok);
    out: (B, L, H, D), lse: (B, H, L) fp32.

    ``out`` / ``lse`` may be passed pre-allocated (any (B, L, H, D) strides with unit D stride; lse contiguous),
    which the tests use to poison them.
    """
    q, k, v = (_rows_view(t) for t in (q, k, v))
    b, seq, h, d = q.shape
    if out is None:
        out = torch.empty((b, seq, h, d), dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((b, h, seq), dtype=torch.float32, device=q.device)
    _check_output(out, "out")
    configs, constexprs = _common(q, layout)
    cfg = configs["fwd"]
    block_m, block_n = kernels.block_sizes(cfg, layout.tile_volume)
    grid = (_num_tiles(layout) * math.ceil(layout.tile_volume / block_m), b * h)
    with device_guard(q):
        kernels.local_attention_fwd_kernel[grid](
            q, k, v, out, lse,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            h, *layout.grid, *_window_args(layout), scale * kernels.LOG2E.value,
            BLOCK_M=block_m, BLOCK_N=block_n, KV_GROUP=kv_group(q, k), CAUSAL_TILES=layout.causal_tiles,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **constexprs,
        )
    return out, lse


def launch_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: Optional[torch.Tensor],
    layout: TileLayout,
    scale: float,
    dq: Optional[torch.Tensor] = None,
    dk: Optional[torch.Tensor] = None,
    dv: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the dq (+delta) and dk/dv kernels. dout, q, out, dq: (B, L, H, D); k, v, dk, dv: (B, L, H_kv, D);
    lse / dlse (B, H, L) fp32.

    dq, dk, dv may be passed pre-allocated (dk and dv must share strides), as the poisoning tests do.
    """
    dout, q, k, v, out = (_rows_view(t) for t in (dout, q, k, v, out))
    b, seq, h, d = q.shape
    lse = lse.contiguous()
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    if dq is None:
        dq = torch.empty((b, seq, h, d), dtype=q.dtype, device=q.device)
    group = kv_group(q, k)
    if dk is None:
        dk = torch.empty((b, seq, h // group, d), dtype=q.dtype, device=q.device)
    if dv is None:
        dv = torch.empty_like(dk)
    if dk.stride() != dv.stride():
        raise ValueError(f"dk and dv must share strides, got {dk.stride()} and {dv.stride()}")
    for name, t in (("dq", dq), ("dk", dk)):
        _check_output(t, name)
    # Grouped-query heads: the dk/dv kernel writes every query head's contribution (fp32), summed per group below.
    dk_heads, dv_heads = (dk, dv) if group == 1 else (
        torch.empty((b, seq, h, d), dtype=torch.float32, device=q.device) for _ in range(2)
    )
    delta = torch.empty((b, h, seq), dtype=torch.float32, device=q.device)
    configs, constexprs = _common(q, layout)
    tiles = _num_tiles(layout)
    table = _query_range_table(layout, q.device)
    qk_scale = scale * kernels.LOG2E.value
    with device_guard(q):
        cfg = configs["dq"]
        block_m, block_n = kernels.block_sizes(cfg, layout.tile_volume)
        kernels.local_attention_dq_kernel[(tiles * math.ceil(layout.tile_volume / block_m), b * h)](
            q, k, v, out, dout, lse, dlse if dlse is not None else lse, delta, dq,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(dout), *_strides(dq),
            h, *layout.grid, *_window_args(layout), scale, qk_scale,
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_DLSE=dlse is not None, KV_GROUP=group,
            CAUSAL_TILES=layout.causal_tiles,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **constexprs,
        )
        cfg = configs["dkdv"]
        block_m, block_n = kernels.block_sizes(cfg, layout.tile_volume)
        kernels.local_attention_dkdv_kernel[(tiles * math.ceil(layout.tile_volume / block_n), b * h)](
            q, k, v, dout, lse, delta, dk_heads, dv_heads, table,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk_heads),
            h, *layout.grid, scale, qk_scale,
            BLOCK_M=block_m, BLOCK_N=block_n, KV_GROUP=group,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **constexprs,
        )
    if group > 1:
        for out_grad, per_head in ((dk, dk_heads), (dv, dv_heads)):
            out_grad.copy_(per_head.view(b, seq, h // group, group, d).sum(dim=3))
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# torch.library custom ops
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastvmt::local_attention_fwd", mutates_args=())
def local_attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: List[int], tile: List[int], window: List[int],
    scale: float, causal_frames: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward custom op: (out (B, L, H, D), lse (B, H, L) fp32); k, v: (B, L, H_kv, D), H a multiple of H_kv."""
    return launch_forward(q, k, v, TileLayout.create(grid, tile, window, causal_frames), scale)


@local_attention_fwd_op.register_fake
def _fwd_fake(q, k, v, grid, tile, window, scale, causal_frames):
    b, seq, h, d = q.shape
    return q.new_empty((b, seq, h, d)), q.new_empty((b, h, seq), dtype=torch.float32)


@torch.library.custom_op("fastvmt::local_attention_bwd", mutates_args=())
def local_attention_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: Optional[torch.Tensor],
    grid: List[int],
    tile: List[int],
    window: List[int],
    scale: float,
    causal_frames: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward custom op: (dq (B, L, H, D), dk, dv (B, L, H_kv, D)) in q's dtype."""
    layout = TileLayout.create(grid, tile, window, causal_frames)
    return launch_backward(dout, q, k, v, out, lse, dlse, layout, scale)


@local_attention_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out, lse, dlse, grid, tile, window, scale, causal_frames):
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, grid, tile, window, scale, causal_frames = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.geometry = (grid, tile, window, scale, causal_frames)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = local_attention_bwd_op(dout, q, k, v, out, lse, dlse, *ctx.geometry)
    return dq, dk, dv, None, None, None, None, None


local_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def local_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TileLayout, scale: Optional[float] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton local attention. q: (B, L, H, D), k, v: (B, L, H_kv, D), H a multiple of H_kv (validated by the
    caller for rank/dtype/device/L/heads).

    Returns out (B, L, H, D) in q's dtype and lse (B, H, L) fp32 natural log; differentiable.
    """
    check_head_dim(q.shape[-1])
    check_device(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return local_attention_fwd_op(
        q, k, v, list(layout.grid), list(layout.tile), list(layout.window), scale, layout.causal_frames
    )


__all__ = ["local_attention_triton", "launch_forward", "launch_backward", "check_head_dim"]
