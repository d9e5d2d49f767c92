"""Attention processors: Q/K capture, truncated passes, drop-in local attention, phases."""
import pytest
import torch
from _utils import REL_TOL, assert_rel_close
from _wan_tiny import sharpen_self_attention, single_thread, transformer_config

from fastvmt.motion import truncated_qk
from fastvmt_kernels import TileLayout
from fastvmt.processors import (
    DEFAULT_LOCAL_TILE,
    DEFAULT_LOCAL_WINDOW,
    PHASES,
    LocalAttnProcessor,
    QKCaptureProcessor,
    StopForward,
    _rotate,
    apply_local_attention,
    attention_phase,
    capture_qk,
    current_phase,
)

NUM_LAYERS = 4
TEXT_LEN = 7


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_thread()


@pytest.fixture
def transformer():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**transformer_config(in_channels=3, num_layers=NUM_LAYERS)).eval()
    sharpen_self_attention(model.blocks)
    return model


def _inputs(frames=3, height=10, width=12, batch=1):
    """Ragged token grid (frames, 5, 6) with patch (1, 2, 2)."""
    x = torch.randn(batch, 3, frames, height, width)
    t = torch.full((batch,), 700.0)
    text = torch.randn(batch, TEXT_LEN, 32)
    return x, t, text


def _forward(model, x, t, text):
    return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


def test_capture_without_stop_matches_stock_output_and_records_qk(transformer):
    x, t, text = _inputs()
    with torch.no_grad():
        expected = _forward(transformer, x, t, text)
        with capture_qk(transformer, 2, stop=False) as capture:
            actual = _forward(transformer, x, t, text)
    assert_rel_close(actual, expected, REL_TOL[torch.float32], "output")
    assert capture.query.shape == (1, 3 * 5 * 6, 2, 16) and capture.key.shape == capture.query.shape
    assert not torch.equal(capture.query, capture.key)


def test_capture_restores_previous_processor_even_on_error(transformer):
    before = dict(transformer.attn_processors)
    x, t, text = _inputs()
    with pytest.raises(StopForward), torch.no_grad(), capture_qk(transformer, 1) as capture:
        assert isinstance(transformer.blocks[1].attn1.processor, QKCaptureProcessor)
        _forward(transformer, x, t, text)
    assert capture.query is not None
    assert all(transformer.attn_processors[k] is v for k, v in before.items())
    with pytest.raises(ValueError, match=r"motion block must be in \[0, 4\)"):
        with capture_qk(transformer, NUM_LAYERS):
            pass


def test_truncated_pass_runs_no_later_block_and_checkpoint_route_matches(transformer):
    x, t, text = _inputs(batch=2)
    calls = []
    hooks = [blk.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, blk in enumerate(transformer.blocks)]
    leaf = x.clone().requires_grad_(True)
    q, k = truncated_qk(transformer, leaf, t, text, 1)
    assert calls == [0, 1], f"blocks run: {calls}"
    assert q.shape == (2, 3, 30, 2, 16)
    (gq,) = torch.autograd.grad((q * k).sum(), leaf)
    calls.clear()
    leaf2 = x.clone().requires_grad_(True)
    q2, k2 = truncated_qk(transformer, leaf2, t, text, 1, gradient_checkpointing=True)
    (gq2,) = torch.autograd.grad((q2 * k2).sum(), leaf2)
    for h in hooks:
        h.remove()
    assert calls and max(calls) == 1
    assert_rel_close(q2, q, REL_TOL[torch.float32], "q (checkpointed route)")
    assert_rel_close(k2, k, REL_TOL[torch.float32], "k (checkpointed route)")
    assert_rel_close(gq2, gq, 1e-4, "grad (checkpointed route)")


def test_checkpointed_guidance_pass_recomputes_in_its_phase_from_another_thread(transformer):
    """On CUDA, backward (and so checkpoint recomputation) runs in autograd's device thread, where the thread-local
    phase marker is unset; a guidance-only local processor must still be recomputed in the guidance phase. Running
    backward from a fresh thread reproduces that on CPU (it raised CheckpointError before the fix)."""
    import threading

    apply_local_attention(transformer, tile=(1, 2, 2), window=(1, 1, 1), phases="guidance", backend="torch")
    x, t, text = _inputs()
    grads = {}
    for route in (False, True):
        leaf = x.clone().requires_grad_(True)
        with attention_phase("guidance"):
            q, k = truncated_qk(transformer, leaf, t, text, 2, gradient_checkpointing=route)
        loss = (q * k).sum()
        errors = []

        def backward():
            try:
                grads[route] = torch.autograd.grad(loss, leaf)[0]
            except Exception as exc:  # surfaced in the main thread below
                errors.append(exc)

        worker = threading.Thread(target=backward)
        worker.start()
        worker.join()
        assert not errors, f"backward (checkpointed={route}) from another thread failed: {str(errors[0])[:300]}"
    assert_rel_close(grads[True], grads[False], 1e-4, "checkpointed vs plain guidance gradient")


