"""Launch configurations follow the device's shared memory per block: Hopper (227 KiB) gets the measured fastest
ones, smaller devices the compact ones. Offline compiles (sm_90a and sm_80, no GPU needed) check that each
configuration fits the device it is chosen for, and that the Hopper ones would not fit an A100 (so the fallback is
needed); the interpreter checks the compact configurations compute the same results."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastvmt_kernels import TileLayout, local_attention
from fastvmt_kernels.device_limits import (
    HOPPER_SHARED_MEMORY_PER_BLOCK,
    has_hopper_shared_memory,
    shared_memory_per_block,
)
from fastvmt_kernels.local_attention import kernels as la_kernels
from fastvmt_kernels.local_attention import op as la_op
from fastvmt_kernels.motion_flow import kernels as mf_kernels
from fastvmt_kernels.motion_flow import op as mf_op

from _utils import REL_TOL, assert_rel_close

COMPILE_TIMEOUT_S = 600
A100_SHARED_MEMORY_PER_BLOCK = 163 * 1024  # opt-in maximum per block on sm_80


# Run in a subprocess without TRITON_INTERPRET (the interpreter replaces @triton.jit functions, which then cannot be
# compiled): shared bytes of the largest configurations, as chosen for Hopper (compiled for sm_90a) and as chosen for
# smaller devices (compiled for sm_80).
_OFFLINE_SCRIPT = """
import dataclasses, json
from fastvmt_kernels.inspect import HOPPER, compile_spec
from fastvmt_kernels.local_attention import kernels as la
from fastvmt_kernels.motion_flow import kernels as mf
AMPERE = ("cuda", 80, 32)

def spec(specs, name):
    found = [s for s in specs if s.name == name]
    assert found, (name, [s.name for s in specs])
    return found[0]

wide, compact = (la.kernel_configs(128, 2, hopper_shared_memory=h)["fwd"] for h in (True, False))
fwd = spec(la.inspect_specs(head_dims=(128,)), f"local_attention_fwd bf16 D128 tile3x10x4 M{wide.block_m} N{wide.block_n}")
fwd_compact = dataclasses.replace(fwd, constexprs=dict(fwd.constexprs, BLOCK_M=compact.block_m, BLOCK_N=compact.block_n),
                                  num_warps=compact.num_warps, num_stages=compact.num_stages)
group = mf.BWD_TILE_GROUP
bwd = spec(mf.inspect_specs(), f"motion_flow_fine_bwd bf16 d256 tile3x4 group{group[0]}x{group[1]}")
assert bwd.num_stages == mf.NUM_STAGES
bwd_compact = dataclasses.replace(bwd, num_stages=mf.COMPACT_NUM_STAGES)
print(json.dumps({
    "la_fwd_hopper": compile_spec(fwd, HOPPER)["shared_bytes"],
    "la_fwd_compact_sm80": compile_spec(fwd_compact, AMPERE)["shared_bytes"],
    "mf_bwd_hopper": compile_spec(bwd, HOPPER)["shared_bytes"],
    "mf_bwd_compact_sm80": compile_spec(bwd_compact, AMPERE)["shared_bytes"],
}))
"""


def test_cpu_tensors_report_hopper_limits():
    """CPU tensors (the interpreter) run the configurations an H100 runs."""
    cpu = torch.device("cpu")
    assert shared_memory_per_block(cpu) == HOPPER_SHARED_MEMORY_PER_BLOCK
    assert has_hopper_shared_memory(cpu)


@pytest.fixture(scope="module")
def offline_shared_bytes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=COMPILE_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_local_attention_forward_configs_fit_the_devices_they_are_chosen_for(offline_shared_bytes):
    """The D <= 128 forward's Hopper configuration (128 x 128 keys, 3 stages) fits an H100 but not an A100; the
    compact one fits an A100."""
    assert A100_SHARED_MEMORY_PER_BLOCK < offline_shared_bytes["la_fwd_hopper"] <= HOPPER_SHARED_MEMORY_PER_BLOCK
    assert offline_shared_bytes["la_fwd_compact_sm80"] <= A100_SHARED_MEMORY_PER_BLOCK


def test_motion_flow_stages_fit_the_devices_they_are_chosen_for(offline_shared_bytes):
    """The largest motion-flow configuration (backward, D = 256, default groups) at the Hopper stages fits an H100
    but not an A100; at the compact stages it fits an A100."""
    assert A100_SHARED_MEMORY_PER_BLOCK < offline_shared_bytes["mf_bwd_hopper"] <= HOPPER_SHARED_MEMORY_PER_BLOCK
    assert offline_shared_bytes["mf_bwd_compact_sm80"] <= A100_SHARED_MEMORY_PER_BLOCK


def test_launchers_pick_compact_configurations_without_hopper_shared_memory(monkeypatch):
    q = torch.zeros(1, 8, 2, 128, dtype=torch.bfloat16)
    layout = TileLayout.create((1, 2, 4), (1, 2, 4), (1, 1, 1))
    assert la_op._common(q, layout)[0]["fwd"] == la_kernels.WIDE_FWD_D128
    assert mf_op._num_stages(q.device) == mf_kernels.NUM_STAGES
    monkeypatch.setattr(la_op, "has_hopper_shared_memory", lambda device: False)
    monkeypatch.setattr(mf_op, "has_hopper_shared_memory", lambda device: False)
    assert la_op._common(q, layout)[0]["fwd"] == la_kernels.COMPACT_FWD_D128
    assert mf_op._num_stages(q.device) == mf_kernels.COMPACT_NUM_STAGES


@pytest.mark.parametrize("hopper", [True, False], ids=["hopper", "compact"])
def test_compact_and_wide_forward_blocks_agree(hopper, monkeypatch, device):
    """bf16 local attention with 256-token tiles (so 128 x 128 and 128 x 64 key blocks differ) gives the same
    output and lse either way, against the fp32 reference."""
    from fastvmt_kernels.local_attention.reference import local_attention_reference

    monkeypatch.setattr(la_op, "has_hopper_shared_memory", lambda device: hopper)
    grid, tile, window = (2, 16, 24), (1, 16, 16), (1, 1, 3)
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, 2 * 16 * 24, 2, 128, device=device).to(torch.bfloat16) for _ in range(3))
    out = local_attention(q, k, v, grid, tile, window, backend="triton")
    want, _ = local_attention_reference(q.float(), k.float(), v.float(), TileLayout.create(grid, tile, window))
    assert_rel_close(out.float(), want, 2e-2, "bf16 forward")
