"""``FastVMTImageToVideoPipeline``: an image animated with the motion of a reference clip (Wan image-to-video).

The Wan image-to-video models (Wan2.1 I2V 14B with a CLIP image encoder, Wan2.2 I2V A14B without one) denoise a latent
concatenated on channels with an image condition: a first-frame mask (4 channels) and the VAE latents of the image
followed by black frames (``WanImageToVideoPipeline.prepare_latents``), plus, for Wan2.1, the image encoder's
embeddings as extra cross-attention context. This pipeline builds both exactly as diffusers does and otherwise runs
:class:`fastvmt.FastVMTPipeline`'s motion transfer: the generated video's passes are conditioned on the user's image,
the reference video's passes on the reference's own first frame (so the reference is what the model would generate
from that frame, and its motion flow is read under the same kind of conditioning).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline

from .pipeline import FastVMTPipeline

ROLES = ("target", "reference")


def load_image(image) -> PIL.Image.Image:
    """An RGB PIL image from a path, a PIL image, or an array / tensor: (H, W, 3) or (3, H, W), values in [0, 1]
    (floats) or [0, 255] (uint8)."""
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
        array = image
        if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
            array = array.transpose(1, 2, 0)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"an image array must be (H, W, 3) or (3, H, W), got shape {image.shape}")
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return PIL.Image.fromarray(array)
    raise ValueError(
        f"image must be a path, a PIL image, or an (H, W, 3) / (3, H, W) array or tensor, got {type(image).__name__}"
    )


class FastVMTImageToVideoPipeline(FastVMTPipeline):
    """Wan image-to-video with motion transfer from a reference video.

    Components as ``WanImageToVideoPipeline``: ``tokenizer``, ``text_encoder``, ``vae`` (required), ``scheduler``,
    ``transformer`` (input channels = 2 x latent channels + 4), optionally ``image_encoder`` / ``image_processor``
    (Wan2.1 I2V's CLIP) and ``transformer_2`` / ``boundary_ratio`` (Wan2.2 I2V A14B). Called like
    :class:`fastvmt.FastVMTPipeline` with the ``image`` to animate first.
    """

    _optional_components = FastVMTPipeline._optional_components + ["image_encoder", "image_processor"]

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
        if expand_timesteps:
            raise ValueError(
                "Wan2.2 TI2V-5B's image-to-video (clean first-frame tokens, per-token timesteps) is not supported; "
                "load it with fastvmt.FastVMTPipeline for text-to-video"
            )
        if (image_encoder is None) != (image_processor is None):
            raise ValueError("image_encoder and image_processor come together (Wan2.1 I2V's CLIP) or not at all")
        super().__init__(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer,
            transformer_2=transformer_2, boundary_ratio=boundary_ratio, expand_timesteps=expand_timesteps,
        )
        self.register_modules(image_encoder=image_encoder, image_processor=image_processor)
        self._image: Optional[PIL.Image.Image] = None
        self._conditions: Optional[Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]] = None

    # ------------------------------------------------------------------ conditioning
    def latent_channels(self) -> int:
        """Channels of the latent being denoised: the VAE's (the transformer also reads the condition's)."""
        return self.vae.config.z_dim

    def image_condition(
        self, image: PIL.Image.Image, batch: int, height: int, width: int, num_frames: int, device
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(condition (B, 4 + z_dim, F', H', W') float32, image embeddings (B, T_img, image_dim) or None) for
        ``image``, resized to ``height x width``, exactly as ``WanImageToVideoPipeline`` builds them."""
        pixels = self.video_processor.preprocess(image, height=height, width=width).to(device, torch.float32)
        shape = (batch, self.latent_channels(), *self.latent_geometry(num_frames, height, width))
        placeholder = torch.zeros(shape, device=device, dtype=torch.float32)  # only the condition is used
        _, condition = WanImageToVideoPipeline.prepare_latents(
            self, pixels, batch, shape[1], height, width, num_frames, torch.float32, device, None, placeholder
        )
        embeds = None
        if self.image_encoder is not None:
            embeds = WanImageToVideoPipeline.encode_image(self, image, device).repeat(batch, 1, 1)
        return condition, embeds

    def prepare_conditioning(
        self, reference: Optional[torch.Tensor], batch: int, height: int, width: int, num_frames: int, device
    ) -> None:
        """The user's image conditions the generated video's passes; the reference's first frame conditions the
        reference video's."""
        if self._image is None:
            raise ValueError("FastVMTImageToVideoPipeline needs an image: call pipe(image, prompt=..., ...)")
        conditions = {"target": self.image_condition(self._image, batch, height, width, num_frames, device)}
        if reference is not None:
            first = load_image(reference[0].permute(1, 2, 0).float())
            conditions["reference"] = self.image_condition(first, batch, height, width, num_frames, device)
        self._conditions = conditions

    def model_input(self, latents: torch.Tensor, role: str) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """[latents, condition of ``role``] on channels, and the image embeddings as ``encoder_hidden_states_image``
        when the model has an image encoder."""
        if self._conditions is None or role not in self._conditions:
            raise RuntimeError(f"no {role} image condition prepared: model_input runs inside __call__")
        condition, embeds = self._conditions[role]
        hidden = torch.cat([latents, condition.to(latents.dtype)], dim=1)
        extra = {} if embeds is None else {"encoder_hidden_states_image": embeds.to(latents.dtype)}
        return hidden, extra

    # ------------------------------------------------------------------ call
    def __call__(self, image=None, prompt=None, reference_video=None, motion_config=None, **kwargs):
        """Animate ``image`` (a path, PIL image, or (H, W, 3) / (3, H, W) array or tensor in [0, 1], resized to
        ``height x width`` as ``WanImageToVideoPipeline`` does) for ``prompt``, moving like ``reference_video``.
        Every other argument and the output are :meth:`fastvmt.FastVMTPipeline.__call__`'s."""
        if image is None:
            raise ValueError("FastVMTImageToVideoPipeline needs an image to animate: pipe(image, prompt=..., ...)")
        self._image = load_image(image)
        try:
            return super().__call__(
                prompt=prompt, reference_video=reference_video, motion_config=motion_config, **kwargs
            )
        finally:
            self._image, self._conditions = None, None
