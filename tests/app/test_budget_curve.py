"""`l1ra export RUN --curve`: held-out loss against budget, scored by the run's own evaluation, on a real tiny run."""

from __future__ import annotations

import json
import math

import pytest

from l1ra.app.cli import main
from helpers import TRAIN_FLAGS


@pytest.fixture(scope="module")
def tiny_run(tiny_llm, qa_jsonl, tmp_path_factory):  # noqa: F811
    """A real `l1ra train` run whose adapter changes the held-out loss (a high --lr)."""
    out = tmp_path_factory.mktemp("curve-run") / "out"
    rc = main(["train", "--model", str(tiny_llm), "--dataset", str(qa_jsonl), "--output-dir", str(out),
               "--l1ra-lambda", "2", *TRAIN_FLAGS, "--lr", "0.02", "--eval-fraction", "0.25"])
    assert rc == 0
    return out


@pytest.mark.slow
def test_curve_scores_the_runs_heldout_set(tiny_run, capsys):
    assert main(["export", str(tiny_run), "--curve"]) == 0
    printed = capsys.readouterr().out
    assert "held-out loss" in printed and "budget_curve.png" in printed
    curve = json.loads((tiny_run / "budget_curve.json").read_text())
    png = (tiny_run / "budget_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    total, n = curve["total_rank"], curve["modules"]
    assert total == metrics["budget"] == 56 and n == 14
    points = {p["budget"]: p for p in curve["points"]}
    # the default fractions 1, .75, .5, .25, .1 -> budgets (at least one rank per module)
    assert sorted(points) == sorted({max(n, round(f * total)) for f in (1.0, 0.75, 0.5, 0.25, 0.1)})
    assert all(math.isfinite(p["heldout_loss"]) for p in points.values())
    # the whole held-out set, scored as the run scored it: the untruncated adapter, its SVD re-factoring at fraction
    # 1 and the base model give the run's own numbers
    run_config = json.loads((tiny_run / "train_config.json").read_text())
    assert curve["eval_examples"] == run_config["data"]["eval_examples"] == 4
    assert curve["full"]["loss"] == pytest.approx(metrics["tuned"]["loss"], abs=1e-4)
    assert points[total]["heldout_loss"] == pytest.approx(metrics["tuned"]["loss"], abs=1e-4)
    assert curve["base"]["loss"] == pytest.approx(metrics["base"]["loss"], abs=1e-4)
    assert curve["run_tuned_loss"] == metrics["tuned"]["loss"]
    assert abs(metrics["tuned"]["loss"] - metrics["base"]["loss"]) > 1e-3  # the adapter does something
    # truncation changes the adapter: a smaller budget, fewer parameters and less of the update kept
    full = points[total]
    assert full["energy_kept"] == pytest.approx(1.0) and full["parameters"] == curve["full"]["parameters"]
    smallest = points[min(points)]
    assert smallest["parameters"] < full["parameters"] and smallest["energy_kept"] < 1.0
    assert smallest["heldout_loss"] != pytest.approx(full["heldout_loss"], abs=1e-7)


@pytest.mark.slow
def test_curve_chosen_fractions_and_the_saved_adapter(tiny_run, capsys):
    first = {p["budget"]: p for p in json.loads((tiny_run / "budget_curve.json").read_text())["points"]}
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert main(["export", str(tiny_run / "adapter"), "--curve", "--curve-fractions", "0.5,0.25"]) == 0
    curve = json.loads((tiny_run / "budget_curve.json").read_text())
    assert [p["budget"] for p in curve["points"]] == [28, 14]
    assert curve["points"][0]["heldout_loss"] == pytest.approx(first[28]["heldout_loss"], abs=1e-9)
    # the full budget is not a point: the saved adapter itself is scored, through plain PEFT
    assert curve["full"]["scored"] == "the saved adapter"
    assert curve["full"]["loss"] == pytest.approx(metrics["tuned"]["loss"], abs=1e-4)


def test_curve_max_eval(tiny_run, capsys):
    assert main(["export", str(tiny_run), "--curve", "--max-eval", "2", "--curve-fractions", "1"]) == 0
    curve = json.loads((tiny_run / "budget_curve.json").read_text())
    assert curve["eval_examples"] == 2 and curve["max_eval"] == 2 and [p["budget"] for p in curve["points"]] == [56]
    assert curve["points"][0]["tokens"] < json.loads((tiny_run / "metrics.json").read_text())["tuned"]["tokens"]
    assert "2 held-out examples" in capsys.readouterr().out


def test_curve_on_a_bare_adapter_keeps_the_energy_table(tiny_run, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_run / "adapter", bare)
    assert main(["export", str(bare), "--curve"]) == 0
    out = capsys.readouterr().out
    assert "not an `l1ra train` output folder" in out and "kept share of the update" in out
    assert not (tmp_path / "budget_curve.json").exists() and not (bare / "budget_curve.json").exists()
    assert main(["export", str(bare), "--curve", "--max-eval", "4"]) == 2
    assert "no held-out set to score" in capsys.readouterr().err


def test_curve_options_need_curve(tiny_run, tmp_path, capsys):
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "x"), "--max-eval", "4"]) == 2
    assert "--max-eval is for --curve" in capsys.readouterr().err
    assert main(["export", str(tiny_run), "--curve", "--out", str(tmp_path / "x")]) == 2
    assert "--curve writes no adapter" in capsys.readouterr().err
