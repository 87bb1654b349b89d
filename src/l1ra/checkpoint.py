"""Saving and loading.

`save_pretrained` writes a standard PEFT LoRA adapter with the LIVE ranks only, compacted (gates folded into A,
per-module live ranks in `rank_pattern`, matching `alpha_pattern`) that any LoRA loader reads, plus two files that
only resuming needs, in the model's capacity layout: `l1ra_state.safetensors` (raw A and gates of every slot: a gate
at 0 wipes its row of the folded A; the live-slot mask; sensitivity sums) and `l1ra_state.json` (config, schedule
position, rank history, revived slots still waiting for their optimizer seeding). B needs no copy: its live columns
are the adapter's, its dead columns are zero. Loading expands the adapter back into capacity, so an optimizer state
saved by position in capacity shapes (Trainer checkpoints) lines up exactly. Every file is written under a temporary
name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from peft import set_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

from .atomic import default_mode
from .config import L1RAConfig
from .errors import CheckpointError
from .history import RankHistory
from .revive import grace_from_json, grace_to_json
from .slots import full, is_dtensor
from .state import live_lora_config, sync_lora_config

STATE_JSON = "l1ra_state.json"
STATE_TENSORS = "l1ra_state.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 2  # 2: resume tensors in capacity layout; 1 (live ranks only) still loads
_PREFIX = "base_model.model."  # how PeftModel names its wrapped model's parameters


def _key(name: str, *parts: str) -> str:
    return ".".join([_PREFIX + name, *parts])


def folded_state_dict(peft_model, state_dict: Optional[dict] = None) -> dict:
    """The model's state dict with the adapters compacted to their live slots, every gate folded into its A
    (`diag(c) A`) and the gates removed. Adapter tensors are read with `slots.full` (sharded ones are gathered)."""
    st = peft_model.l1ra_state
    sd = dict(state_dict if state_dict is not None else peft_model.state_dict())
    for name, _ in st.layers:
        a_key, b_key = _key(name, "lora_A", st.adapter, "weight"), _key(name, "lora_B", st.adapter, "weight")
        gate, a, b = full(sd.pop(_key(name, "l1ra_gate", st.adapter))), full(sd[a_key]), full(sd[b_key])
        idx = torch.tensor(st.live[name], dtype=torch.long)
        live_gate = gate.index_select(0, idx.to(gate.device))
        sd[a_key] = a.index_select(0, idx.to(a.device)) * live_gate.to(device=a.device, dtype=a.dtype).unsqueeze(1)
        sd[b_key] = b.index_select(1, idx.to(b.device))
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
        "capacity": st.capacities(),
        "pending": [[name, kind, slots] for (name, kind), slots in sorted(st.pending.items())],
        "grace": grace_to_json(st.grace),
        "config": config_to_dict(st.config),
        "history": st.history.to_json(),
    }


def state_tensors(peft_model, state_dict: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """Raw A, gates, live-slot masks (and sensitivity sums), full capacity, on the CPU. Read from `state_dict` when
    given (a gathered full state dict: no collective, so one process alone may save, as Trainer does under FSDP)."""
    st = peft_model.l1ra_state
    sd = state_dict if state_dict is not None else {}
    out = {}
    for name, layer in st.layers:
        gate = full(sd.get(_key(name, "l1ra_gate", st.adapter), layer.l1ra_gate[st.adapter]))
        a = sd.get(_key(name, "lora_A", st.adapter, "weight"), layer.lora_A[st.adapter].weight)
        out[f"{name}.lora_A"] = full(a).cpu().contiguous()
        out[f"{name}.gate"] = gate.cpu().contiguous()
        mask = torch.zeros(gate.shape[0], dtype=torch.uint8)
        mask[st.live[name]] = 1
        out[f"{name}.live"] = mask
    if st.sensitivity is not None:  # receiver_signal='sensitivity': the sums since the last reallocation
        sizes = list(st.capacities().values())
        for (name, _), part in zip(st.layers, torch.split(full(st.sensitivity).cpu(), sizes)):
            out[f"{name}.sensitivity"] = part.contiguous()
    return out


def save_l1ra(peft_model, save_directory, *, super_save, is_main_process: Optional[bool] = None, **kwargs) -> None:
    """Write the PEFT adapter (through PEFT's own `save_pretrained`, live ranks only) and the resume files,
    atomically per file. Every process must call it when the adapters are sharded (the tensors are gathered)."""
    st = peft_model.l1ra_state
    if kwargs.get("selected_adapters") not in (None, [st.adapter]):
        raise ValueError(f"selected_adapters={kwargs['selected_adapters']!r}: an L1RA model has one adapter, {st.adapter!r}.")
    if not kwargs.get("safe_serialization", True):
        raise ValueError("safe_serialization=False: L1RA writes safetensors only; drop the argument.")
    tensors = state_tensors(peft_model, kwargs.get("state_dict"))
    kwargs["state_dict"] = folded_state_dict(peft_model, kwargs.get("state_dict"))
    if is_main_process is None:  # sharded (FSDP2) adapters: every process gathers above, process 0 writes
        from .sharded import process_index

        is_main_process = not any(is_dtensor(g) for g in st.gates().values()) or process_index() == 0
    if not is_main_process:
        return
    target = Path(save_directory)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".l1ra-save-", dir=target))
    configs = peft_model.peft_config
    capacity_config = configs[st.adapter]
    try:
        configs[st.adapter] = live_lora_config(peft_model)  # what PEFT writes as adapter_config.json
        try:
            super_save(str(tmp), is_main_process=True, **kwargs)
        finally:
            configs[st.adapter] = capacity_config
        out_dir = tmp if st.adapter == "default" else tmp / st.adapter
        save_file(tensors, str(out_dir / STATE_TENSORS), metadata={"format": "pt"})
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


def _checked_module(name, layer, adapter, r, capacity, weights, raw, version, directory) -> list[int]:
    """Validate one module's saved tensors against this model; returns the slots its live ranks go to."""
    a, b = weights.get(_key(name, "lora_A", "weight")), weights.get(_key(name, "lora_B", "weight"))
    if a is None or b is None:
        raise CheckpointError(
            f"{directory / ADAPTER_WEIGHTS}: no LoRA weights for {name}; was the adapter saved from another base "
            "model or with other target_modules?"
        )
    if not isinstance(r, int) or r < 1 or a.shape[0] != r or b.shape[1] != r:
        raise CheckpointError(
            f"{directory / ADAPTER_WEIGHTS}: weights of {name} do not match rank {r} "
            f"(lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)})"
        )
    in_f, out_f = layer.lora_A[adapter].in_features, layer.lora_B[adapter].out_features
    if a.shape[1] != in_f or b.shape[0] != out_f:
        raise CheckpointError(
            f"{directory / ADAPTER_WEIGHTS}: {name} has shape {tuple(b.shape)}x{tuple(a.shape)}, this model's layer "
            f"is {out_f}x{in_f}; the adapter was made for another base model"
        )
    if r > capacity:
        raise CheckpointError(
            f"{directory}: {name} holds {r} ranks but this model's adapters hold at most {capacity} (their capacity); "
            f"build the model with L1RAConfig(max_rank=...) at least as large as the adapter's largest rank"
        )
    if raw is None:
        return list(range(r))
    raw_a, gate = raw.get(f"{name}.lora_A"), raw.get(f"{name}.gate")
    size = capacity if version >= 2 else r
    if raw_a is None or gate is None or raw_a.shape != (size, in_f) or gate.shape != (size,):
        raise CheckpointError(f"{directory / STATE_TENSORS}: raw weights of {name} do not match rank {r}"
                              + (f" in this model's capacity {capacity} (resuming needs the capacity the checkpoint "
                                 "was trained with: build the model with the same L1RAConfig max_rank)"
                                 if version >= 2 else ""))
    if version < 2:
        return list(range(r))
    live = raw.get(f"{name}.live")
    if live is None or live.shape != (capacity,) or int(live.bool().sum()) != r:
        raise CheckpointError(f"{directory / STATE_TENSORS}: live slots of {name} do not match rank {r}")
    return live.bool().nonzero().flatten().tolist()


def _expanded(t: torch.Tensor, dim: int, slots: list[int], capacity: int) -> torch.Tensor:
    """A compact (live-ranks) tensor placed into its slots along `dim` of a capacity-sized one (dead slots zero)."""
    shape = list(t.shape)
    shape[dim] = capacity
    return t.new_zeros(shape).index_copy_(dim, torch.tensor(slots, dtype=torch.long), t)


def _read_source(peft_model, directory: Path):
    """(lora config, resume meta or None, live ranks per module, format version) of an adapter folder."""
    st = peft_model.l1ra_state
    config_path = directory / ADAPTER_CONFIG
    lora_cfg = _read_json(config_path)
    if not isinstance(lora_cfg, dict) or lora_cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_path}: peft_type={lora_cfg.get('peft_type') if isinstance(lora_cfg, dict) else None!r}, not a LoRA adapter")
    _check_same_kind(lora_cfg, peft_model.peft_config[st.adapter], config_path)
    state_path = directory / STATE_JSON
    meta, version = None, 0
    if state_path.exists():
        meta = _read_json(state_path)
        ranks = meta.get("ranks") if isinstance(meta, dict) else None
        if not isinstance(ranks, dict):
            raise CheckpointError(f"{state_path}: no 'ranks' table; the file is corrupted")
        _check_meta(meta, state_path, directory)
        version = meta.get("format_version", 1)
    else:
        pattern = lora_cfg.get("rank_pattern") or {}
        ranks = {name: pattern.get(get_pattern_key(pattern.keys(), name), lora_cfg.get("r")) for name, _ in st.layers}
    names = [name for name, _ in st.layers]
    if set(ranks) != set(names):
        missing, extra = sorted(set(names) - set(ranks)), sorted(set(ranks) - set(names))
        raise CheckpointError(
            f"{state_path if meta is not None else config_path}: adapter modules do not match this model "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); was it saved from another base model or target_modules?"
        )
    return lora_cfg, meta, ranks, version


