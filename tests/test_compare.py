"""`l1ra compare` on the tiny task: real PEFT LoRA/AdaLoRA/DoRA and L1RA, tiny model, no timing assertions."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from l1ra.app import compare
from l1ra.app.compare_run import RunSpec, lr_lambda, run_one, wrap_model
from l1ra.history import mean_rank_by_type as by_module_type, module_type
from l1ra.app.compare_tasks import build_task

STEPS = 10


def spec(method, seed=0, **kw):
    base = dict(task=kw.pop("task", "tiny"), method=method, seed=seed, steps=STEPS, batch_size=4, lr=5e-3, max_length=16, rank=4)
    base.update(kw)
    return RunSpec(**base)


@pytest.fixture(scope="module")
def tiny():
    return build_task("tiny", 16, None)


@pytest.fixture(scope="module")
def runs(tiny):
    # l1ra with a strong L1 so that ranks actually move within 10 steps
    strong = dict(l1ra_lambda=10.0, eta_c=0.05, update_every=3)
    return {
        "lora": run_one(spec("lora"), tiny),
        "adalora": run_one(spec("adalora"), tiny),
        "l1ra": run_one(spec("l1ra", **strong), tiny),
        "l1ra_prune": run_one(spec("l1ra_prune", **strong), tiny),
        "dora": run_one(spec("dora"), tiny),
    }


def test_every_method_trains_and_reports_every_figure(runs):
    for method, r in runs.items():
        assert r["method"] == method and r["score_name"] == "loss" and not r["higher_is_better"]
        assert len(r["step_times_s"]) == STEPS and len(r["train_losses"]) == STEPS
        assert all(torch.isfinite(torch.tensor(r["train_losses"])))
        for key in ("score", "step_time_median_s", "peak_rss_mb", "train_wall_s", "trainable_params_end"):
            assert r[key] > 0, (method, key)
        assert r["metrics"]["perplexity"] == pytest.approx(torch.tensor(r["score"]).exp().item(), rel=1e-6)
        assert set(r["rank_by_type"]) == {
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        }
        json.dumps(r)  # results.json must hold it


def test_same_rank_budget_for_every_method(runs):
    n_modules = len(runs["lora"]["ranks_allocated"])
    budget = 4 * n_modules
    assert runs["lora"]["total_rank_effective"] == budget
    assert runs["dora"]["total_rank_effective"] == budget
    # AdaLoRA: 1.5x the rank allocated, masked down to the budget by its final allocation (update_and_allocate
    # was called with optimizer steps up to total_step - tfinal)
    assert set(runs["adalora"]["ranks_allocated"].values()) == {6}
    assert runs["adalora"]["total_rank_effective"] == budget
    assert runs["adalora"]["effective_params_end"] < runs["adalora"]["trainable_params_end"]
    assert runs["adalora"]["adalora"] == {"init_r": 6, "target_r": 4, "tinit": 1, "tfinal": 2, "deltaT": 1,
                                          "total_step": STEPS}
    # L1RA keeps the budget while moving rank; prune-only never adds
    assert sum(runs["l1ra"]["ranks_allocated"].values()) == budget
    assert runs["l1ra"]["l1ra"]["reallocations"] >= 2
    assert runs["l1ra"]["l1ra"]["ranks_added"] == runs["l1ra"]["l1ra"]["ranks_pruned"]
    assert runs["l1ra_prune"]["l1ra"]["ranks_added"] == 0
    assert runs["l1ra_prune"]["total_rank_effective"] <= budget


def test_l1ra_moves_rank_with_a_strong_penalty(runs):
    assert runs["l1ra"]["l1ra"]["ranks_pruned"] > 0
    assert runs["l1ra_prune"]["l1ra"]["ranks_pruned"] > 0
    assert runs["l1ra_prune"]["trainable_params_end"] < runs["lora"]["trainable_params_end"]


def test_runs_are_reproducible_and_lora_l1ra_start_from_the_same_adapter(tiny):
    a, b = run_one(spec("lora", steps=3), tiny), run_one(spec("lora", steps=3), tiny)
    assert a["train_losses"] == b["train_losses"] and a["score"] == b["score"]
    models = {}
    for method in ("lora", "l1ra"):
        torch.manual_seed(7)
        pm, _, _ = wrap_model(method, tiny.load_model(), tiny, spec(method))
        models[method] = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    assert models["lora"].keys() == models["l1ra"].keys()
    for name, value in models["lora"].items():
        assert torch.equal(value, models["l1ra"][name]), name
    # the first batches are the same for a seed, whatever the method
    assert torch.equal(tiny.train_batches(3, 2, 4)[1]["input_ids"], tiny.train_batches(3, 2, 4)[1]["input_ids"])


def test_optimizer_groups_match_between_methods(tiny):
    torch.manual_seed(0)
    _, opt_lora, _ = wrap_model("lora", tiny.load_model(), tiny, spec("lora", weight_decay=0.1))
    _, opt_l1ra, _ = wrap_model("l1ra", tiny.load_model(), tiny, spec("l1ra", weight_decay=0.1))
    _, opt_ada, _ = wrap_model("adalora", tiny.load_model(), tiny, spec("adalora", weight_decay=0.1))
    decayed = lambda opt: sum(p.numel() for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"])  # noqa
    assert decayed(opt_lora) == decayed(opt_l1ra)  # the same LoRA matrices decay; gates do not
    gate_group = [g for g in opt_l1ra.param_groups if g.get("name") == "l1ra_gates"]
    assert gate_group and gate_group[0]["weight_decay"] == 0
    for opt in (opt_ada,):  # AdaLoRA's singular values are vectors: no weight decay
        for g in opt.param_groups:
            if g["weight_decay"] > 0:
                assert all(p.shape[-1] != 1 for p in g["params"])


def test_schedule_warmup_then_cosine_to_zero():
    f = lr_lambda(100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=0.02) and f(100) == pytest.approx(0.0, abs=1e-9)


def test_module_type_tells_bert_dense_layers_apart():
    assert module_type("bert.encoder.layer.3.attention.self.query") == "attention.self.query"
    assert module_type("bert.encoder.layer.3.attention.output.dense") == "attention.output.dense"
    assert module_type("bert.encoder.layer.3.intermediate.dense") == "intermediate.dense"
    assert module_type("bert.encoder.layer.3.output.dense") == "output.dense"
    assert by_module_type({"a.0.q": 2, "a.1.q": 4, "a.0.v": 8}) == {"q": 3.0, "v": 8.0}


def test_plan_interleaves_and_rotates_methods():
    order = compare.plan_runs(["lora", "adalora", "l1ra"], [0, 1, 2])
    assert order[:3] == [(0, "lora"), (0, "adalora"), (0, "l1ra")]
    assert order[3:6] == [(1, "adalora"), (1, "l1ra"), (1, "lora")]
    assert [m for s, m in order if s == 2][0] == "l1ra"


def test_argument_parsing_errors_name_the_flag():
    assert compare.parse_seeds("3") == [0, 1, 2] and compare.parse_seeds("0,5") == [0, 5]
    with pytest.raises(argparse.ArgumentTypeError, match="--seeds"):
        compare.parse_seeds("0")
    with pytest.raises(argparse.ArgumentTypeError, match="--methods.*bogus"):
        compare.parse_methods("lora,bogus")
    assert compare.parse_methods("LoRA,l1ra-prune") == ["lora", "l1ra_prune"]


def test_summary_markdown_and_figure(runs, tmp_path):
    fake = []
    for seed in (0, 1):
        for r in runs.values():
            fake.append(dict(r, seed=seed))
    summary = compare.summarize(fake)["tiny"]
    assert summary["methods"]["lora"]["step_ratio"] == (1.0, 0.0)
    assert summary["methods"]["lora"]["mem_ratio"] == (1.0, 0.0)
    assert summary["methods"]["l1ra"]["n_seeds"] == 2
    assert set(summary["targets"]) == {"score_ge_lora", "score_ge_adalora", "step_ratio_le_1.03",
                                       "step_time_below_adalora", "mem_ratio_le_1.02"}
    results = {"command": "l1ra compare --task tiny", "date": "2025-01-01T00:00:00", "runs": fake, "failures": [],
               "machine": compare.machine_info(2), "memory_method": "test", "summary": {"tiny": summary}}
    md = compare.render_markdown(results)
    assert "| LoRA |" in md and "| AdaLoRA |" in md and "| L1RA prune-only |" in md and "Targets" in md
    assert "L1RA: lambda 10, eta_c 0.05, L1 from step 1, reallocation every 3 steps." in md
    compare.plot_task(results, "tiny", tmp_path / "tiny.png")
    assert (tmp_path / "tiny.png").stat().st_size > 1000


def test_cli_end_to_end_in_process(tmp_path):
    from l1ra.app import cli

    out = tmp_path / "cmp"
    code = cli.main(["compare", "--task", "tiny", "--in-process", "--steps", "4", "--seeds", "2",
                     "--methods", "lora,l1ra", "--output-dir", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["seed"], r["method"]) for r in results["runs"]] == [(0, "lora"), (0, "l1ra"), (1, "l1ra"), (1, "lora")]
    assert "l1ra compare" in (out / "results.md").read_text()
    assert (out / "tiny.png").exists()


def test_isolated_run_in_its_own_process(tmp_path):
    result = compare.run_isolated(spec("l1ra", steps=3), tmp_path / "run.log")
    assert result["method"] == "l1ra" and result["peak_rss_mb"] > result["rss_before_train_mb"] * 0.5
    with pytest.raises(RuntimeError, match="failed"):
        compare.run_isolated(spec("l1ra", steps=3, rank=0), tmp_path / "bad.log")


def test_make_specs_rejects_a_run_without_lora():
    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    args = p.parse_args(["--task", "tiny", "--methods", "l1ra,adalora"])
    with pytest.raises(ValueError, match="--methods must include lora"):
        compare.make_specs(args)
    args = p.parse_args(["--task", "tiny", "--quick", "--dora"])
    specs = compare.make_specs(args)
    assert {s.method for s in specs} == {"lora", "adalora", "l1ra", "l1ra_prune", "dora"}
    assert {s.seed for s in specs} == {0}


def test_l1ra_short_run_settings_apply_unless_a_flag_overrides():
    from l1ra.app.compare_tasks import SHORT_RUN_L1RA

    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    (spec_default,) = [s for s in compare.make_specs(p.parse_args(["--task", "tiny", "--quick"])) if s.method == "l1ra"]
    assert {k: getattr(spec_default, k) for k in SHORT_RUN_L1RA} == SHORT_RUN_L1RA
    args = p.parse_args(["--task", "tiny", "--quick", "--l1ra-lambda", "0.1", "--eta-c", "0.02", "--l1-start", "0"])
    (paper,) = [s for s in compare.make_specs(args) if s.method == "l1ra"]
    assert (paper.l1ra_lambda, paper.eta_c, paper.l1_start) == (0.1, 0.02, 0.0)


def test_first_step_is_identical_for_lora_and_l1ra_even_with_a_fresh_head():
    # Before the first update B = 0, so LoRA and L1RA compute the base model: same head init, same data, same
    # dropout stream give the same loss. A model whose head is drawn at load time (like MiniLM + classifier).
    from transformers import BertConfig, BertForSequenceClassification

    from l1ra.app.compare_tasks import Task, _shuffled_batches

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, num_labels=2)
    rows = [{"input_ids": torch.randint(0, 64, (8,)), "label": i % 2} for i in range(16)]

    def collate(rs):
        ids = torch.stack([r["input_ids"] for r in rs])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([r["label"] for r in rs])}

    task = Task(
        name="tiny-bert", score_name="acc", higher_is_better=True, task_type="SEQ_CLS",
        target_modules=["query", "key", "value", "dense"], load_model=lambda: BertForSequenceClassification(cfg),
        train_batches=lambda seed, steps, bs: _shuffled_batches(rows, seed, steps, bs, collate),
        evaluate=lambda model: {"acc": 0.5},
    )
    torch.manual_seed(123)  # the global RNG state differs between calls: run_one must not depend on it
    a = run_one(spec("lora", steps=2), task)
    torch.manual_seed(456)
    b = run_one(spec("l1ra", steps=2), task)
    assert a["train_losses"][0] == b["train_losses"][0]


def test_from_results_rerenders_an_interrupted_comparison(runs, tmp_path):
    partial = {"command": "l1ra compare --task tiny", "date": "2025-01-01T00:00:00", "machine": compare.machine_info(1),
               "memory_method": "test", "runs": [runs["lora"], runs["l1ra"]]}
    src = tmp_path / "partial.json"
    src.write_text(json.dumps(partial))
    assert compare.main(["--task", "tiny", "--from-results", str(src), "--output-dir", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| L1RA |" in md and "| AdaLoRA |" not in md


def test_interleaved_step_timing_feeds_the_ratio_column(tmp_path):
    specs = [spec(m, steps=4) for m in ("lora", "l1ra")]
    results = compare.run_compare(specs, tmp_path, isolate=False, timing_steps=3, log=lambda m: None)
    timing = results["step_timing"]["tiny"]["methods"]
    assert len(timing["lora"]["step_times_s"]) == 3 and timing["lora"]["ratio_median"] == 1.0
    assert results["summary"]["tiny"]["methods"]["l1ra"]["step_ratio"][0] == timing["l1ra"]["ratio_median"]
    assert "side by side" in (tmp_path / "results.md").read_text()
