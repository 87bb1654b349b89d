"""One training run of one method for `l1ra compare`: the same loop, data order, schedule and optimizer settings for
every method; only the adapter and its per-step hook differ. The methods (rows) are listed in `l1ra.app.compare`.

Device: the model, every batch and the autocast go to the training device (`resolve_device`): CUDA with bf16 where
the GPU supports it, else fp16 with a gradient scaler; CPU with bf16 autocast where the task asks for it and the CPU
has native bf16 (fp32 otherwise); MPS in fp32. Evaluation runs on the same device with the same autocast.
"""

from __future__ import annotations

import hashlib
import math
import os
import resource
import statistics
import time
from typing import Optional

import torch
from torch import nn

from ..atomic import atomic_write_json
from ..history import mean_rank_by_type
from .compare import L1RA_METHODS, METHODS, RunSpec


# ------------------------------------------------------------------------------------------------ device


def cpu_has_fast_bf16(flags: Optional[set] = None) -> bool:
    """Whether this CPU computes bf16 natively (x86 AVX512-BF16 or AMX, ARM BF16). Without it PyTorch emulates bf16
    and autocast is slower than fp32: measured here on an AVX2-only CPU, one 8192x384 @ 384x1536 linear layer took
    3.03 s in bf16 against 0.38 s in fp32. `flags`: the CPU's feature flags (default: read /proc/cpuinfo)."""
    if flags is None:
        flags = set()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith(("flags", "Features")):
                        flags |= set(line.split(":", 1)[1].split())
        except OSError:  # not Linux: no way to tell cheaply, stay in fp32
            return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_device(
    requested: str = "auto",
    *,
    low_precision: bool = True,
    cuda_available: Optional[bool] = None,
    mps_available: Optional[bool] = None,
    cuda_bf16: Optional[bool] = None,
    cpu_bf16: Optional[bool] = None,
) -> tuple[str, Optional[torch.dtype]]:
    """(device, autocast dtype or None) for a run. `auto`: CUDA, else MPS, else CPU. Low precision where the task
    asks for it: CUDA bf16 if the GPU supports it, else fp16 (trained with a gradient scaler); CPU bf16 where the CPU
    has native bf16 (else fp32: emulated bf16 is several times slower); MPS none (fp32). The availability flags
    default to what this machine has; tests pass them to check every branch."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if mps_available is None:
        mps_available = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    requested = (requested or "auto").lower()
    if requested == "auto":
        device = "cuda" if cuda_available else "mps" if mps_available else "cpu"
    elif requested.split(":")[0] in ("cuda", "cpu", "mps"):
        device = requested
        kind = device.split(":")[0]
        if (kind == "cuda" and not cuda_available) or (kind == "mps" and not mps_available):
            raise ValueError(f"--device {requested}: this machine has no {kind.upper()} device; use --device auto or cpu")
    else:
        raise ValueError(f"--device {requested!r}: use auto, cpu, cuda, cuda:N or mps")
    kind = device.split(":")[0]
    if not low_precision or kind == "mps":
        return device, None
    if kind == "cuda":
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported()
        return device, torch.bfloat16 if cuda_bf16 else torch.float16
    if cpu_bf16 is None:
        cpu_bf16 = cpu_has_fast_bf16()
    return device, torch.bfloat16 if cpu_bf16 else None


def _sync(device: str) -> None:
    """Wait for queued GPU work, so that a wall-clock step time is the step's."""
    kind = device.split(":")[0]
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


# ------------------------------------------------------------------------------------------------ measurement


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover - non-Linux
        import psutil

        return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process's own memory so far in MiB.

    Linux: `VmHWM` of /proc/self/status, the high-water mark of the address space this program runs in (a fresh one
    after exec). Not `getrusage(...).ru_maxrss`: Linux carries it across fork and exec, so a worker started by a
    parent holding 1 GB would report at least 1 GB whatever it does itself."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - non-Linux
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if os.uname().sysname == "Darwin" else peak / 1024


