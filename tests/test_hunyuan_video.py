"""Local attention as a drop-in for a (tiny, random) diffusers HunyuanVideo transformer: dual- and single-stream
joint attention with padded text."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import HunyuanVideoTransformer3DModel  # noqa: E402
from diffusers.models.transformers import transformer_hunyuan_video as hunyuan  # noqa: E402

from fastvmt import apply_local_attention  # noqa: E402
from fastvmt.hunyuan_video import HunyuanVideoLocalAttnProcessor  # noqa: E402

from _utils import (  # noqa: E402
    assert_covering_window_is_stock, assert_rel_close, local_rule_reference, run_no_grad, stock_copy,
)

TEXT_TOKENS, TEXT_DIM, PATCH = 6, 16, 2
VALID_TEXT = (6, 4)  # batch 1 has two padded text tokens


def tiny_hunyuan():
    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=PATCH, patch_size_t=1, guidance_embeds=False,
        text_embed_dim=TEXT_DIM, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
    ).eval()


def inputs(frames, height, width):
    text_mask = torch.zeros(2, TEXT_TOKENS, dtype=torch.long)
    for b, valid in enumerate(VALID_TEXT):
        text_mask[b, :valid] = 1
    return dict(
        hidden_states=torch.randn(2, 4, frames, height, width), timestep=torch.tensor([500, 500]),
        encoder_hidden_states=torch.randn(2, TEXT_TOKENS, TEXT_DIM), encoder_attention_mask=text_mask,
        pooled_projections=torch.randn(2, 8),
    )


def test_local_window_matches_masked_dense_attention_with_padded_text(monkeypatch):
    model = tiny_hunyuan()
    tile, window = (1, 2, 2), (1, 1, 1)
    apply_local_attention(model, tile=tile, window=window)
    patched = [p for key, p in model.attn_processors.items() if "token_refiner" not in key]
    assert len(patched) == 2 and all(isinstance(p, HunyuanVideoLocalAttnProcessor) for p in patched)
    for frames, height, width in ((3, 8, 8), (2, 8, 12)):  # the grid is read from each call's input
        kwargs = inputs(frames, height, width)
        grid = (frames, height // PATCH, width // PATCH)
        out = run_no_grad(model, kwargs)
        expected = local_rule_reference(stock_copy(model), kwargs, hunyuan, grid, tile, window, TEXT_TOKENS, monkeypatch)
        assert_rel_close(out, expected, 1e-5, f"grid {grid}")
        assert (out - run_no_grad(stock_copy(model), kwargs)).abs().max() > 1e-3, "the window should change the output"


def test_full_window_equals_stock_and_blocks_index_dual_then_single():
    model = tiny_hunyuan()
    assert_covering_window_is_stock(model, run_no_grad, inputs(3, 8, 8), tile=(1, 2, 2))
    apply_local_attention(model, tile=(1, 2, 2), window=(1, 1, 1), blocks=[1])
    kinds = {key: type(p).__name__ for key, p in model.attn_processors.items()}
    assert kinds["single_transformer_blocks.0.attn.processor"] == "HunyuanVideoLocalAttnProcessor"
    assert kinds["transformer_blocks.0.attn.processor"] == "HunyuanVideoAttnProcessor2_0"
    with pytest.raises(ValueError, match=r"blocks must be indices in \[0, 2\)"):
        apply_local_attention(model, blocks=[2])
