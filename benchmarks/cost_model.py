"""Analytic per-video FLOP counts of the pipeline variants at Wan2.1-1.3B 480x832x81 (no timing, no GPU).

Run: ``python benchmarks/cost_model.py`` -> ``benchmarks/results/cost_model.md``.

This is a planning aid next to the measured per-phase times of ``bench_pipeline.py`` (GPU): it counts matmul FLOPs
(2 per multiply-add) of every transformer pass in the schedule that :class:`fastvmt.MotionTransferConfig` defines,
so the structure of each recipe (passes per step, truncation, reuse, attention density) can be compared before
measuring. It ignores elementwise work, the VAE, the AMF itself and kernel efficiency, so its ratios are FLOP
ratios, not speedups. The AMF's own matmul FLOPs per gradient iteration are stated beside the table
(:func:`global_amf_flops`): small against a pass, also with DiTFlow's logit averaging over all heads' channels.
"""
from __future__ import annotations

import datetime as _dt
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastvmt.config import MotionTransferConfig  # noqa: E402  (a plain dataclass: no torch / diffusers import)

RESULTS = Path(__file__).resolve().parent / "results" / "cost_model.md"
# Backward of a pass = 2x its forward; gradient checkpointing recomputes the forward once more.
BACKWARD_FACTOR = 2.0
CHECKPOINT_RECOMPUTE = 1.0
# Local self-attention density of the default drop-in processor (tile (3,10,4), window (5,2,7) on 21x30x52).
LOCAL_DENSITY = 0.256


@dataclass(frozen=True)
class WanShape:
    """Wan2.1-1.3B at 480x832x81: tokens, width, FFN width, blocks, text tokens."""

    tokens: int = 21 * 30 * 52
    dim: int = 1536
    ffn: int = 8960
    blocks: int = 30
    text_tokens: int = 512

    def block_flops(self, density: float = 1.0) -> float:
        """Forward FLOPs of one block: projections, self-attention (x density), cross-attention, FFN."""
        n, d = self.tokens, self.dim
        projections = 2 * n * d * d * 4 + 2 * n * d * d * 2 + 2 * self.text_tokens * d * d * 2
        self_attention = 4 * n * n * d * density
        cross_attention = 4 * n * self.text_tokens * d
        ffn = 2 * n * d * self.ffn * 2
        return projections + self_attention + cross_attention + ffn


# DiTFlow's global AMF per gradient iteration: the logits' forward, their recompute (the reference checkpoints each
# chunk of pairs), and the dq and dk products of backward -- four S x S x C matmuls per pair.
GLOBAL_AMF_MATMULS = 4
FRAME_TOKENS = 30 * 52
LATENT_FRAMES = 21
HEADS, HEAD_DIM = 12, 128


def global_amf_flops(channels: int, frames: int = LATENT_FRAMES, frame_tokens: int = FRAME_TOKENS) -> float:
    """Matmul FLOPs of one gradient iteration's global AMF over all frames^2 ordered pairs with ``channels`` per
    logit (HEAD_DIM for head-averaged Q/K, HEADS * HEAD_DIM for DiTFlow's per-head logits averaged)."""
    return GLOBAL_AMF_MATMULS * 2 * frame_tokens**2 * channels * frames**2


def variant_flops(shape: WanShape, config: MotionTransferConfig, steps: int, guidance_density: float,
                  denoise_density: float, guided: bool, checkpointing: bool) -> dict:
    """Per-video FLOPs split by phase for one variant."""
    full_pass = shape.blocks * shape.block_flops(denoise_density)
    denoise = steps * 2 * full_pass  # CFG: conditional + unconditional forward
    truncated = config.motion_block * shape.block_flops(guidance_density)  # blocks 0..b-1 (+ b's Q/K projection)
    grad_pass = truncated * (1 + BACKWARD_FACTOR + (CHECKPOINT_RECOMPUTE if checkpointing else 0.0))
    if not guided:
        return dict(reference=0.0, gradient=0.0, denoise=denoise, gradient_passes=0)
    passes = config.gradient_iterations
    reference_passes = 1 if config.reference_is_fixed else config.guided_steps
    return dict(
        reference=reference_passes * truncated,
        gradient=passes * grad_pass,
        denoise=denoise,
        gradient_passes=passes,
    )


