"""apply_local_attention on the other diffusers transformers built on Wan's self-attention (Wan-VACE with its control
blocks, ChronoEdit, SkyReels-V2 with diffusion forcing), and a clear refusal of transformers it does not know."""
import warnings

import pytest
import torch
from _utils import REL_TOL, assert_covering_window_is_stock, assert_rel_close, local_rule_reference, stock_copy
from _wan_tiny import sharpen_self_attention, single_thread, transformer_config

from fastvmt.processors import LocalAttnProcessor, apply_local_attention

NUM_LAYERS = 4
VACE_LAYERS = (0, 2)  # main blocks fed by the two control blocks
CONTROL_CHANNELS = 6
TEXT_LEN = 7


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_thread()


def _vace():
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(0)
    config = dict(transformer_config(in_channels=4, num_layers=NUM_LAYERS), vace_layers=list(VACE_LAYERS),
                  vace_in_channels=CONTROL_CHANNELS)
    model = WanVACETransformer3DModel(**config).eval()
    sharpen_self_attention(list(model.blocks) + list(model.vace_blocks))
    return model


def _chronoedit():
    from diffusers import ChronoEditTransformer3DModel

    torch.manual_seed(0)
    model = ChronoEditTransformer3DModel(**transformer_config(in_channels=4, num_layers=NUM_LAYERS)).eval()
    sharpen_self_attention(model.blocks)
    return model


def _skyreels(frames_per_block: int = 1):
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(0)
    model = SkyReelsV2Transformer3DModel(**transformer_config(in_channels=4, num_layers=NUM_LAYERS)).eval()
    model.register_to_config(num_frame_per_block=frames_per_block)
    sharpen_self_attention(model.blocks)
    return model


def _inputs(model, frames=3, height=10, width=12):
    """Ragged token grid (frames, 5, 6) with patch (1, 2, 2); control states for Wan-VACE."""
    torch.manual_seed(1)
    kwargs = dict(hidden_states=torch.randn(1, 4, frames, height, width), timestep=torch.tensor([700.0]),
                  encoder_hidden_states=torch.randn(1, TEXT_LEN, 32), return_dict=False)
    if type(model).__name__ == "WanVACETransformer3DModel":
        kwargs["control_hidden_states"] = torch.randn(1, CONTROL_CHANNELS, frames, height, width)
    return kwargs


@pytest.mark.parametrize("build", [_vace, _chronoedit, _skyreels], ids=["wan-vace", "chronoedit", "skyreels-v2"])
def test_covering_window_equals_stock_and_small_window_differs(build):
    model = build()
    inputs = _inputs(model)
    with torch.no_grad():
        assert_covering_window_is_stock(model, lambda m, kwargs: m(**kwargs)[0], inputs, tile=(1, 2, 2))
        stock = model(**inputs)[0]
        apply_local_attention(model, tile=(1, 2, 2), window=(1, 1, 1), backend="torch")
        local = model(**inputs)[0]
    assert (local - stock).abs().max() > 1e-3


def test_vace_control_blocks_follow_the_main_block_they_feed():
    model = _vace()
    apply_local_attention(model, blocks=[2, 3], backend="torch")
    local = {key for key, proc in model.attn_processors.items() if isinstance(proc, LocalAttnProcessor)}
    # vace_blocks.1 feeds main block 2 (VACE_LAYERS); vace_blocks.0 feeds block 0, which is not chosen.
    assert local == {"blocks.2.attn1.processor", "blocks.3.attn1.processor", "vace_blocks.1.attn1.processor"}
    apply_local_attention(model, backend="torch")
    local = {key for key, proc in model.attn_processors.items() if isinstance(proc, LocalAttnProcessor)}
    assert local == {f"blocks.{i}.attn1.processor" for i in range(NUM_LAYERS)} | {
        f"vace_blocks.{i}.attn1.processor" for i in range(len(VACE_LAYERS))}


def test_vace_control_blocks_run_local_attention():
    """Patching only the control blocks changes the output: their attention runs the local kernel too."""
    model = _vace()
    inputs = _inputs(model)
    with torch.no_grad():
        stock = model(**inputs)[0]
        main_only = apply_local_attention(model, tile=(1, 2, 2), window=(1, 1, 1), backend="torch")
        model.set_attn_processor({key: (proc if key.startswith("vace_blocks") else main_only[key])
                                  for key, proc in model.attn_processors.items()})
        control_only = model(**inputs)[0]
    assert (control_only - stock).abs().max() > 1e-4


def test_skyreels_diffusion_forcing_runs_block_causal_local_attention(monkeypatch):
    """Under diffusion forcing (frames per block set after installation, as the pipeline does) every block's
    self-attention gets SkyReels-V2's frame-block-causal mask; the processor runs it as block-causal local attention:
    equal to the stock model with the causal local rule added to that mask, unlike the stock (dense causal) model."""
    from diffusers.models.transformers import transformer_skyreels_v2

    model = _skyreels()
    inputs = _inputs(model, frames=6)
    grid, tile, window = (6, 5, 6), (1, 2, 2), (3, 1, 2)
    apply_local_attention(model, tile=tile, window=window, backend="torch")
    model._set_ar_attention(2)
    with torch.no_grad():
        local = model(**inputs)[0]
    stock = stock_copy(model)
    call = {name: value for name, value in inputs.items() if name != "return_dict"}
    want = local_rule_reference(stock, call, transformer_skyreels_v2, grid, tile, window, 0, monkeypatch,
                                causal_frames=2)
    assert_rel_close(local, want, REL_TOL[torch.float32], "block-causal local vs masked stock")
    with torch.no_grad():
        assert (local - stock(**inputs)[0]).abs().max() > 1e-3
    apply_local_attention(model, tile=tile, window=window, backend="triton")
    with torch.no_grad():
        assert_rel_close(model(**inputs)[0], local, 1e-4, "triton vs torch processor")


def test_skyreels_diffusion_forcing_compiles_fullgraph():
    """``compile_repeated_blocks(fullgraph=True)`` traces the block-causal processor (its read of the model's frames
    per block included) and gives the eager output."""
    model = _skyreels()
    inputs = _inputs(model, frames=6)
    apply_local_attention(model, tile=(1, 2, 2), window=(3, 1, 2), backend="torch")
    model._set_ar_attention(2)
    with torch.no_grad():
        eager = model(**inputs)[0]
        model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        try:
            compiled = model(**inputs)[0]
        finally:
            torch._dynamo.reset()
    assert_rel_close(compiled, eager, 1e-5, "compiled vs eager")


def test_skyreels_causal_blocks_that_tiles_cannot_hold_run_dense_with_one_warning():
    """Blocks of 3 frames with 2-frame tiles cannot be whole tiles: the causal calls keep the stock dense path."""
    model = _skyreels(frames_per_block=3)
    inputs = _inputs(model, frames=6)
    with torch.no_grad():
        stock = model(**inputs)[0]
        apply_local_attention(model, tile=(2, 2, 2), window=(2, 1, 1), backend="torch")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            local = model(**inputs)[0]
    assert torch.equal(local, stock)
    messages = [str(w.message) for w in caught if "runs dense" in str(w.message)]
    assert len(messages) == 1 and "blocks of 3 frames need tile[0] dividing 3" in messages[0]


def test_unknown_transformer_is_refused_with_the_supported_list():
    class FluxTransformer2DModel(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match=r"supports \[.*WanVACETransformer3DModel.*\], got FluxTransformer2DModel"):
        apply_local_attention(FluxTransformer2DModel())
