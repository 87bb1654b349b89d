"""The library's sharp edges (issue 10): new ranks' optimizer state, scaling on load, merges, other adapters,
init variants, fp32 gates, file modes, import structure. Each test failed on the code before its fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import l1ra
from l1ra import L1RAConfig

from conftest import make_batch, make_model
from test_cli import TRAIN_FLAGS, qa_jsonl, tiny_llm, tiny_llm_4bit  # noqa: F401 -- fixtures: tiny Llamas, a QA dataset
from test_core import build, kill_gates, logits, train_steps


class TwoLinear(nn.Module):
    """The smallest model with two adapters, so that a pruned rank of one is handed to the other."""

    def __init__(self, width=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.one, self.two = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return self.two(torch.relu(self.one(x)))


def _two_linear(**overrides):
    kwargs = dict(r=4, lora_alpha=4, target_modules=["one", "two"], update_every=10**6, l1ra_lambda=0.0)
    kwargs.update(overrides)
    return l1ra.get_l1ra_model(TwoLinear(), L1RAConfig(**kwargs))


def _set_random_grads(params, generator, scale=1e-2):
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * scale


# ---------------------------------------------------------------------------------------------------------------
# 1. New ranks' optimizer state


@pytest.mark.slow
@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, torch.optim.Adam])
def test_a_new_rank_after_a_long_run_steps_like_a_fresh_adam(optimizer_cls):
    """After 3,000 steps, a new B column's first update is at most 1.5x what a fresh AdamW does on the same gradient
    (it was 3.1x: zero moments under a mature bias correction)."""
    model = _two_linear()
    opt = l1ra.create_optimizer(model, lr=1e-3, optimizer_cls=optimizer_cls)
    params = [p for g in opt.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3000):
        _set_random_grads(params, gen)
        opt.step()
    with torch.no_grad():
        for gate in l1ra.gates(model).values():
            gate.fill_(0.5)
        l1ra.gates(model)["one"][0] = 0.0
    l1ra.reallocate(model, opt)
    assert l1ra.rank_pattern(model) == {"one": 3, "two": 5}
    b = dict(model.l1ra_state.layers)["two"].lora_B["default"].weight
    params = [p for g in opt.param_groups for p in g["params"]]
    _set_random_grads(params, gen)
    grad_new, before = b.grad[:, 4:].clone(), b.detach().clone()
    opt.step()
    update = (b.detach() - before)[:, 4:]
    fresh = nn.Parameter(torch.zeros_like(grad_new))
    fresh_opt = optimizer_cls([fresh], lr=1e-3, weight_decay=0.0)
    fresh.grad = grad_new
    fresh_opt.step()
    ratio = (update.norm() / fresh.detach().norm()).item()
    assert 0 < ratio <= 1.5, ratio


# ---------------------------------------------------------------------------------------------------------------
# 2. Loading reproduces the saved function (lora_alpha, alpha_pattern, use_rslora)

Q0 = "model.layers.0.self_attn.q_proj"
SAVED_SCALINGS = {
    "alpha32": dict(lora_alpha=32),
    "alpha32_rslora": dict(lora_alpha=32, use_rslora=True),
    "alpha_pattern": dict(lora_alpha=8, rank_pattern={Q0: 6}, alpha_pattern={Q0: 2, "mlp.down_proj": 40}),
    "alpha_pattern_rslora": dict(lora_alpha=16, use_rslora=True, rank_pattern={Q0: 2}, alpha_pattern={"v_proj": 3}),
}


def _plain_peft_adapter(path, **lora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False, **lora)
    peft_model = get_peft_model(make_model("llama"), config)
    peft_model.save_pretrained(path)
    return logits(peft_model, make_batch("llama"))


@pytest.mark.parametrize("saved", list(SAVED_SCALINGS))
@pytest.mark.parametrize("model_rslora", [False, True])
def test_load_adapter_reproduces_plain_peft_logits_whatever_alpha_and_rslora(tmp_path, saved, model_rslora):
    expected = _plain_peft_adapter(tmp_path / "peft", **SAVED_SCALINGS[saved])
    model = build("llama", lora_alpha=8, use_rslora=model_rslora)  # built with other scaling settings
    model.load_adapter(str(tmp_path / "peft"), "default", is_trainable=True)
    torch.testing.assert_close(logits(model, make_batch("llama")), expected, atol=1e-6, rtol=0)
    # Saved again, vanilla PEFT reads the same function back (the alpha_pattern carries each module's scaling).
    from peft import PeftModel

    model.save_pretrained(tmp_path / "again")
    again = PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "again"))
    torch.testing.assert_close(logits(again, make_batch("llama")), expected, atol=1e-6, rtol=0)


def test_resume_reproduces_the_saved_scaling(tmp_path):
    saved = build("llama", lora_alpha=32, use_rslora=True, update_every=1)
    train_steps(saved, make_batch("llama"), 2, hook=False)
    kill_gates(saved, 0.4)
    l1ra.reallocate(saved)
    saved.save_pretrained(tmp_path / "ckpt")
    resumed = build("llama", lora_alpha=8)
    resumed.load_adapter(str(tmp_path / "ckpt"), "default", is_trainable=True)
    torch.testing.assert_close(logits(resumed, make_batch("llama")), logits(saved, make_batch("llama")), atol=1e-6, rtol=0)


def test_an_adapter_of_another_kind_is_refused_naming_the_field(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules="all-linear", lora_bias=True)).save_pretrained(tmp_path / "b")
    with pytest.raises(l1ra.CheckpointError, match="lora_bias=True but this model has lora_bias=False"):
        build("llama").load_adapter(str(tmp_path / "b"), "default")


# ---------------------------------------------------------------------------------------------------------------
# Issue 9's "no import cycles": no library module imports another that imports it back, lazily or not.


def test_library_modules_import_each_other_without_cycles():
    import ast
    from pathlib import Path

    library = Path(l1ra.__file__).parent
    modules = {p.stem for p in library.glob("*.py")} - {"__init__"}
    graph = {}
    for name in modules:
        deps = set()
        for node in ast.walk(ast.parse((library / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    deps.add(node.module.split(".")[0])
                elif node.level == 1:
                    deps.update(a.name for a in node.names)
                elif node.module and node.module.startswith("l1ra."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("l1ra."))
        graph[name] = deps & modules
    done, path = set(), []

    def visit(node):
        assert node not in path, "import cycle: " + " -> ".join(path[path.index(node):] + [node])
        if node in done:
            return
        path.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        path.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


# ---------------------------------------------------------------------------------------------------------------
# 3. Merging with the gates


def _gated_trained(arch="gpt2"):
    model = build(arch)
    train_steps(model, make_batch(arch), 3, hook=False)
    kill_gates(model, 0.3)
    with torch.no_grad():
        for gate in l1ra.gates(model).values():
            gate.mul_(0.7)  # gates strictly between 0 and 1 too
    return model


def _raw(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k or "l1ra_gate" in k}


def test_merge_twice_then_unmerge_restores_gates_and_weights():
    model, batch = _gated_trained(), make_batch("gpt2")
    expected, raw = logits(model, batch), _raw(model)
    base = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    model.merge_adapter()
    model.merge_adapter()  # PEFT skips an adapter that is already merged
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    for k, v in _raw(model).items():
        assert torch.equal(v, raw[k]), k
    for k, v in model.state_dict().items():
        if k in base:
            torch.testing.assert_close(v, base[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_paths_that_read_the_delta_weight_include_the_gate(arch):
    model, batch = _gated_trained(arch), make_batch(arch)
    expected = logits(model, batch)
    st = model.l1ra_state
    for name, layer in st.layers:
        x = torch.randn(3, layer.in_features)
        delta = layer.get_delta_weight(st.adapter)
        y = x @ delta if getattr(layer, "fan_in_fan_out", False) else x @ delta.T
        with torch.no_grad():
            torch.testing.assert_close(y, layer(x) - layer.base_layer(x), atol=1e-6, rtol=0)
    model.base_model.merge_adapter()  # PEFT's own merge, below the PeftModel
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    model.base_model.unmerge_adapter()
    merged = model.base_model.merge_and_unload()
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_gated_layers_survive_pickling_into_a_fresh_process(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    model, batch = _gated_trained(), make_batch("gpt2")
    torch.save({"model": model, "batch": batch, "logits": logits(model, batch)}, tmp_path / "m.pt")
    code = (
        "import sys, torch; import l1ra.model; sys.path.insert(0, %r); "
        "d = torch.load(%r, weights_only=False); m = d['model'].eval(); "
        "x = {k: v for k, v in d['batch'].items() if k != 'labels'}; "
        "print(type(m).__name__, float((m(**x).logits - d['logits']).abs().max()))"
    ) % (str(Path(__file__).parent), str(tmp_path / "m.pt"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    name, diff = out.stdout.split()[-2:]
    assert name == "L1RAPeftModelForCausalLM" and float(diff) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# 4. A second adapter is refused, whichever way it comes in


def test_a_second_adapter_is_refused():
    from peft import LoraConfig

    model = build("llama")
    with pytest.raises(ValueError, match="holds one adapter"):
        model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="holds one adapter"):
        model.load_adapter("/nonexistent", "other")
    with pytest.raises(ValueError, match="add_weighted_adapter"):
        model.add_weighted_adapter(["default"], [1.0], "mix")
    assert list(model.peft_config) == ["default"]


def test_an_adapter_added_below_the_peft_model_stops_training_and_saving(tmp_path):
    from peft import LoraConfig

    model = build("llama")
    opt = l1ra.create_optimizer(model, lr=1e-3)
    model.peft_config["other"] = LoraConfig(r=2, target_modules=["q_proj"])
    model.base_model.inject_adapter(model.base_model.model, "other")  # PEFT's lower-level API
    gates_before = {k: v.detach().clone() for k, v in l1ra.gates(model).items()}
    with pytest.raises(ValueError, match="delete_adapter\\('other'\\)"):
        l1ra.after_optimizer_step(model, opt)
    assert all(torch.equal(v, gates_before[k]) for k, v in l1ra.gates(model).items()), "no L1 step was taken"
    with pytest.raises(ValueError, match="holds one adapter"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# 5. init_lora_weights


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal"])
def test_supported_initialisations_train_reallocate_and_merge(init):
    model, batch = build("llama", init_lora_weights=init), make_batch("llama")
    if init in (True, "gaussian"):  # B = 0: the model starts as its base
        torch.testing.assert_close(logits(model, batch), logits(make_model("llama"), batch), atol=0, rtol=0)
    opt = train_steps(model, batch, 2, hook=False)
    kill_gates(model, 0.5)
    before = logits(model, batch)
    event = l1ra.reallocate(model, opt)
    assert event.moved > 0
    torch.testing.assert_close(logits(model, batch), before, atol=1e-6, rtol=0)
    assert all(len(layer.lora_A["default"]._forward_hooks) == 1 for _, layer in model.l1ra_state.layers)
    train_steps(model, batch, 1, opt)


@pytest.mark.parametrize(
    "init,why",
    [("pissa", "pretrained"), ("pissa_niter_4", "pretrained"), ("olora", "pretrained"), ("corda", "pretrained"),
     ("loftq", "pretrained"), ("lora_ga", "pretrained weight"), ("eva", "drops the L1RA gates"), ("mica", "no gradient"),
     ("bogus", "does not know")],
)
def test_initialisations_that_would_break_l1ra_are_refused_naming_why(init, why):
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' is not supported: .*{why}.*Use one of True"):
        L1RAConfig(r=4, target_modules="all-linear", init_lora_weights=init)


# ---------------------------------------------------------------------------------------------------------------
# 6. Gates stay fp32 with bf16 adapters


def _bf16_model(**overrides):
    kwargs = dict(r=4, target_modules="all-linear", task_type="CAUSAL_LM", l1ra_lambda=0.1, eta_c=0.02, update_every=10**6)
    kwargs.update(overrides)
    base = make_model("llama").to(torch.bfloat16)
    return l1ra.get_l1ra_model(base, L1RAConfig(**kwargs), autocast_adapter_dtype=False)


def test_gates_are_fp32_with_bf16_adapters_and_the_proximal_step_is_exact():
    model = _bf16_model()
    layer = model.l1ra_state.layers[0][1]
    assert layer.lora_A["default"].weight.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in l1ra.gates(model).values())
    opt = l1ra.create_optimizer(model, lr=1e-3)
    for _ in range(50):  # tau = 0.02 * 0.1 = 2e-3 per step
        l1ra.after_optimizer_step(model, opt)
    live = l1ra.live_slots(model)
    for name, gate in l1ra.gates(model).items():  # live slots; dead ones stay at 0
        expected = torch.zeros_like(gate).index_fill_(0, torch.tensor(live[name]), 0.9)
        torch.testing.assert_close(gate.detach(), expected, atol=1e-5, rtol=0)  # bf16 gave 0.805
    l1ra.after_optimizer_step(model, opt, step=51)  # and a tau far below a bf16 step near 1 still acts
    small = _bf16_model(l1ra_lambda=1e-3)  # tau = 2e-5 < half a bf16 step at 1 (2**-9)
    l1ra.after_optimizer_step(small, l1ra.create_optimizer(small, lr=1e-3))
    assert all(bool((g < 1).all()) for g in l1ra.gates(small).values())  # live ones moved, dead ones are 0


def test_bf16_adapters_train_reallocate_and_round_trip_with_fp32_gates(tmp_path):
    model, batch = _bf16_model(l1ra_lambda=0.0), make_batch("llama")
    opt = train_steps(model, batch, 2, hook=False)
    assert all(g.grad is None or g.grad.dtype == torch.float32 for g in l1ra.gates(model).values())
    assert any(opt.state[g] for g in l1ra.gates(model).values()), "the gates trained"
    kill_gates(model, 0.5)
    l1ra.reallocate(model, opt)
    assert all(g.dtype == torch.float32 for g in l1ra.gates(model).values())
    train_steps(model, batch, 1, opt)
    model.save_pretrained(tmp_path / "ckpt")
    restored = l1ra.model.from_pretrained(make_model("llama").to(torch.bfloat16), tmp_path / "ckpt", is_trainable=True)
    for name, gate in l1ra.gates(restored).items():
        assert gate.dtype == torch.float32 and torch.equal(gate, l1ra.gates(model)[name])


def test_gates_cast_after_wrapping_are_refused():
    model = build("llama").to(torch.bfloat16)
    with pytest.raises(ValueError, match="gates are torch.bfloat16, not float32"):
        l1ra.after_optimizer_step(model, l1ra.create_optimizer(model, lr=1e-3))


# ---------------------------------------------------------------------------------------------------------------
# 7. Saved files are as readable as the umask allows


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
@pytest.mark.parametrize("adapter", ["default", "mine"])
def test_saved_files_follow_the_umask(tmp_path, umask, mode, adapter):
    import os
    import stat

    model = l1ra.get_l1ra_model(make_model("llama"), L1RAConfig(r=4, target_modules="all-linear"), adapter_name=adapter)
    old = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "out")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"adapter_model.safetensors", "l1ra_state.safetensors", "l1ra_state.json"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == mode, (path.name, oct(stat.S_IMODE(path.stat().st_mode)))


# ---------------------------------------------------------------------------------------------------------------
# 8b. The per-step library work reads no tensor value back to the host (a host sync per tensor on a GPU)


def test_a_step_without_reallocation_reads_no_tensor_back_to_the_host(monkeypatch):
    model, batch = build("llama", update_every=3), make_batch("llama")
    opt = train_steps(model, batch, 1)  # first step: one-time setup checks
    model(**batch).loss.backward()
    opt.step()
    reads = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    event = l1ra.after_optimizer_step(model, opt)  # step 2: the L1 step, no reallocation
    monkeypatch.undo()
    assert event is None and reads == []


# ---------------------------------------------------------------------------------------------------------------
# 10 (issue item 10). 4-bit NF4 bases (QLoRA) through bitsandbytes; its CPU backend runs here


def _nf4_base(directory):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quant, device_map="cpu")


def test_a_4bit_base_trains_reallocates_saves_and_loads_in_plain_peft(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    make_model("llama64").save_pretrained(tmp_path / "base")  # 4-bit shapes every CPU kernel takes
    model = l1ra.get_l1ra_model(
        _nf4_base(tmp_path / "base"),
        L1RAConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM", update_every=10**6, l1ra_lambda=0.0),
    )
    layer = model.l1ra_state.layers[0][1]
    assert type(layer.get_base_layer()).__name__ == "Linear4bit"
    assert all(g.dtype == torch.float32 for g in l1ra.gates(model).values())
    batch = make_batch("llama")
    opt = train_steps(model, batch, 2)
    kill_gates(model, 0.5)
    before = logits(model, batch)
    assert l1ra.reallocate(model, opt).moved > 0
    after = logits(model, batch)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    train_steps(model, batch, 1, opt)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    plain = PeftModel.from_pretrained(_nf4_base(tmp_path / "base"), str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(plain, batch), expected, atol=1e-5, rtol=0)
    # Merging into a 4-bit base re-quantizes W + delta (PEFT warns): close, not exact. For an exact merge, load the
    # base in full precision and merge the saved adapter there.
    assert all(layer.get_delta_weight("default").abs().sum() > 0 for _, layer in model.l1ra_state.layers)
    model.merge_adapter()
    assert (logits(model, batch) - expected).abs().max() < 0.2


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


@pytest.mark.slow
def test_load_in_4bit_without_bitsandbytes_names_the_extra(tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "from l1ra.app.cli import main\n"
            f"sys.exit(main(['train', '--load-in-4bit', '--output-dir', {str(tmp_path / 'o')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--load-in-4bit needs bitsandbytes" in proc.stderr and "pip install 'l1ra[quant]'" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_trl_sfttrainer_on_a_4bit_base_keeps_the_gates_fp32(tiny_llm_4bit, tmp_path):
    """A user's own QLoRA loop: TRL's SFTTrainer casts a quantized model's trainable parameters to bf16; the
    callback casts the gates back when the Trainer is built, before any DDP wrap (the LoRA factors stay as TRL
    chose), so the L1 steps are exact."""
    pytest.importorskip("bitsandbytes")
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_llm_4bit)
    model = l1ra.get_l1ra_model(_nf4_base(tiny_llm_4bit), L1RAConfig(r=4, target_modules="all-linear",
                                                                 task_type="CAUSAL_LM", update_every=2,
                                                                 l1ra_lambda=60.0))
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}."} for i in range(16)]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                     report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, bf16=False,
                     **{("activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__
                         else "gradient_checkpointing"): False})
    callback = l1ra.L1RACallback()
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                         optimizers=(l1ra.create_optimizer(model, lr=1e-3), None), callbacks=[callback])
    assert {g.dtype for g in l1ra.gates(model).values()} == {torch.float32}  # TRL's bf16 cast undone in on_init_end
    trainer.train()
    assert {g.dtype for g in l1ra.gates(model).values()} == {torch.float32}
    assert sum(e.moved for e in callback.events) > 0  # the L1 pruned ranks and they were handed on
