"""Device-side integer helpers shared by the Triton kernels.

A runtime integer division compiles to ~20 SASS instructions per element on sm_90 (no hardware divider); in the
inner loops of the gathering kernels it was a large share of all instructions. :func:`small_divmod` replaces it
with an exact fp32-reciprocal form for the small index ranges those loops use.
"""
from __future__ import annotations

import triton
import triton.language as tl

# small_divmod is exact for 0 <= n < SMALL_DIVMOD_MAX_N and 0 < d <= SMALL_DIVMOD_MAX_D (see its docstring); the
# launchers check that their index ranges fit.
SMALL_DIVMOD_MAX_N = 1 << 18
SMALL_DIVMOD_MAX_D = 1 << 10


@triton.jit
def small_divmod(n, d, inv_d):
    """(n // d, n % d) for integers 0 <= n < 2**18 and 0 < d <= 2**10, given ``inv_d = 1 / d`` in fp32.

    Exact: (n + 0.5) / d lies at least 0.5 / d away from an integer, while (n + 0.5) * inv_d is off by at most
    (n + 0.5) / d * (k * 2**-23 + 2**-24) for an inv_d k ulps off (the GPU's fast fp32 division: k <= 2); that is
    below 0.5 / d for n < 2**18 up to k = 15 (checked exhaustively at the worst points, n % d in {0, d - 1}, for
    every d <= 1024 and k <= 8; tests/test_index_math.py repeats it on a sample through the kernel).
    Costs 4 instructions per element instead of ~20. n, d: int32 tensors or scalars (broadcast); returns int32.
    """
    q = ((n.to(tl.float32) + 0.5) * inv_d).to(tl.int32)
    return q, n - q * d
