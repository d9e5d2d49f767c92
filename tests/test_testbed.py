"""Testbed: procedural data with ground truth, motion metrics, training determinism, checkpoint save/load."""
import json
import math

import numpy as np
import pytest
import torch

from fastvmt.testbed import data, metrics


@pytest.fixture(scope="module")
def clips():
    return data.sample_clips(48, generator=torch.Generator().manual_seed(123))


def test_clips_shapes_range_and_captions(clips):
    assert clips.videos.shape == (48, 3, data.DEFAULT_FRAMES, data.DEFAULT_SIZE, data.DEFAULT_SIZE)
    assert clips.trajectories.shape == (48, data.DEFAULT_FRAMES, 2)
    assert float(clips.videos.min()) >= -1.0 and float(clips.videos.max()) <= 1.0
    assert set(clips.colors) == set(data.COLORS) and set(clips.shapes) == set(data.SHAPES)
    for caption, color, shape in zip(clips.captions, clips.colors, clips.shapes):
        assert data.parse_caption(caption) == (color, shape)
    # paths stay inside the frame with the shape fully visible
    low = data.DEFAULT_RADIUS + data.BORDER_MARGIN
    assert float(clips.trajectories.min()) >= low - 1e-4
    assert float(clips.trajectories.max()) <= data.DEFAULT_SIZE - 1 - low + 1e-4
    # smooth: second differences bounded by speed * turn rate
    second = clips.trajectories[:, 2:] - 2 * clips.trajectories[:, 1:-1] + clips.trajectories[:, :-2]
    assert float(second.norm(dim=-1).max()) <= data.MAX_SPEED * data.MAX_TURN + 1e-4


def test_rendered_pixels_match_ground_truth(clips):
    """The object's colour sits at the true centre and the background is flat far from it."""
    for b in range(8):
        video, traj = clips.videos[b], clips.trajectories[b]
        color = torch.tensor(data.COLORS[clips.colors[b]])
        for f in range(video.shape[1]):
            x, y = traj[f]
            i, j = int(round(float(y))), int(round(float(x)))
            assert torch.allclose(video[:, f, i, j], color, atol=1e-6)
            far = (torch.arange(data.DEFAULT_SIZE).view(-1, 1) - y).abs() > data.DEFAULT_RADIUS + 1.5
            far = far | ((torch.arange(data.DEFAULT_SIZE).view(1, -1) - x).abs() > data.DEFAULT_RADIUS + 1.5)
            assert torch.all(video[:, f][:, far] == data.BACKGROUND_LEVEL)


def test_metrics_recover_ground_truth_trajectories(clips):
    worst = 0.0
    for video, traj, color in zip(clips.videos, clips.trajectories, clips.colors):
        scores = metrics.score_video(video, color, traj)
        assert scores["detection_rate"] == 1.0
        assert scores["single_object_rate"] == 1.0
        worst = max(worst, scores["trajectory_error_unaligned_px"], scores["trajectory_error_px"])
        other = next(c for c in data.COLORS if c != color)
        assert metrics.score_video(video, other)["detection_rate"] == 0.0
    assert worst < 0.5


def test_metrics_on_pipeline_layout_and_leakage(clips):
    """(F, H, W, 3) arrays in [0, 1] (output_type="np") and uint8 give the same centroids; leakage counts frames."""
    video, traj, color = clips.videos[0], clips.trajectories[0], clips.colors[0]
    as_np = ((video.permute(1, 2, 3, 0).numpy() + 1.0) / 2.0).astype(np.float32)
    as_u8 = np.round(as_np * 255).astype(np.uint8)
    ref = metrics.object_trajectory(video, color)
    assert torch.allclose(metrics.object_trajectory(as_np, color), ref, atol=1e-4)
    assert torch.allclose(metrics.object_trajectory(as_u8, color), ref, atol=0.05)
    other = next(c for c in data.COLORS if c != color)
    assert metrics.score_video(video, other, traj, reference_color=color)["leakage"] == 1.0
    with pytest.raises(ValueError, match="must be"):
        metrics.as_video(np.zeros((4, 16, 16)))
    with pytest.raises(ValueError, match="unknown color"):
        metrics.color_coverage(video, "purple")


