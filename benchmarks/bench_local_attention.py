"""Local attention vs dense SDPA and FlexAttention at Wan2.1 shapes (pytest-benchmark).

GPU run (``python -m pytest benchmarks/bench_local_attention.py``): Wan2.1 latent grid 21 x 30 x 52
(L = 32,760), B = 1, D = 128, bf16, 12 heads (1.3B) and 40 heads (14B).

Tile (3, 10, 4) = 120 tokens: it divides the grid exactly (7 x 3 x 13 tiles, no ragged tile) and fills
94% of a 128-row block (the kernels pad 120 -> 128 query rows and split keys into 64 + 56 rows).
Windows (in tiles) chosen for ~10 / 25 / 50% density (exact density from TileLayout.density()):
(3, 3, 3) -> 0.099, (5, 2, 7) -> 0.256, (5, 3, 9) -> 0.495.

Providers x modes: ours (Triton, tile-order gathering in-kernel: no permutation pass, so nothing extra to
count), FlexAttention (torch.compile'd, block mask from the same rule via an index-arithmetic mask_mod, raster
order, 128 x 128 blocks), dense SDPA with the flash and the cuDNN backends; modes fwd and fwd+bwd.

Reported: median ms (triton.testing.do_bench), effective TFLOP/s = useful FLOPs / time with useful FLOPs =
4*B*H*D*(kept query-key pairs) for fwd (kept pairs = density * L^2; dense: L^2), x3.5 for fwd+bwd (bwd = 2.5x
fwd); bwd-only TFLOP/s derived from (fwd+bwd - fwd); speedup over dense (best SDPA backend, same mode) and its
ratio to the ideal 1/density.

Dry run (FASTVMT_BENCH_DRY=1 or no CUDA): tiny shapes on CPU under the interpreter, one timed call each,
results to $FASTVMT_BENCH_OUT or a temp dir (never benchmarks/results).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F

from fastvmt_kernels import TileLayout, local_attention
from _results import is_dry, write_table

DRY = is_dry()
if DRY:
    GRID, TILE, HEAD_DIM, DTYPE, DEVICE = (2, 4, 8), (1, 4, 4), 32, torch.float32, "cpu"
    MODELS = {"tiny": 2}
    WINDOWS = {"25%": (1, 1, 1), "50%": (2, 1, 1)}
else:
    GRID, TILE, HEAD_DIM, DTYPE, DEVICE = (21, 30, 52), (3, 10, 4), 128, torch.bfloat16, "cuda"
    MODELS = {"wan2.1-1.3b": 12, "wan2.1-14b": 40}
    WINDOWS = {"10%": (3, 3, 3), "25%": (5, 2, 7), "50%": (5, 3, 9)}
SEQ = GRID[0] * GRID[1] * GRID[2]
BATCH = 1
MODES = ("fwd", "fwd+bwd")
BWD_FLOP_FACTOR = 2.5
FLEX_BLOCK = 128 if not DRY else 16
SPARSE_PROVIDERS = ("ours", "flex")
DENSE_PROVIDERS = ("sdpa-flash", "sdpa-cudnn")

# Launch-configuration sweep of our kernels (GPU only; Wan2.1-1.3B, 25% density): "ours@<kernel><M>x<N>w<warps>s<stages>
# [+...]" overrides fastvmt_kernels.local_attention.kernels.kernel_configs for the named kernels. A forward-only
# override runs mode fwd, a backward one fwd+bwd. 128-row blocks hold one whole 120-token tile. Offline (D = 128,
# bf16, stack-aware accounting of python -m fastvmt_kernels.inspect) no configuration stores spills in its hot loop;
# the forward and dq ones spill nothing, and the dk/dv ones reload per step: 64x64w8s2 and 64x64w4s1 none (the
# default 64x64w4s2 reloads 10), 64x128w8s2 2, 64x64w4s3 11. Run 5 (fwd+bwd at 25.6%): default 17.6 ms,
# dq128x64w8s2+dkdv64x64w8s2 24.8, dq64x64w4s3+dkdv64x64w4s3 21.6; now split: dq128x64w8s2 alone (offline: 0.34
# warp-instructions per (query, key) pair against the default dq's 0.40, no spills) and dkdv64x128w8s1 (128 keys per
# program at 8 warps, 1 stage: 0.53 per pair against 0.65, no spills), and dkdv64x64w8s2 alone (the default's blocks
# at 8 warps: 217 registers, no spills, 615 instructions per step against 665; run 5 timed it only paired with
# dq128x64w8s2). fwd64x64w4s3 left the sweep after runs 4 and 5 (4.48 / 4.37 ms against the default's 3.70 / 3.62).
SWEEP = ("ours@fwd16x16w4s1", "ours@dq16x16w4s1+dkdv16x16w4s1") if DRY else (
    "ours@fwd128x64w8s2", "ours@fwd128x128w8s2", "ours@fwd128x64w8s3", "ours@dkdv64x64w8s2",
    "ours@dq128x64w8s2", "ours@dkdv64x64w4s1", "ours@dq64x128w8s2+dkdv64x128w8s2", "ours@dkdv64x128w8s1",
)
SWEEP_MODEL, SWEEP_DENSITY = next(iter(MODELS)), "25%"
FLEX_MODELS = ("tiny",) if DRY else ("wan2.1-1.3b",)  # FlexAttention compiles slowly; its per-head cost is shown once
# FlexAttention's densities: on a GPU only the sparsest (each density compiles for ~10 s; run 5's 90 s stage ran out
# before the 25% and 50% rows; runs 1-4 have all three, benchmarks/results/local_attention_run4.md).
FLEX_DENSITIES = None if DRY else ("10%",)
# Grouped-query attention (provider "ours-gqa"): k, v with heads / GQA_GROUP heads, timed last (new kernel
# specialisations compile; a stage timeout loses only these rows) at one density, against "ours" there.
GQA_GROUP = 2 if DRY else 4
GQA_MODEL, GQA_DENSITY = next(iter(MODELS)), "25%"
# Wan-Animate's self-attention (provider "ours-animate", timed after the GQA rows): the grid's first frame is the
# reference image, global to every token (fastvmt.wan_animate), the window applies to the other frames' grid; timed
# on the 14B's heads (Wan2.2-Animate-14B) against dense attention over the same L tokens.
ANIMATE_MODEL, ANIMATE_DENSITY = list(MODELS)[-1], "25%"
# Block-causal time (provider "ours-causal", timed last): diffusion forcing as SkyReels-V2 runs it
# (fastvmt.skyreels_v2), causal blocks of one time tile (CAUSAL_FRAMES = tile[0]), the window's time extent the own
# tile and those before it; its first and last heads are checked against SDPA with the rule's dense mask.
CAUSAL_MODEL, CAUSAL_DENSITY, CAUSAL_FRAMES = next(iter(MODELS)), "50%" if DRY else "25%", TILE[0]

RESULTS: List[Dict[str, object]] = []


def sweep_configs(provider: str, head_dim: int, elem_bytes: int):
    """kernel_configs(head_dim, elem_bytes) with the overrides named by a SWEEP provider."""
    import re

    from fastvmt_kernels.local_attention import kernels

    configs = dict(kernels.kernel_configs(head_dim, elem_bytes))
    for part in provider.split("@", 1)[1].split("+"):
        kind, m, n, warps, stages = re.fullmatch(r"(fwd|dq|dkdv)(\d+)x(\d+)w(\d+)s(\d+)", part).groups()
        configs[kind] = kernels.BlockConfig(int(m), int(n), int(warps), int(stages))
    return configs


def flex_mask_mod(layout: TileLayout):
    """FlexAttention mask_mod of the local-window rule by index arithmetic (no (L, L) tensor)."""
    grid, tile = layout.grid, layout.tile
    n, w = layout.num_tiles, layout.window_tiles
    half = tuple((x - 1) // 2 for x in layout.window)

    def tile_coords(idx):
        t = idx // (grid[1] * grid[2])
        y = (idx // grid[2]) % grid[1]
        x = idx % grid[2]
        return t // tile[0], y // tile[1], x // tile[2]

    def mask_mod(b, h, q_idx, kv_idx):
        keep = None
        for axis, (cq, ck) in enumerate(zip(tile_coords(q_idx), tile_coords(kv_idx))):
            start = (cq - half[axis]).clamp(0, n[axis] - w[axis])
            inside = (ck >= start) & (ck < start + w[axis])
            keep = inside if keep is None else keep & inside
        return keep

    return mask_mod


def animate_layout(layout: TileLayout) -> TileLayout:
    """The generated frames' layout of ``layout``'s grid when its first frame is Wan-Animate's reference frame."""
    return TileLayout.create((layout.grid[0] - 1, *layout.grid[1:]), layout.tile, layout.window)


