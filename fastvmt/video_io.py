"""Reference-video reading, resampling and writing.

Layout throughout: a video is a float32 tensor (F, 3, H, W) with values in [0, 1].

- :func:`load_video` reads an mp4 / gif / other ffmpeg-readable file, a folder of image frames (sorted by name), a
  list of PIL images, a numpy array or a torch tensor.
- :func:`prepare_reference` samples ``num_frames`` frames uniformly in time (the first and last frames are kept),
  or every ``stride``-th frame from ``start`` (a clip with fewer frames than that needs is an error, frames are never
  invented) and resizes them to
  ``height x width`` (center crop to the target aspect ratio, then bilinear resize with antialiasing).
- :func:`write_video` writes mp4 (H.264 through imageio-ffmpeg, as ``diffusers.utils.export_to_video``) or gif to a
  temporary file next to the target and renames it, so a failure never leaves a half-written file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".gif", ".mov", ".avi", ".mkv", ".webm")
WRITE_SUFFIXES = (".mp4", ".gif")
MIN_FRAMES = 2
DEFAULT_FPS = 16

VideoLike = Union[str, os.PathLike, Sequence, np.ndarray, torch.Tensor]


class VideoReadError(ValueError):
    """The reference video could not be read or has no usable frames."""


def _from_array(array: Union[np.ndarray, torch.Tensor], what: str) -> torch.Tensor:
    """(F, H, W, 3|1) or (F, 3|1, H, W) uint8 / float -> (F, 3, H, W) float32 in [0, 1]."""
    video = torch.as_tensor(np.asarray(array) if isinstance(array, np.ndarray) else array)
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
        video = video.float() / 255.0
    elif video.is_floating_point():
        video = video.float()
        if torch.isnan(video).any():
            raise VideoReadError(f"{what} contains NaN values")
        if video.min() < 0 or video.max() > 1:
            raise VideoReadError(
                f"{what} float values must lie in [0, 1], got [{video.min().item():.3g}, {video.max().item():.3g}]"
            )
    else:
        raise VideoReadError(f"{what} must be uint8 or float, got dtype {video.dtype}")
    if video.shape[1] == 1:
        video = video.expand(-1, 3, -1, -1)
    return video[:, :3].contiguous()


def _from_images(images: Sequence, what: str) -> torch.Tensor:
    frames = [np.asarray(img.convert("RGB")) for img in images]
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise VideoReadError(f"{what} frames differ in size: {sorted(sizes)}")
    return _from_array(np.stack(frames), what)


def _read_file(path: Path) -> torch.Tensor:
    import imageio.v3 as iio

    try:
        if path.suffix.lower() == ".gif":
            frames = iio.imread(path, index=None)
        else:
            frames = np.stack([np.asarray(f) for f in iio.imiter(path, plugin="FFMPEG")])
    except Exception as exc:  # imageio raises several types for corrupt / unknown files
        raise VideoReadError(f"cannot read video {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    if frames.ndim == 3:  # a single gif frame
        frames = frames[None]
    if frames.shape[0] == 0:
        raise VideoReadError(f"video {str(path)!r} has no frames")
    return _from_array(frames, f"video {str(path)!r}")


def _read_folder(path: Path) -> torch.Tensor:
    from PIL import Image

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise VideoReadError(f"folder {str(path)!r} has no image frames ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for file in files:
        try:
            with Image.open(file) as img:
                images.append(img.convert("RGB"))
        except Exception as exc:
            raise VideoReadError(f"cannot read frame {str(file)!r}: {exc}") from exc
    return _from_images(images, f"folder {str(path)!r}")


def load_video(source: VideoLike) -> torch.Tensor:
    """Read a video into a float32 tensor (F, 3, H, W) in [0, 1].

    Args:
        source: a path to a video file (mp4, gif, anything ffmpeg reads) or to a folder of image frames (sorted by
            file name); a list of PIL images; a uint8 or [0, 1] float array / tensor shaped (F, H, W, C) or
            (F, C, H, W) with C in {1, 3, 4} (alpha is dropped, gray is replicated).

    Raises:
        VideoReadError (a ValueError): missing or unreadable file, empty video, bad shape / dtype / range.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise VideoReadError(f"reference video {str(path)!r} does not exist")
        if path.is_dir():
            return _read_folder(path)
        return _read_file(path)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return _from_array(source, "reference video array")
    if isinstance(source, (list, tuple)):
        if len(source) == 0:
            raise VideoReadError("reference video is an empty list of frames")
        if all(hasattr(img, "convert") for img in source):
            return _from_images(source, "reference frame list")
        return _from_array(np.stack([np.asarray(f) for f in source]), "reference frame list")
    raise VideoReadError(
        f"reference video must be a path, a list of PIL images, an array or a tensor, got {type(source).__name__}"
    )


