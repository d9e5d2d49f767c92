"""Drop-in local attention on tiny random LTX-2 audio-video transformers: the video self-attention equals the stock
model with the local rule as its mask (appended conditioning tokens global), for LTX-2.0 blocks and for gated, split-
RoPE, perturbed (spatio-temporal guidance) blocks with 2 x 2 patches; a covering window equals the stock model;
only the video self-attention is patched; the Triton kernels (interpreter) equal the torch reference; calls it cannot
serve run the stock path."""
import warnings

import pytest
import torch
from _utils import (
    REL_TOL,
    assert_covering_window_is_stock,
    assert_rel_close,
    local_rule_reference,
    run_no_grad,
)
from _wan_tiny import sharpen_self_attention, single_thread
from diffusers.models.transformers import transformer_ltx2

from fastvmt.ltx2 import LTX2LocalAttnProcessor, read_grid
from fastvmt.processors import apply_local_attention

CHANNELS, TEXT_CHANNELS, TEXT_LEN = 4, 16, 6
AUDIO_TOKENS = 7  # differs from every video length here: local_rule_reference masks only video self-attention
TILE, WINDOW = (1, 2, 2), (1, 1, 1)
FPS = 25.0
# name -> (extra config, latent (frames, height, width), spatio-temporal guidance: (blocks, perturbation mask))
VARIANTS = {
    # LTX-2.0 blocks: interleaved RoPE, no gates; token grid (3, 5, 6), ragged against the tile.
    "ltx2": ({}, (3, 5, 6), None),
    # LTX-2.3-style blocks: gated heads, split RoPE, perturbed attention; 2 x 2 patches make the latent (2, 7, 8) a
    # (2, 4, 4) token grid; guidance perturbs the first video of block 1 and leaves the second one attending.
    "gated_split_perturbed": (
        dict(gated_attn=True, rope_type="split", perturbed_attn=True, patch_size=2), (2, 7, 8), ([1], [0.0, 1.0])
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_thread()


def _model(**extra):
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(0)
    model = LTX2VideoTransformer3DModel(
        in_channels=CHANNELS, out_channels=CHANNELS, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, audio_in_channels=CHANNELS, audio_out_channels=CHANNELS, audio_num_attention_heads=2,
        audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2, caption_channels=TEXT_CHANNELS,
        rope_double_precision=False, **extra,
    ).eval()
    sharpen_self_attention(model.transformer_blocks)
    return model


def _token_grid(model, latent):
    return read_grid(model, (), dict(zip(("num_frames", "height", "width"), latent)))


def _call(model, latent, batch=2, extra_tokens=0, stg=None):
    """Forward keyword arguments as LTX2Pipeline passes them (latent sizes and their ``video_coords``); with
    ``extra_tokens``, conditioning tokens appended past the grid with their positions, as LTX2ConditionPipeline's
    keyframes."""
    torch.manual_seed(1)
    frames, height, width = latent
    coords = model.rope.prepare_video_coords(batch, frames, height, width, torch.device("cpu"), fps=FPS)
    coords = torch.cat([coords, coords[:, :, -extra_tokens:]], dim=2) if extra_tokens else coords
    call = dict(
        hidden_states=torch.randn(batch, coords.shape[2], CHANNELS),
        audio_hidden_states=torch.randn(batch, AUDIO_TOKENS, CHANNELS),
        encoder_hidden_states=torch.randn(batch, TEXT_LEN, TEXT_CHANNELS),
        audio_encoder_hidden_states=torch.randn(batch, TEXT_LEN, TEXT_CHANNELS),
        timestep=torch.tensor([700.0] * batch), num_frames=frames, height=height, width=width,
        audio_num_frames=AUDIO_TOKENS, fps=FPS, video_coords=coords,
    )
    if stg is not None:
        blocks, mask = stg
        call.update(spatio_temporal_guidance_blocks=blocks, perturbation_mask=torch.tensor(mask))
    return call


@pytest.mark.parametrize("extra_tokens", [0, 5])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_equals_stock_model_with_the_local_rule_as_mask(variant, extra_tokens, monkeypatch):
    config, latent, stg = VARIANTS[variant]
    model = _model(**config)
    grid = _token_grid(model, latent)
    call = _call(model, latent, extra_tokens=extra_tokens, stg=stg)
    stock = run_no_grad(model, call)
    want = local_rule_reference(model, call, transformer_ltx2, grid, TILE, WINDOW, extra_tokens, monkeypatch)
    apply_local_attention(model, tile=TILE, window=WINDOW, backend="torch")
    got = run_no_grad(model, call)
    assert_rel_close(got, want, REL_TOL[torch.float32], f"{variant}, {extra_tokens} appended tokens")
    assert (got - stock).abs().max() > 1e-3  # the window hides keys: not the dense model


def test_covering_window_equals_stock_and_uninstalling_restores_it():
    model = _model()
    call = _call(model, (3, 5, 6), extra_tokens=4)
    assert_covering_window_is_stock(model, run_no_grad, call, tile=TILE)


def test_only_the_video_self_attention_of_chosen_blocks_is_patched():
    model = _model()
    apply_local_attention(model, blocks=[1], backend="torch")
    local = {key for key, proc in model.attn_processors.items() if isinstance(proc, LTX2LocalAttnProcessor)}
    assert local == {"transformer_blocks.1.attn1.processor"}


@pytest.mark.parametrize("extra_tokens", [0, 3])
def test_triton_kernels_match_the_torch_reference(extra_tokens):
    config, latent, stg = VARIANTS["gated_split_perturbed"]
    model = _model(**config)
    call = _call(model, latent, batch=2, extra_tokens=extra_tokens, stg=stg)
    apply_local_attention(model, tile=TILE, window=WINDOW, backend="torch")
    ref = run_no_grad(model, call)
    apply_local_attention(model, tile=TILE, window=WINDOW, backend="triton")
    tri = run_no_grad(model, call)
    assert_rel_close(tri, ref, 1e-4, f"triton vs torch processor, {extra_tokens} appended tokens")


def _stock_and_local(model, call):
    """The stock model's output and the local one's (window WINDOW) for the same call."""
    stock = run_no_grad(model, call)
    apply_local_attention(model, tile=TILE, window=WINDOW, backend="torch")
    return stock, run_no_grad(model, call)


def test_calls_without_the_grid_or_with_fewer_tokens_run_dense_with_one_warning():
    model = _model()
    no_grid = _call(model, (3, 5, 6), batch=1)
    for name in ("num_frames", "height", "width"):
        no_grid.pop(name)  # positions in video_coords alone
    short = _call(model, (3, 5, 6), batch=1)
    short["hidden_states"] = short["hidden_states"][:, :-4]
    short["video_coords"] = short["video_coords"][:, :, :-4]
    stock = [run_no_grad(model, c) for c in (no_grid, short)]
    apply_local_attention(model, tile=TILE, window=WINDOW, backend="torch")
    with pytest.warns(UserWarning, match="gives no num_frames / height / width.*runs dense"):
        got = run_no_grad(model, no_grid)
    assert_rel_close(got, stock[0], REL_TOL[torch.float32], "no grid")
    apply_local_attention(model, tile=TILE, window=WINDOW, backend="torch")  # fresh processor: warns again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run_no_grad(model, short)
        run_no_grad(model, short)
    messages = [str(w.message) for w in caught if "runs dense" in str(w.message)]
    assert len(messages) == 1 and r"grid (3, 5, 6) (90 tokens) for a sequence of 86" in messages[0]
    assert_rel_close(got, stock[1], REL_TOL[torch.float32], "fewer tokens than the grid")


def test_masked_calls_and_fully_perturbed_guidance_run_the_stock_path(monkeypatch):
    """A video self-attention mask (the IC-LoRA pipeline's) and guidance that perturbs every video (no attention at
    all) take the stock processor: the model equals the stock one and the local kernels are never called."""
    import fastvmt_kernels

    def no_local(*args, **kwargs):
        raise AssertionError("local attention ran")

    monkeypatch.setattr(fastvmt_kernels, "local_attention", no_local)
    monkeypatch.setattr(fastvmt_kernels, "joint_local_attention", no_local)
    model = _model(perturbed_attn=True)
    masked = _call(model, (3, 5, 6), batch=1)
    torch.manual_seed(3)
    masked["video_self_attention_mask"] = (torch.rand(1, 90, 90) > 0.3).float()
    stock, local = _stock_and_local(model, masked)
    assert_rel_close(local, stock, REL_TOL[torch.float32], "masked call")
    model = _model(perturbed_attn=True)
    perturbed = _call(model, (3, 5, 6), batch=2, stg=([0, 1], [0.0, 0.0]))
    stock, local = _stock_and_local(model, perturbed)
    assert torch.equal(local, stock)


def test_read_grid_rounds_latent_sizes_up_to_patches():
    model = _model(patch_size=2)
    assert read_grid(model, (), dict(num_frames=3, height=7, width=8)) == (3, 4, 4)
    assert read_grid(model, (), dict(num_frames=3, height=7)) is None


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_regional_compile_fullgraph_equals_eager(variant):
    """``compile_repeated_blocks(fullgraph=True)`` traces the local blocks (appended tokens: the joint path) and gives
    the eager output. Without guidance: with it, the stock audio self-attention branches on the all-perturbed flag's
    value, which ``fullgraph=True`` cannot trace whatever the video processor."""
    config, latent, _ = VARIANTS[variant]
    model = _model(**config)
    call = _call(model, latent, extra_tokens=3)
    apply_local_attention(model, tile=TILE, window=WINDOW, backend="torch")
    eager = run_no_grad(model, call)
    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    try:
        compiled = run_no_grad(model, call)
    finally:
        torch._dynamo.reset()
    assert_rel_close(compiled, eager, 1e-5, "compiled vs eager")
