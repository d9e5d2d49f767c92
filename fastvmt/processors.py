"""Attention processors for diffusers' Wan2.1 transformer (no edits to diffusers).

- :class:`QKCaptureProcessor` records a block's self-attention Q and K after norm and RoPE and stops the forward
  right there (the truncated guidance pass).
- :class:`LocalAttnProcessor` replaces Wan's self-attention (``attn1``) with
  :func:`fastvmt_kernels.local_attention`; cross-attention (``attn2``) is left to the stock path. It subclasses
  ``WanAttnProcessor`` and so keeps ``_attention_backend`` / ``_parallel_config`` for diffusers' backend and
  parallelism machinery.
- :func:`apply_local_attention` installs it on a live transformer; ``phases`` chooses guidance passes, denoising
  passes or both (the pipeline marks passes with :func:`attention_phase`). It patches the Wan family (Wan2.1 / 2.2,
  Wan-VACE with its control blocks, ChronoEdit); given a SkyReels-V2, Wan-Animate, CogVideoX, HunyuanVideo (1.0 or
  1.5), LTX-Video or LTX-2 one it installs that family's processor instead (:mod:`fastvmt.skyreels_v2`,
  :mod:`fastvmt.wan_animate`,
  :mod:`fastvmt.cogvideox`, :mod:`fastvmt.hunyuan_video`, :mod:`fastvmt.hunyuan_video15`, :mod:`fastvmt.ltx_video`,
  :mod:`fastvmt.ltx2`:
  each gives its ``PROCESSOR``, ``processor_keys`` and ``read_grid``; the settings
  (:class:`LocalWindowSettings`) and the installation (:func:`install_local_processor`) are shared).
"""
from __future__ import annotations

import contextlib
import importlib
import operator
import threading
from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections
from diffusers.utils.torch_utils import unwrap_module

PHASES = ("guidance", "denoise")
PHASE_CHOICES = ("both", "guidance", "denoise")
DEFAULT_PHASE = "denoise"
# Tile (t, y, x) tokens and window (t, y, x) in tiles of the drop-in local self-attention. The tile divides Wan2.1's
# 480x832x81 token grid 21x30x52 exactly (7x3x13 tiles of 120 tokens); the window keeps 25.6% of the (query, key) pairs.
DEFAULT_LOCAL_TILE = (3, 10, 4)
DEFAULT_LOCAL_WINDOW = (5, 2, 7)
GRID_ATTRIBUTE = "_fastvmt_token_grid"
# Transformers whose video self-attention is Wan's (blocks[i].attn1 with WanAttnProcessor's projections and RoPE):
# class name -> the extra block lists whose attn1 run on the same token grid, as (block list, config field naming the
# main block each one belongs to). Wan-VACE's control blocks see the control video's tokens, patch-embedded like the
# latent's; a VACE block is patched with the main block it feeds (config.vace_layers).
WAN_FAMILY = {
    "WanTransformer3DModel": (),
    "WanVACETransformer3DModel": (("vace_blocks", "vace_layers"),),
    "ChronoEditTransformer3DModel": (),
}
# Other transformers: class name -> the module that defines their local processor (PROCESSOR), its processor keys
# (processor_keys(transformer, blocks)), the token grid of a call (read_grid(transformer, args, kwargs)) and, where
# the processor reads the model's config, configure(processor, transformer).
OTHER_FAMILIES = {
    "CogVideoXTransformer3DModel": "fastvmt.cogvideox",
    "HunyuanVideoTransformer3DModel": "fastvmt.hunyuan_video",
    "HunyuanVideo15Transformer3DModel": "fastvmt.hunyuan_video15",
    "LTXVideoTransformer3DModel": "fastvmt.ltx_video",
    "LTX2VideoTransformer3DModel": "fastvmt.ltx2",
    "WanAnimateTransformer3DModel": "fastvmt.wan_animate",
    "SkyReelsV2Transformer3DModel": "fastvmt.skyreels_v2",
}

_phase_state = threading.local()


