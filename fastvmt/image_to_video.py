"""``FastVMTImageToVideoPipeline``: an image animated with the motion of a reference clip (Wan image-to-video).

The Wan image-to-video models (Wan2.1 I2V 14B with a CLIP image encoder, Wan2.2 I2V A14B without one) denoise a latent
concatenated on channels with an image condition: a first-frame mask (4 channels) and the VAE latents of the image
followed by black frames (``WanImageToVideoPipeline.prepare_latents``), plus, for Wan2.1, the image encoder's
embeddings as extra cross-attention context. Wan2.2 TI2V-5B (``expand_timesteps``) instead replaces the first latent
frame by the image's latents and gives its tokens timestep 0. This pipeline builds all of it as diffusers does and
otherwise runs
:class:`fastvmt.FastVMTPipeline`'s motion transfer: the generated video's passes are conditioned on the user's image,
the reference video's passes on the reference's own first frame (so the reference is what the model would generate
from that frame, and its motion flow is read under the same kind of conditioning).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline

from .pipeline import FastVMTPipeline

ROLES = ("target", "reference")


def load_image(image) -> PIL.Image.Image:
    """An RGB PIL image from a path, a PIL image, or an array / tensor: (H, W, 3) or (3, H, W) (or a batch of one of
    either), values in [0, 1] (floats) or [0, 255] (uint8); float pixels are rounded to 8 bits."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"image {str(path)!r} does not exist")
        try:
            with PIL.Image.open(path) as opened:
                return opened.convert("RGB")
        except (OSError, PIL.UnidentifiedImageError) as exc:
            raise ValueError(f"image {str(path)!r} could not be read: {exc}") from None
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        array = image[0] if image.ndim == 4 and image.shape[0] == 1 else image  # a batch of one, as diffusers takes
        if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
            array = array.transpose(1, 2, 0)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"an image array must be (H, W, 3) or (3, H, W) (or (1, ...) of one), got shape {image.shape}")
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return PIL.Image.fromarray(array)
    raise ValueError(
        f"image must be a path, a PIL image, or an (H, W, 3) / (3, H, W) array or tensor, got {type(image).__name__}"
    )


@dataclass
class ImageCondition:
    """What a pass of one video carries about its image.

    Attributes:
        latents: Wan2.1 / 2.2 I2V: (B, 4 + C, F', H', W') first-frame mask and image latents, concatenated to the
            noisy latent on channels; TI2V-5B: (B, C, 1, H', W') the image's latents, which replace the first frame.
        embeds: (B, T_img, image_dim) image-encoder embeddings for the cross-attention (Wan2.1 I2V), or None.
        first_frame_mask: TI2V-5B only: (1, 1, F', H', W'), 0 on the first latent frame (clean, timestep 0), 1 elsewhere.
    """

    latents: torch.Tensor
    embeds: Optional[torch.Tensor] = None
    first_frame_mask: Optional[torch.Tensor] = None