def test_trajectory_errors_alignment_and_missing_frames():
    ref = data.arc_trajectory()
    shifted = ref + torch.tensor([3.0, -2.0])
    errors = metrics.trajectory_errors(shifted, ref)
    assert errors["aligned"] == pytest.approx(0.0, abs=1e-5)
    assert errors["unaligned"] == pytest.approx(math.sqrt(13.0), rel=1e-5)
    partial = shifted.clone()
    partial[0] = float("nan")  # alignment uses the first detected frame
    assert metrics.trajectory_errors(partial, ref)["aligned"] == pytest.approx(0.0, abs=1e-5)
    assert math.isnan(metrics.trajectory_errors(torch.full_like(ref, float("nan")), ref)["aligned"])
    mostly_missing = shifted.clone()
    mostly_missing[: len(ref) // 2 + 1] = float("nan")  # fewer than half the frames tracked: no trajectory
    assert math.isnan(metrics.trajectory_errors(mostly_missing, ref)["unaligned"])
    with pytest.raises(ValueError, match="both be"):
        metrics.trajectory_errors(ref[:3], ref)


def test_jerk_and_components():
    line = torch.stack([torch.arange(8.0), torch.zeros(8)], dim=1)
    assert metrics.jerkiness(line) == pytest.approx(0.0, abs=1e-6)
    zigzag = line.clone()
    zigzag[1::2, 1] = 1.0
    assert metrics.jerkiness(zigzag) == pytest.approx(2.0, rel=1e-5)
    mask = np.zeros((8, 8), dtype=bool)
    mask[1:3, 1:3] = True
    mask[5:7, 5:8] = True
    mask[0, 7] = True  # a speck below MIN_COMPONENT_PIXELS
    assert metrics.count_components(mask) == 2


def test_chance_baseline_is_sane():
    ref = data.arc_trajectory()
    chance = metrics.chance_baseline(ref)
    assert 2.0 < chance["aligned"] < data.DEFAULT_SIZE
    assert 1.0 < chance["unaligned"] < data.DEFAULT_SIZE
    # a path that stays at the first reference point is better than nothing but worse than the truth
    static = ref[:1].expand_as(ref)
    assert 0.0 < metrics.trajectory_errors(static, ref)["aligned"]
    assert metrics.chance_baseline(ref, seed=1)["aligned"] == pytest.approx(chance["aligned"], rel=0.15)


def test_noise_is_not_an_object():
    noise = torch.randn(3, 8, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    for color in data.COLORS:
        assert metrics.score_video(noise, color)["detection_rate"] == 0.0


def test_foreground_trajectory_of_user_clip(clips):
    est = metrics.foreground_trajectory(clips.videos[3])
    assert float((est - clips.trajectories[3]).norm(dim=1).max()) < 0.5
    assert metrics.dominant_color(clips.videos[3]) == clips.colors[3]


def test_bad_names_raise():
    with pytest.raises(ValueError, match="exactly one colour"):
        data.parse_caption("a purple circle")
    with pytest.raises(ValueError, match="unknown shape"):
        data.caption_for("red", "hexagon")
    with pytest.raises(ValueError, match="trajectories must be"):
        data.render_clips(torch.zeros(2, 8), ["red"], ["circle"])


TINY = ["--layers", "1", "--heads", "2", "--head-dim", "8", "--batch", "2", "--threads", "1", "--no-samples",
        "--log-every", "1", "--seed", "3"]


def _weights(folder):
    state = torch.load(folder / "train_state.pt", weights_only=False)
    return state["step"], state["ema_transformer"], state["transformer"]


def test_train_resume_is_deterministic_and_checkpoint_loads(tmp_path):
    from fastvmt.testbed import model, train

    train.main(["--out", str(tmp_path / "a"), "--steps", "2", *TINY])
    train.main(["--out", str(tmp_path / "b"), "--steps", "1", *TINY])
    train.main(["--out", str(tmp_path / "b"), "--steps", "2", "--resume", *TINY])
    step_a, ema_a, raw_a = _weights(tmp_path / "a")
    step_b, ema_b, raw_b = _weights(tmp_path / "b")
    assert step_a == step_b == 2
    for name in raw_a:
        assert torch.equal(raw_a[name], raw_b[name]), name
        assert torch.equal(ema_a[name], ema_b[name]), name
    assert (tmp_path / "b" / "log.csv").read_text().count("\n") == 3  # header + steps 1, 2

    # A checkpoint with fewer layers than the testbed's motion block runs the demo on its last block.
    from fastvmt import cli

    out = tmp_path / "demo"
    assert cli.main(["demo", "--checkpoint", str(tmp_path / "a" / "checkpoint"), "--out", str(out), "--steps", "2",
                     "--methods", "unguided,fastvmt,unguided"]) == 0  # 'motion_block = 5 but 1 blocks' before
    summary = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert list(summary["methods"]) == ["unguided", "fastvmt"]  # each method once
    assert summary["settings"]["configs"]["fastvmt"]["motion_block"] == 0

    # The EMA checkpoint folder loads back with identical weights and the pipeline's prompt encoding.
    transformer, text_encoder, tokenizer, _ = model.load_components(str(tmp_path / "a" / "checkpoint"))
    for name, value in transformer.state_dict().items():
        assert torch.equal(value, ema_a[name]), name
    from fastvmt import FastVMTPipeline

    pipe = FastVMTPipeline.from_pretrained(str(tmp_path / "a" / "checkpoint"))
    assert pipe.vae is None
    assert pipe.default_text_length() == model.TEXT_LENGTH  # the pipeline pads text as in training by default
    embeds, negative = pipe.encode_prompt("a red circle", max_sequence_length=pipe.default_text_length(), device="cpu")
    ours = model.encode_captions(tokenizer, text_encoder, ["a red circle"])
    torch.testing.assert_close(embeds, ours)
    assert float(negative.detach().abs().max()) == 0.0  # the empty prompt is the all-zero (CFG-dropout) input
    with pytest.raises(ValueError, match="not a testbed checkpoint"):
        model.load_components(str(tmp_path))


def test_training_batches_follow_the_flow_convention():
    """x_t interpolates data (sigma=0) and noise (sigma=1); the target velocity is noise - x0."""
    from fastvmt.testbed import train

    x0, noise, sigmas, captions = train.training_batch(step=5, seed=0, batch=64)
    again = train.training_batch(step=5, seed=0, batch=64)
    assert torch.equal(x0, again[0]) and torch.equal(noise, again[1]) and captions == again[3]
    assert not torch.equal(x0, train.training_batch(step=6, seed=0, batch=64)[0])
    assert float(sigmas.min()) > 0 and float(sigmas.max()) < 1
    assert 0 < captions.count("") < 64  # classifier-free-guidance dropout
    assert train.learning_rate(0, 100, 1.0) < train.learning_rate(train.WARMUP_STEPS - 1, 1000, 1.0) == 1.0
    assert train.learning_rate(1000, 1000, 1.0) == pytest.approx(train.FINAL_LR_FRACTION)


def test_train_refuses_bad_arguments_and_an_existing_run_before_writing(tmp_path, capsys):
    from fastvmt.testbed import train

    for argv, message in ((["--log-every", "0"], "--log-every must be >= 1"),
                          (["--size", "18"], "--size 18 must be a multiple of --patch 4")):
        assert train.main(["--out", str(tmp_path / "bad"), "--steps", "1", *TINY, *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    train.main(["--out", str(tmp_path / "run"), "--steps", "1", *TINY])
    state = (tmp_path / "run" / "train_state.pt").read_bytes()
    assert train.main(["--out", str(tmp_path / "run"), "--steps", "2", *TINY]) == 2  # would restart from step 0
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert (tmp_path / "run" / "train_state.pt").read_bytes() == state


def test_resume_drops_log_rows_written_after_the_last_save_and_keeps_the_clock(tmp_path):
    import csv

    from fastvmt.testbed import train

    run = tmp_path / "run"
    train.main(["--out", str(run), "--steps", "1", *TINY])
    with open(run / "log.csv", "a", newline="") as f:  # an interrupted run logged step 2 after saving step 1
        f.write("2,0.5,0.001,99.0\n")
    state = torch.load(run / "train_state.pt", weights_only=False)
    assert state["seconds"] > 0
    state["seconds"] = 1000.0  # as if the first process had trained for 1000 s
    torch.save(state, run / "train_state.pt")
    train.main(["--out", str(run), "--steps", "3", "--resume", *TINY])
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert 1000.0 <= float(rows[1]["seconds"]) < 1100.0  # the clock continues (it restarted from 0 before)


def test_foreground_of_a_large_object_is_the_object():
    """A user clip whose object covers most of the frame: the background comes from the frames' borders (the whole
    clip's median colour was the object's, which reversed the trajectory)."""
    video = torch.full((3, 4, 64, 64), -1.0)
    for f, left in enumerate((4, 6, 8, 10)):
        video[1, f, 5:58, left : left + 53] = 1.0  # a 53 px green square moving right
    trajectory = metrics.foreground_trajectory(video)
    assert (trajectory[1:, 0] > trajectory[:-1, 0]).all(), trajectory  # x rises


def test_verdict_needs_a_finite_unguided_error():
    from fastvmt.testbed.demo import verdict

    lines = verdict({"unguided": {"trajectory_error_px": math.nan}, "fastvmt": {"trajectory_error_px": 1.2}},
                    {"aligned": 6.0})
    assert "nan" not in lines[0] and "aligned error 1.20 px, 0.20x the chance baseline" in lines[0]


def _painted(frames=2, size=16):
    return torch.full((3, frames, size, size), data.BACKGROUND_LEVEL)


def test_aligned_error_removes_the_first_valid_frames_offset():
    ref = torch.zeros(4, 2)
    est = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [4.0, 0.0]])
    assert metrics.trajectory_errors(est, ref)["aligned"] == pytest.approx(1.0)


def test_trajectory_errors_need_at_least_half_the_frames_rounded_up():
    ref = torch.zeros(5, 2)
    est = torch.full((5, 2), float("nan"))
    est[:2] = 0.0  # 2 of 5 frames < ceil(2.5)
    assert math.isnan(metrics.trajectory_errors(est, ref)["aligned"])


def test_score_video_reports_the_aligned_error_as_trajectory_error(monkeypatch):
    monkeypatch.setattr(metrics, "trajectory_errors", lambda e, r: {"aligned": 1.0, "unaligned": 2.0})
    scores = metrics.score_video(_painted(), "red", torch.zeros(2, 2))
    assert (scores["trajectory_error_px"], scores["trajectory_error_unaligned_px"]) == (1.0, 2.0)


def test_chance_baseline_samples_paths_of_the_given_size(monkeypatch):
    seen = []
    sample = metrics.sample_trajectories
    monkeypatch.setattr(metrics, "sample_trajectories", lambda *a, **kw: seen.append(kw.get("size")) or sample(*a, **kw))
    metrics.chance_baseline(torch.zeros(4, 2), samples=4, size=24)
    assert seen == [24]


def test_foreground_background_is_the_median_of_all_four_borders():
    clip = torch.zeros(3, 2, 8, 8)
    clip[:, :, :3] = 1.0  # object on rows 0..2 (touches the top border; the bottom border is background)
    traj = metrics.foreground_trajectory(clip)
    assert torch.allclose(traj[:, 1], torch.ones(2))  # centroid row 1


def test_foreground_weights_are_normalised_before_the_area_threshold():
    clip = torch.zeros(3, 2, 8, 8)
    clip[0, :, 4, 3:5] = 0.4  # two faint pixels: summed distance 0.8 < 1, normalised area 2
    traj = metrics.foreground_trajectory(clip)
    assert not torch.isnan(traj).any()


def test_centroids_below_min_area_are_nan():
    cov = torch.zeros(1, 8, 8)
    cov[0, 2, 2:4] = 1.0  # area 2 < MIN_OBJECT_AREA
    assert torch.isnan(metrics.centroids(cov)).all()


def test_object_coverage_keeps_the_one_pixel_rim():
    cov = torch.zeros(1, 9, 9)
    cov[0, 3:6, 3:6] = 1.0
    cov[0, 2, 4] = 0.4  # anti-aliased rim pixel next to the core
    assert metrics.object_coverage(cov)[0, 2, 4] == pytest.approx(0.4)


def test_leakage_only_for_a_different_reference_colour():
    assert "leakage" not in metrics.score_video(_painted(), "red", reference_color="red")


def test_two_blobs_of_the_colour_are_not_a_single_object():
    video = _painted()
    red = torch.tensor(data.COLORS["red"]).view(3, 1, 1, 1)
    video[:, :, 1:4, 1:4] = red
    video[:, :, 10:13, 10:13] = red
    assert metrics.score_video(video, "red")["single_object_rate"] == 0.0
