"""``fastvmt transfer`` end to end on a tiny random Wan2.1 pipeline folder (with the Wan VAE), CPU."""
import types

import numpy as np
import pytest
import torch
from _wan_tiny import moving_square_video, single_thread, tiny_pipeline_dir, two_expert_components

import fastvmt.processors
from fastvmt.cli import build_parser, main
from fastvmt.pipeline import FastVMTPipeline
from fastvmt.video_io import load_video, write_video



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_pipeline_dir(tmp_path_factory.mktemp("wan_tiny"), vae=True)


@pytest.fixture(scope="module")
def reference_path(tmp_path_factory):
    frames = moving_square_video(11, 48, 64).permute(0, 2, 3, 1).numpy()
    return str(write_video(frames, tmp_path_factory.mktemp("ref") / "reference.mp4", fps=8))


def _args(model_dir, reference, out, *extra):
    return [
        "transfer", "--model", model_dir, "--reference", reference, "--prompt", "a cat runs", "--out", str(out),
        "--height", "32", "--width", "48", "--num-frames", "9", "--steps", "2", "--guided-steps", "1",
        "--motion-block", "1", "--max-sequence-length", "16", *extra,
    ]


def test_help_lists_transfer():
    help_text = build_parser().format_help()
    assert "transfer" in help_text


@pytest.mark.parametrize("extra", [
    (),
    ("--recipe", "ditflow", "--local-attention", "both", "--local-window", "1,1,1"),
    ("--reuse-interval", "5", "--carry-gradient", "--window-source", "reference", "--reference-start", "1",
     "--reference-stride", "1"),
])
def test_transfer_writes_video_of_requested_size(model_dir, reference_path, tmp_path, capsys, extra):
    out = tmp_path / "out" / "result.mp4"
    assert main(_args(model_dir, reference_path, out, *extra)) == 0
    video = load_video(out)
    assert video.shape == (9, 3, 32, 48)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(reference="missing.mp4"), "does not exist"),
        (dict(reference="corrupt.mp4"), "cannot read video"),
        (dict(flags=("--num-frames", "13")), "has 11 frames but 13 are requested"),
        (dict(flags=("--height", "40")), "multiples of 16"),
        (dict(flags=("--num-frames", "8")), r"4k \+ 1"),
        (dict(flags=("--guided-steps", "-1")), "guided_steps must be an int >= 0"),
        (dict(flags=("--reuse-interval", "0")), "reuse_interval must be an int >= 1"),
        (dict(out="result.avi"), "--out must end with"),
        (dict(flags=("--reference-stride", "2")), "9 frames every 2 from frame 0 need 17"),
        (dict(flags=("--reference-start", "4")), r"has 11 frames \(7 from frame 4\) but 9 are requested"),
        (dict(flags=("--set", "inner_itres=5")), "no field 'inner_itres'; fields: .*inner_iters"),
        (dict(flags=("--set", "inner_iters")), "--set takes FIELD=VALUE"),
        (dict(flags=("--set", "head_reduce=mean_kq")), "head_reduce must be one of"),
        (dict(flags=("--fps", "0")), "--fps must be >= 1"),
        (dict(flags=("--local-window", "3,3,3")), "--local-tile / --local-window set the local attention of"),
        (dict(flags=("--device", "bogus")), "--device 'bogus' is not a torch device"),
    ],
)
def test_bad_input_fails_cleanly_without_output(model_dir, reference_path, tmp_path, capsys, change, match):
    (tmp_path / "corrupt.mp4").write_bytes(b"garbage" * 20)
    reference = str(tmp_path / change["reference"]) if "reference" in change else reference_path
    out = tmp_path / change.get("out", "result.mp4")
    code = main(_args(model_dir, reference, out, *change.get("flags", ())))
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err
    import re

    assert re.search(match, err), err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.mp4"]


