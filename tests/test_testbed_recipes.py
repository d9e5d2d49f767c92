"""The testbed's per-recipe settings and the sweep script's variant parser."""
import sys
from pathlib import Path

import pytest

from fastvmt import MotionTransferConfig
from fastvmt.testbed import recipes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import testbed_sweep  # noqa: E402


def test_each_recipe_gets_its_own_settings():
    steps = 20
    for method, recipe in (("ditflow", "ditflow"), ("fastvmt", "fastvmt"), ("fastvmt_local", "fastvmt")):
        config = recipes.motion_config(method, steps)
        preset = MotionTransferConfig(recipe=recipe)
        settings = dict(recipes.RECIPE_SETTINGS[recipe])
        scale = settings.pop("lr_scale")
        assert config.recipe == recipe and config.motion_block == recipes.MOTION_BLOCK
        assert config.guided_steps == round(recipes.GUIDED_FRACTION * steps)
        assert config.lr_start == pytest.approx(preset.lr_start * scale)
        assert config.lr_end == pytest.approx(preset.lr_end * scale)
        for name, value in settings.items():
            assert getattr(config, name) == value, name
    assert recipes.motion_config("unguided") is None
    no_reuse = recipes.motion_config("fastvmt_no_reuse")
    assert no_reuse.reuse_interval == 1 and not no_reuse.carry_gradient_across_steps
    assert no_reuse.span == recipes.RECIPE_SETTINGS["fastvmt"]["span"]


def test_overrides_and_lr_scale():
    config = recipes.motion_config("fastvmt", 10, window=3, lr_scale=1.0)
    preset = MotionTransferConfig()
    assert config.window == 3 and config.lr_start == pytest.approx(preset.lr_start)
    assert config.guided_steps == 5
    with pytest.raises(ValueError, match="unknown method"):
        recipes.motion_config("dense")
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        recipes.motion_config("fastvmt", window=0)


def test_sweep_variant_parser():
    label, method, overrides = testbed_sweep.parse_variant(
        "w3=fastvmt window=3 tile=(1,1) window_source='reference' guided_fraction=0.75", steps=20)
    assert (label, method) == ("w3", "fastvmt")
    assert overrides == {"window": 3, "tile": (1, 1), "window_source": "reference", "guided_steps": 15}
    assert testbed_sweep.parse_variant("ditflow", 20) == ("ditflow", "ditflow", {})
    with pytest.raises(ValueError, match="not in"):
        testbed_sweep.parse_variant("motionclone window=3", 20)
    with pytest.raises(ValueError, match="expected key=value"):
        testbed_sweep.parse_variant("fastvmt window", 20)