def animate_pairs(layout: TileLayout) -> float:
    """Query-key pairs kept by the Wan-Animate rule on ``layout``'s grid: the reference frame's G tokens attend all L
    tokens and are attended by all; the generated tokens attend their local window among themselves."""
    generated = animate_layout(layout)
    reference = layout.grid[1] * layout.grid[2]
    return reference * SEQ + generated.num_tokens * reference + generated.density() * generated.num_tokens**2


def make_attention(provider: str, layout: TileLayout) -> Callable:
    """Attention callable on (B, L, H, D) tensors for ``provider`` (k, v with fewer heads for "ours-gqa")."""
    if provider in ("ours", "ours-gqa", "ours-causal"):
        return lambda q, k, v: local_attention(q, k, v, layout.grid, layout.tile, layout.window, backend="triton",
                                               causal_frames=layout.causal_frames)
    if provider == "ours-animate":
        from fastvmt_kernels import joint_local_attention

        generated, reference = animate_layout(layout), layout.grid[1] * layout.grid[2]
        return lambda q, k, v: joint_local_attention(
            q, k, v, generated.grid, generated.tile, generated.window, num_global=reference,
            global_position="prefix", backend="triton",
        )
    if provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(
            flex_mask_mod(layout), None, None, SEQ, SEQ, device=DEVICE, BLOCK_SIZE=FLEX_BLOCK
        )
        flex = flex_attention if DRY else torch.compile(flex_attention)
        return lambda q, k, v: flex(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask
        ).transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[provider]
    if DRY:
        backend = SDPBackend.MATH

    def dense(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return dense


def time_ms(fn: Callable[[], object]) -> float:
    """Median ms: triton.testing.do_bench on CUDA; one timed call on the dry CPU path."""
    if DRY:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


GPU_CHECK_REL_TOL = 2e-2  # bf16 kernel vs the fp32 chunked reference, relative to the output's largest entry


def assert_end_heads_close(attend, q, k, v, reference, what):
    """The first and the last head of ``attend(q, k, v)`` (the configuration being timed, at the benchmark's full
    shape) against ``reference(q_h, k_h, v_h)`` on those heads of q and of k, v in fp32 (with grouped heads, the first
    and the last query head read the first and the last key / value head), relative to the reference's largest
    entry; raises AssertionError naming ``what``."""
    with torch.no_grad():
        out = attend(q, k, v)
        for head in (0, -1):
            pick = slice(0, 1) if head == 0 else slice(-1, None)
            got = out[:, :, pick].float()
            want = reference(*(t[:, :, pick].float() for t in (q, k, v)))
            rel = ((got - want).abs().max() / want.abs().max()).item()
            assert rel < GPU_CHECK_REL_TOL, f"{what} on head {head}: relative error {rel:.3g}"


def check_first_head_against_reference(attend, q, k, v, layout):
    """Our kernel's first and last heads against the chunked fp32 reference (:func:`assert_end_heads_close`)."""
    from fastvmt_kernels.local_attention.reference import local_attention_reference

    assert_end_heads_close(attend, q, k, v, lambda *qkv: local_attention_reference(*qkv, layout)[0],
                           "ours disagrees with the reference")


def check_against_masked_sdpa(provider, attend, q, k, v, layout):
    """The first and last heads of a rule with its own dense (L, L) mask -- Wan-Animate's (a global reference frame)
    or the block-causal one -- against SDPA with that mask (:func:`assert_end_heads_close`)."""
    from fastvmt_kernels import local_attention_mask

    if provider == "ours-animate":
        generated, reference = animate_layout(layout), layout.grid[1] * layout.grid[2]
        mask = torch.ones(SEQ, SEQ, dtype=torch.bool, device=q.device)
        mask[reference:, reference:] = local_attention_mask(generated.grid, generated.tile, generated.window).to(
            q.device)
    else:
        mask = local_attention_mask(layout.grid, layout.tile, layout.window, q.device,
                                    causal_frames=layout.causal_frames)

    def masked_sdpa(*qkv):
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in qkv), attn_mask=mask).transpose(1, 2)

    assert_end_heads_close(attend, q, k, v, masked_sdpa, f"{provider} disagrees with the masked SDPA")


