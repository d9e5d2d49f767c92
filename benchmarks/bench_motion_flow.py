"""Fused motion flow (forward + backward) vs the two dense PyTorch AMF formulations, time and peak memory.

Providers (each one step = forward + backward of ``sum(flow * g)`` w.r.t. q and k):

- ``fused``: ``fastvmt_kernels.motion_flow`` with the Triton backend (FastVMT pairs: span 4, 78 pairs at F = 21).
- ``fused_fwd{a}x{b}_bwd{c}x{d}[_w{warps}][_s{stages}]`` (ablations, GPU): the same op with a x b tiles per forward
  fine-pass program and c x d per backward program instead of the defaults (``FWD_TILE_GROUP``,
  ``BWD_TILE_GROUP``; 1x1 = one tile each), optionally with other fine-pass warps / pipeline stages.
- ``fused+cuda_graph``, ``dense_global+cuda_graph`` (GPU): the same steps captured in a CUDA graph and replayed.
- ``dense_global``: DiTFlow's global AMF over all F*F ordered pairs, one einsum, full (F, F, S, S) softmax, autograd.
- ``dense_gather_local``: the official FastVMT code's structure: a Python loop over the span pairs; self pairs are
  full S x S soft-argmaxes; for i < j the coarse pass uses each tile's centre query, then the l*l window keys of
  every tile are gathered into a materialised (B, n_tiles, l*l, D) tensor and scored; autograd keeps every pair's
  gathered keys and probabilities alive until backward.
- ``chunked_reference`` (CPU mode only): this package's torch backend (pair chunks, checkpointed fine pass).

Modes:

- GPU (CUDA and FASTVMT_BENCH_DRY unset): Wan2.1-1.3B shapes, B = 1, F = 21, 30 x 52 tokens, D = 128, bf16, span 4,
  window 21, tile 3 x 4; time = median of pytest-benchmark rounds (CUDA synchronised); peak memory =
  torch.cuda.max_memory_allocated during one step minus the memory allocated before it. -> results/motion_flow_gpu.
- CPU (no CUDA, FASTVMT_BENCH_DRY unset): a reduced shape (below) for the PyTorch providers; peak memory = peak of
  the CPU allocator's live bytes during one step, from torch.profiler memory events (self allocations and frees in
  time order). The Triton kernel is not timed on CPU (the interpreter is not a performance proxy); its memory is
  given analytically (it allocates exactly the tensors listed in ``fused_bytes``). Analytic memory of every provider
  at the Wan shape is reported next to it. -> results/motion_flow_cpu (or $FASTVMT_BENCH_OUT).
- Dry (FASTVMT_BENCH_DRY=1): tiny shapes, one round, the Triton path under the interpreter; results to a temp dir.
"""
from __future__ import annotations

import math
import os
import re
import time
from typing import Callable, Dict, List

import pytest
import torch

from _results import DRY_ENV, OUT_ENV, RESULTS_DIR, write_table
from fastvmt_kernels import motion_flow
from fastvmt_kernels.motion_flow import FlowGeometry, make_pairs
from fastvmt_kernels.motion_flow.reference import motion_flow_reference

# CPU only: FASTVMT_BENCH_CPU_SHAPE=wan runs the chunked reference and the dense-gather provider at the full Wan
# shape (dense_global is skipped there: >= 8 GiB and minutes per step on a small CPU; its memory is analytic).
CPU_SHAPE_ENV = "FASTVMT_BENCH_CPU_SHAPE"
if os.environ.get(DRY_ENV) == "1":
    MODE = "dry"
elif torch.cuda.is_available():
    MODE = "gpu"
elif os.environ.get(CPU_SHAPE_ENV) == "wan":
    MODE = "cpu_wan"
else:
    MODE = "cpu"

