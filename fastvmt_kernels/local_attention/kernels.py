"""Triton kernels for block-sparse spatiotemporal local attention (forward, dq, dk/dv).

Token grouping: tile-order gathering inside the kernels, no permutation pass.
    A program owns one block of rows of one tile ("sub-block": a tile of ``VOL = tt*th*tw`` tokens is cut
    into ``ceil(VOL / BLOCK)`` blocks of ``BLOCK`` rows). Row ``r`` of tile ``(ct, cy, cx)`` is the token
    ``(t, y, x) = (ct*tt + r // (th*tw), cy*th + (r // tw) % th, cx*tw + r % tw)``, raster index
    ``l = (t*Hg + y)*Wg + x``; it is valid iff it lies inside the grid and ``r < VOL``. Loads go through
    ``base + b*stride_b + l*stride_l + h*stride_h + d`` with the caller's strides, so (B, L, H, D) views
    (e.g. q/k/v unbound from a packed (B, L, 3, H, D) tensor) are read in place; each token row is a
    contiguous D-vector, so the gather costs no extra memory traffic and there is no permutation cost to
    count in benchmarks. The cost is index arithmetic (divisions by constexpr tile sizes) per block.

Window membership is decided at tile granularity, so a key tile is either fully in a query's window or
not at all: no window mask exists. Only the *ragged* tiles at the grid's far edge (and rows past VOL when
VOL is not a multiple of the block size) need a per-row mask. Each kernel therefore walks its window as
four boxes of tiles: the box of full tiles (unmasked fast path, or only the constant padding mask) and up
to three boxes holding the ragged tiles of the t, y and x axes (masked path), compiled only when that
axis is ragged (constexpr flags).

Softmax uses exp2 with log2(e) folded into the scale; accumulation is fp32; lse is stored in natural log.
The running max starts at a large finite negative value so a fully masked block yields p = 0, not NaN.
Under TRITON_INTERPRET=1 every load is upcast to fp32 (the interpreter's bf16 arithmetic is wrong); on a
GPU bf16/fp16 feed ``tl.dot`` directly (HGMMA on Hopper) and p / dS are cast to the input dtype.

Backward: the dq kernel (per query block, looping over the window's key tiles) first computes
``delta = rowsum(dO * O) - dlse`` and stores it; the dk/dv kernel (per key block) loops over the query tiles
whose windows contain its tile -- per axis a contiguous range, read from a small host-built int32 table --
and recomputes P from q, k and lse. No atomics.

Grouped-query attention (k, v with H / KV_GROUP heads): every program of query head h reads key / value head
``h // KV_GROUP`` (one integer division per program; offline sm_90a compiles at D = 64 and 128 give the same
registers, spills and hot-loop instructions as multi-head). The dk/dv kernel then writes each query head's contribution, which the launcher sums per group in
fp32 (a dk/dv program looping over its group's query heads instead held 255 registers and spilled on sm_80-sm_100).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List

import triton
import triton.language as tl

from ..device_limits import HOPPER_SHARED_MEMORY_PER_BLOCK
from ..index_math import small_divmod

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Finite start value of the running max: a block with no valid key then gives p = exp2(-inf) = 0, never NaN.
MAX_INIT = tl.constexpr(-1.0e30)
MIN_BLOCK = 16
MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 16


@dataclass(frozen=True)
class BlockConfig:
    """Launch configuration of one kernel: rows per query block, rows per key block, warps, stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# 64 < D <= 128 forward, bf16 / fp16. Measured on an H100 at Wan2.1-1.3B shapes, 25.6% density (launch sweep rows ours@fwd*
