"""Plots and the summary of a run, from `metrics.json` and `rank_history.json` (finished or interrupted runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ...atomic import atomic_write
from ...history import layer_index, mean_rank_by_type, module_type
from ..errors import UserError
from ..run_dir import HEATMAP, LOSS_CURVES, METRICS, RANK_BY_TYPE, RANK_HISTORY, SUMMARY

TYPE_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
              "query", "key", "value", "dense", "c_attn", "c_proj", "c_fc"]


class ReportError(UserError, ValueError):
    """A run folder whose metrics or rank history cannot be read."""


def _load(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"{path}: unreadable ({err})") from None


def _types_sorted(types) -> list[str]:
    def key(t):
        last = t.rsplit(".", 1)[-1]
        return (TYPE_ORDER.index(last) if last in TYPE_ORDER else len(TYPE_ORDER), t)

    return sorted(types, key=key)


def ranks_by_type(ranks: dict[str, int]) -> dict[str, float]:
    """Mean rank per module type, in display order."""
    means = mean_rank_by_type(ranks)
    return {t: means[t] for t in _types_sorted(means)}


def summary_text(metrics: dict, history: Optional[dict]) -> str:
    lines = []
    status = metrics.get("status", "unknown")
    base, tuned = metrics.get("base"), metrics.get("tuned")
    metric = "held-out loss"
    if base and tuned:
        d = tuned["loss"] - base["loss"]
        lines.append(f"{metric}: base {base['loss']:.4f} -> tuned {tuned['loss']:.4f} ({d:+.4f}, "
                     f"{100 * d / base['loss']:+.1f}%)")
        if "perplexity" in base and base.get("perplexity") and tuned.get("perplexity"):
            lines.append(f"held-out perplexity: base {base['perplexity']:.2f} -> tuned {tuned['perplexity']:.2f}")
        if "accuracy" in base:
            lines.append(f"held-out accuracy: base {base['accuracy']:.3f} -> tuned {tuned['accuracy']:.3f}")
    elif base:
        last = (metrics.get("curves", {}).get("eval") or [[0, base["loss"]]])[-1]
        lines.append(f"{metric}: base {base['loss']:.4f}; last held-out evaluation {last[1]:.4f} at step {last[0]} "
                     f"(run {status})")
    tl = metrics.get("train_loss")
    if tl and tl.get("base_first_batch") is not None:
        lines.append(f"train loss: first batch {tl['base_first_batch']:.4f} -> mean of the last 10 steps "
                     f"{tl['tuned_last10_mean']:.4f}")
    if history and history.get("events"):
        events = history["events"]
        first, last = events[0]["ranks"], events[-1]["ranks"]
        moved = sum(sum(e.get("added", {}).values()) for e in events)
        n_re = len(events) - 1
        lines.append(f"ranks moved: {moved} in {n_re} reallocation{'s' if n_re != 1 else ''} "
                     f"(budget {history.get('budget', sum(first.values()))} ranks)")
        t0, t1 = ranks_by_type(first), ranks_by_type(last)
        gained = [(t, t1[t] - t0[t]) for t in t1 if t1[t] - t0[t] > 1e-9]
        lost = [(t, t1[t] - t0[t]) for t in t1 if t1[t] - t0[t] < -1e-9]
        fmt = lambda items: ", ".join(f"{t} {t0[t]:.1f}->{t1[t]:.1f}" for t, _ in sorted(items, key=lambda x: -abs(x[1])))
        lines.append(f"gained rank: {fmt(gained) or 'none'}")
        lines.append(f"lost rank: {fmt(lost) or 'none'}")
    extras = []
    if metrics.get("wall_seconds") is not None:
        extras.append(f"wall time {metrics['wall_seconds'] / 60:.1f} min")
    if metrics.get("tokens_per_second"):
        extras.append(f"{metrics['tokens_per_second']:.0f} tokens/s")
    if metrics.get("trainable_parameters"):
        extras.append(f"{metrics['trainable_parameters']:,} trainable parameters")
    if metrics.get("peak_rss_mb"):
        gpu = f", GPU {metrics['peak_gpu_mb'] / 1024:.1f} GiB" if metrics.get("peak_gpu_mb") else ""
        extras.append(f"peak memory {metrics['peak_rss_mb'] / 1024:.1f} GiB{gpu}")
    if metrics.get("eval_passes"):
        base = ", base score from the cache" if metrics.get("base_from_cache") else ""
        extras.append(f"held-out evaluation {metrics['eval_passes']} x, {metrics['eval_seconds']:.0f} s, "
                      f"{metrics['eval_tokens_per_second']:.0f} tokens/s{base}")
    if extras:
        lines.append(", ".join(extras))
    if status != "finished":
        lines.append(f"run status: {status}")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """PNG written under a temporary name, then renamed: a reader never sees half a plot."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def MaxNLocator(**kwargs):
    from matplotlib.ticker import MaxNLocator as _Locator

    return _Locator(**kwargs)


