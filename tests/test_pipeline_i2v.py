"""FastVMTImageToVideoPipeline on tiny random Wan image-to-video components (with a CLIP image encoder as Wan2.1 I2V,
without one as Wan2.2 I2V), CPU, torch backends."""
import pytest
import torch
from _utils import assert_rel_close
from _wan_tiny import MAX_SEQUENCE_LENGTH, i2v_components, moving_square_video, single_thread, ti2v_components

from fastvmt import FastVMTImageToVideoPipeline, MotionTransferConfig
from fastvmt.image_to_video import load_image
from fastvmt.motion import truncated_qk
from fastvmt.video_io import prepare_reference

HEIGHT, WIDTH, FRAMES = 32, 48, 9
MOTION_BLOCK = 1
GUIDED_STEPS = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_thread()


def small_config(**overrides):
    base = dict(motion_block=MOTION_BLOCK, guided_steps=GUIDED_STEPS, tile=(2, 2), window=3, kernel_backend="torch")
    return MotionTransferConfig(**{**base, **overrides})


@pytest.fixture(scope="module", params=[True, False], ids=["clip", "no-image-encoder"])
def pipe(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("i2v")
    FastVMTImageToVideoPipeline(**i2v_components(image_encoder=request.param)).save_pretrained(str(folder))
    pipeline = FastVMTImageToVideoPipeline.from_pretrained(str(folder))
    pipeline.set_progress_bar_config(disable=True)
    assert (pipeline.image_encoder is not None) == request.param
    return pipeline


@pytest.fixture(scope="module")
def reference():
    return moving_square_video(FRAMES + 3, HEIGHT, WIDTH)


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(3)
    return torch.rand(HEIGHT, WIDTH, 3)  # a different picture from the reference's first frame


def run(pipe, image, reference, config, **kwargs):
    args = dict(
        prompt="a red circle", reference_video=reference, motion_config=config, height=HEIGHT, width=WIDTH,
        num_frames=FRAMES, num_inference_steps=3, max_sequence_length=MAX_SEQUENCE_LENGTH,
        generator=torch.Generator().manual_seed(0),
    )
    args.update(kwargs)
    return pipe(image, **args)


def test_guided_transfer_writes_the_requested_video(pipe, image, reference):
    out = run(pipe, image, reference, small_config())
    assert out.frames.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
    assert pipe.guidance_state.gradient_passes == 4 * GUIDED_STEPS


def test_generated_passes_see_the_image_and_reference_passes_its_first_frame(pipe, image, reference):
    """Every transformer call's condition channels (and CLIP embeddings) are the user's image's, except the reference
    passes (one per guided step, no grad), which carry the reference's first frame's."""
    batch = 1
    target = pipe.image_condition(load_image(image), batch, HEIGHT, WIDTH, FRAMES, torch.device("cpu"))
    first = prepare_reference(reference, FRAMES, HEIGHT, WIDTH)[0].permute(1, 2, 0)
    ref = pipe.image_condition(load_image(first), batch, HEIGHT, WIDTH, FRAMES, torch.device("cpu"))
    assert not torch.equal(target.latents, ref.latents)
    latent = pipe.vae.config.z_dim
    calls = []

    def record(module, args, kwargs):
        condition = kwargs["hidden_states"][:, latent:]
        calls.append((torch.is_grad_enabled(), condition.detach().clone(), kwargs.get("encoder_hidden_states_image")))

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run(pipe, image, reference, small_config())
    finally:
        handle.remove()

    def matches(call, expected):
        condition, embeds = expected.latents, expected.embeds
        same = torch.equal(call[1], condition)
        if embeds is None:
            return same and call[2] is None
        return same and call[2] is not None and torch.equal(call[2], embeds)

    assert all(matches(call, target) for call in calls if call[0]), "a gradient pass lacked the image condition"
    reference_calls = [call for call in calls if matches(call, ref)]
    assert len(reference_calls) == GUIDED_STEPS and not any(call[0] for call in reference_calls)
    assert all(matches(call, target) or matches(call, ref) for call in calls)


def test_checkpointed_truncated_pass_matches_forward_with_image_context(pipe):
    """The manual block route (gradient checkpointing) builds the same [image, text] cross-attention context as
    the transformer's forward."""
    torch.manual_seed(0)
    model = pipe.transformer
    x = torch.randn(1, model.config.in_channels, 3, 4, 6)
    t = torch.tensor([600.0])
    text = torch.randn(1, 5, 32)
    embeds = torch.randn(1, 17, model.config.image_dim) if model.config.image_dim else None
    routes = {}
    for checkpointed in (False, True):
        routes[checkpointed] = truncated_qk(model, x, t, text, MOTION_BLOCK, gradient_checkpointing=checkpointed,
                                            encoder_hidden_states_image=embeds)
    for got, want, name in zip(routes[True], routes[False], ("q", "k")):
        assert_rel_close(got, want, 1e-5, f"checkpointed {name}")


def test_bad_inputs_raise(pipe, reference):
    components = i2v_components(image_encoder=False)
    with pytest.raises(ValueError, match="needs an image"):
        pipe(None, prompt="a cat", reference_video=reference)
    with pytest.raises(ValueError, match="needs the Wan VAE"):
        FastVMTImageToVideoPipeline(**dict(components, vae=None))
    with pytest.raises(ValueError, match="an image-to-video model\\? Load it with fastvmt.FastVMTImageToVideoPipeline"):
        from fastvmt import FastVMTPipeline

        FastVMTPipeline(**{k: v for k, v in components.items() if k not in ("image_encoder", "image_processor")})
    from _wan_tiny import build_components

    with pytest.raises(ValueError, match="takes 36 input channels .* this one 16: a text-to-video model"):
        FastVMTImageToVideoPipeline(**build_components(vae=True))
    with pytest.raises(ValueError, match="does not exist"):
        load_image("/no/such/image.png")
    with pytest.raises(ValueError, match=r"\(H, W, 3\) or \(3, H, W\)"):
        load_image(torch.rand(4, 5))
    picture = torch.rand(3, 6, 8)
    assert load_image(picture[None]).tobytes() == load_image(picture).tobytes()  # a batch of one, as diffusers takes
    with pytest.raises(ValueError, match=r"\(H, W, 3\) or \(3, H, W\)"):
        load_image(torch.rand(2, 3, 6, 8))


def test_two_expert_image_to_video_runs_each_expert_with_the_condition(image, reference):
    """Wan2.2 I2V A14B style: both experts denoise (each for its timesteps) and both receive the image condition."""
    pipeline = FastVMTImageToVideoPipeline(**i2v_components(image_encoder=False, two_experts=True))
    pipeline.set_progress_bar_config(disable=True)
    channels = {}

    def record(name):
        def hook(module, args, kwargs):
            channels.setdefault(name, set()).add(kwargs["hidden_states"].shape[1])
        return hook

    handles = [model.register_forward_pre_hook(record(name), with_kwargs=True)
               for name, model in (("high", pipeline.transformer), ("low", pipeline.transformer_2))]
    try:
        out = run(pipeline, image, reference, small_config(), num_inference_steps=4)
    finally:
        for handle in handles:
            handle.remove()
    assert out.frames.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
    expected = {pipeline.transformer.config.in_channels}
    assert channels == {"high": expected, "low": expected}, channels


def test_plain_image_to_video_matches_wan_image_to_video_pipeline(pipe, image):
    """Without a reference video the pipeline is diffusers' WanImageToVideoPipeline (same components and seed).
    Prompt embeddings are passed in: diffusers' image-to-video prompt cleaning needs ftfy, which is not installed."""
    from diffusers import WanImageToVideoPipeline

    components = {name: getattr(pipe, name) for name in
                  ("tokenizer", "text_encoder", "vae", "scheduler", "image_processor", "image_encoder", "transformer")}
    wan = WanImageToVideoPipeline(**components)
    wan.set_progress_bar_config(disable=True)
    positive, negative = pipe.encode_prompt("a red circle", "a dog", max_sequence_length=MAX_SEQUENCE_LENGTH,
                                            device=torch.device("cpu"))
    args = dict(prompt_embeds=positive, negative_prompt_embeds=negative, height=HEIGHT, width=WIDTH,
                num_frames=FRAMES, num_inference_steps=3, guidance_scale=3.0, output_type="latent")
    picture = load_image(image)
    want = wan(image=picture, generator=torch.Generator().manual_seed(0), **args).frames
    got = pipe(picture, generator=torch.Generator().manual_seed(0), **args).frames
    assert_rel_close(got, want, 1e-5, "FastVMTImageToVideoPipeline vs WanImageToVideoPipeline latents")


TI2V_HEIGHT, TI2V_WIDTH = 64, 96  # the 16x VAE: latents 4 x 6, 2 x 3 tokens per frame


@pytest.fixture(scope="module")
def ti2v_pipe():
    pipeline = FastVMTImageToVideoPipeline(**ti2v_components())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_ti2v_plain_image_to_video_matches_wan_image_to_video_pipeline(ti2v_pipe):
    """TI2V-5B's image mode (first latent frame replaced by the image's latents, its tokens at timestep 0) gives
    WanImageToVideoPipeline's latents for the same seed."""
    from diffusers import WanImageToVideoPipeline

    components = {name: getattr(ti2v_pipe, name) for name in ("tokenizer", "text_encoder", "vae", "scheduler",
                                                               "transformer")}
    wan = WanImageToVideoPipeline(**components, expand_timesteps=True)
    wan.set_progress_bar_config(disable=True)
    positive, negative = ti2v_pipe.encode_prompt("a red circle", "a dog", max_sequence_length=MAX_SEQUENCE_LENGTH,
                                                 device=torch.device("cpu"))
    torch.manual_seed(5)
    picture = load_image(torch.rand(TI2V_HEIGHT, TI2V_WIDTH, 3))
    args = dict(prompt_embeds=positive, negative_prompt_embeds=negative, height=TI2V_HEIGHT, width=TI2V_WIDTH,
                num_frames=FRAMES, num_inference_steps=3, guidance_scale=3.0, output_type="latent")
    want = wan(image=picture, generator=torch.Generator().manual_seed(0), **args).frames
    got = ti2v_pipe(picture, generator=torch.Generator().manual_seed(0), **args).frames
    assert_rel_close(got, want, 1e-5, "TI2V: FastVMTImageToVideoPipeline vs WanImageToVideoPipeline latents")


def test_ti2v_guided_transfer_keeps_the_image_as_first_frame(ti2v_pipe):
    """Guidance runs through per-token timesteps on both routes; the returned first latent frame is the image's."""
    torch.manual_seed(5)
    picture = load_image(torch.rand(TI2V_HEIGHT, TI2V_WIDTH, 3))
    reference = moving_square_video(FRAMES + 3, TI2V_HEIGHT, TI2V_WIDTH, step=4)
    for checkpointing in (False, True):
        config = MotionTransferConfig(motion_block=MOTION_BLOCK, guided_steps=1, tile=(1, 2), window=3,
                                      kernel_backend="torch", gradient_checkpointing=checkpointing)
        latents = ti2v_pipe(picture, prompt="a red circle", reference_video=reference, motion_config=config,
                            height=TI2V_HEIGHT, width=TI2V_WIDTH, num_frames=FRAMES, num_inference_steps=2,
                            max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="latent",
                            generator=torch.Generator().manual_seed(0)).frames
        assert ti2v_pipe.guidance_state.gradient_passes == 4
        condition = ti2v_pipe.image_condition(picture, 1, TI2V_HEIGHT, TI2V_WIDTH, FRAMES, torch.device("cpu"))
        assert torch.equal(latents[:, :, :1], condition.latents)



@pytest.mark.parametrize("clip", [True, False], ids=["flf2v-clip", "no-image-encoder"])
def test_first_last_frame_matches_wan_image_to_video_pipeline_and_guides(clip, reference):
    """With a last image (Wan2.1 FLF2V: both images' CLIP tokens; the condition fixes the last frame too) the plain
    latents equal WanImageToVideoPipeline's, and guided transfer runs with the reference's first and last frames."""
    from diffusers import WanImageToVideoPipeline

    components = i2v_components(image_encoder=clip, flf2v=clip)
    ours = FastVMTImageToVideoPipeline(**components)
    ours.set_progress_bar_config(disable=True)
    wan = WanImageToVideoPipeline(**{name: value for name, value in components.items()
                                     if name not in ("transformer_2", "boundary_ratio")})
    wan.set_progress_bar_config(disable=True)
    positive, negative = ours.encode_prompt("a red circle", "a dog", max_sequence_length=MAX_SEQUENCE_LENGTH,
                                            device=torch.device("cpu"))
    torch.manual_seed(6)
    first, last = (load_image(torch.rand(HEIGHT, WIDTH, 3)) for _ in range(2))
    args = dict(prompt_embeds=positive, negative_prompt_embeds=negative, height=HEIGHT, width=WIDTH,
                num_frames=FRAMES, num_inference_steps=3, guidance_scale=3.0, output_type="latent")
    want = wan(image=first, last_image=last, generator=torch.Generator().manual_seed(0), **args).frames
    got = ours(first, last_image=last, generator=torch.Generator().manual_seed(0), **args).frames
    assert_rel_close(got, want, 1e-5, "first-last-frame latents vs WanImageToVideoPipeline")
    if clip:  # an FLF2V model embeds two images: one alone is refused clearly
        with pytest.raises(ValueError, match="first-last-frame model .* pass last_image"):
            ours(first, generator=torch.Generator().manual_seed(0), **args)
    else:
        single = ours(first, generator=torch.Generator().manual_seed(0), **args).frames
        assert not torch.allclose(single, got), "the last image changed nothing"
    out = ours(first, last_image=last, prompt_embeds=positive, negative_prompt_embeds=negative,
               reference_video=reference, motion_config=small_config(), height=HEIGHT, width=WIDTH,
               num_frames=FRAMES, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.frames.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
    assert ours.guidance_state.gradient_passes == 4 * GUIDED_STEPS


def test_reference_prompt_embeds_of_batch_one_serve_several_videos(pipe, image, reference):
    """Given empty-prompt embeddings of batch 1 equal the default ones for two videos per prompt (with CLIP the
    transformer concatenated batch-2 image embeddings to batch-1 text and failed)."""
    empty, _ = pipe.encode_prompt("", do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH)
    config = small_config(guided_steps=1)
    default = run(pipe, image, reference, config, num_videos_per_prompt=2, output_type="latent").frames
    given = run(pipe, image, reference, config, num_videos_per_prompt=2, output_type="latent",
                reference_prompt_embeds=empty).frames
    assert given.shape[0] == 2
    assert_rel_close(given, default, 1e-5, "batch-1 reference_prompt_embeds")
    with pytest.raises(ValueError, match="reference_prompt_embeds has batch 3; accepted: 1"):
        run(pipe, image, reference, config, num_videos_per_prompt=2, reference_prompt_embeds=empty.repeat(3, 1, 1))


def test_model_offload_order_is_wan_image_to_video_s(pipe, image, reference, monkeypatch):
    """enable_model_cpu_offload chains the CLIP encoder before the transformer as WanImageToVideoPipeline does (it
    stayed on the GPU through denoising), and the VAE goes back to the CPU once the conditions are encoded."""
    from diffusers import WanImageToVideoPipeline

    assert pipe.model_cpu_offload_seq == WanImageToVideoPipeline.model_cpu_offload_seq
    events = []

    class Hook:
        def __init__(self, model):
            self.model = model

        def offload(self):
            events.append("vae offloaded")

    monkeypatch.setattr(pipe, "_all_hooks", [Hook(pipe.vae)], raising=False)
    handle = pipe.transformer.register_forward_pre_hook(lambda *args: events.append("transformer"))
    try:
        run(pipe, image, reference, small_config(guided_steps=1), output_type="latent")
    finally:
        handle.remove()
    assert events[0] == "vae offloaded" and events.count("vae offloaded") == 1


def test_precomputed_image_embeds_replace_the_image_encoder(pipe, image, reference):
    """image_embeds (from pipe.encode_image, batch 1) give the video of encoding the image, for two videos; models
    without an image encoder refuse them."""
    config = small_config(guided_steps=1)
    kwargs = dict(num_videos_per_prompt=2, output_type="latent")
    if pipe.image_encoder is None:
        with pytest.raises(ValueError, match="image_embeds are read by Wan2.1 I2V"):
            run(pipe, image, reference, config, image_embeds=torch.zeros(1, 4, 8), **kwargs)
        return
    embeds = pipe.encode_image(image)
    encoded = run(pipe, image, reference, config, **kwargs).frames
    given = run(pipe, image, reference, config, image_embeds=embeds, **kwargs).frames
    assert_rel_close(given, encoded, 1e-6, "precomputed image embeddings")
    with pytest.raises(ValueError, match=r"image_embeds has batch 3; accepted: 1 \(as encode_image returns them\) or 2"):
        run(pipe, image, reference, config, image_embeds=embeds.repeat(3, 1, 1), **kwargs)