def lr_lambda(steps: int, warmup_ratio: float):
    """Linear warm-up over `warmup_ratio` of the steps, then cosine decay to 0: the schedule of every method."""
    warmup = max(1, round(warmup_ratio * steps)) if warmup_ratio > 0 else 0

    def f(step: int) -> float:  # step: optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def adapter_param_groups(model: nn.Module, lr: float, weight_decay: float) -> list:
    """The grouping L1RA's `create_optimizer` uses for the adapter weights (matrices decay, vectors do not), for the
    PEFT methods; AdaLoRA's singular values `lora_E` (an (r, 1) column) count as vectors, like L1RA's gates."""
    decay, no_decay = [], []
    e_ids = _adalora_e_ids(model)
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in e_ids else no_decay).append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _adalora_e_ids(model: nn.Module) -> set:
    from peft.tuners.adalora import AdaLoraLayer

    ids = set()
    for m in model.modules():
        if isinstance(m, AdaLoraLayer):
            ids |= {id(p) for p in m.lora_E.values()}
    return ids


def wrap_model(method: str, model: nn.Module, task, spec: RunSpec):
    """PEFT/L1RA model, optimizer (None for `base`) and the per-step hook `after_step(step, opt, skipped)`."""
    import peft

    from .. import model as l1ra_model
    from ..config import L1RAConfig

    common = dict(
        r=spec.rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=task.target_modules,
        task_type=task.task_type,
    )
    after_step = lambda step, opt, skipped=False: None  # noqa: E731
    if method in ("lora", "dora", "base"):
        pm = peft.get_peft_model(model, peft.LoraConfig(use_dora=method == "dora", **common))
        if method == "base":  # untrained adapters: B = 0, so this is the base model (and its fresh head)
            return pm, None, after_step
        opt = torch.optim.AdamW(adapter_param_groups(pm, spec.lr, spec.weight_decay), lr=spec.lr)
    elif method == "head_only":
        if not task.head_modules:
            raise ValueError(f"--methods head_only: task {task.name!r} has no classification head; drop head_only")
        pm = model
        for name, p in pm.named_parameters():
            p.requires_grad_(any(name == h or name.startswith(h + ".") for h in task.head_modules))
        opt = torch.optim.AdamW(adapter_param_groups(pm, spec.lr, spec.weight_decay), lr=spec.lr)
    elif method in ("adalora", "adalora_paper"):
        init_r = max(spec.rank, round(spec.adalora_init_ratio * spec.rank))
        tinit = round(spec.adalora_tinit * spec.steps)
        tfinal = round(spec.adalora_tfinal * spec.steps)
        if tinit >= spec.steps - tfinal:  # very short runs: keep a budgeting phase of at least one step
            tinit, tfinal = 0, max(0, min(tfinal, spec.steps - 1))
        cfg = peft.AdaLoraConfig(
            init_r=init_r,
            target_r=spec.rank,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=max(1, min(spec.adalora_delta_t, spec.steps - tinit - tfinal)),
            total_step=spec.steps,
            orth_reg_weight=spec.adalora_orth_reg_weight,
            **{k: v for k, v in common.items() if k != "r"},
        )
        pm = peft.get_peft_model(model, cfg)
        opt = torch.optim.AdamW(adapter_param_groups(pm, spec.lr, spec.weight_decay), lr=spec.lr)

        def after_step(step, opt, skipped=False):
            # PEFT's documented loop: after optimizer.step(), before zero_grad() (it reads the gradients), with the
            # optimizer step count
            pm.base_model.update_and_allocate(step)

    elif method in L1RA_METHODS:
        extra = {
            k: getattr(spec, k)
            for k in ("l1ra_lambda", "eta_c", "update_every", "l1_start", "prune_threshold")
            if getattr(spec, k) is not None
        }
        for k in ("update_every", "l1_start"):  # >= 1 is a step count
            if k in extra and float(extra[k]).is_integer() and extra[k] >= 1:
                extra[k] = int(extra[k])
        cfg = L1RAConfig(**common, reassign=spec.reassign, budget_unit=spec.budget_unit,
                         receiver_signal=spec.receiver_signal, seed=spec.seed,
                         total_steps=spec.steps, **extra)
        pm = l1ra_model.get_l1ra_model(model, cfg)
        opt = l1ra_model.create_optimizer(pm, lr=spec.lr, weight_decay=spec.weight_decay)

        def after_step(step, opt, skipped=False):
            l1ra_model.after_optimizer_step(pm, opt, step=step, optimizer_step_skipped=skipped)

    else:
        raise ValueError(f"--methods: unknown method {method!r}; choose from {', '.join(METHODS)}")
    return pm, opt, after_step


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def final_ranks(method: str, pm: nn.Module) -> tuple[dict, dict, int, int]:
    """({module: allocated rank}, {module: effective rank}, effective trainable parameters, effective LoRA
    parameters (A rows and B columns of active ranks: what a parameter budget counts)).

    Allocated: the rank the tensors have (L1RA: the live ranks; its tensors hold a fixed capacity). Effective: ranks that still act on the output (AdaLoRA: non-zero singular
    values `lora_E` after its masking; L1RA: gates above zero; LoRA: all). Effective parameters subtract the
    A row, B column (and E entry / gate) of every inactive rank from the trainable count.
    """
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.lora import LoraLayer

    allocated, effective = {}, {}
    inactive_params = lora_params = 0
    root = pm.base_model.model if hasattr(pm, "base_model") else pm
    for name, m in root.named_modules():
        if not isinstance(m, LoraLayer) or "default" not in m.lora_A:
            continue
        a, b = m.lora_A["default"], m.lora_B["default"]
        if isinstance(m, AdaLoraLayer):
            e = m.lora_E["default"].detach().flatten()
            r_alloc, r_eff = e.numel(), int((e != 0).sum())
            in_f, out_f = a.shape[1], b.shape[0]
            per_rank = in_f + out_f + 1
        else:
            r_alloc = m.r["default"]
            in_f, out_f = a.weight.shape[1], b.weight.shape[0]
            gate = getattr(m, "l1ra_gate", {}).get("default") if hasattr(m, "l1ra_gate") else None
            r_eff = int((gate.detach().clamp(0, 1) > 0).sum()) if gate is not None else r_alloc
            per_rank = in_f + out_f + (1 if gate is not None else 0)
        # L1RA adapters hold a fixed capacity (m.r): report the live ranks; dead slots count as inactive parameters
        live = getattr(getattr(pm, "l1ra_state", None), "live", {}).get(name)
        allocated[name], effective[name] = (len(live) if live is not None else r_alloc), r_eff
        inactive_params += (r_alloc - r_eff) * per_rank
        lora_params += r_eff * (in_f + out_f)
    return allocated, effective, trainable_params(pm) - inactive_params, lora_params