class FastVMTImageToVideoPipeline(FastVMTPipeline):
    """Wan image-to-video with motion transfer from a reference video.

    Components as ``WanImageToVideoPipeline``: ``tokenizer``, ``text_encoder``, ``vae`` (required), ``scheduler``,
    ``transformer`` (input channels = 2 x latent channels + 4; TI2V-5B: the latent channels), optionally
    ``image_encoder`` / ``image_processor`` (Wan2.1 I2V's CLIP), ``transformer_2`` / ``boundary_ratio`` (Wan2.2 I2V
    A14B) and ``expand_timesteps`` (TI2V-5B). Called like :class:`fastvmt.FastVMTPipeline` with the ``image`` to
    animate first.
    """

    _optional_components = FastVMTPipeline._optional_components + ["image_encoder", "image_processor"]
    # WanImageToVideoPipeline's order: the transformer's hook offloads the CLIP encoder when it runs
    model_cpu_offload_seq = "text_encoder->image_encoder->transformer->transformer_2->vae"

    def __init__(
        self,
        tokenizer,
        text_encoder,
        vae,
        scheduler,
        image_processor=None,
        image_encoder=None,
        transformer=None,
        transformer_2=None,
        boundary_ratio: Optional[float] = None,
        expand_timesteps: bool = False,
    ):
        if vae is None:
            raise ValueError("image-to-video needs the Wan VAE: the image condition is made of VAE latents")
        if (image_encoder is None) != (image_processor is None):
            raise ValueError("image_encoder and image_processor come together (Wan2.1 I2V's CLIP) or not at all")
        super().__init__(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer,
            transformer_2=transformer_2, boundary_ratio=boundary_ratio, expand_timesteps=expand_timesteps,
        )
        self.register_modules(image_encoder=image_encoder, image_processor=image_processor)
        self._image: Optional[PIL.Image.Image] = None
        self._last_image: Optional[PIL.Image.Image] = None
        self._conditions: Optional[Dict[str, ImageCondition]] = None
        self._image_embeds: Optional[torch.Tensor] = None

    def _check_input_channels(self) -> None:
        """The transformer reads [latent, mask (4), image latents] (2 x z_dim + 4 channels), or for TI2V-5B the latent
        with the image as first frame (z_dim channels)."""
        z_dim = self.vae.config.z_dim
        expected = z_dim if self.config.expand_timesteps else 2 * z_dim + 4
        if self.transformer is not None and self.transformer.config.in_channels != expected:
            raise ValueError(
                f"an image-to-video transformer takes {expected} input channels with this VAE (latent {z_dim}"
                f"{'' if self.config.expand_timesteps else ' + mask 4 + image ' + str(z_dim)}), this one "
                f"{self.transformer.config.in_channels}: a text-to-video model? Load it with fastvmt.FastVMTPipeline"
            )

    # ------------------------------------------------------------------ conditioning
    def encode_image(self, image, device=None) -> torch.Tensor:
        """Image-encoder (CLIP) embeddings of ``image`` (or a [first, last] list), (number of images, T_img,
        image_dim), as ``WanImageToVideoPipeline.encode_image``: what ``image_embeds=`` takes."""
        if self.image_encoder is None:
            raise ValueError("this pipeline has no image encoder (Wan2.2 I2V and TI2V-5B read no image embeddings)")
        images = [load_image(i) for i in image] if isinstance(image, (list, tuple)) else load_image(image)
        return WanImageToVideoPipeline.encode_image(self, images, device or self._execution_device)

    def vae_conditions_the_video(self) -> bool:
        """The image condition is made of VAE latents."""
        return True

    def latent_channels(self) -> int:
        """Channels of the latent being denoised: the VAE's (the transformer also reads the condition's)."""
        return self.vae.config.z_dim

    def image_condition(
        self, image: PIL.Image.Image, batch: int, height: int, width: int, num_frames: int, device,
        last_image: Optional[PIL.Image.Image] = None, image_embeds: Optional[torch.Tensor] = None,
    ) -> ImageCondition:
        """The :class:`ImageCondition` of ``image`` (and, for first-last-frame models, ``last_image``), resized to
        ``height x width``, exactly as ``WanImageToVideoPipeline`` builds it (float32); ``image_embeds`` (as
        :meth:`encode_image` returns them, or repeated per video) replace the image encoder's embeddings."""
        if last_image is not None and self.config.expand_timesteps:
            raise ValueError("last_image needs a first-last-frame model; TI2V-5B (expand_timesteps) takes one image")
        two_image_embedder = self.transformer.config.get("pos_embed_seq_len") is not None
        if last_image is None and two_image_embedder:
            raise ValueError("this is a first-last-frame model (Wan2.1 FLF2V: it embeds two images): pass last_image")
        if last_image is not None and self.transformer.config.image_dim is not None and not two_image_embedder:
            raise ValueError(
                "this model's image encoder embeds one image; last_image needs a first-last-frame model (Wan2.1 FLF2V) "
                "or one without an image encoder (Wan2.2 I2V)"
            )

        def pixels(picture):
            return self.video_processor.preprocess(picture, height=height, width=width).to(device, torch.float32)

        shape = (batch, self.latent_channels(), *self.latent_geometry(num_frames, height, width))
        placeholder = torch.zeros(shape, device=device, dtype=torch.float32)  # only the condition is used
        prepared = WanImageToVideoPipeline.prepare_latents(
            self, pixels(image), batch, shape[1], height, width, num_frames, torch.float32, device, None, placeholder,
            None if last_image is None else pixels(last_image),
        )
        first_frame_mask = prepared[2] if self.config.expand_timesteps else None
        embeds = None
        if self.transformer.config.image_dim is not None:  # only Wan2.1 I2V reads image embeddings (diffusers' rule)
            per_video = 1 if last_image is None else 2  # images the encoder embeds per video (FLF2V: first, last)
            if image_embeds is not None:
                embeds = image_embeds.to(device=device, dtype=torch.float32)
            else:
                if self.image_encoder is None:
                    raise ValueError("this transformer reads image embeddings (image_dim is set) but no image_encoder")
                embeds = self.encode_image(image if last_image is None else [image, last_image], device)
            if embeds.shape[0] == per_video:
                embeds = embeds.repeat(batch, 1, 1)  # as WanImageToVideoPipeline: the same images for every video
            elif embeds.shape[0] != per_video * batch:
                raise ValueError(f"image_embeds has batch {embeds.shape[0]}; accepted: {per_video} (as encode_image "
                                 f"returns them) or {per_video * batch} ({per_video} per video)")
        elif image_embeds is not None:
            raise ValueError("image_embeds are read by Wan2.1 I2V / FLF2V transformers only (image_dim set); this one "
                             "takes none")
        return ImageCondition(prepared[1], embeds, first_frame_mask)

    def prepare_conditioning(
        self, reference: Optional[torch.Tensor], batch: int, height: int, width: int, num_frames: int, device
    ) -> None:
        """The user's image (and last image) condition the generated video's passes; the reference's first (and last)
        frame condition the reference video's."""
        if self._image is None:
            raise ValueError("FastVMTImageToVideoPipeline needs an image: call pipe(image, prompt=..., ...)")
        geometry = (batch, height, width, num_frames, device)
        conditions = {"target": self.image_condition(self._image, *geometry, last_image=self._last_image,
                                                     image_embeds=self._image_embeds)}
        if reference is not None:
            first, last = (load_image(reference[i].permute(1, 2, 0).float()) for i in (0, -1))
            conditions["reference"] = self.image_condition(
                first, *geometry, last_image=None if self._last_image is None else last
            )
        self._conditions = conditions

    def _condition(self, role: str) -> ImageCondition:
        if self._conditions is None or role not in self._conditions:
            raise RuntimeError(f"no {role} image condition prepared: the model is called inside __call__ only")
        return self._conditions[role]

    def model_input(self, latents: torch.Tensor, role: str) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Wan2.1 / 2.2 I2V: [latents, condition of ``role``] on channels, plus the image embeddings as
        ``encoder_hidden_states_image`` where the model reads them; TI2V-5B: the latents with their first frame
        replaced by the image's latents."""
        condition = self._condition(role)
        if condition.first_frame_mask is not None:
            mask = condition.first_frame_mask.to(latents.dtype)
            return (1 - mask) * condition.latents.to(latents.dtype) + mask * latents, {}
        hidden = torch.cat([latents, condition.latents.to(latents.dtype)], dim=1)
        embeds = condition.embeds
        return hidden, ({} if embeds is None else {"encoder_hidden_states_image": embeds.to(latents.dtype)})

    def model_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """TI2V-5B: per-token timesteps (B, L), 0 on the clean first frame's tokens (WanImageToVideoPipeline's rule);
        otherwise the per-video timesteps (B,)."""
        mask = self._condition("target").first_frame_mask
        if mask is None:
            return timestep
        _, p_h, p_w = self.transformer.config.patch_size
        tokens = mask[0, 0][:, ::p_h, ::p_w].flatten().to(timestep.dtype)
        return timestep[:, None] * tokens[None]

    def final_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """TI2V-5B: the first frame is the image's latents (as WanImageToVideoPipeline returns them)."""
        condition = self._condition("target")
        if condition.first_frame_mask is None:
            return latents
        mask = condition.first_frame_mask.to(latents.dtype)
        return (1 - mask) * condition.latents.to(latents.dtype) + mask * latents

    # ------------------------------------------------------------------ call
    def __call__(self, image=None, prompt=None, reference_video=None, motion_config=None, last_image=None,
                 image_embeds=None, **kwargs):
        """Animate ``image`` (a path, PIL image, or (H, W, 3) / (3, H, W) array or tensor in [0, 1], resized to
        ``height x width`` as ``WanImageToVideoPipeline`` does) for ``prompt``, moving like ``reference_video``;
        ``last_image`` (first-last-frame models such as Wan2.1 FLF2V) also fixes the last frame. ``image_embeds``
        (as :meth:`encode_image` returns them, or those repeated once per video): precomputed image-encoder embeddings
        of the generated video's image(s), used instead of encoding ``image`` with the image encoder; the
        image is still needed for its VAE condition (``WanImageToVideoPipeline`` refuses both together and cannot run
        without the image). Every other argument and the output are :meth:`fastvmt.FastVMTPipeline.__call__`'s."""
        if image is None:
            raise ValueError("FastVMTImageToVideoPipeline needs an image to animate: pipe(image, prompt=..., ...)")
        if image_embeds is not None and not (isinstance(image_embeds, torch.Tensor) and image_embeds.dim() == 3):
            got = tuple(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds).__name__
            raise ValueError(f"image_embeds must be a (B, T_img, image_dim) tensor, got {got}")
        self._image = load_image(image)
        self._last_image = None if last_image is None else load_image(last_image)
        self._image_embeds = image_embeds
        try:
            return super().__call__(
                prompt=prompt, reference_video=reference_video, motion_config=motion_config, **kwargs
            )
        finally:
            self._image, self._last_image, self._conditions, self._image_embeds = None, None, None, None
