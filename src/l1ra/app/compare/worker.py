"""One run of `l1ra compare`: train one method on one task for a fixed number of steps, score it once, measure it.

The same loop, data order, schedule and optimizer settings for every method; only the adapter and its per-step hook
differ (`adapters.py`). `python -m l1ra.app.compare.worker SPEC.json OUT.json` runs one spec (or a list: the
interleaved step timing) in a fresh process, so that its peak memory is its own.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Optional

import torch

from ...atomic import atomic_write_json
from ...history import mean_rank_by_type
from ..memory import peak_rss_mb, rss_mb
from .adapters import wrap_model
from .loop import lr_lambda, make_precision, train_step
from .measure import (data_order_hash, final_ranks, gate_quantiles, trainable_params,
                      training_state_mb)
from .methods import L1RA_METHODS
from .plan import RunSpec, spec_hash
from .tasks import Task


def build_task(name: str, max_length: int, eval_limit: Optional[int], dev_size: int = 0,
               user_data: Optional[dict] = None) -> Task:
    """A built-in task by name, or task "dataset" for a user's file (`user_data`, see dataset.describe_file)."""
    if name == "dataset":
        from .dataset import dataset_task

        if not user_data:
            raise ValueError("task 'dataset' needs the user's file: use l1ra compare --dataset FILE")
        return dataset_task(max_length, eval_limit, dev_size, user_data)
    from .builtin import TASKS

    if name not in TASKS:
        raise ValueError(f"--task {name!r} is unknown; choose one of: {', '.join(TASKS)}")
    return TASKS[name](max_length=max_length, eval_limit=eval_limit, dev_size=dev_size)


def task_of(spec: RunSpec) -> Task:
    return build_task(spec.task, spec.max_length, spec.eval_limit, spec.dev_size, spec.user_data)


def _start(spec: RunSpec, task: Task, prec):
    """The wrapped model on the run's device, its optimizer, hook and schedule; the same start for every method."""
    torch.manual_seed(spec.seed)  # a newly initialised head (sentiment's classifier) is the same for every method
    base = task.load_model()
    torch.manual_seed(spec.seed)  # adapter init and dropout: same stream for every method of this seed
    pm, opt, after_step = wrap_model(spec.method, base, task, spec)
    pm.to(prec.device).train()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec.steps, spec.warmup_ratio)) if opt else None
    return pm, opt, after_step, sched


def interleaved_step_times(specs: list, task: Optional[Task] = None) -> dict:
    """Step times of several methods trained side by side in one process, one step of each in turn (order rotated
    every step), so that a slow moment of a shared machine hits all of them. Returns, per method, the step times
    (first step dropped: it allocates) and the median of the per-step ratios to the first spec's method (LoRA)."""
    first = specs[0]
    torch.set_num_threads(first.threads)
    task = task or task_of(first)
    prec = make_precision(first, task)
    batches = task.train_batches(first.seed, first.steps, first.batch_size)
    live = [(spec, *_start(spec, task, prec)) for spec in specs]
    times = {spec.method: [] for spec in specs}
    for step, batch in enumerate(batches, start=1):
        shift = step % len(live)
        for spec, pm, opt, after_step, sched in live[shift:] + live[:shift]:
            seconds, _ = train_step(pm, opt, sched, after_step, batch, step, spec.max_grad_norm, prec)
            times[spec.method].append(seconds)
    ref = times[first.method][1:]
    out = {}
    for method, ts in times.items():
        ts = ts[1:]
        ratios = [a / b for a, b in zip(ts, ref)]
        out[method] = {"step_times_s": ts, "median_s": statistics.median(ts), "ratios": ratios,
                       "ratio_median": statistics.median(ratios)}
    return {"steps": first.steps, "seed": first.seed, "methods": out, "load_average": list(os.getloadavg()),
            "device": prec.describe()}


