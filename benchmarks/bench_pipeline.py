"""Motion-transfer pipeline phases at Wan2.1-1.3B size, side by side in one run (pytest file, CUDA).

GPU run (``python -m pytest benchmarks/bench_pipeline.py``; part of ``benchmarks/gpu_suite.sh``): the full-size
Wan2.1-1.3B transformer (30 blocks, 12 heads x 128, dim 1536, ffn 8960, text dim 4096, freq 256, 16 channels, patch
(1, 2, 2)) and the Wan VAE (default config), random weights in bf16 -- cost does not depend on the weights -- and
random prompt embeddings (1, 512, 4096) instead of the text encoder. Video 480 x 832 x 81 (latent 16 x 21 x 60 x 104,
32,760 tokens).

Phases (median of REPEATS after one warm-up, CUDA-synchronised wall clock):
- reference pass: the no-grad truncated pass at the motion block (block 14) + the recipe's flow;
- gradient iteration: truncated forward + flow + loss + backward to the latent + one fused AdamW step;
- reuse iteration: one fused AdamW step with the cached gradient (no transformer forward);
- denoising step: two full forwards (classifier-free guidance) + the Euler update;
- VAE encode of the reference video and VAE decode of the result (once; shared by every variant).

Variants: plain generation; the ditflow recipe (DiTFlow's head handling, ``head_reduce="mean_logits"``: its AMF over
12 x 128 concatenated channels runs on the chunked fp32 torch reference, which the kernels do not compile); the ditflow
recipe with Q and K averaged over heads (``mean_qk``, its AMF on the Triton kernels; its denoising step is the ditflow
row's, the same stock transformer call, to keep the GPU stage short); the fastvmt recipe; fastvmt + local attention in the guidance passes;
fastvmt + local attention everywhere (``fastvmt.apply_local_attention`` defaults: tile (3, 10, 4), window (5, 2, 7),
25.6% of the query-key pairs); the same with the sparser window (3, 3, 3), 9.9% of the pairs (the density at which
the kernel benchmark measured ~4x over dense attention), to show where the schedule's targets come within reach. Guidance runs with ``gradient_checkpointing="auto"``, what users get (column
``checkpointing``: at this size on an 80 GB GPU it picks no checkpointing); for the fastvmt row one gradient
computation is also timed with the other setting (``*_other_ckpt``). The last rows re-compose the measured phase
times of the fastvmt and local-attention rows for gradient reuse with k = 5 carried
across steps (the testbed recipe's setting: G + 1 gradient iterations instead of 4 G).

Opt-in (``FASTVMT_BENCH_PIPELINE_COMPILE=<torch.compile backend>``, e.g. ``inductor``; not in the GPU suite, whose
pipeline stage has no room for minutes of compilation): a last variant ``fastvmt+compile`` times the fastvmt row's
phases with the transformer's blocks compiled (``compile_repeated_blocks(fullgraph=True)``, as ``fastvmt transfer
--compile``); its denoising step is the compiled plain generation's. The warm-up call of each phase compiles.

A last test runs whole ``pipe(...)`` calls on a shorter schedule (15 steps, 3 guided: the same 20% guided fraction)
-- plain, FastVMT, and FastVMT with k = 5 carried + local attention everywhere -- and compares their wall time with
the total composed from this run's phase rows (results/pipeline_end_to_end).

Per-video totals are composed from the schedule (text encoding excluded), N = 50 steps, G = 10 guided steps:
plain = N*denoise + decode; ditflow = encode + 1*reference (fixed clean reference, computed once) + G*5*gradient +
N*denoise + decode; fastvmt = encode + G*reference + G*(4*gradient + 6*reuse) + N*denoise + decode.

Dry run (FASTVMT_BENCH_DRY=1 or no CUDA): the same code on tiny random components on CPU, results to
$FASTVMT_BENCH_OUT or a temp dir (never benchmarks/results).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch

pytest.importorskip("diffusers")

from _results import is_dry, write_table  # noqa: E402

DRY = is_dry()
NUM_STEPS, GUIDED_STEPS = 50, 10
if DRY:
    DEVICE, DTYPE = torch.device("cpu"), torch.float32
    HEIGHT, WIDTH, FRAMES, TEXT_TOKENS, MOTION_BLOCK, REPEATS = 32, 48, 9, 16, 1, 1
    TRANSFORMER = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=32,
    )
    VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    LOCAL = dict(tile=(1, 1, 1), window=(1, 1, 1))
    LOCAL_SPARSE = dict(tile=(1, 1, 1), window=(1, 1, 1))
    MOTION = dict(tile=(1, 2), window=3)
else:
    DEVICE, DTYPE = torch.device("cuda"), torch.bfloat16
    HEIGHT, WIDTH, FRAMES, TEXT_TOKENS, MOTION_BLOCK, REPEATS = 480, 832, 81, 512, 14, 2
    TRANSFORMER = dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    )
    VAE = {}
    LOCAL = {}  # apply_local_attention's defaults: tile (3, 10, 4), window (5, 2, 7) -> 25.6% density
    LOCAL_SPARSE = dict(tile=(3, 10, 4), window=(3, 3, 3))  # 9.9% density
    MOTION = {}
REUSE_REPEATS = 5
VAE_WARMUP_FRAMES = 5  # a 4k+1 clip for the VAE's untimed warm-up call

SPARSE_ALL = "fastvmt+local(all, 9.9%)"
# Local-attention variant -> (phases, apply_local_attention settings).
LOCAL_VARIANTS = {
    "fastvmt+local(guidance)": ("guidance", LOCAL),
    "fastvmt+local(all)": ("both", LOCAL),
    SPARSE_ALL: ("both", LOCAL_SPARSE),
}
# Opt-in compiled variant: its torch.compile backend (the dry-run test uses aot_eager: no C++ code generation).
COMPILE_BACKEND = os.environ.get("FASTVMT_BENCH_PIPELINE_COMPILE", "")
COMPILED = "fastvmt+compile"
DITFLOW_MEAN_QK = "ditflow(mean_qk heads)"
DITFLOW_VARIANTS = {"ditflow": {}, DITFLOW_MEAN_QK: dict(head_reduce="mean_qk")}  # variant -> config overrides
VARIANTS = ("plain", *DITFLOW_VARIANTS, "fastvmt", *LOCAL_VARIANTS, *((COMPILED,) if COMPILE_BACKEND else ()))
CARRIED_REUSE_INTERVAL = 5
CARRIED_SETTINGS = dict(reuse_interval=CARRIED_REUSE_INTERVAL, carry_gradient_across_steps=True)
# Measured row -> the same phase times composed for k = 5 carried across steps.
CARRIED_ROWS = {
    "fastvmt": f"fastvmt(k={CARRIED_REUSE_INTERVAL} carried, composed)",
    "fastvmt+local(guidance)": f"fastvmt(k={CARRIED_REUSE_INTERVAL} carried)+local(guidance), composed",
    "fastvmt+local(all)": f"fastvmt(k={CARRIED_REUSE_INTERVAL} carried)+local(all), composed",
    SPARSE_ALL: f"fastvmt(k={CARRIED_REUSE_INTERVAL} carried)+local(all, 9.9%), composed",
}
RESULTS: Dict[str, Dict[str, object]] = {}
SHARED: Dict[str, float] = {}


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int = REPEATS, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _reset_peak() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> Optional[float]:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else None


@pytest.fixture(scope="module", autouse=True)
def _dry_single_thread():
    """Tiny CPU models time far more stably on one intra-op thread on a shared machine (dry run only)."""
    previous = torch.get_num_threads()
    if DRY:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def bench():
    """The pipeline on random full-size (GPU) or tiny (dry) components, plus inputs shared by every variant."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from fastvmt import FastVMTPipeline

    torch.manual_seed(0)
    with torch.device(DEVICE):
        transformer = WanTransformer3DModel(**TRANSFORMER).to(DTYPE).eval()
        vae = AutoencoderKLWan(**VAE).to(DTYPE).eval()
    pipe = FastVMTPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(NUM_STEPS, device=DEVICE)
    pipe._num_timesteps = NUM_STEPS
    frames, height, width = pipe.latent_geometry(FRAMES, HEIGHT, WIDTH)
    text_dim = TRANSFORMER["text_dim"]
    embeds = {name: torch.randn(1, TEXT_TOKENS, text_dim, device=DEVICE, dtype=DTYPE) for name in ("pos", "neg", "ref")}
    video = torch.rand(1, 3, FRAMES, HEIGHT, WIDTH, device=DEVICE) * 2 - 1
    with torch.no_grad():
        # Warm-up on a short clip (cuDNN's first-call setup would otherwise be charged to every guided video).
        pipe.decode_latents_to_video(pipe.encode_video_to_latents(video[:, :, :VAE_WARMUP_FRAMES]), "pt")
        _reset_peak()
        encoded = {}
        # One call each after the short warm-up: seconds-long convolutions, timed once to keep the GPU suite short.
        SHARED["vae_encode_s"] = timed(
            lambda: encoded.setdefault("latents", pipe.encode_video_to_latents(video)), repeats=1, warmup=0
        )
        reference_latents = encoded["latents"]
        SHARED["vae_decode_s"] = timed(
            lambda: pipe.decode_latents_to_video(reference_latents, "pt"), repeats=1, warmup=0
        )
        SHARED["vae_peak_gib"] = _peak_gib()
    latents = torch.randn(1, 16, frames, height, width, device=DEVICE)
    return dict(pipe=pipe, embeds=embeds, reference=reference_latents, latents=latents, reference_video=video)