def plot_heatmap(ranks: dict[str, int], r0: Optional[int], path: Path) -> None:
    plt = _plt()
    import numpy as np

    types = _types_sorted({module_type(n) for n in ranks})
    layers: list = sorted({layer_index(n) for n in ranks if layer_index(n) is not None})
    if any(layer_index(n) is None for n in ranks):
        layers.append(None)  # modules outside the numbered blocks (e.g. BERT's pooler) get their own column
    grid = np.full((len(types), len(layers)), np.nan)
    for name, r in ranks.items():
        grid[types.index(module_type(name)), layers.index(layer_index(name))] = r
    width = min(16, max(6.5, 3 + 0.38 * len(layers)))
    fig, ax = plt.subplots(figsize=(width, 1.2 + 0.5 * len(types)), dpi=120)
    vmax = np.nanmax(grid)
    cmap = plt.get_cmap("RdBu_r") if r0 else plt.get_cmap("viridis")
    kwargs = dict(vmin=0, vmax=2 * r0) if r0 and vmax <= 2 * r0 else dict(vmin=0, vmax=vmax)
    im = ax.imshow(grid, aspect="auto", cmap=cmap, **kwargs)
    ax.set_yticks(range(len(types)), types)
    ax.set_xticks(range(len(layers)), ["other" if x is None else str(x) for x in layers], fontsize=8)
    ax.set_xlabel("layer")
    if len(layers) * len(types) <= 400:
        for i in range(len(types)):
            for j in range(len(layers)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{int(grid[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if abs(grid[i, j] - (r0 or vmax / 2)) > 0.6 * (r0 or vmax / 2) else "black")
    title = "final rank per layer and module type"
    if r0:
        title += f"\n(initial rank {r0}: red gained rank, blue lost rank)"
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="rank", fraction=0.03, pad=0.01)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_rank_by_type(history: dict, path: Path) -> None:
    plt = _plt()
    events = history["events"]
    steps = [e["step"] for e in events]
    per_type = [ranks_by_type(e["ranks"]) for e in events]
    types = _types_sorted(per_type[0])
    total = history.get("total_steps")
    if total and steps[-1] < total:
        steps = steps + [total]
        per_type = per_type + [per_type[-1]]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    for t in types:
        ax.step(steps, [p[t] for p in per_type], where="post", label=t, linewidth=2)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean rank per adapter")
    ax.set_title(f"rank per module type over training ({history.get('moved', 0)} ranks moved)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_losses(metrics: dict, path: Path) -> None:
    plt = _plt()
    curves = metrics.get("curves", {})
    train, ev = curves.get("train", []), curves.get("eval", [])
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    if train:
        xs, ys = [p[0] for p in train], [p[1] for p in train]
        k = max(1, len(ys) // 15)
        ax.plot(xs, ys, color="tab:blue", alpha=0.3 if k > 1 else 1.0, linewidth=1, label="train loss (per step)")
        if k > 1:
            smooth = [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, color="tab:blue", linewidth=2, label=f"train loss ({k}-step mean)")
    if ev:
        ax.plot([p[0] for p in ev], [p[1] for p in ev], "o-", color="tab:orange", linewidth=2, markersize=6,
                label="held-out loss")
    base = metrics.get("base")
    if base:
        ax.axhline(base["loss"], color="gray", linestyle="--", linewidth=1, label=f"base model held-out ({base['loss']:.3f})")
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss (mean per target token)" if metrics.get("task") != "classification" else "loss")
    ax.set_title("training and held-out loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def write_report(run_dir) -> str:
    """Redraw the three plots and `summary.txt` in `run_dir`; returns the summary text."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    metrics = _load(run_dir / METRICS)
    history = _load(run_dir / RANK_HISTORY)
    if metrics is None and history is None:
        raise ReportError(f"{run_dir}: holds no {METRICS} or {RANK_HISTORY}; is it an `l1ra train` output dir?")
    metrics = metrics or {}
    r0 = (metrics.get("options") or {}).get("r")
    if history and history.get("events"):
        plot_heatmap(history["events"][-1]["ranks"], r0, run_dir / HEATMAP)
        plot_rank_by_type(history, run_dir / RANK_BY_TYPE)
    if metrics.get("curves"):
        plot_losses(metrics, run_dir / LOSS_CURVES)
    text = summary_text(metrics, history)
    from ...atomic import atomic_write_text

    atomic_write_text(run_dir / SUMMARY, text + "\n")
    return text
