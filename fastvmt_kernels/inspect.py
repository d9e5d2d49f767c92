"""Compile every Triton kernel configuration for Hopper (sm_90a), or another GPU, on any machine and report resources.

Run ``python -m fastvmt_kernels.inspect`` (no GPU needed). For each kernel configuration that the GPU
path launches, it compiles with the ``tt.divisibility`` hints the GPU JIT adds for 16-byte-aligned
pointers and strides, then reads the cubin with the ``cuobjdump`` shipped in triton's wheel and prints:
registers, spill bytes (the stack frame ptxas spills registers to, plus any local memory), shared memory, the HGMMA
(wgmma) instruction count in SASS, the SASS instructions of one iteration of the hot loop (the innermost loop with
the most tensor-core instructions; per thread, the issue cost of one inner step, a proxy for the gathering kernels'
integer overhead) and the spill reloads / stores inside that loop. ``--check`` exits non-zero when a hot loop stores
spills or a kernel that multiplies has no HGMMA. ``--target sm_100a`` / ``sm_89`` / ``sm_80`` compile for B200 / Ada /
A100 instead, in the configurations the launchers choose there (their shared memory per block), counting their
tensor-core instructions (tcgen05, mma.sync).

Kernel modules register their configurations through an ``inspect_specs(shared_memory=...)`` function returning a list
of :class:`KernelSpec`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from .device_limits import A100_SHARED_MEMORY_PER_BLOCK, ADA_SHARED_MEMORY_PER_BLOCK, HOPPER_SHARED_MEMORY_PER_BLOCK

# Modules that define Triton kernels; each exposes ``inspect_specs(shared_memory=...) -> list[KernelSpec]``.
KERNEL_MODULES = (
    "fastvmt_kernels.local_attention.kernels",
    "fastvmt_kernels.motion_flow.kernels",
    "fastvmt_kernels.adamw",
)
HOPPER = ("cuda", 90, 32)
DIVISIBILITY = 16
# --target: name -> (compile target, shared memory per block the kernels' launchers see on such a device). Hopper's
# sm_90a is the default; sm_100a (B200, whose 227 KiB per block give it Hopper's configurations), sm_89 (Ada, 99 KiB:
# also what consumer Ampere gets) and sm_80 (A100, 163 KiB) report the configurations those GPUs run, with their
# tensor-core instructions (MMA_OPCODES) in place of wgmma's HGMMA.
TARGETS = {
    "sm_90a": (HOPPER, HOPPER_SHARED_MEMORY_PER_BLOCK),
    "sm_100a": (("cuda", 100, 32), HOPPER_SHARED_MEMORY_PER_BLOCK),
    "sm_89": (("cuda", 89, 32), ADA_SHARED_MEMORY_PER_BLOCK),
    "sm_80": (("cuda", 80, 32), A100_SHARED_MEMORY_PER_BLOCK),
}


@dataclass
class KernelSpec:
    """One compile configuration of one kernel.

    Attributes:
        name: label printed in the report (kernel and configuration).
        fn: the ``@triton.jit`` function.
        signature: argument name -> triton type ("*bf16", "i32", "fp32", "constexpr", ...), every argument.
        constexprs: constexpr argument name -> value.
        divisible: names of pointer / integer arguments the GPU JIT would mark divisible by 16.
        num_warps, num_stages: launch options, as the GPU path uses them.
        expects_mma: the kernel multiplies tiles with tl.dot, so HGMMA must appear in SASS.
    """

    name: str
    fn: Any
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    divisible: List[str] = field(default_factory=list)
    num_warps: int = 4
    num_stages: int = 3
    expects_mma: bool = True


def _nvidia_bin() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH_TARGET = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


# Tensor-core SASS per architecture (regex): wgmma on Hopper, tcgen05 (UTCHMMA, UTCQMMA, ...) on datacenter
# Blackwell, mma.sync on Ampere / Ada; and the report's column name for each.
MMA_OPCODES = {90: "HGMMA", 100: "UTC[A-Z]*MMA"}
PRE_HOPPER_MMA = "HMMA"
MMA_COLUMNS = {90: "HGMMA", 100: "tcgen05"}
_MMA = re.compile(rf"\b(?:{'|'.join([*MMA_OPCODES.values(), PRE_HOPPER_MMA])})\b")


def mma_opcode(capability: int) -> str:
    """The SASS tensor-core instruction (a regex) that a kernel compiled for ``capability`` (e.g. 90) multiplies
    with."""
    return MMA_OPCODES.get(capability, PRE_HOPPER_MMA)


def hot_loop(sass: str) -> List[str]:
    """The instructions of one iteration of the innermost SASS loop holding the most tensor-core instructions
    (HGMMA on Hopper, tcgen05 on Blackwell, HMMA before Hopper; [] if no loop).

    Loops are found as backward branches ``BRA`` from address a to an earlier target t: the body is [t, a].
    """
    ins = [(int(a, 16), text.strip()) for a, text in _SASS_LINE.findall(sass)]
    loops = []
    for addr, text in ins:
        m = _BRANCH_TARGET.search(text)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    innermost = [(lo, hi) for lo, hi in loops if not any(lo <= a < b <= hi and (a, b) != (lo, hi) for a, b in loops)]
    best: Tuple[int, List[str]] = (-1, [])
    for lo, hi in innermost:
        body = [text for a, text in ins if lo <= a <= hi]
        mma = sum(1 for text in body if _MMA.search(text))
        if (mma, -len(body)) > (best[0], -len(best[1])):
            best = (mma, body)
    return best[1]


_SPILL_OP = re.compile(r"^(?:@!?U?P\w+\s+)?(STL|LDL)\b")


def spill_instructions(instructions: List[str], op: str) -> int:
    """Spill stores (``op="STL"``) or reloads (``"LDL"``) among SASS ``instructions``."""
    return sum(1 for text in instructions if (m := _SPILL_OP.match(text)) and m.group(1) == op)


def compile_spec(spec: KernelSpec, target: Tuple[str, int, int] = HOPPER) -> Dict[str, Any]:
    """Compile ``spec`` for ``target`` (backend, compute capability, warp size; default sm_90a) and return its
    resource usage as a dict."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(spec.fn.arg_names)
    unknown = set(spec.signature) ^ set(names)
    if unknown:
        raise ValueError(f"{spec.name}: signature must name every argument exactly; mismatch on {sorted(unknown)}")
    attrs = {(names.index(n),): [["tt.divisibility", DIVISIBILITY]] for n in spec.divisible}
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    kernel = triton.compile(
        src, target=GPUTarget(*target), options={"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        tool = os.path.join(_nvidia_bin(), "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "--dump-sass", cubin], capture_output=True, text=True, check=True).stdout

    loop = hot_loop(sass)

    def field_value(key: str) -> int:
        m = re.search(rf"\b{key}:(\d+)", usage)
        return int(m.group(1)) if m else -1

    return {
        "kernel": spec.name,
        "registers": field_value("REG"),
        # ptxas places register spills in the stack frame (STACK); Triton kernels have no other stack use.
        "spill_bytes": max(0, field_value("LOCAL")) + max(0, field_value("STACK")),
        "stack_bytes": field_value("STACK"),
        "shared_bytes": int(kernel.metadata.shared) + max(0, field_value("SHARED")),
        "capability": target[1],
        "hgmma": len(re.findall(r"\bHGMMA\.", sass)),
        "mma": len(re.findall(rf"\b{mma_opcode(target[1])}\b", sass)),
        "loop_instructions": len(loop),
        "loop_spill_stores": spill_instructions(loop, "STL"),
        "loop_spill_loads": spill_instructions(loop, "LDL"),
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "expects_mma": spec.expects_mma,
    }


