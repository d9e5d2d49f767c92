"""Helpers that write benchmark results (markdown + CSV + PNG) with their provenance.

GPU runs write to ``benchmarks/results/``. Dry runs (``FASTVMT_BENCH_DRY=1`` or no CUDA) write to
``$FASTVMT_BENCH_OUT`` if set, else a fresh temporary directory, so they never overwrite GPU results.
Every file records the exact command, device, torch / triton versions and a UTC timestamp.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DRY_ENV = "FASTVMT_BENCH_DRY"
OUT_ENV = "FASTVMT_BENCH_OUT"


def is_dry() -> bool:
    """True for the tiny CPU/interpreter variant: FASTVMT_BENCH_DRY=1 or no CUDA device."""
    return os.environ.get(DRY_ENV) == "1" or not torch.cuda.is_available()


def results_dir() -> Path:
    """Where results go: benchmarks/results on a GPU run, $FASTVMT_BENCH_OUT or a temp dir on a dry run."""
    if not is_dry():
        path = RESULTS_DIR
    elif os.environ.get(OUT_ENV):
        path = Path(os.environ[OUT_ENV])
    else:
        path = Path(tempfile.mkdtemp(prefix="fastvmt-bench-dry-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def device_name() -> str:
    """Human-readable device: the CUDA device name, or the CPU with the interpreter flag."""
    if torch.cuda.is_available() and not is_dry():
        return torch.cuda.get_device_name()
    cpu = f"CPU {_cpu_model()}, {os.cpu_count()} cores, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
    return f"{cpu}, dry run" if os.environ.get(DRY_ENV) == "1" else cpu


def _cpu_model() -> str:
    """The processor's model name from /proc/cpuinfo (Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def _invocation() -> str:
    """The command line that started this process, as a user would type it (``python -m pytest ...``)."""
    program, args = sys.argv[0], sys.argv[1:]
    if Path(program).name in ("pytest", "py.test") or program.endswith(os.path.join("pytest", "__main__.py")):
        head = ["python", "-m", "pytest"]
    else:
        head = ["python", program]
    env = [f"{name}={os.environ[name]}" for name in ("FASTVMT_BENCH_CPU_SHAPE", DRY_ENV) if os.environ.get(name)]
    return " ".join(shlex.quote(a) for a in [*env, *head, *args])


def provenance() -> Dict[str, str]:
    """Command line, device, library versions and timestamp of this run."""
    import triton

    command = os.environ.get("FASTVMT_BENCH_COMMAND") or _invocation()
    return {
        "command": command,
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    return "" if value is None else str(value)


def write_table(
    name: str,
    title: str,
    rows: List[Dict[str, object]],
    columns: Sequence[str],
    notes: Sequence[str] = (),
    plot: Optional[Callable[[Path], None]] = None,
    out_dir: Optional[Path] = None,
) -> List[Path]:
    """Write ``name.md`` (provenance, notes, table), ``name.csv`` and, if ``plot`` is given, ``name.png``.

    Args:
        name: file stem under :func:`results_dir`.
        title: markdown heading.
        rows: one dict per result row; ``columns`` selects and orders the fields.
        notes: markdown bullet lines (definitions of the reported quantities, shapes, choices).
        plot: callable receiving the PNG path (matplotlib code lives with the benchmark).
        out_dir: folder to write to instead of :func:`results_dir` (a CPU run whose figures are a deliverable, for
            this one table only: the process environment is left alone, so later dry tables still go elsewhere).

    Returns:
        The written paths.
    """
    out_dir = results_dir() if out_dir is None else Path(out_dir)
    info = provenance()
    md = [f"# {title}", ""]
    md += [f"- {key}: `{value}`" for key, value in info.items()]
    md += [f"- {note}" for note in notes]
    md += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    paths = [out_dir / f"{name}.md", out_dir / f"{name}.csv"]
    paths[0].write_text("\n".join(md) + "\n")
    with open(paths[1], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"# {k}: {v}" for k, v in info.items()])
        writer.writerow(columns)
        writer.writerows([[row.get(c, "") for c in columns] for row in rows])
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        png = out_dir / f"{name}.png"
        plot(png)
        paths.append(png)
    return paths
