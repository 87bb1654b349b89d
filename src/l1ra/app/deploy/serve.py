"""`l1ra merge` and `l1ra generate`: use a trained adapter (plain PEFT LoRA) with its base model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ...atomic import atomic_dir
from ..errors import UserError
from ..run_dir import ADAPTER_CONFIG, Located, find_adapter


class ServeError(UserError, ValueError):
    """A model, adapter or prompt that `l1ra merge` / `l1ra generate` cannot use."""


def base_model_path(located: Located, model: Optional[str]) -> str:
    if model:
        from ..assets import resolve_model_spec

        return str(resolve_model_spec(model))  # a .gguf file -> its converted folder
    base = located.base_model()
    if not base:
        raise ServeError(f"{located.adapter}: the adapter does not name its base model; pass --model")
    return base


def load_tuned(run_dir, model: Optional[str] = None, merge: bool = False):
    """`(peft_model, tokenizer, task)` with the adapter loaded for inference, on the best device (cuda > mps > cpu):
    in half precision on CUDA for generation, in float32 to merge (the merged weights are saved as float32)."""
    located = find_adapter(run_dir)  # a wrong folder or model is named before the heavy imports
    adapter, base_path = located.adapter, base_model_path(located, model)
    if not Path(base_path).exists() and "/" in base_path and base_path.startswith(("/", ".", "~")):
        raise ServeError(f"base model {base_path} not found; pass --model")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from ..devices import current_plan

    task_type = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("task_type")
    cls = AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM
    plan = current_plan()
    dtype = torch.float32 if merge else plan.model_dtype()
    try:
        base = cls.from_pretrained(base_path, dtype=dtype)
        tok_src = adapter if (adapter / "tokenizer_config.json").exists() else base_path
        tokenizer = AutoTokenizer.from_pretrained(str(tok_src))
    except Exception as err:
        raise ServeError(f"cannot load the base model {base_path} ({str(err).splitlines()[0][:200]}); pass --model") from None
    try:
        peft_model = PeftModel.from_pretrained(base, str(adapter))
    except Exception as err:
        raise ServeError(f"{adapter}: cannot load the adapter onto {base_path} ({str(err).splitlines()[0][:200]})") from None
    peft_model.to(plan.device).eval()
    return peft_model, tokenizer, task_type


def merge(run_dir, out, model: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write base + adapter merged into one plain transformers model folder (atomically)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ServeError(f"--out {out}: exists and is not empty; pass --overwrite or choose another folder")
    peft_model, tokenizer, _ = load_tuned(run_dir, model, merge=True)
    merged = peft_model.merge_and_unload().to("cpu")
    with atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return out


def generate(run_dir, prompt: str, model: Optional[str] = None, max_new_tokens: int = 256) -> str:
    """The tuned model's greedy answer to `prompt` (chat template applied when the tokenizer has one)."""
    import torch

    from ..train.data import render_prompt

    if not prompt.strip():
        raise ServeError("the prompt is empty")
    if max_new_tokens < 1:
        raise ServeError(f"--max-new-tokens {max_new_tokens}: must be >= 1")
    peft_model, tokenizer, task_type = load_tuned(run_dir, model)
    if task_type == "SEQ_CLS":
        enc = tokenizer(prompt, return_tensors="pt", truncation=True).to(peft_model.device)
        with torch.no_grad():
            probs = peft_model(**enc).logits.float().softmax(-1)[0]
        label = int(probs.argmax())
        return f"{'positive' if label == 1 else 'negative'} (p={probs[label]:.3f})"
    text = render_prompt(tokenizer, prompt)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not bool(getattr(tokenizer, "chat_template", None)))
    enc = enc.to(peft_model.device)
    with torch.no_grad():
        ids = peft_model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
