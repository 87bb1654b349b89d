"""Every invalid L1RAConfig value names the field, the value and the fix."""

import pytest
from peft import LoraConfig

from l1ra import L1RAConfig

BAD = [
    (dict(l1ra_lambda=-0.1), "l1ra_lambda=-0.1", ">= 0"),
    (dict(l1ra_lambda=float("nan")), "l1ra_lambda=nan", "finite"),
    (dict(l1ra_lambda="0.1"), "l1ra_lambda='0.1'", "number"),
    (dict(eta_c=0), "eta_c=0", "> 0"),
    (dict(eta_c=float("inf")), "eta_c=inf", "finite"),
    (dict(update_every=0), "update_every=0", ">= 1"),
    (dict(update_every=1.5), "update_every=1.5", "use an int"),
    (dict(update_every=0.0), "update_every=0.0", "(0, 1]"),
    (dict(update_every=True), "update_every=True", "int >= 1"),
    (dict(update_every="10"), "update_every='10'", "int >= 1"),
    (dict(l1_start=-1), "l1_start=-1", ">= 0"),
    (dict(l1_start=1.0), "l1_start=1.0", "[0, 1)"),
    (dict(l1_start="half"), "l1_start='half'", "int >= 0"),
    (dict(prune_threshold=-1e-3), "prune_threshold=-0.001", "[0, 1)"),
    (dict(prune_threshold=1.0), "prune_threshold=1.0", "[0, 1)"),
    (dict(min_rank=0), "min_rank=0", ">= 1"),
    (dict(min_rank=9, r=8), "min_rank=9", "smallest initial rank (8)"),
    (dict(min_rank=3, r=8, rank_pattern={"q_proj": 2}), "min_rank=3", "smallest initial rank (2)"),
    (dict(max_rank=4, r=8), "max_rank=4", "largest initial rank (8)"),
    (dict(max_rank=2.5), "max_rank=2.5", "integer"),
    (dict(reassign="yes"), "reassign='yes'", "True or False"),
    (dict(exclude_pruned=1), "exclude_pruned=1", "True or False"),
    (dict(seed=1.5), "seed=1.5", "integer"),
    (dict(total_steps=0), "total_steps=0", ">= 1"),
    (dict(use_dora=True), "use_dora=True", "use_dora=False"),
    (dict(target_parameters=["experts.weight"]), "target_parameters", "target_modules"),
]


@pytest.mark.parametrize("kwargs,names,fix", BAD, ids=[next(iter(b[0])) + str(i) for i, b in enumerate(BAD)])
def test_bad_values_raise_value_error_naming_field_value_and_fix(kwargs, names, fix):
    with pytest.raises(ValueError) as info:
        L1RAConfig(**kwargs)
    message = str(info.value)
    assert names in message and fix in message, message


def test_lora_arguments_are_accepted_and_validated_by_peft():
    cfg = L1RAConfig(
        r=16, lora_alpha=32, lora_dropout=0.1, target_modules="all-linear", bias="none", task_type="CAUSAL_LM",
        modules_to_save=["lm_head"], use_rslora=True, rank_pattern={"q_proj": 8}, l1ra_lambda=0.2,
    )
    lora = cfg.to_lora_config()
    assert type(lora) is LoraConfig and lora.r == 16 and lora.use_rslora and lora.rank_pattern == {"q_proj": 8}
    assert not hasattr(lora, "l1ra_lambda")
    with pytest.raises(ValueError):
        L1RAConfig(r=8, layers_pattern="layers")  # PEFT's own validation still applies


def test_interval_from_fraction_or_int():
    assert L1RAConfig(update_every=0.1).update_interval(100) == 10
    assert L1RAConfig(update_every=0.1).update_interval(4) == 1
    assert L1RAConfig(update_every=7).update_interval(None) == 7
    with pytest.raises(ValueError, match="total_steps"):
        L1RAConfig(update_every=0.1).update_interval(None)


def test_l1_start_from_fraction_or_int():
    assert L1RAConfig().l1_start_step(None) == 0  # the paper's method: L1 from the first step
    assert L1RAConfig(l1_start=0.25).l1_start_step(200) == 50
    assert L1RAConfig(l1_start=12).l1_start_step(None) == 12
    with pytest.raises(ValueError, match=r"l1_start=0.25 .*total_steps"):
        L1RAConfig(l1_start=0.25).l1_start_step(None)