def current_phase() -> str:
    """The phase of the transformer passes now running: "guidance" or "denoise" (the default outside any marker)."""
    return getattr(_phase_state, "phase", DEFAULT_PHASE)


@contextlib.contextmanager
def attention_phase(phase: str) -> Iterator[None]:
    """Mark the transformer passes inside the block as ``phase`` ("guidance" or "denoise")."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    previous = current_phase()
    _phase_state.phase = phase
    try:
        yield
    finally:
        _phase_state.phase = previous


def _rotate(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding: x (B, L, H, D), cos/sin (1, L, 1, D)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


def project_self_attention(
    attn, hidden_states: torch.Tensor, rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V of a Wan self-attention exactly as ``WanAttnProcessor`` builds them.

    Args:
        attn: the ``WanAttention`` module (``attn1`` of a block).
        hidden_states: (B, L, C) video tokens, raster order (frame, row, col).
        rotary_emb: ``(cos, sin)`` each (1, L, 1, head_dim), or None.

    Returns:
        q, k, v: (B, L, heads, head_dim); q and k after RMS norm and RoPE.
    """
    query, key, value = _get_qkv_projections(attn, hidden_states, None)
    query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        query = _rotate(query, *rotary_emb)
        key = _rotate(key, *rotary_emb)
    return query, key, value


class StopForward(Exception):
    """Raised by :class:`QKCaptureProcessor` to end a truncated pass right after the captured projections."""


class QKCaptureProcessor(WanAttnProcessor):
    """Self-attention processor that records Q and K (after norm and RoPE) and, by default, stops the forward.

    After a call, ``query`` and ``key`` hold (B, L, heads, head_dim) tensors (with autograd history when grad is on).
    With ``stop=True`` it raises :class:`StopForward` so no later computation (this block's attention, later blocks,
    the output head) runs; with ``stop=False`` it computes the stock attention output too.
    """

    def __init__(self, stop: bool = True):
        super().__init__()
        self.stop = stop
        self.query: Optional[torch.Tensor] = None
        self.key: Optional[torch.Tensor] = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None:
            raise ValueError("QKCaptureProcessor captures self-attention only; install it on an attn1 module")
        self.query, self.key, _ = project_self_attention(attn, hidden_states, rotary_emb)
        if self.stop:
            raise StopForward()
        return super().__call__(attn, hidden_states, None, attention_mask, rotary_emb)


def _check_phases(phases: str) -> Tuple[str, ...]:
    if phases not in PHASE_CHOICES:
        raise ValueError(f"phases must be one of {PHASE_CHOICES}, got {phases!r}")
    return PHASES if phases == "both" else (phases,)


class LocalWindowSettings:
    """Tile, window, phases, backend and token grid of a local-attention processor (a mixin; the processor classes
    add the model-specific projections).

    Args:
        tile: (tt, th, tw) tokens per tile.
        window: (wt, wh, ww) window in tiles (a window covering the grid equals dense attention).
        phases: "both", "guidance" or "denoise": in other phases the stock dense path runs.
        backend: fastvmt_kernels backend ("auto": Triton on CUDA, the torch reference elsewhere).
        grid: fixed (T, Hg, Wg) token grid; None reads it per call from the transformer (set by
            :func:`apply_local_attention`'s pre-forward hook or :func:`set_token_grid`).
    """

    def __init__(
        self,
        tile: Sequence[int] = DEFAULT_LOCAL_TILE,
        window: Sequence[int] = DEFAULT_LOCAL_WINDOW,
        phases: str = "both",
        backend: str = "auto",
        grid: Optional[Sequence[int]] = None,
    ):
        from fastvmt_kernels import TileLayout

        super().__init__()
        probe = TileLayout.create(grid or (1, 1, 1), tile, window)  # validates tile / window / grid
        self.tile, self.window = probe.tile, probe.window
        self.grid = probe.grid if grid is not None else None
        self.phases = _check_phases(phases)
        self.backend = backend
        self._grid_source: Optional[_TokenGrid] = None

    def active(self) -> bool:
        """Whether the local path runs in the current phase."""
        return current_phase() in self.phases

    def token_grid(self, key: Optional[torch.Tensor] = None, required: bool = True) -> Optional[Tuple[int, int, int]]:
        """(T, Hg, Wg) of the current call; ``key``: the pass's :func:`rotary_key`, so that a block recomputed under
        gradient checkpointing reads the grid of its own pass (see :meth:`_TokenGrid.bind`). An unknown grid raises,
        or gives None when not ``required``."""
        if self.grid is not None:
            return self.grid
        grid = None if self._grid_source is None else self._grid_source.bind(key)
        if grid is None and required:
            raise ValueError(
                f"{type(self).__name__} does not know the token grid: install it with fastvmt.apply_local_attention("
                "transformer, ...) (which tracks the latent shape per call) or pass grid=(T, Hg, Wg)"
            )
        return grid


