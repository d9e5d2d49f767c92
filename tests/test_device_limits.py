"""Launch configurations follow the device's shared memory per block: Hopper (227 KiB) gets the measured fastest
ones, smaller devices compact ones. Offline compiles (no GPU needed) check that every configuration fits the device it
is chosen for -- Hopper's for sm_90a and sm_100a (B200), the smallest limit we support (99 KiB: Ada, consumer
Ampere) for sm_89, A100's 163 KiB for sm_80 -- with no spill stores in a hot loop, and that the larger ones would not
fit the smaller devices (so the fallbacks are needed); the interpreter checks that the forward's
two block shapes compute the same attention."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastvmt_kernels import TileLayout, local_attention
from fastvmt_kernels.device_limits import (
    A100_SHARED_MEMORY_PER_BLOCK,
    ADA_SHARED_MEMORY_PER_BLOCK,
    HOPPER_SHARED_MEMORY_PER_BLOCK,
    has_hopper_shared_memory,
    shared_memory_per_block,
)
from fastvmt_kernels.local_attention import kernels as la_kernels
from fastvmt_kernels.local_attention import op as la_op
from fastvmt_kernels.motion_flow import kernels as mf_kernels
from fastvmt_kernels.motion_flow import op as mf_op

from _utils import assert_rel_close

COMPILE_TIMEOUT_S = 900

# Run in a subprocess without TRITON_INTERPRET (the interpreter replaces @triton.jit functions, which then cannot be
# compiled). Prints {group: {spec name: shared bytes}} and, per smaller device, {spec name: [problems]} (inspect's
# rule: no spill stores in a hot loop, tensor-core instructions where a kernel multiplies).
_OFFLINE_SCRIPT = """
import json
from fastvmt_kernels.inspect import HOPPER, TARGETS, collect_specs, compile_spec, problems
from fastvmt_kernels.local_attention import kernels as la
from fastvmt_kernels.motion_flow import kernels as mf

def shared(spec, target):
    return compile_spec(spec, target)["shared_bytes"]

def named(specs, prefix):
    found = [s for s in specs if s.name.startswith(prefix)]
    assert len(found) == 1, (prefix, [s.name for s in specs])
    return found[0]

hopper_la = la.inspect_specs()
group = mf.BWD_TILE_GROUP
mf_bwd_256 = named(mf.inspect_specs(), f"motion_flow_fine_bwd bf16 d256 tile3x4 group{group[0]}x{group[1]}")
assert mf_bwd_256.num_stages == mf.NUM_STAGES
report = {
    "hopper_configs_on_sm90": {
        "la_fwd_d128": shared(named(hopper_la, "local_attention_fwd bf16 D128"), HOPPER),
        "mf_bwd_d256": shared(mf_bwd_256, HOPPER),
    },
    "hopper_configs_on_sm89": {
        "la_dkdv_d256": shared(named(hopper_la, "local_attention_dkdv bf16 D256"), TARGETS["sm_89"][0]),
    },
}
for name in ("sm_100a", "sm_89", "sm_80"):
    target, shared_memory = TARGETS[name]
    rows = [compile_spec(spec, target) for spec in collect_specs(shared_memory)]
    report[name] = {row["kernel"]: {"shared_bytes": row["shared_bytes"], "problems": problems(row)} for row in rows}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def offline_shared_bytes():
    if os.environ.get("FASTVMT_GPU_TESTS") == "1":
        # ~40 offline compiles (a minute) that no GPU changes: the CPU CI runs them; the GPU suite's test stage,
        # which compiles its kernels in parallel workers against a time limit, leaves them out.
        pytest.skip("offline compiles for sm_90a / sm_100a / sm_89 / sm_80 run in CPU CI, not in the GPU suite")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=COMPILE_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cpu_tensors_report_hopper_limits():
    """CPU tensors (the interpreter) run the configurations an H100 runs."""
    cpu = torch.device("cpu")
    assert shared_memory_per_block(cpu) == HOPPER_SHARED_MEMORY_PER_BLOCK
    assert has_hopper_shared_memory(cpu)


def test_hopper_configurations_fit_hopper_and_need_it(offline_shared_bytes):
    """The local-attention D <= 128 forward (128 x 128 keys, 3 stages) and the motion-flow D = 256 backward (3
    stages) fit an H100's block but not an A100's; the D > 128 dk/dv kernel's default does not fit Ada's."""
    on_hopper = offline_shared_bytes["hopper_configs_on_sm90"]
    for name, used in on_hopper.items():
        assert A100_SHARED_MEMORY_PER_BLOCK < used <= HOPPER_SHARED_MEMORY_PER_BLOCK, (name, used)
    assert offline_shared_bytes["hopper_configs_on_sm89"]["la_dkdv_d256"] > ADA_SHARED_MEMORY_PER_BLOCK


@pytest.mark.parametrize("target, shared_memory", [("sm_100a", HOPPER_SHARED_MEMORY_PER_BLOCK),
                                                   ("sm_89", ADA_SHARED_MEMORY_PER_BLOCK),
                                                   ("sm_80", A100_SHARED_MEMORY_PER_BLOCK)])
