"""Reference-video reading, resampling and writing.

Layout throughout: a video is a float32 tensor (F, 3, H, W) with values in [0, 1].

- :func:`load_video` reads an mp4 / gif / other ffmpeg-readable file, a folder of image frames (in natural name
  order: ``frame_2`` before ``frame_10``), a list of PIL images, a numpy array or a torch tensor. 8-bit and 16-bit
  images are read at their bit depth; a gif whose frames have different durations is expanded to a constant frame
  rate (each frame repeated in proportion to its duration), so that frame indices are proportional to time.
- :func:`prepare_reference` samples ``num_frames`` frames uniformly in time (the first and last frames are kept),
  or every ``stride``-th frame from ``start`` (a clip with fewer frames than that needs is an error, frames are never
  invented) and resizes them to ``height x width`` (center crop to the target aspect ratio, then bilinear resize
  with antialiasing). From a video file or a folder it decodes only the frames it keeps (a video file is counted
  first by ffmpeg), so a long clip costs the memory of ``num_frames`` frames, not of the whole clip.
- :func:`write_video` writes mp4 (H.264 through imageio-ffmpeg, as ``diffusers.utils.export_to_video``) or gif to a
  temporary file next to the target and renames it, so a failure never leaves a half-written file; the file gets
  the permissions of a newly created one (0666 less the umask).
"""
from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".gif", ".mov", ".avi", ".mkv", ".webm")
WRITE_SUFFIXES = (".mp4", ".gif")
MIN_FRAMES = 2
DEFAULT_FPS = 16
# PIL modes of single-channel images deeper than 8 bits (16-bit PNG / TIFF frames), read as value / 65535.
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
HIGH_BIT_MAX = 65535.0
# A gif frame shown for d ms counts as round(d / shortest duration) frames, at most this many.
MAX_GIF_FRAME_REPEAT = 64
# GIF stores delays in 1/100 s, and browsers show delays under 20 ms as 100 ms.
GIF_MAX_FPS = 50
# Float frames may overshoot [0, 1] by this much (rounding in the caller's processing); they are clamped.
FLOAT_RANGE_SLACK = 1e-3
# Frames converted to float and resized at once by resize_video (bounds its float memory).
RESIZE_CHUNK = 16

VideoLike = Union[str, os.PathLike, Sequence, np.ndarray, torch.Tensor]


class VideoReadError(ValueError):
    """The reference video could not be read or has no usable frames."""


def _video_tensor(array: Union[np.ndarray, torch.Tensor], what: str, keep_uint8: bool = False) -> torch.Tensor:
    """(F, H, W, C) or (F, C, H, W) uint8 / float, C in {1, 3, 4} (or (F, H, W) grayscale) -> (F, 3, H, W): float32
    in [0, 1], or uint8 as given when ``keep_uint8``."""
    if isinstance(array, np.ndarray):
        array = np.ascontiguousarray(array)  # torch rejects negative strides (e.g. a reversed view)
    video = torch.as_tensor(array)
    if video.dim() == 3 and video.shape[-1] in (3, 4):
        raise VideoReadError(
            f"{what} has shape {tuple(video.shape)}, a single (H, W, C) image; a video needs (F, H, W, C) or "
            "(F, C, H, W) (or (F, H, W) grayscale)"
        )
    if video.dim() == 3:  # (F, H, W) grayscale
        video = video.unsqueeze(-1)
    if video.dim() != 4:
        raise VideoReadError(f"{what} must have 4 dims (F, H, W, C) or (F, C, H, W), got shape {tuple(video.shape)}")
    if video.shape[-1] in (1, 3, 4) and video.shape[1] not in (1, 3, 4):
        video = video.permute(0, 3, 1, 2)
    elif video.shape[-1] in (1, 3, 4) and video.shape[1] in (1, 3, 4) and video.shape[-1] < video.shape[1]:
        video = video.permute(0, 3, 1, 2)
    if video.shape[1] not in (1, 3, 4):
        raise VideoReadError(f"{what} must have 1, 3 or 4 channels, got shape {tuple(video.shape)}")
    if video.shape[0] == 0 or video.shape[2] == 0 or video.shape[3] == 0:
        raise VideoReadError(f"{what} is empty: shape {tuple(video.shape)}")
    if video.dtype == torch.uint8:
        if not keep_uint8:
            video = video.float() / 255.0
    elif video.is_floating_point():
        video = video.float()
        if torch.isnan(video).any():
            raise VideoReadError(f"{what} contains NaN values")
        low, high = video.min().item(), video.max().item()
        if low < -FLOAT_RANGE_SLACK or high > 1 + FLOAT_RANGE_SLACK:
            raise VideoReadError(f"{what} float values must lie in [0, 1], got [{low:.3g}, {high:.3g}]")
        if low < 0 or high > 1:  # rounding (e.g. after a resize): clamp
            video = video.clamp(0, 1)
    else:
        raise VideoReadError(f"{what} must be uint8 or float, got dtype {video.dtype}")
    if video.shape[1] == 1:
        video = video.expand(-1, 3, -1, -1)
    return video[:, :3].contiguous()


