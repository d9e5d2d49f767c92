"""FastVMTPipeline on tiny random Wan components (pixel space and with the Wan VAE), CPU, torch backends."""
import numpy as np
import pytest
import torch
from _wan_tiny import single_thread, MAX_SEQUENCE_LENGTH, moving_square_video, tiny_pipeline_dir

from fastvmt import FastVMTPipeline, MotionTransferConfig, apply_local_attention
from fastvmt.guidance import GuidanceState, guidance_step
from fastvmt.processors import LocalAttnProcessor



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_thread()

NUM_LAYERS = 3
MOTION_BLOCK = 1
SIZE, FRAMES = 16, 5  # pixel space: 8 x 8 tokens per frame with patch (1, 2, 2)


def small_config(**overrides) -> MotionTransferConfig:
    base = dict(motion_block=MOTION_BLOCK, guided_steps=2, tile=(2, 2), window=5, kernel_backend="torch")
    return MotionTransferConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory):
    return tiny_pipeline_dir(tmp_path_factory.mktemp("pixel"), vae=False, num_layers=NUM_LAYERS)


@pytest.fixture
def pipe(pixel_dir):
    pipeline = FastVMTPipeline.from_pretrained(pixel_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def reference():
    return moving_square_video(FRAMES + 2, SIZE, SIZE)


def run(pipe, reference, config, seed=0, **kwargs):
    args = dict(
        prompt="a red circle",
        reference_video=reference,
        motion_config=config,
        height=SIZE,
        width=SIZE,
        num_frames=FRAMES,
        num_inference_steps=3,
        guidance_scale=2.0,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        generator=torch.Generator().manual_seed(seed),
    )
    args.update(kwargs)
    return pipe(**args)


def record_reference_levels(pipe):
    """Wrap ``pipe.reference_flow``; returns the list it fills with (transformer timestep, sigma) per call."""
    levels, original = [], pipe.reference_flow

    def recording(latents, noise, sigma, *args, **kwargs):
        levels.append((float(pipe._current_timestep), sigma))
        return original(latents, noise, sigma, *args, **kwargs)

    pipe.reference_flow = recording
    return levels


class PassCounter:
    """Counts transformer passes that build an autograd graph, and the blocks they run."""

    def __init__(self, transformer):
        self.graph_passes = 0
        self.graph_blocks = set()
        self.nograd_blocks = set()
        self.handles = [transformer.patch_embedding.register_forward_pre_hook(self._on_embed)]
        for index, block in enumerate(transformer.blocks):
            self.handles.append(block.register_forward_pre_hook(self._on_block(index)))

    @staticmethod
    def _builds_graph(inputs):
        return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs)

    def _on_embed(self, module, inputs):
        if self._builds_graph(inputs):
            self.graph_passes += 1

    def _on_block(self, index):
        def hook(module, inputs):
            (self.graph_blocks if self._builds_graph(inputs) else self.nograd_blocks).add(index)

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("guided_steps", [1, 2])
def test_gradient_reuse_runs_four_graph_passes_per_guided_step(pipe, reference, guided_steps):
    counter = PassCounter(pipe.transformer)
    run(pipe, reference, small_config(guided_steps=guided_steps, inner_iters=10, reuse_interval=3))
    counter.remove()
    assert counter.graph_passes == 4 * guided_steps
    assert pipe.guidance_state.gradient_passes == 4 * guided_steps
    assert counter.graph_blocks == set(range(MOTION_BLOCK + 1)), f"graph passes ran blocks {counter.graph_blocks}"
    computed = [r["iteration"] for r in pipe.guidance_state.history if r["computed"]]
    assert computed == [0, 3, 6, 9] * guided_steps
    assert len(pipe.guidance_state.history) == 10 * guided_steps


def test_carry_gradient_skips_iteration_zero_after_the_first_step(pipe, reference):
    counter = PassCounter(pipe.transformer)
    run(pipe, reference, small_config(guided_steps=3, carry_gradient_across_steps=True))
    counter.remove()
    assert counter.graph_passes == 4 + 3 + 3