@torch.no_grad()
def load_into(peft_model, directory):
    """Load an L1RA checkpoint (or a plain PEFT LoRA adapter) into `peft_model`'s fixed-capacity adapters: the saved
    live ranks go into their slots (a plain adapter's r_i ranks into the first r_i slots), every other slot is dead.

    This is what `model.load_adapter(dir, adapter_name)` does on an L1RA model, so `Trainer(resume_from_checkpoint=)`
    restores the ranks before the optimizer state (saved in capacity shapes) is loaded by position.
    """
    st = peft_model.l1ra_state
    directory = Path(directory)
    if st.adapter != "default":
        directory = directory / st.adapter if (directory / st.adapter).is_dir() else directory
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory holding an adapter")
    lora_cfg, meta, ranks, version = _read_source(peft_model, directory)
    weights = _read_tensors(directory / ADAPTER_WEIGHTS)
    raw = _read_tensors(directory / STATE_TENSORS) if meta is not None else None
    caps = st.capacities()
    slots = {
        name: _checked_module(name, layer, st.adapter, ranks[name], caps[name], weights, raw, version, directory)
        for name, layer in st.layers
    }
    scalings = saved_scalings(lora_cfg, ranks, directory / ADAPTER_CONFIG)
    for name, layer in st.layers:
        a_key, b_key = _key(name, "lora_A", "weight"), _key(name, "lora_B", "weight")
        a = weights[a_key] if raw is None else raw[f"{name}.lora_A"].to(weights[a_key].dtype)  # raw: unfolded A
        weights[a_key] = a if a.shape[0] == caps[name] and raw is not None else _expanded(a, 0, slots[name], caps[name])
        weights[b_key] = _expanded(weights[b_key], 1, slots[name], caps[name])
        layer.scaling[st.adapter] = scalings[name]  # the saved function, whatever this model was built with
        st.live[name] = slots[name]
    sync_lora_config(peft_model)
    result = set_peft_model_state_dict(peft_model, weights, adapter_name=st.adapter)
    for name, layer in st.layers:
        gate = layer.l1ra_gate[st.adapter]
        values = torch.zeros(caps[name])
        if raw is None:
            values[slots[name]] = 1.0
        elif version >= 2:
            values = raw[f"{name}.gate"].float()
        else:
            values[slots[name]] = raw[f"{name}.gate"].float()
        gate.copy_(values.to(device=gate.device, dtype=gate.dtype))
    if meta is not None:
        _restore_meta(st, meta, raw, slots, caps)
    return result


def _restore_meta(st, meta: dict, raw: dict, slots: dict, caps: dict) -> None:
    st.step = int(meta.get("step", 0))
    st.reallocations = int(meta.get("reallocations", 0))
    st.history = RankHistory.from_json(meta.get("history", []))
    pending = meta.get("pending", [])
    st.pending = {(name, kind): list(map(int, s)) for name, kind, s in pending} if isinstance(pending, list) else {}
    st.grace = grace_from_json(meta.get("grace", []))
    parts = []
    for name, _ in st.layers:
        part = raw.get(f"{name}.sensitivity")
        if part is None:
            break
        if part.shape == (len(slots[name]),) and part.shape != (caps[name],):  # format 1: live ranks only
            part = _expanded(part.float(), 0, slots[name], caps[name])
        if part.shape != (caps[name],):
            break
        parts.append(part.float())
    first_gate = st.layers[0][1].l1ra_gate[st.adapter]
    st.sensitivity = torch.cat(parts).to(first_gate.device) if len(parts) == len(st.layers) else None


def read_config(directory) -> L1RAConfig:
    """The `L1RAConfig` an L1RA checkpoint was trained with."""
    path = Path(directory) / STATE_JSON
    return config_from_dict(_read_json(path)["config"])
