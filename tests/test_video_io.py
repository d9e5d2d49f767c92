"""Video I/O: every accepted source, uniform resampling, center-crop resize, atomic writes, clear errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastvmt.video_io import VideoReadError, frame_indices, load_video, prepare_reference, resize_video, sample_frames, write_video


def _ramp_video(frames=6, height=32, width=48, step=25):
    """uint8 (F, H, W, 3): frame f has brightness step * f + 20 plus a horizontal gradient in red."""
    video = np.zeros((frames, height, width, 3), dtype=np.uint8)
    for f in range(frames):
        video[f, ..., 1] = step * f + 20
        video[f, ..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    return video


def test_mp4_round_trip_keeps_size_count_and_content(tmp_path):
    video = _ramp_video()
    path = write_video(video, tmp_path / "clip.mp4", fps=8)
    back = load_video(path)
    assert back.shape == (6, 3, 32, 48) and back.dtype == torch.float32
    expected = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255
    assert (back - expected).abs().mean() < 0.03  # lossy H.264
    assert list(tmp_path.iterdir()) == [tmp_path / "clip.mp4"]  # no temporary file left behind


def test_gif_folder_pil_list_array_and_tensor_sources(tmp_path):
    video = _ramp_video(frames=4, height=16, width=16)
    expected = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255
    write_video(video, tmp_path / "clip.gif", fps=8)
    assert load_video(tmp_path / "clip.gif").shape == (4, 3, 16, 16)
    folder = tmp_path / "frames"
    folder.mkdir()
    for f in range(4):
        Image.fromarray(video[f]).save(folder / f"{f:03d}.png")
    (folder / "notes.txt").write_text("ignored")
    torch.testing.assert_close(load_video(folder), expected)
    torch.testing.assert_close(load_video([Image.fromarray(v) for v in video]), expected)
    torch.testing.assert_close(load_video(video), expected)
    torch.testing.assert_close(load_video(expected.clone()), expected)  # (F, 3, H, W) float tensor
    gray = load_video(video[..., 0])  # (F, H, W) grayscale -> 3 channels
    assert gray.shape == (4, 3, 16, 16) and torch.equal(gray[:, 0], gray[:, 2])


def test_sample_frames_is_uniform_and_keeps_the_ends():
    video = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1).expand(10, 3, 2, 2)
    picked = sample_frames(video, 4)[:, 0, 0, 0].tolist()
    assert picked == [0.0, 3.0, 6.0, 9.0]
    assert sample_frames(video, 10)[:, 0, 0, 0].tolist() == list(range(10))
    with pytest.raises(ValueError, match="has 10 frames but 11 are requested"):
        sample_frames(video, 11)
    with pytest.raises(ValueError, match="num_frames must be >= 2"):
        sample_frames(video, 1)


def test_sample_frames_from_a_start_uniformly_or_with_a_stride():
    video = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1).expand(10, 3, 2, 2)
    frame_ids = lambda *args: sample_frames(video, *args)[:, 0, 0, 0].tolist()  # noqa: E731
    assert frame_ids(3, 5) == [5.0, 7.0, 9.0]  # uniform over frames 5..9, both ends kept
    assert frame_ids(4, 1, 2) == [1.0, 3.0, 5.0, 7.0]  # every 2nd frame from 1: the clip's speed kept
    assert frame_ids(5, 0, 2) == [0.0, 2.0, 4.0, 6.0, 8.0]
    with pytest.raises(ValueError, match=r"has 10 frames \(4 from frame 6\) but 5 are requested"):
        sample_frames(video, 5, 6)
    with pytest.raises(ValueError, match="5 frames every 3 from frame 0 need 13"):
        sample_frames(video, 5, 0, 3)
    with pytest.raises(ValueError, match="start frame must be an int >= 0"):
        sample_frames(video, 3, -1)
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        sample_frames(video, 3, 0, 0)


def test_resize_center_crops_to_the_target_aspect():
    video = torch.zeros(2, 3, 20, 40)
    video[..., :10] = 1.0  # left quarter white: cropped away when going to a square
    video[..., 10:30] = 0.5
    out = resize_video(video, 8, 8)
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out, torch.full_like(out, 0.5))
    tall = resize_video(torch.rand(1, 3, 30, 10), 16, 32)
    assert tall.shape == (1, 3, 16, 32) and tall.min() >= 0 and tall.max() <= 1


def test_prepare_reference(tmp_path):
    path = write_video(_ramp_video(frames=9), tmp_path / "ref.mp4")
    ref = prepare_reference(path, 5, 16, 16)
    assert ref.shape == (5, 3, 16, 16)
    assert (ref[1:, 1].mean((1, 2)) > ref[:-1, 1].mean((1, 2))).all()  # brightness still increases over time


def test_unreadable_empty_and_bad_sources_raise(tmp_path):
    with pytest.raises(VideoReadError, match="does not exist"):
        load_video(tmp_path / "missing.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"this is not a video" * 10)
    with pytest.raises(VideoReadError, match="cannot read video"):
        load_video(corrupt)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(VideoReadError, match="has no image frames"):
        load_video(empty_dir)
    with pytest.raises(VideoReadError, match="empty list"):
        load_video([])
    with pytest.raises(VideoReadError, match="is empty"):
        load_video(np.zeros((0, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(VideoReadError, match=r"must lie in \[0, 1\]"):
        load_video(np.full((2, 8, 8, 3), 2.0, dtype=np.float32))
    rounded = np.full((2, 8, 8, 3), 1.0 + 1e-6, dtype=np.float32)  # rounding past 1 is clamped, not refused
    rounded[0] = -1e-6
    assert load_video(rounded).min() == 0 and load_video(rounded).max() == 1
    with pytest.raises(VideoReadError, match="must have 4 dims"):
        load_video(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(VideoReadError, match="must be a path"):
        load_video(42)
    assert isinstance(VideoReadError("x"), ValueError)


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="must end with one of"):
        write_video(_ramp_video(), tmp_path / "clip.avi")
    with pytest.raises(ValueError, match=r"frames must be \(F, H, W, 3\)"):
        write_video(np.zeros((2, 8, 8), dtype=np.float32), tmp_path / "clip.mp4")
    with pytest.raises(ValueError, match="even height and width"):
        write_video(np.zeros((2, 7, 9, 3), dtype=np.uint8), tmp_path / "odd.mp4")  # libx264 rejects odd sizes
    assert list(tmp_path.iterdir()) == []



def _frames_as_video(video: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255


def test_folder_frames_in_natural_order_hidden_files_skipped(tmp_path):
    video = _ramp_video(frames=11, height=8, width=8, step=20)
    for f in range(11):
        Image.fromarray(video[f]).save(tmp_path / f"frame_{f + 1}.png")  # as text, "frame_10" < "frame_2"
    (tmp_path / "._frame_3.png").write_bytes(b"a macOS resource fork, not an image")
    expected = _frames_as_video(video)
    torch.testing.assert_close(load_video(tmp_path), expected)
    torch.testing.assert_close(prepare_reference(tmp_path, 4, 8, 8, start=1, stride=3), expected[[1, 4, 7, 10]])


def test_sixteen_bit_frames_keep_their_range(tmp_path):
    levels = [1000, 21000, 41000]
    for f, level in enumerate(levels):
        Image.fromarray(np.full((8, 8), level, dtype=np.uint16)).save(tmp_path / f"{f}.png")
    video = load_video(tmp_path)
    assert video.shape == (3, 3, 8, 8)
    torch.testing.assert_close(video[:, :, 0, 0], torch.tensor(levels).float()[:, None].expand(3, 3) / 65535)
    pil = load_video([Image.fromarray(np.full((4, 4), level, dtype=np.uint16)) for level in levels])
    torch.testing.assert_close(pil[:, 0, 0, 0], torch.tensor(levels).float() / 65535)


def test_prepare_reference_decodes_only_the_frames_it_keeps(tmp_path, monkeypatch):
    import fastvmt.video_io as video_io

    path = write_video(_ramp_video(frames=12, height=16, width=16, step=20), tmp_path / "long.mp4", fps=8)
    whole = load_video(path)
    stacked = []
    real_stack = video_io._stack_images
    monkeypatch.setattr(video_io, "_stack_images", lambda arrays, *a, **k: stacked.append(len(arrays))
                        or real_stack(arrays, *a, **k))
    decoded = []
    real_decode = video_io._decode_frames
    monkeypatch.setattr(video_io, "_decode_frames", lambda *a, **k: decoded.append(real_decode(*a, **k)[1])
                        or real_decode(*a, **k))
    for args in ((5, 0, None), (4, 2, None), (4, 1, 2), (3, 0, 5)):
        stacked.clear()
        decoded.clear()
        got = prepare_reference(path, args[0], 16, 16, *args[1:])
        torch.testing.assert_close(got, sample_frames(whole, *args))  # same frames as from the whole clip
        assert stacked == [args[0]]  # only the sampled frames were ever stacked
    assert decoded[0] == 11  # with a stride, decoding stopped at the last frame kept (frame 10)
    with pytest.raises(ValueError, match="has 12 frames but 4 frames every 4 from frame 0 need 13"):
        prepare_reference(path, 4, 16, 16, 0, 4)
    with pytest.raises(ValueError, match="has 12 frames but 13 are requested"):
        prepare_reference(path, 13, 16, 16)


def test_gif_frame_durations_become_a_constant_rate(tmp_path):
    video = _ramp_video(frames=3, height=8, width=8)
    Image.fromarray(video[0]).save(tmp_path / "vfr.gif", save_all=True, loop=0, duration=[100, 300, 100],
                                   append_images=[Image.fromarray(v) for v in video[1:]])
    back = load_video(tmp_path / "vfr.gif")
    assert back.shape[0] == 5  # 100 ms, 3 x 100 ms, 100 ms
    assert torch.equal(back[1], back[2]) and torch.equal(back[2], back[3]) and not torch.equal(back[0], back[1])
    # a gif written with identical consecutive frames stores them as one longer frame; read back with other frames,
    # its duration makes it count as many frames again
    frames = np.concatenate([np.repeat(video[:1], 3, axis=0), video[1:]])
    write_video(frames, tmp_path / "held.gif", fps=10)
    torch.testing.assert_close(load_video(tmp_path / "held.gif"), _frames_as_video(frames), atol=0.02, rtol=0)


def test_array_sources_single_image_and_views():
    video = _ramp_video(frames=4, height=8, width=8)
    torch.testing.assert_close(load_video(video[::-1]), _frames_as_video(video[::-1].copy()))  # negative strides
    with pytest.raises(VideoReadError, match=r"a single \(H, W, C\) image"):
        load_video(video[0])


def test_written_files_get_new_file_permissions_and_nan_frames_fail(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        path = write_video(_ramp_video(frames=2, height=8, width=8), tmp_path / "clip.gif")
        assert (path.stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(umask)
    frames = np.full((2, 8, 8, 3), 0.5, dtype=np.float32)
    frames[1, 3, 3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_video(frames, tmp_path / "nan.mp4")
    assert not (tmp_path / "nan.mp4").exists()


def test_uniform_sampling_rounds_to_the_nearest_frame():
    """9 frames to 4: positions 0, 2.67, 5.33, 8 round to the nearest frame (floor would pick 2 and 5)."""
    video = torch.arange(9, dtype=torch.float32).view(9, 1, 1, 1).expand(9, 3, 2, 2)
    assert sample_frames(video, 4)[:, 0, 0, 0].tolist() == [0.0, 3.0, 5.0, 8.0]  # 0, 2.67, 5.33, 8
    assert frame_indices(9, 4, 1) == [1, 3, 6, 8]  # 1 + (0, 2.33, 4.67, 7)
