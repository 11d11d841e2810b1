"""Tests of harness/config.py: the flags over a config dataclass, and the config checks that
name the flag, on the toy run of tests/helpers.py."""
import pytest

from harness.config import parse_config, steps_for
from harness.errors import UserError
from tests.helpers import ToyConfig, run


def test_flags_presets_and_bools_parse_and_explicit_flags_win():
    presets = {"a": {"lr": 0.5, "r": 2}}
    cfg = parse_config(ToyConfig, ["--lr=0.25", "--method", "srlora", "--plots", "--name=a"], presets, "name")
    assert (cfg.lr, cfg.r, cfg.method, cfg.plots) == (0.25, 2, "srlora", True)
    assert parse_config(ToyConfig, ["--plots=false"]).plots is False


@pytest.mark.parametrize("argv, match", [(["--nope=1"], "unknown flag --nope"), (["--lr=fast"], "--lr=fast"),
                                         (["lr"], "unexpected argument"), (["--r"], "--r needs a value")])
def test_bad_flags_raise_one_line_user_errors(argv, match):
    with pytest.raises(UserError, match=match):
        parse_config(ToyConfig, argv)


def test_steps_for_counts_epochs_and_caps_at_max_steps():
    assert steps_for(2, 100, 16) == 14 and steps_for(2, 100, 16, max_steps=5) == 5


def test_config_errors_name_the_flag(tmp_path):
    for overrides, match in ((dict(method="dora"), "unknown method"), (dict(r_target=2), "r_target=2"),
                             (dict(gamma=0.0), "gamma"), (dict(targets="nothing"), "match no nn.Linear"),
                             (dict(r=40), "r=40"), (dict(batch_size=10, grad_accum=4), "divisible"),
                             (dict(score="size"), "score"), (dict(grace=2), "grace=2"),
                             (dict(switch_stop=0.0), "switch_stop"), (dict(switch_schedule="often"), "switch_schedule"),
                             (dict(residual_dtype="int8"), "--residual_dtype='int8'")):
        with pytest.raises(UserError, match=match):
            run(tmp_path, **overrides)
    assert not any(tmp_path.iterdir())                     # nothing was written
