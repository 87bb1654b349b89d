"""The command lines of `l1ra export` (write a trained adapter in the form an engine needs: PEFT, any LoRA engine,
llama.cpp; or its held-out budget curve) and `l1ra merge` / `l1ra generate` (use it with its base model). Light:
torch and the library load only when a command runs."""

from __future__ import annotations

import argparse

FORMAT_HELP = (
    "peft: per-module ranks and alphas (rank_pattern, alpha_pattern) for PEFT, transformers, Unsloth, vLLM >= 0.32; "
    "uniform: every module zero-padded to one rank with its scaling folded in, r = lora_alpha (vLLM, SGLang, LoRAX, "
    "TGI, S-LoRA and any engine that ignores patterns); gguf: a llama.cpp LoRA file"
)


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value!r}")
    return number


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value!r}") from None
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value!r}")
    return number


def _fractions(value: str) -> list[float]:
    return [_fraction(v.strip()) for v in value.split(",") if v.strip()] or [_fraction(value)]  # "" -> its error


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="write the adapter for another engine (uniform rank, llama.cpp GGUF) or a smaller budget",
        description="Write the adapter of SRC in the form an engine needs. Same function in every format; "
        "--budget/--fraction keep only the largest singular directions (the best adapter of that total rank).",
    )
    p.add_argument("src", metavar="SRC", help="an `l1ra train` output folder or any PEFT LoRA adapter folder")
    p.add_argument("--out", metavar="PATH", help="folder to write (a .gguf file with --format gguf)")
    p.add_argument("--format", choices=["peft", "uniform", "gguf"], default="peft", help=FORMAT_HELP)
    p.add_argument("--rank", type=_positive_int, metavar="R",
                   help="uniform/gguf: pad every module to this rank (default for uniform: the smallest multiple of "
                   "16 >= the largest rank)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--budget", type=_positive_int, metavar="N",
                       help="keep N ranks in all, by the largest singular values over all modules (>= 1 per module)")
    group.add_argument("--fraction", type=_fraction, metavar="F", help="keep this fraction of the total rank")
    p.add_argument("--base", metavar="MODEL",
                   help="gguf: the base model's folder (config.json) or .gguf file (default: the run's model)")
    p.add_argument("--curve", action="store_true",
                   help="on an `l1ra train` folder: score the adapter truncated to a few budgets on the run's held-out "
                   "set, print the table and write budget_curve.json/.png into the run; on a bare adapter folder: "
                   "print the share of the update each budget keeps (writes nothing)")
    p.add_argument("--max-eval", type=_positive_int, metavar="N",
                   help="--curve: score only the first N held-out examples (faster)")
    p.add_argument("--curve-fractions", type=_fractions, metavar="F,F,...",
                   help="--curve: the budgets as fractions of the total rank (default: 1,0.75,0.5,0.25,0.1)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args) -> int:
    from ...export import ExportError, export_adapter, read_adapter
    from ..run_dir import find_adapter

    if args.curve:
        return curve(args)
    for flag in ("max_eval", "curve_fractions"):
        if getattr(args, flag) is not None:
            raise ExportError(f"--{flag.replace('_', '-')} is for --curve; drop it or add --curve")
    if args.out is None:
        raise ExportError("--out is required: the folder (or .gguf file) to write")
    if args.rank is not None and args.format == "peft":
        raise ExportError("--rank is for --format uniform or gguf; drop it or add --format uniform")
    if args.base is not None and args.format != "gguf":
        raise ExportError("--base is for --format gguf; drop it")
    adapter = find_adapter(args.src).adapter
    kwargs = dict(rank=args.rank, budget=args.budget, fraction=args.fraction, overwrite=args.overwrite)
    if args.format == "gguf":
        from .gguf_export import export_gguf

        path = export_gguf(adapter, args.out, base=args.base, **kwargs)
        ranks = None
    else:
        path = export_adapter(adapter, args.out, format=args.format, **kwargs)
        ranks = read_adapter(path).ranks
    before = read_adapter(adapter).ranks
    summary = f"{len(before)} modules, total rank {sum(before.values())}"
    if ranks is not None:
        summary += f" -> {sum(ranks.values())} (ranks {min(ranks.values())}..{max(ranks.values())})"
    print(f"{args.format} adapter written to {path} (from {adapter}: {summary})")
    return 0


def curve(args) -> int:
    from ...export import ExportError
    from .budget_curve import budget_curve_run, format_table, run_folder
    from ..run_dir import CURVE_JSON, CURVE_PNG

    if args.out is not None or args.format != "peft" or args.rank is not None or args.base is not None:
        raise ExportError("--curve writes no adapter; drop --out/--format/--rank/--base")
    run = run_folder(args.src)
    if run is None:
        if args.max_eval is not None or args.budget is not None or args.fraction is not None:
            raise ExportError(f"{args.src}: not an `l1ra train` output folder, so there is no held-out set to score; "
                              "drop --max-eval/--budget/--fraction")
        print("not an `l1ra train` output folder: no held-out set to score, so this shows the share of the "
              "update's energy each budget keeps (sum of kept sigma^2 / sum of sigma^2), not a held-out loss")
        return print_curve(args.src, args.curve_fractions)
    budgets = [args.budget] if args.budget is not None else None
    fractions = [args.fraction] if args.fraction is not None else args.curve_fractions
    result = budget_curve_run(run, fractions=fractions, budgets=budgets, max_eval=args.max_eval)
    print(f"{run}: {result['modules']} modules, total rank {result['total_rank']}, "
          f"{result['eval_examples']} held-out examples ({result['device']})")
    print(format_table(result))
    print(f"written: {run / CURVE_JSON}, {run / CURVE_PNG}")
    return 0


def print_curve(src, fractions=None) -> int:
    from ...export import budget_curve, read_adapter
    from ..run_dir import find_adapter

    adapter = read_adapter(find_adapter(src).adapter)
    n, total = len(adapter.modules), sum(adapter.ranks.values())
    if fractions:
        budgets = sorted({max(n, round(f * total)) for f in fractions})
    else:
        budgets = sorted({n, *(max(n, round(f * total)) for f in (0.1, 0.25, 0.5, 0.75)), total})
    print(f"{src}: {n} modules, total rank {total}")
    print("budget  kept share of the update  largest module rank")
    for row in budget_curve(adapter, budgets):
        print(f"{row['budget']:>6}  {100 * row['kept']:>23.2f}%  {row['max_rank']:>19}")
    return 0


def add_merge_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("merge",
                              help="write the base model with the adapter merged in (a plain transformers model)")
    p.add_argument("run_dir", metavar="DIR", help="an `l1ra train` output directory, a checkpoint or an adapter folder")
    p.add_argument("--out", required=True, metavar="MERGED", help="folder for the merged model")
    p.add_argument("--model", help="base model (default: the one the run trained)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=cmd_merge)
    return p


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="answer a prompt with the tuned model")
    p.add_argument("run_dir", metavar="DIR", help="an `l1ra train` output directory, a checkpoint or an adapter folder")
    p.add_argument("prompt", help="the prompt (the model's chat template is applied when it has one)")
    p.add_argument("--model", help="base model (default: the one the run trained)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="at most this many tokens are generated")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=cmd_generate)
    return p


def cmd_merge(args) -> int:
    from .serve import merge

    path = merge(args.run_dir, args.out, model=args.model, overwrite=args.overwrite)
    print(f"merged model written to {path}")
    return 0


def cmd_generate(args) -> int:
    from .serve import generate

    print(generate(args.run_dir, args.prompt, model=args.model, max_new_tokens=args.max_new_tokens))
    return 0
