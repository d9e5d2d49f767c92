"""Triton kernels of the coarse-to-fine attention motion flow.

Three kernels, all with an online (streaming) soft-argmax in base 2 (``exp2`` with ``temperature / sqrt(D) *
log2(e)`` folded into one multiplier), so no logits row is ever stored:

- ``_coarse_kernel``: program = (block of BLOCK_M tiles, pair, batch). Forms the tiles' mean queries, streams all S
  keys of frame j in BLOCK_N blocks keeping a running max, sum and (y, x)-weighted sums, then writes each tile's
  window origin.
- ``_fine_fwd_kernel``: program = (group of FWD_TILE_GROUP tiles, pair, batch). The windows of adjacent tiles
  overlap almost entirely (motion is small and smooth), so the program streams the bounding box of its tiles'
  windows once, in BLOCK_N blocks, and masks every query to its own tile's window. The score block is computed
  transposed, keys x queries (``k . q^T``), so the MMA's M dimension is the BLOCK_N = 64 keys (Hopper wgmma needs
  M = 64). Writes the flow and the base-2 log-sum-exp per query (saved for backward).
- ``_fine_bwd_kernel``: program = (group of BWD_TILE_GROUP tiles, frame i, batch); loops over the pairs of frame i
  and the blocks of the group's window box, recomputing P from the saved log-sum-exp:
  ``dS = P * ((pos - E[pos]) . g) * temperature / sqrt(D)``, ``dq^T += k^T . dS`` (registers, written once:
  deterministic) and ``dk = dS . q`` added to an fp32 buffer with relaxed atomics (windows of different groups and
  pairs overlap; the order of fp32 additions is not fixed, so dk is reproducible only to fp32 rounding, ~1e-7
  relative). Grouping cuts the key loads and dk atomics against one program per tile (2 x 1 groups of 3 x 4
  tiles, window 21: a ~24 x 21 box instead of two 21 x 21 windows). The atomics are ``sem="relaxed"``: the
  default acq_rel ordering puts a GPU-wide memory barrier beside every vector atomic in SASS.

There is no P.V product: the expectation is over 2 coordinates, so exp throughput, instruction issue and memory
latency, not the tensor cores, bound these kernels (kernel-anchors.md). The fine loops therefore keep their integer
work small (sm_90a SASS per 64-key step and thread, before -> after: forward 1054 -> 788 instructions, backward
1344 -> 873; benchmarks/results/sass_compare.md): key coordinates come from an exact fp32-reciprocal division
instead of a runtime integer division (~20 instructions per element), window membership is one subtraction and one
absolute-value compare per axis on the keys' float positions in the box (which the sums and dS need anyway: no
integer key coordinates beside them; 888 -> 817 forward, 1145 -> 1081 backward, 2 x 2 groups), padding keys past a
box read a real key and add an exactly zero dS row (no row masks on loads or atomics, so no branches around the
atomics), the forward's three per-block key sums are one reduction (6 barriers, not 12), the
backward forms dS as P * (row * gy + col * gx - c) (scale folded into the query's gradient, positions from the box
corner) and query and key element offsets are int32 inside a frame (int64 frame base).

bf16 loads are upcast before any elementwise math (the interpreter's bf16 arithmetic is wrong); tl.dot takes the
input dtype (fp32 uses IEEE precision, not TF32).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from ..device_limits import HOPPER_SHARED_MEMORY_PER_BLOCK
from ..index_math import small_divmod

LOG2E = 1.4426950408889634
# Coarse pass: tile-mean queries per program and keys per step.
COARSE_BLOCK_M = 64
COARSE_BLOCK_N = 64
# Fine pass: window keys per step (the MMA M dimension); queries per tile are padded to >= MIN_BLOCK_Q.
FINE_BLOCK_N = 64
# Keys per backward step. At 64 (D = 128, 2 x 2 groups query-major, 4 warps) the backward holds 255 registers and
# spills 72 bytes outside its hot loop (reloaded once per pair and at the end; 240 with 2 x 1 groups); at 32 it spills
# 56 (2 x 1: none, 189 registers), but issues ~7% more instructions per key (benchmark ablation rows *_bn32 compare
# them).
BWD_BLOCK_N = 64
MIN_BLOCK_Q = 16
NUM_WARPS = 4
NUM_STAGES = 3
COMPACT_NUM_STAGES = 2  # devices with less shared memory per block than Hopper (see op._num_stages)
# Tiles per fine-pass program (y, x), forward and backward, and pipeline stages. Measured on an H100 at Wan2.1-1.3B
# shapes (3 x 4 tiles, window 21; benchmarks/results/gpu_runs.md, runs 4 and 5): run 4's eager ablation rows put 2 x 2
# groups in 3 stages first (1.34 ms per fwd + bwd step; 1.75 ms for the former default, 2 x 1 in 2 stages); the
# GPU time confirms it: 590 us of kernels per step (run 5's profile) against 986 us for 2 x 1 (run 4's), 0.61 vs
# 1.05 ms replayed as a CUDA graph. (1, 1) is one tile per program.
BWD_TILE_GROUP = (2, 2)
FWD_TILE_GROUP = (2, 2)
# Window origin row of invalid query slots: no key's row is within a window of it.
FAR_ORIGIN = tl.constexpr(1 << 28)
# Finite start of the online max: a key block holding no key of a query's window leaves that query's state unchanged.
MAX_FLOOR = tl.constexpr(-1.0e30)
# The forward's per-block key sums as one three-operand reduction (fewer barriers in SASS). The Triton interpreter
# runs a custom combine function element by element in Python (~4x slower tests), so it takes three tl.sum there.
FUSED_KEY_SUMS = os.environ.get("TRITON_INTERPRET") != "1"
WIDE_BLOCK_Q = 64  # query slots that fill a Hopper MMA's 64 rows (wgmma M = 64 per warpgroup)
# Padded head dims above this run the backward at WIDE_DIM_NUM_WARPS warps: at 4 it stores spills in its hot loop.
WIDE_DIM = 128
WIDE_DIM_NUM_WARPS = 8
# GPUs without Hopper-class shared memory (Ampere, Ada: mma.sync, whose operand fragments sit in registers; Hopper's
# wgmma reads them from shared memory) run the backward at COMPACT_BWD_NUM_WARPS warps, and above WIDE_DIM with
# COMPACT_WIDE_DIM_BWD_BLOCK_N keys per step. Offline sm_80 / sm_89 SASS, 3 x 4 tiles: the Hopper configuration of
# the 2 x 2 group (4 warps; 8 at D = 256, 64 keys) stores 9-10 spills and reloads 74-79 per hot-loop step there,
# and with triton 3.9 the keys-major 2 x 1 and 1 x 1 groups at 4 warps store 38-56; at 8 warps (32 keys at
# D = 256) none of them stores any in its loop, with triton 3.6 or 3.9.
COMPACT_BWD_NUM_WARPS = 8
COMPACT_WIDE_DIM_BWD_BLOCK_N = 32


def bwd_block_n(d_pad: int, hopper: bool = True) -> int:
    """Keys per backward step for a head dim padded to ``d_pad`` on a Hopper-class GPU or another one."""
    return BWD_BLOCK_N if hopper or d_pad <= WIDE_DIM else COMPACT_WIDE_DIM_BWD_BLOCK_N


def fine_launch(block_q: int, d_pad: int, backward: bool, hopper: bool = True):
    """(warps, query-major) of a fine-pass program with ``block_q`` query slots and head dim padded to ``d_pad``,
    on a GPU with Hopper-class shared memory per block (``hopper``) or another one (see COMPACT_BWD_NUM_WARPS).

    Narrow groups put the keys on the MMA's 64 rows (keys x queries; the forward's per-query reductions then cross
    the warps). From WIDE_BLOCK_Q slots both passes turn query-major (queries x keys, each warp owning whole query
    rows) at 4 warps. sm_90a SASS per 64-key step and thread, 3 x 4 tiles: forward 732 instructions for 16 scores
    (2 x 1 group, keys-major) vs 817 for 32 (2 x 2, query-major; 2 barriers instead of 6, 127 registers);
    backward 818 for 16 vs 1081 for 32 (the keys-major 2 x 2 backward needed 8 warps). A 2 x 2 group
    also shares one window box among 48 queries instead of 24, so the backward adds a third fewer dk atomics.
    Above D = WIDE_DIM the backward takes 8 warps (D = 256 at 4 warps: 7 spill stores and 78 reloads per step in
    the 2 x 1 keys-major loop, 335 / 452 query-major; none at 8).
    """
    query_major = block_q >= WIDE_BLOCK_Q
    warps = WIDE_DIM_NUM_WARPS if backward and d_pad > WIDE_DIM else NUM_WARPS
    if backward and not hopper:
        warps = COMPACT_BWD_NUM_WARPS
    return warps, query_major


@triton.jit
def _with_dims(row_ok, offs_d, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DIMS_AXIS: tl.constexpr):
    """2-D load/store mask of tokens x head-dim channels, the channels along axis ``DIMS_AXIS`` (0 or 1): the
    tokens' ``row_ok`` and, only when the head dim is padded to the power of two ``D_PAD``, the real channels."""
    if DIMS_AXIS == 0:
        mask = row_ok[None, :]
        if D_PAD != HEAD_DIM:
            mask = mask & (offs_d[:, None] < HEAD_DIM)
    else:
        mask = row_ok[:, None]
        if D_PAD != HEAD_DIM:
            mask = mask & (offs_d[None, :] < HEAD_DIM)
    return mask


