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
    config = l1ra_config(TrainOptions(update_every=3.0, l1_start=0.25, target_modules="q_proj"), "causal-lm")
    assert (config.update_every, config.l1_start) == (3, 0.25) and isinstance(config.update_every, int)


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
