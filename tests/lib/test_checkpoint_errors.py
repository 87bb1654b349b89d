"""Hostile checkpoints are refused with `l1ra.CheckpointError` naming the file, before the model is touched; a save
that fails leaves what was saved before intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import l1ra
from l1ra import checkpoint as export
from conftest import make_model


def _config(**overrides):
    values = dict(r=4, target_modules="all-linear", task_type="CAUSAL_LM", update_every=1)
    values.update(overrides)
    return l1ra.L1RAConfig(**values)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved L1RA checkpoint whose ranks moved."""
    model = l1ra.get_l1ra_model(make_model("llama", seed=0), _config())
    with torch.no_grad():
        for i, gate in enumerate(l1ra.gates(model).values()):
            if i % 2 == 0:
                gate[:2] = 0.0
    l1ra.reallocate(model)
    directory = tmp_path_factory.mktemp("ckpt") / "adapter"
    model.save_pretrained(directory)
    return directory, l1ra.rank_pattern(model)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _fresh(**overrides):
    return l1ra.get_l1ra_model(make_model("llama", seed=0), _config(**overrides))


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_refused(model, directory, file_name, match=None):
    before, ranks = _snapshot(model), l1ra.rank_pattern(model)
    with pytest.raises(l1ra.CheckpointError) as info:
        model.load_adapter(str(directory), "default", is_trainable=True)
    assert isinstance(info.value, ValueError)
    assert str(directory / file_name) in str(info.value), str(info.value)
    if match:
        assert match in str(info.value), str(info.value)
    # Refused before anything was changed.
    assert l1ra.rank_pattern(model) == ranks
    after = _snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


def test_intact_checkpoint_loads(checkpoint, tmp_path):
    directory, ranks = checkpoint
    model = _fresh()
    model.load_adapter(str(directory), "default", is_trainable=True)
    assert l1ra.rank_pattern(model) == ranks


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "l1ra_state.safetensors"])
def test_truncated_safetensors(checkpoint, tmp_path, name):
    d = _copy(checkpoint[0], tmp_path / "c")
    data = (d / name).read_bytes()
    (d / name).write_bytes(data[: len(data) // 2])
    _assert_refused(_fresh(), d, name)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "l1ra_state.safetensors"])
def test_flipped_bytes_in_tensor_data(checkpoint, tmp_path, name):
    """Still valid safetensors, wrong numbers: the checksum in l1ra_state.json catches it."""
    d = _copy(checkpoint[0], tmp_path / "c")
    data = bytearray((d / name).read_bytes())
    data[-5] ^= 0xFF
    (d / name).write_bytes(bytes(data))
    _assert_refused(_fresh(), d, name, match="checksum")


@pytest.mark.parametrize("garbage", ["{not json", "[1, 2, 3]", "", '{"ranks": {"x": 1}, "step": 1'])
def test_garbage_state_json(checkpoint, tmp_path, garbage):
    d = _copy(checkpoint[0], tmp_path / "c")
    (d / "l1ra_state.json").write_text(garbage)
    _assert_refused(_fresh(), d, "l1ra_state.json")


@pytest.mark.parametrize("field,value", [("step", "twelve"), ("reallocations", -1), ("history", [{"bogus": 1}])])
def test_invalid_resume_fields(checkpoint, tmp_path, field, value):
    d = _copy(checkpoint[0], tmp_path / "c")
    meta = json.loads((d / "l1ra_state.json").read_text())
    meta[field] = value
    (d / "l1ra_state.json").write_text(json.dumps(meta))
    _assert_refused(_fresh(), d, "l1ra_state.json")


def test_ranks_that_do_not_match_the_weights(checkpoint, tmp_path):
    d = _copy(checkpoint[0], tmp_path / "c")
    meta = json.loads((d / "l1ra_state.json").read_text())
    name = next(iter(meta["ranks"]))
    meta["ranks"][name] += 1
    (d / "l1ra_state.json").write_text(json.dumps(meta))
    _assert_refused(_fresh(), d, "adapter_model.safetensors", match=f"do not match rank {meta['ranks'][name]}")


def test_raw_state_that_does_not_match_the_weights(checkpoint, tmp_path):
    d = _copy(checkpoint[0], tmp_path / "c")
    raw = load_file(str(d / "l1ra_state.safetensors"))
    key = next(k for k in raw if k.endswith(".gate"))
    raw[key] = torch.ones(raw[key].numel() + 1)
    save_file(raw, str(d / "l1ra_state.safetensors"))
    meta = json.loads((d / "l1ra_state.json").read_text())
    meta.pop("sha256")  # an older-format file without checksums: the shape check still refuses it
    (d / "l1ra_state.json").write_text(json.dumps(meta))
    _assert_refused(_fresh(), d, "l1ra_state.safetensors", match="do not match rank")


def test_adapter_for_another_base_model_hidden_size(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    ))
    l1ra.get_l1ra_model(other, _config()).save_pretrained(tmp_path / "other")
    _assert_refused(_fresh(), tmp_path / "other", "adapter_model.safetensors", match="another base model")


def test_adapter_for_another_base_model_module_names(tmp_path):
    gpt2 = l1ra.get_l1ra_model(make_model("gpt2"), _config(target_modules=["c_attn", "c_proj", "c_fc"]))
    gpt2.save_pretrained(tmp_path / "gpt2")
    _assert_refused(_fresh(), tmp_path / "gpt2", "l1ra_state.json", match="another base model")


def test_plain_peft_adapter_for_another_model(tmp_path):
    gpt2 = l1ra.get_l1ra_model(make_model("gpt2"), _config(target_modules=["c_attn", "c_proj", "c_fc"]))
    gpt2.save_pretrained(tmp_path / "gpt2")
    (tmp_path / "gpt2" / "l1ra_state.json").unlink()  # a plain PEFT LoRA adapter
    _assert_refused(_fresh(), tmp_path / "gpt2", "adapter_model.safetensors", match="another base model")


def test_missing_directory(tmp_path):
    with pytest.raises(l1ra.CheckpointError, match=str(tmp_path / "nope")):
        _fresh().load_adapter(str(tmp_path / "nope"), "default")


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("failing", ["peft", "state_tensors", "state_json"])
def test_failed_save_overwrites_nothing(checkpoint, tmp_path, monkeypatch, failing):
    d = _copy(checkpoint[0], tmp_path / "c")
    before = _files(d)
    model = _fresh()  # different ranks and weights from the saved checkpoint
    if failing == "peft":
        import peft

        monkeypatch.setattr(peft.PeftModel, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    elif failing == "state_tensors":
        monkeypatch.setattr(export, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    else:
        monkeypatch.setattr(export, "state_json", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(d)
    assert _files(d) == before
    assert sorted(p.name for p in d.iterdir()) == sorted(before), "no temporary files left behind"
    # And the old checkpoint still loads.
    fresh = _fresh()
    fresh.load_adapter(str(d), "default", is_trainable=True)
    assert l1ra.rank_pattern(fresh) == checkpoint[1]


def test_checkpoint_files_are_not_pickles(checkpoint):
    for p in checkpoint[0].iterdir():
        head = p.read_bytes()[:2]
        assert head != b"\x80\x04" and head != b"\x80\x02" and not head.startswith(b"PK"), p.name
        assert p.suffix in (".json", ".safetensors", ".md"), p.name
