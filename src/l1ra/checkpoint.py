"""Saving and loading.

`save_pretrained` writes a standard PEFT LoRA adapter (gates folded into A, per-module ranks in `rank_pattern`,
matching `alpha_pattern`) that any LoRA loader reads, plus two files that only resuming needs:
`l1ra_state.safetensors` (raw A and gates: a gate at 0 wipes its row of the folded A) and `l1ra_state.json`
(config, schedule position, rank history). Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from peft import set_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

from .atomic import default_mode
from .config import L1RAConfig
from .history import RankHistory
from .resize import set_adapter_rank
from .state import sync_lora_config

STATE_JSON = "l1ra_state.json"
STATE_TENSORS = "l1ra_state.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1
_PREFIX = "base_model.model."  # how PeftModel names its wrapped model's parameters


def _key(name: str, *parts: str) -> str:
    return ".".join([_PREFIX + name, *parts])


def folded_state_dict(peft_model, state_dict: Optional[dict] = None) -> dict:
    """The model's state dict with every gate folded into its A (`diag(c) A`) and the gates removed."""
    st = peft_model.l1ra_state
    sd = dict(state_dict if state_dict is not None else peft_model.state_dict())
    for name, _ in st.layers:
        a_key, g_key = _key(name, "lora_A", st.adapter, "weight"), _key(name, "l1ra_gate", st.adapter)
        gate = sd.pop(g_key)
        a = sd[a_key]
        sd[a_key] = a * gate.detach().to(device=a.device, dtype=a.dtype).unsqueeze(1)
    return sd


def _json_default(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "value"):  # enums
        return value.value
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def config_to_dict(config: L1RAConfig) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=_json_default))


def config_from_dict(values: dict) -> L1RAConfig:
    names = {f.name for f in dataclasses.fields(L1RAConfig) if f.init}
    return L1RAConfig(**{k: v for k, v in values.items() if k in names and k != "peft_type"})


def state_json(peft_model) -> dict:
    st = peft_model.l1ra_state
    return {
        "format_version": FORMAT_VERSION,
        "adapter": st.adapter,
        "budget": st.budget,
        "step": st.step,
        "reallocations": st.reallocations,
        "ranks": st.ranks(),
        "config": config_to_dict(st.config),
        "history": st.history.to_json(),
    }


def state_tensors(peft_model) -> dict[str, torch.Tensor]:
    st = peft_model.l1ra_state
    out = {}
    for name, layer in st.layers:
        out[f"{name}.lora_A"] = layer.lora_A[st.adapter].weight.detach().contiguous()
        out[f"{name}.gate"] = layer.l1ra_gate[st.adapter].detach().contiguous()
    if st.sensitivity is not None:  # receiver_signal='sensitivity': the sums since the last reallocation
        sizes = [layer.r[st.adapter] for _, layer in st.layers]
        for (name, _), part in zip(st.layers, torch.split(st.sensitivity.detach(), sizes)):
            out[f"{name}.sensitivity"] = part.contiguous()
    return out