@triton.jit
def _load_key_rows(ptrs, offs_d, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Load (rows, D_PAD) key rows at in-bounds row addresses: masked only on the padded channels, if any."""
    if D_PAD != HEAD_DIM:
        rows = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        rows = tl.load(ptrs)
    return rows


@triton.jit
def _add_key_rows(ptrs, values, offs_d, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Atomically add (rows, D_PAD) fp32 values at in-bounds row addresses (relaxed: no memory barrier)."""
    if D_PAD != HEAD_DIM:
        tl.atomic_add(ptrs, values, mask=(offs_d < HEAD_DIM)[None, :], sem="relaxed")
    else:
        tl.atomic_add(ptrs, values, sem="relaxed")


@triton.jit
def _coarse_kernel(
    q_ptr, k_ptr, pair_i_ptr, pair_j_ptr, win_ptr,
    stride_qb, stride_qf, stride_qs,
    stride_kb, stride_kf, stride_ks,
    stride_wb, stride_wp, stride_wn,
    n_tiles, n_tiles_x, frame_h, frame_w, tile_h, tile_w, seq, half_y, half_x, max_oy, max_ox, qk_scale_log2,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Window origins of BLOCK_M tiles for one (pair, batch): online soft-argmax over all keys of frame j.

    Each tile's mean query is formed here (fp32 sum over its real tokens, ragged tiles included, rounded once to
    the input dtype for the tensor-core dot), so no tile-mean tensor is built on the host side.
    q, k: (B, F, S, D); win: (B, P, n_tiles, 2) int64.
    """
    pid_m = tl.program_id(0)
    pair = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    fi = tl.load(pair_i_ptr + pair).to(tl.int64)
    fj = tl.load(pair_j_ptr + pair).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < n_tiles
    top = (offs_m // n_tiles_x) * tile_h
    left = (offs_m % n_tiles_x) * tile_w
    q_base = q_ptr + b * stride_qb + fi * stride_qf
    q_sum = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    count = tl.zeros([BLOCK_M], tl.float32)
    for slot in range(0, tile_h * tile_w):
        y = top + slot // tile_w
        x = left + slot % tile_w
        ok = row_ok & (y < frame_h) & (x < frame_w)
        rows = tl.where(ok, y * frame_w + x, 0).to(tl.int64)
        q_mask = _with_dims(ok, offs_d, HEAD_DIM, D_PAD, 1)
        q_rows = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
        q_sum += q_rows.to(tl.float32)
        count += ok.to(tl.float32)
    q = (q_sum / tl.maximum(count, 1.0)[:, None]).to(q_ptr.dtype.element_ty)
    k_base = k_ptr + b * stride_kb + fj * stride_kf

    inv_frame_w = 1.0 / frame_w.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    sum_y = tl.zeros([BLOCK_M], tl.float32)
    sum_x = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, seq, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = offs_n < seq
        kt_ptrs = k_base + offs_n[None, :].to(tl.int64) * stride_ks + offs_d[:, None]
        kt = tl.load(kt_ptrs, mask=_with_dims(key_ok, offs_d, HEAD_DIM, D_PAD, 0), other=0.0)  # (D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale_log2
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        key_row, key_col = small_divmod(offs_n, frame_w, inv_frame_w)
        key_y = key_row.to(tl.float32)
        key_x = key_col.to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        sum_y = sum_y * alpha + tl.sum(p * key_y[None, :], 1)
        sum_x = sum_x * alpha + tl.sum(p * key_x[None, :], 1)
        m_i = m_new

    oy = tl.floor(sum_y / l_i + 0.5).to(tl.int32) - half_y
    ox = tl.floor(sum_x / l_i + 0.5).to(tl.int32) - half_x
    oy = tl.minimum(tl.maximum(oy, 0), max_oy)
    ox = tl.minimum(tl.maximum(ox, 0), max_ox)
    w_ptrs = win_ptr + b * stride_wb + pair * stride_wp + offs_m.to(tl.int64) * stride_wn
    tl.store(w_ptrs, oy.to(tl.int64), mask=row_ok)
    tl.store(w_ptrs + 1, ox.to(tl.int64), mask=row_ok)


@triton.jit
def _window_keys(start, oy, ox, win_w, inv_win_w, n_win, frame_w, BLOCK_N: tl.constexpr):
    """(raster token, row, column) of positions [start, start + BLOCK_N) of the window (box) at (oy, ox) of n_win
    keys, win_w wide (inv_win_w = 1 / win_w); row and column count from the window's corner.

    Positions past the window keep their (row, column) -- rows below it, outside every query's window, so
    ``_in_own_window`` masks them -- but their token is the window's first one: loads and the dk atomics then need
    no row mask (they read a real key, and add an exactly zero dS row).
    """
    offs_w = start + tl.arange(0, BLOCK_N)
    row, col = small_divmod(offs_w, win_w, inv_win_w)
    return tl.where(offs_w < n_win, (oy + row) * frame_w + ox + col, oy * frame_w + ox), row, col


@triton.jit
def _group_queries(group, n_groups_x, n_tiles_x, frame_h, frame_w, tile_h, tile_w,
                   GROUP_Y: tl.constexpr, GROUP_X: tl.constexpr, BLOCK_Q: tl.constexpr):
    """(y, x, raster token, tile index, valid) of the BLOCK_Q query slots of a GROUP_Y x GROUP_X group of tiles.

    Slots run in raster order over the group's (GROUP_Y * th) x (GROUP_X * tw) tokens; slots past that count or
    outside a ragged frame edge are invalid. With a 1 x 1 group the slots are ``_tile_queries``'s.
    """
    offs_q = tl.arange(0, BLOCK_Q)
    group_w = GROUP_X * tile_w
    qy = (group // n_groups_x) * (GROUP_Y * tile_h) + offs_q // group_w
    qx = (group % n_groups_x) * group_w + offs_q % group_w
    valid = (offs_q < GROUP_Y * tile_h * group_w) & (qy < frame_h) & (qx < frame_w)
    tile = (qy // tile_h) * n_tiles_x + qx // tile_w
    return qy, qx, qy * frame_w + qx, tl.where(valid, tile, 0), valid


@triton.jit
def _group_windows(w_ptrs, q_ok, frame_h, frame_w, win_h, win_w):
    """Each query slot's window origin (oy, ox) (its tile's) and the bounding box (y, x, width, 1 / width, keys) of
    the group's windows; ``w_ptrs`` points at each slot's tile row of the (B, P, n_tiles, 2) origins."""
    oy = tl.load(w_ptrs, mask=q_ok, other=0).to(tl.int32)
    ox = tl.load(w_ptrs + 1, mask=q_ok, other=0).to(tl.int32)
    # Memory safety for origins given directly to the op (motion_flow() rejects illegal ones): keep windows in frame.
    oy = tl.minimum(tl.maximum(oy, 0), frame_h - win_h)
    ox = tl.minimum(tl.maximum(ox, 0), frame_w - win_w)
    box_y = tl.min(tl.where(q_ok, oy, frame_h), 0)
    box_x = tl.min(tl.where(q_ok, ox, frame_w), 0)
    box_w = tl.max(tl.where(q_ok, ox, 0), 0) + win_w - box_x
    n_box = (tl.max(tl.where(q_ok, oy, 0), 0) + win_h - box_y) * box_w
    # Invalid slots get a window far outside the frame, so `_in_own_window` needs no query-validity term.
    oy = tl.where(q_ok, oy, FAR_ORIGIN)
    return oy, ox, box_y, box_x, box_w, 1.0 / box_w.to(tl.float32), n_box


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    """Combine function of a three-operand sum reduction."""
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def _window_centres(oy, ox, box_y, box_x, win_h, win_w):
    """Each query's window as (centre row, centre column, half height, half width) in box coordinates, floats:
    the window holds the rows [c - half, c + half], half = (win - 1) / 2."""
    half_h = (win_h - 1).to(tl.float32) * 0.5
    half_w = (win_w - 1).to(tl.float32) * 0.5
    return (oy - box_y).to(tl.float32) + half_h, (ox - box_x).to(tl.float32) + half_w, half_h, half_w


@triton.jit
def _in_own_window(row_f, col_f, centre_y, centre_x, half_h, half_w, QUERY_MAJOR: tl.constexpr):
    """Mask of keys inside their query's own window: (BLOCK_N keys, BLOCK_Q queries), or transposed with
    QUERY_MAJOR, from the keys' float (row, column) in the box and the queries' ``_window_centres``.

    An integer row r lies in [c - half, c + half] iff |r - c| <= half + 1/4: one subtraction and one compare (with
    an absolute-value operand) per axis and element. The keys' float positions are what the soft-argmax sums and dS
    need anyway, so no integer key coordinates stay in registers beside them (offline sm_90a, 2 x 2 groups, D = 128:
    hot loop per 64 keys 888 -> 817 instructions forward, 1145 -> 1081 backward, against integer coordinates and an
    unsigned range test). The test also rejects the padding keys past the group's box (their row is below the box,
    hence below every window) and invalid query slots (``_group_windows`` moves their windows to FAR_ORIGIN), so no
    validity terms are needed.
    """
    if QUERY_MAJOR:
        dy = row_f[None, :] - centre_y[:, None]
        dx = col_f[None, :] - centre_x[:, None]
    else:
        dy = row_f[:, None] - centre_y[None, :]
        dx = col_f[:, None] - centre_x[None, :]
    return (tl.abs(dy) <= half_h + 0.25) & (tl.abs(dx) <= half_w + 0.25)


@triton.jit
def _fine_fwd_kernel(
    q_ptr, k_ptr, pair_i_ptr, pair_j_ptr, win_ptr, flow_ptr, lse_ptr,
    stride_qb, stride_qf, stride_qs,
    stride_wb, stride_wp, stride_wn,
    stride_fb, stride_fp, stride_fs,
    stride_lb, stride_lp,
    n_groups_x, n_tiles_x, frame_h, frame_w, tile_h, tile_w, win_h, win_w, qk_scale_log2,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUP_Y: tl.constexpr, GROUP_X: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, FUSED_SUMS: tl.constexpr,
    QUERY_MAJOR: tl.constexpr,
):
    """Flow and base-2 log-sum-exp of one group of tiles' queries for one (pair, batch).

    Streams the bounding box of the group's windows; each query's online soft-argmax sees only its own tile's
    window (other keys are masked to -inf; the running max starts at a finite floor so a block holding none of a
    query's keys leaves its state unchanged).
    q, k: (B, F, S, D) (same strides); win: (B, P, n_tiles, 2) int64; flow: (B, P, S, 2) fp32; lse: (B, P, S) fp32.
    """
    group = tl.program_id(0)
    pair = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    fi = tl.load(pair_i_ptr + pair).to(tl.int64)
    fj = tl.load(pair_j_ptr + pair).to(tl.int64)
    qy, qx, q_tok, q_tile, q_ok = _group_queries(
        group, n_groups_x, n_tiles_x, frame_h, frame_w, tile_h, tile_w, GROUP_Y, GROUP_X, BLOCK_Q
    )
    offs_d = tl.arange(0, D_PAD)
    q_base = q_ptr + b * stride_qb + fi * stride_qf
    if QUERY_MAJOR:
        qt = tl.load(q_base + q_tok[:, None].to(tl.int64) * stride_qs + offs_d[None, :],
                     mask=_with_dims(q_ok, offs_d, HEAD_DIM, D_PAD, 1), other=0.0)  # (BLOCK_Q, D)
    else:
        qt = tl.load(q_base + q_tok[None, :].to(tl.int64) * stride_qs + offs_d[:, None],
                     mask=_with_dims(q_ok, offs_d, HEAD_DIM, D_PAD, 0), other=0.0)  # (D, BLOCK_Q)
    w_ptrs = win_ptr + b * stride_wb + pair * stride_wp + q_tile.to(tl.int64) * stride_wn
    oy, ox, box_y, box_x, box_w, inv_box_w, n_box = _group_windows(w_ptrs, q_ok, frame_h, frame_w, win_h, win_w)
    k_base = k_ptr + b * stride_qb + fj * stride_qf

    # Key positions count from the box corner (the flow subtracts the query's position in the same coordinates).
    centre_y, centre_x, half_h, half_w = _window_centres(oy, ox, box_y, box_x, win_h, win_w)
    m_i = tl.full([BLOCK_Q], MAX_FLOOR, tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    sum_y = tl.zeros([BLOCK_Q], tl.float32)
    sum_x = tl.zeros([BLOCK_Q], tl.float32)
    for start in range(0, n_box, BLOCK_N):
        k_tok, row, col = _window_keys(start, box_y, box_x, box_w, inv_box_w, n_box, frame_w, BLOCK_N)
        row_f = row.to(tl.float32)
        col_f = col.to(tl.float32)
        kb = _load_key_rows(k_base + (k_tok[:, None] * stride_qs + offs_d[None, :]), offs_d, HEAD_DIM, D_PAD)
        if QUERY_MAJOR:  # (BLOCK_Q queries, BLOCK_N keys): each warp owns whole query rows, reductions stay in it
            s = tl.dot(qt, tl.trans(kb), input_precision=DOT_PRECISION) * qk_scale_log2
            s = tl.where(_in_own_window(row_f, col_f, centre_y, centre_x, half_h, half_w, True), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            blk_l = tl.sum(p, 1)
            blk_y = tl.sum(p * row_f[None, :], 1)
            blk_x = tl.sum(p * col_f[None, :], 1)
        else:  # (BLOCK_N keys, BLOCK_Q queries): the keys fill the MMA's 64 rows, reductions cross the warps
            s = tl.dot(kb, qt, input_precision=DOT_PRECISION) * qk_scale_log2
            s = tl.where(_in_own_window(row_f, col_f, centre_y, centre_x, half_h, half_w, False), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[None, :])
            if FUSED_SUMS:  # one three-operand reduction: the warps exchange partial sums once, not three times
                blk_l, blk_y, blk_x = tl.reduce(
                    (p, p * row_f[:, None], p * col_f[:, None]), 0, _add3
                )
            else:
                blk_l = tl.sum(p, 0)
                blk_y = tl.sum(p * row_f[:, None], 0)
                blk_x = tl.sum(p * col_f[:, None], 0)
        l_i = l_i * alpha + blk_l
        sum_y = sum_y * alpha + blk_y
        sum_x = sum_x * alpha + blk_x
        m_i = m_new

    l_safe = tl.where(q_ok, l_i, 1.0)
    f_ptrs = flow_ptr + b * stride_fb + pair * stride_fp + q_tok.to(tl.int64) * stride_fs
    tl.store(f_ptrs, sum_y / l_safe - (qy - box_y).to(tl.float32), mask=q_ok)
    tl.store(f_ptrs + 1, sum_x / l_safe - (qx - box_x).to(tl.float32), mask=q_ok)
    tl.store(lse_ptr + b * stride_lb + pair * stride_lp + q_tok.to(tl.int64), m_i + tl.log2(l_safe), mask=q_ok)


@triton.jit
def _fine_bwd_kernel(
    q_ptr, k_ptr, pair_j_ptr, pair_off_ptr, win_ptr, flow_ptr, lse_ptr, dflow_ptr, dq_ptr, dk_ptr,
    stride_qb, stride_qf, stride_qs,
    stride_wb, stride_wp, stride_wn,
    stride_fb, stride_fp, stride_fs,
    stride_lb, stride_lp,
    stride_gb, stride_gp, stride_gs,
    n_groups_x, n_tiles_x, frame_h, frame_w, tile_h, tile_w, win_h, win_w, qk_scale_log2, ds_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUP_Y: tl.constexpr, GROUP_X: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, QUERY_MAJOR: tl.constexpr,
):
    """dq of one group of tiles of frame i (all pairs of i, written once) and its atomic dk contributions.

    Per pair, the program streams the bounding box of its tiles' windows (adjacent tiles' windows mostly overlap)
    and masks each query to its own tile's window, so a key shared by several windows of the group is loaded and
    added into dk once per pair instead of once per tile.
    q, k, dq: (B, F, S, D) same strides; dk: (B, F, S, D) fp32 accumulator, same strides; dflow: (B, P, S, 2) fp32.
    """
    group = tl.program_id(0)
    fi = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    qy, qx, q_tok, q_tile, q_ok = _group_queries(
        group, n_groups_x, n_tiles_x, frame_h, frame_w, tile_h, tile_w, GROUP_Y, GROUP_X, BLOCK_Q
    )
    q_tok64 = q_tok.to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    q_base = b * stride_qb + fi * stride_qf
    if QUERY_MAJOR:  # q and dq as (BLOCK_Q, D_PAD)
        q_mask = _with_dims(q_ok, offs_d, HEAD_DIM, D_PAD, 1)
        q_offs = q_tok[:, None] * stride_qs + offs_d[None, :]
        dqt = tl.zeros([BLOCK_Q, D_PAD], tl.float32)
    else:  # transposed, (D_PAD, BLOCK_Q)
        q_mask = _with_dims(q_ok, offs_d, HEAD_DIM, D_PAD, 0)
        q_offs = q_tok[None, :] * stride_qs + offs_d[:, None]
        dqt = tl.zeros([D_PAD, BLOCK_Q], tl.float32)
    qt = tl.load(q_ptr + q_base + q_offs, mask=q_mask, other=0.0)
    pair_lo = tl.load(pair_off_ptr + fi).to(tl.int64)
    num_pairs = tl.load(pair_off_ptr + fi + 1) - tl.load(pair_off_ptr + fi)
    for step in range(0, num_pairs):
        pair64 = pair_lo + step
        fj = tl.load(pair_j_ptr + pair64).to(tl.int64)
        w_ptrs = win_ptr + b * stride_wb + pair64 * stride_wp + q_tile.to(tl.int64) * stride_wn
        oy, ox, box_y, box_x, box_w, inv_box_w, n_box = _group_windows(w_ptrs, q_ok, frame_h, frame_w, win_h, win_w)
        f_off = b * stride_fb + pair64 * stride_fp + q_tok64 * stride_fs
        g_off = b * stride_gb + pair64 * stride_gp + q_tok64 * stride_gs
        # dS = P * ((ky - E[y]) g_y + (kx - E[x]) g_x) * ds_scale = P * (row * gy + col * gx - c), with the scale
        # folded into gy, gx and positions counted from the box corner (small numbers: no cancellation in c).
        gy = tl.load(dflow_ptr + g_off, mask=q_ok, other=0.0) * ds_scale
        gx = tl.load(dflow_ptr + g_off + 1, mask=q_ok, other=0.0) * ds_scale
        rel_y = tl.load(flow_ptr + f_off, mask=q_ok, other=0.0) + (qy - box_y).to(tl.float32)
        rel_x = tl.load(flow_ptr + f_off + 1, mask=q_ok, other=0.0) + (qx - box_x).to(tl.float32)
        c = rel_y * gy + rel_x * gx
        lse = tl.load(lse_ptr + b * stride_lb + pair64 * stride_lp + q_tok64, mask=q_ok, other=0.0)
        centre_y, centre_x, half_h, half_w = _window_centres(oy, ox, box_y, box_x, win_h, win_w)
        k_base = b * stride_qb + fj * stride_qf
        k_frame = k_ptr + k_base
        dk_frame = dk_ptr + k_base
        for start in range(0, n_box, BLOCK_N):
            k_tok, row, col = _window_keys(start, box_y, box_x, box_w, inv_box_w, n_box, frame_w, BLOCK_N)
            row_f = row.to(tl.float32)
            col_f = col.to(tl.float32)
            k_offs = k_tok[:, None] * stride_qs + offs_d[None, :]  # int32: S * D < 2**26 within the interface limits
            kb = _load_key_rows(k_frame + k_offs, offs_d, HEAD_DIM, D_PAD)
            if QUERY_MAJOR:  # (BLOCK_Q queries, BLOCK_N keys)
                s = tl.dot(qt, tl.trans(kb), input_precision=DOT_PRECISION) * qk_scale_log2
                inside = _in_own_window(row_f, col_f, centre_y, centre_x, half_h, half_w, True)
                p = tl.where(inside, tl.exp2(s - lse[:, None]), 0.0)
                ds = (p * (row_f[None, :] * gy[:, None] + (col_f[None, :] * gx[:, None] - c[:, None]))).to(kb.dtype)
                dqt += tl.dot(ds, kb, input_precision=DOT_PRECISION)
                dkb = tl.dot(tl.trans(ds), qt, input_precision=DOT_PRECISION)
            else:  # (BLOCK_N keys, BLOCK_Q queries)
                s = tl.dot(kb, qt, input_precision=DOT_PRECISION) * qk_scale_log2
                inside = _in_own_window(row_f, col_f, centre_y, centre_x, half_h, half_w, False)
                p = tl.where(inside, tl.exp2(s - lse[None, :]), 0.0)
                ds = (p * (row_f[:, None] * gy[None, :] + (col_f[:, None] * gx[None, :] - c[None, :]))).to(kb.dtype)
                dqt += tl.dot(tl.trans(kb), ds, input_precision=DOT_PRECISION)
                dkb = tl.dot(ds, tl.trans(qt), input_precision=DOT_PRECISION)
            _add_key_rows(dk_frame + k_offs, dkb, offs_d, HEAD_DIM, D_PAD)

    tl.store(dq_ptr + q_base + q_offs, dqt.to(dq_ptr.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------------------------------------------
# Compile inspection (python -m fastvmt_kernels.inspect --filter motion_flow)

_INSPECT_DIM = 128
_INSPECT_MAX_DIM = 256
_INSPECT_TILE_SLOTS = 12  # Wan's 3 x 4 tiles
INSPECT_NARROW_GROUP = (2, 1)  # a group narrow enough to run keys-major (benchmark ablations)
# The backward's spill-free variant (benchmark ablation row fused_fwd2x2_bwd2x2_bw8_bn32): 32 keys per step at 8 warps.
INSPECT_SMALL_BWD_BLOCK_N = 32
INSPECT_SMALL_BWD_NUM_WARPS = 8


def inspect_specs(shared_memory: int = HOPPER_SHARED_MEMORY_PER_BLOCK):
    """GPU configurations (bf16, 3 x 4 tiles) of the three kernels for the compile report, as a device with
    ``shared_memory`` bytes per block runs them (default: Hopper's): the default 2 x 2 tile groups (query-major) at
    D = 128 and 256, a 2 x 1 group (keys-major) and the backward with 32 keys per step at 8 warps (the benchmark's
    ablations)."""
    from ..inspect import KernelSpec

    hopper = shared_memory >= HOPPER_SHARED_MEMORY_PER_BLOCK
    num_stages = NUM_STAGES if hopper else COMPACT_NUM_STAGES

    def sig(fn, types):
        return {name: types.get(name, "i32") for name in fn.arg_names}

    def slots(group):
        return max(MIN_BLOCK_Q, triton.next_power_of_2(group[0] * group[1] * _INSPECT_TILE_SLOTS))

    dims = {"HEAD_DIM": "constexpr", "D_PAD": "constexpr", "BLOCK_N": "constexpr", "DOT_PRECISION": "constexpr"}
    fine_blocks = {"BLOCK_Q": "constexpr", "GROUP_Y": "constexpr", "GROUP_X": "constexpr"}
    coarse = sig(
        _coarse_kernel,
        {"q_ptr": "*bf16", "k_ptr": "*bf16", "pair_i_ptr": "*i32", "pair_j_ptr": "*i32", "win_ptr": "*i64",
         "qk_scale_log2": "fp32", "BLOCK_M": "constexpr", **dims},
    )
    fwd = sig(
        _fine_fwd_kernel,
        {"q_ptr": "*bf16", "k_ptr": "*bf16", "pair_i_ptr": "*i32", "pair_j_ptr": "*i32", "win_ptr": "*i64",
         "flow_ptr": "*fp32", "lse_ptr": "*fp32", "qk_scale_log2": "fp32", "FUSED_SUMS": "constexpr",
         "QUERY_MAJOR": "constexpr", **dims, **fine_blocks},
    )
    bwd = sig(
        _fine_bwd_kernel,
        {"q_ptr": "*bf16", "k_ptr": "*bf16", "pair_j_ptr": "*i32", "pair_off_ptr": "*i32", "win_ptr": "*i64",
         "flow_ptr": "*fp32", "lse_ptr": "*fp32", "dflow_ptr": "*fp32", "dq_ptr": "*bf16", "dk_ptr": "*fp32",
         "qk_scale_log2": "fp32", "ds_scale": "fp32", "QUERY_MAJOR": "constexpr", **dims, **fine_blocks},
    )
    ptr_names = lambda s: [n for n, t in s.items() if t.startswith("*")]  # noqa: E731
    dim_constexprs = {"HEAD_DIM": _INSPECT_DIM, "D_PAD": _INSPECT_DIM, "DOT_PRECISION": "tf32"}
    specs = [
        KernelSpec(
            "motion_flow_coarse bf16 d128",
            _coarse_kernel,
            coarse,
            dict(dim_constexprs, BLOCK_M=COARSE_BLOCK_M, BLOCK_N=COARSE_BLOCK_N),
            divisible=ptr_names(coarse)
            + ["stride_qb", "stride_qf", "stride_qs", "stride_kb", "stride_kf", "stride_ks"],
            num_warps=NUM_WARPS,
            num_stages=num_stages,
        )
    ]
    passes = (("fwd", _fine_fwd_kernel, fwd), ("bwd", _fine_bwd_kernel, bwd))
    # (pass, group, head dim, keys, warps): the default groups at Wan's D = 128 and at the largest D, a keys-major
    # group, and the spill-free backward.
    configs = [(p, g, d, None, None) for g, d in ((FWD_TILE_GROUP, _INSPECT_DIM), (FWD_TILE_GROUP, _INSPECT_MAX_DIM),
                                                  (INSPECT_NARROW_GROUP, _INSPECT_DIM)) for p in passes]
    configs.append((passes[1], BWD_TILE_GROUP, _INSPECT_DIM, INSPECT_SMALL_BWD_BLOCK_N, INSPECT_SMALL_BWD_NUM_WARPS))
    for (label, fn, signature), group, dim, block_n, warps in configs:
        if label == "bwd" and group == FWD_TILE_GROUP:
            group = BWD_TILE_GROUP
        block_q = slots(group)
        default_block_n = bwd_block_n(dim, hopper) if label == "bwd" else FINE_BLOCK_N
        if block_n is None:
            block_n = default_block_n
        suffix = "" if block_n == default_block_n else f" n{block_n}"
        launch_warps, query_major = fine_launch(block_q, dim, label == "bwd", hopper)
        if warps is not None:
            launch_warps, suffix = warps, f"{suffix} w{warps}"
        specs.append(
            KernelSpec(
                f"motion_flow_fine_{label} bf16 d{dim} tile3x4 group{group[0]}x{group[1]}{suffix}",
                fn,
                signature,
                dict(dim_constexprs, HEAD_DIM=dim, D_PAD=dim, BLOCK_Q=block_q, BLOCK_N=block_n,
                     GROUP_Y=group[0], GROUP_X=group[1], QUERY_MAJOR=query_major,
                     **({"FUSED_SUMS": True} if label == "fwd" else {})),
                divisible=ptr_names(signature) + ["stride_qb", "stride_qf", "stride_qs"],
                num_warps=launch_warps,
                num_stages=num_stages,
            )
        )
    return specs
