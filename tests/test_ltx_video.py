"""Drop-in local attention on a tiny random LTX-Video transformer: a covering window equals the stock model, a small
one changes it, cross-attention stays stock, the Triton kernel (interpreter) equals the torch reference, and calls the
processor cannot serve get clear errors."""
import pytest
import torch
from _utils import REL_TOL, assert_covering_window_is_stock, assert_rel_close
from _wan_tiny import sharpen_self_attention, single_thread

from fastvmt.ltx_video import LTXVideoLocalAttnProcessor
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


def test_calls_without_the_grid_or_with_extra_tokens_raise(transformer):
    apply_local_attention(transformer, tile=TILE, window=(1, 1, 1), backend="torch")
    attn = transformer.transformer_blocks[0].attn1
    processor = attn.processor
    tokens = torch.randn(1, 3 * 5 * 6 + 4, 32)  # four conditioning tokens past the grid
    processor._grid_source.value = GRID
    with pytest.raises(ValueError, match=r"grid \(3, 5, 6\) \(90 tokens\), got a sequence of 94"):
        processor(attn, tokens)
    fresh = LTXVideoLocalAttnProcessor(tile=TILE, window=(1, 1, 1), backend="torch")
    with pytest.raises(ValueError, match="does not know the token grid"):
        fresh(attn, tokens[:, :90])
