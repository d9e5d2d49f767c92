"""MotionTransferConfig: recipe defaults, schedules, gradient-reuse pattern, validation errors."""
import pytest

from fastvmt.config import MotionTransferConfig


def test_fastvmt_defaults_are_the_fixed_recipe():
    cfg = MotionTransferConfig()
    assert (cfg.recipe, cfg.motion_block, cfg.guided_steps, cfg.inner_iters) == ("fastvmt", 14, 10, 10)
    assert (cfg.lr_start, cfg.lr_end, cfg.lr_schedule, cfg.weight_decay) == (0.003, 0.0021, "within_step", 0.01)
    assert (cfg.reuse_interval, cfg.span, cfg.tile, cfg.window, cfg.temperature) == (3, 4, (3, 4), 21, 1.0)
    assert (cfg.head_reduce, cfg.amf_weight, cfg.window_weight) == ("mean_qk", 5.0, 1.0)
    assert cfg.reference_noise == "current_t" and not cfg.reference_is_fixed
    assert cfg.carry_gradient_across_steps is False and cfg.init_latent == "noise"
    assert cfg.gradient_checkpointing == "auto"


def test_ditflow_preset_and_overrides():
    cfg = MotionTransferConfig(recipe="ditflow")
    assert (cfg.inner_iters, cfg.lr_start, cfg.lr_end, cfg.lr_schedule) == (5, 0.002, 0.001, "across_steps")
    assert (cfg.weight_decay, cfg.reuse_interval, cfg.temperature, cfg.reference_noise) == (0.0, 1, 2.0, 0.0)
    assert cfg.reference_is_fixed
    assert cfg.head_reduce == "mean_logits"  # DiTFlow averages the per-head logits
    assert MotionTransferConfig(recipe="ditflow", inner_iters=7).inner_iters == 7
    assert MotionTransferConfig(recipe="ditflow", head_reduce="mean_qk").head_reduce == "mean_qk"


def test_head_reductions_are_the_kernels():
    from fastvmt.config import HEAD_REDUCTIONS
    from fastvmt_kernels.motion_flow import HEAD_REDUCTIONS as KERNEL_HEAD_REDUCTIONS

    assert HEAD_REDUCTIONS == KERNEL_HEAD_REDUCTIONS
    assert MotionTransferConfig(head_reduce="mean_logits").head_reduce == "mean_logits"


def test_within_step_lr_matches_official_schedule():
    cfg = MotionTransferConfig()
    lrs = [cfg.learning_rate(guided_index=3, iteration=j) for j in range(10)]
    expected = [0.003 - 0.001 * j / 10 for j in range(10)]  # official code: 0.003 -> 0.0021
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_across_steps_lr_is_constant_inside_a_step():
    cfg = MotionTransferConfig(recipe="ditflow", guided_steps=5)
    per_step = [cfg.learning_rate(g, 0) for g in range(5)]
    assert per_step == pytest.approx([0.002, 0.00175, 0.0015, 0.00125, 0.001])
    assert cfg.learning_rate(2, 0) == cfg.learning_rate(2, 4)