def run_one(spec: RunSpec, task: Optional[Task] = None) -> dict:
    """Train `spec.method` on `spec.task` for `spec.steps` optimizer steps, score it once on `spec.split` and
    measure it. Returns a JSON-able dict.

    Peak memory is this process's own peak RSS (`peak_rss_mb`), read right after training (before evaluation):
    honest only when the process ran nothing heavier before, which is why `l1ra compare` gives every run its own
    process by default.
    """
    torch.set_num_threads(spec.threads)
    task = task or task_of(spec)
    prec = make_precision(spec, task)
    batches = task.train_batches(spec.seed, spec.steps, spec.batch_size)
    pm, opt, after_step, sched = _start(spec, task, prec)
    params_start = trainable_params(pm)
    if prec.type == "cuda":
        torch.cuda.reset_peak_memory_stats(prec.device)
    rss_before = rss_mb()
    losses, step_times = [], []
    load_start = os.getloadavg()[0]
    started_at = time.time()
    t_train = time.perf_counter()
    if opt is not None:  # `base` trains nothing
        for step, batch in enumerate(batches, start=1):
            seconds, loss = train_step(pm, opt, sched, after_step, batch, step, spec.max_grad_norm, prec)
            step_times.append(seconds)
            losses.append(loss)
    train_s = time.perf_counter() - t_train
    peak = peak_rss_mb()
    peak_device = torch.cuda.max_memory_allocated(prec.device) / 2**20 if prec.type == "cuda" else None
    t_eval = time.perf_counter()
    metrics = task.evaluate(pm, spec.split, prec.device, prec.amp_dtype)
    eval_s = time.perf_counter() - t_eval
    result = {
        "task": spec.task, "method": spec.method, "seed": spec.seed, "split": spec.split,
        "spec_hash": spec_hash(spec), "device": prec.describe(), "score_name": task.score_name,
        "higher_is_better": task.higher_is_better, "score": float(metrics[task.score_name]), "metrics": metrics,
        "splits": task.splits, "train_wall_s": train_s, "eval_wall_s": eval_s,
        "step_time_median_s": statistics.median(step_times) if step_times else None,
        "step_time_mean_s": statistics.fmean(step_times) if step_times else None,
        "step_times_s": step_times, "peak_rss_mb": peak, "peak_device_mb": peak_device,
        "rss_before_train_mb": rss_before, "train_rss_growth_mb": peak - rss_before,
        # exact bytes of what the method keeps for training (trainable weights, optimizer state, AdaLoRA's
        # importance statistics): deterministic, unlike the process RSS
        "training_state_mb": training_state_mb(pm, opt) if opt is not None else 0.0,
        "trainable_params_start": params_start,
    }
    result.update(_ranks(pm))
    result.update({
        "train_losses": losses,
        "data_order": data_order_hash(batches) if opt is not None else None,
        "spec": spec.to_dict(),
        "torch_threads": torch.get_num_threads(),
        # 1-minute load average at the start and end of training: other jobs on the machine slow every method
        "load_average": [load_start, os.getloadavg()[0]],
        "train_interval": [started_at, started_at + train_s],  # wall clock: shows runs that shared the machine
    })
    result.update(_method_details(spec, pm))
    return result


def _ranks(pm) -> dict:
    if hasattr(pm, "peft_config"):
        allocated, effective, eff_params, lora_params = final_ranks(pm)
    else:
        allocated, effective, eff_params, lora_params = {}, {}, trainable_params(pm), 0
    return {
        "trainable_params_end": trainable_params(pm), "effective_params_end": eff_params,
        "lora_params_end": lora_params, "ranks_allocated": allocated, "ranks_effective": effective,
        "rank_by_type": mean_rank_by_type(effective), "total_rank_effective": sum(effective.values()),
    }


def _method_details(spec: RunSpec, pm) -> dict:
    """L1RA's reallocations and gates, or AdaLoRA's effective schedule; {} for the other rows."""
    if spec.method in L1RA_METHODS:
        from ...model import find_l1ra_model

        st = find_l1ra_model(pm).l1ra_state
        events = st.history.events
        return {"l1ra": {
            "config": {k: (v if isinstance(v, (int, float, bool, str, type(None))) else str(v))
                       for k, v in st.config.l1ra_dict().items()},
            "budget": st.budget,
            "reallocations": st.reallocations,
            "ranks_pruned": sum(sum(e.pruned.values()) for e in events),
            "ranks_added": sum(sum(e.added.values()) for e in events),
            "gate_quantiles": gate_quantiles(pm),
        }}
    if spec.method.startswith("adalora"):
        cfg = pm.peft_config["default"]
        return {"adalora": {"init_r": cfg.init_r, "target_r": cfg.target_r, "tinit": cfg.tinit,
                            "tfinal": cfg.tfinal, "deltaT": cfg.deltaT, "total_step": cfg.total_step,
                            "orth_reg_weight": cfg.orth_reg_weight}}
    return {}


def main(argv: list) -> int:
    """`python -m l1ra.app.compare.worker SPEC.json OUT.json`: one run in a fresh process."""
    import json

    spec_path, out_path = argv
    with open(spec_path) as f:
        payload = json.load(f)
    if isinstance(payload, list):  # several specs: the interleaved step-time measurement
        result = interleaved_step_times([RunSpec(**p) for p in payload])
    else:
        result = run_one(RunSpec(**payload))
    atomic_write_json(out_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