def test_full_window_local_processor_equals_dense(transformer):
    x, t, text = _inputs()
    with torch.no_grad():
        dense = _forward(transformer, x, t, text)
        apply_local_attention(transformer, tile=(1, 2, 2), window=(99, 99, 99), backend="torch")
        local = _forward(transformer, x, t, text)
    assert isinstance(transformer.blocks[0].attn1.processor, LocalAttnProcessor)
    assert type(transformer.blocks[0].attn2.processor).__name__ == "WanAttnProcessor"  # cross-attention untouched
    assert_rel_close(local, dense, REL_TOL[torch.float32], "full-window local vs dense")


def test_small_window_changes_output_and_restore(transformer):
    x, t, text = _inputs()
    with torch.no_grad():
        dense = _forward(transformer, x, t, text)
        previous = apply_local_attention(transformer, tile=(1, 2, 2), window=(1, 1, 1), backend="torch")
        local = _forward(transformer, x, t, text)
        transformer.set_attn_processor(previous)
        restored = _forward(transformer, x, t, text)
    assert (local - dense).abs().max() > 1e-3
    assert torch.equal(restored, dense)


def test_a_deep_copy_tracks_its_own_token_grid(transformer):
    import copy

    apply_local_attention(transformer, tile=(1, 2, 2), window=(1, 1, 1), backend="torch")
    twin = copy.deepcopy(transformer)
    small, large = _inputs(frames=2, height=6, width=8), _inputs(frames=3, height=10, width=12)
    with torch.no_grad():
        _forward(transformer, *small)  # the original's grid is now (2, 3, 4)
        want = _forward(transformer, *large)
        _forward(transformer, *small)
        got = _forward(twin, *large)  # raised, or ran on (2, 3, 4), when the copy's hook fed the original's grid
    assert torch.equal(got, want)


def test_checkpointed_blocks_recompute_with_their_own_pass_grid(transformer):
    """With diffusers' gradient checkpointing the blocks rerun in backward, after later forwards have moved the
    shared grid on: two forwards on grids of one token count ((1, 3, 4) and (1, 4, 3)) and then one backward must
    give the gradients of two separate backwards (it gave a relative error of ~2.5), and grids of different counts
    must not fail in backward."""
    transformer.enable_gradient_checkpointing()
    apply_local_attention(transformer, tile=(1, 2, 2), window=(1, 1, 1), backend="torch")
    shapes = [(1, 6, 8), (1, 8, 6), (2, 6, 8)]
    inputs = [_inputs(*shape) for shape in shapes]
    xs = [x.requires_grad_() for x, _, _ in inputs]

    def loss(i):
        x, t, text = inputs[i]
        return _forward(transformer, x, t, text).square().mean()

    separate = []
    for i in range(len(shapes)):
        separate.append(torch.autograd.grad(loss(i), xs[i])[0])
    together = torch.autograd.grad(sum(loss(i) for i in range(len(shapes))), xs)
    for shape, got, want in zip(shapes, together, separate):
        assert_rel_close(got, want, 1e-5, f"input gradient at {shape}")


def test_local_backend_matches_torch_reference_backend(transformer):
    """The processor's output with the Triton kernel (interpreter on CPU) equals the torch reference backend."""
    pytest.importorskip("fastvmt_kernels.local_attention.op")
    x, t, text = _inputs(frames=2, height=6, width=8)
    with torch.no_grad():
        apply_local_attention(transformer, tile=(1, 2, 2), window=(1, 1, 1), backend="torch", blocks=[0])
        ref = _forward(transformer, x, t, text)
        apply_local_attention(transformer, tile=(1, 2, 2), window=(1, 1, 1), backend="triton", blocks=[0])
        tri = _forward(transformer, x, t, text)
    assert_rel_close(tri, ref, 1e-4, "triton vs torch processor")


