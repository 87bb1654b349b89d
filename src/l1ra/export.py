"""Re-write a LoRA adapter so that engines other than PEFT compute the same function, and truncate it to a budget.

Works on any PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`), an L1RA one included
(its gates are already folded into A there). Three building blocks, each a plain function on tensors:

- `module_scalings`: the scaling PEFT gives each module (r, lora_alpha, rank_pattern, alpha_pattern, use_rslora),
  found with PEFT's own pattern matcher.
- `fold_scaling` / `pad_ranks`: B <- s_i B (scale 1 everywhere), then zero ranks up to one rank R. With
  `r = lora_alpha = R` and no patterns every engine computes scale 1 and the same B A ("uniform" form).
- `truncate`: the best adapter with N ranks in all (Eckart-Young per module): a thin SVD of each s_i B_i A_i through
  QR of its factors (no out x in matrix is formed), then the N largest singular values over all modules are kept,
  at least one per module (PEFT needs r >= 1).

`export_adapter` puts them together and writes a PEFT folder ("peft" or "uniform"); the llama.cpp GGUF writer is
in the application (`l1ra.app.deploy.gguf_export`), since it needs the `gguf` package.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"
FORMATS = ("peft", "uniform")


class ExportError(ValueError):
    """An adapter that cannot be exported as asked; the message names the file or option and the fix."""


@dataclasses.dataclass
class LoraModule:
    """One adapted layer: its update is `scaling * B @ A`, with A `(r, in)` and B `(out, r)`."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclasses.dataclass
class LoraAdapter:
    """A PEFT LoRA adapter in memory: its config (as `adapter_config.json` holds it), its modules by full name
    (`model.layers.0.self_attn.q_proj`), and any other saved tensors (e.g. `modules_to_save`) by state-dict key."""

    config: dict
    modules: dict[str, LoraModule]
    extra: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def ranks(self) -> dict[str, int]:
        return {name: m.rank for name, m in self.modules.items()}


# ---------------------------------------------------------------------------------------------------------- reading


def adapter_folder(src) -> Path:
    """`src` as a Path, checked to be a PEFT LoRA adapter folder (`l1ra export` also takes an `l1ra train` output
    folder: the application finds the adapter in it)."""
    src = Path(src)
    if not src.is_dir():
        raise ExportError(f"{src}: no such folder; pass a PEFT LoRA adapter folder")
    if not (src / ADAPTER_CONFIG).is_file():
        raise ExportError(f"{src}: holds no {ADAPTER_CONFIG}; pass a PEFT LoRA adapter folder")
    return src


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: unreadable or corrupted ({err})") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path}: not a JSON object; the file is corrupted")
    return value


def module_scalings(config: dict, names) -> dict[str, float]:
    """The scaling PEFT gives each module `name` (full module name) under the LoRA `config` (a dict as in
    `adapter_config.json`): rank and alpha from the first matching `rank_pattern` / `alpha_pattern` key (PEFT's own
    matcher, `(.*\\.)?key$`), else `r` / `lora_alpha`; `alpha / r`, or `alpha / sqrt(r)` with `use_rslora`."""
    from peft.utils.other import get_pattern_key

    rank_pat, alpha_pat = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    out = {}
    for name in names:
        r = rank_pat.get(get_pattern_key(rank_pat.keys(), name), config["r"])
        alpha = alpha_pat.get(get_pattern_key(alpha_pat.keys(), name), config["lora_alpha"])
        out[name] = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    return out


def _pattern_ranks(config: dict, names) -> dict[str, int]:
    from peft.utils.other import get_pattern_key

    rank_pat = config.get("rank_pattern") or {}
    return {name: rank_pat.get(get_pattern_key(rank_pat.keys(), name), config["r"]) for name in names}