def test_gradient_reuse_pattern():
    cfg = MotionTransferConfig()
    assert [j for j in range(10) if cfg.computes_gradient(j, has_cached_gradient=True)] == [0, 3, 6, 9]
    carry = MotionTransferConfig(carry_gradient_across_steps=True)
    assert [j for j in range(10) if carry.computes_gradient(j, has_cached_gradient=True)] == [3, 6, 9]
    assert carry.computes_gradient(0, has_cached_gradient=False)
    no_reuse = MotionTransferConfig(reuse_interval=1)
    assert all(no_reuse.computes_gradient(j, True) for j in range(10))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(recipe="motionclone"), "recipe must be one of"),
        (dict(motion_block=-1), "motion_block must be an int >= 0"),
        (dict(motion_block=1.5), "motion_block must be an int"),
        (dict(guided_steps=True), "guided_steps must be an int"),
        (dict(inner_iters=0), "inner_iters must be an int >= 1"),
        (dict(reuse_interval=0), "reuse_interval must be an int >= 1"),
        (dict(lr_start=-0.1), "lr_start must be a finite number >= 0"),
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(temperature=float("inf")), "temperature must be a finite number > 0"),
        (dict(lr_start=float("inf")), "lr_start must be a finite number >= 0"),
        (dict(eps=float("inf")), "eps must be a finite number > 0"),
        (dict(weight_decay=float("inf")), "weight_decay must be a finite number >= 0"),
        (dict(amf_weight=float("inf")), "amf_weight must be a finite number >= 0"),
        (dict(span=0), "span must be an int >= 1"),
        (dict(tile=(3,)), "tile must be two ints"),
        (dict(tile=(3, 0)), "tile must be two ints"),
        (dict(window=0), "window must be an int >= 1"),
        (dict(head_reduce="max"), "head_reduce must be one of"),
        (dict(recipe="ditflow", head_reduce="mean_flow"), "the ditflow recipe takes head_reduce in"),
        (dict(window_source="target"), "window_source must be one of"),
        (dict(lr_schedule="cosine"), "lr_schedule must be one of"),
        (dict(init_latent="image"), "init_latent must be one of"),
        (dict(init_strength=0.0), r"init_strength must be in \(0, 1\]"),
        (dict(reference_noise=1.0), "reference_noise must be"),
        (dict(reference_noise="t0"), "reference_noise must be"),
        (dict(betas=(0.9, 1.0)), "betas must be two numbers"),
        (dict(amf_weight=0.0, window_weight=0.0), "both 0"),
        (dict(amf_weight=0.0, span=2), "needs span >= 3"),
        (dict(kernel_backend="cuda"), "kernel_backend must be one of"),
        (dict(gradient_checkpointing="yes"), "gradient_checkpointing must be a bool or 'auto'"),
    ],
)
def test_invalid_fields_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MotionTransferConfig(**kwargs)


def test_replace_validates():
    cfg = MotionTransferConfig().replace(guided_steps=3)
    assert cfg.guided_steps == 3
    with pytest.raises(ValueError, match="span"):
        cfg.replace(span=0)


def test_gradient_iterations_count_the_schedule():
    assert MotionTransferConfig().gradient_iterations == 40  # 10 steps x iterations 0, 3, 6, 9
    carried = MotionTransferConfig(reuse_interval=5, carry_gradient_across_steps=True)
    assert carried.gradient_iterations == 2 + 9  # iterations 0 and 5, then only 5 (0 reuses the carried gradient)
    assert MotionTransferConfig(recipe="ditflow").gradient_iterations == 50
    assert MotionTransferConfig(guided_steps=0).gradient_iterations == 0


def test_replacing_the_recipe_switches_its_presets_but_keeps_explicit_values():
    assert MotionTransferConfig().replace(recipe="ditflow") == MotionTransferConfig(recipe="ditflow")
    assert MotionTransferConfig(recipe="ditflow").replace(recipe="fastvmt") == MotionTransferConfig()
    tuned = MotionTransferConfig(inner_iters=7, temperature=3.0).replace(recipe="ditflow", lr_start=0.01)
    assert (tuned.inner_iters, tuned.temperature, tuned.lr_start) == (7, 3.0, 0.01)  # explicit values stay
    assert (tuned.lr_end, tuned.reuse_interval, tuned.lr_schedule) == (0.001, 1, "across_steps")  # presets switch
    assert tuned.head_reduce == "mean_logits"
    # A head handling the ditflow recipe refuses (per-head flows, e.g. the testbed's FastVMT) switches to its preset.
    assert MotionTransferConfig(head_reduce="mean_flow").replace(recipe="ditflow").head_reduce == "mean_logits"
    with pytest.raises(ValueError, match="the ditflow recipe takes head_reduce"):
        MotionTransferConfig(head_reduce="mean_flow").replace(recipe="ditflow", head_reduce="mean_flow")
    assert MotionTransferConfig(recipe="ditflow").replace(recipe="fastvmt").head_reduce == "mean_qk"


def test_ditflow_ignores_the_fastvmt_loss_weights():
    config = MotionTransferConfig(recipe="ditflow", amf_weight=0.0, window_weight=0.0)  # refused before
    assert config.recipe == "ditflow"
