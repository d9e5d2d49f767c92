"""Local attention as a drop-in for a (tiny, random) diffusers CogVideoX transformer: joint text + video attention."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
from diffusers import CogVideoXTransformer3DModel  # noqa: E402

from fastvmt import apply_local_attention  # noqa: E402
from fastvmt.cogvideox import CogVideoXLocalAttnProcessor  # noqa: E402
from fastvmt_kernels import local_attention_mask  # noqa: E402

from _utils import assert_covering_window_is_stock, assert_rel_close  # noqa: E402

TEXT_TOKENS, TEXT_DIM, HEAD_DIM, PATCH = 5, 16, 16, 2


def tiny_cogvideox():
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=TEXT_DIM, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=PATCH,
        max_text_seq_length=TEXT_TOKENS, use_rotary_positional_embeddings=True,
    ).eval()


def inputs(frames, height, width):
    """Model inputs for a latent (1, frames, 4, height, width), with random rotary tables (the same for both runs)."""
    tokens = frames * (height // PATCH) * (width // PATCH)
    theta = torch.rand(tokens, HEAD_DIM) * 6.3
    return dict(
        hidden_states=torch.randn(1, frames, 4, height, width),
        encoder_hidden_states=torch.randn(1, TEXT_TOKENS, TEXT_DIM),
        timestep=torch.tensor([500]), image_rotary_emb=(theta.cos(), theta.sin()),
    )


def run(model, kwargs):
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]


def masked_reference(model, kwargs, grid, tile, window, monkeypatch):
    """The stock CogVideoX processor with its dense SDPA restricted to the joint local rule (independent mask)."""
    local = local_attention_mask(grid, tile, window)
    total = TEXT_TOKENS + local.shape[0]
    mask = torch.ones(total, total, dtype=torch.bool)
    mask[TEXT_TOKENS:, TEXT_TOKENS:] = local  # video queries x video keys: local window; every other pair dense
    sdpa = F.scaled_dot_product_attention

    def masked_sdpa(q, k, v, attn_mask=None, **kw):
        assert attn_mask is None and q.shape[2] == total
        return sdpa(q, k, v, attn_mask=mask, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", masked_sdpa)
        return run(model, kwargs)


def test_local_window_matches_masked_dense_attention_at_two_sizes(monkeypatch):
    model = tiny_cogvideox()
    tile, window = (1, 2, 2), (1, 1, 1)
    apply_local_attention(model, tile=tile, window=window)
    assert all(isinstance(p, CogVideoXLocalAttnProcessor) for p in model.attn_processors.values())
    for frames, height, width in ((3, 8, 8), (2, 8, 12)):  # the grid is read from each call's input
        kwargs = inputs(frames, height, width)
        grid = (frames, height // PATCH, width // PATCH)
        out = run(model, kwargs)
        stock = CogVideoXTransformer3DModel.from_config(model.config).eval()
        stock.load_state_dict(model.state_dict())
        expected = masked_reference(stock, kwargs, grid, tile, window, monkeypatch)
        assert_rel_close(out, expected, 1e-5, f"grid {grid}")
        assert (out - run(stock, kwargs)).abs().max() > 1e-3, "the window should change the output"


def test_full_window_equals_stock_and_uninstall_restores():
    assert_covering_window_is_stock(tiny_cogvideox(), run, inputs(3, 8, 8), tile=(1, 2, 2))


def test_inactive_phase_and_unpatched_blocks_run_the_stock_path():
    model = tiny_cogvideox()
    kwargs = inputs(3, 8, 8)
    stock_out = run(model, kwargs)
    apply_local_attention(model, tile=(1, 2, 2), window=(1, 1, 1), phases="guidance")  # passes default to denoise
    assert torch.equal(run(model, kwargs), stock_out)
    model = tiny_cogvideox()
    apply_local_attention(model, tile=(1, 2, 2), window=(1, 1, 1), blocks=[1])
    kinds = {key: type(p).__name__ for key, p in model.attn_processors.items()}
    assert kinds["transformer_blocks.1.attn1.processor"] == "CogVideoXLocalAttnProcessor"
    assert kinds["transformer_blocks.0.attn1.processor"] == "CogVideoXAttnProcessor2_0"
    with pytest.raises(ValueError, match=r"blocks must be indices in \[0, 2\)"):
        apply_local_attention(model, blocks=[2])