@pytest.mark.parametrize("phases, local_in", [("guidance", {"guidance"}), ("denoise", {"denoise"}), ("both", {"guidance", "denoise"})])
def test_phases_select_where_local_attention_runs(transformer, phases, local_in):
    x, t, text = _inputs()
    with torch.no_grad():
        dense = _forward(transformer, x, t, text)
        apply_local_attention(transformer, tile=(1, 2, 2), window=(1, 1, 1), phases=phases, backend="torch", blocks=[0, 2])
        for phase in ("guidance", "denoise"):
            with attention_phase(phase):
                out = _forward(transformer, x, t, text)
            assert torch.equal(out, dense) != (phase in local_in), f"phase {phase}"
    assert current_phase() == "denoise"
    procs = transformer.attn_processors
    assert isinstance(procs["blocks.2.attn1.processor"], LocalAttnProcessor)
    assert not isinstance(procs["blocks.1.attn1.processor"], LocalAttnProcessor)


def test_local_processor_keeps_diffusers_attributes(transformer):
    apply_local_attention(transformer, backend="torch")
    proc = transformer.blocks[0].attn1.processor
    assert hasattr(proc, "_attention_backend") and hasattr(proc, "_parallel_config")
    transformer.set_attention_backend("native")
    assert getattr(proc._attention_backend, "value", proc._attention_backend) == "native"


def test_bad_arguments_raise(transformer):
    with pytest.raises(ValueError, match="phases must be one of"):
        apply_local_attention(transformer, phases="always")
    with pytest.raises(ValueError, match=r"blocks must be indices in \[0, 4\)"):
        apply_local_attention(transformer, blocks=[7])
    with pytest.raises(ValueError, match=r"blocks must be indices in \[0, 4\), got \[True, 1.0\]"):
        apply_local_attention(transformer, blocks=[True, 1.0, 2])
    import numpy as np

    apply_local_attention(transformer, blocks=np.arange(1, 3), backend="torch")  # numpy / torch integers are indices
    patched = [i for i, block in enumerate(transformer.blocks) if isinstance(block.attn1.processor, LocalAttnProcessor)]
    assert patched == [1, 2]
    with pytest.raises(ValueError, match="window"):
        apply_local_attention(transformer, window=(0, 1, 1))
    with pytest.raises(ValueError, match="phase must be one of"):
        with attention_phase("train"):
            pass
    # Installed by hand without a grid: a clear error on first use.
    transformer.set_attn_processor(LocalAttnProcessor(tile=(1, 2, 2), window=(1, 1, 1)))
    x, t, text = _inputs()
    with pytest.raises(ValueError, match="does not know the token grid"), torch.no_grad():
        _forward(transformer, x, t, text)
    transformer.set_attn_processor(LocalAttnProcessor(tile=(1, 2, 2), window=(9, 9, 9), grid=(3, 5, 6), backend="torch"))
    with torch.no_grad():
        assert torch.isfinite(_forward(transformer, x, t, text)).all()


def test_captured_qk_are_after_norm_and_rope(transformer):
    """The motion block's captured q, k equal norm_q(to_q(h)), norm_k(to_k(h)) rotated by the block's RoPE, from
    the hidden states and rotary embedding its attention received."""
    x, t, text = _inputs()
    attn = transformer.blocks[2].attn1
    seen = {}

    def pre(module, args, kwargs):
        seen["h"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["rope"] = kwargs.get("rotary_emb", args[3] if len(args) > 3 else None)

    handle = attn.register_forward_pre_hook(pre, with_kwargs=True)
    with torch.no_grad(), capture_qk(transformer, 2, stop=False) as capture:
        _forward(transformer, x, t, text)
    handle.remove()
    assert seen["rope"] is not None
    with torch.no_grad():
        q = attn.norm_q(attn.to_q(seen["h"])).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(seen["h"])).unflatten(2, (attn.heads, -1))
        q, k = _rotate(q, *seen["rope"]), _rotate(k, *seen["rope"])
    torch.testing.assert_close(capture.query, q)
    torch.testing.assert_close(capture.key, k)


def test_default_tile_and_window_as_documented():
    layout = TileLayout.create((21, 30, 52), DEFAULT_LOCAL_TILE, DEFAULT_LOCAL_WINDOW)
    assert layout.num_tiles == (7, 3, 13) and all(g % t == 0 for g, t in zip(layout.grid, layout.tile))
    assert layout.density() == pytest.approx(0.256, abs=5e-4)


def test_processor_defaults_to_both_phases():
    assert LocalAttnProcessor().phases == PHASES


def test_every_lazy_export_of_the_package_resolves_to_its_module_attribute():
    """``fastvmt.<name>`` for each public name imported on first use is that module's object (a typo in a module
    path or a name would surface only when a user touched it)."""
    import importlib

    import fastvmt

    for name, module in fastvmt._LAZY_EXPORTS.items():
        assert getattr(fastvmt, name) is getattr(importlib.import_module(module), name), name
