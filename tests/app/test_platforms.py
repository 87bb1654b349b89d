"""Decisions that depend on the machine (GPU or CPU kind), tested here without the machine: the dtype the base model
is loaded in per device plan, native bf16 only on GPUs that compute it, and bitsandbytes' 4-bit CPU kernels (the
shapes they take, the `kernels` note they print)."""

from __future__ import annotations

import logging

import pytest
import torch

import l1ra
from conftest import make_model
from l1ra.app.devices import DevicePlan, current_plan
from l1ra.app.train.models import load_model
from l1ra.app.train.options import RunError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_model("llama").save_pretrained(path)
    return path


# ---- the base model in the run's precision (on CUDA), adapters and gates in float32 ---------------------------------


@pytest.mark.parametrize("plan,base_dtype", [
    (DevicePlan("cuda", bf16=True), torch.bfloat16),
    (DevicePlan("cuda", fp16=True), torch.float16),  # fp16 autocast + the Trainer's scaler
    (DevicePlan("cuda"), torch.float32),  # --bf16 false
    (DevicePlan("cpu", bf16=True), torch.float32),  # CPU autocast keeps the float32 weights
    (DevicePlan("mps"), torch.float32),
])
def test_the_base_model_is_loaded_in_the_plans_precision_and_the_adapters_stay_fp32(tiny_dir, plan, base_dtype):
    model = load_model(str(tiny_dir), "causal-lm", plan=plan)  # no placement: the Trainer moves it to the device
    assert {p.dtype for p in model.parameters()} == {base_dtype}
    model = l1ra.get_l1ra_model(model, l1ra.L1RAConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert {g.dtype for g in l1ra.gates(model).values()} == {torch.float32}


# ---- bf16 only where the GPU computes it -----------------------------------------------------------------------------


def test_a_gpu_that_only_emulates_bf16_gets_fp16_with_the_scaler(monkeypatch):
    """T4 / V100: torch says bf16 is supported by default (emulated), not with `including_emulation=False`."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert current_plan() == DevicePlan("cuda", fp16=True)
    assert current_plan().model_dtype() == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    assert current_plan() == DevicePlan("cuda", bf16=True)


# ---- bitsandbytes' 4-bit CPU kernels ---------------------------------------------------------------------------------


def test_load_in_4bit_on_cpu_refuses_shapes_the_kernels_cannot_pack_before_quantizing(tiny_dir):
    """On AVX-512-BF16 CPUs bitsandbytes repacks NF4 weights in blocks of 64 at the first evaluation and crashes on
    the 32-wide tiny Llama (`shape '[32, 0]' is invalid`); `l1ra train --load-in-4bit` refuses it on every CPU."""
    pytest.importorskip("bitsandbytes")
    with pytest.raises(RunError) as err:
        load_model(str(tiny_dir), "causal-lm", load_in_4bit=True, plan=DevicePlan("cpu"))
    message = str(err.value)
    assert message.startswith("--load-in-4bit: on the CPU, bitsandbytes' 4-bit kernels need linear layers whose in "
                              "and out features are multiples of 64;")
    assert "model.layers.0.self_attn.q_proj (32 -> 32)" in message and "more" in message
    assert "lm_head" not in message  # transformers leaves the output head unquantized


def test_load_in_4bit_on_cpu_loads_a_model_whose_shapes_fit(tmp_path):
    pytest.importorskip("bitsandbytes")
    make_model("llama64").save_pretrained(tmp_path)
    model = load_model(str(tmp_path), "causal-lm", load_in_4bit=True, plan=DevicePlan("cpu"))
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(quantized) == 14 and all(m.in_features % 64 == 0 and m.out_features % 64 == 0 for m in quantized)


def test_a_4bit_base_is_never_repacked_for_the_avx512_kernel_so_training_keeps_its_gradients(tmp_path, monkeypatch):
    """On AVX-512-BF16 CPUs bitsandbytes repacks a weight at the first evaluation and from then on runs every forward,
    training too, through `gemv_4bit`, which has no autograd formula. Simulated here: bitsandbytes is told the CPU
    has AVX-512-BF16 when the layers are built; `load_model` turns the repacking off."""
    bnb_modules = pytest.importorskip("bitsandbytes.nn.modules")
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    make_model("llama64").save_pretrained(tmp_path)
    model = load_model(str(tmp_path), "causal-lm", load_in_4bit=True, plan=DevicePlan("cpu"))
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized and not any(m.support_avx512bf16_for_cpu for m in quantized)
    ids = torch.arange(8).unsqueeze(0)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # an evaluation: the moment bitsandbytes would repack
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in quantized)
    model.train()
    embeddings = model.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    model(input_ids=ids, labels=ids).loss.backward()  # the gradient crosses every 4-bit layer
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


def _kernels_note(logger):
    # bitsandbytes/backends/cpu/ops.py, logged at import on CPUs with AVX-512-BF16 when `kernels` is missing
    logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                   "`pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")


def test_the_bitsandbytes_kernels_note_is_hidden_unless_the_run_loads_4_bit(tmp_path, caplog):
    from l1ra.app.cli import main
    from l1ra.app.console import show_bnb_kernels_note

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    try:
        assert main(["report", str(tmp_path / "none")]) != 0  # any command installs the filter first
        with caplog.at_level(logging.WARNING):
            _kernels_note(logger)
            logger.warning("another bitsandbytes warning")
        assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
        caplog.clear()
        show_bnb_kernels_note(True)  # what `l1ra train --load-in-4bit` does
        with caplog.at_level(logging.WARNING):
            _kernels_note(logger)
        assert len(caplog.records) == 1 and "kernels-community" in caplog.records[0].getMessage()
    finally:
        show_bnb_kernels_note(True)


# ---- on a real GPU (benchmarks/gpu_check.sh runs these first: pytest -m cuda) ---------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _train_one_step(model, plan):
    from conftest import make_batch

    model = l1ra.get_l1ra_model(model, l1ra.L1RAConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    batch = {k: v.to("cuda") for k, v in make_batch("llama").items()}
    with torch.autocast("cuda", dtype=plan.model_dtype(), enabled=plan.bf16 or plan.fp16):
        loss = model(**batch).loss
    loss.backward()
    grads = [g.grad for g in l1ra.gates(model).values()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    return model


@pytest.mark.cuda
@needs_cuda
def test_on_this_gpu_bf16_follows_the_hardware_and_the_base_loads_in_the_plans_precision(tiny_dir):
    plan = current_plan()
    native = torch.cuda.get_device_capability() >= (8, 0)  # Ampere and later compute bf16
    assert plan == DevicePlan("cuda", bf16=native, fp16=not native)
    model = load_model(str(tiny_dir), "causal-lm", plan=plan).to("cuda")
    assert {p.dtype for p in model.parameters()} == {plan.model_dtype()}
    _train_one_step(model, plan)


@pytest.mark.cuda
@needs_cuda
def test_on_this_gpu_a_4bit_base_loads_on_the_gpu_and_trains(tmp_path):
    pytest.importorskip("bitsandbytes")
    make_model("llama64").save_pretrained(tmp_path)
    plan = current_plan()
    model = load_model(str(tmp_path), "causal-lm", load_in_4bit=True, plan=plan)
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized and all(m.weight.device.type == "cuda" for m in quantized)
    _train_one_step(model, plan)
