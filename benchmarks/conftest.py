"""Benchmark collection: every ``benchmarks/bench_*.py`` is a pytest module (pytest-benchmark files).

Dry runs (FASTVMT_BENCH_DRY=1 or no CUDA) execute Triton kernels under the interpreter on CPU, so
TRITON_INTERPRET=1 is set here before anything imports triton.
"""
import importlib.util
import os
from pathlib import Path

import pytest

# Source markers of benchmark files that need diffusers (the pipeline layer); skipped when it is missing.
DIFFUSERS_MARKERS = ("diffusers", "fastvmt.pipeline", "fastvmt.testbed")


def _dry() -> bool:
    if os.environ.get("FASTVMT_BENCH_DRY") == "1":
        return True
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:
        return True


if _dry():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _needs_diffusers(path: Path) -> bool:
    text = path.read_text(errors="replace")
    return any(marker in text for marker in DIFFUSERS_MARKERS)


# Directory collection skips benchmark files that need diffusers when it is not installed (the GPU box has none).
collect_ignore = (
    []
    if importlib.util.find_spec("diffusers") is not None
    else [p.name for p in Path(__file__).parent.glob("bench_*.py") if _needs_diffusers(p)]
)


def pytest_report_header(config):
    if collect_ignore:
        return f"benchmarks skipped (diffusers not installed): {', '.join(collect_ignore)}"
    return None


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py as test modules (pytest's default pattern is test_*.py)."""
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest collects it itself
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
