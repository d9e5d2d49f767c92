"""Host-side cost of one fused motion-flow step (pytest file).

One step = ``motion_flow(q, k, ...)`` + ``torch.autograd.grad`` (the custom ops, validation, pair tables, buffers,
autograd). Two rows:

- ``stubbed``: the three Triton launches replaced by no-ops, so the figure is the time the host needs to queue a
  step without them;
- ``launched`` (CUDA only): the real kernels, each launch call timed on the host (``launch_ms_per_step``: the time
  inside ``kernel[grid](...)``, i.e. Triton's argument binding, cache lookup and the driver call, not the kernel's
  run). At these small shapes the kernels take microseconds, so ``host_ms_per_step`` is what queueing costs; a
  step whose host time exceeds its kernel time is host-bound (benchmarks/results/gpu_runs.md, run 5: an eager
  2.1 ms step holding 0.6 ms of kernels).

Shapes are small (B = 1, F = 21 frames -> 78 pairs at span 4, 6 x 8 tokens, D = 16) so that on CPU the torch ops'
own arithmetic is negligible next to their dispatch cost; on CUDA (FASTVMT_BENCH_DRY unset) the same shapes run
on the GPU. -> results/motion_flow_host_<cpu|gpu> (a dry run writes to $FASTVMT_BENCH_OUT or a temp dir; it also
runs the launched row through the interpreter, to exercise the timing path, and reports it as not meaningful).
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


class _TimedLaunch:
    """Wraps a ``@triton.jit`` kernel: ``kernel[grid](...)`` launches it and adds the call's host seconds to
    ``seconds``."""

    def __init__(self, kernel):
        self.kernel, self.seconds = kernel, 0.0

    def __getitem__(self, grid):
        launcher = self.kernel[grid]

        def launch(*args, **kwargs):
            start = time.perf_counter()
            launcher(*args, **kwargs)
            self.seconds += time.perf_counter() - start

        return launch


def host_ms_per_step(steps: int, timed=(), warmup: int = WARMUP, repeats: int = REPEATS) -> tuple:
    """(median over ``repeats`` of the mean host ms per step, mean ms per step spent inside the ``timed``
    launches)."""
    q, k = (torch.randn(1, FRAMES, FRAME[0] * FRAME[1], DIM, device=DEVICE).requires_grad_() for _ in range(2))
    kwargs = dict(tile=TILE, window=WINDOW, span=SPAN, backend="triton")
    grad = torch.randn(1, make_pairs(FRAMES, SPAN).shape[0], FRAME[0] * FRAME[1], 2, device=DEVICE)

    def step():
        flow, _ = motion_flow(q, k, FRAME, **kwargs)
        return torch.autograd.grad(flow, (q, k), grad)

    for _ in range(warmup):
        step()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    for t in timed:
        t.seconds = 0.0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) / steps * 1e3)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    launch_ms = sum(t.seconds for t in timed) / (repeats * steps) * 1e3
    return sorted(times)[len(times) // 2], launch_ms


def test_host_time_per_step(monkeypatch):
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton path on CPU tensors needs TRITON_INTERPRET=1")
    steps = 10 if DRY else STEPS
    # A deliverable on CPU too (dry runs go to a temp dir); only this table, the environment is left alone.
    out_dir = RESULTS_DIR if not DRY and not os.environ.get(OUT_ENV) else None
    notes = [
        f"one step = motion_flow + autograd.grad; stubbed: the Triton launches ({', '.join(LAUNCHED_KERNELS)}) as "
        "no-ops; launched: the real kernels, launch_ms_per_step = host time inside their launch calls"
        + (" (dry run: interpreter launches, not meaningful)" if DRY else ""),
        f"B=1, F={FRAMES} ({make_pairs(FRAMES, SPAN).shape[0]} pairs), frame {FRAME}, D={DIM}, tile {TILE}, "
        f"window {WINDOW}, span {SPAN}; {DEVICE} tensors, 1 intra-op thread; median of {REPEATS} means over "
        f"{steps} steps after {WARMUP} warm-up steps",
    ]
    mode = "dry" if DRY else ("gpu" if DEVICE == "cuda" else "cpu")
    rows = []

    def write() -> None:  # after every row: a stage timeout keeps what was measured
        write_table(f"motion_flow_host_{mode}", "Motion flow: host time per fused step",
                    rows, ["device", "launches", "host_ms_per_step", "launch_ms_per_step"], notes, out_dir=out_dir)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with monkeypatch.context() as patch:  # stubbed first: it needs no kernel compilation
            for name in LAUNCHED_KERNELS:
                patch.setattr(flow_op, name, _NoLaunch())
            ms, _ = host_ms_per_step(steps)
        rows.append({"device": DEVICE, "launches": "stubbed", "host_ms_per_step": ms, "launch_ms_per_step": 0.0})
        write()
        if DEVICE == "cuda" or DRY:  # real launches, each timed (the interpreter's only exercise the path)
            with monkeypatch.context() as patch:
                timed = [_TimedLaunch(getattr(flow_op, name)) for name in LAUNCHED_KERNELS]
                for name, wrapper in zip(LAUNCHED_KERNELS, timed):
                    patch.setattr(flow_op, name, wrapper)
                ms, launch_ms = host_ms_per_step(steps, timed) if not DRY else host_ms_per_step(1, timed, 1, 1)
            rows.append({"device": DEVICE, "launches": "launched", "host_ms_per_step": ms,
                         "launch_ms_per_step": launch_ms})
            write()
    finally:
        torch.set_num_threads(threads)
    assert all(row["host_ms_per_step"] > 0 for row in rows)
    if DEVICE == "cuda":
        assert 0 < rows[1]["launch_ms_per_step"] < rows[1]["host_ms_per_step"]
