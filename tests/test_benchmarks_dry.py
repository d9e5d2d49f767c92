"""Every benchmark file runs in its dry form (tiny shapes, CPU, Triton interpreter) and writes its tables.

The GPU suite spends scarce device minutes on these files; a benchmark broken on the CPU side would waste them.
"""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
EXPECTED_TABLES = {
    "local_attention.md": "ours-causal",  # the last rows (block-causal time, after the sweep, FlexAttention, GQA) ran
    "motion_flow_dry.md": "fused_fwd1x1_bwd1x1",  # a tile-group ablation ran
    "motion_flow_dry_kernels.md": "us_per_step",
    "motion_flow_host_dry.md": "| launched |",  # both rows: stubbed and timed real launches
    "pipeline.md": "fastvmt(k=5 carried)+local(all), composed",  # the composed rows
    "pipeline_end_to_end.md": "fastvmt(k=5 carried)+local(all) / plain",  # all three whole runs
}


def test_every_benchmark_file_runs_dry(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FASTVMT_GPU_TESTS"}
    env.update(FASTVMT_BENCH_DRY="1", FASTVMT_BENCH_OUT=str(tmp_path), TRITON_INTERPRET="1",
               FASTVMT_BENCH_PIPELINE_COMPILE="aot_eager")  # the opt-in compiled pipeline row too
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks", "--benchmark-disable"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for name, marker in EXPECTED_TABLES.items():
        path = tmp_path / name
        assert path.exists(), f"{name} was not written; files: {sorted(p.name for p in tmp_path.iterdir())}"
        text = path.read_text()
        assert marker in text and "dry run" in text, f"{name} lacks {marker!r} or the dry-run device line"
    compiled = next(line for line in (tmp_path / "pipeline.md").read_text().splitlines() if "| fastvmt+compile |" in line)
    assert "error" not in compiled.lower() and "nan" not in compiled.lower(), compiled