WAN = dict(batch=1, frames=21, frame=(30, 52), dim=128, span=4, window=21, tile=(3, 4))
SHAPES = {
    "gpu": WAN,
    "cpu": dict(batch=1, frames=9, frame=(15, 26), dim=64, span=4, window=11, tile=(3, 4)),
    "cpu_wan": WAN,
    "dry": dict(batch=1, frames=3, frame=(6, 8), dim=16, span=2, window=3, tile=(3, 4)),
}
SHAPE = SHAPES[MODE]
DTYPE = torch.bfloat16 if MODE == "gpu" else torch.float32
DEVICE = "cuda" if MODE == "gpu" else "cpu"
ROUNDS = {"gpu": 10, "cpu": 3, "cpu_wan": 1, "dry": 1}[MODE]  # the fewest timed rounds of a row
# GPU rows first run untimed steps for WARMUP_S, then time max(ROUNDS, TIMED_S / step) rounds, at most MAX_ROUNDS:
# run 5 timed its first row (the eager fused step) in 10 rounds of ~2 ms right after the kernels' compilation and
# the reference check, 2.10 ms against 1.45-1.92 ms for the same kernels' later rows (gpu_runs.md); 20 ms of
# steps do not outlast the GPU's ramp from an idle clock.
# (A dry run warms each row up with one call, to exercise the path.)
WARMUP_S, TIMED_S, MAX_ROUNDS = {"gpu": (0.2, 0.3, 300), "dry": (1e-6, 0.0, ROUNDS)}.get(MODE, (0.0, 0.0, ROUNDS))
BASELINE = "chunked_reference" if MODE.startswith("cpu") else "fused"  # denominator of the ratios
FASTVMT_TEMPERATURE = 1.0
DITFLOW_TEMPERATURE = 2.0
# Ablations of the fused op: tiles per program of the forward / backward fine pass (the defaults are
# FWD_TILE_GROUP / BWD_TILE_GROUP in fastvmt_kernels/motion_flow/kernels.py); fwd1x1_bwd1x1 is one tile per program.
# Optional suffixes override the fine passes' warps (_w), the backward's warps only (_bw), every kernel's pipeline
# stages (_s) and the backward's keys per step (_bn). fused_fwd2x2_bwd2x2_bw8_bn32 is the spill-free backward
# (offline: 202 registers, 0 bytes, vs 72 bytes outside the hot loop for the default). fused_fwd2x1_bwd2x1_s2 is the default of runs 3 and 4 (benchmarks/results/gpu_runs.md); run 4 made
# 2 x 2 groups in 3 stages the default. Groups of >= 64 query slots (2x2, 4x1 of 3x4 tiles) run query-major
# (kernels.fine_launch).
ABLATIONS = ("fused_fwd2x1_bwd2x1_s2", "fused_fwd1x1_bwd1x1", "fused_fwd1x2_bwd1x2", "fused_fwd2x2_bwd2x2_s2",
             "fused_fwd4x1_bwd2x2", "fused_fwd2x2_bwd2x2_s4", "fused_fwd2x2_bwd2x2_bw8_bn32")
DRY_ABLATIONS = ("fused_fwd1x1_bwd1x1", "fused_fwd2x2_bwd2x2_w4_bw8_s1_bn32")  # both orientations, every suffix
# Suffix of a provider whose step is captured once in a CUDA graph and replayed: the GPU time of the step without
# the host's cost of queueing it (what torch.compile(mode="reduce-overhead") or a captured pipeline gets).
GRAPHED = "+cuda_graph"
# Suffix of a provider timed over BACK_TO_BACK_STEPS eager steps queued back to back, one synchronisation at the end
# (ms per step): the host queues the next step while the GPU runs the last, as in a loop of steps. The plain eager
# rows synchronise after every step, so a host-bound step's host time and kernel time add up there.
BACK_TO_BACK = "+back_to_back"
BACK_TO_BACK_STEPS = 10
MODES = ("", GRAPHED, BACK_TO_BACK)
PROVIDERS = {
    # Ablations only as CUDA graphs: the eager step is host-bound on a GPU (gpu_runs.md, run 5: eager rows spread
    # 1.45-2.21 ms over GPU times under 1 ms), so only replayed rows rank kernel configurations.
    # The rows the targets are read from first, the ablations last (a stage timeout loses the last rows).
    "gpu": ("fused", "fused" + GRAPHED, "fused" + BACK_TO_BACK, "dense_global", "dense_global" + GRAPHED,
            "dense_global" + BACK_TO_BACK, "dense_gather_local", *(a + GRAPHED for a in ABLATIONS)),
    "cpu": ("chunked_reference", "dense_global", "dense_gather_local"),
    "cpu_wan": ("chunked_reference", "dense_gather_local"),
    "dry": ("fused", "fused" + BACK_TO_BACK, *DRY_ABLATIONS, "chunked_reference", "dense_global", "dense_gather_local"),
}[MODE]
FP32, KEY_BYTES, INDEX_BYTES = 4, 2, 8
SANITY_REL_TOL = 2e-2  # fused vs the fp32 reference on the same windows (bf16 inputs on GPU)  # fp32 maps, bf16 q/k (Wan), int64 window origins