def test_output_folder_and_device_are_checked_before_loading(model_dir, reference_path, tmp_path, capsys,
                                                            monkeypatch):
    import torch

    from fastvmt.pipeline import FastVMTPipeline

    monkeypatch.setattr(FastVMTPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "afile").write_text("a file where --out wants a folder")
    assert main(_args(model_dir, reference_path, tmp_path / "afile" / "sub" / "result.mp4")) == 2
    assert "'afile' is a file, not a folder" in capsys.readouterr().err.replace(str(tmp_path) + "/", "")
    if not torch.cuda.is_available():
        assert main(_args(model_dir, reference_path, tmp_path / "result.mp4", "--device", "cuda")) == 2
        assert "needs CUDA" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: "every entry must be >= 1"
        main(_args(model_dir, reference_path, tmp_path / "result.mp4", "--local-tile", "0,1,1"))
    assert "every entry must be >= 1" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_guidance_flags_reach_the_config():
    from fastvmt.commands.transfer import _build_config

    parser = build_parser()
    args = parser.parse_args(_args("m", "r.mp4", "o.mp4", "--reuse-interval", "5", "--carry-gradient",
                                   "--window-source", "reference"))
    config = _build_config(args)
    assert (config.reuse_interval, config.carry_gradient_across_steps, config.window_source) == (5, True, "reference")
    default = _build_config(parser.parse_args(_args("m", "r.mp4", "o.mp4")))
    assert (default.reuse_interval, default.carry_gradient_across_steps, default.window_source) == (3, False, "own")
    overridden = _build_config(parser.parse_args(_args(
        "m", "r.mp4", "o.mp4", "--reuse-interval", "5", "--set", "reference_noise=0.1", "--set", "head_reduce=mean_flow",
        "--set", "tile=2,2", "--set", "inner_iters=6", "--set", "reuse_interval=2", "--set", "amf_weight=2.5",
        "--set", "carry_gradient_across_steps=True",
    )))
    assert (overridden.reference_noise, overridden.head_reduce, overridden.tile, overridden.inner_iters) == (
        0.1, "mean_flow", (2, 2), 6
    )
    assert (overridden.reuse_interval, overridden.amf_weight, overridden.carry_gradient_across_steps) == (2, 2.5, True)


def test_two_expert_model_gets_local_attention_on_both_and_guidance_scale_2(reference_path, tmp_path, monkeypatch):
    import fastvmt.processors
    from fastvmt.pipeline import FastVMTPipeline

    model_dir = tmp_path / "a14b_tiny"
    FastVMTPipeline(**two_expert_components(vae=True)).save_pretrained(str(model_dir))
    patched, calls = [], []
    install = fastvmt.processors.apply_local_attention
    monkeypatch.setattr(fastvmt.processors, "apply_local_attention",
                        lambda transformer, **kw: patched.append(transformer) or install(transformer, **kw))
    call = FastVMTPipeline.__call__
    monkeypatch.setattr(FastVMTPipeline, "__call__", lambda self, **kw: calls.append((self, kw)) or call(self, **kw))
    out = tmp_path / "result.mp4"
    flags = ("--local-attention", "both", "--local-window", "1,1,1", "--guidance-scale-2", "3.5")
    assert main(_args(str(model_dir), reference_path, out, *flags)) == 0
    (pipe, kwargs), = calls
    assert [id(t) for t in patched] == [id(pipe.transformer), id(pipe.transformer_2)]
    assert kwargs["guidance_scale_2"] == 3.5
    assert load_video(out).shape == (9, 3, 32, 48)


def test_compile_flag_compiles_every_transformer_block_and_writes_the_video(model_dir, reference_path, tmp_path,
                                                                          monkeypatch):
    import torch
    from diffusers import WanTransformer3DModel

    import fastvmt.commands.transfer as transfer

    # aot_eager: traces forward and backward as inductor would, without minutes of C++ code generation on a CPU.
    monkeypatch.setitem(transfer.COMPILE_OPTIONS, "backend", "aot_eager")
    compiled = []
    original = WanTransformer3DModel.compile_repeated_blocks
    monkeypatch.setattr(WanTransformer3DModel, "compile_repeated_blocks",
                        lambda self, **kw: compiled.append((self, kw)) or original(self, **kw))
    torch._dynamo.reset()
    try:
        out = tmp_path / "result.mp4"
        assert main(_args(model_dir, reference_path, out, "--compile", "--local-attention", "guidance")) == 0
    finally:
        torch._dynamo.reset()
    (transformer, options), = compiled
    assert options == {"fullgraph": True, "backend": "aot_eager"}
    assert all(block._compiled_call_impl is not None for block in transformer.blocks)
    assert load_video(out).shape == (9, 3, 32, 48)


