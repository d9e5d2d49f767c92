"""Local attention as a drop-in for a (tiny, random) diffusers HunyuanVideo 1.5 transformer: dual-stream joint
attention over [video, text] with padded text (Qwen and byT5 tokens, and image tokens for image-to-video)."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import HunyuanVideo15Transformer3DModel  # noqa: E402
from diffusers.models.transformers import transformer_hunyuan_video15 as hunyuan15  # noqa: E402

from fastvmt import apply_local_attention  # noqa: E402
from fastvmt.hunyuan_video15 import HunyuanVideo15LocalAttnProcessor  # noqa: E402

from _utils import (  # noqa: E402
    assert_covering_window_is_stock, assert_rel_close, local_rule_reference, run_no_grad, stock_copy,
)

TEXT_TOKENS, BYT5_TOKENS, IMAGE_TOKENS = 5, 3, 2
TEXT_DIM, BYT5_DIM, IMAGE_DIM, PATCH = 16, 8, 8, 2
VALID_TEXT, VALID_BYT5 = (5, 3), (2, 1)  # batch 1 has padded Qwen and byT5 tokens
JOINT_TEXT = TEXT_TOKENS + BYT5_TOKENS + IMAGE_TOKENS


def tiny_hunyuan15():
    torch.manual_seed(0)
    return HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=PATCH, patch_size_t=1, text_embed_dim=TEXT_DIM,
        text_embed_2_dim=BYT5_DIM, image_embed_dim=IMAGE_DIM, rope_axes_dim=(4, 6, 6),
    ).eval()


def inputs(frames, height, width, image_to_video=False):
    masks = []
    for tokens, valid in ((TEXT_TOKENS, VALID_TEXT), (BYT5_TOKENS, VALID_BYT5)):
        mask = torch.zeros(2, tokens, dtype=torch.long)
        for b, n in enumerate(valid):
            mask[b, :n] = 1
        masks.append(mask)
    image = torch.randn(2, IMAGE_TOKENS, IMAGE_DIM) if image_to_video else torch.zeros(2, IMAGE_TOKENS, IMAGE_DIM)
    return dict(
        hidden_states=torch.randn(2, 4, frames, height, width), timestep=torch.tensor([500.0, 500.0]),
        encoder_hidden_states=torch.randn(2, TEXT_TOKENS, TEXT_DIM), encoder_attention_mask=masks[0],
        encoder_hidden_states_2=torch.randn(2, BYT5_TOKENS, BYT5_DIM), encoder_attention_mask_2=masks[1],
        image_embeds=image,
    )


@pytest.mark.parametrize("image_to_video", [False, True])
def test_local_window_matches_masked_dense_attention_with_padded_text(image_to_video, monkeypatch):
    model = tiny_hunyuan15()
    tile, window = (1, 2, 2), (1, 1, 1)
    apply_local_attention(model, tile=tile, window=window)
    patched = [p for key, p in model.attn_processors.items() if "token_refiner" not in key]
    assert len(patched) == 2 and all(isinstance(p, HunyuanVideo15LocalAttnProcessor) for p in patched)
    assert all(not isinstance(p, HunyuanVideo15LocalAttnProcessor)
               for key, p in model.attn_processors.items() if "token_refiner" in key)
    for frames, height, width in ((3, 8, 8), (2, 8, 12)):  # the grid is read from each call's input
        kwargs = inputs(frames, height, width, image_to_video)
        grid = (frames, height // PATCH, width // PATCH)
        out = run_no_grad(model, kwargs)
        expected = local_rule_reference(stock_copy(model), kwargs, hunyuan15, grid, tile, window, JOINT_TEXT, monkeypatch)
        assert_rel_close(out, expected, 1e-5, f"grid {grid}")
        assert (out - run_no_grad(stock_copy(model), kwargs)).abs().max() > 1e-3, "the window should change the output"


def test_full_window_equals_stock_and_blocks_select_the_dual_stream_blocks():
    model = tiny_hunyuan15()
    assert_covering_window_is_stock(model, run_no_grad, inputs(3, 8, 8, image_to_video=True), tile=(1, 2, 2))
    apply_local_attention(model, tile=(1, 2, 2), window=(1, 1, 1), blocks=[1])
    kinds = {key: type(p).__name__ for key, p in model.attn_processors.items()}
    assert kinds["transformer_blocks.1.attn.processor"] == "HunyuanVideo15LocalAttnProcessor"
    assert kinds["transformer_blocks.0.attn.processor"] == "HunyuanVideo15AttnProcessor2_0"
    with pytest.raises(ValueError, match=r"blocks must be indices in \[0, 2\)"):
        apply_local_attention(model, blocks=[2])


def test_text_mask_of_another_shape_is_refused():
    from fastvmt.hunyuan_video15 import _text_key_mask

    with pytest.raises(ValueError, match=r"\(B, text tokens\) text mask \(2, 10\), got shape \(2, 1, 1, 10\)"):
        _text_key_mask(torch.ones(2, 1, 1, 10, dtype=torch.bool), 2, 10)
