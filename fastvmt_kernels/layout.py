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

Block-causal time (``causal_frames = f > 0``, a multiple of ``tt``; autoregressive and diffusion-forcing video DiTs
such as SkyReels-V2 attend keys only in frame blocks up to their own): time tiles form causal blocks of
``G = f / tt`` tiles, and a query in time tile ``c`` attends the time tiles ``[max(0, e - window_t), e)`` with
``e = min(n_t, (c // G + 1) * G)``, the end of its own causal block -- its whole block and the ``window_t - G``
tiles before it (``window_t >= G``), fewer near the start. Height and width keep the rule above.
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


def causal_window_end(c: Union[int, torch.Tensor], n: int, block: int) -> Union[int, torch.Tensor]:
    """End (exclusive) of the block-causal time window of query tile ``c``: the end of its causal block of
    ``block`` tiles, ``min(n, (c // block + 1) * block)``; works on ints and integer tensors."""
    end = (c // block + 1) * block
    return end.clamp(max=n) if isinstance(end, torch.Tensor) else min(end, n)


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
        causal_frames: frames per causal time block (0: time is not causal; see the module docstring).
    """

    grid: Triple
    tile: Triple
    window: Triple
    causal_frames: int = 0

    @classmethod
    def create(
        cls, grid: Sequence[int], tile: Sequence[int], window: Sequence[int], causal_frames: int = 0
    ) -> "TileLayout":
        """Validate and build a layout; raises ValueError with the offending values."""
        grid, tile = _as_positive_triple(grid, "grid"), _as_positive_triple(tile, "tile")
        window = _as_positive_triple(window, "window")
        if isinstance(causal_frames, bool) or not isinstance(causal_frames, int) or causal_frames < 0:
            raise ValueError(f"causal_frames must be an int >= 0 (0: no causal time blocks), got {causal_frames!r}")
        if causal_frames % tile[0]:
            raise ValueError(
                f"causal_frames must be a multiple of the tile's frames tile[0] = {tile[0]} (causal blocks of whole "
                f"tiles), got {causal_frames}"
            )
        if window[0] < causal_frames // tile[0]:
            raise ValueError(
                f"window[0] must cover a causal block, >= causal_frames / tile[0] = {causal_frames // tile[0]} time "
                f"tiles, got {window[0]}"
            )
        return cls(grid, tile, window, causal_frames)

    @property
    def causal_tiles(self) -> int:
        """Time tiles per causal block, G = causal_frames / tt (0 when time is not causal)."""
        return self.causal_frames // self.tile[0]

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

    def window_bounds(self, axis: int, tiles: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Key-tile window ``[start, end)`` along ``axis`` of query tile indices ``tiles`` (integer tensor)."""
        n, window = self.num_tiles[axis], self.window[axis]
        if axis == 0 and self.causal_frames:
            end = causal_window_end(tiles, n, self.causal_tiles)
            return (end - window).clamp(min=0), end
        start = window_start(tiles, n, window)
        return start, start + self.window_tiles[axis]

    def density(self) -> float:
        """Fraction of (query, key) token pairs that the rule keeps (exact, ragged tiles included)."""
        total = 1.0
        for axis in range(NUM_AXES):
            g, s = self.grid[axis], self.tile[axis]
            coords = torch.arange(g)
            tiles = coords // s
            start, end = self.window_bounds(axis, tiles)
            keep = (tiles[None, :] >= start[:, None]) & (tiles[None, :] < end[:, None])
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
            start, end = self.window_bounds(axis, query_tiles[:, axis])
            kt = key_tiles[:, axis]
            mask &= (kt[None, :] >= start[:, None]) & (kt[None, :] < end[:, None])
        return mask


def local_attention_mask(
    grid: Sequence[int],
    tile: Sequence[int],
    window: Sequence[int],
    device: Union[torch.device, str, None] = None,
    *,
    causal_frames: int = 0,
) -> torch.Tensor:
    """Dense (L, L) bool mask of the local-window rule (block-causal in time with ``causal_frames``), raster order;
    ``mask[q, k]`` = q attends k.

    Meant for tests and for building FlexAttention block masks; it is O(L^2) memory.
    """
    layout = TileLayout.create(grid, tile, window, causal_frames)
    return layout.mask_rows(torch.arange(layout.num_tokens, device=device))
