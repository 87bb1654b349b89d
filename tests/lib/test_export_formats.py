"""`l1ra export`: every format and budget loads in vanilla PEFT (a process that never imports l1ra) with the logits
they promise; the budget truncation is the best one there is (Eckart-Young); scalings are PEFT's own."""

import argparse
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import l1ra
from l1ra import L1RAConfig
from l1ra import export as ex

from conftest import make_batch, make_model

TESTS_DIR = Path(__file__).resolve().parents[1]  # conftest.py, for the fresh process


def train_l1ra(seed=0, use_rslora=False, steps=8):
    """A tiny Llama with L1RA trained until its ranks moved (strong L1, fast gates, a reallocation every 2 steps)."""
    cfg = L1RAConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM", use_rslora=use_rslora,
        l1ra_lambda=0.5, eta_c=0.5, update_every=2, l1_start=0,
    )
    model = l1ra.get_l1ra_model(make_model("llama", seed), cfg)
    torch.manual_seed(seed)
    optimizer = l1ra.create_optimizer(model, lr=5e-2)
    batch = make_batch("llama")
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        l1ra.after_optimizer_step(model, optimizer)
        optimizer.zero_grad()
    return model.eval()


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def make_run(root, use_rslora):
    """An `l1ra train`-shaped folder: run/adapter/ (saved by L1RA) and run/train_config.json naming the base."""
    make_model("llama").save_pretrained(root / "base")
    model = train_l1ra(use_rslora=use_rslora)
    ranks = l1ra.rank_pattern(model)
    assert len(set(ranks.values())) > 2, f"ranks did not move: {ranks}"
    model.save_pretrained(root / "run" / "adapter")
    (root / "run" / "train_config.json").write_text(json.dumps({"model_path": str(root / "base")}))
    batch = make_batch("llama")
    return dict(root=root, src=root / "run", base=root / "base", batch=batch, logits=logits(model, batch),
                ranks=ranks, model=model)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"), use_rslora=False)


@pytest.fixture(scope="module")
def rslora_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("rslora_run"), use_rslora=True)


def dense_logits(run, deltas):
    """Logits of the base model with `deltas` ({module: dense ΔW}) added to its weights: no LoRA code involved."""
    base = make_model("llama")
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = base.get_submodule(name).weight
            weight += delta.to(weight.dtype)
    return logits(base, run["batch"])


def best_rank_k(delta, k):
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def load_in_vanilla_peft(run, folders):
    """Max |logits - expected| for each folder, loaded by PeftModel.from_pretrained in a process without l1ra."""
    torch.save({"batch": run["batch"], "expected": {k: v for k, (_, v) in folders.items()}}, run["root"] / "ref.pt")
    paths = {k: str(p) for k, (p, _) in folders.items()}
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        sys.path.insert(0, {str(TESTS_DIR)!r})
        from conftest import make_model
        from peft import PeftModel
        ref = torch.load({str(run["root"] / "ref.pt")!r})
        out = {{}}
        for key, path in {paths!r}.items():
            model = PeftModel.from_pretrained(make_model("llama"), path).eval()
            with torch.no_grad():
                got = model(input_ids=ref["batch"]["input_ids"]).logits
            out[key] = (got - ref["expected"][key]).abs().max().item()
            if key in ("uniform", "peft_small_budget"):  # transformers' own entry point too
                plain = make_model("llama")
                plain.load_adapter(path)
                with torch.no_grad():
                    got = plain(input_ids=ref["batch"]["input_ids"]).logits
                out[key + "_transformers"] = (got - ref["expected"][key]).abs().max().item()
        assert "l1ra" not in sys.modules
        print(json.dumps(out))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("which", ["run", "rslora_run"])
