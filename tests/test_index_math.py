"""small_divmod (fastvmt_kernels.index_math) through a Triton kernel: exact at the hardest points of its range."""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from fastvmt_kernels.index_math import SMALL_DIVMOD_MAX_D, SMALL_DIVMOD_MAX_N, small_divmod

BLOCK = 1024


@triton.jit
def _divmod_kernel(n_ptr, d_ptr, inv_ptr, q_ptr, r_ptr, size, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < size
    n = tl.load(n_ptr + offs, mask=ok, other=0)
    d = tl.load(d_ptr + offs, mask=ok, other=1)
    q, r = small_divmod(n, d, tl.load(inv_ptr + offs, mask=ok, other=1.0))
    tl.store(q_ptr + offs, q, mask=ok)
    tl.store(r_ptr + offs, r, mask=ok)


def _hard_cases(seed: int = 0):
    """n = q*d and q*d + d - 1 (fractional part of (n + 0.5) / d closest to an integer), largest q first."""
    rng = np.random.default_rng(seed)
    ds = np.concatenate([np.arange(1, 65), rng.integers(65, SMALL_DIVMOD_MAX_D + 1, 200), [SMALL_DIVMOD_MAX_D]])
    ns, dd = [], []
    for d in ds:
        top = (SMALL_DIVMOD_MAX_N - 1) // d
        qs = np.unique(np.concatenate([np.arange(max(0, top - 40), top + 1), rng.integers(0, top + 1, 40)]))
        for r in (0, d - 1):
            n = qs * d + r
            n = n[n < SMALL_DIVMOD_MAX_N]
            ns.append(n)
            dd.append(np.full_like(n, d))
    return np.concatenate(ns).astype(np.int32), np.concatenate(dd).astype(np.int32)


@triton.jit
def _divmod_own_reciprocal_kernel(n_ptr, d_ptr, q_ptr, r_ptr, size, BLOCK: tl.constexpr):
    """As the kernels use it: the reciprocal computed on the device by fp32 division."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < size
    n = tl.load(n_ptr + offs, mask=ok, other=0)
    d = tl.load(d_ptr + offs, mask=ok, other=1)
    q, r = small_divmod(n, d, 1.0 / d.to(tl.float32))
    tl.store(q_ptr + offs, q, mask=ok)
    tl.store(r_ptr + offs, r, mask=ok)


def test_small_divmod_with_device_reciprocal(device):
    n, d = _hard_cases(seed=1)
    q = torch.full((n.size,), -7, dtype=torch.int32, device=device)  # poisoned outputs
    r = torch.full_like(q, -7)
    args = [torch.from_numpy(a).to(device) for a in (n, d)]
    _divmod_own_reciprocal_kernel[(triton.cdiv(n.size, BLOCK),)](*args, q, r, n.size, BLOCK=BLOCK)
    assert np.array_equal(q.cpu().numpy(), n // d)
    assert np.array_equal(r.cpu().numpy(), n % d)


@pytest.mark.parametrize("inv_ulps", [0, -2, 2])
def test_small_divmod_exact_at_hard_points(device, inv_ulps):
    """inv_d is perturbed by up to 2 ulps, the error of the GPU's fast fp32 division."""
    n, d = _hard_cases()
    inv = np.float32(1.0) / d.astype(np.float32)
    for _ in range(abs(inv_ulps)):
        inv = np.nextafter(inv, np.float32(np.inf if inv_ulps > 0 else -np.inf), dtype=np.float32)
    args = [torch.from_numpy(a).to(device) for a in (n, d, inv)]
    q = torch.full((n.size,), -7, dtype=torch.int32, device=device)  # poisoned outputs
    r = torch.full_like(q, -7)
    _divmod_kernel[(triton.cdiv(n.size, BLOCK),)](*args, q, r, n.size, BLOCK=BLOCK)
    assert np.array_equal(q.cpu().numpy(), n // d)
    assert np.array_equal(r.cpu().numpy(), n % d)
