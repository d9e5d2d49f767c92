"""torch.library custom ops around the motion-flow Triton kernels (forward, backward, fake tensors, autograd).

``fastvmt::motion_flow_fwd(q, k, given_windows, span, <geometry>, temperature) -> (flow, windows, lse)`` and
``fastvmt::motion_flow_bwd(grad_flow, q, k, windows, flow, lse, span, <geometry>, temperature) -> (dq, dk)``; the
forward registers the backward through ``register_autograd`` so the op is differentiable and traceable by
torch.compile. Eager calls run the same bodies through a plain ``torch.autograd.Function`` (~40% less host time per
step; torch.compile still traces the custom ops). The pairs are ``make_pairs(F, span)``, read by the kernels from
the :class:`PairTable` cached per device, so a step queues its kernels without any host synchronisation. The
launchers take preallocated outputs so tests can poison them.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch

from ..device_limits import device_guard, has_hopper_shared_memory
from .geometry import FlowGeometry, PairTable, make_pairs, pair_table
from .kernels import (
    COARSE_BLOCK_M,
    COARSE_BLOCK_N,
    FINE_BLOCK_N,
    LOG2E,
    BWD_TILE_GROUP,
    FUSED_KEY_SUMS,
    FWD_TILE_GROUP,
    MIN_BLOCK_Q,
    COMPACT_NUM_STAGES,
    NUM_STAGES,
    NUM_WARPS,
    _coarse_kernel,
    _fine_bwd_kernel,
    _fine_fwd_kernel,
    bwd_block_n,
    fine_launch,
)

Tensor = torch.Tensor


def _next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1); plain Python, as triton.next_power_of_2 costs a constexpr-function call
    on the host for every launch."""
    return 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _num_stages(device: torch.device) -> int:
    """Pipeline stages of the motion-flow kernels: NUM_STAGES where a block gets Hopper's 227 KiB of shared memory
    (the D = 256 backward takes 193 KiB at 3 stages), COMPACT_NUM_STAGES elsewhere."""
    return NUM_STAGES if has_hopper_shared_memory(device) else COMPACT_NUM_STAGES


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in IEEE fp32 (TF32 would cost ~1e-3 relative error in the logits)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_q(geo: FlowGeometry, group: Tuple[int, int] = (1, 1)) -> int:
    """Query slots per program: the tokens of ``group`` tiles, as a power of two >= MIN_BLOCK_Q."""
    return max(MIN_BLOCK_Q, _next_power_of_2(group[0] * geo.tile[0] * group[1] * geo.tile[1]))