def save_l1ra(peft_model, save_directory, *, super_save, is_main_process: bool = True, **kwargs) -> None:
    """Write the PEFT adapter (through PEFT's own `save_pretrained`) and the resume files, atomically per file."""
    st = peft_model.l1ra_state
    if kwargs.get("selected_adapters") not in (None, [st.adapter]):
        raise ValueError(f"selected_adapters={kwargs['selected_adapters']!r}: an L1RA model has one adapter, {st.adapter!r}.")
    if not kwargs.get("safe_serialization", True):
        raise ValueError("safe_serialization=False: L1RA writes safetensors only; drop the argument.")
    kwargs["state_dict"] = folded_state_dict(peft_model, kwargs.get("state_dict"))
    if not is_main_process:
        return
    target = Path(save_directory)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".l1ra-save-", dir=target))
    try:
        super_save(str(tmp), is_main_process=True, **kwargs)
        out_dir = tmp if st.adapter == "default" else tmp / st.adapter
        save_file(state_tensors(peft_model), str(out_dir / STATE_TENSORS), metadata={"format": "pt"})
        meta = state_json(peft_model)
        # Checksums of the tensor files, checked on load: catches bit rot and a directory that mixes two saves.
        meta["sha256"] = {n: _sha256(out_dir / n) for n in (ADAPTER_WEIGHTS, STATE_TENSORS) if (out_dir / n).is_file()}
        (out_dir / STATE_JSON).write_text(json.dumps(meta, indent=1))
        final_dir = target if st.adapter == "default" else target / st.adapter
        final_dir.mkdir(parents=True, exist_ok=True)
        # The resume JSON goes last: its presence marks a complete save.
        files = sorted((p for p in out_dir.iterdir() if p.is_file()), key=lambda p: p.name == STATE_JSON)
        for path in files:
            # Writers such as safetensors create 0600 files; give every file the mode the umask gives any new file,
            # so that e.g. a serving process under another user can read the adapter.
            os.chmod(path, default_mode())
            os.replace(path, final_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_meta(meta: dict, state_path: Path, directory: Path) -> None:
    """Validate the resume fields of `l1ra_state.json` and the checksums of the files it vouches for."""
    for name in ("step", "reallocations"):
        value = meta.get(name, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{state_path}: {name}={value!r} is not a step count; the file is corrupted")
    try:
        RankHistory.from_json(meta.get("history", []))
    except (TypeError, AttributeError) as err:
        raise CheckpointError(f"{state_path}: unreadable rank history ({err}); the file is corrupted") from None
    sums = meta.get("sha256", {})
    if not isinstance(sums, dict):
        raise CheckpointError(f"{state_path}: 'sha256' is not a table; the file is corrupted")
    for name, expected in sums.items():
        path = directory / name
        if path.is_file() and _sha256(path) != expected:
            raise CheckpointError(
                f"{path}: checksum does not match the one recorded in {state_path.name}; the file is corrupted or "
                "comes from another save"
            )


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model; the message names the file and the problem."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable or corrupted ({err})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, SafetensorError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable or corrupted safetensors ({err})") from None


def _adapter_params(layer, adapter: str) -> tuple:
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.l1ra_gate[adapter]


# LoraConfig fields that change what the saved weights compute; they must agree with the model's.
_SAME_KIND = {
    "use_dora": "L1RA does not support DoRA adapters",
    "lora_bias": "lora_B carries a bias in one and not the other",
}


def _check_same_kind(saved: dict, live, path: Path) -> None:
    for key, why in _SAME_KIND.items():
        value, mine = bool(saved.get(key) or False), bool(getattr(live, key, False) or False)
        if value != mine:
            raise CheckpointError(f"{path}: {key}={value} but this model has {key}={mine} ({why}); build the model with "
                                  f"{key}={value} to load this adapter")


def saved_scalings(lora_cfg: dict, ranks: dict[str, int], path: Path) -> dict[str, float]:
    """Each module's scaling as PEFT computes it from the saved config (`lora_alpha`/`alpha_pattern` over `r` or,
    with rsLoRA, over sqrt(r)), so that loading reproduces the saved function exactly."""
    alpha, patterns, rslora = lora_cfg.get("lora_alpha"), lora_cfg.get("alpha_pattern") or {}, lora_cfg.get("use_rslora")
    out = {}
    for name, r in ranks.items():
        key = get_pattern_key(patterns.keys(), name)
        a = patterns.get(key, alpha)
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or not isinstance(rslora, (bool, type(None))):
            raise CheckpointError(f"{path}: lora_alpha={a!r} / use_rslora={rslora!r} for {name} is not a valid scaling")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise CheckpointError(f"{path}: rank {r!r} of {name} is not a positive integer")
        out[name] = a / (math.sqrt(r) if rslora else r)
    return out


@torch.no_grad()
def load_into(peft_model, directory) -> None:
    """Load an L1RA checkpoint (or a plain PEFT LoRA adapter) into `peft_model`, resizing its adapters first.

    This is what `model.load_adapter(dir, adapter_name)` does on an L1RA model, so `Trainer(resume_from_checkpoint=)`
    restores the moved ranks before the optimizer state is loaded.
    """
    st = peft_model.l1ra_state
    directory = Path(directory)
    if st.adapter != "default":
        directory = directory / st.adapter if (directory / st.adapter).is_dir() else directory
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory holding an adapter")
    state_path = directory / STATE_JSON
    resume = state_path.exists()
    config_path = directory / ADAPTER_CONFIG
    lora_cfg = _read_json(config_path)
    if not isinstance(lora_cfg, dict) or lora_cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_path}: peft_type={lora_cfg.get('peft_type') if isinstance(lora_cfg, dict) else None!r}, not a LoRA adapter")
    _check_same_kind(lora_cfg, peft_model.peft_config[st.adapter], config_path)
    if resume:
        meta = _read_json(state_path)
        ranks = meta.get("ranks") if isinstance(meta, dict) else None
        if not isinstance(ranks, dict):
            raise CheckpointError(f"{state_path}: no 'ranks' table; the file is corrupted")
        _check_meta(meta, state_path, directory)
    else:
        pattern = lora_cfg.get("rank_pattern") or {}
        ranks = {name: pattern.get(get_pattern_key(pattern.keys(), name), lora_cfg.get("r")) for name, _ in st.layers}
    names = [name for name, _ in st.layers]
    if set(ranks) != set(names):
        missing, extra = sorted(set(names) - set(ranks)), sorted(set(ranks) - set(names))
        raise CheckpointError(
            f"{state_path if resume else directory / ADAPTER_CONFIG}: adapter modules do not match this model "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); was it saved from another base model or target_modules?"
        )
    weights = _read_tensors(directory / ADAPTER_WEIGHTS)
    raw = _read_tensors(directory / STATE_TENSORS) if resume else {}
    for name, layer in st.layers:
        r = ranks[name]
        a = weights.get(_key(name, "lora_A", "weight"))
        b = weights.get(_key(name, "lora_B", "weight"))
        if a is None or b is None:
            raise CheckpointError(
                f"{directory / ADAPTER_WEIGHTS}: no LoRA weights for {name}; was the adapter saved from another base "
                "model or with other target_modules?"
            )
        if not isinstance(r, int) or r < 1 or a is None or b is None or a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(
                f"{directory / ADAPTER_WEIGHTS}: weights of {name} do not match rank {r} "
                f"(lora_A {None if a is None else tuple(a.shape)}, lora_B {None if b is None else tuple(b.shape)})"
            )
        if a.shape[1] != layer.lora_A[st.adapter].in_features or b.shape[0] != layer.lora_B[st.adapter].out_features:
            raise CheckpointError(
                f"{directory / ADAPTER_WEIGHTS}: {name} has shape {tuple(b.shape)}x{tuple(a.shape)}, this model's layer "
                f"is {layer.lora_B[st.adapter].out_features}x{layer.lora_A[st.adapter].in_features}; the adapter was "
                "made for another base model"
            )
        if resume:
            raw_a, gate = raw.get(f"{name}.lora_A"), raw.get(f"{name}.gate")
            if raw_a is None or gate is None or raw_a.shape != a.shape or gate.shape != (r,):
                raise CheckpointError(f"{directory / STATE_TENSORS}: raw weights of {name} do not match rank {r}")
    scalings = saved_scalings(lora_cfg, ranks, config_path)
    for name, layer in st.layers:
        before = _adapter_params(layer, st.adapter)
        set_adapter_rank(layer, st.adapter, ranks[name])
        for old, new in zip(before, _adapter_params(layer, st.adapter)):
            if old is not new:  # an optimizer built before this load must follow (see model.adopt_loaded_params)
                st.replaced[id(old)] = (weakref.ref(old), new)
        layer.scaling[st.adapter] = scalings[name]  # the saved function, whatever this model was built with
    sync_lora_config(peft_model)
    result = set_peft_model_state_dict(peft_model, weights, adapter_name=st.adapter)
    for name, layer in st.layers:
        gate = layer.l1ra_gate[st.adapter]
        if resume:
            a = layer.lora_A[st.adapter].weight
            a.copy_(raw[f"{name}.lora_A"].to(device=a.device, dtype=a.dtype))
            gate.copy_(raw[f"{name}.gate"].to(device=gate.device, dtype=gate.dtype))
        else:
            gate.fill_(1.0)
    if resume:
        st.step = int(meta.get("step", 0))
        st.reallocations = int(meta.get("reallocations", 0))
        st.history = RankHistory.from_json(meta.get("history", []))
        parts = [raw.get(f"{name}.sensitivity") for name, _ in st.layers]
        first_gate = st.layers[0][1].l1ra_gate[st.adapter]
        st.sensitivity = (
            torch.cat([p.float() for p in parts]).to(first_gate.device)
            if all(p is not None and p.shape == (ranks[name],) for p, (name, _) in zip(parts, st.layers)) else None
        )
    return result


def read_config(directory) -> L1RAConfig:
    """The `L1RAConfig` an L1RA checkpoint was trained with."""
    path = Path(directory) / STATE_JSON
    return config_from_dict(_read_json(path)["config"])
