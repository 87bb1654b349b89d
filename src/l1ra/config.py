"""`L1RAConfig`: every `peft.LoraConfig` argument plus the L1RA fields."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Optional, Union

from peft import LoraConfig

# Fields that belong to L1RA only; everything else is LoRA's and goes to PEFT unchanged.
L1RA_FIELDS = (
    "l1ra_lambda",
    "eta_c",
    "update_every",
    "l1_start",
    "prune_threshold",
    "min_rank",
    "max_rank",
    "reassign",
    "exclude_pruned",
    "seed",
    "total_steps",
    "budget_unit",
    "receiver_signal",
    "new_rank_init",
    "new_rank_grace",
)


# Default capacity of an adapter, as a multiple of its initial rank (L1RAConfig.max_rank=None).
CAPACITY_FACTOR = 2


# init_lora_weights values L1RA supports: B = 0 (True, "gaussian"), or random A and B (False, "orthogonal"). None of
# them puts part of the pretrained weight into the adapter, and all keep lora_A an nn.Linear that the gate hooks.
SUPPORTED_INITS = (True, False, "gaussian", "orthogonal")
_REFUSED_INITS = {
    "pissa": "it moves the principal singular components of the pretrained weight into B·A, so pruning a rank would "
    "delete part of the pretrained model",
    "olora": "it moves a QR factor of the pretrained weight into B·A, so pruning a rank would delete part of the "
    "pretrained model",
    "corda": "it moves context-oriented components of the pretrained weight into B·A, so pruning a rank would delete "
    "part of the pretrained model",
    "loftq": "it splits the pretrained weight between the quantized base and B·A, so pruning a rank would delete part "
    "of the pretrained model",
    "lora_ga": "it subtracts the initial adapter from the pretrained weight, so pruning a rank would change the model",
    "eva": "it replaces the lora_A modules after a data pass, which drops the L1RA gates, and it already chooses "
    "ranks from data (run EVA with plain PEFT, or L1RA from init_lora_weights=True)",
    "mica": "it freezes B and starts A at zero, so the gates get no gradient and a new rank cannot be drawn like the "
    "others",
}


def _check_init_lora_weights(value) -> None:
    if any(value is v or (isinstance(value, str) and value.lower() == v) for v in SUPPORTED_INITS):
        return
    kind = value.lower().split("_niter")[0] if isinstance(value, str) else None
    why = _REFUSED_INITS.get(kind, "L1RA does not know this initialisation")
    raise ValueError(
        f"L1RAConfig.init_lora_weights={value!r} is not supported: {why}. Use one of "
        f"{', '.join(repr(v) for v in SUPPORTED_INITS)}."
    )


@dataclass
class L1RAConfig(LoraConfig):
    """LoRA with a gate vector between the two factors, an L1 penalty on the gates and a fixed rank budget.

    Accepts every `peft.LoraConfig` argument (`r`, `lora_alpha`, `target_modules`, `rank_pattern`, ...).
    """

    l1ra_lambda: float = field(
        default=0.1,
        metadata={
            "help": "Strength of the L1 (lasso) penalty on the gates. After every optimizer step each gate moves "
            "`gate_lr * l1ra_lambda` toward zero (proximal step), so a gate whose rank does not help reaches 0."
        },
    )
    eta_c: float = field(
        default=2e-2,
        metadata={"help": "Learning rate of the gates (they get no weight decay); follows the run's lr schedule."},
    )
    update_every: Union[float, int] = field(
        default=0.1,
        metadata={
            "help": "How often ranks are reallocated: a float in (0, 1] is a fraction of the total optimizer steps, "
            "an int is a number of optimizer steps."
        },
    )
    l1_start: Union[float, int] = field(
        default=0.0,
        metadata={
            "help": "When the L1 penalty starts: a float in [0, 1) is a fraction of the total optimizer steps, an int "
            "a number of steps. 0 applies it from the first step, as the paper does. A later start lets the adapters "
            "learn first: while LoRA's B is still zero the gates get no gradient, so an early L1 shrinks every gate "
            "alike (like AdaLoRA's `tinit`)."
        },
    )
    prune_threshold: float = field(
        default=0.0,
        metadata={
            "help": "A rank is pruned when its gate is <= this value. 0 prunes only gates that are exactly zero, which "
            "leaves the model's output unchanged; a positive value prunes sooner but changes the output slightly."
        },
    )
    min_rank: int = field(default=1, metadata={"help": "No adapter is pruned below this rank."})
    max_rank: Optional[int] = field(
        default=None,
        metadata={
            "help": "Capacity of every adapter: the most ranks one module can hold. Each adapter's factors are "
            "allocated at this size up front (A: capacity x in, B: out x capacity) and never change shape, so "
            "reallocation works in place (DDP, torch.compile and any optimizer keep their tensors). None: "
            f"{CAPACITY_FACTOR} x each module's initial rank. Memory, optimizer state and the adapters' FLOPs grow "
            "with the capacity (dead slots are zeros, but they are computed); a module can never grow past it."
        },
    )
    reassign: bool = field(
        default=True,
        metadata={"help": "Hand pruned ranks to other adapters (keeps the budget). False: prune only (SoRA-like)."},
    )
    exclude_pruned: bool = field(
        default=True, metadata={"help": "Adapters pruned in a round receive no new rank in that round."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for the initialisation of new ranks (same on every process)."})
    total_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": "Total optimizer steps of the run; needed when `update_every` is a fraction and no Trainer "
            "tells it (the L1RACallback sets it from the Trainer)."
        },
    )

    budget_unit: str = field(
        default="rank",
        metadata={
            "help": "What the fixed budget counts: 'rank' (the paper's: the sum of all adapters' ranks) or 'params' "
            "(the adapters' LoRA parameter count at the start; a rank in a module costs in_features + out_features, "
            "so rank moving into wide layers cannot grow the adapter)."
        },
    )

    receiver_signal: str = field(
        default="min_gate",
        metadata={
            "help": "Which adapters receive freed rank first: 'min_gate' (the paper's: the largest smallest gate "
            "first) or 'sensitivity' (experimental: the largest mean |gate * d loss / d gate| since the last "
            "reallocation first, read from the gates' gradients in after_optimizer_step)."
        },
    )

    new_rank_init: str = field(
        default="random",
        metadata={
            "help": "How a rank handed to an adapter starts (its B column is always 0, so the model's output does not "
            "change). 'random': a random A row, like LoRA's own init (the paper's). 'gradient' (experimental): the top "
            "right singular direction of the module's weight gradient over the optimizer step before the "
            "reallocation, orthogonal to the adapter's live A rows, so the rank gets the largest gradient any A row "
            "could get and learns from its first step. The gradient is sketched (randomized, a few dozen columns per "
            "module) during that one step only; the base weights never change."
        },
    )
    new_rank_grace: Union[float, int] = field(
        default=0,
        metadata={
            "help": "Optimizer steps a new rank is exempt from the L1 (proximal) step, so it is judged only after it "
            "had a chance to learn: an int is a number of steps, a float in [0, 1) a fraction of the total steps. "
            "0: no grace (the paper's)."
        },
    )

    def __post_init__(self):
        _check_init_lora_weights(self.init_lora_weights)  # before PEFT's checks, which ask for e.g. a loftq_config
        super().__post_init__()
        self._validate_l1ra()

    def _validate_l1ra(self) -> None:
        def fail(name, value, fix):
            raise ValueError(f"L1RAConfig.{name}={value!r} is invalid: {fix}")

        def is_real(x):
            return isinstance(x, numbers.Real) and not isinstance(x, bool)

        def is_int(x):
            return isinstance(x, numbers.Integral) and not isinstance(x, bool)

        if not is_real(self.l1ra_lambda) or not math.isfinite(self.l1ra_lambda) or self.l1ra_lambda < 0:
            fail("l1ra_lambda", self.l1ra_lambda, "use a finite number >= 0 (0 disables the L1 penalty).")
        if not is_real(self.eta_c) or not math.isfinite(self.eta_c) or self.eta_c <= 0:
            fail("eta_c", self.eta_c, "use a finite learning rate > 0 for the gates, e.g. 2e-2.")
        if is_int(self.update_every):
            if self.update_every < 1:
                fail("update_every", self.update_every, "an integer interval must be >= 1 optimizer step.")
        elif is_real(self.update_every):
            if not (0 < self.update_every <= 1):
                fail(
                    "update_every",
                    self.update_every,
                    "a float is a fraction of the total steps and must be in (0, 1]; use an int for a step count.",
                )
        else:
            fail("update_every", self.update_every, "use a float in (0, 1] or an int >= 1.")
        if is_int(self.l1_start):
            if self.l1_start < 0:
                fail("l1_start", self.l1_start, "an integer start must be >= 0 optimizer steps.")
        elif is_real(self.l1_start):
            if not (0 <= self.l1_start < 1):
                fail(
                    "l1_start",
                    self.l1_start,
                    "a float is a fraction of the total steps and must be in [0, 1); use an int for a step count.",
                )
        else:
            fail("l1_start", self.l1_start, "use a float in [0, 1) or an int >= 0.")
        if not is_real(self.prune_threshold) or not (0 <= self.prune_threshold < 1):
            fail("prune_threshold", self.prune_threshold, "use a number in [0, 1); 0 prunes only gates that are exactly 0.")
        if not is_int(self.min_rank) or self.min_rank < 1:
            fail("min_rank", self.min_rank, "use an integer >= 1.")
        ranks = [self.r, *dict(self.rank_pattern or {}).values()]
        if self.min_rank > min(ranks):
            fail("min_rank", self.min_rank, f"it must not exceed the smallest initial rank ({min(ranks)}).")
        if self.max_rank is not None:
            if not is_int(self.max_rank) or self.max_rank < max(ranks):
                fail("max_rank", self.max_rank, f"use None or an integer >= the largest initial rank ({max(ranks)}).")
        for name in ("reassign", "exclude_pruned"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "use True or False.")
        if not is_int(self.seed):
            fail("seed", self.seed, "use an integer.")
        if self.total_steps is not None and (not is_int(self.total_steps) or self.total_steps < 1):
            fail("total_steps", self.total_steps, "use None or an integer >= 1.")
        if self.budget_unit not in ("rank", "params"):
            fail("budget_unit", self.budget_unit, "use 'rank' (the paper's budget) or 'params' (LoRA parameters).")
        if self.receiver_signal not in ("min_gate", "sensitivity"):
            fail("receiver_signal", self.receiver_signal, "use 'min_gate' (the paper's order) or 'sensitivity'.")
        self._validate_new_ranks()
        if self.use_dora:
            fail("use_dora", self.use_dora, "L1RA gates LoRA's rank; DoRA's magnitude term is not gated. Set use_dora=False.")
        if getattr(self, "target_parameters", None):
            fail(
                "target_parameters",
                self.target_parameters,
                "L1RA adapts linear layers only; use target_modules instead.",
            )

    def _validate_new_ranks(self) -> None:
        def fail(name, value, fix):
            raise ValueError(f"L1RAConfig.{name}={value!r} is invalid: {fix}")

        if self.new_rank_init not in ("random", "gradient"):
            fail("new_rank_init", self.new_rank_init, "use 'random' (the paper's) or 'gradient'.")
        grace = self.new_rank_grace
        if isinstance(grace, bool) or not isinstance(grace, numbers.Real):
            fail("new_rank_grace", grace, "use an int >= 0 or a float in [0, 1).")
        if isinstance(grace, numbers.Integral) and grace < 0:
            fail("new_rank_grace", grace, "an integer grace must be >= 0 optimizer steps.")
        if not isinstance(grace, numbers.Integral) and not (0 <= grace < 1):
            fail("new_rank_grace", grace,
                 "a float is a fraction of the total steps and must be in [0, 1); use an int for a step count.")

    def to_lora_config(self) -> LoraConfig:
        """The plain PEFT `LoraConfig` (LoRA fields only) that PEFT itself builds and saves."""
        values = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(LoraConfig) if f.init and f.name != "peft_type"
        }
        return LoraConfig(**values)

    def l1ra_dict(self) -> dict:
        return {name: getattr(self, name) for name in L1RA_FIELDS}

    def capacity(self, initial_rank: int) -> int:
        """Slots an adapter with `initial_rank` ranks holds: `max_rank`, or CAPACITY_FACTOR x its initial rank."""
        return int(self.max_rank) if self.max_rank is not None else CAPACITY_FACTOR * int(initial_rank)

    def update_interval(self, total_steps: Optional[int]) -> int:
        """Optimizer steps between two reallocations."""
        if isinstance(self.update_every, numbers.Integral):
            return int(self.update_every)
        if total_steps is None:
            raise ValueError(
                f"L1RAConfig.update_every={self.update_every!r} is a fraction of the total steps, but the total is "
                "unknown: set L1RAConfig(total_steps=...) (or l1ra.set_total_steps(model, n)), or use an integer "
                "update_every."
            )
        return max(1, round(self.update_every * total_steps))

    def grace_steps(self, total_steps: Optional[int]) -> int:
        """Optimizer steps a new rank is exempt from the L1 step."""
        if not self.new_rank_grace:
            return 0
        if isinstance(self.new_rank_grace, numbers.Integral):
            return int(self.new_rank_grace)
        if total_steps is None:
            raise ValueError(
                f"L1RAConfig.new_rank_grace={self.new_rank_grace!r} is a fraction of the total steps, but the total is "
                "unknown: set L1RAConfig(total_steps=...) (or l1ra.set_total_steps(model, n)), or use an integer."
            )
        return max(1, round(self.new_rank_grace * total_steps))

    def l1_start_step(self, total_steps: Optional[int]) -> int:
        """Optimizer steps taken without the L1 penalty (it applies from step `l1_start_step + 1` on)."""
        if isinstance(self.l1_start, numbers.Integral):
            return int(self.l1_start)
        if self.l1_start == 0:
            return 0
        if total_steps is None:
            raise ValueError(
                f"L1RAConfig.l1_start={self.l1_start!r} is a fraction of the total steps, but the total is unknown: "
                "set L1RAConfig(total_steps=...) (or l1ra.set_total_steps(model, n)), or use an integer l1_start."
            )
        return round(self.l1_start * total_steps)