class LocalAttnProcessor(LocalWindowSettings, WanAttnProcessor):
    """Wan self-attention through :func:`fastvmt_kernels.local_attention` (tiled spatiotemporal window).

    Arguments as :class:`LocalWindowSettings`. Cross-attention calls (``encoder_hidden_states`` given), attention masks
    and diffusers context parallelism fall back to the stock ``WanAttnProcessor`` path.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        local = (
            encoder_hidden_states is None
            and attention_mask is None
            and self._parallel_config is None
            and attn.add_k_proj is None
            and self.active()
        )
        if not local:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = project_self_attention(attn, hidden_states, rotary_emb)
        out = self.attend(query, key, value, self.token_grid(rotary_key(rotary_emb)))
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, grid) -> torch.Tensor:
        """The local attention of one call: q, k, v (B, L, heads, head_dim) after norm and RoPE, L = T * Hg * Wg
        tokens of ``grid`` in raster order; returns (B, L, heads, head_dim)."""
        from fastvmt_kernels import local_attention

        return local_attention(query, key, value, grid, self.tile, self.window, backend=self.backend)


class _TokenGrid:
    """Mutable holder of the transformer's current (T, Hg, Wg) token grid, shared by its local processors, and the
    grid each pass bound to its rotary-embedding tensor (:meth:`bind`)."""

    def __init__(self) -> None:
        self.value: Optional[Tuple[int, int, int]] = None
        self.hook = None
        self.by_key = WeakIdKeyDictionary()  # tensor (by identity, weakly) -> (T, Hg, Wg)

    def bind(self, key: Optional[torch.Tensor]) -> Optional[Tuple[int, int, int]]:
        """The grid of the pass that ``key`` (a tensor every block of one pass receives, e.g. its rotary embedding)
        belongs to: the current grid the first time ``key`` is seen, the same grid whenever it comes back.

        Gradient checkpointing recomputes blocks in backward, possibly after other forwards with other grids have
        moved :attr:`value` on; the recomputation passes the same rotary tensors, so it reads its own pass's grid.
        Not inside a compiled region (dynamo cannot trace the weak dictionary): there :attr:`value` is used.
        """
        if key is None or torch.compiler.is_compiling():
            return self.value
        grid = self.by_key.get(key)
        if grid is None:
            grid = self.value
            if grid is not None:
                self.by_key[key] = grid
        return grid


def rotary_key(rotary_emb) -> Optional[torch.Tensor]:
    """The tensor of a pass's rotary embedding (a tensor or a tuple of them, as diffusers' models pass it) that
    identifies the pass for :meth:`_TokenGrid.bind`; None without one."""
    if isinstance(rotary_emb, (tuple, list)):
        rotary_emb = rotary_emb[0] if rotary_emb else None
    return rotary_emb if isinstance(rotary_emb, torch.Tensor) else None


def token_grid_of(transformer, latents_shape: Sequence[int]) -> Tuple[int, int, int]:
    """(T, Hg, Wg) tokens for a latent of shape (B, C, F, H, W) under the transformer's patch size."""
    p_t, p_h, p_w = transformer.config.patch_size
    _, _, frames, height, width = latents_shape
    return (frames // p_t, height // p_h, width // p_w)


def set_token_grid(transformer, latents_shape: Sequence[int]) -> None:
    """Record the token grid for a pass that does not go through ``transformer.forward`` (truncated passes)."""
    holder = getattr(transformer, GRID_ATTRIBUTE, None)
    if holder is not None:
        holder.value = token_grid_of(transformer, latents_shape)


def grid_from_input_shape(grid_of=token_grid_of):
    """A token-grid reader for :func:`install_local_processor`: ``(module, args, kwargs) -> grid_of(module,
    hidden_states.shape)``, or None when the call has no ``hidden_states``."""

    def read(module, args, kwargs):
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        return None if hidden_states is None else grid_of(module, hidden_states.shape)

    return read


def _track_token_grid(transformer, read_grid) -> _TokenGrid:
    """Shared grid holder of ``transformer``, set by a pre-forward hook to ``read_grid(module, args, kwargs)`` (None:
    the call's grid is unknown)."""
    holder = getattr(transformer, GRID_ATTRIBUTE, None)
    if holder is not None:
        return holder
    holder = _TokenGrid()

    def pre_forward(module, args, kwargs):
        # The holder of the module called: a deep copy's own (hooks are not copied deeply). A call whose grid cannot
        # be read leaves it unknown rather than keeping the previous call's.
        getattr(module, GRID_ATTRIBUTE).value = read_grid(module, args, kwargs)

    holder.hook = transformer.register_forward_pre_hook(pre_forward, with_kwargs=True)
    setattr(transformer, GRID_ATTRIBUTE, holder)
    return holder


def select_blocks(num_blocks: int, blocks: Optional[Iterable[int]]) -> Sequence[int]:
    """Sorted block indices of ``blocks`` (None: all ``num_blocks``); a clear error for any index out of range."""
    if blocks is None:
        return list(range(num_blocks))
    indices, bad = set(), []
    for b in blocks:  # ints, numpy / torch integers (anything with __index__), not bools or floats
        try:
            index = operator.index(b) if not isinstance(b, bool) else None
        except TypeError:
            index = None
        if index is None or not 0 <= index < num_blocks:
            bad.append(b)
        else:
            indices.add(index)
    if bad:
        raise ValueError(f"blocks must be indices in [0, {num_blocks}), got {bad}")
    return sorted(indices)


def _self_attention_keys(
    transformer, blocks: Optional[Iterable[int]], block_list: str = "blocks"
) -> Sequence[str]:
    """Processor keys of the self-attention (``attn1``) of ``blocks`` (None: all) in ``transformer.<block_list>``."""
    chosen = select_blocks(len(getattr(transformer, block_list)), blocks)
    return [f"{block_list}.{i}.attn1.processor" for i in chosen]


def _wan_self_attention_keys(transformer, blocks: Optional[Iterable[int]]) -> Sequence[str]:
    """attn1 processor keys of the chosen main blocks of a WAN_FAMILY transformer, plus those of its extra block
    lists (Wan-VACE's control blocks) that belong to a chosen main block."""
    chosen = select_blocks(len(transformer.blocks), blocks)
    keys = _self_attention_keys(transformer, chosen)
    for block_list, owner_field in WAN_FAMILY[type(transformer).__name__]:
        owners = getattr(transformer.config, owner_field)
        keys += [f"{block_list}.{i}.attn1.processor" for i, owner in enumerate(owners) if owner in chosen]
    return keys


def apply_local_attention(
    transformer,
    tile: Sequence[int] = DEFAULT_LOCAL_TILE,
    window: Sequence[int] = DEFAULT_LOCAL_WINDOW,
    blocks: Optional[Iterable[int]] = None,
    phases: str = "both",
    backend: str = "auto",
) -> Dict[str, object]:
    """Replace the self-attention of ``blocks`` (default: all) of a video transformer with local attention.

    Args:
        transformer: a diffusers ``WanTransformer3DModel`` (Wan2.1 / 2.2), ``WanVACETransformer3DModel`` (its
            control blocks are patched with the main block each feeds), ``ChronoEditTransformer3DModel`` or
            ``SkyReelsV2Transformer3DModel`` (cross-attention untouched; the diffusion-forcing block-causal calls
            run block-causal local attention: :mod:`fastvmt.skyreels_v2`), a
            ``WanAnimateTransformer3DModel`` (its reference frame stays global: :mod:`fastvmt.wan_animate`), or a
            ``CogVideoXTransformer3DModel`` / ``HunyuanVideoTransformer3DModel`` /
            ``HunyuanVideo15Transformer3DModel`` (their joint text + video attention then runs
            :func:`fastvmt_kernels.joint_local_attention`; see :mod:`fastvmt.cogvideox`, :mod:`fastvmt.hunyuan_video`,
            :mod:`fastvmt.hunyuan_video15`), or an ``LTXVideoTransformer3DModel`` (self-attention,
            :mod:`fastvmt.ltx_video`) or ``LTX2VideoTransformer3DModel`` (video self-attention; appended
            conditioning tokens stay global: :mod:`fastvmt.ltx2`). Others raise ValueError.
        tile: (tt, th, tw) tokens per tile; window: (wt, wh, ww) in tiles.
        blocks: block indices to patch, None for every block.
        phases: "both", "guidance" (only the motion-guidance passes) or "denoise" (only the denoising passes).
        backend: fastvmt_kernels backend.

    Returns:
        The previous processors (a dict for ``transformer.set_attn_processor``, which undoes the patch).

    A ``torch.compile(transformer)`` wrapper is patched through its model (``_orig_mod``); its next call recompiles.
    """
    transformer = unwrap_module(transformer)
    name = type(transformer).__name__
    family = OTHER_FAMILIES.get(name)
    if family is None:
        if name not in WAN_FAMILY:
            raise ValueError(
                f"apply_local_attention supports {sorted(WAN_FAMILY) + sorted(OTHER_FAMILIES)}, got {name}; for "
                "another video DiT, call fastvmt_kernels.local_attention (or joint_local_attention) from its own "
                "attention processor"
            )
        processor_class, keys, read_grid = (
            LocalAttnProcessor, _wan_self_attention_keys(transformer, blocks), grid_from_input_shape(token_grid_of)
        )
    else:
        module = importlib.import_module(family)
        processor_class, read_grid = module.PROCESSOR, module.read_grid
        keys = module.processor_keys(transformer, blocks)
    processor = processor_class(tile=tile, window=window, phases=phases, backend=backend)
    if family is not None and hasattr(module, "configure"):
        module.configure(processor, transformer)
    return install_local_processor(transformer, processor, keys, read_grid)


def install_local_processor(transformer, processor: LocalWindowSettings, keys: Sequence[str], read_grid=None):
    """Set ``processor`` at the processor ``keys`` of ``transformer``, feeding it the token grid of every call
    (``read_grid(transformer, args, kwargs)`` in a pre-forward hook; default: :func:`grid_from_input_shape` with
    :func:`token_grid_of`); returns the previous processors."""
    previous = dict(transformer.attn_processors)
    processor._grid_source = _track_token_grid(transformer, read_grid or grid_from_input_shape(token_grid_of))
    updated = dict(previous)
    for key in keys:
        updated[key] = processor
    transformer.set_attn_processor(updated)
    return previous


@contextlib.contextmanager
def capture_qk(transformer, block: int, stop: bool = True) -> Iterator[QKCaptureProcessor]:
    """Install a :class:`QKCaptureProcessor` on ``blocks[block].attn1`` and restore the previous one on exit."""
    num_blocks = len(transformer.blocks)
    if not (isinstance(block, int) and 0 <= block < num_blocks):
        raise ValueError(f"motion block must be in [0, {num_blocks}) for this transformer, got {block!r}")
    attn = transformer.blocks[block].attn1
    previous = attn.processor
    capture = QKCaptureProcessor(stop=stop)
    attn.set_processor(capture)
    try:
        yield capture
    finally:
        attn.set_processor(previous)
