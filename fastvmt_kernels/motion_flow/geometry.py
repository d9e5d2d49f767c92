"""Frame, tile, window and pair geometry of the attention motion flow (shared by the reference and the kernels).

A frame is a ``(Hf, Wf)`` grid of tokens in raster order (``s = y * Wf + x``). Tiles of ``(th, tw)`` tokens start
at the top-left corner; the last row / column of tiles may be partial. Tiles are numbered in raster order over the
``(ceil(Hf / th), ceil(Wf / tw))`` tile grid. A window of requested side ``window_a`` covers
``l_a = min(window_a, frame_a)`` tokens along axis ``a``; its origin for a soft-argmax centre ``c_a`` is
``o_a = clamp(floor(c_a + 0.5) - window_a // 2, 0, frame_a - l_a)`` (the origin is clamped, so a window never
leaves the frame and always holds ``l_y * l_x`` distinct keys).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, NamedTuple, Sequence, Tuple, Union

import torch

from ..layout import ceil_div

Pair = Tuple[int, int]


def _as_positive_pair(value: Union[int, Sequence[int]], name: str, allow_int: bool) -> Pair:
    """``value`` as two positive Python ints (an int is broadcast when ``allow_int``), else a ValueError."""
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        items = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be 2 positive ints (y, x), got {value!r}") from None
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{name} must be 2 positive ints (y, x), got {value!r}")
    if min(items) < 1:
        raise ValueError(f"{name} entries must be >= 1, got {items}")
    return items  # type: ignore[return-value]


class PairTable(NamedTuple):
    """The frame pairs of one (num_frames, span) on one device, in the layouts the kernels and references read.

    pairs: (P, 2) int64 (i, j); pair_i, pair_j: (P,) int32; offsets: (F + 1,) int32, the pairs of frame i are rows
    offsets[i] .. offsets[i + 1] - 1 (pairs are ordered by i, then j).
    """

    pairs: torch.Tensor
    pair_i: torch.Tensor
    pair_j: torch.Tensor
    offsets: torch.Tensor


# One table per (num_frames, span, device): built on the host and copied once, so that a motion-flow step on a GPU
# needs no host-to-device copy (a pageable copy would synchronise the host with the GPU every call).
_PAIR_TABLES: Dict[Tuple[int, int, torch.device], PairTable] = {}


def pair_table(num_frames: int, span: int, device: Union[torch.device, str, None] = None) -> PairTable:
    """The cached :class:`PairTable` of all (i, j), 0 <= i < F, i <= j < min(F, i + span), on ``device``.

    The tensors are shared between callers: treat them as read-only (:func:`make_pairs` returns a copy).
    """
    key = (int(num_frames), int(span), torch.device(device if device is not None else "cpu"))
    table = _PAIR_TABLES.get(key)
    if table is None:
        rows = [(i, j) for i in range(num_frames) for j in range(i, min(num_frames, i + span))]
        offsets = [0]
        for i in range(num_frames):
            offsets.append(offsets[-1] + min(num_frames, i + span) - i)
        pairs = torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)
        table = PairTable(
            pairs.to(key[2]), pairs[:, 0].to(torch.int32).to(key[2]), pairs[:, 1].to(torch.int32).to(key[2]),
            torch.tensor(offsets, dtype=torch.int32).to(key[2]),
        )
        _PAIR_TABLES[key] = table
    return table


def make_pairs(num_frames: int, span: int, device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """(P, 2) int64 frame pairs (i, j), 0 <= i < F, i <= j < min(F, i + span), ordered by i then j.

    A fresh tensor each call (a device-side copy of the cached :func:`pair_table`: no host synchronisation).
    """
    return pair_table(num_frames, span, device).pairs.clone()


@dataclass(frozen=True)
class FlowGeometry:
    """Validated geometry of one motion-flow problem.

    Attributes:
        frame: (Hf, Wf) tokens per frame.
        tile: (th, tw) tokens per tile.
        window: (wy, wx) requested window sides in tokens (may exceed the frame).
    """

    frame: Pair
    tile: Pair
    window: Pair

    @classmethod
    def create(cls, frame_shape, tile, window) -> "FlowGeometry":
        """Validate and build; a bad value raises a ValueError naming it."""
        return cls(
            _as_positive_pair(frame_shape, "frame_shape", allow_int=False),
            _as_positive_pair(tile, "tile", allow_int=False),
            _as_positive_pair(window, "window", allow_int=True),
        )

    @property
    def num_tokens(self) -> int:
        """S = Hf * Wf."""
        return self.frame[0] * self.frame[1]

    @property
    def tile_grid(self) -> Pair:
        """(ceil(Hf / th), ceil(Wf / tw)) tiles."""
        return ceil_div(self.frame[0], self.tile[0]), ceil_div(self.frame[1], self.tile[1])

    @property
    def num_tiles(self) -> int:
        """Tiles per frame."""
        ny, nx = self.tile_grid
        return ny * nx

    @property
    def window_sides(self) -> Pair:
        """(l_y, l_x) = (min(wy, Hf), min(wx, Wf)) keys per window side."""
        return min(self.window[0], self.frame[0]), min(self.window[1], self.frame[1])

    @property
    def window_size(self) -> int:
        """Keys per window, l_y * l_x."""
        ly, lx = self.window_sides
        return ly * lx

    @property
    def covers_frame(self) -> bool:
        """True when every window is the whole frame (all origins are 0: the global, DiTFlow AMF)."""
        return self.window_sides == self.frame

    @property
    def max_origin(self) -> Pair:
        """Largest legal origin per axis, frame_a - l_a."""
        return self.frame[0] - self.window_sides[0], self.frame[1] - self.window_sides[1]

    def token_positions(self, device=None) -> torch.Tensor:
        """(S, 2) float32 (y, x) of every token of a frame, raster order."""
        hf, wf = self.frame
        s = torch.arange(hf * wf, device=device)
        return torch.stack([s // wf, s % wf], dim=1).float()

    def tile_tokens(self, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token indices of every tile: (n_tiles, th*tw) int64 raster indices and a bool validity mask.

        Slot ``t`` of a tile is the token at in-tile row ``t // tw`` and column ``t % tw``; slots that fall
        outside a ragged frame edge are invalid and hold index 0.
        """
        hf, wf = self.frame
        th, tw = self.tile
        ny, nx = self.tile_grid
        tiles = torch.arange(ny * nx, device=device)
        slots = torch.arange(th * tw, device=device)
        y = (tiles // nx)[:, None] * th + (slots // tw)[None, :]
        x = (tiles % nx)[:, None] * tw + (slots % tw)[None, :]
        valid = (y < hf) & (x < wf)
        return torch.where(valid, y * wf + x, torch.zeros_like(y)), valid

    def window_offsets(self, device=None) -> torch.Tensor:
        """(l_y * l_x, 2) int64 (dy, dx) offsets of the window positions from the origin, raster order."""
        ly, lx = self.window_sides
        w = torch.arange(ly * lx, device=device)
        return torch.stack([w // lx, w % lx], dim=1)

    def origins_from_centres(self, centres: torch.Tensor) -> torch.Tensor:
        """Window origins (..., 2) int64 from soft-argmax centres (..., 2) float (y, x)."""
        half = torch.tensor([self.window[0] // 2, self.window[1] // 2], device=centres.device)
        hi = torch.tensor(self.max_origin, device=centres.device)
        origin = torch.floor(centres + 0.5).to(torch.int64) - half
        return torch.minimum(origin.clamp_min(0), hi)
