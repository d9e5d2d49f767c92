"""``fastvmt transfer``: a video for a prompt (or an animated image) moving like a reference video (Wan + FastVMT)."""
from __future__ import annotations

import argparse
import sys
import time

RECIPE_CHOICES = ("fastvmt", "ditflow")
LOCAL_ATTENTION_CHOICES = ("none", "guidance", "denoise", "both")
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
INIT_CHOICES = ("noise", "reference")
WINDOW_SOURCE_CHOICES = ("own", "reference")
OFFLOAD_CHOICES = ("none", "model")
# --compile: keyword arguments of each transformer's compile_repeated_blocks (torch.compile's, default backend).
COMPILE_OPTIONS = {"fullgraph": True}


def _int_triple(text: str):
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated ints such as 1,8,8, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated ints such as 1,8,8, got {text!r}")
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"every entry must be >= 1, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``transfer`` options."""
    parser.add_argument(
        "--model", required=True, help="diffusers Wan2.1 folder or hub id (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)"
    )
    parser.add_argument("--reference", required=True, help="reference video: mp4 / gif / folder of frames")
    parser.add_argument("--prompt", required=True, help="text prompt of the generated video")
    parser.add_argument(
        "--image", default=None,
        help="image to animate (Wan image-to-video models, e.g. Wan-AI/Wan2.1-I2V-14B-480P-Diffusers); resized to "
             "--height x --width",
    )
    parser.add_argument(
        "--last-image", default=None,
        help="with --image, on a first-last-frame model (e.g. Wan2.1 FLF2V): the image the video ends on",
    )
    parser.add_argument("--out", required=True, help="output video path (.mp4 or .gif); written only on success")
    parser.add_argument(
        "--height", type=int, default=480, help="multiple of 16; 32 for Wan2.2 TI2V-5B (default 480)"
    )
    parser.add_argument(
        "--width", type=int, default=832, help="multiple of 16; 32 for Wan2.2 TI2V-5B (default 832)"
    )
    parser.add_argument(
        "--num-frames", type=int, default=81,
        help="4k+1 frames (default 81), sampled uniformly from the reference unless --reference-stride is given",
    )
    parser.add_argument("--reference-start", type=int, default=0, help="first reference frame to use (default 0)")
    parser.add_argument(
        "--reference-stride", type=int, default=None,
        help="take every N-th reference frame from --reference-start, keeping the clip's speed (e.g. 2 for a 30 fps "
             "clip at --fps 16); default: --num-frames frames spread uniformly over the rest of the clip",
    )
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--recipe", choices=RECIPE_CHOICES, default="fastvmt", help="guidance recipe (default fastvmt)")
    parser.add_argument("--guided-steps", type=int, default=None, help="guided denoising steps (default 10)")
    parser.add_argument("--motion-block", type=int, default=None, help="transformer block giving Q/K (default 14)")
    parser.add_argument("--reuse-interval", type=int, default=None,
                        help="fastvmt: run the model every N-th inner iteration, reuse the gradient otherwise (default 3)")
    parser.add_argument("--carry-gradient", action="store_true",
                        help="fastvmt: also reuse the cached gradient at the first iteration of the next guided step")
    parser.add_argument("--window-source", choices=WINDOW_SOURCE_CHOICES, default=None,
                        help="fastvmt: AMF windows of the generated video: its own coarse pass (default) or the "
                             "reference's")
    parser.add_argument(
        "--init", choices=INIT_CHOICES, default="noise", help="start from noise or the noised reference (strength 0.75)"
    )
    parser.add_argument(
        "--local-attention", choices=LOCAL_ATTENTION_CHOICES, default="none",
        help="replace self-attention with local attention in these passes (default none)",
    )
    parser.add_argument("--local-tile", type=_int_triple, default=None, help="local attention tile t,h,w in tokens")
    parser.add_argument("--local-window", type=_int_triple, default=None, help="local attention window t,h,w in tiles")
    parser.add_argument(
        "--set", dest="config_overrides", action="append", default=[], metavar="FIELD=VALUE",
        help="any other MotionTransferConfig field, e.g. --set reference_noise=0.1 --set head_reduce=mean_flow "
             "--set inner_iters=5 --set tile=2,2 (values are Python literals or plain words; repeatable; applied "
             "after the flags above)",
    )
    parser.add_argument(
        "--offload", choices=OFFLOAD_CHOICES, default="none",
        help="model: keep each model (text encoder, transformer(s), VAE) on the CPU until it runs (diffusers' "
             "enable_model_cpu_offload), e.g. for Wan2.2 A14B's two 14B experts on one 80 GB GPU (default none)",
    )
    parser.add_argument(
        "--compile", action="store_true",
        help="compile the transformer blocks with torch.compile (diffusers' compile_repeated_blocks, fullgraph); "
             "the first passes of each kind (reference, gradient, denoising) compile, later ones reuse the code",
    )
    parser.add_argument("--negative-prompt", default=None, help="negative prompt for classifier-free guidance")
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    parser.add_argument(
        "--guidance-scale-2", type=float, default=None,
        help="CFG scale of the low-noise expert of a two-expert model (Wan2.2 A14B; default: --guidance-scale)",
    )
    parser.add_argument(
        "--max-sequence-length", type=int, default=None,
        help="text tokens (default: the model's, min(512, tokenizer.model_max_length))",
    )
    parser.add_argument("--fps", type=int, default=16, help="output frame rate (default 16)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="weights dtype (auto: bf16 on cuda, fp32 on cpu)"
    )


