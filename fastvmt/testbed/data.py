"""Procedural moving-shape clips with ground-truth trajectories and captions.

Every clip shows ONE anti-aliased shape of fixed size and one of a few saturated colours moving along a smooth
straight or curved path over a flat background. The exact centre of the shape in every frame is returned with the
clip, and the rendering is symmetric about that centre, so the intensity-weighted centroid of the rendered object
equals the ground truth (up to float rounding) -- the property the metrics tests rely on.

Conventions:
- videos are ``float32`` in ``[-1, 1]`` with layout ``(B, C=3, F, H, W)`` (the Wan latent layout, pixel space);
- a trajectory is ``(B, F, 2)`` holding ``(x, y)`` in pixels, where pixel ``(row i, column j)`` has its centre at
  ``(x=j, y=i)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

COLORS: Dict[str, Tuple[float, float, float]] = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
}
SHAPES: Tuple[str, ...] = ("circle", "square")
BACKGROUND_LEVEL = -0.8  # flat dark grey, the same in every clip
ARTICLE = "a"
VOCABULARY: Tuple[str, ...] = (ARTICLE,) + tuple(COLORS) + SHAPES

DEFAULT_FRAMES = 8
DEFAULT_SIZE = 16
DEFAULT_RADIUS = 2.0  # circle radius / half side of the square, in pixels
MIN_SPEED, MAX_SPEED = 0.6, 1.4  # pixels per frame
MAX_TURN = 0.35  # radians per frame for curved paths
CURVED_FRACTION = 0.5
BORDER_MARGIN = 1.0  # pixels kept free between the shape and the frame edge
MAX_REJECTION_ROUNDS = 64


@dataclass
class ClipBatch:
    """A batch of clips with everything known about them.

    videos: (B, 3, F, H, W) in [-1, 1]; trajectories: (B, F, 2) object centres (x, y) in pixels;
    colors / shapes: the object's colour and shape names; captions: "a <colour> <shape>".
    """

    videos: torch.Tensor
    trajectories: torch.Tensor
    colors: List[str]
    shapes: List[str]
    captions: List[str]


def caption_for(color: str, shape: str) -> str:
    """The caption of a clip showing one ``color`` ``shape`` (e.g. "a red circle")."""
    _check_name(color, COLORS, "color")
    _check_name(shape, SHAPES, "shape")
    return f"{ARTICLE} {color} {shape}"


def parse_caption(caption: str) -> Tuple[str, str]:
    """The (colour, shape) named in a caption such as "a red circle"; raises ValueError if either is missing."""
    words = caption.lower().replace(",", " ").split()
    colors = [w for w in words if w in COLORS]
    shapes = [w for w in words if w in SHAPES]
    if len(colors) != 1 or len(shapes) != 1:
        raise ValueError(
            f"caption {caption!r} must name exactly one colour of {sorted(COLORS)} and one shape of {list(SHAPES)}"
        )
    return colors[0], shapes[0]


def _check_name(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; accepted: {sorted(allowed)}")


def radius_for(size: int) -> float:
    """The object radius used at frame size ``size`` (DEFAULT_RADIUS at DEFAULT_SIZE, proportional otherwise)."""
    return DEFAULT_RADIUS * size / DEFAULT_SIZE


def render_clips(
    trajectories: torch.Tensor,
    colors: Sequence[str],
    shapes: Sequence[str],
    size: int = DEFAULT_SIZE,
    radius: Optional[float] = None,
) -> torch.Tensor:
    """Render one shape per clip along the given centre trajectories.

    trajectories: (B, F, 2) centres (x, y) in pixels; colors, shapes: B names each.
    Returns videos (B, 3, F, size, size) float32 in [-1, 1]. Edges are anti-aliased with a linear ramp of one pixel
    around the exact boundary (coverage = clamp(0.5 - signed_distance, 0, 1)), symmetric about the centre.
    ``radius`` defaults to :func:`radius_for` ``(size)``.
    """
    radius = radius_for(size) if radius is None else radius
    if trajectories.ndim != 3 or trajectories.shape[-1] != 2:
        raise ValueError(f"trajectories must be (B, F, 2), got {tuple(trajectories.shape)}")
    batch = trajectories.shape[0]
    if len(colors) != batch or len(shapes) != batch:
        raise ValueError(f"need {batch} colours and shapes, got {len(colors)} and {len(shapes)}")
    for c, s in zip(colors, shapes):
        _check_name(c, COLORS, "color")
        _check_name(s, SHAPES, "shape")
    traj = trajectories.float()
    coords = torch.arange(size, dtype=torch.float32)
    dx = coords.view(1, 1, 1, size) - traj[..., 0].view(batch, -1, 1, 1)  # (B, F, 1, W)
    dy = coords.view(1, 1, size, 1) - traj[..., 1].view(batch, -1, 1, 1)  # (B, F, H, 1)
    circle_distance = torch.sqrt(dx * dx + dy * dy) - radius
    square_distance = torch.maximum(dx.abs(), dy.abs()) - radius
    is_circle = torch.tensor([s == "circle" for s in shapes]).view(batch, 1, 1, 1)
    distance = torch.where(is_circle, circle_distance, square_distance)
    coverage = (0.5 - distance).clamp(0.0, 1.0)  # (B, F, H, W)
    color = torch.tensor([COLORS[c] for c in colors], dtype=torch.float32).view(batch, 3, 1, 1, 1)
    coverage = coverage.unsqueeze(1)  # (B, 1, F, H, W)
    return BACKGROUND_LEVEL * (1.0 - coverage) + color * coverage


def sample_trajectories(
    batch: int,
    frames: int = DEFAULT_FRAMES,
    size: int = DEFAULT_SIZE,
    radius: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    curved_fraction: float = CURVED_FRACTION,
) -> torch.Tensor:
    """Smooth object paths that stay inside the frame: constant speed, constant turn rate (0 for straight paths).

    Speeds are MIN_SPEED..MAX_SPEED px/frame at DEFAULT_SIZE and scale with ``size``; ``radius`` defaults to
    :func:`radius_for` ``(size)``. Returns (batch, frames, 2) centres (x, y) in pixels, float32. Paths leaving the
    frame are redrawn.
    """
    radius = radius_for(size) if radius is None else radius
    speed_scale = size / DEFAULT_SIZE
    low, high = radius + BORDER_MARGIN, size - 1 - radius - BORDER_MARGIN
    if high <= low:
        raise ValueError(f"frame size {size} too small for radius {radius}")
    out = torch.empty(batch, frames, 2)
    todo = torch.arange(batch)
    for _ in range(MAX_REJECTION_ROUNDS):
        n = todo.numel()
        if n == 0:
            return out
        u = torch.rand(n, 6, generator=generator)
        start = low + (high - low) * u[:, :2]
        speed = (MIN_SPEED + (MAX_SPEED - MIN_SPEED) * u[:, 2]) * speed_scale
        heading = 2.0 * math.pi * u[:, 3]
        turn = (2.0 * u[:, 4] - 1.0) * MAX_TURN * (u[:, 5] < curved_fraction).float()
        angles = heading.view(n, 1) + turn.view(n, 1) * torch.arange(frames - 1, dtype=torch.float32).view(1, -1)
        steps = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1) * speed.view(n, 1, 1)
        path = torch.cat([start.view(n, 1, 2), start.view(n, 1, 2) + steps.cumsum(dim=1)], dim=1)
        inside = ((path >= low) & (path <= high)).all(dim=2).all(dim=1)
        out[todo[inside]] = path[inside]
        todo = todo[~inside]
    # Extremely unlikely: fall back to static objects for the rest.
    out[todo] = ((low + high) / 2.0)
    return out


def sample_clips(
    batch: int,
    frames: int = DEFAULT_FRAMES,
    size: int = DEFAULT_SIZE,
    radius: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> ClipBatch:
    """A random batch of clips: uniform colour and shape, smooth random paths. videos: (B, 3, F, size, size)."""
    trajectories = sample_trajectories(batch, frames, size, radius, generator)
    color_names = list(COLORS)
    picks = torch.randint(0, len(color_names) * len(SHAPES), (batch,), generator=generator).tolist()
    colors = [color_names[p % len(color_names)] for p in picks]
    shapes = [SHAPES[p // len(color_names)] for p in picks]
    videos = render_clips(trajectories, colors, shapes, size, radius)
    captions = [caption_for(c, s) for c, s in zip(colors, shapes)]
    return ClipBatch(videos, trajectories, colors, shapes, captions)


def arc_trajectory(
    frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE, radius: Optional[float] = None
) -> torch.Tensor:
    """The demo's reference path: a half-circle arc from the lower left over the top to the lower right.

    Returns (frames, 2) centres (x, y) in pixels.
    """
    radius = radius_for(size) if radius is None else radius
    low, high = radius + BORDER_MARGIN + 0.5, size - 1 - radius - BORDER_MARGIN - 0.5
    cx, cy = (low + high) / 2.0, high
    rx, ry = (high - low) / 2.0, (high - low) * 0.7
    angle = torch.linspace(math.pi, 0.0, frames)
    return torch.stack([cx + rx * torch.cos(angle), cy - ry * torch.sin(angle)], dim=-1)


def video_to_uint8(video: torch.Tensor) -> "list":
    """Frames as uint8 HWC numpy arrays. video: (3, F, H, W) in [-1, 1]. Returns F arrays of shape (H, W, 3)."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be (3, F, H, W), got {tuple(video.shape)}")
    frames = ((video.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
    return [f.numpy() for f in frames]