def collect_specs(shared_memory: int = HOPPER_SHARED_MEMORY_PER_BLOCK) -> List[KernelSpec]:
    """All registered kernel configurations, as a device with ``shared_memory`` bytes per block runs them (import
    errors propagate: a missing module is a bug)."""
    specs: List[KernelSpec] = []
    for module_name in KERNEL_MODULES:
        specs.extend(importlib.import_module(module_name).inspect_specs(shared_memory=shared_memory))
    return specs


def problems(row: Dict[str, Any]) -> List[str]:
    """What is wrong with one report row: spill stores inside the hot loop (spill traffic both ways on every
    iteration), or no HGMMA where the kernel multiplies. Spills outside the hot loop, and reloads inside it of values
    spilled before it (L1 hits), are reported in the table, not failed."""
    found = []
    if row["loop_spill_stores"]:
        found.append(f"{row['loop_spill_stores']} spill stores per hot-loop iteration")
    if row["expects_mma"] and row["mma"] == 0:
        found.append(f"no {mma_opcode(row['capability'])} in SASS")
    return found


def main(argv: List[str] | None = None) -> int:
    """Command line: print the report; ``--json`` for machine-readable rows; ``--check`` to fail on problems."""
    parser = argparse.ArgumentParser(prog="python -m fastvmt_kernels.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    parser.add_argument("--check", action="store_true", help="exit 1 if a kernel spills or lacks HGMMA")
    parser.add_argument("--filter", default="", help="only kernels whose name contains this text")
    parser.add_argument("--target", choices=tuple(TARGETS), default="sm_90a",
                        help="GPU to compile for, in the configurations it runs (default sm_90a: H100 / H200)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set; unset it: the interpreter cannot compile for a GPU target")
    target, shared_memory = TARGETS[args.target]
    rows = [compile_spec(s, target) for s in collect_specs(shared_memory) if args.filter in s.name]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        mma = MMA_COLUMNS.get(target[1], PRE_HOPPER_MMA)
        header = (f"{'kernel':58s} {'regs':>5s} {'spill B':>7s} {'smem KiB':>9s} {mma:>6s} {'loop':>5s} "
                  f"{'LDL/STL':>8s} {'warps':>5s} {'stages':>6s}  status")
        print(f"{args.target} compile report ({shared_memory // 1024} KiB shared memory per block), "
              f"triton {__import__('triton').__version__}")
        print(header)
        for r in rows:
            status = "; ".join(problems(r)) or "ok"
            print(
                f"{r['kernel']:58s} {r['registers']:5d} {r['spill_bytes']:7d} {r['shared_bytes'] / 1024:9.1f} "
                f"{r['mma']:6d} {r['loop_instructions']:5d} "
                f"{str(r['loop_spill_loads']) + '/' + str(r['loop_spill_stores']):>8s} "
                f"{r['num_warps']:5d} {r['num_stages']:6d}  {status}"
            )
    bad = [r for r in rows if problems(r)]
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