def test_every_configuration_chosen_for_another_device_fits_it_without_hot_loop_spill_stores(
    offline_shared_bytes, target, shared_memory
):
    """Every local-attention kernel (D = 64, 128, 256), motion-flow kernel and the AdamW kernel, in the configuration
    chosen for a device with ``shared_memory`` per block (B200: Hopper's 227 KiB; 99 KiB: Ada, consumer Ampere;
    163 KiB: A100), compiled for it, fits and stores no spills in its hot loop (the Hopper configurations'
    motion-flow backward stored 9-10 per step on sm_80 / sm_89, the local-attention D = 128 dk/dv 3 on sm_89) and
    multiplies on the tensor cores (tcgen05, HMMA)."""
    rows = offline_shared_bytes[target]
    assert len(rows) >= 9 + 6, sorted(rows)
    too_big = {name: row["shared_bytes"] for name, row in rows.items() if row["shared_bytes"] > shared_memory}
    assert not too_big, too_big
    failing = {name: row["problems"] for name, row in rows.items() if row["problems"]}
    assert not failing, failing


def test_launchers_pick_configurations_by_the_device_shared_memory(monkeypatch):
    q = torch.zeros(1, 8, 2, 128, dtype=torch.bfloat16)
    layout = TileLayout.create((1, 2, 4), (1, 2, 4), (1, 1, 1))
    assert la_op._common(q, layout)[0]["fwd"] == la_kernels.WIDE_FWD_D128
    assert la_kernels.kernel_configs(256, 2)["dkdv"] == la_kernels.DKDV_D256
    assert mf_op._num_stages(q.device) == mf_kernels.NUM_STAGES
    monkeypatch.setattr(la_op, "shared_memory_per_block", lambda device: ADA_SHARED_MEMORY_PER_BLOCK)
    monkeypatch.setattr(mf_op, "has_hopper_shared_memory", lambda device: False)
    assert la_op._common(q, layout)[0]["fwd"] == la_kernels.COMPACT_FWD_D128
    assert la_op._common(torch.zeros(1, 8, 2, 256, dtype=torch.bfloat16), layout)[0]["dkdv"] == (
        la_kernels.SMALL_DKDV_D256
    )
    assert mf_op._num_stages(q.device) == mf_kernels.COMPACT_NUM_STAGES
    assert la_op._common(q, layout)[0]["dkdv"] == la_kernels.COMPACT_DKDV_D128


class _LaunchRecorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` records the launch keywords, runs nothing."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(kwargs)


@pytest.mark.parametrize("hopper", [True, False], ids=["hopper", "smaller"])
@pytest.mark.parametrize("dim", [128, 256])
def test_motion_flow_backward_launches_the_device_configuration(monkeypatch, hopper, dim):
    """Wan's 3 x 4 tiles in 2 x 2 groups (64 query slots, query-major): Hopper runs the backward at 4 warps (8 above
    D = 128) with 64 keys per step; other GPUs at 8 warps, with 32 keys above D = 128 (the offline check above).
    Keys-major 2 x 1 groups take 8 warps there too."""
    from fastvmt_kernels.motion_flow.geometry import FlowGeometry, pair_table

    recorder = _LaunchRecorder()
    monkeypatch.setattr(mf_op, "_fine_bwd_kernel", recorder)
    monkeypatch.setattr(mf_op, "has_hopper_shared_memory", lambda device: hopper)
    monkeypatch.setattr(mf_op, "BWD_TILE_GROUP", (2, 2))
    geo = FlowGeometry.create((30, 52), (3, 4), (21, 21))
    b, f, seq, span = 1, 3, 30 * 52, 2
    table = pair_table(f, span)
    pairs = table.pairs.shape[0]
    q = torch.randn(b, f, seq, dim, dtype=torch.bfloat16)
    flow, lse = torch.randn(b, pairs, seq, 2), torch.randn(b, pairs, seq)
    windows = torch.zeros(b, pairs, geo.num_tiles, 2, dtype=torch.int64)
    mf_op.launch_fine_backward(torch.randn(b, pairs, seq, 2), q, q, table, windows, flow, lse, geo, 1.0,
                               torch.empty_like(q), torch.zeros(q.shape))
    (launch,) = recorder.launches
    assert launch["BLOCK_Q"] == 64 and launch["QUERY_MAJOR"]
    if hopper:
        assert (launch["num_warps"], launch["BLOCK_N"]) == (4 if dim == 128 else 8, 64)
        assert launch["num_stages"] == mf_kernels.NUM_STAGES
    else:
        assert (launch["num_warps"], launch["BLOCK_N"]) == (8, 64 if dim == 128 else 32)
        assert launch["num_stages"] == mf_kernels.COMPACT_NUM_STAGES
    assert mf_kernels.fine_launch(32, dim, True, hopper) == (4 if hopper and dim == 128 else 8, False)


@pytest.mark.parametrize("shared_memory", [HOPPER_SHARED_MEMORY_PER_BLOCK, ADA_SHARED_MEMORY_PER_BLOCK],
                         ids=["hopper", "ada"])
def test_forward_block_shapes_of_each_device_match_the_reference(shared_memory, monkeypatch, device):
    """bf16 local attention with 256-token tiles (so the 128 x 128 and 128 x 64 key blocks differ) against the fp32
    reference, in the configurations each device gets."""
    from fastvmt_kernels.local_attention.reference import local_attention_reference

    monkeypatch.setattr(la_op, "shared_memory_per_block", lambda device: shared_memory)
    grid, tile, window = (2, 16, 24), (1, 16, 16), (1, 1, 3)
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, 2 * 16 * 24, 2, 128, device=device).to(torch.bfloat16) for _ in range(3))
    out = local_attention(q, k, v, grid, tile, window, backend="triton")
    want, _ = local_attention_reference(q.float(), k.float(), v.float(), TileLayout.create(grid, tile, window))
    assert_rel_close(out.float(), want, 2e-2, "bf16 forward")