def _resolve_device_dtype(args):
    """(torch.device, weights dtype); a ValueError for a device string torch does not parse or one that is absent."""
    import torch

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise ValueError(f"--device {args.device!r} is not a torch device (e.g. cuda, cuda:1, cpu): {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} needs CUDA, which this torch build or machine does not have")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = names.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def _check_output(out: str) -> None:
    """--out's folder must be a writable folder, or creatable in one (checked before anything loads)."""
    import os
    from pathlib import Path

    folder = Path(out).absolute().parent
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out!r}: the folder {str(existing)!r} is not writable")


def _build_config(args):
    from fastvmt.config import MotionTransferConfig

    overrides = {"recipe": args.recipe, "init_latent": args.init}
    if args.guided_steps is not None:
        overrides["guided_steps"] = args.guided_steps
    if args.motion_block is not None:
        overrides["motion_block"] = args.motion_block
    if args.reuse_interval is not None:
        overrides["reuse_interval"] = args.reuse_interval
    if args.carry_gradient:
        overrides["carry_gradient_across_steps"] = True
    if args.window_source is not None:
        overrides["window_source"] = args.window_source
    overrides.update(_parse_config_overrides(args.config_overrides))
    return MotionTransferConfig(**overrides)


def _parse_config_overrides(items) -> dict:
    """``["field=value", ...]`` -> {field: value}: each value a Python literal (0.1, 5, True, (2, 2), 2,2) or, if it
    is none, the word itself ("mean_flow", "current_t"). Unknown fields raise ValueError naming the known ones."""
    import ast
    import dataclasses

    from fastvmt.config import MotionTransferConfig

    known = sorted(f.name for f in dataclasses.fields(MotionTransferConfig))
    overrides = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--set takes FIELD=VALUE, got {item!r}")
        if name not in known:
            raise ValueError(f"--set: MotionTransferConfig has no field {name!r}; fields: {', '.join(known)}")
        try:
            overrides[name] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            overrides[name] = text.strip()
    return overrides


def run(args: argparse.Namespace) -> int:
    """Validate everything cheap first (config, output path, reference), then load, generate and write atomically."""
    from pathlib import Path

    from fastvmt.video_io import WRITE_SUFFIXES, prepare_reference, write_video

    try:
        if Path(args.out).suffix.lower() not in WRITE_SUFFIXES:
            raise ValueError(f"--out must end with one of {WRITE_SUFFIXES}, got {args.out!r}")
        _check_output(args.out)
        config = _build_config(args)
        for name in ("height", "width", "num_frames", "steps", "fps"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.local_attention == "none" and (args.local_tile or args.local_window):
            raise ValueError("--local-tile / --local-window set the local attention of --local-attention "
                             f"{'|'.join(LOCAL_ATTENTION_CHOICES[1:])}, which is not given (default none)")
        device, dtype = _resolve_device_dtype(args)
        reference = prepare_reference(args.reference, args.num_frames, args.height, args.width,
                                      args.reference_start, args.reference_stride)
        image = last_image = None
        if args.last_image is not None and args.image is None:
            raise ValueError("--last-image needs --image (the first frame)")
        if args.image is not None:
            from fastvmt.image_to_video import load_image

            image = load_image(args.image)
            last_image = None if args.last_image is None else load_image(args.last_image)
    except ValueError as exc:
        print(f"fastvmt transfer: error: {exc}", file=sys.stderr)
        return 2

    import torch

    from fastvmt.image_to_video import FastVMTImageToVideoPipeline
    from fastvmt.pipeline import FastVMTPipeline
    from fastvmt.processors import DEFAULT_LOCAL_TILE, DEFAULT_LOCAL_WINDOW, apply_local_attention

    start = time.perf_counter()
    pipeline_class = FastVMTPipeline if image is None else FastVMTImageToVideoPipeline
    try:
        pipe = pipeline_class.from_pretrained(args.model, dtype=dtype)  # diffusers 0.42 name (torch_dtype deprecated)
    except ValueError as exc:  # e.g. a text-to-video model given --image, or an image-to-video one without it
        print(f"fastvmt transfer: error: {exc}", file=sys.stderr)
        return 2
    if pipe.vae is not None:
        pipe.vae.to(torch.float32)  # the Wan VAE is numerically fragile in half precision
    if args.offload == "model":
        pipe.enable_model_cpu_offload(device=device)  # each model moves to `device` when it runs
    else:
        pipe.to(device)
    if args.local_attention != "none":
        for transformer in pipe.experts():  # both experts of a Wan2.2 A14B model
            apply_local_attention(
                transformer,
                tile=args.local_tile or DEFAULT_LOCAL_TILE,
                window=args.local_window or DEFAULT_LOCAL_WINDOW,
                phases=args.local_attention,
            )
    if args.compile:
        for transformer in pipe.experts():
            transformer.compile_repeated_blocks(**COMPILE_OPTIONS)
    image_args = () if image is None else (image,)
    image_kwargs = {} if last_image is None else {"last_image": last_image}
    try:
        frames = pipe(
            *image_args,
            **image_kwargs,
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            reference_video=reference,
            motion_config=config,
            height=args.height,
            width=args.width,
            num_frames=args.num_frames,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            guidance_scale_2=args.guidance_scale_2,
            max_sequence_length=args.max_sequence_length,
            generator=torch.Generator("cpu").manual_seed(args.seed),
            output_type="np",
        ).frames[0]
    except ValueError as exc:
        print(f"fastvmt transfer: error: {exc}", file=sys.stderr)
        return 2
    try:
        path = write_video(frames, args.out, fps=args.fps)
    except (OSError, ValueError) as exc:  # e.g. the disk filled up, or the folder went away meanwhile
        print(f"fastvmt transfer: error: the video was generated but could not be written: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(f"wrote {path} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}) in {seconds:.1f} s")
    return 0