def main() -> int:
    """Write the table to benchmarks/results/cost_model.md and print it."""
    shape = WanShape()
    steps = 50
    fastvmt, ditflow = MotionTransferConfig(), MotionTransferConfig(recipe="ditflow")
    carried = fastvmt.replace(reuse_interval=5, carry_gradient_across_steps=True)
    grad_pass_flops = ditflow.motion_block * shape.block_flops() * (1 + BACKWARD_FACTOR)
    variants = [
        ("plain generation", fastvmt, 1.0, 1.0, False),
        ("ditflow recipe", ditflow, 1.0, 1.0, True),
        ("fastvmt recipe", fastvmt, 1.0, 1.0, True),
        ("fastvmt + local attention in guidance", fastvmt, LOCAL_DENSITY, 1.0, True),
        ("fastvmt + local attention everywhere", fastvmt, LOCAL_DENSITY, LOCAL_DENSITY, True),
        ("fastvmt, k = 5 carried (testbed setting)", carried, 1.0, 1.0, True),
        ("fastvmt, k = 5 carried + local attention in guidance", carried, LOCAL_DENSITY, 1.0, True),
    ]
    lines = [
        "# Analytic per-video FLOPs (Wan2.1-1.3B, 480x832x81, 50 steps)",
        "",
        "- command: `python benchmarks/cost_model.py`",
        "- device: none (arithmetic only; FLOP ratios, not measured speedups)",
        f"- timestamp_utc: `{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}`",
        f"- model: {shape}; one block forward = {shape.block_flops() / 1e12:.2f} TFLOP dense, "
        f"{shape.block_flops(LOCAL_DENSITY) / 1e12:.2f} TFLOP at local density {LOCAL_DENSITY}; self-attention is "
        f"{1 - shape.block_flops(0.0) / shape.block_flops():.0%} of a dense block",
        f"- schedule from MotionTransferConfig defaults: fastvmt {fastvmt.guided_steps} guided steps x "
        f"{fastvmt.inner_iters} iterations, reuse every {fastvmt.reuse_interval}, motion block {fastvmt.motion_block}; "
        f"ditflow {ditflow.guided_steps} x {ditflow.inner_iters}, no reuse, reference computed once",
        "- backward = 2x forward; 'ckpt' adds one recomputed forward per gradient pass",
        f"- not in the table, the ditflow recipe's global AMF per gradient iteration ({LATENT_FRAMES}^2 pairs of "
        f"{FRAME_TOKENS} x {FRAME_TOKENS} logits, {GLOBAL_AMF_MATMULS} matmuls each): "
        f"{global_amf_flops(HEADS * HEAD_DIM) / 1e12:.1f} TFLOP with DiTFlow's per-head logits averaged "
        f"({HEADS} x {HEAD_DIM} channels, head_reduce='mean_logits') = "
        f"{global_amf_flops(HEADS * HEAD_DIM) / grad_pass_flops:.1%} of its "
        f"{grad_pass_flops / 1e12:.0f} TFLOP gradient pass; {global_amf_flops(HEAD_DIM) / 1e12:.2f} TFLOP with "
        f"head-averaged Q and K ({global_amf_flops(HEAD_DIM) / grad_pass_flops:.2%})",
        "- 'k = 5 carried': reuse_interval=5 with carry_gradient_across_steps=True, the reuse setting of the testbed "
        "recipe (as accurate as no reuse there, benchmarks/results/testbed_sweep.md); its quality on Wan2.1 is not "
        "measured",
        "",
        "| variant | gradient passes | reference PFLOP | gradient PFLOP (no ckpt / ckpt) | denoise PFLOP "
        "| total PFLOP (no ckpt / ckpt) | vs plain | vs ditflow |",
        "|---|---|---|---|---|---|---|---|",
    ]
    totals = {}
    for name, config, g_density, d_density, guided in variants:
        plain = variant_flops(shape, config, steps, g_density, d_density, guided, checkpointing=False)
        ckpt = variant_flops(shape, config, steps, g_density, d_density, guided, checkpointing=True)
        totals[name] = (sum(v for k, v in plain.items() if k != "gradient_passes"),
                        sum(v for k, v in ckpt.items() if k != "gradient_passes"))
    base, ditflow_total = totals["plain generation"][0], totals["ditflow recipe"]
    for name, config, g_density, d_density, guided in variants:
        plain = variant_flops(shape, config, steps, g_density, d_density, guided, checkpointing=False)
        ckpt = variant_flops(shape, config, steps, g_density, d_density, guided, checkpointing=True)
        total, total_ckpt = totals[name]
        lines.append(
            f"| {name} | {plain['gradient_passes']} | {plain['reference'] / 1e15:.2f} | "
            f"{plain['gradient'] / 1e15:.1f} / {ckpt['gradient'] / 1e15:.1f} | {plain['denoise'] / 1e15:.1f} | "
            f"{total / 1e15:.1f} / {total_ckpt / 1e15:.1f} | {total / base:.2f}x | "
            f"{ditflow_total[0] / total:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
