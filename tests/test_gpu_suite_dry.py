"""`bash benchmarks/gpu_suite.sh --dry` works on CPU: every stage runs (tiny, interpreter) and writes its files."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE_TIMEOUT_S = 240


def test_gpu_suite_dry_run_writes_results(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVMT_GPU_TESTS")}
    env.update(OUT=str(tmp_path), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    # Keep it small: the local-attention benchmark only and one cheap test; other benches run on the GPU suite.
    env.setdefault("FASTVMT_SUITE_BENCH", "benchmarks/bench_local_attention.py --benchmark-disable -k tiny-25")
    # Tables left by an earlier run (as benchmarks/results/ holds the committed ones on the GPU machine) must not
    # come back as this run's: one that no stage rewrites, and one older copy of a table that is rewritten.
    stale = tmp_path / "results"
    stale.mkdir()
    for name in ("pipeline.md", "local_attention.md"):
        (stale / name).write_text("an earlier run's table\n")
        os.utime(stale / name, (1_000_000_000, 1_000_000_000))
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=SUITE_TIMEOUT_S,
    )
    log = (tmp_path / "gpu_suite.log").read_text()
    assert proc.returncode == 0, log[-4000:]
    for stage in ("tests", "inspect", "bench"):
        assert f"=== stage {stage}: rc=0" in log, log[-4000:]
    assert "local_attention_fwd" in (tmp_path / "inspect.txt").read_text()
    table = (tmp_path / "local_attention.md").read_text()
    assert "| tiny | 2 | 2 | 25% | 1x1x1 | 0.25 | ours | fwd |" in table  # model, heads, kv_heads, ...
    assert "dry run" in table
    assert (tmp_path / "results.tar.gz").stat().st_size > 0
    import tarfile

    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert "local_attention.md" in names and "pipeline.md" not in names
    assert not (tmp_path / "pipeline.md").exists()  # the stale table is not returned beside the tarball
