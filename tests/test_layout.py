"""The two layers: `import l1ra` (the library) stays light and never reaches into `l1ra.app` (the application)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import l1ra

LIBRARY = Path(l1ra.__file__).parent
APP_ONLY = ("matplotlib", "datasets", "yaml", "gguf", "trl", "l1ra.app")


def test_importing_the_library_loads_no_application_module():
    # What PEFT and transformers load themselves (yaml, tqdm, ...) is theirs; l1ra must add none of APP_ONLY.
    code = (
        "import json, sys, peft, safetensors.torch, transformers; from transformers import TrainerCallback; "
        "before = set(sys.modules); import l1ra; l1ra.L1RACallback; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    added = json.loads(out)
    assert "l1ra" in added
    leaked = [m for m in added if any(m == p or m.startswith(p + ".") for p in APP_ONLY)]
    assert leaked == []


def test_library_modules_never_import_the_application():
    for path in LIBRARY.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                names = [a.name for a in node.names]
                assert not target.startswith((".app", "l1ra.app")), f"{path.name} imports the application ({target})"
                assert not (target in (".", "l1ra") and "app" in names), f"{path.name} imports l1ra.app"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("l1ra.app") for a in node.names), f"{path.name} imports l1ra.app"


def test_public_functions_are_not_hidden_by_submodules_of_the_same_name():
    # `l1ra.gates` is a function; `l1ra/gates.py` is a submodule: importing the latter must not hide the former.
    code = "import l1ra.gates, l1ra.model, l1ra; print(callable(l1ra.gates), type(l1ra.model).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "module"]