def _config(recipe: str, **extra):
    from fastvmt import MotionTransferConfig

    settings = dict(recipe=recipe, motion_block=MOTION_BLOCK, guided_steps=GUIDED_STEPS)
    if recipe == "fastvmt":
        settings.update(MOTION)
    settings.update(extra)
    return MotionTransferConfig(**settings)


def _measure(bench, variant: str) -> Dict[str, object]:
    """Time every phase of ``variant``; returns the row (seconds per phase, composed per-video totals)."""
    from fastvmt import apply_local_attention
    from fastvmt.guidance import latent_gradient
    from fastvmt.processors import attention_phase
    from fastvmt_kernels import fused_adamw_step

    pipe, embeds = bench["pipe"], bench["embeds"]
    transformer = pipe.transformer
    original = dict(transformer.attn_processors)
    if variant in LOCAL_VARIANTS:
        phases, settings = LOCAL_VARIANTS[variant]
        apply_local_attention(transformer, phases=phases, **settings)
    if variant == COMPILED:
        transformer.compile_repeated_blocks(fullgraph=True, backend=COMPILE_BACKEND)
    t = pipe.scheduler.timesteps[0]
    row: Dict[str, object] = {"variant": variant}
    _reset_peak()
    try:
        def denoise():
            pipe.scheduler.set_begin_index(0)
            pipe.scheduler._step_index = None  # every timed call is step 0 (scheduler.step advances the index)
            pipe.denoise_step(bench["latents"], t, 0, embeds["pos"], embeds["neg"], 5.0)

        if variant == DITFLOW_MEAN_QK and "denoise_step_s" in RESULTS.get("ditflow", {}):
            row["denoise_step_s"] = RESULTS["ditflow"]["denoise_step_s"]  # the same stock transformer call
        else:
            with torch.no_grad():
                row["denoise_step_s"] = timed(denoise)
        if variant != "plain":
            if variant in DITFLOW_VARIANTS:
                config = _config("ditflow", **DITFLOW_VARIANTS[variant])
            else:
                config = _config("fastvmt")
            sigma = float(pipe.scheduler.sigmas[0])
            noise = torch.randn_like(bench["reference"])
            for p in transformer.parameters():
                p.requires_grad_(False)
            with attention_phase("guidance"):
                ref_sigma = float(config.reference_noise) if config.reference_is_fixed else sigma
                with torch.no_grad():
                    row["reference_pass_s"] = timed(
                        lambda: pipe.reference_flow(bench["reference"], noise, ref_sigma, embeds["ref"], config)
                    )
                    ref = pipe.reference_flow(bench["reference"], noise, ref_sigma, embeds["ref"], config)
                loss_fn = pipe.guidance_loss_fn(ref, t.expand(1), embeds["pos"], config)
                master = bench["latents"].float().clone()
                with torch.enable_grad():  # what "auto" resolves to for a gradient pass on this latent
                    row["checkpointing"] = pipe.use_gradient_checkpointing(master.to(DTYPE), config)
                moments = [torch.zeros_like(master), torch.zeros_like(master)]
                cached = {}

                def gradient_iteration():
                    cached["grad"], _ = latent_gradient(loss_fn, master)
                    fused_adamw_step(master, cached["grad"], *moments, 1, lr=config.lr_start,
                                     weight_decay=config.weight_decay)

                row["gradient_iter_s"] = timed(gradient_iteration)
                row["reuse_iter_s"] = timed(
                    lambda: fused_adamw_step(master, cached["grad"], *moments, 2, lr=config.lr_start,
                                             weight_decay=config.weight_decay),
                    repeats=REUSE_REPEATS,
                )
            row["gradient_passes"], row["reuse_iters"] = _schedule_counts(config)
            row["reference_passes"] = 1 if config.reference_is_fixed else GUIDED_STEPS
        row["peak_gib"] = _peak_gib()
        if variant == "fastvmt":
            row.update(_gradient_other_checkpointing(pipe, ref, t, embeds["pos"], config, master, row["checkpointing"]))
    except torch.cuda.OutOfMemoryError as exc:  # keep the other variants' numbers
        row["error"] = f"OOM: {str(exc).splitlines()[0]}"
    finally:
        transformer.set_attn_processor(original)
        if variant == COMPILED:
            for block in transformer.blocks:
                block._compiled_call_impl = None  # undo Module.compile
            torch._dynamo.reset()
    return row


