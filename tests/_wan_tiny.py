"""Tiny random Wan2.1 components for CPU pipeline tests (built from config offline, no download).

``tiny_pipeline_dir(path, vae=True)`` saves a FastVMTPipeline folder with ``save_pretrained``; tests load it back with
``FastVMTPipeline.from_pretrained``. With ``vae=False`` the pipeline runs in pixel space (3-channel transformer).
"""
from __future__ import annotations

import torch

WORDS = "a cat dog runs jumps on the grass red blue circle square".split()
TEXT_DIM = 32
MAX_SEQUENCE_LENGTH = 16


TI2V_LATENT_CHANNELS = 48  # Wan2.2's VAE


def transformer_config(in_channels: int, num_layers: int = 3) -> dict:
    """A 2-head, head-dim-16 Wan transformer with ``num_layers`` blocks and patch (1, 2, 2)."""
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=in_channels,
        out_channels=in_channels,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=64,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=32,
    )


SHARPEN = 4.0  # q / k projection gain: random init leaves attention logits tiny (near-uniform attention and AMF)


def sharpen_self_attention(blocks) -> None:
    """Scale the self-attention (``attn1``) q and k projections of ``blocks`` by SHARPEN, so that attention is
    peaked enough for local vs dense attention and the motion flow to differ visibly."""
    with torch.no_grad():
        for block in blocks:
            block.attn1.to_q.weight.mul_(SHARPEN)
            block.attn1.to_k.weight.mul_(SHARPEN)


def build_components(vae: bool = True, num_layers: int = 3, seed: int = 0) -> dict:
    """tokenizer, text_encoder, vae (or None), scheduler, transformer with seeded random weights."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    in_channels = 16 if vae else 3
    transformer = WanTransformer3DModel(**transformer_config(in_channels, num_layers))
    sharpen_self_attention(transformer.blocks)
    autoencoder = None
    if vae:
        autoencoder = AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=64, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
            feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    )
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: 3 + i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    return dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=autoencoder,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )


def ti2v_components(num_layers: int = 3, seed: int = 0) -> dict:
    """Components of a Wan2.2-TI2V-5B-style pipeline: a 48-channel transformer, a residual VAE compressing space 16x
    (patchified 2x2 pixels, 12 channels in and out) and ``expand_timesteps=True``."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    components = build_components(vae=False, num_layers=num_layers, seed=seed)
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**transformer_config(TI2V_LATENT_CHANNELS, num_layers))
    sharpen_self_attention(transformer.blocks)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=TI2V_LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1, is_residual=True,
        in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * TI2V_LATENT_CHANNELS, latents_std=[1.0] * TI2V_LATENT_CHANNELS,
    )
    return dict(components, transformer=transformer, vae=vae, expand_timesteps=True)


CLIP_DIM = 32  # tiny image encoder width
CLIP_TOKENS = 17  # its hidden states: 1 class token + (32 / 8)^2 patches


def i2v_components(image_encoder: bool = True, two_experts: bool = False, seed: int = 0, flf2v: bool = False) -> dict:
    """Components of a Wan image-to-video pipeline: a transformer reading [latent, mask, image latents] (16 + 4 + 16
    channels) with, if ``image_encoder``, a tiny CLIP vision model whose embeddings feed its cross-attention (Wan2.1
    I2V), else none (Wan2.2 I2V); ``two_experts`` adds a perturbed ``transformer_2`` (A14B style); ``flf2v`` gives the
    image embedder the positions of two images' tokens (Wan2.1 FLF2V: first and last frame)."""
    import copy

    from diffusers import WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    components = build_components(vae=True, num_layers=3, seed=seed)
    latent = components["vae"].config.z_dim
    torch.manual_seed(seed)
    config = dict(transformer_config(2 * latent + 4), out_channels=latent)
    if image_encoder:
        config.update(image_dim=CLIP_DIM, added_kv_proj_dim=config["num_attention_heads"] * config["attention_head_dim"])
        if flf2v:
            config.update(pos_embed_seq_len=2 * CLIP_TOKENS)
    transformer = WanTransformer3DModel(**config)
    sharpen_self_attention(transformer.blocks)
    components = dict(components, transformer=transformer)
    if image_encoder:
        components["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=CLIP_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8,
        ))
        components["image_processor"] = CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
    if two_experts:
        second = copy.deepcopy(transformer)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in second.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        components.update(transformer_2=second, boundary_ratio=0.5)
    return components


def two_expert_components(vae: bool = False, same_weights: bool = False, boundary_ratio: float = 0.5) -> dict:
    """Components of a Wan2.2-A14B-style pipeline: ``transformer`` (high noise) and ``transformer_2`` (low noise, the
    same weights perturbed unless ``same_weights``), switched at ``boundary_ratio``."""
    import copy

    components = build_components(vae=vae, num_layers=3, seed=0)
    second = copy.deepcopy(components["transformer"])
    if not same_weights:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in second.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return dict(components, transformer_2=second, boundary_ratio=boundary_ratio)


def tiny_pipeline_dir(path, vae: bool = True, num_layers: int = 3) -> str:
    """Save tiny components as a FastVMTPipeline folder under ``path``; returns the folder."""
    from fastvmt import FastVMTPipeline

    FastVMTPipeline(**build_components(vae=vae, num_layers=num_layers)).save_pretrained(str(path))
    return str(path)


def moving_square_video(frames: int, height: int, width: int, step: int = 2) -> torch.Tensor:
    """(frames, 3, height, width) in [0, 1]: a bright square moving right by ``step`` pixels per frame."""
    video = torch.full((frames, 3, height, width), 0.1)
    side = max(2, height // 4)
    for f in range(frames):
        x = (2 + f * step) % max(1, width - side)
        y = height // 3
        video[f, 0, y : y + side, x : x + side] = 0.9
        video[f, 1, y : y + side, x : x + side] = 0.6
    return video


def single_thread():
    """Generator for an autouse fixture: tiny models run ~5x faster on one intra-op thread on a loaded machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