def sample_frames(video: torch.Tensor, num_frames: int, start: int = 0, stride: Optional[int] = None) -> torch.Tensor:
    """Pick ``num_frames`` frames of ``video`` (F, 3, H, W) from frame ``start`` on.

    With ``stride=None``, uniformly in time over frames ``start .. F - 1``, keeping both ends: frame ``i`` of the
    result is input frame ``start + round(i * (F - 1 - start) / (num_frames - 1))`` (a long clip's motion is sped
    up to fit). With ``stride=k``, every k-th frame: ``start + i * k`` (the clip's speed kept at k input frames per
    output frame, e.g. k = 2 for a 30 fps clip played at 16 fps). Raises a ValueError when the clip is too short
    (frames are never duplicated), ``num_frames < 2``, ``start < 0`` or ``stride < 1``.
    """
    available = video.shape[0]
    if num_frames < MIN_FRAMES:
        raise ValueError(f"num_frames must be >= {MIN_FRAMES} for motion transfer, got {num_frames}")
    if not (isinstance(start, int) and start >= 0):
        raise ValueError(f"the reference start frame must be an int >= 0, got {start!r}")
    if stride is not None and not (isinstance(stride, int) and stride >= 1):
        raise ValueError(f"the reference frame stride must be an int >= 1 (or None: uniform), got {stride!r}")
    if stride is None:
        if available - start < num_frames:
            after_start = f" ({available - start} from frame {start})" if start else ""
            raise ValueError(
                f"the reference video has {available} frames{after_start} but {num_frames} are requested; frames "
                "are sampled uniformly in time and never duplicated, so pass a longer clip"
                f"{', an earlier start' if start else ''} or a smaller num_frames (<= {max(0, available - start)})"
            )
        index = start + torch.linspace(0, available - 1 - start, num_frames).round().long()
    else:
        needed = start + (num_frames - 1) * stride + 1
        if available < needed:
            raise ValueError(
                f"the reference video has {available} frames but {num_frames} frames every {stride} from frame "
                f"{start} need {needed}; pass a longer clip, an earlier start, a smaller stride or num_frames"
            )
        index = start + stride * torch.arange(num_frames)
    return video[index]


def resize_video(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Center-crop (F, 3, H, W) to the aspect ratio of ``height x width``, then bilinear-resize to that size."""
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
    if video.shape[-2:] != (height, width):
        video = F.interpolate(video, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return video.clamp(0, 1)


def prepare_reference(
    source: VideoLike, num_frames: int, height: int, width: int, start: int = 0, stride: Optional[int] = None
) -> torch.Tensor:
    """Load, sample ``num_frames`` (:func:`sample_frames`: uniformly by default, every ``stride``-th from ``start``)
    and resize to ``height x width``: (num_frames, 3, height, width) in [0, 1]."""
    return resize_video(sample_frames(load_video(source), num_frames, start, stride), height, width)


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
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return list(array)


def write_video(frames, path: Union[str, os.PathLike], fps: int = DEFAULT_FPS) -> Path:
    """Write frames to ``path`` (.mp4 or .gif) atomically (temporary file + rename); returns the path.

    Args:
        frames: (F, H, W, 3) float in [0, 1] or uint8, a (F, 3, H, W) tensor, or a list of PIL images.
        fps: frames per second.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(f"output must end with one of {WRITE_SUFFIXES}, got {str(path)!r}")
    if not (isinstance(fps, (int, float)) and fps > 0):
        raise ValueError(f"fps must be positive, got {fps!r}")
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
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        raise
    return path
