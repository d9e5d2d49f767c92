"""Train the testbed model (``python -m fastvmt.testbed.train`` or ``fastvmt train-testbed``).

Rectified flow in pixel space, with the conventions of diffusers' ``FlowMatchEulerDiscreteScheduler`` and
``WanPipeline``: ``x_t = (1 - sigma) * x0 + sigma * noise``, the transformer gets ``timestep = 1000 * sigma`` and
predicts the velocity ``noise - x0`` (the Euler step is ``x += (sigma_next - sigma) * v``).

Deterministic: the training batch of step ``s`` is drawn from a generator seeded with ``(seed, s)``, so a run resumed
from a checkpoint reproduces the uninterrupted run. Outputs in ``--out``:

- ``train_state.pt``: everything needed to resume (weights, EMA, optimiser, step);
- ``checkpoint/``: the EMA weights as a pipeline folder (safetensors) for ``FastVMTPipeline.from_pretrained``;
- ``log.csv``: step, loss (mean over the logging interval), learning rate, elapsed seconds;
- ``samples.png``: a grid of clips sampled from noise with the EMA weights (rows: captions, columns: frames).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from typing import Dict, Optional

STATE_FILE = "train_state.pt"
CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "log.csv"
SAMPLES_FILE = "samples.png"
TRAINING_INFO_FILE = "training.json"  # step count etc., stored next to the checkpoint's model_index.json
LOG_COLUMNS = ("step", "loss", "lr", "seconds")
SEED_STRIDE = 1_000_003
WARMUP_STEPS = 200
FINAL_LR_FRACTION = 0.1
CFG_DROPOUT = 0.1
SAMPLE_CAPTIONS = ("a red circle", "a green square", "a blue circle", "a red square", "a green circle", "a blue square")
SAMPLE_UPSCALE = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the training command."""
    parser.add_argument("--out", required=True, help="run folder (created; holds state, checkpoint, log, samples)")
    parser.add_argument("--steps", type=int, default=20000, help="total optimiser steps (also sets the LR schedule)")
    parser.add_argument("--batch", type=int, default=24, help="clips per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--resume", action="store_true", help="continue from --out/train_state.pt if it exists")
    parser.add_argument("--save-every", type=int, default=0, help="save every N steps (0 = use --save-minutes)")
    parser.add_argument("--save-minutes", type=float, default=10.0, help="save every M minutes of wall time")
    parser.add_argument("--log-every", type=int, default=25, help="write a log row every N steps")
    parser.add_argument("--time-limit", type=float, default=0.0, help="stop (and save) after S seconds (0 = none)")
    parser.add_argument("--size", type=int, default=16, help="frame height = width in pixels")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip")
    parser.add_argument("--patch", type=int, default=4, help="spatial patch size of the transformer")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--no-samples", action="store_true", help="do not write samples.png at save points")
    parser.add_argument("--bf16", action="store_true", help="autocast the forward pass to bf16 (CUDA)")


