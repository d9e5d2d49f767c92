"""Weight-free motion metrics for testbed clips: object centroids by colour, trajectory errors, detection, leakage.

Videos are ``(3, F, H, W)`` float tensors in ``[-1, 1]`` (use :func:`as_video` to convert pipeline outputs);
trajectories are ``(F, 2)`` centres ``(x, y)`` in pixels (pixel row i, column j has its centre at x=j, y=i), with NaN
rows for frames where no object was detected.

Segmentation: a pixel's *coverage* of colour ``c`` is its projection on the segment from the background colour to
``c`` (1 = pure ``c``, 0 = background), kept where the pixel lies close to that segment. The object is the largest
8-connected component of pixels with coverage >= CORE_COVERAGE (at least MIN_CORE_PIXELS of them, else the frame
counts as "not detected"), grown by one pixel; its centroid is the coverage-weighted mean position over those pixels
with coverage >= COVERAGE_MIN, which recovers the exact centre of the rendered (symmetric) shapes of
:mod:`fastvmt.testbed.data`. Scattered noise pixels of the right colour are not an object.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .data import BACKGROUND_LEVEL, COLORS, sample_trajectories

COVERAGE_MIN = 0.3  # pixels less covered than this are background
OFF_SEGMENT_MAX = 0.6  # max RGB distance of a pixel from the background->colour segment
MIN_OBJECT_AREA = 3.0  # summed coverage (in pixels) needed to call the object detected in a frame
MIN_COMPONENT_PIXELS = 2  # connected components smaller than this are ignored as specks
CORE_COVERAGE = 0.5  # pixels at least this covered form an object's core
MIN_CORE_PIXELS = 5  # a detected object's core has at least this many pixels (the smallest shape has ~12)
CHANCE_SAMPLES = 512
MIN_TRACKED_FRACTION = 0.5  # trajectory errors need the object in at least this fraction of frames
FOREGROUND_DISTANCE = 0.35  # RGB distance from the median colour that marks foreground in user clips


def as_video(video) -> torch.Tensor:
    """Convert a clip to (3, F, H, W) float32 in [-1, 1].

    Accepts a tensor (3, F, H, W) in [-1, 1] (returned as float32), or a numpy/tensor array (F, H, W, 3) as the
    pipeline's ``output_type="np"`` gives it: float in [0, 1] or uint8 in [0, 255].
    """
    if isinstance(video, torch.Tensor) and video.ndim == 4 and video.shape[0] == 3:
        return video.detach().float().cpu()
    array = video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"video must be (3, F, H, W) in [-1, 1] or (F, H, W, 3), got shape {array.shape}")
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    frames = torch.from_numpy(array.astype(np.float32) / scale)
    return (frames * 2.0 - 1.0).permute(3, 0, 1, 2).contiguous()


def color_coverage(video: torch.Tensor, color: str, background: float = BACKGROUND_LEVEL) -> torch.Tensor:
    """Per-pixel coverage of ``color`` over the flat background. video: (3, F, H, W). Returns (F, H, W) in [0, 1]."""
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; accepted: {sorted(COLORS)}")
    target = torch.tensor(COLORS[color]).view(3, 1, 1, 1)
    direction = target - background
    offset = video.float() - background
    alpha = (offset * direction).sum(0) / (direction * direction).sum()
    closest = background + alpha.clamp(0, 1).unsqueeze(0) * direction
    off_segment = (video.float() - closest).norm(dim=0)
    coverage = alpha.clamp(0.0, 1.0)
    return torch.where((coverage >= COVERAGE_MIN) & (off_segment <= OFF_SEGMENT_MAX), coverage,
                       torch.zeros_like(coverage))


def centroids(coverage: torch.Tensor, min_area: float = MIN_OBJECT_AREA) -> torch.Tensor:
    """Coverage-weighted centroid per frame. coverage: (F, H, W). Returns (F, 2) (x, y), NaN where area < min_area."""
    frames, height, width = coverage.shape
    ys = torch.arange(height, dtype=torch.float32).view(1, height, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, width)
    area = coverage.sum(dim=(1, 2))
    safe = area.clamp_min(1e-12)
    cx = (coverage * xs).sum(dim=(1, 2)) / safe
    cy = (coverage * ys).sum(dim=(1, 2)) / safe
    out = torch.stack([cx, cy], dim=-1)
    out[area < min_area] = float("nan")
    return out


def label_components(mask: np.ndarray) -> Tuple[np.ndarray, List[int]]:
    """8-connected components of a boolean (H, W) mask.

    Returns (labels (H, W) int, 0 = background and k >= 1 = component k, sizes: pixel count of component k at
    index k - 1).
    """
    mask = np.asarray(mask, dtype=bool)
    labels = np.zeros(mask.shape, dtype=np.int64)
    height, width = mask.shape
    sizes: List[int] = []
    for i0, j0 in zip(*np.nonzero(mask)):
        if labels[i0, j0]:
            continue
        label = len(sizes) + 1
        stack, size = [(i0, j0)], 0
        labels[i0, j0] = label
        while stack:
            i, j = stack.pop()
            size += 1
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    a, b = i + di, j + dj
                    if 0 <= a < height and 0 <= b < width and mask[a, b] and not labels[a, b]:
                        labels[a, b] = label
                        stack.append((a, b))
        sizes.append(size)
    return labels, sizes


def count_components(mask: np.ndarray, min_pixels: int = MIN_COMPONENT_PIXELS) -> int:
    """Number of 8-connected components of a boolean (H, W) mask with at least ``min_pixels`` pixels."""
    return sum(size >= min_pixels for size in label_components(mask)[1])


def object_coverage(coverage: torch.Tensor) -> torch.Tensor:
    """Keep only the main object: per frame, the largest component of coverage >= CORE_COVERAGE (if it has at least
    MIN_CORE_PIXELS pixels) grown by one pixel to include its anti-aliased rim. coverage: (F, H, W) -> (F, H, W)."""
    out = torch.zeros_like(coverage)
    for f in range(coverage.shape[0]):
        labels, sizes = label_components((coverage[f] >= CORE_COVERAGE).numpy())
        if not sizes or max(sizes) < MIN_CORE_PIXELS:
            continue
        core = torch.from_numpy(labels == 1 + int(np.argmax(sizes))).float()
        grown = torch.nn.functional.max_pool2d(core[None, None], 3, stride=1, padding=1)[0, 0] > 0
        out[f] = torch.where(grown, coverage[f], torch.zeros_like(coverage[f]))
    return out


def trajectory_errors(estimate: torch.Tensor, reference: torch.Tensor) -> Dict[str, float]:
    """Mean centroid distance to the reference over the frames where the estimate exists.

    estimate, reference: (F, 2). ``unaligned``: mean ||est - ref||; ``aligned``: the same after removing the offset at
    the first frame where the estimate exists (compares motion, not placement). Both NaN when the object is tracked in
    fewer than MIN_TRACKED_FRACTION of the frames (or fewer than 2): a trajectory needs most of its frames.
    """
    if estimate.shape != reference.shape or estimate.ndim != 2 or estimate.shape[1] != 2:
        raise ValueError(f"estimate and reference must both be (F, 2), got {tuple(estimate.shape)} and "
                         f"{tuple(reference.shape)}")
    valid = ~torch.isnan(estimate).any(dim=1)
    if int(valid.sum()) < max(2, math.ceil(MIN_TRACKED_FRACTION * len(valid))):
        return {"unaligned": math.nan, "aligned": math.nan}
    first = int(torch.nonzero(valid)[0])
    diff = estimate[valid] - reference[valid].float()
    aligned = diff - (estimate[first] - reference[first].float())
    return {"unaligned": float(diff.norm(dim=1).mean()), "aligned": float(aligned.norm(dim=1).mean())}


def jerkiness(trajectory: torch.Tensor) -> float:
    """Mean norm of the centroid's second difference (px) over consecutive detected triples; NaN if none."""
    second = trajectory[2:] - 2 * trajectory[1:-1] + trajectory[:-2]
    valid = ~torch.isnan(second).any(dim=1)
    return float(second[valid].norm(dim=1).mean()) if bool(valid.any()) else math.nan


