"""``FastVMTPipeline``: Wan text-to-video with training-free motion transfer from a reference clip.

A subclass of diffusers' ``WanPipeline`` (same components, ``from_pretrained`` / ``save_pretrained``, arguments,
callbacks and output). Before each of the first ``motion_config.guided_steps`` denoising steps it optimises the
latent so that the attention motion flow of the generated video matches the reference video's
(:mod:`fastvmt.guidance`). ``vae=None`` runs in pixel space: the latents are the video itself (see
:meth:`FastVMTPipeline.latent_geometry`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.pipelines.wan.pipeline_wan import WanPipeline
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .config import MotionTransferConfig
from .guidance import GuidanceState, guidance_step
from .motion import MotionFlow, compute_flow, motion_loss, truncated_qk
from .processors import attention_phase
from .video_io import VideoLike, prepare_reference

OUTPUT_TYPES = ("np", "pil", "pt", "latent")
# gradient_checkpointing="auto": estimated saved activations of a gradient pass, in elements per token, per model
# channel and per block run, compared with this fraction of the free CUDA memory. Measured on an H100
# (benchmarks/results/pipeline.md): Wan2.1-1.3B at 480x832x81, motion block 14, one gradient pass without
# checkpointing peaks at 31.7 GiB including ~2.7 GiB of weights, i.e. ~20.4 elements per token, channel and block
# in bf16; 24 keeps a ~18% margin. (Then "auto" skips checkpointing there on an 80 GB GPU: 0.91 s instead of
# 1.20 s per gradient iteration.)
ACTIVATION_ELEMENTS_PER_CHANNEL = 24
AUTO_CHECKPOINT_FRACTION = 0.8
WAN_VAE_TEMPORAL = 4
MIN_LATENT_FRAMES = 2  # motion needs at least two (latent) frames
WAN_TEXT_LENGTH = 512  # Wan2.1's text length (umT5 tokens)


@contextlib.contextmanager
def _frozen_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` of every parameter (no weight gradients or their saved inputs), then restore."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _caches_disabled(module: torch.nn.Module) -> Iterator[None]:
    """Turn off a diffusers cache (``enable_cache``: first-block cache, MagCache, ...) for the block, then turn it on
    again (with fresh state). Guidance passes must run every block: a cache that skips blocks would return stale
    outputs and no gradient through them, and its hooks need a ``cache_context`` that truncated passes do not set."""
    config = getattr(module, "_cache_config", None) if getattr(module, "is_cache_enabled", False) else None
    if config is None:
        yield
        return
    module.disable_cache()
    try:
        yield
    finally:
        module.enable_cache(config)


class FastVMTPipeline(WanPipeline):
    """Wan text-to-video with motion transfer from a reference video (FastVMT / DiTFlow recipes): Wan2.1, Wan2.2's
    two experts (A14B: ``transformer_2``, ``boundary_ratio``) and Wan2.2 TI2V-5B as text-to-video
    (``expand_timesteps``, its 16x-compressing VAE).

    Components as ``WanPipeline``: ``tokenizer``, ``text_encoder``, ``vae``, ``scheduler``, ``transformer``.
    ``vae`` may be None (pixel space: latents are the video in [-1, 1], any frame count >= 2 and any size divisible
    by the transformer's patch size). ``tokenizer`` / ``text_encoder`` may be None when prompt embeddings are passed.
    """

    _optional_components = ["transformer", "transformer_2", "vae", "text_encoder", "tokenizer"]

    def __init__(
        self,
        tokenizer,
        text_encoder,
        vae,
        scheduler,
        transformer=None,
        transformer_2=None,
        boundary_ratio: Optional[float] = None,
        expand_timesteps: bool = False,
    ):
        # expand_timesteps (Wan2.2 TI2V-5B): WanPipeline's text-to-video path gives every token the step's timestep
        # (its first-frame mask is all ones without an image), which is the scalar-timestep function of the same
        # model; every pass here takes the scalar form (no per-token modulation tensors: B x L x 6 x dim fp32).
        if boundary_ratio is not None and (transformer_2 is None or not 0.0 < boundary_ratio < 1.0):
            raise ValueError(
                f"boundary_ratio (got {boundary_ratio!r}) must lie in (0, 1) and needs transformer_2, the low-noise expert"
            )
        super().__init__(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            transformer=transformer,
            transformer_2=transformer_2,
            boundary_ratio=boundary_ratio,
            expand_timesteps=expand_timesteps,
        )
        if vae is None:  # pixel space: no compression
            self.vae_scale_factor_temporal = 1
            self.vae_scale_factor_spatial = 1
            self.video_processor.config.vae_scale_factor = 1
        self._check_input_channels()
        self.guidance_state: Optional[GuidanceState] = None

    def _check_input_channels(self) -> None:
        """A text-to-video transformer reads the latent alone: its input channels are the VAE's latent channels (an
        image-to-video model's also hold the image condition)."""
        vae = getattr(self, "vae", None)
        if vae is None or self.transformer is None:
            return
        if self.transformer.config.in_channels != vae.config.z_dim:
            raise ValueError(
                f"the transformer takes {self.transformer.config.in_channels} input channels but the VAE's latents have "
                f"{vae.config.z_dim}: an image-to-video model? Load it with fastvmt.FastVMTImageToVideoPipeline "
                "(CLI: --image)"
            )

    # ------------------------------------------------------------------ experts (Wan2.2 A14B: two transformers)
    def expert(self, t) -> torch.nn.Module:
        """The transformer that denoises timestep ``t``: ``transformer`` (the high-noise expert) for
        t >= boundary_ratio * num_train_timesteps or without a boundary, else ``transformer_2`` (WanPipeline's rule).
        Guidance passes at a denoising step use that step's expert for the reference and the target alike."""
        boundary = self.config.boundary_ratio
        if boundary is None or float(t) >= boundary * self.scheduler.config.num_train_timesteps:
            return self.transformer
        return self.transformer_2

    def experts(self) -> List[torch.nn.Module]:
        """Every transformer the pipeline may run (one for Wan2.1, two for Wan2.2 A14B)."""
        second = self.transformer_2 if self.config.boundary_ratio is not None else None
        return [self.transformer] + ([second] if second is not None else [])

    # ------------------------------------------------------------------ component interface (VAE or pixel space)
    @property
    def uses_vae(self) -> bool:
        """Whether a VAE maps videos to latents (False: pixel space)."""
        return getattr(self, "vae", None) is not None

    def latent_geometry(self, num_frames: int, height: int, width: int) -> Tuple[int, int, int]:
        """(F', H', W') of the latent for a video of ``num_frames x height x width``; raises on unsupported sizes.

        With the Wan VAE: ``num_frames = 4k + 1`` and height, width multiples of 8 * patch (16 for Wan2.1), giving
        ((num_frames - 1) / 4 + 1, height / 8, width / 8). Pixel space: the video itself, with height and width
        multiples of the patch size and num_frames a multiple of the temporal patch.
        """
        p_t, p_h, p_w = self.transformer.config.patch_size
        spatial, temporal = self.vae_scale_factor_spatial, self.vae_scale_factor_temporal
        for name, value in (("num_frames", num_frames), ("height", height), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if height % (spatial * p_h) or width % (spatial * p_w):
            raise ValueError(
                f"height and width must be multiples of {spatial * p_h} and {spatial * p_w} "
                f"({'VAE x' + str(spatial) + ' times ' if self.uses_vae else ''}patch {p_h}x{p_w}), got {height}x{width}"
            )
        if self.uses_vae:
            if num_frames % temporal != 1:
                raise ValueError(
                    f"num_frames must be {temporal}k + 1 (the Wan VAE compresses time {temporal}x), got {num_frames}; "
                    f"e.g. {num_frames // temporal * temporal + 1}"
                )
            frames = (num_frames - 1) // temporal + 1
        else:
            frames = num_frames
        if frames % p_t:
            raise ValueError(f"the {frames} latent frames are not divisible by the temporal patch {p_t}")
        return frames, height // spatial, width // spatial

    def vae_conditions_the_video(self) -> bool:
        """Whether the VAE encodes a condition before denoising (image-to-video); plain text-to-video: False."""
        return False

    def _offload_now(self, module: Optional[torch.nn.Module]) -> None:
        """With ``enable_model_cpu_offload``: move ``module`` back to the CPU now instead of when the pipeline ends
        (its hook brings it back when it next runs); otherwise nothing."""
        for hook in getattr(self, "_all_hooks", None) or []:
            if module is not None and getattr(hook, "model", None) is module:
                hook.offload()

    def encode_video_to_latents(self, video: torch.Tensor) -> torch.Tensor:
        """Video (B, 3, F, H, W) in [-1, 1] -> normalised latents (B, C, F', H', W') float32 (VAE mean, no sampling)."""
        device = self._execution_device
        if not self.uses_vae:
            channels = self.transformer.config.in_channels
            if channels != video.shape[1]:
                raise ValueError(f"pixel-space pipeline needs a transformer with in_channels = 3, got {channels}")
            return video.to(device=device, dtype=torch.float32)
        vae = self.vae
        moments = vae.encode(video.to(device=device, dtype=vae.dtype)).latent_dist
        latents = moments.mode().float()
        mean, inv_std = self._latent_stats(latents)
        return (latents - mean) * inv_std

    def decode_latents_to_video(self, latents: torch.Tensor, output_type: str = "np"):
        """Latents (B, C, F', H', W') -> frames in [0, 1] as ``output_type`` ("np": (B, F, H, W, 3), "pt":
        (B, F, 3, H, W), "pil": lists of images); "latent" returns the latents unchanged."""
        if output_type == "latent":
            return latents
        if self.uses_vae:
            mean, inv_std = self._latent_stats(latents)
            latents = (latents.float() / inv_std + mean).to(self.vae.dtype)
            video = self.vae.decode(latents, return_dict=False)[0]
        else:
            video = latents.float().clamp(-1.0, 1.0)
        return self.video_processor.postprocess_video(video, output_type=output_type)

    def _latent_stats(self, latents: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        z_dim = self.vae.config.z_dim
        shape = (1, z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(latents.device, torch.float32)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(shape).to(latents.device, torch.float32)
        return mean, inv_std

    # ------------------------------------------------------------------ conditioning (image-to-video overrides these)
    def latent_channels(self) -> int:
        """Channels of the latent being denoised (text-to-video: the transformer's input channels)."""
        return self.transformer.config.in_channels

    def prepare_conditioning(
        self, reference: Optional[torch.Tensor], batch: int, height: int, width: int, num_frames: int, device
    ) -> None:
        """Called once per ``__call__`` before the denoising loop with the prepared reference frames (F, 3, H, W) in
        [0, 1] when guided steps will run reference passes (else None); text-to-video has nothing to prepare."""

    def model_input(self, latents: torch.Tensor, role: str) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """The transformer input for ``latents`` (B, C, F', H', W') in a pass of ``role`` ("target": the generated
        video, "reference": the reference video) and the extra forward keyword arguments; text-to-video: the latents
        themselves, no extra arguments."""
        return latents, {}

    def model_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep argument for per-video timesteps (B,): unchanged (every token of a video shares
        its timestep; see ``expand_timesteps`` in ``__init__``)."""
        return timestep

    def final_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The denoised latents as decoded (text-to-video: unchanged)."""
        return latents

    # ------------------------------------------------------------------ validation
    def check_inputs(
        self,
        prompt,
        negative_prompt,
        height,
        width,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        callback_on_step_end_tensor_inputs=None,
        guidance_scale_2=None,
    ):
        """WanPipeline's checks, with the size rule of :meth:`latent_geometry` (pixel space allows other sizes)."""
        # The size was validated by latent_geometry; 16 x 16 only satisfies the parent's hard-coded multiple-of-16 rule.
        super().check_inputs(
            prompt, negative_prompt, 16, 16, prompt_embeds, negative_prompt_embeds,
            callback_on_step_end_tensor_inputs, guidance_scale_2,
        )

    def _check_motion_config(self, config: MotionTransferConfig, grid: Tuple[int, int, int]) -> None:
        num_blocks = min(len(model.blocks) for model in self.experts())
        if config.motion_block >= num_blocks:
            raise ValueError(
                f"motion_config.motion_block = {config.motion_block} but the transformer has {num_blocks} blocks "
                f"(valid: 0..{num_blocks - 1})"
            )
        if grid[0] < MIN_LATENT_FRAMES:
            raise ValueError(
                f"motion transfer needs >= {MIN_LATENT_FRAMES} latent frames, got {grid[0]} "
                f"(num_frames >= {WAN_VAE_TEMPORAL + 1} with the Wan VAE)"
            )

    # ------------------------------------------------------------------ building blocks (also timed by the benchmark)
    def token_frame_shape(self, latents_shape) -> Tuple[int, int]:
        """(Hg, Wg) tokens per latent frame."""
        _, p_h, p_w = self.transformer.config.patch_size
        return latents_shape[-2] // p_h, latents_shape[-1] // p_w

    def motion_flow_of(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        config: MotionTransferConfig,
        *,
        reference: bool,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        windows: Optional[torch.Tensor] = None,
        transformer: Optional[torch.nn.Module] = None,
    ) -> MotionFlow:
        """Truncated pass at ``config.motion_block`` and the recipe's flow; differentiable when grad is enabled.

        latents: (B, C, F', H', W') (any float dtype, cast to the transformer's); timestep: (B,); windows: optional
        AMF window origins (another flow's ``.windows``) that replace the coarse pass; transformer: the expert to
        run (default ``self.transformer``).
        """
        transformer = self.transformer if transformer is None else transformer
        hidden, extra = self.model_input(latents.to(transformer.dtype), "reference" if reference else "target")
        q, k = truncated_qk(
            transformer,
            hidden,
            self.model_timestep(timestep),
            prompt_embeds,
            config.motion_block,
            gradient_checkpointing=self.use_gradient_checkpointing(hidden, config),
            attention_kwargs=attention_kwargs,
            **extra,
        )
        return compute_flow(
            q, k, self.token_frame_shape(latents.shape), config, reference=reference, windows=windows
        )

    def use_gradient_checkpointing(self, latents: torch.Tensor, config: MotionTransferConfig) -> bool:
        """Resolve ``config.gradient_checkpointing`` for a pass on ``latents`` (B, C, F', H', W')."""
        if isinstance(config.gradient_checkpointing, bool):
            return config.gradient_checkpointing
        if not torch.is_grad_enabled() or latents.device.type != "cuda":
            return False
        p_t, p_h, p_w = self.transformer.config.patch_size
        tokens = latents.shape[2] // p_t * (latents.shape[3] // p_h) * (latents.shape[4] // p_w)
        width = self.transformer.config.num_attention_heads * self.transformer.config.attention_head_dim
        estimate = (
            latents.shape[0] * tokens * width * (config.motion_block + 1)
            * ACTIVATION_ELEMENTS_PER_CHANNEL * latents.element_size()
        )
        free_bytes, _ = torch.cuda.mem_get_info(latents.device)
        return estimate > AUTO_CHECKPOINT_FRACTION * free_bytes

    def reference_flow(
        self,
        reference_latents: torch.Tensor,
        reference_noise: torch.Tensor,
        sigma: float,
        reference_embeds: torch.Tensor,
        config: MotionTransferConfig,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        transformer: Optional[torch.nn.Module] = None,
    ) -> MotionFlow:
        """The reference video's flow at noise level ``sigma`` (no grad): z = (1 - sigma) z_ref + sigma * noise,
        through ``transformer`` (default ``self.transformer``)."""
        with torch.no_grad():
            noisy = (1.0 - sigma) * reference_latents + sigma * reference_noise
            timestep = torch.full(
                (noisy.shape[0],), sigma * self.scheduler.config.num_train_timesteps, device=noisy.device
            )
            return self.motion_flow_of(
                noisy, timestep, reference_embeds, config, reference=True, attention_kwargs=attention_kwargs,
                transformer=transformer,
            )

    def guidance_loss_fn(
        self,
        ref: MotionFlow,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        config: MotionTransferConfig,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        transformer: Optional[torch.nn.Module] = None,
    ) -> Callable[[torch.Tensor], Tuple[torch.Tensor, Dict[str, float]]]:
        """latent (B, C, F', H', W') fp32 -> (loss, parts) for the guidance optimiser (positive prompt, no CFG),
        through ``transformer`` (default ``self.transformer``)."""

        shared_windows = ref.windows if config.recipe == "fastvmt" and config.window_source == "reference" else None

        def loss_fn(latent: torch.Tensor):
            gen = self.motion_flow_of(
                latent, timestep, prompt_embeds, config, reference=False, attention_kwargs=attention_kwargs,
                windows=shared_windows, transformer=transformer,
            )
            return motion_loss(gen, ref, self.token_frame_shape(latent.shape), config)

        return loss_fn

    def denoise_step(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        step_index: int,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: Optional[torch.Tensor],
        guidance_scale: float,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        guidance_scale_2: Optional[float] = None,
    ) -> torch.Tensor:
        """One Euler step with classifier-free guidance (dense or local attention per the "denoise" phase) by the
        expert for ``t``; ``guidance_scale_2`` (default: ``guidance_scale``) is the low-noise expert's CFG scale."""
        model = self.expert(t)
        # CFG runs when guidance_scale > 1 (WanPipeline's rule); the low-noise expert mixes with guidance_scale_2.
        scale = guidance_scale_2 if model is not self.transformer and guidance_scale_2 is not None else guidance_scale
        model_input, extra = self.model_input(latents.to(model.dtype), "target")
        timestep = self.model_timestep(t.expand(latents.shape[0]))
        sigma = float(t) / self.scheduler.config.num_train_timesteps  # flow matching: timestep = 1000 * sigma
        cache = {"step_index": step_index, "sigma": sigma, "num_inference_steps": self._num_timesteps}

        def predict(name: str, embeds: torch.Tensor) -> torch.Tensor:
            with model.cache_context(name, **cache):
                return model(
                    hidden_states=model_input,
                    timestep=timestep,
                    encoder_hidden_states=embeds,
                    attention_kwargs=attention_kwargs,
                    return_dict=False,
                    **extra,
                )[0]

        with attention_phase("denoise"):
            noise_pred = predict("cond", prompt_embeds)
            if guidance_scale > 1.0:
                noise_uncond = predict("uncond", negative_prompt_embeds)
                noise_pred = noise_uncond + scale * (noise_pred - noise_uncond)
        # Guided runs step with an fp32 model output: FlowMatchEulerDiscreteScheduler returns the output's dtype, and
        # bf16 latents would lose part of each guidance update (~5% on average) when the fp32 master latent is cast
        # back to them. Plain runs keep WanPipeline's behaviour (and its latents).
        if getattr(self, "_fp32_latents", False):
            noise_pred = noise_pred.float()
        return self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

    def default_text_length(self) -> int:
        """Text tokens the model was trained with: ``min(512, tokenizer.model_max_length)`` (512 without a tokenizer)."""
        limit = getattr(self.tokenizer, "model_max_length", None) if self.tokenizer is not None else None
        return min(WAN_TEXT_LENGTH, int(limit)) if limit else WAN_TEXT_LENGTH

    def _guidance_bar(self, total: int):
        config = dict(getattr(self, "_progress_bar_config", {}) or {})
        config.setdefault("desc", "motion guidance")
        config.setdefault("leave", False)
        return tqdm(total=total, **config)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        reference_video: Optional[VideoLike] = None,
        motion_config: Optional[MotionTransferConfig] = None,
        negative_prompt: Union[str, List[str], None] = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        guidance_scale_2: Optional[float] = None,
        num_videos_per_prompt: int = 1,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        reference_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],  # noqa: B006 (WanPipeline's signature)
        max_sequence_length: Optional[int] = None,
    ) -> Union[WanPipelineOutput, tuple]:
        """Generate a video for ``prompt`` that moves like ``reference_video``.

        Args:
            prompt, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale,
            guidance_scale_2, num_videos_per_prompt, generator, latents, prompt_embeds, negative_prompt_embeds,
            return_dict, attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs,
            max_sequence_length:
                as ``WanPipeline`` (sizes are validated, never silently adjusted: see :meth:`latent_geometry`).
                With two experts (Wan2.2 A14B: ``transformer_2`` and ``boundary_ratio``) each step runs the expert for
                its timestep (:meth:`expert`), and a guided step's reference and target passes use that same expert.
            max_sequence_length: text tokens; default: the text length the model was trained with,
                ``min(512, tokenizer.model_max_length)`` (512 for Wan2.1, 8 for the testbed model).
            reference_video: path (mp4, gif, folder of frames), list of PIL images, array or tensor; ``num_frames``
                frames are sampled uniformly in time (the clip needs at least that many) and each is center-cropped to
                the target aspect ratio and resized bilinearly to ``height x width``. None: plain text-to-video.
            motion_config: :class:`MotionTransferConfig` (default: the FastVMT recipe).
            reference_prompt_embeds: embeddings for the reference pass (default: the empty prompt, encoded).
            output_type: "np" (B, F, H, W, 3), "pt" (B, F, 3, H, W), "pil", or "latent".

        Returns:
            ``WanPipelineOutput(frames=...)`` or ``(frames,)``. ``self.guidance_state`` keeps the guidance history.
        """
        config = motion_config if motion_config is not None else MotionTransferConfig()
        if not isinstance(config, MotionTransferConfig):
            raise ValueError(f"motion_config must be a fastvmt.MotionTransferConfig, got {type(config).__name__}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if callback_on_step_end is not None and hasattr(callback_on_step_end, "tensor_inputs"):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        grid = self.latent_geometry(num_frames, height, width)
        self.check_inputs(
            prompt, negative_prompt, height, width, prompt_embeds, negative_prompt_embeds,
            callback_on_step_end_tensor_inputs, guidance_scale_2,
        )
        guided = reference_video is not None and config.guided_steps > 0
        if reference_video is not None:
            self._check_motion_config(config, grid)
            reference = prepare_reference(reference_video, num_frames, height, width)  # (F, 3, H, W) in [0, 1]
        if self.text_encoder is None and (
            prompt_embeds is None
            or (guided and reference_prompt_embeds is None)
            or (guidance_scale > 1.0 and negative_prompt_embeds is None)
        ):
            raise ValueError(
                "this pipeline has no text encoder: pass prompt_embeds, negative_prompt_embeds when guidance_scale > 1 "
                "(classifier-free guidance), and reference_prompt_embeds with a reference video"
            )

        self._guidance_scale = guidance_scale
        self._guidance_scale_2 = guidance_scale_2
        if max_sequence_length is None:
            max_sequence_length = self.default_text_length()
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        dtype = self.transformer.dtype
        # encode_prompt repeats the embeddings it computes num_videos_per_prompt times, not the ones it is given.
        given = {"prompt": prompt_embeds is not None, "negative": negative_prompt_embeds is not None}
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            num_videos_per_prompt=num_videos_per_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        if given["prompt"]:
            prompt_embeds = prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
        if given["negative"] and negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
        prompt_embeds = prompt_embeds.to(dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype)
        total_batch = prompt_embeds.shape[0]

        reference_latents = None
        if guided or (reference_video is not None and config.init_latent == "reference"):
            video = reference.permute(1, 0, 2, 3).unsqueeze(0) * 2.0 - 1.0  # (1, 3, F, H, W) in [-1, 1]
            reference_latents = self.encode_video_to_latents(video).expand(total_batch, -1, -1, -1, -1)
        if guided:
            if reference_prompt_embeds is None:
                reference_prompt_embeds, _ = self.encode_prompt(
                    prompt=[""] * total_batch,
                    do_classifier_free_guidance=False,
                    max_sequence_length=max_sequence_length,
                    device=device,
                )
            reference_prompt_embeds = reference_prompt_embeds.to(device=device, dtype=dtype)
            given_batch = reference_prompt_embeds.shape[0]
            if given_batch == 1 and total_batch > 1:
                reference_prompt_embeds = reference_prompt_embeds.expand(total_batch, -1, -1)
            elif given_batch != total_batch and given_batch * num_videos_per_prompt == total_batch:
                reference_prompt_embeds = reference_prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
            elif given_batch != total_batch:
                raise ValueError(
                    f"reference_prompt_embeds has batch {given_batch}; accepted: 1, the number of prompts, or "
                    f"{total_batch} (prompts x num_videos_per_prompt)"
                )

        # Timesteps; with init_latent="reference" only the last round(strength * N) steps run (img2img convention).
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        start = 0
        from_reference = reference_latents is not None and config.init_latent == "reference"
        if from_reference:
            keep = max(1, round(config.init_strength * num_inference_steps))
            start = num_inference_steps - keep
            timesteps = timesteps[start * self.scheduler.order :]
        self.scheduler.set_begin_index(start * self.scheduler.order)
        self._num_timesteps = len(timesteps)

        latents = self.prepare_latents(
            total_batch,
            self.latent_channels(),
            height,
            width,
            num_frames,
            torch.float32,
            device,
            generator,
            latents,
        )
        if from_reference:
            sigma0 = float(self.scheduler.sigmas[start * self.scheduler.order])
            latents = (1.0 - sigma0) * reference_latents + sigma0 * latents
        reference_noise = None
        if guided:
            reference_noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=torch.float32)
        self.prepare_conditioning(reference if guided else None, total_batch, height, width, num_frames, device)
        if reference_latents is not None or self.vae_conditions_the_video():
            self._offload_now(self.vae)  # with model offload: the VAE waits on the CPU until the decode
        # Guided runs keep the latents fp32 (see denoise_step); plain runs follow WanPipeline's dtypes exactly.
        self._fp32_latents = guided

        state = GuidanceState()
        self.guidance_state = state
        num_guided = min(config.guided_steps, len(timesteps)) if guided else 0
        fixed_references: Dict[int, MotionFlow] = {}  # per expert: both videos' features from the same network
        with self.progress_bar(total=len(timesteps)) as progress_bar, contextlib.ExitStack() as stack:
            guidance_bar = stack.enter_context(self._guidance_bar(num_guided * config.inner_iters)) if num_guided else None
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                if i < num_guided:
                    model = self.expert(t)
                    with attention_phase("guidance"), _frozen_parameters(model), _caches_disabled(model):
                        if config.reference_is_fixed:
                            if id(model) not in fixed_references:
                                fixed_references[id(model)] = self.reference_flow(
                                    reference_latents, reference_noise, float(config.reference_noise),
                                    reference_prompt_embeds, config, attention_kwargs, transformer=model,
                                )
                            ref = fixed_references[id(model)]
                        else:
                            # timesteps[i] is sub-step start * order + i of the scheduler's (order-expanded) list
                            sigma = float(self.scheduler.sigmas[start * self.scheduler.order + i])
                            ref = self.reference_flow(
                                reference_latents, reference_noise, sigma, reference_prompt_embeds, config,
                                attention_kwargs, transformer=model,
                            )
                        loss_fn = self.guidance_loss_fn(
                            ref, t.expand(total_batch), prompt_embeds, config, attention_kwargs, transformer=model
                        )
                        latents = guidance_step(
                            latents, loss_fn, config, state, step_index=i, guided_index=i, guided_total=num_guided,
                            progress=guidance_bar,
                        )
                latents = self.denoise_step(
                    latents, t, i, prompt_embeds, negative_prompt_embeds, guidance_scale, attention_kwargs,
                    guidance_scale_2,
                )
                if callback_on_step_end is not None:
                    available = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_kwargs = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()
        self._current_timestep = None

        video = self.decode_latents_to_video(self.final_latents(latents), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return WanPipelineOutput(frames=video)
