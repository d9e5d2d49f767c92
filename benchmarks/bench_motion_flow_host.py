"""Host-side cost of one fused motion-flow step: everything but the Triton kernels (pytest file).

One step = ``motion_flow(q, k, ...)`` + ``torch.autograd.grad`` (the custom ops, validation, pair tables, buffers,
autograd) with the three Triton launches replaced by no-ops, so the figure is the time the host needs to queue a
step. On a GPU this time overlaps the kernels only while the host stays ahead of them; a step whose host time
exceeds its kernel time is host-bound (benchmarks/results/gpu_runs.md: a 2.9 ms step holding 1.8 ms of kernels).

Shapes are small (B = 1, F = 21 frames -> 78 pairs at span 4, 6 x 8 tokens, D = 16) so that on CPU the torch ops'
own arithmetic is negligible next to their dispatch cost; on CUDA (FASTVMT_BENCH_DRY unset) the same shapes run
on the GPU. -> results/motion_flow_host_<cpu|gpu> (a dry run writes to $FASTVMT_BENCH_OUT or a temp dir).
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from _results import DRY_ENV, OUT_ENV, RESULTS_DIR, write_table
from fastvmt_kernels import motion_flow
from fastvmt_kernels.motion_flow import make_pairs
from fastvmt_kernels.motion_flow import op as flow_op

LAUNCHED_KERNELS = ("_coarse_kernel", "_fine_fwd_kernel", "_fine_bwd_kernel")
FRAMES, FRAME, DIM, SPAN, TILE, WINDOW = 21, (6, 8), 16, 4, (3, 4), 3
WARMUP, STEPS, REPEATS = 10, 200, 5
DRY = os.environ.get(DRY_ENV) == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not DRY else "cpu"


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def host_ms_per_step(steps: int) -> float:
    """Median over REPEATS of the mean host milliseconds per step (kernel launches are no-ops)."""
    q, k = (torch.randn(1, FRAMES, FRAME[0] * FRAME[1], DIM, device=DEVICE).requires_grad_() for _ in range(2))
    kwargs = dict(tile=TILE, window=WINDOW, span=SPAN, backend="triton")
    grad = torch.randn(1, make_pairs(FRAMES, SPAN).shape[0], FRAME[0] * FRAME[1], 2, device=DEVICE)

    def step():
        flow, _ = motion_flow(q, k, FRAME, **kwargs)
        return torch.autograd.grad(flow, (q, k), grad)

    for _ in range(WARMUP):
        step()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) / steps * 1e3)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def test_host_time_per_step(monkeypatch):
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton path on CPU tensors needs TRITON_INTERPRET=1")
    for name in LAUNCHED_KERNELS:
        monkeypatch.setattr(flow_op, name, _NoLaunch())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ms = host_ms_per_step(10 if DRY else STEPS)
    finally:
        torch.set_num_threads(threads)
    if not DRY and not os.environ.get(OUT_ENV):
        os.environ[OUT_ENV] = str(RESULTS_DIR)  # a deliverable on CPU too (dry runs go to a temp dir)
    notes = [
        f"one step = motion_flow + autograd.grad with the Triton launches ({', '.join(LAUNCHED_KERNELS)}) as no-ops",
        f"B=1, F={FRAMES} ({make_pairs(FRAMES, SPAN).shape[0]} pairs), frame {FRAME}, D={DIM}, tile {TILE}, "
        f"window {WINDOW}, span {SPAN}; {DEVICE} tensors, 1 intra-op thread; median of {REPEATS} means over "
        f"{10 if DRY else STEPS} steps after {WARMUP} warm-up steps",
    ]
    mode = "dry" if DRY else ("gpu" if DEVICE == "cuda" else "cpu")
    write_table(f"motion_flow_host_{mode}", "Motion flow: host time per fused step (no kernel launches)",
                [{"device": DEVICE, "host_ms_per_step": ms}], ["device", "host_ms_per_step"], notes)
    assert ms > 0
