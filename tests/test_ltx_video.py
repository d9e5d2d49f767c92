"""Drop-in local attention on a tiny random LTX-Video transformer: a covering window equals the stock model, a small
one changes it, cross-attention stays stock, the Triton kernel (interpreter) equals the torch reference, and calls the
processor cannot serve get clear errors."""
import warnings

import pytest
import torch
from _utils import REL_TOL, assert_covering_window_is_stock, assert_rel_close
from _wan_tiny import sharpen_self_attention, single_thread

from fastvmt.ltx_video import LTXVideoLocalAttnProcessor, read_grid
from fastvmt.processors import apply_local_attention

NUM_LAYERS = 2
CHANNELS, CAPTION_CHANNELS, TEXT_LEN = 8, 16, 6
GRID = (3, 5, 6)  # ragged against tile (1, 2, 2)
TILE = (1, 2, 2)
ROPE_SCALE = (0.32, 32.0, 32.0)  # LTX pipelines: (temporal compression / frame rate, spatial, spatial)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_thread()


@pytest.fixture
def transformer():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=CHANNELS, out_channels=CHANNELS, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=16, cross_attention_dim=32, num_layers=NUM_LAYERS, caption_channels=CAPTION_CHANNELS,
    ).eval()
    sharpen_self_attention(model.transformer_blocks)
    return model


def _call(grid=GRID, batch=2):
    """Forward keyword arguments as LTXPipeline passes them: packed tokens, the grid, a padded text mask."""
    torch.manual_seed(1)
    frames, height, width = grid
    mask = torch.ones(batch, TEXT_LEN)
    mask[0, -2:] = 0  # padded text in the first video
    return dict(
        hidden_states=torch.randn(batch, frames * height * width, CHANNELS),
        encoder_hidden_states=torch.randn(batch, TEXT_LEN, CAPTION_CHANNELS),
        timestep=torch.tensor([700.0] * batch), encoder_attention_mask=mask, num_frames=frames, height=height,
        width=width, rope_interpolation_scale=ROPE_SCALE, return_dict=False,
    )


def test_covering_window_equals_stock_small_window_differs_and_restores(transformer):
    call = _call()
    with torch.no_grad():
        assert_covering_window_is_stock(transformer, lambda m, kwargs: m(**kwargs)[0], call, tile=TILE)
        stock = transformer(**call)[0]
        apply_local_attention(transformer, tile=TILE, window=(1, 1, 1), backend="torch")
        local = transformer(**call)[0]
    assert (local - stock).abs().max() > 1e-3


def test_only_self_attention_is_patched(transformer):
    apply_local_attention(transformer, blocks=[1], backend="torch")
    local = {key for key, proc in transformer.attn_processors.items() if isinstance(proc, LTXVideoLocalAttnProcessor)}
    assert local == {"transformer_blocks.1.attn1.processor"}


def test_grid_follows_each_call(transformer):
    """One installation serves two grids (it would raise on the second if the grid were not re-read); each equals
    the stock model with a covering window."""
    previous = apply_local_attention(transformer, tile=TILE, window=(99, 99, 99), backend="torch")
    local_processors = dict(transformer.attn_processors)
    for grid in (GRID, (2, 4, 3)):
        call = _call(grid, batch=1)
        with torch.no_grad():
            transformer.set_attn_processor(dict(local_processors))  # diffusers pops the entries it sets
            local = transformer(**call)[0]
            transformer.set_attn_processor(dict(previous))
            stock = transformer(**call)[0]
        assert_rel_close(local, stock, REL_TOL[torch.float32], f"grid {grid}")


def test_triton_kernel_matches_torch_reference(transformer):
    call = _call((2, 4, 6), batch=1)
    with torch.no_grad():
        apply_local_attention(transformer, tile=TILE, window=(1, 1, 1), backend="torch")
        ref = transformer(**call)[0]
        apply_local_attention(transformer, tile=TILE, window=(1, 1, 1), backend="triton")
        tri = transformer(**call)[0]
    assert_rel_close(tri, ref, 1e-4, "triton vs torch processor")


