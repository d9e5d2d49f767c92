"""Token-grid and tile geometry shared by every kernel and reference.

A video DiT such as Wan2.1 flattens its latent token grid ``(T, Hg, Wg)`` into a sequence of
``L = T * Hg * Wg`` tokens in raster order: ``l = (t * Hg + y) * Wg + x``.  Tokens are grouped into
tiles of ``(tt, th, tw)`` tokens starting at the origin; the last tile along an axis may be partial
(ragged grids such as Wan's 21 x 30 x 52 are the normal case).

Local-window rule (the public contract of :func:`fastvmt_kernels.local_attention`): along each axis
``a`` with ``n_a = ceil(grid_a / tile_a)`` tiles and ``w_a = min(window_a, n_a)``, a query in tile
``c_a`` attends the key tiles ``[s_a, s_a + w_a)`` with
``s_a = clamp(c_a - (window_a - 1) // 2, 0, n_a - w_a)``.  The window is shifted inward at the
borders, so every query sees the same number of tiles.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import torch

Triple = Tuple[int, int, int]
NUM_AXES = 3


def _as_positive_triple(value: Sequence[int], name: str) -> Triple:
    """Return ``value`` as a tuple of three positive Python ints or raise a ValueError naming it."""
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of {NUM_AXES} positive ints (t, y, x), got {value!r}") from None
    if len(items) != NUM_AXES or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{name} must be {NUM_AXES} ints (t, y, x), got {value!r}")
    if any(v < 1 for v in items):
        raise ValueError(f"every entry of {name} must be >= 1, got {items}")
    return items  # type: ignore[return-value]


def ceil_div(a: int, b: int) -> int:
    """Integer ceil(a / b) for positive ints."""
    return -(-a // b)


def window_start(c: Union[int, torch.Tensor], n: int, window: int) -> Union[int, torch.Tensor]:
    """First key tile of the window of query tile ``c`` on an axis with ``n`` tiles.

    ``s = clamp(c - (window - 1) // 2, 0, n - min(window, n))``; works on ints and integer tensors.
    """
    hi = n - min(window, n)
    s = c - (window - 1) // 2
    if isinstance(s, torch.Tensor):
        return s.clamp(0, hi)
    return max(0, min(s, hi))


@dataclass(frozen=True)
class TileLayout:
    """Geometry of a local-window attention problem on a ``(T, Hg, Wg)`` token grid.

    Attributes:
        grid: ``(T, Hg, Wg)`` tokens.
        tile: ``(tt, th, tw)`` tokens per tile (the last tile on an axis may be partial).
        window: ``(wt, wh, ww)`` window size counted in tiles, as requested (may exceed the grid).
    """

    grid: Triple
    tile: Triple
    window: Triple

    @classmethod
    def create(cls, grid: Sequence[int], tile: Sequence[int], window: Sequence[int]) -> "TileLayout":
        """Validate and build a layout; raises ValueError with the offending values."""
        return cls(
            _as_positive_triple(grid, "grid"),
            _as_positive_triple(tile, "tile"),
            _as_positive_triple(window, "window"),
        )

    @property
    def num_tokens(self) -> int:
        """L = T * Hg * Wg."""
        t, h, w = self.grid
        return t * h * w

    @property
    def num_tiles(self) -> Triple:
        """``n_a = ceil(grid_a / tile_a)`` per axis."""
        return tuple(ceil_div(g, s) for g, s in zip(self.grid, self.tile))  # type: ignore[return-value]

    @property
    def window_tiles(self) -> Triple:
        """Effective window ``w_a = min(window_a, n_a)`` per axis."""
        return tuple(min(w, n) for w, n in zip(self.window, self.num_tiles))  # type: ignore[return-value]

    @property
    def tile_volume(self) -> int:
        """Tokens in a full tile."""
        a, b, c = self.tile
        return a * b * c

    def window_starts(self, axis: int, tiles: torch.Tensor) -> torch.Tensor:
        """Window start tile along ``axis`` for query tile indices ``tiles`` (integer tensor)."""
        return window_start(tiles, self.num_tiles[axis], self.window[axis])

    def density(self) -> float:
        """Fraction of (query, key) token pairs that the rule keeps (exact, ragged tiles included)."""
        total = 1.0
        for axis in range(NUM_AXES):
            g, s = self.grid[axis], self.tile[axis]
            coords = torch.arange(g)
            tiles = coords // s
            start = self.window_starts(axis, tiles)
            key_tiles = tiles
            keep = (key_tiles[None, :] >= start[:, None]) & (key_tiles[None, :] < start[:, None] + self.window_tiles[axis])
            total *= keep.double().mean().item()
        return total

    def token_coords(self, device: Union[torch.device, str, None] = None) -> torch.Tensor:
        """(L, 3) int64 (t, y, x) coordinates of every token in raster order."""
        t, h, w = self.grid
        tt, yy, xx = torch.meshgrid(
            torch.arange(t, device=device), torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
        )
        return torch.stack([tt.reshape(-1), yy.reshape(-1), xx.reshape(-1)], dim=1)

    def mask_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Bool mask (len(rows), L): which keys the query tokens ``rows`` (raster indices) attend."""
        device = rows.device
        coords = self.token_coords(device)
        tile = torch.tensor(self.tile, device=device)
        key_tiles = coords // tile  # (L, 3)
        query_tiles = key_tiles[rows]  # (R, 3)
        mask = torch.ones(rows.numel(), coords.shape[0], dtype=torch.bool, device=device)
        for axis in range(NUM_AXES):
            start = self.window_starts(axis, query_tiles[:, axis])
            kt = key_tiles[:, axis]
            mask &= (kt[None, :] >= start[:, None]) & (kt[None, :] < start[:, None] + self.window_tiles[axis])
        return mask


def local_attention_mask(
    grid: Sequence[int], tile: Sequence[int], window: Sequence[int], device: Union[torch.device, str, None] = None
) -> torch.Tensor:
    """Dense (L, L) bool mask of the local-window rule, raster order; ``mask[q, k]`` = q attends k.

    Meant for tests and for building FlexAttention block masks; it is O(L^2) memory.
    """
    layout = TileLayout.create(grid, tile, window)
    return layout.mask_rows(torch.arange(layout.num_tokens, device=device))