def test_every_format_and_budget_loads_in_vanilla_peft_with_the_promised_logits(which, request, tmp_path):
    run = request.getfixturevalue(which)
    src, expected = run["src"], run["logits"]
    total = sum(run["ranks"].values())
    adapter = ex.read_adapter(src / "adapter")
    small = len(adapter.modules) + total // 16  # far below the trained ranks: the function must change
    keep = ex.budget_ranks(ex.singular_values(adapter), small)
    truncated = {n: best_rank_k(d, keep[n]) for n, d in ex.delta_weights(adapter).items()}
    truncated_logits = dense_logits(run, truncated)
    assert (truncated_logits - expected).abs().max() > 1e-3, "the small budget must change the function"
    cases = {
        "peft": (dict(format="peft"), expected),
        "uniform": (dict(format="uniform"), expected),
        "uniform_48": (dict(format="uniform", rank=48), expected),
        "peft_full_budget": (dict(format="peft", budget=total), expected),
        "uniform_fraction_1": (dict(format="uniform", fraction=1.0), expected),
        "peft_small_budget": (dict(format="peft", budget=small), truncated_logits),
        "uniform_small_budget": (dict(format="uniform", budget=small), truncated_logits),
    }
    folders = {}
    for key, (kwargs, want) in cases.items():
        folders[key] = (ex.export_adapter(src / "adapter", tmp_path / key, **kwargs), want)
    worst = load_in_vanilla_peft(run, folders)
    print(which, json.dumps(worst))
    assert len(worst) == len(cases) + 2 and max(worst.values()) < 1e-5, worst

    # the files say what they promise
    uniform = json.loads((tmp_path / "uniform" / "adapter_config.json").read_text())
    top = max(run["ranks"].values())
    assert uniform["r"] == uniform["lora_alpha"] == 16 * math.ceil(top / 16)
    assert uniform["rank_pattern"] == {} and uniform["alpha_pattern"] == {} and uniform["use_rslora"] is False
    weights = load_file(tmp_path / "uniform_48" / "adapter_model.safetensors")
    for name, r in run["ranks"].items():
        a = weights[f"base_model.model.{name}.lora_A.weight"]
        assert a.shape[0] == 48 and torch.count_nonzero(a[r:]) == 0
    small_cfg = json.loads((tmp_path / "peft_small_budget" / "adapter_config.json").read_text())
    assert sum(small_cfg["rank_pattern"].values()) == small
    assert small_cfg["rank_pattern"] == keep
    plain = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert plain["rank_pattern"] == run["ranks"] and plain["use_rslora"] is False
    assert plain["r"] == top  # engines that size buffers by r fit every module


def test_the_default_uniform_rank_is_the_next_multiple_of_16():
    assert ex.uniform_rank([1, 7, 16]) == 16
    assert ex.uniform_rank([3, 17]) == 32
    assert ex.uniform_rank([48]) == 48


# One table of PEFT configs: module_scalings must agree with the scaling PEFT itself gives each layer.
SCALING_CASES = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "short_keys": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"v_proj": 3}),
    "full_names": dict(
        r=4, lora_alpha=8, rank_pattern={"model.layers.1.self_attn.q_proj": 2, "model.layers.0.mlp.up_proj": 7},
        alpha_pattern={"model.layers.1.self_attn.q_proj": 5, "layers.0.mlp.up_proj": 1.5},
    ),
    "rslora_patterns": dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"layers.1.mlp.down_proj": 3},
                            alpha_pattern={"o_proj": 2}),
    "regex_keys": dict(r=4, lora_alpha=4, rank_pattern={r"layers\.\d\.self_attn\.k_proj": 3},
                       alpha_pattern={"(up|gate)_proj": 12}),
}


@pytest.mark.parametrize("case", SCALING_CASES)
def test_module_scalings_are_the_ones_peft_builds(case):
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(target_modules="all-linear", **SCALING_CASES[case])
    model = get_peft_model(make_model("llama"), config)
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    got = ex.module_scalings(json.loads(json.dumps(config.to_dict(), default=list)), layers)
    for name, layer in layers.items():
        assert got[name] == pytest.approx(layer.scaling["default"], rel=1e-12), name


