"""The methods compared on the testbed, with the settings that suit the tiny pixel-space model.

The tiny model differs from Wan2.1 in ways that change a few knobs (all are ``MotionTransferConfig`` fields): its
token grid is 8 x 4 x 4, its 4 heads are weak alone, its softmax is flat at temperature 1, high noise erases the
motion of a 16 x 16 pixel clip, and its pixel-space latents need larger optimiser steps. Each recipe therefore runs
with the settings that scored best *for that recipe* in the same sweep on development pairs (clips other than the
evaluation's; ``benchmarks/results/testbed_sweep.md``), from the same budget of variants:

- both: motion block 5 (the last; its flows are the most accurate, ``testbed_gates.md``) and guidance over the first
  half of the steps;
- ditflow: DiTFlow's head handling (per-head logits averaged, the recipe's ``head_reduce="mean_logits"``),
  temperature 10, learning rates x18, reference at sigma 0.2 (its hard-argmax reference degrades on the clean clip,
  where the flat background ties); re-tuned when the recipe took DiTFlow's logit averaging in place of head-averaged
  Q and K (``benchmarks/results/testbed_sweep_ditflow_heads*.md``: 14 variants; the former setting, temperature 20
  and learning rates x9 with head-averaged Q and K, scored 1.89 px there, this one 1.41);
- fastvmt: per-head flows (``head_reduce="mean_flow"``), temperature 3, learning rates x6, the clean reference
  (sigma 0), all forward pairs of the 8 frames (span 8), gradient reuse with k = 5 carried across steps (one
  forward+backward per guided step after the first: as accurate as k = 3 or no reuse, in fewer passes), and a
  4-token window: on 4 x 4-token frames that is the
  whole frame, so the coarse-to-fine windowing (which pays off on Wan's 30 x 52 frames) is a no-op here. With 3-token
  windows each video's windows differ and the soft argmax's pull towards the window centre swamps the motion, unless
  the target uses the reference's windows (``window_source="reference"``): see the sweep.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Tuple

# Light module (no torch import at load time): `fastvmt --help` reads these defaults.

METHODS: Tuple[str, ...] = ("unguided", "ditflow", "fastvmt", "fastvmt_no_reuse", "fastvmt_local")
DEMO_METHODS: Tuple[str, ...] = ("unguided", "ditflow", "fastvmt", "fastvmt_local")
MOTION_BLOCK = 5
GUIDED_FRACTION = 0.5
# Per recipe: MotionTransferConfig fields, plus lr_scale (multiplies the recipe's own learning rates).
RECIPE_SETTINGS: Dict[str, Dict] = {
    # DiTFlow: re-tuned for its own head handling, mean_logits (testbed_sweep_ditflow_heads*.md)
    "ditflow": dict(temperature=10.0, reference_noise=0.2, lr_scale=18.0),
    "fastvmt": dict(temperature=3.0, reference_noise=0.0, lr_scale=6.0, head_reduce="mean_flow", tile=(2, 2),
                    window=4, span=8, reuse_interval=5, carry_gradient_across_steps=True),
}
LOCAL_TILE = (1, 4, 4)  # one frame per tile: local attention = a temporal window
LOCAL_WINDOW = (3, 1, 1)  # each frame attends to itself and its two neighbours
LOCAL_PHASES = "guidance"  # local attention in the guidance passes only (better than both phases in the sweep)
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 3.0
CHECKPOINT_DIR = os.path.join(os.path.dirname(__file__), "checkpoint")


def motion_config(method: str, num_inference_steps: int = DEFAULT_STEPS, **overrides):
    """The ``MotionTransferConfig`` of ``method`` (None for "unguided").

    ``overrides`` replace any field; ``lr_scale=S`` replaces the recipe's learning-rate multiplier.
    """
    from fastvmt import MotionTransferConfig

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; accepted: {METHODS}")
    if method == "unguided":
        return None
    recipe = "ditflow" if method == "ditflow" else "fastvmt"
    settings = dict(RECIPE_SETTINGS[recipe], recipe=recipe, motion_block=MOTION_BLOCK,
                    guided_steps=max(1, round(GUIDED_FRACTION * num_inference_steps)))
    if method == "fastvmt_no_reuse":
        settings.update(reuse_interval=1, carry_gradient_across_steps=False)
    settings.update(overrides)
    lr_scale = settings.pop("lr_scale")
    preset = MotionTransferConfig(recipe=recipe)
    settings.setdefault("lr_start", preset.lr_start * lr_scale)
    settings.setdefault("lr_end", preset.lr_end * lr_scale)
    return MotionTransferConfig(**settings)


def settings_summary() -> str:
    """One line naming every testbed setting (for result headers)."""
    parts = [f"motion block {MOTION_BLOCK}", f"guided fraction {GUIDED_FRACTION}"]
    for recipe, settings in RECIPE_SETTINGS.items():
        parts.append(recipe + ": " + ", ".join(f"{k} {v}" for k, v in settings.items()))
    parts.append(f"local attention tile {LOCAL_TILE} window {LOCAL_WINDOW} phases {LOCAL_PHASES}")
    return "; ".join(parts)


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
def local_attention_installed(transformer, enabled: bool, phases: str = LOCAL_PHASES) -> Iterator[None]:
    """Install the testbed's local self-attention on every block for the duration, in ``phases``."""
    if not enabled:
        yield
        return
    from fastvmt import apply_local_attention

    previous = apply_local_attention(transformer, tile=LOCAL_TILE, window=LOCAL_WINDOW, phases=phases)
    try:
        yield
    finally:
        transformer.set_attn_processor(previous)


def motion_block_for(pipe) -> int:
    """MOTION_BLOCK, or the last block of a checkpoint trained with fewer layers (``train-testbed --layers``)."""
    return min(MOTION_BLOCK, len(pipe.transformer.blocks) - 1)


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

    local_phases = overrides.pop("local_phases", LOCAL_PHASES)
    overrides.setdefault("motion_block", motion_block_for(pipe))
    config = motion_config(method, num_inference_steps, **overrides)
    generator = torch.Generator().manual_seed(seed)
    with local_attention_installed(pipe.transformer, method == "fastvmt_local", local_phases):
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
