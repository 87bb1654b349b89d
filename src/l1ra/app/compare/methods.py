"""The rows of `l1ra compare`: what each method is, its label in the tables and the run settings that make it.

Adding a row: describe it in `METHODS` and `LABELS` (table order is `METHODS`' order), give its settings in
`method_fields`; an L1RA option that no row had before also needs a `RunSpec` field (`plan.py`, with a hash-neutral
default so recorded runs keep their key) and its name in `L1RA_OPTIONS`, which carries it into `L1RAConfig`.
"""

from __future__ import annotations

from typing import Optional

# The rows, in table order. What each one is:
METHODS = {
    "base": "untrained adapters (LoRA with B = 0): the model before fine-tuning (with a fresh head for classification)",
    "head_only": "the classification head alone, no adapters (classification tasks only)",
    "lora": "PEFT LoRA, rank r in every targeted module",
    "adalora": "PEFT AdaLoRA at PEFT's defaults: init_r 1.5 r -> target_r r, tinit 0, tfinal 0, deltaT 1, "
    "orth_reg_weight 0.5",
    "adalora_paper": "AdaLoRA with its paper's settings for short runs: orth_reg_weight 0.1, deltaT 10, budgeting "
    "from 10% to 80% of the steps",
    "l1ra": "L1RA at the library's defaults (the paper's method: lambda 0.1, eta_c 2e-2, L1 from step 1)",
    "l1ra_tuned": "L1RA at the short-run setting (lambda 0.1, eta_c 0.1, L1 from 25% of the steps; flags override)",
    "l1ra_nol1": "l1ra_tuned with lambda 0: the gates without L1 (ranks still move where a gate's own gradient takes it to 0)",
    "l1ra_gates": "l1ra_tuned with lambda 0 and no reallocation: the gates alone, no rank moves",
    "l1ra_prune": "l1ra_tuned with reassign=False: prune only (SoRA-like)",
    "l1ra_params": "l1ra_tuned with budget_unit='params': the budget counts LoRA parameters, not ranks",
    "l1ra_grad": "l1ra_tuned with new_rank_init='gradient': a new rank's A row is the top direction of its module's "
    "weight gradient, orthogonal to the live rows (experimental)",
    "l1ra_grace": "l1ra_tuned with new_rank_grace=0.1: a new rank skips the L1 step for one reallocation interval "
    "(experimental)",
    "l1ra_grad_grace": "l1ra_tuned with both new_rank_init='gradient' and new_rank_grace=0.1 (experimental)",
    "dora": "PEFT DoRA (LoraConfig(use_dora=True))",
}
L1RA_METHODS = ("l1ra", "l1ra_tuned", "l1ra_nol1", "l1ra_gates", "l1ra_prune", "l1ra_params", "l1ra_grad",
                "l1ra_grace", "l1ra_grad_grace")
DEFAULT_METHODS = ("base", "head_only", "lora", "adalora", "adalora_paper", "l1ra", "l1ra_tuned", "l1ra_nol1",
                   "l1ra_gates", "l1ra_prune", "l1ra_params")
CLASSIFICATION_ONLY = ("head_only",)
LABELS = {
    "base": "untrained", "head_only": "head only", "lora": "LoRA", "adalora": "AdaLoRA (PEFT defaults)",
    "adalora_paper": "AdaLoRA (paper settings)", "l1ra": "L1RA (library defaults)", "l1ra_tuned": "L1RA (tuned)",
    "l1ra_nol1": "L1RA gates, no L1", "l1ra_gates": "L1RA gates, no rank moves", "l1ra_prune": "L1RA prune-only",
    "l1ra_params": "L1RA, parameter budget", "l1ra_grad": "L1RA, gradient-init new ranks",
    "l1ra_grace": "L1RA, grace for new ranks", "l1ra_grad_grace": "L1RA, gradient init + grace", "dora": "DoRA",
}
# L1RA's short-run setting: the library defaults shrink a gate by at most 2e-3 per step, so no rank moves in a few
# hundred steps. Chosen on the sentiment dev split (benchmarks/results/sweep_sentiment_dev.json: 500 steps, 2 seeds;
# lambda 0.1 / 0.2 / 0.4 scored 0.817 / 0.809 / 0.794 against LoRA's 0.822): the weakest L1 that still moves rank.
TUNED_L1RA = {"l1ra_lambda": 0.1, "eta_c": 0.1, "l1_start": 0.25}
GRACE = 0.1  # l1ra_grace: one reallocation interval at the default update_every
NO_REALLOCATION = 10**9  # update_every (optimizer steps) for l1ra_gates
# The RunSpec fields passed on to L1RAConfig when set (None keeps the library's default).
L1RA_OPTIONS = ("l1ra_lambda", "eta_c", "update_every", "l1_start", "prune_threshold")
# Per-method fields of a RunSpec: everything else is shared by every row.
ADALORA_SETTINGS = {
    "adalora": dict(adalora_init_ratio=1.5, adalora_tinit=0.0, adalora_tfinal=0.0, adalora_delta_t=1,
                    adalora_orth_reg_weight=0.5),
    "adalora_paper": dict(adalora_init_ratio=1.5, adalora_tinit=0.1, adalora_tfinal=0.2, adalora_delta_t=10,
                          adalora_orth_reg_weight=0.1),
}


def method_fields(method: str, l1ra_tuned: dict, update_every: Optional[float],
                  prune_threshold: Optional[float]) -> dict:
    """The RunSpec fields that make `method` the row it is."""
    if method in ADALORA_SETTINGS:
        return dict(ADALORA_SETTINGS[method])
    if method not in L1RA_METHODS:
        return {}
    from ...config import CAPACITY_FACTOR  # here: importing compare stays torch-free

    # capacity_factor marks the fixed-capacity design (issue 21): runs recorded before it keep their old keys
    shared = dict(update_every=update_every, prune_threshold=prune_threshold, capacity_factor=CAPACITY_FACTOR)
    if method == "l1ra":  # the library defaults: the paper's method
        return shared
    fields = dict(shared, **l1ra_tuned)
    if method == "l1ra_nol1":
        fields["l1ra_lambda"] = 0.0
    elif method == "l1ra_gates":  # an interval longer than any run: no reallocation ever fires
        fields.update(l1ra_lambda=0.0, update_every=NO_REALLOCATION)
    elif method == "l1ra_prune":
        fields["reassign"] = False
    elif method == "l1ra_params":
        fields["budget_unit"] = "params"
    if method in ("l1ra_grad", "l1ra_grad_grace"):
        fields["new_rank_init"] = "gradient"
    if method in ("l1ra_grace", "l1ra_grad_grace"):
        fields["new_rank_grace"] = GRACE
    return fields
