"""Without a reference video FastVMTPipeline is plain text-to-video: it must give diffusers' WanPipeline's result
for the same components and seed -- with the flow-matching Euler scheduler and with the UniPC scheduler the Wan
Diffusers repositories ship, for Wan2.2's two experts, and for TI2V-5B's per-token timesteps."""
import pytest
import torch
from _utils import assert_rel_close
from _wan_tiny import MAX_SEQUENCE_LENGTH, build_components, single_thread, ti2v_components, two_expert_components

from fastvmt import FastVMTPipeline

PARITY_TOL = 1e-5  # fp32; the two loops run the same operations, up to the per-token vs scalar timestep form


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_thread()


def _unipc():
    from diffusers import UniPCMultistepScheduler

    # As in the Wan2.1 Diffusers repositories' scheduler_config.json (flow_shift 3.0 for 480p).
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                   flow_shift=3.0)


def _latents(pipeline, size, **kwargs):
    args = dict(prompt="a cat runs", negative_prompt="a dog", height=size[0], width=size[1], num_frames=9,
                num_inference_steps=4, guidance_scale=3.0, max_sequence_length=MAX_SEQUENCE_LENGTH,
                output_type="latent", generator=torch.Generator().manual_seed(0))
    args.update(kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(**args).frames


@pytest.mark.parametrize(
    "case",
    ["euler", "unipc", "two-experts", "ti2v"],
)
def test_plain_generation_matches_wan_pipeline(case):
    from diffusers import WanPipeline

    size, extra = (32, 48), {}
    if case == "two-experts":
        components = two_expert_components(vae=True)
        extra = dict(guidance_scale_2=2.0)
    elif case == "ti2v":
        components, size = ti2v_components(), (64, 96)
    else:
        components = build_components(vae=True)
        if case == "unipc":
            components["scheduler"] = _unipc()
    want = _latents(WanPipeline(**components), size, **extra)
    got = _latents(FastVMTPipeline(**components), size, **extra)
    assert_rel_close(got, want, PARITY_TOL, f"{case}: FastVMTPipeline vs WanPipeline latents")


def test_plain_generation_with_bf16_weights_matches_wan_pipeline_exactly():
    """With bf16 weights WanPipeline's Euler steps return bf16 latents; a plain run here keeps them too (guided runs
    keep fp32 latents instead, see tests/test_pipeline_diffusers_features.py)."""
    from diffusers import WanPipeline

    components = build_components(vae=True)
    components["transformer"] = components["transformer"].to(torch.bfloat16)
    want = _latents(WanPipeline(**components), (32, 48))
    got = _latents(FastVMTPipeline(**components), (32, 48))
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)
