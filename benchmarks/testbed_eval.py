"""Score motion transfer on the testbed model: trajectory errors against ground truth, per method, side by side.

    python benchmarks/testbed_eval.py [--pairs 20] [--seeds 3] [--steps 20] [--checkpoint DIR] [--threads T]

Writes ``benchmarks/results/testbed.md`` (summary) and ``benchmarks/results/testbed_runs.csv`` (every run). Each
reference/prompt pair is a ground-truth clip of the training distribution (pair 0 is the demo's blue square on an arc)
and a prompt naming a different colour, so the reference's appearance leaking into the output is measurable. Every
method runs on every (pair, seed) in the same process, so errors can be paired and wall times compared.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastvmt.testbed import data, metrics, recipes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PAIR_SEED = 2024
RECORD_FIELDS = ("pair", "seed", "method", "prompt", "reference", "trajectory_error_px",
                 "trajectory_error_unaligned_px", "detection_rate", "single_object_rate", "jerk_px", "leakage",
                 "seconds")


def make_pairs(count: int, frames: int = data.DEFAULT_FRAMES, size: int = data.DEFAULT_SIZE,
               seed: int = PAIR_SEED) -> List[Dict]:
    """``count`` reference/prompt pairs: pair 0 is the demo (blue square on an arc -> "a red circle"), the rest are
    random training-distribution clips with a prompt of another colour and a random shape.

    Each pair: {"video": (3, F, H, W) in [-1, 1], "trajectory": (F, 2), "color", "caption", "prompt", "size"}.
    """
    if count < 1:
        raise ValueError(f"need at least one pair, got {count}")
    trajectory = data.arc_trajectory(frames, size)
    pairs = [{"video": data.render_clips(trajectory[None], ["blue"], ["square"], size)[0], "trajectory": trajectory,
              "color": "blue", "caption": "a blue square", "prompt": "a red circle", "size": size}]
    generator = torch.Generator().manual_seed(seed)
    clips = data.sample_clips(max(0, count - 1), frames=frames, size=size, generator=generator)
    colors = list(data.COLORS)
    for b in range(count - 1):
        others = [c for c in colors if c != clips.colors[b]]
        prompt_color = others[b % len(others)]
        prompt_shape = data.SHAPES[int(torch.randint(0, len(data.SHAPES), (1,), generator=generator))]
        pairs.append({"video": clips.videos[b], "trajectory": clips.trajectories[b], "color": clips.colors[b],
                      "caption": clips.captions[b], "prompt": data.caption_for(prompt_color, prompt_shape),
                      "size": size})
    return pairs


def evaluate(pipe, pairs: Sequence[Dict], seeds: Sequence[int], methods: Sequence[str], steps: int,
             guidance_scale: float, progress=None, deadline: float = math.inf) -> List[Dict]:
    """Run every method on every (pair, seed); returns one record per run (fields of RECORD_FIELDS).

    The seeds of a pair run as one batched pipeline call per method (clip s of the batch is "seed" s; the batch's
    noise comes from the generator seeded with PAIR_SEED + pair index), so ``seconds`` is the call's time per clip.
    No new pair starts after ``deadline`` (a ``time.time()`` value); the records say how many pairs ran.
    """
    records = []
    for p, pair in enumerate(pairs):
        if time.time() > deadline:
            break
        reference = ((pair["video"].permute(1, 2, 3, 0) + 1.0) / 2.0).numpy()
        color = data.parse_caption(pair["prompt"])[0]
        for method in methods:
            clips, seconds = recipes.run_method(pipe, method, pair["prompt"], reference, PAIR_SEED + p,
                                                num_inference_steps=steps, guidance_scale=guidance_scale,
                                                num_videos=len(seeds))
            for seed, frames in zip(seeds, clips):
                scores = metrics.score_video(frames, color, pair["trajectory"], pair["color"])
                records.append({"pair": p, "seed": seed, "method": method, "prompt": pair["prompt"],
                                "reference": pair["caption"], "seconds": seconds, **scores})
            if progress is not None:
                progress.update(len(seeds))
    return records


def _mean_sem(values: Sequence[float]):
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return math.nan, math.nan, 0
    sem = float(np.std(finite, ddof=1) / math.sqrt(len(finite))) if len(finite) > 1 else math.nan
    return float(np.mean(finite)), sem, len(finite)


def summarize(records: Sequence[Dict], pairs: Sequence[Dict], methods: Sequence[str]) -> Dict:
    """Per-method means, paired differences against unguided, time ratios, and the chance baseline."""
    chance = [metrics.chance_baseline(p["trajectory"], size=p["size"]) for p in pairs]
    by = {(r["pair"], r["seed"], r["method"]): r for r in records}
    keys = sorted({(r["pair"], r["seed"]) for r in records})
    seconds = {m: float(np.mean([by[k + (m,)]["seconds"] for k in keys])) for m in methods}
    rows = []
    for m in methods:
        runs = [by[k + (m,)] for k in keys]
        aligned, aligned_sem, n_valid = _mean_sem([r["trajectory_error_px"] for r in runs])
        unaligned, unaligned_sem, _ = _mean_sem([r["trajectory_error_unaligned_px"] for r in runs])
        row = {"method": m, "aligned": aligned, "aligned_sem": aligned_sem, "unaligned": unaligned,
               "unaligned_sem": unaligned_sem, "tracked_runs": n_valid, "runs": len(runs),
               "detection": float(np.mean([r["detection_rate"] for r in runs])),
               "single_object": float(np.mean([r["single_object_rate"] for r in runs])),
               "leakage": float(np.mean([r.get("leakage", 0.0) for r in runs])),
               "jerk": _mean_sem([r["jerk_px"] for r in runs])[0],
               "seconds": seconds[m]}
        if "unguided" in methods and m != "unguided":
            diffs = [by[k + (m,)]["trajectory_error_px"] - by[k + ("unguided",)]["trajectory_error_px"]
                     for k in keys]
            diff, diff_sem, n_pairs = _mean_sem(diffs)
            wins = [d < 0 for d in diffs if not math.isnan(d)]
            row.update(diff_vs_unguided=diff, diff_sem=diff_sem, paired_runs=n_pairs,
                       win_rate=float(np.mean(wins)) if wins else math.nan,
                       time_vs_unguided=seconds[m] / seconds["unguided"])
        if "ditflow" in methods:
            row["time_vs_ditflow"] = seconds[m] / seconds["ditflow"]
        rows.append(row)
    return {"rows": rows,
            "chance_aligned": float(np.mean([c["aligned"] for c in chance])),
            "chance_unaligned": float(np.mean([c["unaligned"] for c in chance]))}


def _f(value, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def gate3_lines(summary: Dict) -> List[str]:
    """Gate 3 (transfer) checks: fastvmt aligned error <= 1/3 unguided, within 10% of ditflow, >= 2x faster."""
    rows = {r["method"]: r for r in summary["rows"]}
    if not {"unguided", "ditflow", "fastvmt"} <= set(rows):
        return ["gate 3 needs the unguided, ditflow and fastvmt methods"]
    f, u, d = rows["fastvmt"], rows["unguided"], rows["ditflow"]
    checks = [
        (f"fastvmt aligned error {_f(f['aligned'])} px <= 1/3 of unguided ({_f(u['aligned'] / 3)} px)",
         f["aligned"] <= u["aligned"] / 3),
        (f"fastvmt within 10% of ditflow ({_f(f['aligned'])} vs {_f(d['aligned'])} px)",
         f["aligned"] <= 1.1 * d["aligned"]),
        (f"fastvmt >= 2x faster than ditflow (time ratio {_f(f['seconds'] / d['seconds'])})",
         f["seconds"] * 2 <= d["seconds"]),
    ]
    return [f"{'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks]


def write_results(summary: Dict, records: Sequence[Dict], args, header: Dict, path: Path) -> None:
    """The markdown summary at ``path`` and every run in testbed_runs.csv next to it."""
    lines = ["# Motion transfer on the testbed model (trajectory error against ground truth)", ""]
    lines += [f"- {k}: `{v}`" for k, v in header.items()]
    lines += [
        f"- size: {args.pairs} reference/prompt pairs x {len(args.seed_list)} seeds = "
        f"{args.pairs * len(args.seed_list)} runs per method, {args.steps} denoising steps, CFG {args.guidance_scale}",
        "- aligned = mean centroid distance to the reference trajectory after removing the first tracked frame's offset "
        "(motion only); unaligned = without that alignment (motion + placement). A run's error needs the prompt's "
        "object tracked in >= half the frames; `tracked` counts such runs.",
        f"- chance baseline (a random training-distribution path against the same references): aligned "
        f"{_f(summary['chance_aligned'])} px, unaligned {_f(summary['chance_unaligned'])} px",
        "- paired diff = method minus unguided on the same pair and seed (negative = closer to the reference); "
        "win = fraction of paired runs where the method is closer; +- is one standard error",
        "- time = mean wall seconds per video on this CPU (all methods in the same process, interleaved); ratios "
        "side by side",
        "",
        "| method | aligned px | unaligned px | tracked | detection | one object | leakage | jerk px | paired diff "
        "vs unguided | win | s/video | time vs unguided | time vs ditflow |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        diff = (f"{_f(r['diff_vs_unguided'])} +- {_f(r['diff_sem'])}" if "diff_vs_unguided" in r else "")
        lines.append(
            f"| {r['method']} | {_f(r['aligned'])} +- {_f(r['aligned_sem'])} | {_f(r['unaligned'])} +- "
            f"{_f(r['unaligned_sem'])} | {r['tracked_runs']}/{r['runs']} | {_f(r['detection'])} | "
            f"{_f(r['single_object'])} | {_f(r['leakage'])} | {_f(r['jerk'])} | {diff} | {_f(r.get('win_rate'))} | "
            f"{_f(r['seconds'])} | {_f(r.get('time_vs_unguided'))} | {_f(r.get('time_vs_ditflow'))} |")
    lines += ["", "## Gate 3 (transfer)", ""] + [f"- {line}" for line in gate3_lines(summary)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    with open(path.with_name(path.stem + "_runs.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RECORD_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def build_header(args, pipe) -> Dict[str, str]:
    """Provenance of a testbed run: command, device, versions, checkpoint training summary, timestamp."""
    import diffusers

    info = recipes.checkpoint_info(args.checkpoint)
    return {
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "device": f"CPU, {torch.get_num_threads()} torch thread(s)",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "checkpoint": f"{args.checkpoint or 'shipped (fastvmt/testbed/checkpoint)'}, trained {info.get('step', '?')} "
                      f"steps x batch {info.get('batch', '?')}",
        "settings": recipes.settings_summary(),
        "timestamp_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per pair")
    parser.add_argument("--steps", type=int, default=recipes.DEFAULT_STEPS)
    parser.add_argument("--guidance-scale", type=float, default=recipes.DEFAULT_GUIDANCE_SCALE)
    parser.add_argument("--methods", default=",".join(recipes.METHODS))
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "testbed.md"))
    parser.add_argument("--time-budget", type=float, default=0.0,
                        help="minutes after which no new pair starts (0 = none); the results state the size run")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    args.seed_list = list(range(args.seeds))
    pipe = recipes.load_pipeline(args.checkpoint)
    pipe.set_progress_bar_config(disable=True)
    pairs = make_pairs(args.pairs, pipe.testbed_frames, pipe.testbed_size)
    start = time.time()
    with tqdm(total=len(pairs) * args.seeds * len(methods), desc="testbed eval", unit="video") as bar:
        deadline = start + 60 * args.time_budget if args.time_budget > 0 else math.inf
        records = evaluate(pipe, pairs, args.seed_list, methods, args.steps, args.guidance_scale, progress=bar,
                           deadline=deadline)
    ran = len({r["pair"] for r in records})
    if ran < len(pairs):
        print(f"time budget reached: {ran} of {len(pairs)} pairs ran", flush=True)
        args.pairs, pairs = ran, pairs[:ran]
    summary = summarize(records, pairs, methods)
    header = build_header(args, pipe)
    header["wall_minutes"] = f"{(time.time() - start) / 60:.1f}"
    write_results(summary, records, args, header, Path(args.out))
    print(Path(args.out).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