def _gradient_other_checkpointing(pipe, ref, t, prompt_embeds, config, master, used: bool) -> Dict[str, object]:
    """Time and peak memory of one gradient computation (no AdamW step) with the checkpointing setting the row did
    not use (without it, it may not fit)."""
    from fastvmt.guidance import latent_gradient
    from fastvmt.processors import attention_phase

    other = not used
    loss_fn = pipe.guidance_loss_fn(ref, t.expand(1), prompt_embeds, config.replace(gradient_checkpointing=other))
    _reset_peak()
    try:
        with attention_phase("guidance"):
            seconds = timed(lambda: latent_gradient(loss_fn, master), repeats=1)
        return {"other_ckpt": other, "gradient_iter_other_ckpt_s": seconds, "peak_gib_other_ckpt": _peak_gib()}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"other_ckpt": other, "peak_gib_other_ckpt": "OOM"}


def _schedule_counts(config) -> Tuple[int, int]:
    """(gradient iterations, reuse iterations) over all guided steps of ``config``."""
    gradients = config.gradient_iterations
    return gradients, config.guided_steps * config.inner_iters - gradients


def carried_row(measured: Dict[str, object], name: str) -> Dict[str, object]:
    """A measured fastvmt row re-composed for k = 5 carried across steps (the testbed's reuse setting): same phase
    times, the schedule's gradient / reuse iteration counts."""
    config = _config("fastvmt", **CARRIED_SETTINGS)
    row = {k: v for k, v in measured.items() if "other_ckpt" not in k}
    row["variant"] = name
    row["gradient_passes"], row["reuse_iters"] = _schedule_counts(config)
    compose_totals(row)
    return row