# of benchmarks/results/local_attention.md, run 4): 128 x 128 keys, 8 warps, 3 stages 3.70 ms vs 4.78 ms for the
# former 128 x 64 in 2 stages (4.14 ms at 128 x 128 in 2 stages, 4.17 ms at 128 x 64 in 3).
WIDE_FWD_D128 = BlockConfig(128, 128, 8, 3)
COMPACT_FWD_D128 = BlockConfig(128, 64, 8, 2)
# D > 128 dk/dv: 32 queries x 64 keys per step take 112 KiB of shared memory on sm_89 (offline compile), more than
# the 99 KiB a block gets on Ada / consumer GPUs; 32 x 32 takes 80 KiB there.
DKDV_D256 = BlockConfig(32, 64, 8, 1)
SMALL_DKDV_D256 = BlockConfig(32, 32, 8, 1)
DKDV_D256_SHARED_BYTES = 112 * 1024
# 64 < D <= 128 dk/dv. Hopper (wgmma reads its operands from shared memory): 4 warps, the fastest in run 5's sweep
# (17.6 ms fwd+bwd vs 18.3 with 1 stage; no spill stores in its loop). GPUs without Hopper-class shared memory
# (mma.sync keeps the operand fragments in registers): at 4 warps the sm_89 loop stores 3 spills per step (offline
# compile); 8 warps spill nothing there (166 registers) nor on sm_80.
DKDV_D128 = BlockConfig(64, 64, 4, 2)
COMPACT_DKDV_D128 = BlockConfig(64, 64, 8, 2)


def kernel_configs(
    head_dim: int, elem_bytes: int, shared_memory: int = HOPPER_SHARED_MEMORY_PER_BLOCK
) -> Dict[str, BlockConfig]:
    """Fixed launch configurations per head dim and element size, for "fwd", "dq" and "dkdv".

    Used by the launcher and by :func:`inspect_specs`, so the inspection compiles exactly what runs.
    Block sizes are upper bounds: a tile smaller than a block shrinks it (see :func:`block_sizes`).
    ``shared_memory``: bytes of shared memory a block may use on the device
    (:func:`fastvmt_kernels.device_limits.shared_memory_per_block`). The 64 < D <= 128 forward's 128 x 128 blocks in 3
    stages take 225 KiB (Hopper's 227 KiB), so other devices get COMPACT_FWD_D128; the D > 128 dk/dv kernel takes
    SMALL_DKDV_D256 below DKDV_D256_SHARED_BYTES (Ada's 99 KiB), and the 64 < D <= 128 dk/dv kernel runs 8 warps off
    Hopper (COMPACT_DKDV_D128). ``tests/test_device_limits.py`` compiles what each device gets for sm_90a, sm_89 and
    sm_80 and checks that it fits and stores no spills in its hot loops.
    """
    if elem_bytes == 4:  # fp32 (tests): small blocks keep shared memory in bounds at any D
        small = BlockConfig(32, 32, 4, 1)
        return {"fwd": small, "dq": small, "dkdv": small}
    if head_dim <= 64:
        return {
            "fwd": BlockConfig(128, 64, 4, 3),
            "dq": BlockConfig(64, 64, 4, 2),
            "dkdv": BlockConfig(64, 64, 4, 2),
        }
    if head_dim <= 128:
        return {
            "fwd": WIDE_FWD_D128 if shared_memory >= HOPPER_SHARED_MEMORY_PER_BLOCK else COMPACT_FWD_D128,
            "dq": BlockConfig(64, 64, 4, 2),
            "dkdv": DKDV_D128 if shared_memory >= HOPPER_SHARED_MEMORY_PER_BLOCK else COMPACT_DKDV_D128,
        }
    return {  # D up to 256: 64-row accumulators keep wgmma (HGMMA) usable; offline: no spill stores in the hot
        # loops (the fwd spills nothing; dq and dk/dv reload 11 / 15 spilled values per step on sm_90a)
        "fwd": BlockConfig(64, 32, 4, 2),
        "dq": BlockConfig(64, 32, 8, 1),
        "dkdv": DKDV_D256 if shared_memory >= DKDV_D256_SHARED_BYTES else SMALL_DKDV_D256,
    }


def pow2_at_least(n: int) -> int:
    """Smallest power of two >= max(n, MIN_BLOCK)."""
    return max(MIN_BLOCK, triton.next_power_of_2(n))


def block_sizes(config: BlockConfig, tile_volume: int):
    """(block_m, block_n) actually used: the config's, shrunk to the padded tile volume for small tiles."""
    cap = pow2_at_least(tile_volume)
    return min(config.block_m, cap), min(config.block_n, cap)


