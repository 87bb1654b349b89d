"""`l1ra compare --dataset FILE --model M`: the user's own file, end to end on a tiny Llama saved to a temp folder."""

from __future__ import annotations

import json

import pytest
import torch

from l1ra.app.cli import main
from l1ra.app.compare.dataset import MIN_ROWS, carve_splits, describe_file, split_sizes
from l1ra.app.train.data import DataError
from helpers import make_tokenizer


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llm")
    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_qa(path, n):
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{2 * i}"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_splits_are_disjoint_fixed_and_sized_by_the_file():
    rows = [{"i": i} for i in range(300)]
    test_size, dev_size = split_sizes("f.jsonl", len(rows))
    assert (test_size, dev_size) == (30, 30)  # 10% each
    train, dev, test = carve_splits(rows, test_size, dev_size)
    assert carve_splits(rows, test_size, dev_size) == (train, dev, test)  # the same for every run and seed
    ids = [{r["i"] for r in part} for part in (train, dev, test)]
    assert [len(s) for s in ids] == [240, 30, 30] and set().union(*ids) == set(range(300))
    assert ids[0].isdisjoint(ids[1]) and ids[0].isdisjoint(ids[2]) and ids[1].isdisjoint(ids[2])
    assert [r["i"] for r in train] == sorted(ids[0])  # training rows keep the file's order
    assert split_sizes("f", MIN_ROWS) == (10, 10) and split_sizes("f", 100_000) == (500, 200)


def test_a_file_too_small_to_split_is_named_with_its_rows_and_the_minimum(tmp_path, tiny_llm, capsys):
    small = write_qa(tmp_path / "small.jsonl", MIN_ROWS - 1)
    with pytest.raises(DataError, match=rf"small.jsonl: {MIN_ROWS - 1} rows, .* at least {MIN_ROWS} rows"):
        describe_file(str(small), model=str(tiny_llm))
    assert main(["compare", "--dataset", str(small), "--model", str(tiny_llm), "--output-dir",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"small.jsonl: {MIN_ROWS - 1} rows" in err and f"at least {MIN_ROWS} rows" in err
    assert not (tmp_path / "out").exists()


def test_plan_errors_name_the_flag(tmp_path, tiny_llm, capsys):
    data = write_qa(tmp_path / "qa.jsonl", MIN_ROWS)
    for argv, expected in (
        (["--dataset", str(data), "--task", "tiny"], "one of --task"),
        (["--task", "tiny", "--model", str(tiny_llm)], "--model and the column flags go with --dataset"),
        (["--dataset", str(data), "--model", str(tiny_llm), "--text-column", "nope"], "--text-column nope"),
        (["--dataset", str(data), "--model", str(tiny_llm), "--dev-size", "35"], "--dev-size 35"),
        (["--dataset", str(data), "--model", str(tiny_llm), "--methods", "lora,head_only"], "head_only"),
        (["--task", "tiny", "--update-every", "2.5"], "--update-every 2.5"),
    ):
        assert main(["compare", *argv, "--output-dir", str(tmp_path / "out")]) == 2, argv
        assert expected in capsys.readouterr().err, argv


def test_help_shows_the_dataset_flags(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    for flag in ("--dataset FILE", "--model", "--prompt-column", "--text-column", f"at least {MIN_ROWS} rows"):
        assert flag in text, flag


@pytest.mark.slow
def test_compare_on_a_users_file_end_to_end(tmp_path, tiny_llm):
    """Tuning on the file's dev split, then LoRA and tuned L1RA on its test split, paired by seed; a second sitting
    with the same command runs nothing."""
    data = write_qa(tmp_path / "qa.jsonl", 60)
    out = tmp_path / "cmp"
    argv = ["compare", "--dataset", str(data), "--model", str(tiny_llm), "--in-process", "--tune", "--tune-extend", "0",
            "--lr-grid", "1e-3,3e-3,1e-2", "--steps", "3", "--seeds", "2", "--batch-size", "4", "--max-length", "64",
            "--methods", "lora,l1ra_tuned", "--timing-steps", "0", "--output-dir", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert sorted((r["split"], r["method"]) for r in runs).count(("dev", "lora")) == 3
    test_runs = [r for r in runs if r["split"] == "test"]
    assert sorted((r["seed"], r["method"]) for r in test_runs) == [(0, "l1ra_tuned"), (0, "lora"), (1, "l1ra_tuned"),
                                                                   (1, "lora")]
    for r in runs:
        assert r["task"] == "dataset" and r["score_name"] == "loss" and not r["higher_is_better"]
        assert r["spec"]["user_data"]["file"] == str(data.resolve()) and r["spec"]["dev_size"] == 10
    best = results["tuning"]["dataset"]
    for r in test_runs:
        assert r["spec"]["lr"] == best[r["method"]]["best_lr"]
    summary = results["summary"]["dataset"]
    assert summary["splits"] == {
        "train": {"name": "qa.jsonl minus test and dev", "size": 40},
        "dev": {"name": "qa.jsonl rows carved from the rest (seed 20260)", "size": 10},
        "test": {"name": "qa.jsonl rows held out (seed 20261)", "size": 10},
    }
    vs = summary["methods"]["l1ra_tuned"]["vs_lora"]
    assert vs["seeds"] == [0, 1] and len(vs["differences"]) == 2 and vs["ci95"][0] <= vs["mean"] <= vs["ci95"][1]
    assert summary["targets"] == {}  # the project's targets are for its built-in tasks
    md = (out / "results.md").read_text()
    assert "## dataset" in md and "Targets" not in md and (out / "dataset.png").exists()
    assert main(argv) == 0  # resumed: every spec is already in results.json
    assert len(json.loads((out / "results.json").read_text())["runs"]) == len(runs)
