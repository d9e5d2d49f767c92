"""FastVMTPipeline with diffusers features users combine it with: block caches, LoRA scales, precomputed prompt
embeddings, order-2 schedulers, half-precision weights, and WanPipeline's argument checks (tiny random Wan, CPU)."""
import numpy as np
import pytest
import torch
from _wan_tiny import MAX_SEQUENCE_LENGTH, moving_square_video, single_thread
from test_pipeline import (  # noqa: F401
    FRAMES, MOTION_BLOCK, SIZE, pipe, pixel_dir, record_reference_levels, reference, run, small_config,
)

from fastvmt import FastVMTPipeline
from fastvmt.motion import truncated_qk


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_thread()


def test_a_block_cache_is_off_in_guidance_and_on_again_after(pipe, reference):
    from diffusers import FirstBlockCacheConfig

    plain = run(pipe, reference, small_config()).frames
    cache = FirstBlockCacheConfig(threshold=0.0)  # never skips a block: the video must not change
    pipe.transformer.enable_cache(cache)
    cached = run(pipe, reference, small_config()).frames  # raised "No cache context is set" in the first guidance pass
    assert pipe.transformer.is_cache_enabled and pipe.transformer._cache_config is cache
    assert pipe.guidance_state.gradient_passes == 2 * 4
    np.testing.assert_allclose(cached, plain, rtol=0, atol=1e-6)


def _lora_transformer(pipe):
    from peft import LoraConfig

    torch.manual_seed(0)
    transformer = pipe.transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "ffn.net.2"],
                                       init_lora_weights=False))
    return transformer


def test_lora_scale_reaches_checkpointed_guidance_passes_and_their_recomputation(pipe):
    pytest.importorskip("peft")
    transformer = _lora_transformer(pipe)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 3, FRAMES, SIZE, SIZE, generator=gen)
    timestep = torch.tensor([500.0])
    text = torch.randn(1, MAX_SEQUENCE_LENGTH, transformer.config.text_dim, generator=gen)
    weights = None

    def qk_and_grad(scale, checkpointed):
        x = latents.clone().requires_grad_(True)
        q, k = truncated_qk(transformer, x, timestep, text, MOTION_BLOCK, gradient_checkpointing=checkpointed,
                            attention_kwargs={"scale": scale})
        nonlocal weights
        if weights is None:
            weights = torch.randn(q.shape, generator=gen)
        ((q + k) * weights).sum().backward()  # the checkpointed blocks recompute here, after the pass returned
        return q.detach(), k.detach(), x.grad

    by_scale = {}
    for scale in (1.0, 0.0, 0.5):
        eager = qk_and_grad(scale, False)
        checkpointed = qk_and_grad(scale, True)
        for name, want, got in zip(("q", "k", "d latents"), eager, checkpointed):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"scale {scale}: {name}")
        by_scale[scale] = eager
    assert not torch.allclose(by_scale[0.0][0], by_scale[1.0][0], atol=1e-4)  # the scale does change the LoRA
    torch.testing.assert_close(qk_and_grad(1.0, True)[0], by_scale[1.0][0])  # and is undone afterwards


def test_prompt_embeds_are_repeated_for_num_videos_per_prompt(pipe, reference):
    embeds, negative = pipe.encode_prompt("a red circle", negative_prompt="", max_sequence_length=MAX_SEQUENCE_LENGTH)
    from_text = run(pipe, reference, small_config(), num_videos_per_prompt=2).frames
    from_embeds = run(pipe, reference, small_config(), prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative,
                      num_videos_per_prompt=2).frames
    assert from_embeds.shape[0] == 2  # was 1
    np.testing.assert_allclose(from_embeds, from_text, rtol=0, atol=2e-5)  # T5 at batch 1 vs 2: rounding


def test_wan_pipeline_argument_checks_apply(pipe, reference, pixel_dir):
    with pytest.raises(ValueError, match="guidance_scale_2"):  # a single-expert model has no second scale
        run(pipe, reference, small_config(), guidance_scale_2=9.0)
    no_text = FastVMTPipeline.from_pretrained(pixel_dir, text_encoder=None, tokenizer=None)
    embeds, negative = pipe.encode_prompt("a red circle", negative_prompt="", max_sequence_length=MAX_SEQUENCE_LENGTH)
    with pytest.raises(ValueError, match="negative_prompt_embeds when guidance_scale > 1"):
        run(no_text, None, small_config(), prompt=None, prompt_embeds=embeds)


def test_order_two_scheduler_noises_the_reference_at_each_sub_step_level(pipe, reference):
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe.scheduler = FlowMatchHeunDiscreteScheduler(shift=3.0)
    levels = record_reference_levels(pipe)
    run(pipe, reference, small_config(guided_steps=3), num_inference_steps=4)
    assert len(levels) == 3
    for t, sigma in levels:  # flow matching: t = 1000 sigma (was the sigma two sub-steps later)
        assert abs(t - 1000.0 * sigma) < 1e-2, levels


def test_half_precision_weights_keep_fp32_latents_through_euler_steps(pipe, reference):
    pipe.transformer.to(torch.bfloat16)
    dtypes = []

    def record(pipeline, step, t, tensors):
        dtypes.append(tensors["latents"].dtype)
        return tensors

    run(pipe, reference, small_config(), callback_on_step_end=record)
    assert dtypes == [torch.float32] * 3  # bf16 latents lost part of each guidance update when cast back


def test_across_steps_learning_rate_reaches_lr_end_when_fewer_steps_are_guided(pipe, reference):
    config = small_config(recipe="ditflow", guided_steps=10, init_latent="reference", init_strength=0.67)
    run(pipe, reference, config, num_inference_steps=3)  # the last round(0.67 * 3) = 2 steps run, both guided
    rates = sorted({(r["guided_step"], r["lr"]) for r in pipe.guidance_state.history})
    assert rates == [(0, pytest.approx(config.lr_start)), (1, pytest.approx(config.lr_end))]  # was 0.002 -> 0.00189


def test_model_offload_returns_the_vae_to_the_cpu_after_encoding_the_reference(reference, monkeypatch):
    """With enable_model_cpu_offload the VAE, used once to encode the reference, goes back to the CPU before the
    denoising loop (it stayed on the GPU until the end); a plain run never encodes and never offloads it early."""
    from _wan_tiny import build_components

    pipe = FastVMTPipeline(**build_components(vae=True))
    pipe.set_progress_bar_config(disable=True)
    events = []

    class Hook:
        model = pipe.vae

        def offload(self):
            events.append("vae offloaded")

    monkeypatch.setattr(pipe, "_all_hooks", [Hook()], raising=False)
    handle = pipe.transformer.register_forward_pre_hook(lambda *args: events.append("transformer"))
    size = dict(height=32, width=48, num_frames=9, num_inference_steps=2, output_type="latent")
    run(pipe, moving_square_video(11, 32, 48), small_config(guided_steps=1), **size)
    assert events[0] == "vae offloaded" and events.count("vae offloaded") == 1
    events.clear()
    run(pipe, None, small_config(), **size)
    handle.remove()
    assert "vae offloaded" not in events
