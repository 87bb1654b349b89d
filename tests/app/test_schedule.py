"""`--update-every` / `--l1-start`: one rule for `l1ra train` and `l1ra compare` (l1ra.app.schedule). A value in (0, 1)
is a fraction of the steps, a whole number >= 1 a step count; anything else is an error naming the flag and the fix
(`l1ra train` used to turn 2.5 into 2 without a word, while `l1ra compare` had its own check)."""

from __future__ import annotations

import math

import pytest

from l1ra.app.cli import main
from l1ra.app.errors import UserError
from l1ra.app.schedule import ScheduleError, steps_or_fraction
from l1ra.app.train.options import TrainOptions
from l1ra.app.train.recipe import l1ra_config


@pytest.mark.parametrize("flag, value, expected", [
    ("--update-every", 0.1, 0.1), ("--update-every", 1, 1), ("--update-every", 3.0, 3), ("--update-every", "4", 4),
    ("--l1-start", 0.25, 0.25), ("--l1-start", 0, 0.0), ("--l1-start", 20.0, 20), ("--update-every", None, None),
])
def test_a_fraction_or_a_whole_step_count(flag, value, expected):
    got = steps_or_fraction(flag, value)
    assert got == expected and type(got) is type(expected)  # int for a step count: L1RAConfig reads int as steps


@pytest.mark.parametrize("flag, value", [
    ("--update-every", 2.5), ("--update-every", 0), ("--update-every", -1), ("--update-every", math.inf),
    ("--update-every", math.nan), ("--l1-start", 1.5), ("--l1-start", -0.5), ("--update-every", "often"),
])
def test_anything_else_is_an_error_naming_the_flag_and_the_fix(flag, value):
    with pytest.raises(ScheduleError) as err:
        steps_or_fraction(flag, value)
    assert isinstance(err.value, UserError)
    assert str(err.value).startswith(f"{flag} ") and "use a fraction of the steps" in str(err.value)
    assert "or a whole number of optimizer steps (1, 2, ...)" in str(err.value)


def test_train_gives_the_library_a_step_count_or_a_fraction():
    config = l1ra_config(TrainOptions(update_every=3.0, l1_start=0.25, target_modules="q_proj"), "causal-lm", 80)
    assert (config.update_every, config.l1_start) == (3, 0.25) and isinstance(config.update_every, int)


def test_train_takes_lambda_from_the_run_length_unless_given():
    """Issue 24 item 4: the same L1 reach (1.5) whatever the run's length; a given --l1ra-lambda is kept, and a
    schedule that cannot prune says so in flag terms."""
    from l1ra.app.train.recipe import reach_line
    from l1ra.reach import l1_reach, warmup_cosine_factors

    for steps, expected in ((30, 1.0), (80, 0.375), (3000, 0.01)):
        config = l1ra_config(TrainOptions(eta_c=0.1, target_modules="q_proj"), "causal-lm", steps)
        assert config.l1ra_lambda == pytest.approx(expected, rel=0.01)
        reach = l1_reach(config, steps, warmup_cosine_factors(steps, max(1, round(0.1 * steps))))
        assert reach == pytest.approx(1.5)
        assert reach_line(config, steps, chosen=True).startswith(f"l1ra: L1 reach 1.50 over {steps} steps")
    given = l1ra_config(TrainOptions(eta_c=0.1, l1ra_lambda=0.5, target_modules="q_proj"), "causal-lm", 30)
    assert given.l1ra_lambda == 0.5
    line = reach_line(given, 30, chosen=False)
    assert "L1 reach 0.75" in line and "raise --l1ra-lambda to 0.667 or more" in line


ARGV = {
    "train": ["train", "--max-steps", "2"],
    "compare": ["compare", "--task", "tiny", "--quick", "--in-process"],
}


@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize("flag, value, rule", [("--update-every", "2.5", "0 < f < 1"), ("--l1-start", "1.5", "0 <= f < 1")])
def test_both_commands_refuse_the_same_values_with_the_same_message(command, flag, value, rule, tmp_path, capsys):
    argv = ARGV[command] + ["--output-dir", str(tmp_path / "out"), flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"l1ra: error: {flag} {value}: use a fraction of the steps ({rule}) or a whole number of optimizer "
                   "steps (1, 2, ...)")
    assert not (tmp_path / "out").exists()  # refused before any work