# ----------------------------------------------------------------------------------------------------------
# shared device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _tile_rows(ct, cy, cx, sub, T, HG, WG, TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BLOCK: tl.constexpr,
               IN_GRID: tl.constexpr = False):
    """Raster indices (int32) and validity of rows [sub*BLOCK, (sub+1)*BLOCK) of tile (ct, cy, cx).

    Row offsets ``row * stride_l + d`` stay int32 (the op keeps them below 2**31; batch and head bases are int64):
    64-bit per-element address arithmetic was ~10% of the dq / dk-dv loop instructions.

    IN_GRID: the tile is known to lie fully inside the grid (every tile of a window's full-tile box), so a row is
    valid iff it is inside the tile volume; the grid bounds are not tested. Where only the validity is used (the
    score mask, in the MMA layout), this leaves one compare per row instead of the coordinate arithmetic.
    """
    r = sub * BLOCK + tl.arange(0, BLOCK)
    t = ct * TT + r // (TH * TW)
    y = cy * TH + (r // TW) % TH
    x = cx * TW + r % TW
    if IN_GRID:
        valid = r < TT * TH * TW
    else:
        valid = (r < TT * TH * TW) & (t < T) & (y < HG) & (x < WG)
    rows = (t * HG + y) * WG + x
    return rows, valid


@triton.jit
def _load_rows(base, rows, stride_l, offs_d, valid, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
               D_PAD: tl.constexpr, INTERPRET: tl.constexpr):
    """Load a (BLOCK, BLOCK_D) block of token rows; masked rows / padded head dims read 0."""
    ptrs = base + rows[:, None] * stride_l + offs_d[None, :]
    if MASKED or D_PAD:
        x = tl.load(ptrs, mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        x = tl.load(ptrs)
    if INTERPRET:
        x = x.to(tl.float32)
    return x


@triton.jit
def _box_walk(t0, t1, y0, y1, x0, x1, N_SUB: tl.constexpr):
    """Steps of a walk over the tile box [t0,t1) x [y0,y1) x [x0,x1), N_SUB sub-blocks per tile, and the box's
    (ny, nx, 1 / ny, 1 / nx) for :func:`_box_tile`."""
    ny = y1 - y0
    nx = x1 - x0
    inv_ny = 1.0 / tl.maximum(ny, 1).to(tl.float32)
    inv_nx = 1.0 / tl.maximum(nx, 1).to(tl.float32)
    return (t1 - t0) * ny * nx * N_SUB, ny, nx, inv_ny, inv_nx


@triton.jit
def _box_tile(i, t0, y0, x0, ny, nx, inv_ny, inv_nx, N_SUB: tl.constexpr):
    """Tile (ct, cy, cx) and sub-block of the i-th step when walking a box of tiles in raster order
    (inv_ny, inv_nx: 1 / ny, 1 / nx in fp32)."""
    sub = i % N_SUB
    j = i // N_SUB
    j, rx = small_divmod(j, nx, inv_nx)
    jt, ry = small_divmod(j, ny, inv_ny)
    return t0 + jt, y0 + ry, x0 + rx, sub


@triton.jit
def _window(c, n, w, half):
    """Key-tile range [s, s + w) of query tile c on an axis with n tiles (w = min(window, n))."""
    s = tl.minimum(tl.maximum(c - half, 0), n - w)
    return s, s + w


@triton.jit
def _split_full(lo, hi, n_full):
    """End of the full-tile part of [lo, hi): tiles >= n_full are ragged."""
    return tl.maximum(lo, tl.minimum(hi, n_full))


@triton.jit
def _program_tile(pid, T, HG, WG, TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, N_SUB: tl.constexpr):
    """Tile (ct, cy, cx) and sub-block of program ``pid`` (tiles in raster order), plus the tile counts."""
    NT = (T + TT - 1) // TT
    NY = (HG + TH - 1) // TH
    NX = (WG + TW - 1) // TW
    tile = pid // N_SUB
    cx = tile % NX
    cy = (tile // NX) % NY
    ct = tile // (NX * NY)
    return ct, cy, cx, pid % N_SUB, NT, NY, NX


@triton.jit
def _query_window(ct, cy, cx, NT, NY, NX, WT, WY, WX, HALF_T, HALF_Y, HALF_X, T, HG, WG,
                  TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, CAUSAL_TILES: tl.constexpr):
    """Key-tile window of query tile (ct, cy, cx) per axis as (start, end of the full tiles, end); with
    CAUSAL_TILES > 0 the time window ends with the query's causal block of CAUSAL_TILES tiles (layout.py)."""
    if CAUSAL_TILES > 0:
        et = tl.minimum(NT, (ct // CAUSAL_TILES + 1) * CAUSAL_TILES)
        st = tl.maximum(et - WT, 0)
    else:
        st, et = _window(ct, NT, WT, HALF_T)
    sy, ey = _window(cy, NY, WY, HALF_Y)
    sx, ex = _window(cx, NX, WX, HALF_X)
    ft = _split_full(st, et, T // TT)
    fy = _split_full(sy, ey, HG // TH)
    fx = _split_full(sx, ex, WG // TW)
    return st, ft, et, sy, fy, ey, sx, fx, ex


# ----------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_box(acc, l_i, m_i, q, k_base, v_base, sk_l, sv_l, offs_d, t0, t1, y0, y1, x0, x1, T, HG, WG, qk_scale,
             TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
             MASKED: tl.constexpr, IN_GRID: tl.constexpr, D_PAD: tl.constexpr, INTERPRET: tl.constexpr,
             PRECISION: tl.constexpr):
    """Online-softmax accumulation over every key block of the tile box [t0,t1) x [y0,y1) x [x0,x1)."""
    N_SUB: tl.constexpr = (TT * TH * TW + BLOCK_N - 1) // BLOCK_N
    steps, ny, nx, inv_ny, inv_nx = _box_walk(t0, t1, y0, y1, x0, x1, N_SUB)
    for i in range(0, steps):
        ct, cy, cx, sub = _box_tile(i, t0, y0, x0, ny, nx, inv_ny, inv_nx, N_SUB)
        rows, valid = _tile_rows(ct, cy, cx, sub, T, HG, WG, TT, TH, TW, BLOCK_N, IN_GRID)
        k = _load_rows(k_base, rows, sk_l, offs_d, valid, HEAD_DIM, MASKED, D_PAD, INTERPRET)
        v = _load_rows(v_base, rows, sv_l, offs_d, valid, HEAD_DIM, MASKED, D_PAD, INTERPRET)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:
            s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def local_attention_fwd_kernel(
    Q, K, V, O, LSE,
    sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h, so_b, so_l, so_h,
    H, T, HG, WG, WT, WY, WX, HALF_T, HALF_Y, HALF_X, qk_scale,
    TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    RAGGED_T: tl.constexpr, RAGGED_Y: tl.constexpr, RAGGED_X: tl.constexpr,
    INTERPRET: tl.constexpr, PRECISION: tl.constexpr, KV_GROUP: tl.constexpr, CAUSAL_TILES: tl.constexpr,
):
    """Forward. Grid: (n_tiles * ceil(VOL / BLOCK_M), B * H). Writes O (B, L, H, D) and LSE (B, H, L) fp32.

    K, V: (B, L, H / KV_GROUP, D); query head h reads key/value head h // KV_GROUP (grouped-query attention).
    """
    VOL: tl.constexpr = TT * TH * TW
    N_SUB_M: tl.constexpr = (VOL + BLOCK_M - 1) // BLOCK_M
    PAD_N: tl.constexpr = VOL % BLOCK_N != 0
    D_PAD: tl.constexpr = BLOCK_D != HEAD_DIM
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)  # head bases in int64: a head-major view's head stride can pass 2**31 / H
    ct, cy, cx, sub, NT, NY, NX = _program_tile(pid, T, HG, WG, TT, TH, TW, N_SUB_M)
    rows, valid = _tile_rows(ct, cy, cx, sub, T, HG, WG, TT, TH, TW, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sq_b + h * sq_h, rows, sq_l, offs_d, valid, HEAD_DIM, True, D_PAD, INTERPRET)
    kv_h = h // KV_GROUP
    k_base = K + b * sk_b + kv_h * sk_h
    v_base = V + b * sv_b + kv_h * sv_h

    st, ft, et, sy, fy, ey, sx, fx, ex = _query_window(ct, cy, cx, NT, NY, NX, WT, WY, WX, HALF_T, HALF_Y, HALF_X,
                                                       T, HG, WG, TT, TH, TW, CAUSAL_TILES)

    m_i = tl.full([BLOCK_M], MAX_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _fwd_box(acc, l_i, m_i, q, k_base, v_base, sk_l, sv_l, offs_d, st, ft, sy, fy, sx, fx,
                             T, HG, WG, qk_scale, TT, TH, TW, HEAD_DIM, BLOCK_N, PAD_N, True, D_PAD, INTERPRET,
                             PRECISION)
    if RAGGED_T:
        acc, l_i, m_i = _fwd_box(acc, l_i, m_i, q, k_base, v_base, sk_l, sv_l, offs_d, ft, et, sy, ey, sx, ex,
                                 T, HG, WG, qk_scale, TT, TH, TW, HEAD_DIM, BLOCK_N, True, False, D_PAD, INTERPRET,
                                 PRECISION)
    if RAGGED_Y:
        acc, l_i, m_i = _fwd_box(acc, l_i, m_i, q, k_base, v_base, sk_l, sv_l, offs_d, st, ft, fy, ey, sx, ex,
                                 T, HG, WG, qk_scale, TT, TH, TW, HEAD_DIM, BLOCK_N, True, False, D_PAD, INTERPRET,
                                 PRECISION)
    if RAGGED_X:
        acc, l_i, m_i = _fwd_box(acc, l_i, m_i, q, k_base, v_base, sk_l, sv_l, offs_d, st, ft, sy, fy, fx, ex,
                                 T, HG, WG, qk_scale, TT, TH, TW, HEAD_DIM, BLOCK_N, True, False, D_PAD, INTERPRET,
                                 PRECISION)

    out = acc / l_i[:, None]
    o_ptrs = O + b * so_b + h * so_h + rows[:, None] * so_l + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM))
    seq = T * HG * WG
    lse = (m_i + tl.math.log2(l_i)) * LN2
    tl.store(LSE + bh.to(tl.int64) * seq + rows, lse, mask=valid)


# ----------------------------------------------------------------------------------------------------------
# backward: dq (+ delta)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _dq_box(dq, q, do, lse2, delta, k_base, v_base, sk_l, sv_l, offs_d, t0, t1, y0, y1, x0, x1, T, HG, WG,
            qk_scale, TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, HEAD_DIM: tl.constexpr,
            BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IN_GRID: tl.constexpr, D_PAD: tl.constexpr,
            INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dS @ K (unscaled) over every key block of the tile box."""
    N_SUB: tl.constexpr = (TT * TH * TW + BLOCK_N - 1) // BLOCK_N
    steps, ny, nx, inv_ny, inv_nx = _box_walk(t0, t1, y0, y1, x0, x1, N_SUB)
    for i in range(0, steps):
        ct, cy, cx, sub = _box_tile(i, t0, y0, x0, ny, nx, inv_ny, inv_nx, N_SUB)
        rows, valid = _tile_rows(ct, cy, cx, sub, T, HG, WG, TT, TH, TW, BLOCK_N, IN_GRID)
        k = _load_rows(k_base, rows, sk_l, offs_d, valid, HEAD_DIM, MASKED, D_PAD, INTERPRET)
        v = _load_rows(v_base, rows, sv_l, offs_d, valid, HEAD_DIM, MASKED, D_PAD, INTERPRET)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:
            s = tl.where(valid[None, :], s, float("-inf"))
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def local_attention_dq_kernel(
    Q, K, V, O, DO, LSE, DLSE, DELTA, DQ,
    sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h, so_b, so_l, so_h, sdo_b, sdo_l, sdo_h,
    sdq_b, sdq_l, sdq_h,
    H, T, HG, WG, WT, WY, WX, HALF_T, HALF_Y, HALF_X, scale, qk_scale,
    TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    RAGGED_T: tl.constexpr, RAGGED_Y: tl.constexpr, RAGGED_X: tl.constexpr, HAS_DLSE: tl.constexpr,
    INTERPRET: tl.constexpr, PRECISION: tl.constexpr, KV_GROUP: tl.constexpr, CAUSAL_TILES: tl.constexpr,
):
    """dq and delta. Grid: (n_tiles * ceil(VOL / BLOCK_M), B * H). delta = rowsum(dO*O) - dlse, (B, H, L) fp32.
    K, V: (B, L, H / KV_GROUP, D), as in the forward."""
    VOL: tl.constexpr = TT * TH * TW
    N_SUB_M: tl.constexpr = (VOL + BLOCK_M - 1) // BLOCK_M
    PAD_N: tl.constexpr = VOL % BLOCK_N != 0
    D_PAD: tl.constexpr = BLOCK_D != HEAD_DIM
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)  # head bases in int64: a head-major view's head stride can pass 2**31 / H
    ct, cy, cx, sub, NT, NY, NX = _program_tile(pid, T, HG, WG, TT, TH, TW, N_SUB_M)
    rows, valid = _tile_rows(ct, cy, cx, sub, T, HG, WG, TT, TH, TW, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sq_b + h * sq_h, rows, sq_l, offs_d, valid, HEAD_DIM, True, D_PAD, INTERPRET)
    do = _load_rows(DO + b * sdo_b + h * sdo_h, rows, sdo_l, offs_d, valid, HEAD_DIM, True, D_PAD, INTERPRET)
    o = _load_rows(O + b * so_b + h * so_h, rows, so_l, offs_d, valid, HEAD_DIM, True, D_PAD, INTERPRET)
    seq = T * HG * WG
    stat_off = bh.to(tl.int64) * seq + rows
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + stat_off, mask=valid, other=0.0)
    tl.store(DELTA + stat_off, delta, mask=valid)
    lse2 = tl.load(LSE + stat_off, mask=valid, other=0.0) * LOG2E
    kv_h = h // KV_GROUP
    k_base = K + b * sk_b + kv_h * sk_h
    v_base = V + b * sv_b + kv_h * sv_h

    st, ft, et, sy, fy, ey, sx, fx, ex = _query_window(ct, cy, cx, NT, NY, NX, WT, WY, WX, HALF_T, HALF_Y, HALF_X,
                                                       T, HG, WG, TT, TH, TW, CAUSAL_TILES)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_box(dq, q, do, lse2, delta, k_base, v_base, sk_l, sv_l, offs_d, st, ft, sy, fy, sx, fx, T, HG, WG,
                 qk_scale, TT, TH, TW, HEAD_DIM, BLOCK_N, PAD_N, True, D_PAD, INTERPRET, PRECISION)
    if RAGGED_T:
        dq = _dq_box(dq, q, do, lse2, delta, k_base, v_base, sk_l, sv_l, offs_d, ft, et, sy, ey, sx, ex, T, HG,
                     WG, qk_scale, TT, TH, TW, HEAD_DIM, BLOCK_N, True, False, D_PAD, INTERPRET, PRECISION)
    if RAGGED_Y:
        dq = _dq_box(dq, q, do, lse2, delta, k_base, v_base, sk_l, sv_l, offs_d, st, ft, fy, ey, sx, ex, T, HG,
                     WG, qk_scale, TT, TH, TW, HEAD_DIM, BLOCK_N, True, False, D_PAD, INTERPRET, PRECISION)
    if RAGGED_X:
        dq = _dq_box(dq, q, do, lse2, delta, k_base, v_base, sk_l, sv_l, offs_d, st, ft, sy, fy, fx, ex, T, HG,
                     WG, qk_scale, TT, TH, TW, HEAD_DIM, BLOCK_N, True, False, D_PAD, INTERPRET, PRECISION)
    dq_ptrs = DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_l + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------------------------------
# backward: dk, dv
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _dkdv_box(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_l, sdo_l, offs_d, t0, t1, y0, y1, x0, x1,
              T, HG, WG, qk_scale, TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_M: tl.constexpr, MASKED: tl.constexpr, IN_GRID: tl.constexpr, D_PAD: tl.constexpr,
              INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dV += P^T dO and dK += dS^T Q (unscaled) over every query block of the tile box."""
    N_SUB: tl.constexpr = (TT * TH * TW + BLOCK_M - 1) // BLOCK_M
    steps, ny, nx, inv_ny, inv_nx = _box_walk(t0, t1, y0, y1, x0, x1, N_SUB)
    for i in range(0, steps):
        ct, cy, cx, sub = _box_tile(i, t0, y0, x0, ny, nx, inv_ny, inv_nx, N_SUB)
        rows, valid = _tile_rows(ct, cy, cx, sub, T, HG, WG, TT, TH, TW, BLOCK_M, IN_GRID)
        q = _load_rows(q_base, rows, sq_l, offs_d, valid, HEAD_DIM, MASKED, D_PAD, INTERPRET)
        do = _load_rows(do_base, rows, sdo_l, offs_d, valid, HEAD_DIM, MASKED, D_PAD, INTERPRET)
        if MASKED:  # invalid query rows: lse = +inf makes their p exactly 0
            lse2 = tl.load(lse_base + rows, mask=valid, other=float("inf")) * LOG2E
            delta = tl.load(delta_base + rows, mask=valid, other=0.0)
        else:
            lse2 = tl.load(lse_base + rows) * LOG2E
            delta = tl.load(delta_base + rows)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        pt = tl.math.exp2(st * qk_scale - lse2[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def local_attention_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, QRANGE,
    sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h, sdo_b, sdo_l, sdo_h, sdk_b, sdk_l, sdk_h,
    H, T, HG, WG, scale, qk_scale,
    TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    RAGGED_T: tl.constexpr, RAGGED_Y: tl.constexpr, RAGGED_X: tl.constexpr,
    INTERPRET: tl.constexpr, PRECISION: tl.constexpr, KV_GROUP: tl.constexpr,
):
    """dk, dv (written with DK's strides, also used for DV). Grid: (n_tiles * ceil(VOL / BLOCK_N), B * H).

    Per query head h: K, V are (B, L, H / KV_GROUP, D), read at head h // KV_GROUP; DK, DV are (B, L, H, D), query
    head h's contribution (the launcher sums each group's heads when KV_GROUP > 1).
    QRANGE: int32 [lo_t(NT), lo_y(NY), lo_x(NX), hi_t(NT), hi_y(NY), hi_x(NX)]: per axis and key tile, the
    query tiles [lo, hi) whose windows contain it.
    """
    VOL: tl.constexpr = TT * TH * TW
    N_SUB_N: tl.constexpr = (VOL + BLOCK_N - 1) // BLOCK_N
    PAD_M: tl.constexpr = VOL % BLOCK_M != 0
    D_PAD: tl.constexpr = BLOCK_D != HEAD_DIM
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)  # head bases in int64: a head-major view's head stride can pass 2**31 / H
    kv_h = h // KV_GROUP
    ct, cy, cx, sub, NT, NY, NX = _program_tile(pid, T, HG, WG, TT, TH, TW, N_SUB_N)
    rows, valid = _tile_rows(ct, cy, cx, sub, T, HG, WG, TT, TH, TW, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * sk_b + kv_h * sk_h, rows, sk_l, offs_d, valid, HEAD_DIM, True, D_PAD, INTERPRET)
    v = _load_rows(V + b * sv_b + kv_h * sv_h, rows, sv_l, offs_d, valid, HEAD_DIM, True, D_PAD, INTERPRET)
    q_base = Q + b * sq_b + h * sq_h
    do_base = DO + b * sdo_b + h * sdo_h
    seq = T * HG * WG
    lse_base = LSE + bh.to(tl.int64) * seq
    delta_base = DELTA + bh.to(tl.int64) * seq

    n_axes = NT + NY + NX
    lt = tl.load(QRANGE + ct)
    ly = tl.load(QRANGE + NT + cy)
    lx = tl.load(QRANGE + NT + NY + cx)
    ht = tl.load(QRANGE + n_axes + ct)
    hy = tl.load(QRANGE + n_axes + NT + cy)
    hx = tl.load(QRANGE + n_axes + NT + NY + cx)
    ft = _split_full(lt, ht, T // TT)
    fy = _split_full(ly, hy, HG // TH)
    fx = _split_full(lx, hx, WG // TW)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk, dv = _dkdv_box(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_l, sdo_l, offs_d, lt, ft, ly, fy,
                       lx, fx, T, HG, WG, qk_scale, TT, TH, TW, HEAD_DIM, BLOCK_M, PAD_M, True, D_PAD, INTERPRET,
                       PRECISION)
    if RAGGED_T:
        dk, dv = _dkdv_box(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_l, sdo_l, offs_d, ft, ht, ly,
                           hy, lx, hx, T, HG, WG, qk_scale, TT, TH, TW, HEAD_DIM, BLOCK_M, True, False, D_PAD,
                           INTERPRET, PRECISION)
    if RAGGED_Y:
        dk, dv = _dkdv_box(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_l, sdo_l, offs_d, lt, ft, fy,
                           hy, lx, hx, T, HG, WG, qk_scale, TT, TH, TW, HEAD_DIM, BLOCK_M, True, False, D_PAD,
                           INTERPRET, PRECISION)
    if RAGGED_X:
        dk, dv = _dkdv_box(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_l, sdo_l, offs_d, lt, ft, ly,
                           fy, fx, hx, T, HG, WG, qk_scale, TT, TH, TW, HEAD_DIM, BLOCK_M, True, False, D_PAD,
                           INTERPRET, PRECISION)
    mask = valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    off = b * sdk_b + h * sdk_h + rows[:, None] * sdk_l + offs_d[None, :]
    tl.store(DK + off, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# launch metadata shared by the launcher (op.py) and the offline inspection
# ----------------------------------------------------------------------------------------------------------


def layout_constexprs(grid, tile, head_dim: int, precision: str) -> Dict[str, object]:
    """Constexpr arguments common to the three kernels (block sizes added per kernel)."""
    return {
        "TT": tile[0], "TH": tile[1], "TW": tile[2],
        "HEAD_DIM": head_dim, "BLOCK_D": triton.next_power_of_2(head_dim),
        "RAGGED_T": grid[0] % tile[0] != 0, "RAGGED_Y": grid[1] % tile[1] != 0, "RAGGED_X": grid[2] % tile[2] != 0,
        "INTERPRET": INTERPRET, "PRECISION": precision,
    }


def dot_precision(elem_bytes: int) -> str:
    """tl.dot input precision: exact fp32 ("ieee") for fp32 inputs; ignored for 16-bit inputs."""
    return "ieee" if elem_bytes == 4 else "tf32"


# Grid and tile the GPU benchmarks use (Wan2.1 latent grid; see benchmarks/bench_local_attention.py).
INSPECT_GRID = (21, 30, 52)
INSPECT_TILE = (3, 10, 4)
INSPECT_HEAD_DIMS = (64, 128, 256)


def inspect_specs(head_dims=INSPECT_HEAD_DIMS, shared_memory: int = HOPPER_SHARED_MEMORY_PER_BLOCK) -> List["object"]:
    """KernelSpecs for :mod:`fastvmt_kernels.inspect`: fwd, dq, dkdv, bf16, D = 64, 128 and 256, benchmark tile, in
    the configurations a device with ``shared_memory`` bytes per block runs (default: Hopper's)."""
    from ..inspect import KernelSpec

    specs = []
    ptr = "*bf16"
    for d in head_dims:
        configs = kernel_configs(d, 2, shared_memory)
        common = layout_constexprs(INSPECT_GRID, INSPECT_TILE, d, dot_precision(2))
        vol = INSPECT_TILE[0] * INSPECT_TILE[1] * INSPECT_TILE[2]
        tag = f"bf16 D{d} tile{'x'.join(map(str, INSPECT_TILE))}"
        kernels = (
            ("fwd", local_attention_fwd_kernel, ["Q", "K", "V", "O"], ["LSE"], ["q", "k", "v", "o"], []),
            ("dq", local_attention_dq_kernel, ["Q", "K", "V", "O", "DO", "DQ"], ["LSE", "DLSE", "DELTA"],
             ["q", "k", "v", "o", "do", "dq"], []),
            ("dkdv", local_attention_dkdv_kernel, ["Q", "K", "V", "DO", "DK", "DV"], ["LSE", "DELTA"],
             ["q", "k", "v", "do", "dk"], ["QRANGE"]),
        )
        for kind, fn, tensors, stats, stride_names, tables in kernels:
            cfg = configs[kind]
            bm, bn = block_sizes(cfg, vol)
            constexprs = dict(common, BLOCK_M=bm, BLOCK_N=bn)
            constexprs["KV_GROUP"] = 1
            if kind == "dq":
                constexprs["HAS_DLSE"] = False
            if kind != "dkdv":  # the query windows' time rule (0: not causal); dk/dv reads its ranges from QRANGE
                constexprs["CAUSAL_TILES"] = 0
            signature = {}
            divisible = []
            for name in fn.arg_names:
                if name in constexprs:
                    signature[name] = "constexpr"
                elif name in tensors:
                    signature[name] = ptr
                    divisible.append(name)
                elif name in stats:
                    signature[name] = "*fp32"
                    divisible.append(name)
                elif name in tables:
                    signature[name] = "*i32"
                    divisible.append(name)
                elif name in ("scale", "qk_scale"):
                    signature[name] = "fp32"
                else:
                    signature[name] = "i32"
                    if name.startswith("s") and name[-2:] in ("_b", "_l", "_h"):
                        divisible.append(name)  # strides of (B, L, H, D) tensors with D % 16 == 0
            specs.append(KernelSpec(
                name=f"local_attention_{kind} {tag} M{bm} N{bn}", fn=fn, signature=signature,
                constexprs=constexprs, divisible=divisible, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            ))
    return specs
