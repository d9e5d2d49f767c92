"""The methods compared on the testbed, with the settings that suit the tiny pixel-space model.

The tiny model differs from Wan2.1 in ways that change a few knobs (all are ``MotionTransferConfig`` fields):
its token grid is 8 x 4 x 4 (so the AMF tile / window are small), its 4 heads are weak alone (so the flow is averaged
per head, ``head_reduce="mean_flow"``), its softmax is flat at temperature 1 (so ``temperature`` is 3), and in 16 x 16
pixel space high noise erases the motion (so the reference flow is taken at a low fixed noise level and guidance
covers half of the schedule), and its pixel-space latents need larger steps (both recipes' learning rates x LR_SCALE).
Both recipes get the same block, temperature and number of guided steps, so the
comparison isolates the recipes' own choices (windowed vs global AMF, soft vs hard reference, loss, optimiser, reuse).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Tuple

# Light module (no torch import at load time): `fastvmt --help` reads these defaults.

METHODS: Tuple[str, ...] = ("unguided", "ditflow", "fastvmt", "fastvmt_no_reuse", "fastvmt_local")
DEMO_METHODS: Tuple[str, ...] = ("unguided", "ditflow", "fastvmt", "fastvmt_local")
MOTION_BLOCK = 5  # the last block: its per-head flows are the most accurate (benchmarks/results/testbed_gates.md)
TEMPERATURE = 3.0  # with per-head flows, 3 was more accurate than 10 in the gate 2 tables
REFERENCE_NOISE = 0.2
GUIDED_FRACTION = 0.5
LR_SCALE = 3.0  # both recipes' learning rates x3: pixel-space latents of the tiny model move less per unit lr
AMF_TILE = (2, 2)
AMF_WINDOW = 3
LOCAL_TILE = (1, 4, 4)  # one frame per tile: local attention = a temporal window
LOCAL_WINDOW = (3, 1, 1)  # each frame attends to itself and its two neighbours
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 3.0
CHECKPOINT_DIR = os.path.join(os.path.dirname(__file__), "checkpoint")


def motion_config(method: str, num_inference_steps: int = DEFAULT_STEPS, **overrides):
    """The ``MotionTransferConfig`` of ``method`` (None for "unguided"); ``overrides`` replace any field."""
    from fastvmt import MotionTransferConfig

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; accepted: {METHODS}")
    if method == "unguided":
        return None
    common = dict(
        motion_block=MOTION_BLOCK,
        guided_steps=max(1, round(GUIDED_FRACTION * num_inference_steps)),
        temperature=TEMPERATURE,
        reference_noise=REFERENCE_NOISE,
    )
    if method == "ditflow":
        settings = dict(recipe="ditflow", **common)
    else:
        settings = dict(recipe="fastvmt", tile=AMF_TILE, window=AMF_WINDOW, head_reduce="mean_flow", **common)
        if method == "fastvmt_no_reuse":
            settings["reuse_interval"] = 1
    preset = MotionTransferConfig(recipe=settings["recipe"])
    settings.update(lr_start=preset.lr_start * LR_SCALE, lr_end=preset.lr_end * LR_SCALE)
    settings.update(overrides)
    return MotionTransferConfig(**settings)


def load_pipeline(checkpoint: Optional[str] = None):
    """``FastVMTPipeline`` from a testbed checkpoint folder (default: the one shipped in the package)."""
    from fastvmt import FastVMTPipeline

    path = checkpoint or CHECKPOINT_DIR
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(
            f"no testbed checkpoint at {path!r}: pass --checkpoint DIR (a folder written by "
            "`fastvmt train-testbed`, i.e. RUN/checkpoint)"
        )
    pipe = FastVMTPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(leave=False)
    pipe.testbed_frames, pipe.testbed_size = checkpoint_geometry(path)
    return pipe


def checkpoint_geometry(checkpoint: Optional[str] = None) -> Tuple[int, int]:
    """(frames, size) of the clips a checkpoint was trained on (training.json; the data defaults if absent)."""
    from .data import DEFAULT_FRAMES, DEFAULT_SIZE

    info = checkpoint_info(checkpoint)
    return int(info.get("frames", DEFAULT_FRAMES)), int(info.get("size", DEFAULT_SIZE))


@contextmanager
def local_attention_installed(transformer, enabled: bool) -> Iterator[None]:
    """Install the testbed's local self-attention on every block for the duration (guidance and denoising)."""
    if not enabled:
        yield
        return
    from fastvmt import apply_local_attention

    previous = apply_local_attention(transformer, tile=LOCAL_TILE, window=LOCAL_WINDOW, phases="both")
    try:
        yield
    finally:
        transformer.set_attn_processor(previous)


def run_method(pipe, method: str, prompt: str, reference, seed: int, num_inference_steps: int = DEFAULT_STEPS,
               guidance_scale: float = DEFAULT_GUIDANCE_SCALE, num_videos: int = 0,
               **overrides) -> Tuple["np.ndarray", float]:
    """Generate clips with ``method``. reference: anything ``FastVMTPipeline`` accepts (e.g. (F, H, W, 3) in [0, 1]).

    ``num_videos = 0`` generates one clip and returns (frames (F, H, W, 3) float in [0, 1], wall seconds);
    ``num_videos = N >= 1`` generates N clips in one batched call (independent noise draws from ``seed``; guidance
    optimises each clip's own latent) and returns (frames (N, F, H, W, 3), wall seconds per clip).
    """
    import numpy as np
    import torch

    from .data import DEFAULT_FRAMES, DEFAULT_SIZE
    from .model import TEXT_LENGTH

    config = motion_config(method, num_inference_steps, **overrides)
    generator = torch.Generator().manual_seed(seed)
    with local_attention_installed(pipe.transformer, method == "fastvmt_local"):
        start = time.perf_counter()
        out = pipe(
            prompt=prompt,
            reference_video=None if config is None else reference,
            motion_config=config,
            height=getattr(pipe, "testbed_size", DEFAULT_SIZE),
            width=getattr(pipe, "testbed_size", DEFAULT_SIZE),
            num_frames=getattr(pipe, "testbed_frames", DEFAULT_FRAMES),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="np",
            max_sequence_length=TEXT_LENGTH,
            num_videos_per_prompt=max(1, num_videos),
        )
        seconds = time.perf_counter() - start
    if num_videos == 0:
        return np.asarray(out.frames[0]), seconds
    return np.asarray(out.frames), seconds / num_videos


def checkpoint_info(checkpoint: Optional[str] = None) -> Dict:
    """The training summary stored with a checkpoint (training.json), or {} if absent."""
    import json

    path = os.path.join(checkpoint or CHECKPOINT_DIR, "training.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)
