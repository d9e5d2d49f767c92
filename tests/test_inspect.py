"""Offline sm_90a inspection: every kernel configuration compiles with HGMMA where it multiplies and no spill stores
in its hot loop; the local-attention forward (every D) and all three kernels at D = 64 spill nothing at all."""
import json
import os
import subprocess
import sys

INSPECT_TIMEOUT_S = 600
LOCAL_ATTENTION_KERNELS = ("local_attention_fwd", "local_attention_dq", "local_attention_dkdv")
HEAD_DIMS = ("D64", "D128", "D256")


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
        if row["kernel"].startswith("local_attention_fwd ") or " D64 " in row["kernel"]:
            assert row["spill_bytes"] == 0, row
        assert row["hgmma"] > 0, row
        assert row["registers"] <= 255, row
    for row in rows:
        assert row["loop_spill_stores"] == 0, row
    for row in rows:  # every multiplying kernel has a hot loop; the counter finds it and sees a plausible size
        if row["expects_mma"]:
            assert 50 < row["loop_instructions"] < 5000, row


def test_hot_loop_counter_on_synthetic_sass():
    """Innermost loop with the most HGMMA, by backward branches: the outer loop and an MMA-free loop are skipped."""
    from fastvmt_kernels.inspect import hot_loop

    lines = [
        "/*0000*/ MOV R1, c[0x0][0x28] ;",
        "/*0010*/ IADD3 R2, R2, 0x1, RZ ;",  # outer loop [0x10, 0x90]
        "/*0020*/ HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ ;",  # inner loop [0x20, 0x50], 4 instructions
        "/*0030*/ FMUL R3, R3, R4 ;",
        "/*0040*/ ISETP.GE.AND P0, PT, R2, R5, PT ;",
        "/*0050*/ @!P0 BRA 0x20 ;",
        "/*0060*/ FADD R6, R6, R7 ;",  # MMA-free loop [0x60, 0x70]
        "/*0070*/ @!P1 BRA 0x60 ;",
        "/*0080*/ ISETP.GE.AND P2, PT, R2, R8, PT ;",
        "/*0090*/ @!P2 BRA 0x10 ;",
        "/*00a0*/ EXIT ;",
    ]
    assert len(hot_loop("\n".join(lines))) == 4
    assert hot_loop("/*0000*/ EXIT ;") == []
    # The same loop found by Ampere / Ada's mma.sync and Blackwell's tcgen05 (no suffix after the opcode).
    for opcode in ("HMMA.16816.F32.BF16 R24, R4, R8, R24", "UTCHMMA gdesc[UR4], gdesc[UR6], tmem[UR8], UPT"):
        other = [line.replace("HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ", opcode) for line in lines]
        assert len(hot_loop("\n".join(other))) == 4, opcode


def test_mma_opcode_per_architecture():
    import re

    from fastvmt_kernels.inspect import mma_opcode

    assert re.fullmatch(mma_opcode(90), "HGMMA")
    assert re.fullmatch(mma_opcode(100), "UTCHMMA") and re.fullmatch(mma_opcode(100), "UTCQMMA")
    assert re.fullmatch(mma_opcode(89), "HMMA") and re.fullmatch(mma_opcode(80), "HMMA")


def test_spill_instructions_counts_stores_and_reloads():
    from fastvmt_kernels.inspect import spill_instructions

    body = ["STL [R1+0x4], R205", "@!P0 LDL R3, [R1+0x8]", "LDL.64 R4, [R1+0x10]", "LDS R2, [R3]", "STS [R4], R5"]
    assert spill_instructions(body, "STL") == 1
    assert spill_instructions(body, "LDL") == 2