def training_state_mb(pm: nn.Module, opt) -> float:
    """MiB held for training beyond the frozen model: trainable parameters, optimizer state and (AdaLoRA) the
    rank allocator's importance statistics. Gradients are freed after every step (`zero_grad(set_to_none=True)`)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for p in pm.parameters():
        if p.requires_grad:
            add(p)
    for state in opt.state.values():
        for v in state.values():
            add(v)
    allocator = getattr(getattr(pm, "base_model", None), "rankallocator", None)
    for name in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        for v in getattr(allocator, name, {}).values():
            add(v)
    return total / 2**20


class Precision:
    """Where a run trains and in which precision: one object so that the training step and the evaluation agree."""

    def __init__(self, device: str, amp_dtype: Optional[torch.dtype]):
        self.device, self.amp_dtype = device, amp_dtype
        self.type = device.split(":")[0]
        # fp16 needs loss scaling (its range is too small for gradients); bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(self.type) if amp_dtype == torch.float16 else None

    def autocast(self):
        return torch.autocast(self.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def describe(self) -> str:
        if self.amp_dtype is None:
            return f"{self.device}, fp32"
        dtype = str(self.amp_dtype).replace("torch.", "")
        return f"{self.device}, {dtype} autocast" + (" with loss scaling" if self.scaler else "")


def make_precision(spec: RunSpec, task) -> Precision:
    return Precision(*resolve_device(spec.device, low_precision=task.bf16_autocast))


def train_step(pm, opt, sched, after_step, batch, step, max_grad_norm, prec: Precision) -> tuple[float, float]:
    """One optimizer step, identical for every method: (wall seconds, loss). `batch` is on the CPU. `prec` may also be
    a bool (older callers: CPU with or without bf16 autocast)."""
    from .compare_tasks import to_device

    if isinstance(prec, bool):
        prec = Precision("cpu", torch.bfloat16 if prec else None)

    _sync(prec.device)
    t0 = time.perf_counter()
    batch = to_device(batch, prec.device)
    with prec.autocast():
        loss = pm(**batch).loss
    params = [p for g in opt.param_groups for p in g["params"]]
    skipped = False
    if prec.scaler is not None:
        prec.scaler.scale(loss).backward()
        prec.scaler.unscale_(opt)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        scale = prec.scaler.get_scale()
        prec.scaler.step(opt)
        prec.scaler.update()
        skipped = prec.scaler.get_scale() < scale  # the scaler skipped a step with inf/nan gradients
    else:
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
    after_step(step, opt, skipped)
    sched.step()
    opt.zero_grad(set_to_none=True)
    value = float(loss.detach())  # a host sync: the step's GPU work is done
    _sync(prec.device)
    return time.perf_counter() - t0, value


def data_order_hash(batches: list) -> str:
    """A fingerprint of the training batches (inputs and labels, in order): equal for two runs iff they saw the same
    data in the same order."""
    h = hashlib.sha256()
    for b in batches:
        for key in sorted(b):
            if isinstance(b[key], torch.Tensor):
                h.update(key.encode())
                h.update(b[key].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _build_task(spec: RunSpec):
    from .compare_tasks import build_task

    return build_task(spec.task, spec.max_length, spec.eval_limit, spec.dev_size)


def interleaved_step_times(specs: list, task=None) -> dict:
    """Step times of several methods trained side by side in one process, one step of each in turn (order rotated
    every step), so that a slow moment of a shared machine hits all of them. Returns, per method, the step times
    (first step dropped: it allocates) and the median of the per-step ratios to the first spec's method (LoRA)."""
    first = specs[0]
    torch.set_num_threads(first.threads)
    if task is None:
        task = _build_task(first)
    prec = make_precision(first, task)
    batches = task.train_batches(first.seed, first.steps, first.batch_size)
    live = []
    for spec in specs:
        torch.manual_seed(spec.seed)
        base = task.load_model()
        torch.manual_seed(spec.seed)
        pm, opt, after_step = wrap_model(spec.method, base, task, spec)
        pm.to(prec.device).train()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec.steps, spec.warmup_ratio))
        live.append((spec, pm, opt, sched, after_step))
    times = {spec.method: [] for spec in specs}
    for step, batch in enumerate(batches, start=1):
        shift = step % len(live)
        for spec, pm, opt, sched, after_step in live[shift:] + live[:shift]:
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