RESULTS: List[Dict[str, object]] = []


def _geometry(shape) -> FlowGeometry:
    return FlowGeometry.create(shape["frame"], shape["tile"], shape["window"])


def dense_global_amf(q: torch.Tensor, k: torch.Tensor, geo: FlowGeometry, temperature: float) -> torch.Tensor:
    """DiTFlow AMF: (B, F*F, S, 2) soft-argmax over all keys of frame j for every ordered pair (i, j)."""
    b, f, s, d = q.shape
    logits = torch.einsum("bisd,bjtd->bijst", q, k).float() * (temperature / math.sqrt(d))
    pos = geo.token_positions(q.device)
    return (torch.softmax(logits, dim=-1) @ pos - pos).reshape(b, f * f, s, 2)


def dense_gather_local_amf(q: torch.Tensor, k: torch.Tensor, geo: FlowGeometry, span: int, temperature: float):
    """The official code's structure (Python loop over pairs, materialised window-key gathers, autograd)."""
    b, f, s, d = q.shape
    scale = temperature / math.sqrt(d)
    pos = geo.token_positions(q.device)
    index, valid = geo.tile_tokens(q.device)
    th, tw = geo.tile
    ny, nx = geo.tile_grid
    centre_y = (torch.arange(ny, device=q.device) * th + th // 2).clamp_max(geo.frame[0] - 1)
    centre_x = (torch.arange(nx, device=q.device) * tw + tw // 2).clamp_max(geo.frame[1] - 1)
    centres = (centre_y[:, None] * geo.frame[1] + centre_x[None, :]).reshape(-1)
    offsets = geo.window_offsets(q.device)
    # Tile-major slots -> raster order, as integer indices built once (boolean-mask indexing in the loop would
    # synchronise the host with the GPU on every pair).
    slots = valid.reshape(-1).nonzero().squeeze(1)
    order = slots[torch.argsort(index[valid])]
    batch = torch.arange(b, device=q.device)[:, None, None]
    flows = []
    for i in range(f):
        for j in range(i, min(f, i + span)):
            if i == j:
                probs = torch.softmax(torch.einsum("bsd,btd->bst", q[:, i], k[:, j]).float() * scale, dim=-1)
                flows.append(probs @ pos - pos)
                continue
            with torch.no_grad():
                coarse = torch.softmax(torch.einsum("bnd,bsd->bns", q[:, i, centres], k[:, j]).float() * scale, -1)
                origins = geo.origins_from_centres(coarse @ pos)  # (B, n, 2)
            win_pos = origins[:, :, None, :] + offsets  # (B, n, W, 2)
            keys = k[:, j][batch, win_pos[..., 0] * geo.frame[1] + win_pos[..., 1]]  # (B, n, W, D) materialised
            logits = torch.einsum("bntd,bnwd->bntw", q[:, i][:, index], keys).float() * scale
            expected = torch.softmax(logits, dim=-1) @ win_pos.float()
            flows.append((expected - pos[index]).flatten(1, 2)[:, order])
    return torch.stack(flows, dim=1)


def make_step(provider: str, q: torch.Tensor, k: torch.Tensor, geo: FlowGeometry, span: int) -> Callable[[], object]:
    """One forward + backward of ``provider`` on (q, k) with a fixed random upstream gradient."""
    if provider == "dense_global":
        flow_fn = lambda: dense_global_amf(q, k, geo, DITFLOW_TEMPERATURE)  # noqa: E731
    elif provider == "dense_gather_local":
        flow_fn = lambda: dense_gather_local_amf(q, k, geo, span, FASTVMT_TEMPERATURE)  # noqa: E731
    else:
        backend = "triton" if provider.startswith("fused") else "torch"
        kwargs = dict(tile=geo.tile, window=geo.window, span=span, temperature=FASTVMT_TEMPERATURE, backend=backend)
        flow_fn = lambda: motion_flow(q, k, geo.frame, **kwargs)[0]  # noqa: E731
    with torch.no_grad():
        grad = torch.randn(flow_fn().shape, device=q.device)

    def step():
        flow = flow_fn()
        return torch.autograd.grad(flow, (q, k), grad)

    return step


def check_fused_against_reference(q: torch.Tensor, k: torch.Tensor, geo: FlowGeometry, span: int) -> None:
    """The timed kernel must compute the flow: compare with the chunked fp32 reference on the kernel's windows."""
    kwargs = dict(tile=geo.tile, window=geo.window, span=span, temperature=FASTVMT_TEMPERATURE)
    with torch.no_grad():
        flow, _, windows = motion_flow(q, k, geo.frame, backend="triton", return_windows=True, **kwargs)
        expected = motion_flow_reference(q, k, geo, span, FASTVMT_TEMPERATURE, origins=windows)[0]
    err = ((flow - expected).norm() / expected.norm()).item()
    assert err < SANITY_REL_TOL, f"fused flow differs from the reference: relative error {err:.2e}"


def peak_bytes(step: Callable[[], object]) -> int:
    """Peak bytes allocated during one call of ``step`` above what was allocated before it."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def fused_bytes(shape, key_bytes: int) -> int:
    """Every tensor the fused op allocates for forward + backward (exact by construction of op.py).

    flow (B,P,S,2) fp32 and its upstream gradient, lse (B,P,S) fp32, windows (B,P,n,2) int64, the fp32 dk
    accumulator (B,F,S,D) and dq, dk (B,F,S,D) in the input dtype. (The tile-mean queries are formed inside the
    coarse kernel; the pair table is cached once per device.)
    """
    geo = _geometry(shape)
    b, f, d, s, n = shape["batch"], shape["frames"], shape["dim"], geo.num_tokens, geo.num_tiles
    p = make_pairs(f, shape["span"]).shape[0]
    return (2 * b * p * s * 2 * FP32 + b * p * s * FP32 + b * p * n * 2 * INDEX_BYTES
            + b * f * s * d * FP32 + 2 * b * f * s * d * key_bytes)


def dense_global_bytes(shape, key_bytes: int) -> int:
    """Lower bound: in backward the saved fp32 probabilities and the gradient w.r.t. them (two (B, F, F, S, S) fp32
    maps) are alive at once."""
    s = shape["frame"][0] * shape["frame"][1]
    return 2 * shape["batch"] * shape["frames"] ** 2 * s * s * FP32


def dense_gather_local_bytes(shape, key_bytes: int) -> int:
    """Lower bound: what autograd saves for backward: per inter-frame pair the gathered keys (B,n,l*l,D) and the
    fp32 probabilities (B,n,T,l*l); per self pair the fp32 (B,S,S) probabilities."""
    geo = _geometry(shape)
    b, f, d, s, n = shape["batch"], shape["frames"], shape["dim"], geo.num_tokens, geo.num_tiles
    pairs = make_pairs(f, shape["span"])
    inter = int((pairs[:, 1] > pairs[:, 0]).sum())
    w, t = geo.window_size, geo.tile[0] * geo.tile[1]
    return inter * b * n * (w * d * key_bytes + t * w * FP32) + f * b * s * s * FP32


ANALYTIC = {"fused": fused_bytes, "dense_global": dense_global_bytes, "dense_gather_local": dense_gather_local_bytes}


def cuda_graphed(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` captured in a CUDA graph (after warm-up on a side stream, as torch.cuda.graph requires); returns
    the replay. Inputs and the upstream gradient are the step's own static tensors."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


# The per-kernel breakdown runs before the provider rows (pytest keeps file order): a stage timeout loses only the
# last rows, the ablations.
PROFILE_STEPS = 3
PROFILE_TOP = 12


def test_fused_kernel_breakdown():
    """Where one fused step's time goes: per-kernel device time (CUDA) or per-op CPU time (dry / CPU), averaged over
    PROFILE_STEPS profiled steps after a warm-up. -> results/motion_flow_<mode>_kernels."""
    from torch.profiler import ProfilerActivity, profile

    if MODE.startswith("cpu"):
        pytest.skip("the interpreter's per-op CPU time says nothing about the kernels' GPU cost")
    geo = _geometry(SHAPE)
    b, f, d = SHAPE["batch"], SHAPE["frames"], SHAPE["dim"]
    q, k = (torch.randn(b, f, geo.num_tokens, d, device=DEVICE).to(DTYPE).requires_grad_() for _ in range(2))
    step = make_step("fused", q, k, geo, SHAPE["span"])
    step()
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    sync()
    on_gpu = DEVICE == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(PROFILE_STEPS):
            step()
        sync()
    rows = []
    for event in prof.key_averages():
        micros = getattr(event, "device_time_total", None) if on_gpu else event.self_cpu_time_total
        if on_gpu and micros is None:
            micros = event.cuda_time_total
        if micros and micros > 0:
            rows.append({"kernel": event.key[:80], "calls_per_step": event.count / PROFILE_STEPS,
                         "us_per_step": micros / PROFILE_STEPS})
    if on_gpu:  # device events only (the CUDA activity also lists runtime calls with zero device time)
        rows = [r for r in rows if "cuda" not in r["kernel"].lower() or "kernel" in r["kernel"].lower()]
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    for row in rows:
        row["share"] = row["us_per_step"] / total
    notes = [
        f"mode: {MODE}; shape as motion_flow_{MODE}; fused step = forward + backward (dq, dk); "
        f"{PROFILE_STEPS} profiled steps after one warm-up, per-step averages",
        ("device time per kernel (torch.profiler CUDA activity); total device time per step "
         if on_gpu else "self CPU time per op (dry run); total ") + f"{total:.1f} us; top {PROFILE_TOP} shown",
    ]
    write_table(f"motion_flow_{MODE}_kernels", "Motion flow: fused step, time per kernel", rows[:PROFILE_TOP],
                ["kernel", "calls_per_step", "us_per_step", "share"], notes)
    assert rows, "the profiler recorded nothing"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_motion_flow(benchmark, provider, monkeypatch):
    mode = _mode(provider)
    base, graphed, back_to_back = provider.removesuffix(mode), mode == GRAPHED, mode == BACK_TO_BACK
    if base.startswith("fused_"):  # ablation: fused_fwd{a}x{b}_bwd{c}x{d} tiles per fine-pass program
        from fastvmt_kernels.motion_flow import op as flow_op

        fwd, bwd, warps, bwd_warps, stages, bwd_keys = re.fullmatch(
            r"fused_fwd(\d+x\d+)_bwd(\d+x\d+)(?:_w(\d+))?(?:_bw(\d+))?(?:_s(\d+))?(?:_bn(\d+))?", base
        ).groups()
        monkeypatch.setattr(flow_op, "FWD_TILE_GROUP", tuple(int(v) for v in fwd.split("x")))
        monkeypatch.setattr(flow_op, "BWD_TILE_GROUP", tuple(int(v) for v in bwd.split("x")))
        if warps or bwd_warps:
            launch = flow_op.fine_launch

            def patched_launch(block_q, d_pad, backward, hopper=True):
                default_warps, query_major = launch(block_q, d_pad, backward, hopper)
                chosen = bwd_warps if backward and bwd_warps else warps
                return (int(chosen) if chosen else default_warps), query_major

            monkeypatch.setattr(flow_op, "fine_launch", patched_launch)
        if stages:
            monkeypatch.setattr(flow_op, "NUM_STAGES", int(stages))
        if bwd_keys:
            monkeypatch.setattr(flow_op, "bwd_block_n", lambda d_pad, hopper=True: int(bwd_keys))
    geo = _geometry(SHAPE)
    b, f, d = SHAPE["batch"], SHAPE["frames"], SHAPE["dim"]
    q, k = (torch.randn(b, f, geo.num_tokens, d, device=DEVICE).to(DTYPE).requires_grad_() for _ in range(2))
    if base.startswith("fused"):
        check_fused_against_reference(q, k, geo, SHAPE["span"])
    step = make_step(base, q, k, geo, SHAPE["span"])
    step()  # compile / warm up outside the timing
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    mem = peak_bytes(step)
    steps_per_round = 1
    if graphed:
        step = cuda_graphed(step)
        sync()
    elif back_to_back:
        single, steps_per_round = step, BACK_TO_BACK_STEPS
        step = lambda: [single() for _ in range(steps_per_round)]  # noqa: E731
    rounds = _warm_up(lambda: (step(), sync()))
    start = time.perf_counter()
    benchmark.pedantic(lambda: (step(), sync()), rounds=rounds, iterations=1)
    wall = (time.perf_counter() - start) / rounds
    stats = getattr(benchmark, "stats", None)
    ms = (stats.stats.median * 1e3 if stats is not None else wall * 1e3) / steps_per_round
    pairs = f * f if base == "dense_global" else make_pairs(f, SHAPE["span"]).shape[0]
    RESULTS.append({"provider": provider, "pairs": pairs, "ms": ms, "peak_MiB": mem / 2**20, "rounds": rounds})
    _write(RESULTS)  # rewritten after every provider: a stage timeout keeps what was measured


def _warm_up(timed_call: Callable[[], object]) -> int:
    """Run ``timed_call`` untimed for WARMUP_S seconds (at least once); return the rounds to time it: enough for
    TIMED_S seconds at the warm-up's pace, between ROUNDS and MAX_ROUNDS."""
    if WARMUP_S <= 0:
        return ROUNDS
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < WARMUP_S:
        timed_call()
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    return max(ROUNDS, min(MAX_ROUNDS, int(TIMED_S / per_call)))


def _mode(provider: str) -> str:
    """The timing-mode suffix of a provider name ("" for a plain eager row)."""
    return next((mode for mode in MODES if mode and provider.endswith(mode)), "")


def _write(measured: List[Dict[str, object]]) -> None:
    """(Re)write the results table from the rows measured so far (copied: derived columns and analytic rows are
    added to the copies only)."""
    rows = [dict(row) for row in measured]
    bases = {mode: next((r for r in rows if r["provider"] == BASELINE + mode), None) for mode in MODES}
    for row in rows:
        base = bases[_mode(row["provider"])]
        if base is not None:
            row["time_ratio"] = row["ms"] / base["ms"]
            row["memory_ratio"] = row["peak_MiB"] / max(base["peak_MiB"], 1e-9)
        provider = row["provider"].removesuffix(_mode(row["provider"]))
        analytic = ANALYTIC.get("fused" if provider.startswith("fused_") else provider)
        if analytic is not None:
            row["analytic_MiB_this_shape"] = analytic(SHAPE, torch.finfo(DTYPE).bits // 8) / 2**20
    extra = []
    if MODE.startswith("cpu"):
        fused_here = fused_bytes(SHAPE, FP32) / 2**20
        rows.append({"provider": "fused (analytic, not run)", "pairs": rows[0]["pairs"] if rows else "",
                     "peak_MiB": fused_here, "analytic_MiB_this_shape": fused_here})
        for name, fn in ANALYTIC.items():
            extra.append(f"analytic at Wan2.1-1.3B shape (F=21, 30x52, D=128, bf16 q/k): {name} "
                         f"{fn(WAN, KEY_BYTES) / 2**20:.1f} MiB")
        ratio = dense_global_bytes(WAN, KEY_BYTES) / fused_bytes(WAN, KEY_BYTES)
        extra.append(f"analytic memory ratio dense_global / fused at Wan shape: {ratio:.0f}x (lower bound: the "
                     "dense figure is a lower bound, the fused figure exact)")
    columns = ["provider", "pairs", "ms", "rounds", "peak_MiB", "time_ratio", "memory_ratio",
               "analytic_MiB_this_shape"]
    notes = [
        f"mode: {MODE}; shape: B={SHAPE['batch']}, F={SHAPE['frames']}, frame={SHAPE['frame']}, D={SHAPE['dim']}, "
        f"{DTYPE}, span={SHAPE['span']}, window={SHAPE['window']}, tile={SHAPE['tile']}",
        "one step = forward + backward (dq, dk) of sum(flow * g); ms = median over "
        + (f"{ROUNDS} pytest-benchmark round(s)" if WARMUP_S <= 0 else
           f"pytest-benchmark rounds (column rounds: {TIMED_S:g} s of steps, {ROUNDS} to {MAX_ROUNDS}) after "
           f"{WARMUP_S:g} s of untimed steps"),
        "peak_MiB: " + ("torch.cuda.max_memory_allocated during one step minus memory allocated before it"
                        if DEVICE == "cuda" else
                        "peak live bytes of the CPU allocator during one step (torch.profiler memory events)"),
        f"time_ratio, memory_ratio: this provider / {BASELINE} in the same mode (eager, {BASELINE}{GRAPHED}, "
        f"{BASELINE}{BACK_TO_BACK})",
        "dense_global covers all F*F ordered pairs (DiTFlow); the others the span pairs (FastVMT)",
        f"*{BACK_TO_BACK}: ms per step of {BACK_TO_BACK_STEPS} eager steps queued back to back, one "
        "synchronisation at the end (the eager rows synchronise after every step)",
        f"*{GRAPHED}: the same step captured once in a CUDA graph and replayed (GPU time without the host's "
        "queueing; peak_MiB is the eager step's)",
        *extra,
    ]
    # The CPU reference figures are a deliverable, not a dry run (unless FASTVMT_BENCH_OUT says where they go).
    out_dir = RESULTS_DIR if MODE.startswith("cpu") and not os.environ.get(OUT_ENV) else None
    write_table(f"motion_flow_{MODE}", "Motion flow: fused kernel vs dense PyTorch AMF", rows, columns, notes,
                out_dir=out_dir)
