"""Local attention as a drop-in for a (tiny, random) diffusers Wan-Animate transformer: local among the generated
frames, with the reference frame (latent frame 0) global to every token."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import WanAnimateTransformer3DModel  # noqa: E402
from diffusers.models.transformers import transformer_wan_animate as wan_animate  # noqa: E402

from fastvmt import apply_local_attention  # noqa: E402
from fastvmt.wan_animate import WanAnimateLocalAttnProcessor  # noqa: E402

from _utils import (  # noqa: E402
    assert_covering_window_is_stock, assert_rel_close, local_rule_reference, run_no_grad, stock_copy,
)
from _wan_tiny import TEXT_DIM, sharpen_self_attention, single_thread  # noqa: E402

LATENT_CHANNELS, PATCH, FACE_SIZE = 4, 2, 16
TILE = (1, 2, 2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_thread()


def tiny_wan_animate():
    torch.manual_seed(0)
    model = WanAnimateTransformer3DModel(
        patch_size=(1, PATCH, PATCH), num_attention_heads=2, attention_head_dim=16, in_channels=None,
        latent_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64,
        num_layers=2, image_dim=None, rope_max_seq_len=32, motion_encoder_size=FACE_SIZE, motion_style_dim=32,
        motion_dim=4, motion_encoder_dim=32, face_encoder_hidden_dim=32, face_encoder_num_heads=2,
        inject_face_latents_blocks=1, motion_encoder_batch_size=4,
        motion_encoder_channel_sizes={"4": 32, "8": 32, "16": 32},
    ).eval()
    sharpen_self_attention(model.blocks)
    return model


def inputs(generated_frames, height, width):
    """Forward arguments as WanAnimatePipeline passes them: the latent with the reference frame in front
    (2C + 4 channels, T + 1 frames), pose latents and face frames for the T generated frames."""
    torch.manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, 2 * LATENT_CHANNELS + 4, generated_frames + 1, height, width),
        timestep=torch.tensor([700.0]), encoder_hidden_states=torch.randn(1, 5, TEXT_DIM),
        pose_hidden_states=torch.randn(1, LATENT_CHANNELS, generated_frames, height, width),
        face_pixel_values=torch.randn(1, 3, 4 * generated_frames - 3, FACE_SIZE, FACE_SIZE),  # 77 for 20 frames
    )


def test_generated_frames_attend_locally_and_the_reference_frame_globally(monkeypatch):
    model = tiny_wan_animate()
    window = (1, 1, 1)
    apply_local_attention(model, tile=TILE, window=window)
    kinds = {key: type(p).__name__ for key, p in model.attn_processors.items()}
    assert {key for key, kind in kinds.items() if kind == "WanAnimateLocalAttnProcessor"} == {
        "blocks.0.attn1.processor", "blocks.1.attn1.processor"}  # cross-attention and the face adapter stay stock
    for frames, height, width in ((2, 8, 10), (3, 6, 8)):  # the grid is read from each call's latent
        kwargs = inputs(frames, height, width)
        video_grid = (frames, height // PATCH, width // PATCH)
        reference_tokens = video_grid[1] * video_grid[2]
        out = run_no_grad(model, kwargs)
        stock = stock_copy(model)
        expected = local_rule_reference(stock, kwargs, wan_animate, video_grid, TILE, window, reference_tokens,
                                        monkeypatch, global_position="prefix")
        assert_rel_close(out, expected, 1e-5, f"grid {video_grid}")
        assert (out - run_no_grad(stock, kwargs)).abs().max() > 1e-3, "the window should change the output"
        # The reference frame is not merely one more frame of the local grid: that rule gives another output.
        whole_grid = (frames + 1, *video_grid[1:])
        plain_local = local_rule_reference(stock, kwargs, wan_animate, whole_grid, TILE, window, 0, monkeypatch)
        assert (out - plain_local).abs().max() > 1e-3


def test_covering_window_equals_stock_and_blocks_select():
    model = tiny_wan_animate()
    assert_covering_window_is_stock(model, run_no_grad, inputs(2, 8, 10), tile=TILE)
    apply_local_attention(model, tile=TILE, window=(1, 1, 1), blocks=[1])
    kinds = {key: type(p).__name__ for key, p in model.attn_processors.items()}
    assert kinds["blocks.1.attn1.processor"] == "WanAnimateLocalAttnProcessor"
    assert kinds["blocks.0.attn1.processor"] == "WanAttnProcessor"
    with pytest.raises(ValueError, match=r"blocks must be indices in \[0, 2\)"):
        apply_local_attention(model, blocks=[2])


def test_triton_kernels_equal_the_torch_reference():
    """The model with the Triton backend (interpreter; the reference frame's global part on the kernels too) equals
    the torch backend."""
    outputs = []
    for backend in ("torch", "triton"):
        model = tiny_wan_animate()
        apply_local_attention(model, tile=TILE, window=(1, 1, 1), backend=backend)
        outputs.append(run_no_grad(model, inputs(2, 8, 10)))
    assert_rel_close(outputs[1], outputs[0], 1e-5, "triton vs torch")


def test_reference_frame_alone_attends_densely():
    """A call without generated frames (only the reference frame) runs dense attention, as the stock model."""
    processor = WanAnimateLocalAttnProcessor(tile=TILE, window=(1, 1, 1))
    q, k, v = (torch.randn(1, 12, 2, 16) for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert_rel_close(processor.attend(q, k, v, (1, 3, 4)), dense.transpose(1, 2), 1e-6, "reference frame only")