def run_one(spec: RunSpec, task=None) -> dict:
    """Train `spec.method` on `spec.task` for `spec.steps` optimizer steps, score it once on `spec.split` and
    measure it. Returns a JSON-able dict.

    Peak memory is this process's own peak RSS (`peak_rss_mb`), read right after training (before evaluation): honest only when the
    process ran nothing heavier before, which is why `l1ra compare` gives every run its own process by default.
    """
    torch.set_num_threads(spec.threads)
    if task is None:
        task = _build_task(spec)
    prec = make_precision(spec, task)
    batches = task.train_batches(spec.seed, spec.steps, spec.batch_size)
    torch.manual_seed(spec.seed)  # a newly initialised head (sentiment's classifier) is the same for every method
    base = task.load_model()
    torch.manual_seed(spec.seed)  # adapter init and dropout: same stream for every method of this seed
    pm, opt, after_step = wrap_model(spec.method, base, task, spec)
    pm.to(prec.device).train()
    params_start = trainable_params(pm)
    if prec.type == "cuda":
        torch.cuda.reset_peak_memory_stats(prec.device)
    rss_before = rss_mb()
    losses, step_times = [], []
    load_start = os.getloadavg()[0]
    started_at = time.time()
    t_train = time.perf_counter()
    if opt is not None:  # `base` trains nothing
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec.steps, spec.warmup_ratio))
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
    if hasattr(pm, "peft_config"):
        allocated, effective, eff_params, lora_params = final_ranks(spec.method, pm)
    else:
        allocated, effective, eff_params, lora_params = {}, {}, trainable_params(pm), 0
    state_mb = training_state_mb(pm, opt) if opt is not None else 0.0
    from .compare import spec_hash

    result = {
        "task": spec.task,
        "method": spec.method,
        "seed": spec.seed,
        "split": spec.split,
        "spec_hash": spec_hash(spec),
        "device": prec.describe(),
        "score_name": task.score_name,
        "higher_is_better": task.higher_is_better,
        "score": float(metrics[task.score_name]),
        "metrics": metrics,
        "splits": task.splits,
        "train_wall_s": train_s,
        "eval_wall_s": eval_s,
        "step_time_median_s": statistics.median(step_times) if step_times else None,
        "step_time_mean_s": statistics.fmean(step_times) if step_times else None,
        "step_times_s": step_times,
        "peak_rss_mb": peak,
        "peak_device_mb": peak_device,
        "rss_before_train_mb": rss_before,
        "train_rss_growth_mb": peak - rss_before,
        # exact bytes of what the method keeps for training (trainable weights, optimizer state, AdaLoRA's
        # importance statistics): deterministic, unlike the process RSS
        "training_state_mb": state_mb,
        "trainable_params_start": params_start,
        "trainable_params_end": trainable_params(pm),
        "effective_params_end": eff_params,
        "lora_params_end": lora_params,
        "ranks_allocated": allocated,
        "ranks_effective": effective,
        "rank_by_type": mean_rank_by_type(effective),
        "total_rank_effective": sum(effective.values()),
        "train_losses": losses,
        "data_order": data_order_hash(batches) if opt is not None else None,
        "spec": spec.to_dict(),
        "torch_threads": torch.get_num_threads(),
        # 1-minute load average at the start and end of training: other jobs on the machine slow every method
        "load_average": [load_start, os.getloadavg()[0]],
        "train_interval": [started_at, started_at + train_s],  # wall clock: shows runs that shared the machine
    }
    if spec.method in L1RA_METHODS:
        from ..model import find_l1ra_model

        st = find_l1ra_model(pm).l1ra_state
        events = st.history.events
        result["l1ra"] = {
            "config": {k: (v if isinstance(v, (int, float, bool, str, type(None))) else str(v))
                       for k, v in st.config.l1ra_dict().items()},
            "budget": st.budget,
            "reallocations": st.reallocations,
            "ranks_pruned": sum(sum(e.pruned.values()) for e in events),
            "ranks_added": sum(sum(e.added.values()) for e in events),
            "gate_quantiles": _gate_quantiles(pm),
        }
    if spec.method.startswith("adalora"):
        cfg = pm.peft_config["default"]
        result["adalora"] = {"init_r": cfg.init_r, "target_r": cfg.target_r, "tinit": cfg.tinit,
                             "tfinal": cfg.tfinal, "deltaT": cfg.deltaT, "total_step": cfg.total_step,
                             "orth_reg_weight": cfg.orth_reg_weight}
    return result


def _gate_quantiles(pm) -> dict:
    from ..model import gates

    flat = torch.cat([g.detach().float().clamp(0, 1).flatten() for g in gates(pm).values()])
    qs = torch.quantile(flat, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]))
    return {"min": float(qs[0]), "p10": float(qs[1]), "median": float(qs[2]), "p90": float(qs[3]),
            "max": float(qs[4]), "zero_fraction": float((flat == 0).float().mean())}


def _worker_main(argv: list) -> int:
    """`python -m l1ra.app.compare_run SPEC.json OUT.json`: one run in a fresh process (so its peak RSS is its own)."""
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
    import sys

    sys.exit(_worker_main(sys.argv[1:]))