def cases():
    """Ours first, then dense, then FlexAttention (slow to compile): a stage timeout loses the least."""
    for model in MODELS:
        for density in WINDOWS:
            for mode in MODES:
                yield model, density, "ours", mode
    for model in MODELS:
        for provider in DENSE_PROVIDERS:
            for mode in MODES:
                yield model, "dense", provider, mode
    for provider in SWEEP:
        yield SWEEP_MODEL, SWEEP_DENSITY, provider, "fwd+bwd" if "@d" in provider else "fwd"
    for model in FLEX_MODELS:
        for density in WINDOWS:
            if FLEX_DENSITIES is not None and density not in FLEX_DENSITIES:
                continue
            for mode in MODES:
                yield model, density, "flex", mode
    for mode in MODES:
        yield GQA_MODEL, GQA_DENSITY, "ours-gqa", mode
    for mode in MODES:
        yield ANIMATE_MODEL, ANIMATE_DENSITY, "ours-animate", mode
    for mode in MODES:
        yield CAUSAL_MODEL, CAUSAL_DENSITY, "ours-causal", mode


@pytest.mark.parametrize("case", list(cases()), ids=lambda case: "-".join(case))
def test_local_attention(benchmark, case, monkeypatch):
    model, density, provider, mode = case
    if provider.startswith("ours@"):
        from fastvmt_kernels.local_attention import kernels

        swept = sweep_configs(provider, HEAD_DIM, torch.finfo(DTYPE).bits // 8)
        monkeypatch.setattr(kernels, "kernel_configs", lambda head_dim, elem_bytes, *shared_memory: swept)
    heads = MODELS[model]
    window = WINDOWS.get(density, (99, 99, 99))
    layout = TileLayout.create(GRID, TILE, window, CAUSAL_FRAMES if provider == "ours-causal" else 0)
    if DRY and provider == "flex" and mode != "fwd":
        pytest.skip("FlexAttention has no CPU backward")
    if DRY and provider == "sdpa-cudnn":
        pytest.skip("cuDNN needs CUDA")
    if provider == "sdpa-cudnn" and not torch.backends.cudnn.is_available():
        pytest.skip("cuDNN unavailable")
    attend = make_attention(provider.split("@")[0], layout)
    heads_kv = heads // GQA_GROUP if provider == "ours-gqa" else heads
    q = torch.randn(BATCH, SEQ, heads, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(BATCH, SEQ, heads_kv, HEAD_DIM, device=DEVICE, dtype=DTYPE) for _ in range(2))
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return attend(q, k, v)
    else:
        for t in (q, k, v):
            t.requires_grad_()
        dout = torch.randn_like(q)

        def step():
            out = attend(q, k, v)
            return torch.autograd.grad(out, (q, k, v), dout)

    if DRY and provider.split("@")[0] in ("ours", "ours-gqa", "ours-causal", "flex"):  # the dry run checks the rule
        from fastvmt_kernels.local_attention.reference import local_attention_reference

        with torch.no_grad():
            expected = local_attention_reference(q, k, v, layout)[0]
            assert torch.allclose(attend(q, k, v), expected, atol=1e-4), f"{provider} disagrees with the reference"
    if provider in ("ours-animate", "ours-causal") and mode == "fwd":  # the timed rule: end heads vs masked SDPA
        check_against_masked_sdpa(provider, attend, q, k, v, layout)
    if not DRY and provider in ("ours", "ours-gqa") and mode == "fwd":  # the timed configuration is right
        check_first_head_against_reference(attend, q, k, v, layout)
    step()  # compile / autotune outside the timing
    ms = time_ms(step)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    benchmark.pedantic(lambda: (step(), sync()), rounds=1 if DRY else 3, iterations=1)
    pairs = SEQ * SEQ * (1.0 if density == "dense" else layout.density())
    if provider == "ours-animate":
        pairs = animate_pairs(layout)
    flops = 4 * BATCH * heads * HEAD_DIM * pairs * (1 if mode == "fwd" else 1 + BWD_FLOP_FACTOR)
    RESULTS.append({
        "model": model, "heads": heads, "kv_heads": heads_kv, "density_target": density, "window": "x".join(map(str, window)) if density != "dense" else "-",
        "density": round(pairs / SEQ**2, 4), "provider": provider, "mode": mode, "ms": ms,
        "tflops": flops / ms / 1e9,
    })
    _write(RESULTS)  # rewritten after every case: a stage timeout keeps what was measured


def _derive(rows: List[Dict[str, object]]) -> None:
    """Add speedup over the best dense SDPA, ratio to ideal 1/density, and bwd-only TFLOP/s."""
    for row in rows:
        dense = [r["ms"] for r in rows if r["model"] == row["model"] and r["mode"] == row["mode"]
                 and r["density_target"] == "dense"]
        if dense:
            row["speedup_vs_dense"] = min(dense) / row["ms"]
            row["ideal_speedup"] = 1.0 / row["density"]
            row["fraction_of_ideal"] = row["speedup_vs_dense"] / row["ideal_speedup"]
        if row["mode"] == "fwd+bwd":
            fwd = [r for r in rows if all(r[c] == row[c] for c in ("model", "density_target", "provider"))
                   and r["mode"] == "fwd"]
            if fwd and row["ms"] > fwd[0]["ms"]:
                bwd_ms = row["ms"] - fwd[0]["ms"]
                row["bwd_ms"] = bwd_ms
                flops_fwd = fwd[0]["tflops"] * fwd[0]["ms"]
                row["bwd_tflops"] = BWD_FLOP_FACTOR * flops_fwd / bwd_ms


def _plot(rows: List[Dict[str, object]]):
    def draw(path):
        import matplotlib.pyplot as plt

        models = list(MODELS)
        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
        for ax, model in zip(axes[0], models):
            labels = list(WINDOWS)
            for offset, (provider, mode) in enumerate(
                [(p, m) for p in SPARSE_PROVIDERS for m in MODES]
            ):
                ys = []
                for label in labels:
                    found = [r.get("speedup_vs_dense", 0.0) for r in rows if r["model"] == model
                             and r["density_target"] == label and r["provider"] == provider and r["mode"] == mode]
                    ys.append(found[0] if found else 0.0)
                xs = [i + 0.2 * offset for i in range(len(labels))]
                ax.bar(xs, ys, width=0.2, label=f"{provider} {mode}")
            ideal = [r["ideal_speedup"] for label in labels for r in rows if r["model"] == model
                     and r["density_target"] == label and r["provider"] == "ours" and r["mode"] == "fwd"
                     and "ideal_speedup" in r]
            if len(ideal) == len(labels):
                ax.plot([i + 0.3 for i in range(len(labels))], ideal, "k--o", label="ideal 1/density")
            ax.set_xticks([i + 0.3 for i in range(len(labels))], labels)
            ax.set_xlabel("window density")
            ax.set_ylabel("speedup over dense SDPA")
            ax.set_title(f"{model}: {GRID} grid, D={HEAD_DIM}, {str(DTYPE).split('.')[-1]}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    return draw


def _write(rows: List[Dict[str, object]]) -> None:
    _derive(rows)
    columns = ["model", "heads", "kv_heads", "density_target", "window", "density", "provider", "mode", "ms", "tflops",
               "speedup_vs_dense", "ideal_speedup", "fraction_of_ideal", "bwd_ms", "bwd_tflops"]
    notes = [
        f"shape: B={BATCH}, grid={GRID} (L={SEQ}), D={HEAD_DIM}, {DTYPE}; tile={TILE} for ours and the mask rule",
        "tflops = useful FLOPs / time; useful fwd FLOPs = 4*B*H*D*density*L^2, fwd+bwd = 3.5x that "
        "(bwd = 2.5x fwd); bwd_tflops from (fwd+bwd - fwd) time",
        "speedup_vs_dense = best dense SDPA time (flash or cuDNN, same mode) / this time; "
        "fraction_of_ideal = speedup / (1/density)",
        "ours gathers tokens in tile order inside the kernels: no permutation pass exists to add to its time",
        f"flex: torch.compile(flex_attention), block mask from the same rule, raster order, {FLEX_BLOCK}x{FLEX_BLOCK} blocks",
        "ours@...: launch-configuration sweep (SWEEP in the benchmark file): kernel, rows per query x key block, "
        "warps, pipeline stages overriding the defaults of fastvmt_kernels/local_attention/kernels.py",
        f"ours-gqa: grouped-query attention, k and v with heads / {GQA_GROUP} heads (kv_heads); FLOPs counted per "
        "query head as for ours",
        "ours-animate: Wan-Animate's rule (fastvmt.wan_animate): the grid's first frame is the reference image, "
        "attending and attended by all tokens; the window (in tiles) holds among the other frames; density = its "
        "kept pairs / L^2 (joint_local_attention, the reference frame's part on the kernels too)",
        f"ours-causal: block-causal time (local_attention(causal_frames={CAUSAL_FRAMES}), SkyReels-V2's diffusion "
        "forcing with blocks of one time tile): the time window is the query's tile and the tiles before it; its "
        "density is that rule's",
    ]
    write_table("local_attention", "Local attention vs dense SDPA and FlexAttention", rows, columns, notes, _plot(rows))
