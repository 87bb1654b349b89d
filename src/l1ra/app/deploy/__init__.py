"""Using a trained adapter: the command lines of `l1ra export`, `l1ra merge` and `l1ra generate` (command.py), the
llama.cpp GGUF writer (gguf_export.py), the held-out loss against budget (budget_curve.py), and loading the adapter
with its base model to merge or generate (serve.py). Light: nothing heavy is imported with the package."""
