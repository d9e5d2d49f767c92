"""The testbed model: a tiny Wan2.1-architecture video DiT in pixel space with a tiny jointly-trained text encoder.

The components have the same classes as the real Wan2.1 checkpoint, so the unchanged diffusers ``WanPipeline`` code
paths (``encode_prompt``, the scheduler, the transformer call) and ``fastvmt.FastVMTPipeline`` run on it:

- ``transformer``: ``diffusers.WanTransformer3DModel`` with ``in_channels = out_channels = 3``; the "latents" are the
  video itself, ``(B, 3, F, H, W)`` in ``[-1, 1]`` (no VAE: the pipeline gets ``vae=None``);
- ``text_encoder``: ``transformers.UMT5EncoderModel`` (one layer, ``d_model = TEXT_DIM``);
- ``tokenizer``: a word-level ``PreTrainedTokenizerFast`` over :data:`fastvmt.testbed.data.VOCABULARY`, built in code;
- ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` (rectified flow, ``timestep = 1000 * sigma``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .data import DEFAULT_FRAMES, DEFAULT_SIZE, VOCABULARY

PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"
TEXT_LENGTH = 8  # max_sequence_length used in training; pass the same to the pipeline
TEXT_DIM = 64
SCHEDULER_SHIFT = 1.0
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class TestbedModelConfig:
    """Sizes of the testbed transformer. ``patch`` is Wan's (t, h, w) patch size."""

    num_layers: int = 6
    num_heads: int = 4
    head_dim: int = 32
    ffn_dim: int = 512
    patch: tuple = (1, 4, 4)
    frames: int = DEFAULT_FRAMES
    size: int = DEFAULT_SIZE


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over the testbed vocabulary (lower-cased, whitespace split).

    Token ids: 0 = pad, 1 = unk, then :data:`VOCABULARY` in order. No special tokens are added, so the empty prompt
    has zero tokens and encodes to all-zero embeddings -- the unconditional (CFG) input.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD_TOKEN: 0, UNK_TOKEN: 1}
    for word in VOCABULARY:
        vocab[word] = len(vocab)
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN, model_max_length=TEXT_LENGTH
    )


def build_text_encoder(seed: int = 0):
    """A one-layer ``UMT5EncoderModel`` producing (B, L, TEXT_DIM) embeddings; randomly initialised from ``seed``."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=len(VOCABULARY) + 2,
        d_model=TEXT_DIM,
        d_kv=16,
        d_ff=128,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UMT5EncoderModel(config)


def build_transformer(config: TestbedModelConfig = TestbedModelConfig(), seed: int = 0):
    """A pixel-space ``WanTransformer3DModel`` (3 in/out channels), randomly initialised from ``seed``."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(
            patch_size=tuple(config.patch),
            num_attention_heads=config.num_heads,
            attention_head_dim=config.head_dim,
            in_channels=3,
            out_channels=3,
            text_dim=TEXT_DIM,
            freq_dim=64,
            ffn_dim=config.ffn_dim,
            num_layers=config.num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=64,
        )


def build_scheduler():
    """The rectified-flow Euler scheduler (sigma from 1 to 0, timestep = 1000 * sigma, model predicts noise - x0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=SCHEDULER_SHIFT)


def encode_captions(tokenizer, text_encoder, captions: Sequence[str], device=None) -> torch.Tensor:
    """Prompt embeddings exactly as ``WanPipeline._get_t5_prompt_embeds`` builds them (with ``TEXT_LENGTH``).

    Tokens padded to TEXT_LENGTH, encoded with the attention mask, then every position past the caption's length is
    set to zero. Returns (B, TEXT_LENGTH, TEXT_DIM); differentiable w.r.t. the text encoder.
    """
    tokens = tokenizer(
        list(captions),
        padding="max_length",
        max_length=TEXT_LENGTH,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = device or next(text_encoder.parameters()).device
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    hidden = text_encoder(ids, mask).last_hidden_state
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)


def save_components(directory: str, transformer, text_encoder, tokenizer, scheduler=None) -> None:
    """Save a pipeline folder (model_index.json + subfolders, safetensors) loadable by ``FastVMTPipeline``.

    The folder has ``vae: null``: the pipeline runs in pixel space.
    """
    from diffusers import WanPipeline

    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=None,
        scheduler=scheduler or build_scheduler(),
        transformer=transformer,
    )
    pipe.save_pretrained(directory, safe_serialization=True)


def load_components(directory: str, torch_dtype: torch.dtype = torch.float32):
    """Load (transformer, text_encoder, tokenizer, scheduler) saved by :func:`save_components`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

    if not os.path.isfile(os.path.join(directory, "model_index.json")):
        raise ValueError(f"{directory!r} is not a testbed checkpoint folder (no model_index.json)")
    transformer = WanTransformer3DModel.from_pretrained(directory, subfolder="transformer", dtype=torch_dtype)
    text_encoder = UMT5EncoderModel.from_pretrained(directory, subfolder="text_encoder", torch_dtype=torch_dtype)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(directory, "tokenizer"))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(directory, subfolder="scheduler")
    return transformer, text_encoder, tokenizer, scheduler


@torch.no_grad()
def sample_videos(
    transformer,
    text_encoder,
    tokenizer,
    captions: List[str],
    steps: int = 30,
    guidance_scale: float = 3.0,
    generator: Optional[torch.Generator] = None,
    frames: int = DEFAULT_FRAMES,
    size: int = DEFAULT_SIZE,
) -> torch.Tensor:
    """Generate clips from pure noise with Euler steps and CFG (a minimal sampler, independent of the pipeline).

    Returns videos (B, 3, frames, size, size) in [-1, 1]. ``generator`` must be a CPU generator.
    """
    device = next(transformer.parameters()).device
    cond = encode_captions(tokenizer, text_encoder, captions, device)
    uncond = encode_captions(tokenizer, text_encoder, [""] * len(captions), device)
    x = torch.randn(len(captions), 3, frames, size, size, generator=generator).to(device)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        t = torch.full((len(captions),), sigma * NUM_TRAIN_TIMESTEPS, device=device)
        both = transformer(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond]), return_dict=False
        )[0]
        v_cond, v_uncond = both.chunk(2)
        velocity = v_uncond + guidance_scale * (v_cond - v_uncond)
        x = x + (sigma_next - sigma) * velocity
    return x.clamp(-1.0, 1.0)
