"""Tune the testbed recipes: score named variants (a method plus config overrides) on a *development* set of pairs.

    python benchmarks/testbed_sweep.py --pairs 12 --seeds 2 --threads 1 \
        --variant "fastvmt" --variant "fastvmt lr x10=fastvmt lr_scale=10" --out benchmarks/results/testbed_sweep.md

A variant is ``"LABEL=METHOD key=value ..."`` (or just ``"METHOD"``): METHOD is one of
``fastvmt.testbed.recipes.METHODS``; each ``key=value`` overrides a ``MotionTransferConfig`` field (values are Python
literals, e.g. ``tile=(1,1)``), except ``lr_scale=S`` (the recipe's preset learning rates x S, replacing the testbed's
multiplier), ``guided_fraction=F`` (``guided_steps = round(F * steps)``) and ``local_phases=...`` (for
"fastvmt_local": "guidance", "denoise" or "both"). The development pairs are drawn with a different
seed from the evaluation pairs of ``testbed_eval.py`` (``PAIR_SEED + DEV_OFFSET``), so settings chosen here are then
scored on clips they were not tuned on. "unguided" always runs too: every variant gets its paired difference.
Appends one row per variant to ``--out`` (markdown) and ``--csv``; rows of earlier runs are kept.
"""
from __future__ import annotations

import argparse
import ast
import csv
import datetime as dt
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fastvmt.testbed import data, metrics, recipes  # noqa: E402
from testbed_eval import PAIR_SEED, make_pairs, _mean_sem  # noqa: E402

DEV_OFFSET = 1000
FIELDS = ("label", "method", "overrides", "aligned_px", "aligned_sem", "diff_vs_unguided", "diff_sem", "win_rate",
          "detection", "tracked", "runs", "s_per_video", "command", "timestamp_utc")


def parse_variant(text: str, steps: int) -> Tuple[str, str, Dict]:
    """``"LABEL=METHOD k=v ..."`` -> (label, method, overrides for ``recipes.run_method``)."""
    words = text.split()
    if not words:
        raise ValueError("empty --variant")
    head = words[0]
    label, method = head.split("=", 1) if "=" in head and head.split("=", 1)[1] in recipes.METHODS else (None, head)
    if method not in recipes.METHODS:
        raise ValueError(f"variant {text!r}: method {method!r} not in {recipes.METHODS}")
    overrides: Dict = {}
    for word in words[1:]:
        if "=" not in word:
            raise ValueError(f"variant {text!r}: expected key=value, got {word!r}")
        key, raw = word.split("=", 1)
        overrides[key] = ast.literal_eval(raw)
    if "guided_fraction" in overrides:
        overrides["guided_steps"] = max(1, round(float(overrides.pop("guided_fraction")) * steps))
    return label or text.replace(" ", "_"), method, overrides


