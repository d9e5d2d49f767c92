"""Offline sm_90a compile report of every kernel configuration, this tree against an earlier commit, side by side.

    python benchmarks/sass_compare.py --base 4ca3575          # -> benchmarks/results/sass_compare.{md,csv}

No GPU needed: both trees are compiled for Hopper with ``python -m fastvmt_kernels.inspect --json`` (the base
in a temporary ``git worktree``, run with this tree's ``fastvmt_kernels/inspect.py`` so both report the same
columns). Reported per kernel: registers, spill bytes (stack frame), spill reloads / stores per hot-loop iteration
and the SASS instructions of one hot-loop iteration per thread
(``fastvmt_kernels.inspect.hot_loop``): an issue-cost proxy for kernels whose inner loops are bound
by instruction issue rather than by the tensor cores. It is not a time: GPU runs (benchmarks/gpu_suite.sh) measure
time.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import RESULTS_DIR, provenance  # noqa: E402

INSPECT = "fastvmt_kernels/inspect.py"
FIELDS = ("registers", "spill_bytes", "loop_spill_loads", "loop_spill_stores", "loop_instructions")


def inspect_rows(tree: Path) -> Dict[str, Dict[str, object]]:
    """``python -m fastvmt_kernels.inspect --json`` run in ``tree``, keyed by kernel name."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    out = subprocess.run(
        [sys.executable, "-m", "fastvmt_kernels.inspect", "--json"], cwd=tree, env=env, capture_output=True,
        text=True, check=True,
    ).stdout
    return {row["kernel"]: row for row in json.loads(out)}


def compare(base: str) -> List[Dict[str, object]]:
    """Rows (kernel, base and current registers / spills / loop instructions) for kernels in either tree."""
    with tempfile.TemporaryDirectory(prefix="fastvmt-sass-base-") as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), base], cwd=REPO, check=True,
                       capture_output=True)
        try:
            shutil.copy(REPO / INSPECT, tree / INSPECT)
            old = inspect_rows(tree)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=True)
    new = inspect_rows(REPO)
    rows = []
    for name in list(new) + [n for n in old if n not in new]:
        row: Dict[str, object] = {"kernel": name}
        for field in FIELDS:
            row[f"{field}_base"] = old.get(name, {}).get(field)
            row[f"{field}_now"] = new.get(name, {}).get(field)
        before, after = row["loop_instructions_base"], row["loop_instructions_now"]
        row["loop_ratio"] = round(after / before, 3) if before and after else None
        rows.append(row)
    return rows


def write(rows: List[Dict[str, object]], base: str, out_dir: Path) -> Path:
    """Markdown + CSV with provenance; returns the markdown path."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    info = provenance()
    info["command"] = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO)] + sys.argv[1:])
    info["device"] = "none (offline compile for sm_90a)"
    columns = ["kernel"] + [f"{f}_{w}" for f in FIELDS for w in ("base", "now")] + ["loop_ratio"]
    md = ["# Offline sm_90a compile report: base commit vs this tree", ""]
    md += [f"- {k}: `{v}`" for k, v in info.items()]
    md += [
        f"- base: `{base}`; now: `{head.strip()}` plus uncommitted changes, if any",
        "- loop_instructions: SASS instructions of one iteration of the hot loop (innermost loop with the most "
        "HGMMA), per thread; an issue-cost proxy, not a time; empty where the kernel configuration does not exist",
        "- spill_bytes: the stack frame ptxas spills registers to (plus local memory); loop_spill_loads / _stores: "
        "LDL / STL instructions per hot-loop iteration",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    md += ["| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in columns) + " |" for r in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "sass_compare.md"
    path.write_text("\n".join(md) + "\n")
    with open(out_dir / "sass_compare.csv", "w") as f:
        f.write(",".join(columns) + "\n")
        for r in rows:
            f.write(",".join("" if r.get(c) is None else str(r[c]) for c in columns) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git commit to compare against")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="output folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    print(write(compare(args.base), args.base, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