def read_adapter(directory) -> LoraAdapter:
    """Load a PEFT LoRA adapter folder into a `LoraAdapter` (tensors on the CPU, in their saved dtype)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = _read_json(directory / ADAPTER_CONFIG)
    where = directory / ADAPTER_CONFIG
    if config.get("peft_type") != "LORA":
        raise ExportError(f"{where}: peft_type={config.get('peft_type')!r}; only LoRA adapters can be exported")
    for key, bad, why in (("use_dora", True, "DoRA"), ("lora_bias", True, "a LoRA bias")):
        if config.get(key) == bad:
            raise ExportError(f"{where}: {key}={bad}: adapters with {why} are not supported by export")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
            raise ExportError(f"{where}: {key}={config.get(key)!r} is not a number; the file is corrupted")
    weights_path = directory / ADAPTER_WEIGHTS
    try:
        state = load_file(str(weights_path))
    except FileNotFoundError:
        hint = " (a .bin adapter: re-save it with safe_serialization=True)" if (directory / "adapter_model.bin").exists() else ""
        raise ExportError(f"{weights_path}: file not found{hint}") from None
    except (OSError, SafetensorError, ValueError) as err:
        raise ExportError(f"{weights_path}: unreadable or corrupted safetensors ({err})") from None
    names = sorted({k[len(_PREFIX):-len(_A)] for k in state if k.startswith(_PREFIX) and k.endswith(_A)})
    if not names:
        raise ExportError(f"{weights_path}: holds no LoRA weights ('*.lora_A.weight')")
    unsupported = [k for k in state if "lora_embedding" in k or "lora_magnitude" in k]
    if unsupported:
        raise ExportError(f"{weights_path}: {unsupported[0]}: embedding LoRA and DoRA are not supported by export")
    expected = _pattern_ranks(config, names)
    scalings = module_scalings(config, names)
    modules, used = {}, set()
    for name in names:
        a, b = state.get(_PREFIX + name + _A), state.get(_PREFIX + name + _B)
        if b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ExportError(
                f"{weights_path}: {name}: lora_A {tuple(a.shape)} and lora_B "
                f"{None if b is None else tuple(b.shape)} are not a matching pair of matrices (conv LoRA and "
                "missing halves are not supported)"
            )
        if a.shape[0] != expected[name]:
            raise ExportError(
                f"{where}: {name} has rank {a.shape[0]} in the weights but {expected[name]} in the config "
                "(r / rank_pattern); the folder mixes two adapters"
            )
        modules[name] = LoraModule(a, b, scalings[name])
        used.update((_PREFIX + name + _A, _PREFIX + name + _B))
    extra = {k: v for k, v in state.items() if k not in used}
    return LoraAdapter(config=config, modules=modules, extra=extra, path=directory)


# -------------------------------------------------------------------------------------------------------- transforms


def fold_scaling(adapter: LoraAdapter) -> LoraAdapter:
    """The same adapter with each module's scaling multiplied into B (every scaling becomes 1)."""
    modules = {
        n: LoraModule(m.a, (m.b.double() * m.scaling).to(m.b.dtype), 1.0) for n, m in adapter.modules.items()
    }
    return dataclasses.replace(adapter, modules=modules)


