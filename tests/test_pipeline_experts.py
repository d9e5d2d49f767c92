"""FastVMTPipeline with two experts (Wan2.2 A14B layout: transformer = high noise, transformer_2 = low noise)."""
import pytest
import torch
from _wan_tiny import MAX_SEQUENCE_LENGTH, moving_square_video, single_thread, two_expert_components

from fastvmt import FastVMTPipeline, MotionTransferConfig

BOUNDARY = 0.5
SIZE, FRAMES, STEPS, MOTION_BLOCK = 16, 5, 4, 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("experts")
    FastVMTPipeline(**two_expert_components(boundary_ratio=BOUNDARY)).save_pretrained(str(path))
    return str(path)


@pytest.fixture
def pipe(experts_dir):
    pipeline = FastVMTPipeline.from_pretrained(experts_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def run(pipe, config=None, reference=True, **kwargs):
    args = dict(
        prompt="a red circle", height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=STEPS,
        guidance_scale=2.0, max_sequence_length=MAX_SEQUENCE_LENGTH, generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    if reference:
        args.update(reference_video=moving_square_video(FRAMES + 2, SIZE, SIZE), motion_config=config)
    args.update(kwargs)
    return pipe(**args).frames


class PassLog:
    """Per transformer: passes that build a graph and passes that do not (counted at the patch embedding)."""

    def __init__(self, pipe):
        self.counts = {name: {"graph": 0, "nograd": 0} for name in ("transformer", "transformer_2")}
        self.handles = [
            getattr(pipe, name).patch_embedding.register_forward_pre_hook(self._hook(name)) for name in self.counts
        ]

    def _hook(self, name):
        def hook(module, inputs):
            graph = torch.is_grad_enabled() and inputs[0].requires_grad
            self.counts[name]["graph" if graph else "nograd"] += 1

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def config(**overrides):
    base = dict(motion_block=MOTION_BLOCK, guided_steps=STEPS, tile=(2, 2), window=5, kernel_backend="torch")
    return MotionTransferConfig(**{**base, **overrides})


def test_load_round_trip_keeps_both_experts(pipe):
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == BOUNDARY
    assert [id(m) for m in pipe.experts()] == [id(pipe.transformer), id(pipe.transformer_2)]


@pytest.mark.parametrize("reference_noise", ["current_t", 0.0])
def test_every_step_and_its_guidance_run_on_the_expert_for_its_timestep(pipe, reference_noise):
    pipe.scheduler.set_timesteps(STEPS)
    boundary_t = BOUNDARY * pipe.scheduler.config.num_train_timesteps
    high = sum(float(t) >= boundary_t for t in pipe.scheduler.timesteps)
    low = STEPS - high
    assert high >= 1 and low >= 1, "the schedule must cross the boundary for this test to mean anything"
    log = PassLog(pipe)
    run(pipe, config(reference_noise=reference_noise, reuse_interval=3, inner_iters=10))
    log.remove()
    # 4 gradient passes per guided step (iterations 0, 3, 6, 9), on that step's expert only
    assert log.counts["transformer"]["graph"] == 4 * high
    assert log.counts["transformer_2"]["graph"] == 4 * low
    # no-grad passes: 2 per denoising step (CFG) + the reference passes (one per guided step, or one per expert when
    # the reference sits at a fixed noise level: each expert compares both videos through its own features)
    per_expert_reference = (high, low) if reference_noise == "current_t" else (1, 1)
    assert log.counts["transformer"]["nograd"] == 2 * high + per_expert_reference[0]
    assert log.counts["transformer_2"]["nograd"] == 2 * low + per_expert_reference[1]


def test_identical_experts_reproduce_the_single_transformer_pipeline():
    pair = FastVMTPipeline(**two_expert_components(same_weights=True))
    single_components = {k: v for k, v in two_expert_components(same_weights=True).items()
                         if k not in ("transformer_2", "boundary_ratio")}
    single = FastVMTPipeline(**single_components)
    for p in (pair, single):
        p.set_progress_bar_config(disable=True)
    motion = config(guided_steps=2)
    assert torch.equal(run(pair, motion), run(single, motion))


def test_guidance_scale_2_drives_the_low_noise_expert_only(pipe):
    def latents_per_step(**kwargs):
        seen = []

        def keep(pipeline, step, t, tensors):
            seen.append((float(t), tensors["latents"].clone()))
            return {}

        run(pipe, reference=False, callback_on_step_end=keep, **kwargs)
        return seen

    boundary_t = BOUNDARY * pipe.scheduler.config.num_train_timesteps
    default = latents_per_step()
    same = latents_per_step(guidance_scale_2=2.0)  # None means guidance_scale
    other = latents_per_step(guidance_scale_2=4.0)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(default, same))
    for (t, a), (_, b) in zip(default, other):
        assert torch.equal(a, b) == (t >= boundary_t), f"t = {t}: guidance_scale_2 acts below the boundary only"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(transformer_2=None), "needs transformer_2"),
        (dict(boundary_ratio=1.5), r"must lie in \(0, 1\)"),
    ],
)
def test_unsupported_expert_settings_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        FastVMTPipeline(**{**two_expert_components(), **overrides})