@pytest.mark.parametrize("case", ["rslora_patterns", "short_keys", "regex_keys"])
def test_peft_format_rewrites_any_peft_adapter_with_the_same_logits(case, tmp_path):
    """Not only L1RA: an adapter PEFT saved with rsLoRA or pattern keys of any kind comes out the same."""
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), LoraConfig(target_modules="all-linear", **SCALING_CASES[case]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = make_batch("llama")
    model.save_pretrained(tmp_path / "src")
    out = ex.export_adapter(tmp_path / "src", tmp_path / "out", format="peft")
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(make_model("llama"), str(out)).eval()
    torch.testing.assert_close(logits(reloaded, batch), logits(model.eval(), batch), atol=1e-5, rtol=0)


def random_adapter(seed, shapes, rank_deficient=False):
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i, (out, r, inp) in enumerate(shapes):
        a, b = torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)
        if rank_deficient and r > 1:
            b[:, -1] = b[:, 0]  # two equal columns of B: ΔW has rank < r
        scaling = float(torch.rand((), generator=g) * 3 + 0.1)
        modules[f"m{i}"] = ex.LoraModule(a.double(), b.double(), scaling)
    return ex.LoraAdapter(config={"r": 1, "lora_alpha": 1}, modules=modules)


shape = st.tuples(st.integers(1, 9), st.integers(1, 6), st.integers(1, 9))


@settings(max_examples=30, deadline=None)
@given(shapes=st.lists(shape, min_size=1, max_size=4), seed=st.integers(0, 10_000), data=st.data(),
       deficient=st.booleans())
def test_truncation_is_the_best_rank_k_approximation_and_full_budget_is_exact(shapes, seed, data, deficient):
    adapter = random_adapter(seed, shapes, deficient)
    dense = ex.delta_weights(adapter)
    total = sum(adapter.ranks.values())
    full = ex.truncate(adapter, total)
    assert full.ranks == adapter.ranks
    for name, delta in ex.delta_weights(full).items():
        torch.testing.assert_close(delta, dense[name], atol=1e-9, rtol=1e-9)

    budget = data.draw(st.integers(len(shapes), total))
    small = ex.truncate(adapter, budget)
    assert sum(small.ranks.values()) == budget and min(small.ranks.values()) >= 1
    assert all(m.scaling == 1.0 for m in small.modules.values())
    kept, dropped = [], []
    for name, delta in ex.delta_weights(small).items():
        k = small.ranks[name]
        torch.testing.assert_close(delta, best_rank_k(dense[name], k), atol=1e-9, rtol=1e-9)  # Eckart-Young
        sigma = torch.linalg.svdvals(dense[name])
        r = adapter.ranks[name]  # the adapter has r directions: min(out, in) may be smaller or larger
        sigma = torch.cat([sigma, sigma.new_zeros(max(0, r - sigma.numel()))])[:r]
        kept += sigma[1:k].tolist()  # the first one is kept by the one-rank-per-module rule
        dropped += sigma[k:].tolist()
    if kept and dropped:  # across modules: nothing dropped is larger than anything kept by the budget
        assert max(dropped) <= min(kept) + 1e-9