def learning_rate(step: int, total: int, peak: float) -> float:
    """Linear warmup over WARMUP_STEPS, then cosine decay to FINAL_LR_FRACTION * peak at ``total``."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    progress = min(1.0, (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS))
    return peak * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_sigmas(batch: int, generator) -> "torch.Tensor":
    """Training noise levels in (0, 1): half uniform, half logit-normal(0, 1). Returns (batch,)."""
    import torch

    uniform = torch.rand(batch, generator=generator)
    logit_normal = torch.sigmoid(torch.randn(batch, generator=generator))
    pick = torch.rand(batch, generator=generator) < 0.5
    return torch.where(pick, uniform, logit_normal).clamp(1e-4, 1.0 - 1e-4)


def training_batch(step: int, seed: int, batch: int, size: int = 16, frames: int = 8):
    """The deterministic batch of ``step``: (x0 (B,3,F,H,W), noise, sigmas (B,), captions with CFG dropout)."""
    import torch

    from .data import sample_clips

    generator = torch.Generator().manual_seed(seed * SEED_STRIDE + step)
    clips = sample_clips(batch, frames=frames, size=size, generator=generator)
    noise = torch.randn(clips.videos.shape, generator=generator)
    sigmas = sample_sigmas(batch, generator)
    drop = torch.rand(batch, generator=generator) < CFG_DROPOUT
    captions = ["" if d else c for c, d in zip(clips.captions, drop.tolist())]
    return clips.videos, noise, sigmas, captions


def flow_matching_loss(transformer, text_encoder, tokenizer, x0, noise, sigmas, captions, bf16: bool = False):
    """Mean squared error between the predicted and the true velocity ``noise - x0`` at ``x_t``."""
    import torch

    from .model import NUM_TRAIN_TIMESTEPS, encode_captions

    device = next(transformer.parameters()).device
    x0, noise, sigmas = x0.to(device), noise.to(device), sigmas.to(device)
    s = sigmas.view(-1, 1, 1, 1, 1)
    x_t = (1.0 - s) * x0 + s * noise
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        embeds = encode_captions(tokenizer, text_encoder, captions, device)
        prediction = transformer(x_t, sigmas * NUM_TRAIN_TIMESTEPS, embeds, return_dict=False)[0]
    return torch.nn.functional.mse_loss(prediction.float(), noise - x0)


class TrainingRun:
    """Model, EMA copy, optimiser and bookkeeping of one run folder."""

    def __init__(self, args: argparse.Namespace):
        import copy

        import torch

        from .model import TestbedModelConfig, build_text_encoder, build_tokenizer, build_transformer

        self.args = args
        self.device = torch.device(args.device)
        self.seconds = 0.0  # wall seconds of training so far, across resumed processes
        if args.size % args.patch:
            raise ValueError(f"--size {args.size} must be a multiple of --patch {args.patch}")
        config = TestbedModelConfig(num_layers=args.layers, num_heads=args.heads, head_dim=args.head_dim,
                                    ffn_dim=4 * args.heads * args.head_dim, patch=(1, args.patch, args.patch),
                                    frames=args.frames, size=args.size)
        self.tokenizer = build_tokenizer()
        self.transformer = build_transformer(config, seed=args.seed).to(self.device)
        self.text_encoder = build_text_encoder(seed=args.seed + 1).to(self.device)
        self.ema_transformer = copy.deepcopy(self.transformer).requires_grad_(False)
        self.ema_text_encoder = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.parameters = list(self.transformer.parameters()) + list(self.text_encoder.parameters())
        self.ema_parameters = list(self.ema_transformer.parameters()) + list(self.ema_text_encoder.parameters())
        self.optimizer = torch.optim.AdamW(self.parameters, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
        self.step = 0
        self.recent_loss = None  # mean loss of the last logging interval

    def state_dict(self) -> Dict:
        """Everything a resumed run needs: step, training seconds, the models, their EMA copies, the optimizer."""
        return {
            "step": self.step,
            "seconds": self.seconds,
            "transformer": self.transformer.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "ema_transformer": self.ema_transformer.state_dict(),
            "ema_text_encoder": self.ema_text_encoder.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: Dict) -> None:
        """Restore a :meth:`state_dict` (in place)."""
        self.step = int(state["step"])
        self.seconds = float(state.get("seconds", 0.0))  # training time before this process (older states: 0)
        self.transformer.load_state_dict(state["transformer"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.ema_transformer.load_state_dict(state["ema_transformer"])
        self.ema_text_encoder.load_state_dict(state["ema_text_encoder"])
        self.optimizer.load_state_dict(state["optimizer"])

    def train_step(self) -> float:
        """One optimiser step on the deterministic batch of ``self.step``; returns the loss."""
        import torch

        args = self.args
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, args.steps, args.lr)
        x0, noise, sigmas, captions = training_batch(self.step, args.seed, args.batch, args.size, args.frames)
        loss = flow_matching_loss(self.transformer, self.text_encoder, self.tokenizer, x0, noise, sigmas, captions,
                                  bf16=args.bf16)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.optimizer.step()
        decay = min(args.ema, (1.0 + self.step) / (10.0 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_parameters, [p.detach() for p in self.parameters], 1.0 - decay)
        self.step += 1
        return float(loss.detach())

    def save(self, out: str, samples: bool) -> None:
        """Write train_state.pt (atomically), the EMA pipeline folder and optionally the sample grid."""
        import torch

        from .model import save_components

        tmp = os.path.join(out, STATE_FILE + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, os.path.join(out, STATE_FILE))
        folder = os.path.join(out, CHECKPOINT_DIR)
        save_components(folder, self.ema_transformer, self.ema_text_encoder, self.tokenizer)
        info = {"step": self.step, "batch": self.args.batch, "seed": self.args.seed, "lr": self.args.lr,
                "ema": self.args.ema, "planned_steps": self.args.steps, "recent_loss": self.recent_loss,
                "clips_seen": self.step * self.args.batch, "size": self.args.size, "frames": self.args.frames}
        with open(os.path.join(folder, TRAINING_INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)
        if samples:
            write_sample_grid(self.ema_transformer, self.ema_text_encoder, self.tokenizer,
                              os.path.join(out, SAMPLES_FILE), seed=self.args.seed, frames=self.args.frames,
                              size=self.args.size)


def write_sample_grid(transformer, text_encoder, tokenizer, path: str, seed: int = 0, steps: int = 20,
                      guidance_scale: float = 3.0, frames: int = 8, size: int = 16) -> None:
    """Sample one clip per caption of SAMPLE_CAPTIONS from noise and save a PNG grid (rows: clips, cols: frames)."""
    import numpy as np
    import torch
    from PIL import Image

    from .data import video_to_uint8
    from .model import sample_videos

    generator = torch.Generator().manual_seed(seed)
    videos = sample_videos(transformer, text_encoder, tokenizer, list(SAMPLE_CAPTIONS), steps=steps,
                           guidance_scale=guidance_scale, generator=generator, frames=frames, size=size).cpu()
    rows = [np.concatenate(video_to_uint8(v), axis=1) for v in videos]
    grid = np.concatenate(rows, axis=0)
    image = Image.fromarray(grid).resize((grid.shape[1] * SAMPLE_UPSCALE, grid.shape[0] * SAMPLE_UPSCALE),
                                         Image.NEAREST)
    image.save(path)


def append_log(path: str, row: Dict) -> None:
    """Append ``row`` (keys: LOG_COLUMNS) to the CSV training log at ``path``, writing the header to a new file."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _check_arguments(args: argparse.Namespace) -> None:
    """Every cheap check, before anything is created (a ValueError says what was wrong and what is accepted)."""
    import torch

    for name in ("steps", "batch", "log_every", "frames", "size", "patch", "layers", "heads", "head_dim"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("save_every", "save_minutes", "time_limit", "threads"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.size % args.patch:
        raise ValueError(f"--size {args.size} must be a multiple of --patch {args.patch}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda given but CUDA is not available")
    state_path = os.path.join(args.out, STATE_FILE)
    if os.path.exists(state_path) and not args.resume:
        raise ValueError(f"{args.out!r} already holds a run ({STATE_FILE}); pass --resume to continue it, or choose "
                         "another --out (a new run would overwrite its checkpoint and log)")


def _truncate_log(path: str, step: int) -> None:
    """Drop the log rows of steps after ``step`` (written after the last save of an interrupted run)."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if int(row["step"]) <= step]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def run(args: argparse.Namespace) -> int:
    """Train until ``--steps`` (or ``--time-limit``), saving periodically and at the end; bad arguments print an
    error (exit 2) before anything is written."""
    try:
        _check_arguments(args)
    except ValueError as exc:
        print(f"fastvmt train-testbed: error: {exc}", file=sys.stderr)
        return 2
    return _train(args)


def _train(args: argparse.Namespace) -> int:
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    training = TrainingRun(args)
    state_path = os.path.join(args.out, STATE_FILE)
    log_path = os.path.join(args.out, LOG_FILE)
    if args.resume and os.path.exists(state_path):
        training.load_state_dict(torch.load(state_path, map_location=training.device, weights_only=False))
        _truncate_log(log_path, training.step)  # rows after the saved step are written again
        print(f"resumed from step {training.step}", flush=True)
    start = time.time()
    before = training.seconds
    last_save = start
    losses = []
    while training.step < args.steps:
        losses.append(training.train_step())
        elapsed = time.time() - start
        training.seconds = before + elapsed
        if training.step % args.log_every == 0 or training.step == args.steps:
            row = {"step": training.step, "loss": f"{sum(losses) / len(losses):.5f}",
                   "lr": f"{learning_rate(training.step - 1, args.steps, args.lr):.3g}",
                   "seconds": f"{training.seconds:.1f}"}
            append_log(log_path, row)
            training.recent_loss = float(row["loss"])
            print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            losses = []
        out_of_time = args.time_limit > 0 and elapsed >= args.time_limit
        due = (args.save_every > 0 and training.step % args.save_every == 0) or (
            args.save_every == 0 and time.time() - last_save >= 60.0 * args.save_minutes)
        if due and not out_of_time and training.step < args.steps:
            training.save(args.out, samples=not args.no_samples)
            last_save = time.time()
        if out_of_time:
            print(f"time limit reached at step {training.step}", flush=True)
            break
    training.save(args.out, samples=not args.no_samples)
    print(f"saved step {training.step} to {args.out}", flush=True)
    return 0


def main(argv: Optional[list] = None) -> int:
    """Entry point of ``python -m fastvmt.testbed.train``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m fastvmt.testbed.train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