def _coords_call(grid, extra_tokens=0):
    """A call as LTXConditionPipeline makes it: positions in ``video_coords`` (B, 3, L), no num_frames / height /
    width; ``extra_tokens`` conditioning tokens appended past the grid."""
    call = _call(grid, batch=1)
    for name in ("num_frames", "height", "width", "rope_interpolation_scale"):
        call.pop(name)
    frames, height, width = grid
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    coords = torch.stack([t.flatten(), y.flatten(), x.flatten()]).float()[None]  # (1, 3, L)
    if extra_tokens:
        coords = torch.cat([coords, coords[:, :, :extra_tokens]], dim=2)
        call["hidden_states"] = torch.cat([call["hidden_states"], call["hidden_states"][:, :extra_tokens]], dim=1)
    call["video_coords"] = coords
    return call


def test_calls_without_a_usable_grid_run_dense_with_one_warning(transformer):
    """Calls that give positions instead of the grid, or append conditioning tokens, run the stock attention (with
    one warning per processor) -- never the previous call's grid: a (2, 6, 4) call after a (2, 4, 6) one has the same
    token count, and used to run on the stale (2, 4, 6) grid."""
    previous = apply_local_attention(transformer, tile=TILE, window=(1, 1, 1), backend="torch")
    local_processors = dict(transformer.attn_processors)
    with torch.no_grad():
        transformer(**_call((2, 4, 6), batch=1))  # the holder now reads (2, 4, 6)
        with pytest.warns(UserWarning, match="gives no num_frames / height / width.*runs dense"):
            results = [transformer(**_coords_call((2, 6, 4)))[0], transformer(**_coords_call(GRID, extra_tokens=4))[0]]
        transformer.set_attn_processor(dict(previous))
        stock = [transformer(**_coords_call((2, 6, 4)))[0], transformer(**_coords_call(GRID, extra_tokens=4))[0]]
    for got, want in zip(results, stock):
        assert_rel_close(got, want, REL_TOL[torch.float32], "dense fallback")
    transformer.set_attn_processor(dict(local_processors))
    attn = transformer.transformer_blocks[0].attn1
    attn.processor._grid_source.value = GRID  # a grid that does not describe the sequence: dense, with its warning
    fresh = LTXVideoLocalAttnProcessor(tile=TILE, window=(1, 1, 1), backend="torch")
    fresh._grid_source = attn.processor._grid_source
    tokens = torch.randn(1, 3 * 5 * 6 + 4, 32)
    with pytest.warns(UserWarning, match=r"grid \(3, 5, 6\) \(90 tokens\) for a sequence of 94"):
        fresh(attn, tokens)


def test_read_grid_is_frames_height_width():
    assert read_grid(None, (), dict(num_frames=3, height=5, width=6)) == (3, 5, 6)


def test_dense_fallback_warns_once_per_processor(transformer):
    apply_local_attention(transformer, tile=TILE, window=(1, 1, 1), backend="torch")
    attn = transformer.transformer_blocks[0].attn1
    attn.processor._grid_source.value = GRID
    fresh = LTXVideoLocalAttnProcessor(tile=TILE, window=(1, 1, 1), backend="torch")
    fresh._grid_source = attn.processor._grid_source
    tokens = torch.randn(1, 3 * 5 * 6 + 4, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            fresh(attn, tokens)
            fresh(attn, tokens)
    assert len([w for w in caught if "runs dense" in str(w.message)]) == 1


def test_masked_self_attention_call_runs_the_stock_path(transformer):
    from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

    attn = transformer.transformer_blocks[0].attn1
    torch.manual_seed(2)
    tokens = torch.randn(1, 3 * 5 * 6, 32)
    mask = torch.zeros(1, 1, 90)
    mask[..., 45:] = -10000.0  # additive key mask hiding half the tokens
    local = LTXVideoLocalAttnProcessor(tile=TILE, window=(1, 1, 1), backend="torch", grid=GRID)
    with torch.no_grad():
        got = local(attn, tokens, attention_mask=mask)
        want = LTXVideoAttnProcessor()(attn, tokens, attention_mask=mask)
    assert_rel_close(got, want, REL_TOL[torch.float32], "masked call")
