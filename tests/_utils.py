"""Numerical comparison helpers for kernel tests (norm-based relative error plus NaN guards)."""
from __future__ import annotations

import torch

# Relative RMS error allowed per dtype when a kernel is compared with an fp32 reference.
REL_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
POISON = float("nan")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_2 / max(||expected||_2, tiny), computed in float64."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "tensor") -> None:
    """Assert same shape, all finite, and relative L2 error <= tol; the message carries both numbers."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (poisoned output not overwritten?)"
    err = rel_err(actual, expected)
    max_abs = (actual.double().cpu() - expected.double().cpu()).abs().max().item()
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} (max abs diff {max_abs:.3e})"


def assert_covering_window_is_stock(model, run, kwargs, tile, covering_window=(9, 9, 9)):
    """``fastvmt.apply_local_attention`` with a window covering the whole grid reproduces the stock ``model`` (to fp32
    rounding), and ``set_attn_processor`` with the processors it returns restores the stock path exactly.
    ``run(model, kwargs)`` returns the model output."""
    from fastvmt import apply_local_attention

    stock_out = run(model, kwargs)
    previous = apply_local_attention(model, tile=tile, window=covering_window)
    assert_rel_close(run(model, kwargs), stock_out, 1e-5, "covering window vs stock")
    model.set_attn_processor(previous)
    assert torch.equal(run(model, kwargs), stock_out)
