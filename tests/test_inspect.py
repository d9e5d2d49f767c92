"""Offline sm_90a inspection: every kernel configuration compiles with 0 spills and HGMMA where it multiplies."""
import json
import os
import subprocess
import sys

INSPECT_TIMEOUT_S = 600
LOCAL_ATTENTION_KERNELS = ("local_attention_fwd", "local_attention_dq", "local_attention_dkdv")
HEAD_DIMS = ("D64", "D128")


def test_inspect_check_passes_and_local_attention_uses_hgmma_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastvmt_kernels.inspect", "--check", "--json"],
        env=env, capture_output=True, text=True, timeout=INSPECT_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    local = [r for r in rows if r["kernel"].startswith("local_attention")]
    for kernel in LOCAL_ATTENTION_KERNELS:
        for d in HEAD_DIMS:
            assert any(r["kernel"].startswith(kernel + " ") and f" {d} " in r["kernel"] for r in local), (kernel, d)
    for row in local:
        assert row["spill_bytes"] == 0, row
        assert row["hgmma"] > 0, row
        assert row["registers"] <= 255, row
