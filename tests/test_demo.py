"""`fastvmt demo` end to end (few denoising steps) on the shipped checkpoint: files, metrics keys, honest numbers."""
import json
import math
import os
import re

import imageio.v3 as iio
import numpy as np
import pytest

from fastvmt import cli
from fastvmt.video_io import write_video
from fastvmt.testbed import data, recipes

METHOD_KEYS = {"trajectory_error_px", "trajectory_error_unaligned_px", "detection_rate", "seconds"}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    if not os.path.isfile(os.path.join(recipes.CHECKPOINT_DIR, "model_index.json")):
        pytest.fail(f"the shipped testbed checkpoint is missing from {recipes.CHECKPOINT_DIR}")
    out = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo", "--out", str(out), "--steps", "3", "--seed", "1"]) == 0
    return out


def test_demo_writes_videos_strip_and_metrics(demo_dir):
    expected = ["reference.mp4"] + [f"{m}.mp4" for m in recipes.DEMO_METHODS] + ["strip.png", "metrics.json"]
    for name in expected:
        assert (demo_dir / name).stat().st_size > 0, name
    video = iio.imread(demo_dir / "fastvmt.mp4")
    assert video.shape[0] == data.DEFAULT_FRAMES
    summary = json.loads((demo_dir / "metrics.json").read_text())
    assert list(summary["methods"]) == list(recipes.DEMO_METHODS)
    for method, scores in summary["methods"].items():
        assert METHOD_KEYS <= set(scores), method
        assert 0.0 <= scores["detection_rate"] <= 1.0
        assert scores["seconds"] > 0
        err = scores["trajectory_error_px"]
        assert err is None or math.isnan(err) or 0.0 <= err < 2 * data.DEFAULT_SIZE
    chance = summary["chance_baseline"]["trajectory_error_px"]
    assert 2.0 < chance < data.DEFAULT_SIZE
    assert summary["settings"]["configs"]["unguided"] is None
    assert summary["settings"]["configs"]["fastvmt"]["recipe"] == "fastvmt"
    assert summary["settings"]["configs"]["ditflow"]["recipe"] == "ditflow"
    assert len(summary["reference"]["trajectory"]) == data.DEFAULT_FRAMES


def test_demo_on_a_user_clip_and_bad_input(tmp_path, demo_dir, capsys):
    out = tmp_path / "mine"
    assert cli.main(["demo", "--out", str(out), "--reference", str(demo_dir / "reference.mp4"),
                     "--prompt", "a green square", "--steps", "3", "--methods", "unguided,fastvmt"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["reference"]["color"] == "blue"
    # the reference read back from the (upscaled, compressed) mp4 follows the arc it was rendered from
    traj = summary["reference"]["trajectory"]
    truth = data.arc_trajectory().tolist()
    assert max(math.dist(a, b) for a, b in zip(traj, truth)) < 0.75
    short = tmp_path / "short.gif"
    write_video(np.broadcast_to(np.arange(4, dtype=np.uint8)[:, None, None, None] * 60, (4, 16, 16, 3)), short, fps=8)
    capsys.readouterr()
    for argv, message in (
        (["--prompt", "a purple circle"], "exactly one colour"),
        (["--methods", "fastvmt,magic"], "unknown"),
        (["--reference", str(tmp_path / "missing.mp4")], "does not exist"),
        (["--reference", str(short)], f"needs at least {data.DEFAULT_FRAMES} frames; .* has 4"),
    ):
        assert cli.main(["demo", "--out", str(tmp_path / "bad"), *argv]) == 2
        assert re.search(f"fastvmt demo: error: .*{message}", capsys.readouterr().err), argv
    assert not (tmp_path / "bad").exists()