def _image_array(img, what: str) -> np.ndarray:
    """A PIL image as (H, W, 3): uint8 for 8-bit images, float32 in [0, 1] for 16-bit single-channel ones (which
    ``convert("RGB")`` would clip at 255)."""
    if img.mode in HIGH_BIT_MODES:
        values = np.asarray(img).astype(np.float32)
        if values.min() < 0 or values.max() > HIGH_BIT_MAX:
            raise VideoReadError(
                f"{what}: 32-bit integer pixels in [{values.min():.0f}, {values.max():.0f}] are not supported; "
                "use 8-bit or 16-bit images"
            )
        return np.repeat((values / HIGH_BIT_MAX)[..., None], 3, axis=-1)
    if img.mode == "F":
        raise VideoReadError(f"{what}: 32-bit float images are not supported; use 8-bit or 16-bit images")
    return np.asarray(img.convert("RGB"))


def _stack_images(arrays: List[np.ndarray], what: str, keep_uint8: bool = False) -> torch.Tensor:
    """Same-size (H, W, 3) frames (uint8 and / or float in [0, 1]) -> :func:`_video_tensor` of their stack."""
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise VideoReadError(f"{what} frames differ in size: {sorted(sizes)}")
    if any(a.dtype != np.uint8 for a in arrays):
        arrays = [a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a for a in arrays]
    return _video_tensor(np.stack(arrays), what, keep_uint8)


def _natural_key(path: Path):
    """Sort key of a frame file: digit runs compare as numbers (``frame_2`` < ``frame_10``), then the name."""
    parts = re.split(r"(\d+)", path.name.lower())
    return [int(p) if i % 2 else p for i, p in enumerate(parts)], path.name