def uniform_rank(ranks, multiple: int = 16) -> int:
    """The smallest multiple of `multiple` that is >= every rank in `ranks`."""
    top = max(ranks)
    return max(multiple, -(-top // multiple) * multiple)


def pad_ranks(adapter: LoraAdapter, rank: int) -> LoraAdapter:
    """Every module padded with zero ranks up to `rank` (A gets zero rows, B zero columns): same function."""
    top = max(adapter.ranks.values())
    if rank < top:
        worst = max(adapter.ranks, key=adapter.ranks.get)
        raise ExportError(f"rank={rank} is below the largest rank in the adapter ({top}, {worst}); use rank >= {top}")
    modules = {}
    for name, m in adapter.modules.items():
        extra = rank - m.rank
        a = torch.cat([m.a, m.a.new_zeros(extra, m.a.shape[1])], dim=0)
        b = torch.cat([m.b, m.b.new_zeros(m.b.shape[0], extra)], dim=1)
        modules[name] = LoraModule(a, b, m.scaling)
    return dataclasses.replace(adapter, modules=modules)


def svd_factors(a: torch.Tensor, b: torch.Tensor, scaling: float = 1.0):
    """`(U, S, Vh)` with `scaling * b @ a == U @ diag(S) @ Vh`, S descending, U `(out, r)`, Vh `(r, in)`, in float64,
    through QR of the two thin factors: only r x r matrices are decomposed. Always r triplets (zeros past the
    factors' rank)."""
    r = a.shape[0]
    qb, rb = torch.linalg.qr(b.double())  # b = qb rb
    qa, ra = torch.linalg.qr(a.double().T)  # a = ra^T qa^T
    u, s, vh = torch.linalg.svd(scaling * rb @ ra.T, full_matrices=False)
    u, vh = qb @ u, vh @ qa.T
    if s.numel() < r:  # r > min(out, in): the extra directions are zero; keep r of them so ranks add up
        extra = r - s.numel()
        u = torch.cat([u, u.new_zeros(u.shape[0], extra)], dim=1)
        s = torch.cat([s, s.new_zeros(extra)])
        vh = torch.cat([vh, vh.new_zeros(extra, vh.shape[1])], dim=0)
    return u, s, vh


def budget_ranks(sigmas: dict[str, torch.Tensor], budget: int) -> dict[str, int]:
    """How many singular values each module keeps when `budget` ranks are shared: each module keeps its largest one
    (PEFT needs r >= 1), the remaining `budget - modules` go to the largest of the rest, over all modules."""
    names = list(sigmas)
    total = sum(int(s.numel()) for s in sigmas.values())
    if budget < len(names) or budget > total:
        raise ExportError(
            f"budget={budget}: must be between the number of adapted modules ({len(names)}, one rank each) and the "
            f"adapter's total rank ({total})"
        )
    keep = {n: 1 for n in names}
    rest = [(float(sigmas[n][i]), k, n) for k, n in enumerate(names) for i in range(1, sigmas[n].numel())]
    rest.sort(key=lambda t: (-t[0], t[1]))  # ties: module order, so the result is deterministic
    for _, _, n in rest[: budget - len(names)]:
        keep[n] += 1
    return keep


def budget_from_fraction(adapter: LoraAdapter, fraction: float) -> int:
    """`round(fraction * total rank)`, at least one rank per module."""
    if not 0 < fraction <= 1:
        raise ExportError(f"fraction={fraction}: must be in (0, 1]")
    total = sum(adapter.ranks.values())
    return max(len(adapter.modules), round(fraction * total))


def truncate(adapter: LoraAdapter, budget: int) -> LoraAdapter:
    """The adapter with `budget` ranks in all, each module the best rank-k_i approximation of its `s_i B_i A_i`
    (Eckart-Young), the k_i chosen by the largest singular values over all modules (see `budget_ranks`).
    Scalings are folded in (every scaling is 1); B = U sqrt(S), A = sqrt(S) Vh, in the original dtype."""
    factors = {n: svd_factors(m.a, m.b, m.scaling) for n, m in adapter.modules.items()}
    keep = budget_ranks({n: f[1] for n, f in factors.items()}, budget)
    modules = {}
    for name, (u, s, vh) in factors.items():
        k, m = keep[name], adapter.modules[name]
        root = s[:k].sqrt()
        modules[name] = LoraModule((root[:, None] * vh[:k]).to(m.a.dtype), (u[:, :k] * root).to(m.b.dtype), 1.0)
    return dataclasses.replace(adapter, modules=modules)


def budget_curve(adapter: LoraAdapter, budgets) -> list[dict]:
    """For each budget: the share of the adapter's update that `truncate` keeps, `sum kept sigma^2 / sum sigma^2` over
    all modules (1 - the squared relative Frobenius error of the stacked updates). A cheap, model-free guide to how
    small the adapter can get; held-out loss is the real test."""
    sigmas = singular_values(adapter)
    total = sum(float((s**2).sum()) for s in sigmas.values()) or 1.0
    rows = []
    for budget in budgets:
        keep = budget_ranks(sigmas, int(budget))
        kept = sum(float((sigmas[n][: keep[n]] ** 2).sum()) for n in sigmas)
        rows.append({"budget": int(budget), "kept": kept / total, "max_rank": max(keep.values())})
    return rows


def singular_values(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """Each module's singular values of `s_i B_i A_i`, descending (float64)."""
    return {n: svd_factors(m.a, m.b, m.scaling)[1] for n, m in adapter.modules.items()}


# ---------------------------------------------------------------------------------------------------------- writing

# Fields that describe ranks and scalings: `lora_config` sets them; everything else is kept from the source.
_SCALE_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora")


def lora_config(adapter: LoraAdapter, uniform: bool = False):
    """PEFT's own `LoraConfig` for `adapter`: the source config with r / lora_alpha / patterns re-expressed.

    uniform: every module must have one rank R and scaling 1; gives `r = lora_alpha = R`, no patterns.
    Otherwise: `use_rslora` false, `rank_pattern` and `alpha_pattern` (alpha_i = s_i * r_i) for every module by full
    name, `r` the largest rank (with its alpha); checked against PEFT's matcher so each module gets its own values.
    """
    from peft import LoraConfig

    ranks = adapter.ranks
    if uniform:
        assert len(set(ranks.values())) == 1, "pad the ranks first"
        assert all(m.scaling == 1.0 for m in adapter.modules.values()), "fold the scalings first"
        rank = next(iter(ranks.values()))
        scale = dict(r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={}, use_rslora=False)
    else:
        alphas = {n: m.scaling * m.rank for n, m in adapter.modules.items()}
        # top-level r = the largest rank: engines that size their buffers by `r` fit every module
        r = max(ranks.values())
        top = [alphas[n] for n in ranks if ranks[n] == r]
        alpha = max(set(top), key=lambda a: (top.count(a), a))
        scale = dict(r=r, lora_alpha=alpha, rank_pattern=dict(ranks), alpha_pattern=alphas, use_rslora=False)
    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    kept = {k: v for k, v in adapter.config.items() if k in known and k not in _SCALE_FIELDS and k != "peft_type"}
    config = LoraConfig(**kept, **scale)
    written = config.to_dict()
    got_r = _pattern_ranks(written, ranks)
    got_s = module_scalings(written, ranks)
    for name, m in adapter.modules.items():  # PEFT will rebuild exactly these ranks and scalings
        if got_r[name] != m.rank or not math.isclose(got_s[name], m.scaling, rel_tol=1e-12):
            raise ExportError(f"{name}: its rank/alpha pattern keys also match another module; cannot write patterns")
    return config


def save_peft(adapter: LoraAdapter, out, uniform: bool = False) -> Path:
    """Write `adapter` as a PEFT folder at `out` (replaced in one rename): `adapter_config.json` through PEFT's
    `LoraConfig.save_pretrained`, weights as `adapter_model.safetensors` under PEFT's key names."""
    from safetensors.torch import save_file

    from .atomic import atomic_dir

    config = lora_config(adapter, uniform=uniform)
    state = dict(adapter.extra)
    for name, m in adapter.modules.items():
        state[_PREFIX + name + _A] = m.a.contiguous()
        state[_PREFIX + name + _B] = m.b.contiguous()
    out = Path(out)
    with atomic_dir(out) as tmp:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if adapter.path is not None:  # keep the tokenizer and model card next to the adapter
            for path in adapter.path.iterdir():
                if path.is_file() and (path.name.startswith("tokenizer") or path.name in (
                        "special_tokens_map.json", "chat_template.jinja", "README.md")):
                    (tmp / path.name).write_bytes(path.read_bytes())
    return out


def prepare(src, rank: Optional[int] = None, budget: Optional[int] = None, fraction: Optional[float] = None,
            uniform: bool = False) -> LoraAdapter:
    """Read the adapter folder `src` and apply `budget`/`fraction`, then (uniform)
    fold the scalings and pad to `rank` (default: the smallest multiple of 16 >= the largest rank)."""
    if budget is not None and fraction is not None:
        raise ExportError("budget and fraction both given: pass one of them")
    if rank is not None and not uniform:
        raise ExportError("rank is for the uniform and gguf formats; drop it, or pass format='uniform'")
    if rank is not None and rank < 1:
        raise ExportError(f"rank={rank}: must be >= 1")
    adapter = read_adapter(adapter_folder(src))
    if fraction is not None:
        budget = budget_from_fraction(adapter, fraction)
    if budget is not None:
        adapter = truncate(adapter, int(budget))
    if uniform:
        adapter = fold_scaling(adapter)
        adapter = pad_ranks(adapter, rank if rank is not None else uniform_rank(adapter.ranks.values()))
    return adapter


def check_out(out, src, overwrite: bool) -> Path:
    """`out` as a Path; refuses to replace the source or, without `overwrite`, anything that exists."""
    out = Path(out)
    adapter_dir, target = adapter_folder(src).resolve(), out.resolve()
    if target == adapter_dir or adapter_dir in target.parents or target in adapter_dir.parents:
        raise ExportError(f"out={out}: would overwrite the source adapter; choose another folder")
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise ExportError(f"out={out}: already exists; choose another path or pass overwrite=True (--overwrite)")
    return out


def export_adapter(src, out, format: str = "peft", rank: Optional[int] = None, budget: Optional[int] = None,
                   fraction: Optional[float] = None, overwrite: bool = False) -> Path:
    """Write the adapter in the folder `src` (any PEFT LoRA adapter folder) to the folder `out` and return it.

    format "peft": per-module ranks and alphas as `rank_pattern` / `alpha_pattern` (PEFT, transformers, vLLM >= 0.32).
    format "uniform": every module zero-padded to one rank (`rank`, default the smallest multiple of 16 >= the largest
    rank), scalings folded into B, `r = lora_alpha = rank`, no patterns: every LoRA engine computes the same function.
    budget / fraction: keep that many ranks in all (or that fraction of the total), by the largest singular values.
    For llama.cpp (GGUF) see `l1ra.app.deploy.gguf_export.export_gguf` or `l1ra export --format gguf`.
    """
    if format not in FORMATS:
        hint = "; for gguf use l1ra.app.deploy.gguf_export.export_gguf" if format == "gguf" else ""
        raise ExportError(f"format={format!r}: choose one of {', '.join(FORMATS)}{hint}")
    out = check_out(out, src, overwrite)
    adapter = prepare(src, rank=rank, budget=budget, fraction=fraction, uniform=format == "uniform")
    return save_peft(adapter, out, uniform=format == "uniform")


def delta_weights(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """`{name: scaling * B @ A}` in float64 (forms out x in matrices: for tests and small models)."""
    return {n: m.scaling * m.b.double() @ m.a.double() for n, m in adapter.modules.items()}


__all__ = [
    "ExportError", "LoraAdapter", "LoraModule", "adapter_folder", "budget_curve", "budget_from_fraction", "budget_ranks",
    "delta_weights", "export_adapter", "fold_scaling", "lora_config", "module_scalings", "pad_ranks", "prepare", "read_adapter",
    "save_peft", "singular_values", "svd_factors", "truncate", "uniform_rank",
]