def _tile_groups(geo: FlowGeometry, group: Tuple[int, int]) -> Tuple[Tuple[int, int], int, int, int]:
    """(group shrunk to the tile grid, query slots per program, groups per tile-grid row, groups per frame)."""
    (ny, nx) = geo.tile_grid
    group = (min(group[0], ny), min(group[1], nx))
    n_groups_x = -(-nx // group[1])
    return group, _block_q(geo, group), n_groups_x, -(-ny // group[0]) * n_groups_x


def launch_coarse(
    q: Tensor, k: Tensor, table: PairTable, geo: FlowGeometry, temperature: float, windows: Tensor
) -> None:
    """Fill ``windows`` (B, P, n_tiles, 2) int64 with the coarse-pass origins. q, k: (B, F, S, D) contiguous."""
    b, _, seq, dim = q.shape
    if geo.covers_frame:
        windows.zero_()
        return
    n_tiles = geo.num_tiles
    grid = (_cdiv(n_tiles, COARSE_BLOCK_M), table.pairs.shape[0], b)
    _coarse_kernel[grid](
        q, k, table.pair_i, table.pair_j, windows,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        windows.stride(0), windows.stride(1), windows.stride(2),
        n_tiles, geo.tile_grid[1], geo.frame[0], geo.frame[1], geo.tile[0], geo.tile[1], seq,
        geo.window[0] // 2, geo.window[1] // 2, geo.max_origin[0], geo.max_origin[1],
        temperature / math.sqrt(dim) * LOG2E,
        HEAD_DIM=dim, D_PAD=_next_power_of_2(dim), BLOCK_M=COARSE_BLOCK_M, BLOCK_N=COARSE_BLOCK_N,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=NUM_WARPS, num_stages=_num_stages(q.device),
    )


def launch_fine_forward(
    q: Tensor, k: Tensor, table: PairTable, windows: Tensor, geo: FlowGeometry, temperature: float,
    flow: Tensor, lse: Tensor,
) -> None:
    """Fill ``flow`` (B, P, S, 2) fp32 and ``lse`` (B, P, S) fp32 (base 2). q, k: (B, F, S, D) contiguous."""
    b, _, _, dim = q.shape
    group, block_q, n_groups_x, n_groups = _tile_groups(geo, FWD_TILE_GROUP)
    d_pad = _next_power_of_2(dim)
    num_warps, query_major = fine_launch(block_q, d_pad, False, has_hopper_shared_memory(q.device))
    grid = (n_groups, table.pairs.shape[0], b)
    _fine_fwd_kernel[grid](
        q, k, table.pair_i, table.pair_j, windows, flow, lse,
        q.stride(0), q.stride(1), q.stride(2),
        windows.stride(0), windows.stride(1), windows.stride(2),
        flow.stride(0), flow.stride(1), flow.stride(2),
        lse.stride(0), lse.stride(1),
        n_groups_x, geo.tile_grid[1], geo.frame[0], geo.frame[1], geo.tile[0], geo.tile[1], *geo.window_sides,
        temperature / math.sqrt(dim) * LOG2E,
        HEAD_DIM=dim, D_PAD=d_pad, GROUP_Y=group[0], GROUP_X=group[1], BLOCK_Q=block_q,
        BLOCK_N=FINE_BLOCK_N, DOT_PRECISION=_dot_precision(q.dtype), FUSED_SUMS=FUSED_KEY_SUMS,
        QUERY_MAJOR=query_major, num_warps=num_warps, num_stages=_num_stages(q.device),
    )


def launch_fine_backward(
    grad_flow: Tensor, q: Tensor, k: Tensor, table: PairTable, windows: Tensor, flow: Tensor, lse: Tensor,
    geo: FlowGeometry, temperature: float, dq: Tensor, dk_acc: Tensor,
) -> None:
    """Write ``dq`` (B, F, S, D, q's dtype) and add into ``dk_acc`` (B, F, S, D fp32, zeroed by the caller)."""
    b, f, _, dim = q.shape
    grad_flow = grad_flow.float().contiguous()
    group, block_q, n_groups_x, n_groups = _tile_groups(geo, BWD_TILE_GROUP)
    d_pad = _next_power_of_2(dim)
    hopper = has_hopper_shared_memory(q.device)
    num_warps, query_major = fine_launch(block_q, d_pad, True, hopper)
    grid = (n_groups, f, b)
    _fine_bwd_kernel[grid](
        q, k, table.pair_j, table.offsets, windows, flow, lse, grad_flow, dq, dk_acc,
        q.stride(0), q.stride(1), q.stride(2),
        windows.stride(0), windows.stride(1), windows.stride(2),
        flow.stride(0), flow.stride(1), flow.stride(2),
        lse.stride(0), lse.stride(1),
        grad_flow.stride(0), grad_flow.stride(1), grad_flow.stride(2),
        n_groups_x, geo.tile_grid[1], geo.frame[0], geo.frame[1], geo.tile[0], geo.tile[1], *geo.window_sides,
        temperature / math.sqrt(dim) * LOG2E, temperature / math.sqrt(dim),
        HEAD_DIM=dim, D_PAD=d_pad, GROUP_Y=group[0], GROUP_X=group[1], BLOCK_Q=block_q,
        BLOCK_N=bwd_block_n(d_pad, hopper), DOT_PRECISION=_dot_precision(q.dtype),
        QUERY_MAJOR=query_major, num_warps=num_warps, num_stages=_num_stages(q.device),
    )


def _geometry(frame_h, frame_w, tile_h, tile_w, window_h, window_w) -> FlowGeometry:
    return FlowGeometry((frame_h, frame_w), (tile_h, tile_w), (window_h, window_w))


def _forward(
    q: Tensor, k: Tensor, given_windows: Optional[Tensor], span: int,
    frame_h: int, frame_w: int, tile_h: int, tile_w: int, window_h: int, window_w: int, temperature: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Body of :func:`motion_flow_fwd` (shared with the eager autograd path)."""
    geo = _geometry(frame_h, frame_w, tile_h, tile_w, window_h, window_w)
    b, f, seq, _ = q.shape
    table = pair_table(f, span, q.device)
    p = table.pairs.shape[0]
    flow = torch.empty(b, p, seq, 2, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, p, seq, dtype=torch.float32, device=q.device)
    with device_guard(q):
        if given_windows is None:
            windows = torch.empty(b, p, geo.num_tiles, 2, dtype=torch.int64, device=q.device)
            launch_coarse(q, k, table, geo, temperature, windows)
        else:
            windows = given_windows.contiguous().clone()
        launch_fine_forward(q, k, table, windows, geo, temperature, flow, lse)
    return flow, windows, lse


@torch.library.custom_op("fastvmt::motion_flow_fwd", mutates_args=())
def motion_flow_fwd(
    q: Tensor, k: Tensor, given_windows: Optional[Tensor], span: int,
    frame_h: int, frame_w: int, tile_h: int, tile_w: int, window_h: int, window_w: int, temperature: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(flow (B, P, S, 2) fp32, windows (B, P, n_tiles, 2) int64, lse (B, P, S) fp32) for contiguous q, k.

    Pairs: ``make_pairs(F, span)``. ``given_windows`` (B, P, n_tiles, 2) int64 replaces the coarse pass (returned
    as a copy); None runs it. Given origins must lie in ``[0, frame - window side]`` per axis
    (:func:`fastvmt_kernels.motion_flow` validates them; checking here would synchronise the host); the kernels
    clamp any others into that range, so no window ever reads or writes outside its frame.
    """
    return _forward(q, k, given_windows, span, frame_h, frame_w, tile_h, tile_w, window_h, window_w, temperature)


@motion_flow_fwd.register_fake
def _motion_flow_fwd_fake(q, k, given_windows, span, frame_h, frame_w, tile_h, tile_w, window_h, window_w, temperature):
    geo = _geometry(frame_h, frame_w, tile_h, tile_w, window_h, window_w)
    b, f, seq, _ = q.shape
    p = sum(min(f, i + span) - i for i in range(f))
    return (
        q.new_empty(b, p, seq, 2, dtype=torch.float32),
        q.new_empty(b, p, geo.num_tiles, 2, dtype=torch.int64),
        q.new_empty(b, p, seq, dtype=torch.float32),
    )


def alert_nondeterministic_backward() -> None:
    """torch's convention for an op without a deterministic implementation, applied to the Triton backward (its dk
    accumulates with fp32 atomics, whose order varies on a GPU): under ``torch.use_deterministic_algorithms(True)``
    raise a RuntimeError, or warn with ``warn_only=True``; otherwise nothing."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        "fastvmt motion_flow's triton backward does not have a deterministic implementation (dk accumulates with "
        "fp32 atomics), but torch.use_deterministic_algorithms(True) is set; use backend='torch' or 'auto' (which "
        "then takes the torch reference for differentiable inputs), or disable the flag"
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(message)


def _backward_kernels(
    grad_flow: Tensor, q: Tensor, k: Tensor, windows: Tensor, flow: Tensor, lse: Tensor, span: int,
    frame_h: int, frame_w: int, tile_h: int, tile_w: int, window_h: int, window_w: int, temperature: float,
) -> Tuple[Tensor, Tensor]:
    """Body of :func:`motion_flow_bwd` (shared with the eager autograd path)."""
    alert_nondeterministic_backward()
    geo = _geometry(frame_h, frame_w, tile_h, tile_w, window_h, window_w)
    dq = torch.empty_like(q)
    dk_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    table = pair_table(q.shape[1], span, q.device)
    with device_guard(q):
        launch_fine_backward(grad_flow, q, k, table, windows, flow, lse, geo, temperature, dq, dk_acc)
    return dq, dk_acc.to(k.dtype)


@torch.library.custom_op("fastvmt::motion_flow_bwd", mutates_args=())
def motion_flow_bwd(
    grad_flow: Tensor, q: Tensor, k: Tensor, windows: Tensor, flow: Tensor, lse: Tensor, span: int,
    frame_h: int, frame_w: int, tile_h: int, tile_w: int, window_h: int, window_w: int, temperature: float,
) -> Tuple[Tensor, Tensor]:
    """(dq, dk) in q's dtype, (B, F, S, D), for the fine pass (window origins are constants)."""
    return _backward_kernels(
        grad_flow, q, k, windows, flow, lse, span, frame_h, frame_w, tile_h, tile_w, window_h, window_w, temperature
    )


@motion_flow_bwd.register_fake
def _motion_flow_bwd_fake(grad_flow, q, k, windows, flow, lse, *args):
    return torch.empty_like(q), torch.empty_like(k)


def _setup_context(ctx, inputs, output):
    q, k, _given_windows, *span_and_geometry = inputs
    flow, windows, lse = output
    ctx.save_for_backward(q, k, windows, flow, lse)
    ctx.span_and_geometry = span_and_geometry


def _backward(ctx, grad_flow, grad_windows, grad_lse):
    q, k, windows, flow, lse = ctx.saved_tensors
    dq, dk = motion_flow_bwd(grad_flow, q, k, windows, flow, lse, *ctx.span_and_geometry)
    return (dq, dk, None) + (None,) * len(ctx.span_and_geometry)


motion_flow_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerMotionFlow(torch.autograd.Function):
    """The custom ops' forward and backward as a plain autograd function, for eager calls: the same kernels and
    launches without torch.library's dispatch layers (with plain-Python launch grids: ~40% less host time per eager
    step, benchmarks/results/motion_flow_host_cpu*.md). torch.compile traces the custom ops instead
    (:func:`motion_flow_triton`).
    """

    @staticmethod
    def forward(ctx, q, k, given_windows, span, *geometry_and_temperature):
        flow, windows, lse = _forward(q, k, given_windows, span, *geometry_and_temperature)
        ctx.save_for_backward(q, k, windows, flow, lse)
        ctx.mark_non_differentiable(windows, lse)
        ctx.arguments = (span, *geometry_and_temperature)
        return flow, windows, lse

    @staticmethod
    def backward(ctx, grad_flow, grad_windows, grad_lse):
        q, k, windows, flow, lse = ctx.saved_tensors
        if grad_flow is None:
            grad_flow = torch.zeros_like(flow)
        dq, dk = _backward_kernels(grad_flow, q, k, windows, flow, lse, *ctx.arguments)
        return (dq, dk, None) + (None,) * len(ctx.arguments)


def motion_flow_triton(
    q: Tensor, k: Tensor, geo: FlowGeometry, span: int, temperature: float, windows: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """(flow, pairs, windows) by the Triton kernels; q, k: (B, F, S, D) with D a multiple of 16 up to 256 (a D
    that is not a power of two is padded to one inside the kernels, as masked channels).

    windows: optional (B, P, n_tiles, 2) int64 origins to use instead of the coarse pass.
    """
    args = (q.contiguous(), k.contiguous(), windows, int(span), *geo.frame, *geo.tile, *geo.window, float(temperature))
    if torch.compiler.is_compiling():
        flow, windows, _ = motion_flow_fwd(*args)
    else:
        flow, windows, _ = _EagerMotionFlow.apply(*args)
    return flow, make_pairs(q.shape[1], span, q.device), windows