def _frame_files(folder: Path) -> List[Path]:
    """The image files of a frames folder in natural name order (hidden files such as macOS ``._x.png`` skipped)."""
    files = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")),
        key=_natural_key,
    )
    if not files:
        raise VideoReadError(f"folder {str(folder)!r} has no image frames ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _read_images(files: Sequence[Path], what: str, keep_uint8: bool = False) -> torch.Tensor:
    from PIL import Image

    arrays = []
    for file in files:
        try:
            with Image.open(file) as img:
                arrays.append(_image_array(img, f"frame {str(file)!r}"))
        except VideoReadError:
            raise
        except Exception as exc:
            raise VideoReadError(f"cannot read frame {str(file)!r}: {exc}") from exc
    return _stack_images(arrays, what, keep_uint8)


def _cannot_read(path: Path, exc: Exception) -> VideoReadError:
    return VideoReadError(f"cannot read video {str(path)!r}: {type(exc).__name__}: {exc}")


def gif_frame_index(durations: Sequence[Optional[float]]) -> List[int]:
    """Constant-rate frame index of a gif: source frame ``i`` shown ``durations[i]`` ms repeats
    round(durations[i] / shortest) times (1 to MAX_GIF_FRAME_REPEAT). Equal or missing durations: every frame once."""
    known = [d for d in durations if d and d > 0]
    if len(known) < len(durations) or len(set(known)) <= 1:
        return list(range(len(durations)))
    unit = min(known)
    index = []
    for i, d in enumerate(durations):
        index.extend([i] * min(MAX_GIF_FRAME_REPEAT, max(1, round(d / unit))))
    return index


def _read_gif(path: Path, keep_uint8: bool) -> torch.Tensor:
    """All frames of a gif at a constant rate (:func:`gif_frame_index`)."""
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as img:
            arrays, durations = [], []
            for frame in ImageSequence.Iterator(img):
                arrays.append(np.asarray(frame.convert("RGB")))
                durations.append(frame.info.get("duration"))
    except Exception as exc:  # PIL raises several types for corrupt / unknown files
        raise _cannot_read(path, exc) from exc
    if not arrays:
        raise VideoReadError(f"video {str(path)!r} has no frames")
    index = gif_frame_index(durations)
    return _stack_images([arrays[i] for i in index], f"video {str(path)!r}", keep_uint8)


def _count_video_frames(path: Path) -> int:
    """Frames of a video file as ffmpeg decodes them (decoded in ffmpeg, nothing converted or kept)."""
    import imageio_ffmpeg

    try:
        count, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except Exception as exc:  # RuntimeError from ffmpeg on unreadable files
        raise _cannot_read(path, exc) from exc
    return int(count)


def _decode_frames(path: Path, keep: Optional[Sequence[int]] = None, stop_early: bool = False):
    """(frames, decoded): the (H, W, C) uint8 frames of an ffmpeg-readable file at the indices ``keep`` (every
    frame if None), in that order (an index may repeat; indices past the end are left out), and how many frames were
    decoded: all of them, or with ``stop_early`` up to the last index kept."""
    import imageio.v3 as iio

    wanted: Optional[Dict[int, np.ndarray]] = None if keep is None else dict.fromkeys(keep)
    last = max(keep, default=-1) if stop_early and keep is not None else None
    arrays, decoded = [], 0
    try:
        for i, frame in enumerate(iio.imiter(path, plugin="FFMPEG")):
            decoded = i + 1
            if wanted is None:
                arrays.append(np.asarray(frame))
            elif i in wanted:
                wanted[i] = np.asarray(frame)
            if last is not None and i >= last:
                break
    except Exception as exc:  # imageio raises several types for corrupt / unknown files
        raise _cannot_read(path, exc) from exc
    if decoded == 0:
        raise VideoReadError(f"video {str(path)!r} has no frames")
    if wanted is not None:
        arrays = [wanted[i] for i in keep if wanted[i] is not None]
    return arrays, decoded


def _sampled_video_file(path: Path, num_frames: int, start: int, stride: Optional[int]) -> torch.Tensor:
    """The frames :func:`sample_frames` picks from a video file, uint8 (num_frames, 3, H, W), decoded in one pass
    that keeps only them (with a stride: up to the last one). Uniform sampling picks them from ffmpeg's frame count
    and checks it against the frames decoded (if they differ, a second pass picks them from the true count)."""
    what = f"video {str(path)!r}"
    if stride is None:
        counted = _count_video_frames(path)
        index = frame_indices(counted, num_frames, start)  # a too-short clip fails here, before any decoding
        arrays, decoded = _decode_frames(path, index)
        if decoded != counted:
            true_index = frame_indices(decoded, num_frames, start)
            if true_index != index:
                arrays, _ = _decode_frames(path, true_index)
    else:
        arrays, decoded = _decode_frames(path, [start + stride * i for i in range(num_frames)], stop_early=True)
        if len(arrays) < num_frames:
            frame_indices(decoded, num_frames, start, stride)  # raises the too-short error
    return _stack_images(arrays, what, keep_uint8=True)


def _existing_path(source) -> Path:
    path = Path(source)
    if not path.exists():
        raise VideoReadError(f"reference video {str(path)!r} does not exist")
    return path


def _as_video(source: VideoLike, keep_uint8: bool = False) -> torch.Tensor:
    if isinstance(source, (str, os.PathLike)):
        path = _existing_path(source)
        if path.is_dir():
            return _read_images(_frame_files(path), f"folder {str(path)!r}", keep_uint8)
        if path.suffix.lower() == ".gif":
            return _read_gif(path, keep_uint8)
        return _stack_images(_decode_frames(path)[0], f"video {str(path)!r}", keep_uint8)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return _video_tensor(source, "reference video array", keep_uint8)
    if isinstance(source, (list, tuple)):
        if len(source) == 0:
            raise VideoReadError("reference video is an empty list of frames")
        if all(hasattr(img, "convert") for img in source):
            arrays = [_image_array(img, f"reference frame {i}") for i, img in enumerate(source)]
            return _stack_images(arrays, "reference frame list", keep_uint8)
        return _video_tensor(np.stack([np.asarray(f) for f in source]), "reference frame list", keep_uint8)
    raise VideoReadError(
        f"reference video must be a path, a list of PIL images, an array or a tensor, got {type(source).__name__}"
    )


def load_video(source: VideoLike) -> torch.Tensor:
    """Read a video into a float32 tensor (F, 3, H, W) in [0, 1].

    Args:
        source: a path to a video file (mp4, gif, anything ffmpeg reads) or to a folder of image frames (natural
            name order, hidden files skipped); a list of PIL images; a uint8 or [0, 1] float (values up to
            FLOAT_RANGE_SLACK outside are clamped) array / tensor shaped
            (F, H, W, C) or (F, C, H, W) with C in {1, 3, 4} (alpha is dropped, gray is replicated), or (F, H, W).
            16-bit grayscale images are read as value / 65535. A gif with frames of different durations comes out
            at a constant rate (:func:`gif_frame_index`).

    Raises:
        VideoReadError (a ValueError): missing or unreadable file, empty video, bad shape / dtype / range.
    """
    return _as_video(source)


def _check_sampling(num_frames: int, start: int, stride: Optional[int]) -> None:
    if num_frames < MIN_FRAMES:
        raise ValueError(f"num_frames must be >= {MIN_FRAMES} for motion transfer, got {num_frames}")
    if not (isinstance(start, int) and start >= 0):
        raise ValueError(f"the reference start frame must be an int >= 0, got {start!r}")
    if stride is not None and not (isinstance(stride, int) and stride >= 1):
        raise ValueError(f"the reference frame stride must be an int >= 1 (or None: uniform), got {stride!r}")


def frame_indices(available: int, num_frames: int, start: int = 0, stride: Optional[int] = None) -> List[int]:
    """The input frames :func:`sample_frames` picks from a clip of ``available`` frames (see there); raises the
    same errors."""
    _check_sampling(num_frames, start, stride)
    if stride is None:
        if available - start < num_frames:
            after_start = f" ({available - start} from frame {start})" if start else ""
            raise ValueError(
                f"the reference video has {available} frames{after_start} but {num_frames} are requested; frames "
                "are sampled uniformly in time and never duplicated, so pass a longer clip"
                f"{', an earlier start' if start else ''} or a smaller num_frames (<= {max(0, available - start)})"
            )
        return (start + torch.linspace(0, available - 1 - start, num_frames).round().long()).tolist()
    needed = start + (num_frames - 1) * stride + 1
    if available < needed:
        raise ValueError(
            f"the reference video has {available} frames but {num_frames} frames every {stride} from frame "
            f"{start} need {needed}; pass a longer clip, an earlier start, a smaller stride or num_frames"
        )
    return [start + stride * i for i in range(num_frames)]


def sample_frames(video: torch.Tensor, num_frames: int, start: int = 0, stride: Optional[int] = None) -> torch.Tensor:
    """Pick ``num_frames`` frames of ``video`` (F, 3, H, W) from frame ``start`` on.

    With ``stride=None``, uniformly in time over frames ``start .. F - 1``, keeping both ends: frame ``i`` of the
    result is input frame ``start + round(i * (F - 1 - start) / (num_frames - 1))`` (a long clip's motion is sped
    up to fit). With ``stride=k``, every k-th frame: ``start + i * k`` (the clip's speed kept at k input frames per
    output frame, e.g. k = 2 for a 30 fps clip played at 16 fps). Raises a ValueError when the clip is too short
    (frames are never duplicated), ``num_frames < 2``, ``start < 0`` or ``stride < 1``.
    """
    return video[frame_indices(video.shape[0], num_frames, start, stride)]


def resize_video(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Center-crop (F, 3, H, W) (float in [0, 1] or uint8) to the aspect ratio of ``height x width``, then
    bilinear-resize to that size: float32 (F, 3, height, width) in [0, 1]. Converts RESIZE_CHUNK frames at a time."""
    _, _, h, w = video.shape
    target = width / height
    if w / h > target:  # too wide: crop columns
        new_w = max(1, round(h * target))
        left = (w - new_w) // 2
        video = video[..., left : left + new_w]
    elif w / h < target:  # too tall: crop rows
        new_h = max(1, round(w / target))
        top = (h - new_h) // 2
        video = video[..., top : top + new_h, :]
    chunks = []
    for chunk in video.split(RESIZE_CHUNK):
        chunk = chunk.float() / 255.0 if chunk.dtype == torch.uint8 else chunk.float()
        if chunk.shape[-2:] != (height, width):
            chunk = F.interpolate(chunk, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        chunks.append(chunk.clamp(0, 1))
    return torch.cat(chunks)


def prepare_reference(
    source: VideoLike, num_frames: int, height: int, width: int, start: int = 0, stride: Optional[int] = None
) -> torch.Tensor:
    """Load, sample ``num_frames`` (:func:`sample_frames`: uniformly by default, every ``stride``-th from ``start``)
    and resize to ``height x width``: (num_frames, 3, height, width) in [0, 1].

    Equal to ``resize_video(sample_frames(load_video(source), ...), height, width)``, but a video file or a folder
    of frames is read frame by frame, keeping only the sampled frames (a video file is counted by ffmpeg first when
    sampling uniformly)."""
    _check_sampling(num_frames, start, stride)
    if isinstance(source, (str, os.PathLike)):
        path = _existing_path(source)
        if path.is_dir():
            files = _frame_files(path)
            picked = [files[i] for i in frame_indices(len(files), num_frames, start, stride)]
            return resize_video(_read_images(picked, f"folder {str(path)!r}", keep_uint8=True), height, width)
        if path.suffix.lower() != ".gif":
            return resize_video(_sampled_video_file(path, num_frames, start, stride), height, width)
    video = _as_video(source, keep_uint8=True)
    return resize_video(sample_frames(video, num_frames, start, stride), height, width)


def _to_uint8_frames(frames) -> List[np.ndarray]:
    """Frames as a list of (H, W, 3) uint8 arrays from PIL images, (F, H, W, 3) arrays or (F, 3, H, W) tensors."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        if frames.dim() == 4 and frames.shape[1] == 3 and frames.shape[-1] != 3:
            frames = frames.permute(0, 2, 3, 1)
        frames = frames.float().numpy()
    if isinstance(frames, (list, tuple)) and frames and hasattr(frames[0], "convert"):
        return [np.asarray(f.convert("RGB")) for f in frames]
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise ValueError(f"frames must be (F, H, W, 3) with F >= 1, got shape {array.shape}")
    if array.dtype != np.uint8:
        if np.isnan(array).any():
            raise ValueError("frames contain NaN values (a diverged generation?); nothing was written")
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return list(array)


def _new_file_mode() -> int:
    """Permissions of a newly created file: 0666 less the process umask (mkstemp's own file is 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_video(frames, path: Union[str, os.PathLike], fps: int = DEFAULT_FPS) -> Path:
    """Write frames to ``path`` (.mp4 or .gif) atomically (temporary file + rename); returns the path.

    Args:
        frames: (F, H, W, 3) float in [0, 1] or uint8, a (F, 3, H, W) tensor, or a list of PIL images.
        fps: frames per second. A gif stores each frame's delay in 1/100 s (16 fps plays at 16.7 fps) and browsers
            slow delays under 20 ms down (a warning above GIF_MAX_FPS); the gif writer stores identical consecutive
            frames as one longer frame (the timing is kept; :func:`load_video` counts it as that many frames when
            other frames are shorter).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(f"output must end with one of {WRITE_SUFFIXES}, got {str(path)!r}")
    if not (isinstance(fps, (int, float)) and fps > 0):
        raise ValueError(f"fps must be positive, got {fps!r}")
    if suffix == ".gif" and fps > GIF_MAX_FPS:
        warnings.warn(f"a gif at {fps} fps plays slower in most viewers (delays under 20 ms); use mp4 or fps <= "
                      f"{GIF_MAX_FPS}", stacklevel=2)
    images = _to_uint8_frames(frames)
    height, width = images[0].shape[:2]
    if suffix == ".mp4" and (height % 2 or width % 2):
        raise ValueError(f"mp4 (H.264, yuv420p) needs an even height and width, got {height}x{width}")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        import imageio

        if suffix == ".mp4":
            # export_to_video conventions: libx264 through imageio-ffmpeg; macro_block_size=1 keeps the exact size.
            with imageio.get_writer(tmp_name, format="FFMPEG", fps=fps, quality=8, macro_block_size=1) as writer:
                for image in images:
                    writer.append_data(image)
        else:
            import imageio.v3 as iio

            iio.imwrite(tmp_name, np.stack(images), duration=1000.0 / fps, loop=0)
        if os.path.getsize(tmp_name) == 0:  # ffmpeg can fail without raising
            raise OSError(f"the video encoder wrote nothing for {str(path)!r}")
        os.chmod(tmp_name, _new_file_mode())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        raise
    return path
