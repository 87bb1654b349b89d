"""How far the L1 step can move a gate over a run, and the L1 strength that follows from the run's length.

Every optimizer step after `l1_start` shrinks each gate by `tau_t = lambda * eta_c * f(t)`, where `f(t)` is the
learning-rate schedule's factor at that step. Over a run, the L1 alone can therefore move a gate by at most

    reach = lambda * eta_c * sum_{t > l1_start} f(t)

A gate starts at 1, so with reach < 1 the L1 alone prunes nothing: only ranks whose own gradient takes their gate to
0 move. With a reach far above 1 the L1 takes every gate the gradient does not defend to 0 early in the run.
`lambda_for_run` picks lambda for a chosen reach (default `DEFAULT_REACH`) from the run's length and schedule, so
the same setting means the same thing in a 30-step and a 3,000-step run: an unneeded rank is pruned after about
1/reach of the L1 phase's learning-rate mass (the "about 1/(eta_c * lambda) steps" rule at a constant lr).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

# The reach of the setting chosen on the sentiment dev split (lambda 0.1, eta_c 0.1, L1 from 25% of 500 steps, 10%
# warm-up + cosine: reach 1.52); lambda 0.2 and 0.4 (reach 3.0 and 6.1) scored lower there.
DEFAULT_REACH = 1.5


def lr_factors_from(scheduler, total_steps: int) -> Optional[list[float]]:
    """The schedule's lr factor at each optimizer step 1..total_steps, for a `torch.optim.lr_scheduler.LambdaLR`
    (what transformers' `get_*_schedule_with_warmup` return; the first param group's lambda). None otherwise."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if not lambdas:
        return None
    return [float(lambdas[0](t)) for t in range(total_steps)]  # step t (1-based) uses the factor of scheduler step t-1


def warmup_cosine_factors(total_steps: int, warmup_steps: int) -> list[float]:
    """The factors of a linear warm-up over `warmup_steps` then a cosine decay to 0, as transformers'
    `get_cosine_schedule_with_warmup` computes them (for use before a scheduler exists)."""
    import math

    warmup = warmup_steps

    def f(t: int) -> float:
        if t < warmup:
            return t / max(1, warmup)
        progress = (t - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return [f(t) for t in range(total_steps)]


def l1_mass(total_steps: int, l1_start_step: int, lr_factors: Optional[Sequence[float]] = None) -> float:
    """`sum_{t > l1_start_step} f(t)` over optimizer steps 1..total_steps (f = 1 without factors: an upper bound)."""
    if lr_factors is None:
        return float(max(0, total_steps - l1_start_step))
    return float(sum(lr_factors[l1_start_step:total_steps]))


def l1_reach(config, total_steps: int, lr_factors: Optional[Sequence[float]] = None) -> float:
    """How far the L1 step can move a gate over the run (see the module's docstring) for an `L1RAConfig`."""
    mass = l1_mass(total_steps, config.l1_start_step(total_steps), lr_factors)
    return float(config.l1ra_lambda) * float(config.eta_c) * mass


def lambda_for_run(total_steps: int, *, eta_c: float, l1_start_step: int = 0,
                   lr_factors: Optional[Sequence[float]] = None, reach: float = DEFAULT_REACH) -> float:
    """The L1 strength that gives the run the L1 `reach` (an unneeded gate goes from 1 to 0 after 1/reach of the L1
    phase's learning-rate mass)."""
    mass = l1_mass(total_steps, l1_start_step, lr_factors)
    if mass <= 0:
        raise ValueError(f"the L1 phase is empty (l1_start step {l1_start_step} of {total_steps}); start it earlier.")
    return reach / (eta_c * mass)


def unreachable_message(config, total_steps: int, lr_factors: Optional[Sequence[float]] = None,
                        describe: Callable[[str], str] = lambda name: name) -> Optional[str]:
    """A warning when the L1 alone cannot prune any rank in this run (reach < 1) though reallocation is on; None if
    it can. `describe` turns a config field into what the user sets (e.g. a command-line flag)."""
    if not config.reassign or config.l1ra_lambda == 0:
        return None
    reach = l1_reach(config, total_steps, lr_factors)
    if reach >= 1:
        return None
    start = config.l1_start_step(total_steps)
    needed = lambda_for_run(total_steps, eta_c=config.eta_c, l1_start_step=start, lr_factors=lr_factors, reach=1.0)
    return (
        f"l1ra: over this run's {total_steps} steps the L1 step can move a gate by at most {reach:.2f} "
        f"({describe('l1ra_lambda')} {config.l1ra_lambda:g} x {describe('eta_c')} {config.eta_c:g} x the learning-rate "
        f"schedule), and gates start at 1, so the L1 alone prunes no rank; only ranks whose own gradient takes their "
        f"gate to 0 move. To move rank, raise {describe('l1ra_lambda')} to {needed:.3g} or more (reach 1; "
        f"{DEFAULT_REACH:g} is the tested setting: {needed * DEFAULT_REACH:.3g}), or train longer."
    )