def object_trajectory(video, color: str) -> torch.Tensor:
    """Centroid trajectory (F, 2) of the ``color`` object in ``video`` (see :func:`as_video`); NaN = not detected."""
    return centroids(object_coverage(color_coverage(as_video(video), color)))


def score_video(video, color: str, reference_trajectory: Optional[torch.Tensor] = None,
                reference_color: Optional[str] = None) -> Dict[str, float]:
    """All metrics of one generated clip against the prompt's colour and (optionally) the reference motion.

    Returns a dict with ``detection_rate`` (fraction of frames with the ``color`` object), ``single_object_rate``
    (fraction of frames with exactly one connected ``color`` component), ``jerk_px``, and with a reference trajectory
    (F, 2): ``trajectory_error_px`` (first-frame aligned), ``trajectory_error_unaligned_px``; with a reference colour
    different from ``color``: ``leakage`` (fraction of frames where the reference's colour is detected).
    """
    clip = as_video(video)
    coverage = color_coverage(clip, color)
    trajectory = centroids(object_coverage(coverage))
    detected = ~torch.isnan(trajectory).any(dim=1)
    single = [count_components((coverage[f] >= 0.5).numpy()) == 1 for f in range(coverage.shape[0])]
    out = {
        "detection_rate": float(detected.float().mean()),
        "single_object_rate": float(np.mean(single)),
        "jerk_px": jerkiness(trajectory),
    }
    if reference_trajectory is not None:
        errors = trajectory_errors(trajectory, torch.as_tensor(reference_trajectory, dtype=torch.float32))
        out["trajectory_error_px"] = errors["aligned"]
        out["trajectory_error_unaligned_px"] = errors["unaligned"]
    if reference_color is not None and reference_color != color:
        leaked = ~torch.isnan(object_trajectory(clip, reference_color)).any(dim=1)
        out["leakage"] = float(leaked.float().mean())
    return out