def test_amf_loss_decreases_over_inner_iterations(pipe, reference):
    # One guided step with a gradient at every iteration; the tiny random model needs a larger step than 0.003
    # to move the loss visibly, and window_weight=0 isolates the AMF term.
    config = small_config(guided_steps=1, reuse_interval=1, lr_start=0.05, lr_end=0.05, window_weight=0.0)
    run(pipe, reference, config, num_inference_steps=2)
    amf = [r["amf"] for r in pipe.guidance_state.history]
    assert len(amf) == 10
    assert amf[-1] < 0.9 * amf[0], f"AMF loss did not decrease: {amf}"


def test_fixed_generator_reproduces_and_seed_matters(pipe, reference):
    config = small_config(guided_steps=1)
    first = run(pipe, reference, config, seed=3).frames
    second = run(pipe, reference, config, seed=3).frames
    other = run(pipe, reference, config, seed=4).frames
    assert first.shape == (1, FRAMES, SIZE, SIZE, 3)
    np.testing.assert_array_equal(first, second)
    assert np.abs(first - other).max() > 1e-3


def test_guidance_changes_the_result_and_state_is_restored(pipe, reference):
    processors = dict(pipe.transformer.attn_processors)
    flags = [p.requires_grad for p in pipe.transformer.parameters()]
    plain = run(pipe, None, None).frames
    guided = run(pipe, reference, small_config(lr_start=0.05, lr_end=0.05)).frames
    assert np.abs(plain - guided).max() > 1e-4
    assert all(pipe.transformer.attn_processors[k] is v for k, v in processors.items())
    assert [p.requires_grad for p in pipe.transformer.parameters()] == flags
    assert pipe.transformer.gradient_checkpointing is False


def test_ditflow_recipe_runs_five_adam_iterations(pipe, reference):
    counter = PassCounter(pipe.transformer)
    out = run(pipe, reference, MotionTransferConfig(recipe="ditflow", motion_block=MOTION_BLOCK, guided_steps=2))
    counter.remove()
    assert out.frames.shape == (1, FRAMES, SIZE, SIZE, 3) and np.isfinite(out.frames).all()
    assert counter.graph_passes == 10
    history = pipe.guidance_state.history
    assert {r["lr"] for r in history if r["guided_step"] == 0} == {0.002}
    assert {r["lr"] for r in history if r["guided_step"] == 1} == {0.001}


def test_checkpointing_and_mean_flow_options_run(pipe, reference):
    config = small_config(guided_steps=1, gradient_checkpointing=True, head_reduce="mean_flow", reference_noise=0.1)
    out = run(pipe, reference, config)
    assert np.isfinite(out.frames).all() and pipe.guidance_state.gradient_passes == 4


