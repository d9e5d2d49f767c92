"""Triton kernels of the coarse-to-fine attention motion flow.

Three kernels, all with an online (streaming) soft-argmax in base 2 (``exp2`` with ``temperature / sqrt(D) *
log2(e)`` folded into one multiplier), so no logits row is ever stored:

- ``_coarse_kernel``: program = (block of BLOCK_M tile-mean queries, pair, batch). Streams all S keys of frame j in
  BLOCK_N blocks keeping a running max, sum and (y, x)-weighted sums, then writes each tile's window origin.
- ``_fine_fwd_kernel``: program = (tile, pair, batch). Streams the l_y*l_x window keys in BLOCK_N blocks; the
  score block is computed transposed, keys x queries (``k . q^T``), so the MMA's M dimension is the BLOCK_N = 64
  keys (Hopper wgmma needs M = 64) even though a tile has only th*tw (12) queries. Writes the flow and the base-2
  log-sum-exp per query (saved for backward).
- ``_fine_bwd_kernel``: program = (tile, frame i, batch); loops over the pairs of frame i and their window blocks,
  recomputing P from the saved log-sum-exp: ``dS = P * ((pos - E[pos]) . g) * temperature / sqrt(D)``,
  ``dq^T += k^T . dS`` (registers, written once: deterministic) and ``dk = dS . q`` added to an fp32 buffer with
  atomics (windows of different tiles and pairs overlap; the order of fp32 additions is not fixed, so dk is
  reproducible only to fp32 rounding, ~1e-7 relative).

There is no P.V product: the expectation is over 2 coordinates, so exp throughput, not the tensor cores, bounds
these kernels (kernel-anchors.md); the transposed layout keeps the 64 x 16 score block per step small and the
exp count minimal (one exp2 per (query, key) in forward and one in backward).

bf16 loads are upcast before any elementwise math (the interpreter's bf16 arithmetic is wrong); tl.dot takes the
input dtype (fp32 uses IEEE precision, not TF32).
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Coarse pass: tile-mean queries per program and keys per step.
COARSE_BLOCK_M = 64
COARSE_BLOCK_N = 64
# Fine pass: window keys per step (the MMA M dimension); queries per tile are padded to >= MIN_BLOCK_Q.
FINE_BLOCK_N = 64
MIN_BLOCK_Q = 16
NUM_WARPS = 4
NUM_STAGES = 2


@triton.jit
def _coarse_kernel(
    qrep_ptr, k_ptr, pair_i_ptr, pair_j_ptr, win_ptr,
    stride_rb, stride_rf, stride_rn,
    stride_kb, stride_kf, stride_ks,
    stride_wb, stride_wp, stride_wn,
    n_tiles, seq, frame_w, half_y, half_x, max_oy, max_ox, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Window origins of BLOCK_M tiles for one (pair, batch): online soft-argmax over all keys of frame j.

    qrep: (B, F, n_tiles, D) tile-mean queries in the input dtype; k: (B, F, S, D); win: (B, P, n_tiles, 2) int64.
    """
    pid_m = tl.program_id(0)
    pair = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    fi = tl.load(pair_i_ptr + pair).to(tl.int64)
    fj = tl.load(pair_j_ptr + pair).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < n_tiles
    q_ptrs = qrep_ptr + b * stride_rb + fi * stride_rf + offs_m[:, None].to(tl.int64) * stride_rn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = k_ptr + b * stride_kb + fj * stride_kf

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    sum_y = tl.zeros([BLOCK_M], tl.float32)
    sum_x = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, seq, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = offs_n < seq
        kt_ptrs = k_base + offs_n[None, :].to(tl.int64) * stride_ks + offs_d[:, None]
        kt = tl.load(kt_ptrs, mask=key_ok[None, :], other=0.0)  # (D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale_log2
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        key_y = (offs_n // frame_w).to(tl.float32)
        key_x = (offs_n % frame_w).to(tl.float32)
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
def _tile_queries(tile, n_tiles_x, frame_h, frame_w, tile_h, tile_w, BLOCK_Q: tl.constexpr):
    """(slot y, slot x, raster token, valid) of the BLOCK_Q query slots of ``tile`` (ragged edges masked)."""
    offs_q = tl.arange(0, BLOCK_Q)
    qy = (tile // n_tiles_x) * tile_h + offs_q // tile_w
    qx = (tile % n_tiles_x) * tile_w + offs_q % tile_w
    valid = (offs_q < tile_h * tile_w) & (qy < frame_h) & (qx < frame_w)
    return qy, qx, qy * frame_w + qx, valid


@triton.jit
def _window_keys(start, oy, ox, win_w, n_win, frame_w, BLOCK_N: tl.constexpr):
    """(key y, key x, raster token, valid) of window positions [start, start + BLOCK_N)."""
    offs_w = start + tl.arange(0, BLOCK_N)
    ky = oy + offs_w // win_w
    kx = ox + offs_w % win_w
    return ky, kx, ky * frame_w + kx, offs_w < n_win


@triton.jit
def _fine_fwd_kernel(
    q_ptr, k_ptr, pair_i_ptr, pair_j_ptr, win_ptr, flow_ptr, lse_ptr,
    stride_qb, stride_qf, stride_qs,
    stride_wb, stride_wp, stride_wn,
    stride_fb, stride_fp, stride_fs,
    stride_lb, stride_lp,
    n_tiles_x, frame_h, frame_w, tile_h, tile_w, win_h, win_w, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Flow and base-2 log-sum-exp of one tile's queries for one (pair, batch).

    q, k: (B, F, S, D) (same strides); win: (B, P, n_tiles, 2) int64; flow: (B, P, S, 2) fp32; lse: (B, P, S) fp32.
    """
    tile = tl.program_id(0)
    pair = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    fi = tl.load(pair_i_ptr + pair).to(tl.int64)
    fj = tl.load(pair_j_ptr + pair).to(tl.int64)
    qy, qx, q_tok, q_ok = _tile_queries(tile, n_tiles_x, frame_h, frame_w, tile_h, tile_w, BLOCK_Q)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = q_ptr + b * stride_qb + fi * stride_qf
    qt = tl.load(q_base + q_tok[None, :].to(tl.int64) * stride_qs + offs_d[:, None], mask=q_ok[None, :], other=0.0)
    w_base = win_ptr + b * stride_wb + pair * stride_wp + tile.to(tl.int64) * stride_wn
    oy = tl.load(w_base).to(tl.int32)
    ox = tl.load(w_base + 1).to(tl.int32)
    k_base = k_ptr + b * stride_qb + fj * stride_qf
    n_win = win_h * win_w

    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    sum_y = tl.zeros([BLOCK_Q], tl.float32)
    sum_x = tl.zeros([BLOCK_Q], tl.float32)
    for start in range(0, n_win, BLOCK_N):
        ky, kx, k_tok, k_ok = _window_keys(start, oy, ox, win_w, n_win, frame_w, BLOCK_N)
        kb = tl.load(k_base + k_tok[:, None].to(tl.int64) * stride_qs + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        s = tl.dot(kb, qt, input_precision=DOT_PRECISION) * qk_scale_log2  # (BLOCK_N keys, BLOCK_Q queries)
        s = tl.where(k_ok[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        sum_y = sum_y * alpha + tl.sum(p * ky.to(tl.float32)[:, None], 0)
        sum_x = sum_x * alpha + tl.sum(p * kx.to(tl.float32)[:, None], 0)
        m_i = m_new

    f_ptrs = flow_ptr + b * stride_fb + pair * stride_fp + q_tok.to(tl.int64) * stride_fs
    tl.store(f_ptrs, sum_y / l_i - qy.to(tl.float32), mask=q_ok)
    tl.store(f_ptrs + 1, sum_x / l_i - qx.to(tl.float32), mask=q_ok)
    tl.store(lse_ptr + b * stride_lb + pair * stride_lp + q_tok.to(tl.int64), m_i + tl.log2(l_i), mask=q_ok)


@triton.jit
def _fine_bwd_kernel(
    q_ptr, k_ptr, pair_j_ptr, pair_off_ptr, win_ptr, flow_ptr, lse_ptr, dflow_ptr, dq_ptr, dk_ptr,
    stride_qb, stride_qf, stride_qs,
    stride_wb, stride_wp, stride_wn,
    stride_fb, stride_fp, stride_fs,
    stride_lb, stride_lp,
    stride_gb, stride_gp, stride_gs,
    n_tiles_x, frame_h, frame_w, tile_h, tile_w, win_h, win_w, qk_scale_log2, ds_scale,
    HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dq of one tile of frame i (all pairs of i, written once) and its atomic dk contributions, one batch.

    q, k, dq: (B, F, S, D) same strides; dk: (B, F, S, D) fp32 accumulator, same strides; dflow: (B, P, S, 2) fp32.
    """
    tile = tl.program_id(0)
    fi = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    qy, qx, q_tok, q_ok = _tile_queries(tile, n_tiles_x, frame_h, frame_w, tile_h, tile_w, BLOCK_Q)
    q_tok64 = q_tok.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = b * stride_qb + fi * stride_qf
    qt = tl.load(q_ptr + q_base + q_tok64[None, :] * stride_qs + offs_d[:, None], mask=q_ok[None, :], other=0.0)
    qy_f = qy.to(tl.float32)
    qx_f = qx.to(tl.float32)
    n_win = win_h * win_w
    dqt = tl.zeros([HEAD_DIM, BLOCK_Q], tl.float32)
    pair_lo = tl.load(pair_off_ptr + fi).to(tl.int64)
    num_pairs = tl.load(pair_off_ptr + fi + 1) - tl.load(pair_off_ptr + fi)
    for step in range(0, num_pairs):
        pair64 = pair_lo + step
        fj = tl.load(pair_j_ptr + pair64).to(tl.int64)
        w_base = win_ptr + b * stride_wb + pair64 * stride_wp + tile.to(tl.int64) * stride_wn
        oy = tl.load(w_base).to(tl.int32)
        ox = tl.load(w_base + 1).to(tl.int32)
        f_off = b * stride_fb + pair64 * stride_fp + q_tok64 * stride_fs
        g_off = b * stride_gb + pair64 * stride_gp + q_tok64 * stride_gs
        exp_y = tl.load(flow_ptr + f_off, mask=q_ok, other=0.0) + qy_f
        exp_x = tl.load(flow_ptr + f_off + 1, mask=q_ok, other=0.0) + qx_f
        g_y = tl.load(dflow_ptr + g_off, mask=q_ok, other=0.0)
        g_x = tl.load(dflow_ptr + g_off + 1, mask=q_ok, other=0.0)
        lse = tl.load(lse_ptr + b * stride_lb + pair64 * stride_lp + q_tok64, mask=q_ok, other=0.0)
        k_base = b * stride_qb + fj * stride_qf
        for start in range(0, n_win, BLOCK_N):
            ky, kx, k_tok, k_ok = _window_keys(start, oy, ox, win_w, n_win, frame_w, BLOCK_N)
            k_offs = k_base + k_tok[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
            kb = tl.load(k_ptr + k_offs, mask=k_ok[:, None], other=0.0)
            s = tl.dot(kb, qt, input_precision=DOT_PRECISION) * qk_scale_log2
            p = tl.exp2(s - lse[None, :])
            p = tl.where(k_ok[:, None] & q_ok[None, :], p, 0.0)
            dpos = (ky.to(tl.float32)[:, None] - exp_y[None, :]) * g_y[None, :]
            dpos += (kx.to(tl.float32)[:, None] - exp_x[None, :]) * g_x[None, :]
            ds = (p * dpos * ds_scale).to(kb.dtype)  # (BLOCK_N keys, BLOCK_Q queries)
            dqt += tl.dot(tl.trans(kb), ds, input_precision=DOT_PRECISION)
            dkb = tl.dot(ds, tl.trans(qt), input_precision=DOT_PRECISION)
            tl.atomic_add(dk_ptr + k_offs, dkb, mask=k_ok[:, None], sem="relaxed")

    dq_ptrs = dq_ptr + q_base + q_tok64[None, :] * stride_qs + offs_d[:, None]
    tl.store(dq_ptrs, dqt.to(dq_ptr.dtype.element_ty), mask=q_ok[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Compile inspection (python -m fastvmt_kernels.inspect --filter motion_flow)

_INSPECT_DIM = 128
_INSPECT_TILE_SLOTS = 12  # Wan's 3 x 4 tiles


def inspect_specs():
    """GPU configurations (bf16, D = 128, 3 x 4 tiles) of the three kernels for the compile report."""
    from ..inspect import KernelSpec

    block_q = max(MIN_BLOCK_Q, triton.next_power_of_2(_INSPECT_TILE_SLOTS))

    def sig(fn, types):
        return {name: types.get(name, "i32") for name in fn.arg_names}

    coarse = sig(
        _coarse_kernel,
        {"qrep_ptr": "*bf16", "k_ptr": "*bf16", "pair_i_ptr": "*i32", "pair_j_ptr": "*i32", "win_ptr": "*i64",
         "qk_scale_log2": "fp32", "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
         "DOT_PRECISION": "constexpr"},
    )
    fwd = sig(
        _fine_fwd_kernel,
        {"q_ptr": "*bf16", "k_ptr": "*bf16", "pair_i_ptr": "*i32", "pair_j_ptr": "*i32", "win_ptr": "*i64",
         "flow_ptr": "*fp32", "lse_ptr": "*fp32", "qk_scale_log2": "fp32", "HEAD_DIM": "constexpr",
         "BLOCK_Q": "constexpr", "BLOCK_N": "constexpr", "DOT_PRECISION": "constexpr"},
    )
    bwd = sig(
        _fine_bwd_kernel,
        {"q_ptr": "*bf16", "k_ptr": "*bf16", "pair_j_ptr": "*i32", "pair_off_ptr": "*i32", "win_ptr": "*i64",
         "flow_ptr": "*fp32", "lse_ptr": "*fp32", "dflow_ptr": "*fp32", "dq_ptr": "*bf16", "dk_ptr": "*fp32",
         "qk_scale_log2": "fp32", "ds_scale": "fp32", "HEAD_DIM": "constexpr", "BLOCK_Q": "constexpr",
         "BLOCK_N": "constexpr", "DOT_PRECISION": "constexpr"},
    )
    fine_constexprs = {"HEAD_DIM": _INSPECT_DIM, "BLOCK_Q": block_q, "BLOCK_N": FINE_BLOCK_N, "DOT_PRECISION": "tf32"}
    ptr_names = lambda s: [n for n, t in s.items() if t.startswith("*")]  # noqa: E731
    return [
        KernelSpec(
            "motion_flow_coarse bf16 d128",
            _coarse_kernel,
            coarse,
            {"HEAD_DIM": _INSPECT_DIM, "BLOCK_M": COARSE_BLOCK_M, "BLOCK_N": COARSE_BLOCK_N, "DOT_PRECISION": "tf32"},
            divisible=ptr_names(coarse)
            + ["stride_rb", "stride_rf", "stride_rn", "stride_kb", "stride_kf", "stride_ks"],
            num_warps=NUM_WARPS,
            num_stages=NUM_STAGES,
        ),
        KernelSpec(
            "motion_flow_fine_fwd bf16 d128 tile3x4",
            _fine_fwd_kernel,
            fwd,
            dict(fine_constexprs),
            divisible=ptr_names(fwd) + ["stride_qb", "stride_qf", "stride_qs"],
            num_warps=NUM_WARPS,
            num_stages=NUM_STAGES,
        ),
        KernelSpec(
            "motion_flow_fine_bwd bf16 d128 tile3x4",
            _fine_bwd_kernel,
            bwd,
            dict(fine_constexprs),
            divisible=ptr_names(bwd) + ["stride_qb", "stride_qf", "stride_qs"],
            num_warps=NUM_WARPS,
            num_stages=NUM_STAGES,
        ),
    ]