def chance_baseline(reference_trajectory: torch.Tensor, samples: int = CHANCE_SAMPLES, seed: int = 0,
                    size: Optional[int] = None) -> Dict[str, float]:
    """Expected errors of a random training-distribution trajectory against ``reference_trajectory`` (F, 2).

    Returns ``{"aligned": px, "unaligned": px}``: the means over ``samples`` random paths (fixed ``seed``).
    """
    reference = torch.as_tensor(reference_trajectory, dtype=torch.float32)
    kwargs = {} if size is None else {"size": size}
    paths = sample_trajectories(samples, frames=reference.shape[0],
                                generator=torch.Generator().manual_seed(seed), **kwargs)
    errors = [trajectory_errors(p, reference) for p in paths]
    return {key: float(np.mean([e[key] for e in errors])) for key in ("aligned", "unaligned")}


def foreground_trajectory(video) -> torch.Tensor:
    """Centroid trajectory (F, 2) of whatever differs from the clip's median colour (for users' own clips).

    The median colour of the frames' border pixels (all frames) is taken as background -- not the whole clip's, which
    an object covering most of the frame would own -- and pixels farther than FOREGROUND_DISTANCE (RGB, in [-1, 1]
    units) are foreground, weighted by their distance. NaN rows where too little foreground.
    """
    clip = as_video(video)  # (3, F, H, W)
    border = torch.cat([clip[..., 0, :], clip[..., -1, :], clip[..., 1:-1, 0], clip[..., 1:-1, -1]], dim=-1)
    background = border.flatten(1).median(dim=1).values.view(3, 1, 1, 1)
    distance = (clip - background).norm(dim=0)
    weight = torch.where(distance > FOREGROUND_DISTANCE, distance, torch.zeros_like(distance))
    return centroids(weight / weight.max().clamp_min(1e-6), min_area=1.0)


def dominant_color(video) -> Optional[str]:
    """The palette colour covering the most pixels of the clip, or None if none is present."""
    clip = as_video(video)
    areas = {c: float(color_coverage(clip, c).sum()) for c in COLORS}
    best = max(areas, key=areas.get)
    return best if areas[best] >= MIN_OBJECT_AREA else None


def mean_ignoring_nan(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN if none)."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def farneback_motion_fidelity(generated, reference) -> Optional[float]:
    """Cosine similarity of mean Farneback optical flows (generated vs reference); None if OpenCV is missing.

    generated, reference: clips accepted by :func:`as_video` with the same frame count.
    """
    try:
        import cv2  # optional dependency
    except ImportError:
        return None

    def flows(clip: torch.Tensor) -> np.ndarray:
        gray = ((clip.mean(0) + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
        return np.stack([cv2.calcOpticalFlowFarneback(gray[i], gray[i + 1], None, 0.5, 1, 5, 3, 5, 1.1, 0)
                         .reshape(-1, 2).mean(0) for i in range(gray.shape[0] - 1)])

    a, b = flows(as_video(generated)).ravel(), flows(as_video(reference)).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