def test_svd_factors_work_on_thin_factors_of_a_wide_layer():
    """Only r x r matrices are decomposed: a 20000 x 30000 layer (2.4 GB as float32 dense) costs nothing."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 30000, generator=g), torch.randn(20000, 3, generator=g)
    u, s, vh = ex.svd_factors(a, b, 0.5)
    assert u.shape == (20000, 3) and s.shape == (3,) and vh.shape == (3, 30000)
    torch.testing.assert_close(u.T @ u, torch.eye(3, dtype=u.dtype), atol=1e-9, rtol=0)
    x = torch.randn(30000, 2, generator=g).double()
    torch.testing.assert_close(u @ (s[:, None] * (vh @ x)), 0.5 * b.double() @ (a.double() @ x))


# ------------------------------------------------------------------------------------------------ errors and the CLI


def test_errors_name_the_problem(run, tmp_path):
    src = run["src"] / "adapter"
    total, n = sum(run["ranks"].values()), len(run["ranks"])
    top = max(run["ranks"].values())
    cases = [
        (dict(format="uniform", rank=top - 1), f"below the largest rank in the adapter \\({top}"),
        (dict(budget=n - 1), f"between the number of adapted modules \\({n}"),
        (dict(budget=total + 1), f"total rank \\({total}\\)"),
        (dict(fraction=0.0), "must be in \\(0, 1\\]"),
        (dict(budget=n, fraction=0.5), "pass one of them"),
        (dict(format="peft", rank=16), "rank is for the uniform"),
        (dict(format="onnx"), "choose one of peft, uniform"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ex.ExportError, match=message):
            ex.export_adapter(src, tmp_path / "x", **kwargs)
    with pytest.raises(ex.ExportError, match="no such folder"):
        ex.export_adapter(tmp_path / "missing", tmp_path / "x")
    with pytest.raises(ex.ExportError, match="holds no adapter_config.json; pass a PEFT LoRA adapter folder"):
        ex.export_adapter(run["src"], tmp_path / "x")  # the library takes adapter folders; the CLI finds them
    for out in (src, src / "inside", run["src"]):  # the adapter itself, a folder in it, a folder holding it
        with pytest.raises(ex.ExportError, match="would overwrite the source"):
            ex.export_adapter(src, out, overwrite=True)
    ex.export_adapter(src, tmp_path / "once")
    with pytest.raises(ex.ExportError, match="already exists"):
        ex.export_adapter(src, tmp_path / "once")
    ex.export_adapter(src, tmp_path / "once", overwrite=True)
    assert not list(tmp_path.glob(".once*")), "no temporary folder left behind"


def test_unsupported_adapters_are_refused(tmp_path):
    model = get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj"], use_dora=True))
    model.save_pretrained(tmp_path / "dora")
    with pytest.raises(ex.ExportError, match="DoRA"):
        ex.read_adapter(tmp_path / "dora")
    cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    cfg["use_dora"], cfg["peft_type"] = False, "IA3"
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ex.ExportError, match="only LoRA adapters"):
        ex.read_adapter(tmp_path / "dora")


def cli(argv):
    from l1ra.app.deploy import command

    parser = argparse.ArgumentParser(prog="l1ra")
    command.add_export_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_writes_every_format(run, tmp_path, capsys):
    src = str(run["src"])
    assert cli(["export", src, "--out", str(tmp_path / "u"), "--format", "uniform", "--fraction", "0.5"]) == 0
    assert "uniform adapter written to" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "u" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 16
    assert cli(["export", src, "--out", str(tmp_path / "p"), "--budget", str(len(run["ranks"]))]) == 0
    assert set(json.loads((tmp_path / "p" / "adapter_config.json").read_text())["rank_pattern"].values()) == {1}
    assert cli(["export", src, "--out", str(tmp_path / "a.gguf"), "--format", "gguf"]) == 0
    assert (tmp_path / "a.gguf").stat().st_size > 0
    with pytest.raises(ex.ExportError, match="--rank is for --format uniform"):
        cli(["export", src, "--out", str(tmp_path / "q"), "--rank", "16"])
    with pytest.raises(SystemExit):  # argparse: --budget and --fraction exclude each other
        cli(["export", src, "--out", str(tmp_path / "q"), "--budget", "3", "--fraction", "0.5"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_budget_curve_is_monotone_and_complete_at_full_budget(run, capsys):
    adapter = ex.read_adapter(run["src"] / "adapter")
    n, total = len(adapter.modules), sum(adapter.ranks.values())
    rows = ex.budget_curve(adapter, range(n, total + 1))
    kept = [r["kept"] for r in rows]
    assert all(a <= b + 1e-12 for a, b in zip(kept, kept[1:])) and kept[-1] == pytest.approx(1.0)
    # the share kept is 1 - squared relative error of the truncated updates
    small = ex.truncate(adapter, n + 5)
    dense, cut = ex.delta_weights(adapter), ex.delta_weights(small)
    err = sum(float(((dense[k] - cut[k]) ** 2).sum()) for k in dense) / sum(float((d**2).sum()) for d in dense.values())
    assert rows[5]["kept"] == pytest.approx(1 - err, rel=1e-9)
    assert cli(["export", str(run["src"]), "--curve"]) == 0
    assert f"total rank {total}" in capsys.readouterr().out
