"""FastVMTPipeline with a torch.compile'd transformer (tiny random Wan, pixel space, CPU).

diffusers' regional compilation (``transformer.compile_repeated_blocks(fullgraph=True)``) and whole-model
``transformer.compile(fullgraph=True)`` must give the eager pipeline's video, guidance included: a truncated pass ends
with an exception in the motion block, which a compiled region cannot carry (before the fix, fullgraph compilation
failed with "Observed exception"). Compiled with the ``aot_eager`` backend: AOTAutograd traces forward and backward
as inductor would, without its minutes of C++ code generation on a CPU.
"""
import pytest
import torch
from _wan_tiny import MAX_SEQUENCE_LENGTH, moving_square_video, single_thread, tiny_pipeline_dir

from fastvmt import FastVMTPipeline, MotionTransferConfig, apply_local_attention

SIZE, FRAMES, MOTION_BLOCK = 16, 5, 1
COMPILE_BACKEND = "aot_eager"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_thread()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory):
    return tiny_pipeline_dir(tmp_path_factory.mktemp("pixel"), vae=False, num_layers=3)


@pytest.fixture(scope="module")
def reference():
    return moving_square_video(FRAMES + 2, SIZE, SIZE)


def _pipe(pixel_dir, local: bool):
    pipe = FastVMTPipeline.from_pretrained(pixel_dir)
    pipe.set_progress_bar_config(disable=True)
    if local:  # phase-selective: the compiled blocks must see the guidance / denoise switch
        apply_local_attention(pipe.transformer, tile=(1, 2, 2), window=(3, 1, 1), phases="guidance")
    return pipe


def _video(pipe, reference, seed=0, **config):
    motion = MotionTransferConfig(
        motion_block=MOTION_BLOCK, guided_steps=2, tile=(2, 2), window=5, kernel_backend="torch", **config
    )
    return pipe(
        prompt="a red circle", reference_video=reference, motion_config=motion, height=SIZE, width=SIZE,
        num_frames=FRAMES, num_inference_steps=3, guidance_scale=2.0, max_sequence_length=MAX_SEQUENCE_LENGTH,
        generator=torch.Generator().manual_seed(seed), output_type="pt",
    ).frames


def _compiled_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("local, checkpointing", [(True, False), (False, True)])
def test_regional_fullgraph_compile_matches_eager_and_compiles_once(pixel_dir, reference, local, checkpointing):
    eager = _video(_pipe(pixel_dir, local), reference, gradient_checkpointing=checkpointing)
    pipe = _pipe(pixel_dir, local)
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=COMPILE_BACKEND)
    compiled = _video(pipe, reference, gradient_checkpointing=checkpointing)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    graphs = _compiled_graphs()
    # One graph per kind of block pass: reference (no grad, frozen weights), gradient, denoising.
    assert 1 <= graphs <= 3
    again = _video(pipe, reference, seed=1, gradient_checkpointing=checkpointing)
    assert _compiled_graphs() == graphs, "a second video recompiled the blocks"
    assert not torch.allclose(again, compiled)


def test_whole_model_fullgraph_compile_matches_eager(pixel_dir, reference):
    eager = _video(_pipe(pixel_dir, local=True), reference)
    pipe = _pipe(pixel_dir, local=True)
    pipe.transformer.compile(fullgraph=True, backend=COMPILE_BACKEND)
    torch.testing.assert_close(_video(pipe, reference), eager, rtol=1e-4, atol=1e-5)
    assert _compiled_graphs() >= 1  # the denoising passes ran compiled (guidance passes run the eager forward)
    assert pipe.transformer._compiled_call_impl is not None  # the truncated passes gave the compiled call back


def test_local_attention_installs_through_a_torch_compile_wrapper():
    """``apply_local_attention(torch.compile(transformer))`` patches the wrapped model: the compiled wrapper then gives
    the eager patched model's output in the guidance phase (which differs from dense attention), dense attention in
    the denoising phase, and follows a new token grid."""
    from _wan_tiny import build_components

    from fastvmt.processors import attention_phase

    torch.manual_seed(0)
    transformer = build_components(vae=False)["transformer"].eval()
    embeds, timestep = torch.randn(1, 16, 32), torch.tensor([500.0])
    small, large = torch.randn(1, 3, 5, 16, 16), torch.randn(1, 3, 9, 16, 24)

    def run(model, latents, phase):
        with torch.no_grad(), attention_phase(phase):
            return model(latents, timestep, embeds, return_dict=False)[0]

    dense = run(transformer, small, "denoise")
    compiled = torch.compile(transformer, backend=COMPILE_BACKEND, fullgraph=True)
    apply_local_attention(compiled, tile=(1, 2, 2), window=(1, 1, 1), phases="guidance")
    got = {(latents.shape, phase): run(compiled, latents, phase)
           for latents in (small, large) for phase in ("guidance", "denoise")}
    torch.testing.assert_close(got[(small.shape, "denoise")], dense)
    for latents in (small, large):
        torch.testing.assert_close(got[(latents.shape, "guidance")], run(transformer, latents, "guidance"))
    assert (got[(small.shape, "guidance")] - dense).abs().max() > 0.1
