"""``fastvmt demo``: motion transfer on the testbed model, scored against ground truth, in about a minute on a CPU.

It builds a reference clip (default: a blue square on an arc; or ``--reference VIDEO``), generates the prompt
(default "a red circle") without guidance, with the DiTFlow recipe and with the FastVMT recipe (and FastVMT + local
attention) through ``fastvmt.FastVMTPipeline``, and writes to ``--out``:

- ``reference.mp4``, ``<method>.mp4`` (frames upscaled with nearest neighbour for viewing);
- ``strip.png``: one row per clip (reference first), one column per frame, with the detected centroid marked;
- ``metrics.json``: ``{"methods": {method: {"trajectory_error_px" (first-frame aligned), "trajectory_error_unaligned_px",
  "detection_rate", "single_object_rate", "jerk_px", "leakage", "seconds"}}, "chance_baseline": {...},
  "reference": {...}, "settings": {...}, "checkpoint": {...}}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

VIEW_UPSCALE = 8
FPS = 4
DEFAULT_PROMPT = "a red circle"
LABEL_WIDTH = 96
MARK_COLOR = (255, 255, 255)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fastvmt demo``."""
    from .recipes import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, DEMO_METHODS, METHODS

    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--reference", default=None,
                        help="your own reference clip (mp4, gif or folder of frames); default: a blue square on an arc")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help='e.g. "a green square" (colours: red, green, blue; '
                        'shapes: circle, square)')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="testbed checkpoint folder (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps")
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE, help="classifier-free guidance")
    parser.add_argument("--methods", default=",".join(DEMO_METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")


def default_reference(frames: int = 8, size: int = 16):
    """The demo reference: a blue square on an arc. Returns (video (3, F, H, W) in [-1, 1], trajectory (F, 2))."""
    from .data import arc_trajectory, render_clips

    trajectory = arc_trajectory(frames, size)
    return render_clips(trajectory[None], ["blue"], ["square"], size)[0], trajectory


def user_reference(path: str, frames: int = 8, size: int = 16):
    """A user's clip resized to the testbed size. Returns (video (3, F, H, W) in [-1, 1], foreground trajectory)."""
    from fastvmt.video_io import load_video, resize_video, sample_frames

    from .metrics import foreground_trajectory

    clip = load_video(path)
    if clip.shape[0] < frames:
        raise ValueError(f"the testbed model makes {frames}-frame videos, so --reference needs at least {frames} "
                         f"frames; {path!r} has {clip.shape[0]}")
    video = resize_video(sample_frames(clip, frames), size, size)  # (F, 3, H, W) in [0, 1]
    video = video.permute(1, 0, 2, 3).float() * 2.0 - 1.0
    return video, foreground_trajectory(video)


def to_frames01(video) -> "np.ndarray":
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) float32 in [0, 1] (the pipeline's output layout)."""
    return ((video.permute(1, 2, 3, 0).clamp(-1, 1) + 1.0) / 2.0).numpy()


def upscale(frames, factor: int = VIEW_UPSCALE):
    """(F, H, W, 3) -> (F, H*factor, W*factor, 3) uint8, nearest neighbour."""
    import numpy as np

    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    return frames.repeat(factor, axis=1).repeat(factor, axis=2)


def write_strip(rows: Dict[str, "np.ndarray"], trajectories: Dict[str, "torch.Tensor"], path: str) -> None:
    """A PNG with one labelled row per clip (F, H, W, 3) and a white dot at each detected centroid."""
    import math

    import numpy as np
    from PIL import Image, ImageDraw

    tiles = []
    for name, frames in rows.items():
        big = upscale(frames)
        row = Image.fromarray(np.concatenate(list(big), axis=1))
        draw = ImageDraw.Draw(row)
        height = big.shape[1]
        for f, (x, y) in enumerate(trajectories[name].tolist()):
            if not (math.isnan(x) or math.isnan(y)):
                cx = f * big.shape[2] + (x + 0.5) * VIEW_UPSCALE
                cy = (y + 0.5) * VIEW_UPSCALE
                draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=MARK_COLOR)
        labelled = Image.new("RGB", (LABEL_WIDTH + row.width, height), (0, 0, 0))
        labelled.paste(row, (LABEL_WIDTH, 0))
        ImageDraw.Draw(labelled).text((4, height // 2 - 6), name, fill=MARK_COLOR)
        tiles.append(labelled)
    strip = Image.new("RGB", (tiles[0].width, sum(t.height + 2 for t in tiles)), (40, 40, 40))
    y = 0
    for tile in tiles:
        strip.paste(tile, (0, y))
        y += tile.height + 2
    strip.save(path)


def _format(value) -> str:
    import math

    return "   n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:6.2f}"


def verdict(results: Dict[str, Dict], chance: Dict[str, float]) -> List[str]:
    """Plain sentences on what this run shows (against unguided, ditflow and the chance baseline)."""
    import math

    lines = []
    unguided = results.get("unguided", {}).get("trajectory_error_px")
    for name, r in results.items():
        if name == "unguided":
            continue
        err = r.get("trajectory_error_px")
        if err is None or err != err:
            lines.append(f"{name}: the prompt's object was not tracked in enough frames, so no trajectory error.")
            continue
        comparable = unguided is not None and math.isfinite(unguided) and unguided > 0
        rel = f" = {err / unguided:.2f}x unguided" if comparable else ""
        fraction = err / chance["aligned"]
        lines.append(f"{name}: aligned error {err:.2f} px{rel}, {fraction:.2f}x the chance baseline "
                     f"({chance['aligned']:.2f} px; transfer target: <= 1/3 of unguided)")
    lines.append("One seed and one reference are an anecdote: benchmarks/testbed_eval.py scores many pairs and seeds.")
    return lines


def run(args: argparse.Namespace) -> int:
    """Run every requested method, write the videos, strip, metrics.json and print the scores; bad input (exit 2)
    prints what was wrong."""
    try:
        return _run(args)
    except ValueError as exc:  # VideoReadError too
        print(f"fastvmt demo: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from fastvmt.video_io import write_video

    from . import metrics, recipes
    from .data import parse_caption

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))  # once each, in order
    unknown = [m for m in methods if m not in recipes.METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods {args.methods!r}: unknown {unknown}; accepted: {recipes.METHODS}")
    if args.steps < 2:
        raise ValueError(f"--steps must be >= 2, got {args.steps}")
    color, shape = parse_caption(args.prompt)
    pipe = recipes.load_pipeline(args.checkpoint)
    pipe.set_progress_bar_config(disable=True)
    block = recipes.motion_block_for(pipe)
    if args.reference:
        reference, reference_trajectory = user_reference(args.reference, pipe.testbed_frames, pipe.testbed_size)
        reference_color = metrics.dominant_color(reference)
    else:
        reference, reference_trajectory = default_reference(pipe.testbed_frames, pipe.testbed_size)
        reference_color = "blue"
    if bool(torch.isnan(reference_trajectory).any()):
        raise ValueError(f"could not find a moving object in every frame of {args.reference!r}: the testbed needs a "
                         "single object on a plain background")
    os.makedirs(args.out, exist_ok=True)
    reference_frames = to_frames01(reference)
    write_video(upscale(reference_frames), os.path.join(args.out, "reference.mp4"), fps=FPS)
    chance = metrics.chance_baseline(reference_trajectory, size=pipe.testbed_size)

    results, rows, tracks = {}, {"reference": reference_frames}, {"reference": reference_trajectory}
    for method in tqdm(methods, desc="fastvmt demo", unit="method"):
        frames, seconds = recipes.run_method(pipe, method, args.prompt, reference_frames, args.seed,
                                             num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
        scores = metrics.score_video(frames, color, reference_trajectory, reference_color)
        scores["seconds"] = seconds
        results[method] = scores
        rows[method] = frames
        tracks[method] = metrics.object_trajectory(frames, color)
        write_video(upscale(frames), os.path.join(args.out, f"{method}.mp4"), fps=FPS)
    write_strip(rows, tracks, os.path.join(args.out, "strip.png"))
    summary = {
        "methods": results,
        "chance_baseline": {"trajectory_error_px": chance["aligned"],
                            "trajectory_error_unaligned_px": chance["unaligned"]},
        "reference": {"source": args.reference or "blue square on an arc", "color": reference_color,
                      "trajectory": reference_trajectory.tolist()},
        "settings": {"prompt": args.prompt, "shape": shape, "seed": args.seed, "steps": args.steps,
                     "guidance_scale": args.guidance_scale, "checkpoint": args.checkpoint or "shipped",
                     "configs": {m: _config_dict(recipes.motion_config(m, args.steps, motion_block=block))
                                 for m in methods}},
        "checkpoint": recipes.checkpoint_info(args.checkpoint),
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(_nan_to_none(summary), f, indent=2, default=float, allow_nan=False)  # strict JSON: NaN -> null

    steps_trained = summary["checkpoint"].get("step", "unknown")
    print(f"\nprompt {args.prompt!r}, reference {summary['reference']['source']}, checkpoint trained {steps_trained} steps")
    print(f"{'method':18s} {'aligned px':>10s} {'unaligned':>10s} {'detected':>9s} {'seconds':>8s}")
    for name, r in results.items():
        print(f"{name:18s} {_format(r.get('trajectory_error_px')):>10s} "
              f"{_format(r.get('trajectory_error_unaligned_px')):>10s} {r['detection_rate']:9.2f} {r['seconds']:8.2f}")
    print(f"{'chance baseline':18s} {chance['aligned']:10.2f} {chance['unaligned']:10.2f}")
    for line in verdict(results, chance):
        print(line)
    print(f"wrote {args.out}/: reference.mp4, " + ", ".join(f"{m}.mp4" for m in methods) + ", strip.png, metrics.json")
    return 0


def _config_dict(config) -> Optional[Dict]:
    import dataclasses

    if config is None:  # unguided
        return None
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def _nan_to_none(value):
    """``value`` with every float NaN (an untracked object's error) replaced by None, recursively (strict JSON)."""
    import math

    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def main(argv=None) -> int:
    """Entry point of ``fastvmt demo`` (``argv``: its arguments, default sys.argv[1:]); returns the exit status."""
    parser = argparse.ArgumentParser(prog="fastvmt demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