def test_checkpointed_passes_enter_the_offload_hook_like_forward(pipe, reference):
    """With enable_model_cpu_offload, accelerate moves the transformer to the GPU in a hook before forward; the
    checkpointed truncated pass calls the blocks directly and must run that hook too (recorded here on CPU)."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Recorder(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Recorder.calls += 1
            return args, kwargs

    add_hook_to_module(pipe.transformer, Recorder())
    try:
        run(pipe, reference, small_config(guided_steps=1, gradient_checkpointing=True))
    finally:
        remove_hook_from_module(pipe.transformer)
    # 3 steps x 2 CFG passes + 1 reference pass (no grad: through forward) + 4 checkpointed gradient passes
    assert Recorder.calls == 3 * 2 + 1 + 4


def test_local_attention_in_guidance_with_full_window_matches_dense(pipe, reference):
    config = small_config(guided_steps=1)
    dense = run(pipe, reference, config, output_type="latent").frames
    apply_local_attention(pipe.transformer, tile=(1, 2, 2), window=(99, 99, 99), phases="guidance", backend="torch")
    local = run(pipe, reference, config, output_type="latent").frames
    assert isinstance(pipe.transformer.blocks[0].attn1.processor, LocalAttnProcessor)
    torch.testing.assert_close(local, dense, rtol=1e-4, atol=1e-4)


def test_init_from_reference_runs_the_last_steps_and_callbacks(pipe, reference):
    seen = []

    def callback(pipeline, step, timestep, kwargs):
        seen.append(step)
        return {"latents": kwargs["latents"]}

    config = small_config(guided_steps=1, init_latent="reference", init_strength=0.5)
    out = run(pipe, reference, config, num_inference_steps=4, callback_on_step_end=callback, output_type="pt")
    assert seen == [0, 1]
    assert out.frames.shape == (1, FRAMES, 3, SIZE, SIZE)


def test_save_and_reload_round_trips_pixel_space(pipe, reference, tmp_path):
    assert pipe.vae is None
    pipe.save_pretrained(str(tmp_path / "copy"))
    again = FastVMTPipeline.from_pretrained(str(tmp_path / "copy"))
    again.set_progress_bar_config(disable=True)
    assert again.vae is None and again.vae_scale_factor_spatial == 1
    config = small_config(guided_steps=1)
    np.testing.assert_array_equal(run(pipe, reference, config).frames, run(again, reference, config).frames)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(height=15), "multiples of 2"),
        (dict(num_frames=8), "reference video has 7 frames but 8 are requested"),
        (dict(output_type="mp4"), "output_type must be one of"),
        (dict(motion_config=MotionTransferConfig(motion_block=5)), "transformer has 3 blocks"),
        (dict(reference_video=[]), "empty list"),
        (dict(motion_config="fastvmt"), "MotionTransferConfig"),
    ],
)
def test_bad_inputs_raise_before_any_work(pipe, reference, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(pipe, reference, small_config(), **kwargs)


@pytest.fixture(scope="module")
def vae_pipe(tmp_path_factory):
    pipeline = FastVMTPipeline.from_pretrained(tiny_pipeline_dir(tmp_path_factory.mktemp("vae"), vae=True))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_vae_pipeline_any_size_and_4k_plus_1_frames(vae_pipe):
    ref = moving_square_video(12, 40, 56)  # resized / center-cropped to 32 x 48, 9 frames sampled from 12
    config = small_config(guided_steps=1, tile=(2, 2), window=3)
    out = vae_pipe(
        prompt="a cat", reference_video=ref, motion_config=config, height=32, width=48, num_frames=9,
        num_inference_steps=2, max_sequence_length=MAX_SEQUENCE_LENGTH, generator=torch.Generator().manual_seed(0),
    )
    assert out.frames.shape == (1, 9, 32, 48, 3)
    assert vae_pipe.guidance_state.gradient_passes == 4
    with pytest.raises(ValueError, match="multiples of 16"):
        vae_pipe(prompt="a cat", reference_video=ref, height=40, width=48, num_frames=9)
    with pytest.raises(ValueError, match=r"num_frames must be 4k \+ 1"):
        vae_pipe(prompt="a cat", reference_video=ref, height=32, width=48, num_frames=8)


@pytest.mark.parametrize("reuse_interval", [1, 3])
def test_guidance_step_matches_torch_adamw_with_cached_gradients(reuse_interval):
    """The inner loop equals torch.optim.AdamW fed the same (cached) gradients and the same lr schedule."""

    target = torch.randn(2, 3, 4, 5)
    start = torch.randn(2, 3, 4, 5)
    loss_fn = lambda x: (((x - target) ** 3).abs().sum(), {"loss": 0.0})  # noqa: E731
    config = MotionTransferConfig(reuse_interval=reuse_interval, kernel_backend="torch")
    state = GuidanceState()
    ours = guidance_step(start.clone(), loss_fn, config, state, step_index=0, guided_index=0)

    param = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.AdamW([param], lr=config.lr_start, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay)
    cached = None
    for j in range(config.inner_iters):
        if j % reuse_interval == 0:
            x = param.detach().clone().requires_grad_(True)
            (cached,) = torch.autograd.grad(loss_fn(x)[0], x)
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate(0, j)
        param.grad = cached.clone()
        optimizer.step()
    torch.testing.assert_close(ours, param.detach(), rtol=1e-5, atol=1e-6)
    assert state.gradient_passes == len(range(0, 10, reuse_interval))
    assert not torch.equal(ours, start)


def test_batched_videos_each_get_guidance(pipe, reference):
    counter = PassCounter(pipe.transformer)
    out = run(pipe, reference, small_config(guided_steps=1), num_videos_per_prompt=2)
    counter.remove()
    assert out.frames.shape == (2, FRAMES, SIZE, SIZE, 3)
    assert counter.graph_passes == 4  # one batched pass per gradient iteration
    assert np.abs(out.frames[0] - out.frames[1]).max() > 1e-3  # independent noise draws
    assert pipe.use_gradient_checkpointing(torch.zeros(1, 3, 2, 4, 4), small_config()) is False  # "auto" on CPU


def test_reference_windows_are_shared_with_the_generated_video(pipe, reference, monkeypatch):
    calls = []
    original = pipe.motion_flow_of

    def spy(*args, **kwargs):
        flow = original(*args, **kwargs)
        calls.append((kwargs["reference"], kwargs.get("windows"), flow.windows))
        return flow

    monkeypatch.setattr(pipe, "motion_flow_of", spy)
    config = small_config(guided_steps=1, window=3, window_source="reference")
    shared = run(pipe, reference, config, num_videos_per_prompt=2).frames
    references = [windows for is_ref, _, windows in calls if is_ref]
    generated = [(given, used) for is_ref, given, used in calls if not is_ref]
    assert references and len(generated) == 4
    for given, used in generated:
        assert given is references[-1]
        assert used.shape[0] == 2 and torch.equal(used, given.expand_as(used))
    calls.clear()
    own = run(pipe, reference, config.replace(window_source="own"), num_videos_per_prompt=2).frames
    assert all(given is None for is_ref, given, _ in calls if not is_ref)
    assert np.abs(own - shared).max() > 1e-4


def test_unipc_scheduler_as_the_wan_repositories_ship_it_runs_guided_transfer(reference):
    """The Wan Diffusers repositories ship UniPCMultistepScheduler (flow sigmas); guidance edits the latent between
    its multistep updates, from noise and from the noised reference."""
    from diffusers import UniPCMultistepScheduler

    from _wan_tiny import build_components

    components = build_components(vae=False, num_layers=NUM_LAYERS)
    components["scheduler"] = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    pipeline = FastVMTPipeline(**components)
    pipeline.set_progress_bar_config(disable=True)
    for init in ("noise", "reference"):
        out = run(pipeline, reference, small_config(init_latent=init), num_inference_steps=4)
        assert out.frames.shape == (1, FRAMES, SIZE, SIZE, 3) and np.isfinite(out.frames).all()
        assert pipeline.guidance_state.gradient_passes == 4 * 2


def test_reference_is_noised_at_the_current_level_when_starting_from_the_reference(pipe, reference):
    """init_latent="reference" at strength 0.5 skips the first steps: each guided step's reference pass must use
    that step's noise level (the transformer timestep is 1000 x sigma), not the level of the step's index."""
    levels = record_reference_levels(pipe)
    config = small_config(guided_steps=2, inner_iters=1, init_latent="reference", init_strength=0.5)
    run(pipe, reference, config, num_inference_steps=4)  # steps 2, 3 of 4 run, both guided
    assert len(levels) == 2
    for t, sigma in levels:
        assert abs(t - 1000.0 * sigma) < 1e-2, levels


def test_init_from_reference_starts_from_the_noised_reference(pipe, reference):
    """Unguided, strength 0.5: the output depends on the reference through the starting latent only."""
    config = small_config(guided_steps=0, init_latent="reference", init_strength=0.5)
    a = run(pipe, reference, config, num_inference_steps=4, output_type="latent").frames
    b = run(pipe, reference.flip(-1), config, num_inference_steps=4, output_type="latent").frames
    assert (a - b).abs().max() > 1e-3  # the noised reference is the starting latent


def test_local_attention_for_the_guidance_phase_changes_guidance_passes_only(pipe, reference):
    """A 1 x 1 x 1 tile window (far from dense) installed with phases="guidance": a guided run changes, an unguided
    one does not (the full-window test above cannot tell which passes ran locally)."""
    guided, unguided = small_config(guided_steps=1), small_config(guided_steps=0)
    dense = [run(pipe, reference, c, output_type="latent").frames for c in (guided, unguided)]
    apply_local_attention(pipe.transformer, tile=(1, 2, 2), window=(1, 1, 1), phases="guidance", backend="torch")
    local = [run(pipe, reference, c, output_type="latent").frames for c in (guided, unguided)]
    assert (local[0] - dense[0]).abs().max() > 1e-5
    torch.testing.assert_close(local[1], dense[1], rtol=0, atol=0)


def test_fixed_reference_level_sets_the_reference_timestep(pipe, reference):
    """reference_noise=0.3: one reference pass for the whole run, at timestep 300."""
    calls = []
    original = pipe.motion_flow_of

    def spy(latents, timestep, *args, **kwargs):
        if kwargs["reference"]:
            calls.append(timestep.clone())
        return original(latents, timestep, *args, **kwargs)

    pipe.motion_flow_of = spy
    run(pipe, reference, small_config(guided_steps=2, inner_iters=1, reference_noise=0.3))
    assert len(calls) == 1  # a fixed level is computed once
    torch.testing.assert_close(calls[0], torch.full_like(calls[0], 300.0))


def test_guidance_step_optimises_an_fp32_master_of_a_bf16_latent():
    """A bf16 latent is optimised as an fp32 master copy (the loss sees fp32) and returned in bf16."""
    torch.manual_seed(0)
    target = torch.randn(1, 2, 3, 4, 4)
    start = (torch.randn(1, 2, 3, 4, 4) * 4).bfloat16()
    seen = []

    def loss_fn(x):
        seen.append(x.dtype)
        return ((x - target) ** 2).sum(), {"loss": 0.0}

    config = MotionTransferConfig(kernel_backend="torch")
    ours = guidance_step(start, loss_fn, config, GuidanceState(), step_index=0, guided_index=0)
    assert ours.dtype == torch.bfloat16
    assert all(d == torch.float32 for d in seen)
    fp32 = guidance_step(start.float(), loss_fn, config, GuidanceState(), step_index=0, guided_index=0)
    assert torch.equal(ours, fp32.bfloat16())


def test_each_guided_step_starts_fresh_adam_moments_and_step_count():
    """Adam's moments and bias-correction step count restart at every guided step (within-step schedule): the
    second guided step equals a first step from the same latent."""
    torch.manual_seed(0)
    target = torch.randn(2, 3, 4, 5)
    start = torch.randn(2, 3, 4, 5)
    loss_fn = lambda x: (((x - target) ** 3).abs().sum(), {"loss": 0.0})  # noqa: E731
    config = MotionTransferConfig(kernel_backend="torch", guided_steps=2)
    state = GuidanceState()
    x1 = guidance_step(start, loss_fn, config, state, step_index=0, guided_index=0)
    x2 = guidance_step(x1, loss_fn, config, state, step_index=1, guided_index=1)
    fresh = guidance_step(x1, loss_fn, config, GuidanceState(), step_index=0, guided_index=0)
    torch.testing.assert_close(x2, fresh, rtol=0, atol=0)