def compose_totals(row: Dict[str, object]) -> None:
    """Add per-video guidance and total seconds to ``row`` from the schedule in the module docstring."""
    if "error" in row:
        return
    denoise = NUM_STEPS * row["denoise_step_s"] + SHARED["vae_decode_s"]
    guidance = 0.0
    if row["variant"] != "plain":
        guidance = (
            SHARED["vae_encode_s"]
            + row["reference_passes"] * row["reference_pass_s"]
            + row["gradient_passes"] * row["gradient_iter_s"]
            + row["reuse_iters"] * row["reuse_iter_s"]
        )
    row["guidance_s_per_video"] = guidance
    row["total_s_per_video"] = guidance + denoise


@pytest.mark.parametrize("variant", VARIANTS)
def test_phase_times(bench, variant):
    try:
        row = _measure(bench, variant)
    except Exception as exc:  # record the failure in the results file, then fail the test
        RESULTS[variant] = {"variant": variant, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
        raise
    compose_totals(row)
    RESULTS[variant] = row
    write_results()  # rewritten after every variant: a stage timeout keeps what was measured
    assert "error" in row or row["denoise_step_s"] > 0


def test_write_results():
    if not RESULTS:
        pytest.skip("no variant ran")
    assert write_results()[0].exists()


E2E_STEPS, E2E_GUIDED = (2, 1) if DRY else (15, 3)
E2E_FAST = f"fastvmt(k={CARRIED_REUSE_INTERVAL} carried)+local(all)"


def test_end_to_end_short_schedule(bench):
    """Whole ``pipe(...)`` calls side by side on a shorter schedule (E2E_STEPS steps, E2E_GUIDED guided): plain,
    fastvmt, and fastvmt with k = 5 carried + local attention everywhere (when its phase row ran); the measured wall
    time against the total composed from this run's phase rows for that schedule, which checks the per-video
    composition above. -> results/pipeline_end_to_end."""
    from fastvmt import apply_local_attention

    if "fastvmt" not in RESULTS or "error" in RESULTS["fastvmt"] or "plain" not in RESULTS:
        pytest.skip("needs the plain and fastvmt phase rows of this run")
    pipe, embeds = bench["pipe"], bench["embeds"]
    video = (bench["reference_video"] + 1) / 2  # (1, 3, F, H, W) in [-1, 1] -> (F, 3, H, W) in [0, 1]
    video = video[0].permute(1, 0, 2, 3).float().clamp(0, 1)
    config = _config("fastvmt", guided_steps=E2E_GUIDED)
    fast_config = _config("fastvmt", guided_steps=E2E_GUIDED, **CARRIED_SETTINGS)
    common = dict(
        prompt_embeds=embeds["pos"], negative_prompt_embeds=embeds["neg"], height=HEIGHT, width=WIDTH,
        num_frames=FRAMES, num_inference_steps=E2E_STEPS, output_type="pt",
    )
    guided = dict(reference_video=video, reference_prompt_embeds=embeds["ref"])
    # (variant, phase row it is composed from, motion config, local attention phases)
    runs = [("plain", "plain", None, None), ("fastvmt", "fastvmt", config, None)]
    if "error" not in RESULTS.get("fastvmt+local(all)", {"error": "not run"}):
        runs.append((E2E_FAST, "fastvmt+local(all)", fast_config, "both"))
    rows = []
    transformer = pipe.transformer
    original = dict(transformer.attn_processors)
    for variant, source, motion_config, local_phases in runs:
        extra = {} if motion_config is None else dict(guided, motion_config=motion_config)
        if local_phases is not None:
            apply_local_attention(transformer, phases=local_phases, **LOCAL)
        try:
            _reset_peak()
            generator = torch.Generator(device=DEVICE).manual_seed(0)
            seconds = timed(lambda: pipe(generator=generator, **common, **extra), repeats=1, warmup=0)
        finally:
            transformer.set_attn_processor(dict(original))  # diffusers pops the entries of the dict it is given
        phase = RESULTS[source]
        composed = E2E_STEPS * phase["denoise_step_s"] + SHARED["vae_decode_s"]
        if motion_config is not None:
            gradients = motion_config.gradient_iterations
            composed += (SHARED["vae_encode_s"] + E2E_GUIDED * phase["reference_pass_s"]
                         + gradients * phase["gradient_iter_s"]
                         + (E2E_GUIDED * motion_config.inner_iters - gradients) * phase["reuse_iter_s"])
        rows.append({"variant": variant, "steps": E2E_STEPS, "guided_steps": E2E_GUIDED if extra else 0,
                     "gradient_passes": motion_config.gradient_iterations if motion_config else 0,
                     "measured_s": seconds, "composed_s": composed, "measured_over_composed": seconds / composed,
                     "peak_gib": _peak_gib()})
        _write_end_to_end(rows)  # after every run: a stage timeout keeps the runs that finished
    _write_end_to_end(rows + [
        {"variant": f"{row['variant']} / plain", "measured_s": row["measured_s"] / rows[0]["measured_s"],
         "composed_s": row["composed_s"] / rows[0]["composed_s"]}
        for row in rows[1:]
    ])
    assert all(r["measured_s"] > 0 for r in rows)


def _write_end_to_end(rows) -> None:
    """results/pipeline_end_to_end with ``rows``."""
    notes = [
        f"video {HEIGHT}x{WIDTH}x{FRAMES}, same components and prompt embeddings as results/pipeline (this run)",
        "measured_s: one whole pipe(...) call each (no warm-up; kernels already compiled by the phase tests), "
        "output_type='pt' (VAE decode included, no video file); the reference video is random frames",
        "composed_s: E2E_STEPS * denoise_step_s + vae_decode_s (+ for fastvmt: vae_encode_s + guided * "
        "reference_pass_s + gradient iterations * gradient_iter_s + reuse iterations * reuse_iter_s) from this "
        "run's phase rows; the last row gives fastvmt / plain for both",
        "gradient_checkpointing='auto', as the phase rows; "
        f"{E2E_FAST}: reuse_interval={CARRIED_REUSE_INTERVAL}, carry_gradient_across_steps=True, "
        "fastvmt.apply_local_attention(phases='both') with its defaults, composed from the fastvmt+local(all) row",
        "the '/ plain' rows divide each run by the plain run (measured by measured, composed by composed)",
    ]
    write_table("pipeline_end_to_end", "Motion-transfer pipeline end to end (short schedule) vs composed",
                rows, ["variant", "steps", "guided_steps", "gradient_passes", "measured_s", "composed_s",
                       "measured_over_composed", "peak_gib"], notes)


def write_results():
    """Write the rows measured so far (plus the composed carried rows) to results/pipeline.*; returns the paths."""
    for source, name in CARRIED_ROWS.items():
        if source in RESULTS and "error" not in RESULTS[source]:
            RESULTS[name] = carried_row(RESULTS[source], name)
    plain = RESULTS.get("plain", {}).get("total_s_per_video")
    # Speedups against the faster DiTFlow row: our fp32 reference for its head handling may be slower than its code.
    ditflow_rows = [RESULTS.get(v, {}).get("guidance_s_per_video") for v in DITFLOW_VARIANTS]
    ditflow = min((t for t in ditflow_rows if t), default=None)
    for row in RESULTS.values():
        if plain and row.get("total_s_per_video"):
            row["x_plain"] = row["total_s_per_video"] / plain
        if ditflow and row.get("guidance_s_per_video"):
            row["guidance_speedup_vs_ditflow"] = ditflow / row["guidance_s_per_video"]
    columns = [
        "variant", "reference_pass_s", "gradient_iter_s", "reuse_iter_s", "denoise_step_s", "guidance_s_per_video",
        "total_s_per_video", "x_plain", "guidance_speedup_vs_ditflow", "peak_gib", "checkpointing", "other_ckpt",
        "gradient_iter_other_ckpt_s", "peak_gib_other_ckpt", "error",
    ]
    notes = [
        f"video {HEIGHT}x{WIDTH}x{FRAMES}, {'tiny random components (dry run)' if DRY else 'Wan2.1-1.3B transformer + Wan VAE, random weights'}, "
        f"{str(DTYPE).replace('torch.', '')}, random prompt embeddings (1, {TEXT_TOKENS}, {TRANSFORMER['text_dim']}), motion block {MOTION_BLOCK}",
        f"VAE encode {SHARED.get('vae_encode_s', float('nan')):.3g} s, decode {SHARED.get('vae_decode_s', float('nan')):.3g} s "
        f"(once per video, one call each after an untimed {VAE_WARMUP_FRAMES}-frame warm-up), VAE peak {SHARED.get('vae_peak_gib')} GiB",
        f"per-video totals composed from the schedule: N={NUM_STEPS} denoising steps with CFG, G={GUIDED_STEPS} guided steps; "
        "ditflow rows: 1 reference pass (fixed clean reference) + G*5 gradient iterations; fastvmt: G reference passes + "
        "G*(4 gradient + 6 reuse iterations); guidance_s includes the VAE encode, totals include the decode, "
        "text encoding excluded",
        f"rows 'k={CARRIED_REUSE_INTERVAL} carried ... composed': the named measured row's phase times composed for "
        f"reuse_interval={CARRIED_REUSE_INTERVAL} with carry_gradient_across_steps=True (G + 1 gradient iterations; "
        "the testbed recipe's reuse setting, benchmarks/results/testbed_sweep.md); not separate measurements",
        "guidance passes use gradient_checkpointing='auto' (column checkpointing: what it picked, from the estimate "
        "against 80% of the free memory, fastvmt.pipeline.ACTIVATION_ELEMENTS_PER_CHANNEL); *_other_ckpt: one "
        "gradient computation (no AdamW step) with the other setting (other_ckpt); times are medians after one "
        "warm-up",
        f"ditflow: DiTFlow's head handling (head_reduce='mean_logits': per-head logits averaged, its AMF on the fp32 "
        f"torch reference over the heads' concatenated channels); {DITFLOW_MEAN_QK}: Q and K averaged over heads, "
        "its AMF on the Triton kernels, its denoising step copied from the ditflow row (the same stock call); "
        "guidance_speedup_vs_ditflow divides by the faster of the two rows",
    ]
    if COMPILED in RESULTS:
        notes.append(
            f"{COMPILED}: the fastvmt row's phases with the transformer blocks compiled (compile_repeated_blocks("
            f"fullgraph=True), backend {COMPILE_BACKEND}); its denoising step is compiled plain generation's; "
            "x_plain is against the eager plain row"
        )
    return write_table("pipeline", "Motion-transfer pipeline phases (Wan2.1-1.3B size)", list(RESULTS.values()), columns, notes)