def run_variant(pipe, pairs, seeds, method, overrides, steps, guidance_scale) -> List[Dict]:
    """One record per (pair, seed): the metrics of ``metrics.score_video`` plus seconds per video."""
    records = []
    for p, pair in enumerate(pairs):
        reference = ((pair["video"].permute(1, 2, 3, 0) + 1.0) / 2.0).numpy()
        color = data.parse_caption(pair["prompt"])[0]
        clips, seconds = recipes.run_method(pipe, method, pair["prompt"], reference, PAIR_SEED + DEV_OFFSET + p,
                                            num_inference_steps=steps, guidance_scale=guidance_scale,
                                            num_videos=len(seeds), **overrides)
        for seed, frames in zip(seeds, clips):
            scores = metrics.score_video(frames, color, pair["trajectory"], pair["color"])
            records.append({"pair": p, "seed": seed, "seconds": seconds, **scores})
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=recipes.DEFAULT_STEPS)
    parser.add_argument("--guidance-scale", type=float, default=recipes.DEFAULT_GUIDANCE_SCALE)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "testbed_sweep.md"))
    parser.add_argument("--csv", default=None, help="default: --out with .csv")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    variants = [parse_variant(v, args.steps) for v in args.variant]
    pipe = recipes.load_pipeline(args.checkpoint)
    pipe.set_progress_bar_config(disable=True)
    all_pairs = make_pairs(args.pairs + 1, pipe.testbed_frames, pipe.testbed_size, seed=PAIR_SEED + DEV_OFFSET)
    pairs = all_pairs[1:]  # pair 0 is the demo clip, which the evaluation also uses: keep it out of tuning
    seeds = list(range(args.seeds))
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]).as_posix())] + sys.argv[1:])
    unguided = run_variant(pipe, pairs, seeds, "unguided", {}, args.steps, args.guidance_scale)
    base = {(r["pair"], r["seed"]): r["trajectory_error_px"] for r in unguided}
    rows = []
    for label, method, overrides in [("unguided", "unguided", {})] + variants:
        start = time.time()
        records = unguided if label == "unguided" else run_variant(pipe, pairs, seeds, method, overrides,
                                                                   args.steps, args.guidance_scale)
        aligned, sem, tracked = _mean_sem([r["trajectory_error_px"] for r in records])
        diffs = [r["trajectory_error_px"] - base[(r["pair"], r["seed"])] for r in records]
        diff, diff_sem, _ = _mean_sem(diffs)
        wins = [d < 0 for d in diffs if not math.isnan(d)]
        row = {"label": label, "method": method, "overrides": repr(overrides), "aligned_px": f"{aligned:.3f}",
               "aligned_sem": f"{sem:.3f}", "diff_vs_unguided": f"{diff:.3f}", "diff_sem": f"{diff_sem:.3f}",
               "win_rate": f"{np.mean(wins):.2f}" if wins else "nan",
               "detection": f"{np.mean([r['detection_rate'] for r in records]):.2f}", "tracked": tracked,
               "runs": len(records), "s_per_video": f"{np.mean([r['seconds'] for r in records]):.2f}",
               "command": command,
               "timestamp_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        rows.append(row)
        print(f"{label:40s} aligned {aligned:.3f} +- {sem:.3f}  diff {diff:+.3f} +- {diff_sem:.3f}  "
              f"win {row['win_rate']}  {time.time() - start:.0f}s", flush=True)
    csv_path = Path(args.csv) if args.csv else Path(args.out).with_suffix(".csv")
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    write_markdown(csv_path, Path(args.out), args)
    return 0


def write_markdown(csv_path: Path, out: Path, args) -> None:
    """Render every row of ``csv_path`` (all sweeps so far) as one markdown table per command."""
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    info = recipes.checkpoint_info(args.checkpoint)
    lines = ["# Testbed recipe sweep (development pairs)", "",
             f"- checkpoint: `{args.checkpoint or 'shipped'}`, trained {info.get('step', '?')} steps",
             f"- testbed settings that variants override (at the time of writing): {recipes.settings_summary()}",
             f"- development pairs: random clips drawn with seed {PAIR_SEED + DEV_OFFSET} (the evaluation in "
             "`testbed.md` uses other clips); the demo clip is excluded",
             "- aligned = trajectory error after first-frame alignment (px, lower is better); diff = paired "
             "difference against unguided on the same pair and seed; +- one standard error", ""]
    by_command: Dict[str, List[Dict]] = {}
    for r in rows:
        by_command.setdefault(r["command"], []).append(r)
    for command, group in by_command.items():
        lines += [f"`{command}`", "", "| variant | method | overrides | aligned px | diff vs unguided | win | "
                  "detection | s/video |", "|---|---|---|---|---|---|---|---|"]
        for r in group:
            lines.append(f"| {r['label']} | {r['method']} | `{r['overrides']}` | {r['aligned_px']} +- "
                         f"{r['aligned_sem']} | {r['diff_vs_unguided']} +- {r['diff_sem']} | {r['win_rate']} | "
                         f"{r['detection']} | {r['s_per_video']} |")
        lines.append("")
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
