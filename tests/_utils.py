"""Test helpers: numerical comparison (norm-based relative error plus NaN guards) and the processor tests' model runs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


def run_no_grad(model, kwargs):
    """``model(**kwargs)``'s output tensor, without autograd."""
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]


def stock_copy(model):
    """A new ``type(model)`` from ``model``'s config with its weights: the stock attention processors, eval mode."""
    stock = type(model).from_config(model.config).eval()
    stock.load_state_dict(model.state_dict())
    return stock


def local_rule_reference(model, kwargs, module, grid, tile, window, num_global, monkeypatch, global_position="suffix",
                         causal_frames=0):
    """``model``'s output with the joint local rule added to the bool mask of each self-attention call over the
    [video, global] sequence (``global_position="suffix"``, e.g. text) or the [global, video] one (``"prefix"``, e.g.
    Wan-Animate's reference frame) made through ``module.dispatch_attention_fn``: video queries x video keys get the
    local window of ``grid``, ``tile``, ``window``; the mask given ((B, 1, 1, N) or (B, 1, N, N), or none) holds
    elsewhere (``causal_frames``: the block-causal time rule). Calls of another length (a text-only refiner,
    cross-attention) run unchanged."""
    from fastvmt_kernels import local_attention_mask

    local = local_attention_mask(grid, tile, window, causal_frames=causal_frames)
    num_video = local.shape[0]
    total = num_video + num_global
    video = slice(0, num_video) if global_position == "suffix" else slice(num_global, total)
    dispatch = module.dispatch_attention_fn

    def masked_dispatch(query, key, value, attn_mask=None, **kw):
        if query.shape[1] != total or key.shape[1] != total:
            return dispatch(query, key, value, attn_mask=attn_mask, **kw)
        if attn_mask is None:
            mask = torch.ones(query.shape[0], 1, total, total, dtype=torch.bool, device=query.device)
        else:
            mask = attn_mask.expand(-1, 1, total, -1).clone()
        mask[:, :, video, video] &= local
        out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (query, key, value)), attn_mask=mask)
        return out.transpose(1, 2)

    with monkeypatch.context() as patch:
        patch.setattr(module, "dispatch_attention_fn", masked_dispatch)
        return run_no_grad(model, kwargs)