def test_offload_flag_installs_model_offload_instead_of_moving_the_pipeline(model_dir, reference_path, tmp_path,
                                                                          monkeypatch):
    """``--offload model`` runs diffusers' enable_model_cpu_offload on the chosen device (here the CPU, where the
    accelerate hooks move nothing but still wrap every model's forward) and never ``pipe.to``; the video is written."""
    from fastvmt.pipeline import FastVMTPipeline

    calls = []  # ("offload", pipe, kwargs) / ("to", pipe, args), in order
    offload, to = FastVMTPipeline.enable_model_cpu_offload, FastVMTPipeline.to
    monkeypatch.setattr(FastVMTPipeline, "enable_model_cpu_offload",
                        lambda self, **kw: calls.append(("offload", self, kw)) or offload(self, **kw))
    monkeypatch.setattr(FastVMTPipeline, "to", lambda self, *a, **kw: calls.append(("to", self, a)) or to(self, *a, **kw))
    out = tmp_path / "result.mp4"
    assert main(_args(model_dir, reference_path, out, "--offload", "model", "--device", "cpu")) == 0
    # The CLI's first device call is the offload (diffusers re-applies it after the call, and moves the models to
    # the CPU itself inside it); the CLI never moves the pipeline.
    kind, pipe, options = calls[0]
    assert kind == "offload" and str(options["device"]) == "cpu", calls[0]
    assert hasattr(pipe.transformer, "_hf_hook") and hasattr(pipe.vae, "_hf_hook")
    assert load_video(out).shape == (9, 3, 32, 48)


def test_image_flag_animates_the_image_with_an_image_to_video_model(reference_path, tmp_path, capsys):
    from PIL import Image

    from fastvmt import FastVMTImageToVideoPipeline
    from _wan_tiny import i2v_components

    model_dir = tmp_path / "wan_i2v"
    FastVMTImageToVideoPipeline(**i2v_components(image_encoder=True)).save_pretrained(str(model_dir))
    image = tmp_path / "still.png"
    Image.fromarray((moving_square_video(1, 40, 60)[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(image)
    out = tmp_path / "out" / "animated.mp4"
    assert main(_args(str(model_dir), reference_path, out, "--image", str(image))) == 0
    assert load_video(out).shape == (9, 3, 32, 48)
    missing = tmp_path / "out" / "never.mp4"
    assert main(_args(str(model_dir), reference_path, missing, "--image", str(tmp_path / "none.png"))) == 2
    assert "does not exist" in capsys.readouterr().err and not missing.exists()
    assert main(_args(str(model_dir), reference_path, missing, "--last-image", str(image))) == 2
    assert "--last-image needs --image" in capsys.readouterr().err
    assert main(_args(str(model_dir), reference_path, missing, "--image", str(image), "--last-image", str(image))) == 2
    assert "embeds one image; last_image needs a first-last-frame model" in capsys.readouterr().err  # CLIP, not FLF2V
    assert not missing.exists()
    assert main(_args(str(model_dir), reference_path, missing)) == 2  # an image-to-video model without --image
    assert "Load it with fastvmt.FastVMTImageToVideoPipeline (CLI: --image)" in capsys.readouterr().err
    assert not missing.exists()


def test_flags_reach_the_pipeline_call_config_and_local_attention(model_dir, reference_path, tmp_path, monkeypatch):
    """--steps, --seed and --negative-prompt reach the pipeline call, --recipe and --init its motion config, and
    --local-attention / --local-tile / --local-window apply_local_attention (the pipeline call is faked)."""
    installs, calls = [], []
    monkeypatch.setattr(fastvmt.processors, "apply_local_attention", lambda transformer, **kw: installs.append(kw))

    def fake_call(self, **kw):
        calls.append(kw)
        return types.SimpleNamespace(frames=[np.zeros((9, 32, 48, 3), dtype=np.float32)])

    monkeypatch.setattr(FastVMTPipeline, "__call__", fake_call)
    out = tmp_path / "result.mp4"
    flags = ("--steps", "3", "--seed", "7", "--negative-prompt", "blurry", "--recipe", "ditflow", "--init",
             "reference", "--local-attention", "guidance", "--local-tile", "1,2,2", "--local-window", "1,1,3")
    assert main(_args(model_dir, reference_path, out, *flags)) == 0
    (kw,) = calls
    assert kw["num_inference_steps"] == 3
    assert kw["negative_prompt"] == "blurry"
    assert torch.equal(kw["generator"].get_state(), torch.Generator("cpu").manual_seed(7).get_state())
    assert (kw["motion_config"].recipe, kw["motion_config"].init_latent) == ("ditflow", "reference")
    assert installs == [dict(tile=(1, 2, 2), window=(1, 1, 3), phases="guidance")]


def test_steps_below_one_is_refused(model_dir, reference_path, tmp_path, capsys):
    assert main(_args(model_dir, reference_path, tmp_path / "result.mp4", "--steps", "0")) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
