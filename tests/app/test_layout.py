"""The two layers: `import l1ra` (the library) stays light and never reaches into `l1ra.app` (the application); no
import cycle in src/; modules and functions stay small; benchmarks/ use the application's public names only."""

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import l1ra

LIBRARY = Path(l1ra.__file__).parent
APP_ONLY = ("matplotlib", "datasets", "yaml", "gguf", "trl", "l1ra.app")


@pytest.mark.slow
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


@pytest.mark.slow
def test_public_functions_are_not_hidden_by_submodules_of_the_same_name():
    # `l1ra.gates` is a function; `l1ra/gates.py` is a submodule: importing the latter must not hide the former.
    code = "import l1ra.gates, l1ra.model, l1ra; print(callable(l1ra.gates), type(l1ra.model).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "module"]


# ---- no import cycle anywhere in src/ (library and application) ---------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(LIBRARY.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the l1ra modules it imports}, for every module under src/l1ra. Every import statement counts, also
    one inside a function: a lazy import still ties the two modules together (and hides a cycle only until both are
    loaded). `from .pkg import name` counts as importing `pkg.name` when that is a module, else `pkg`."""
    modules = {_module_name(p): p for p in LIBRARY.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_in_src():
    graph = import_graph()
    assert "l1ra.app.cli" in graph and "l1ra.model" in graph  # the whole of src/, library and application
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_modules_and_functions_stay_small():
    """No module over 400 lines and no function over 80 in src/ (the application's layout rule, issue 23)."""
    too_big = []
    for path in sorted(LIBRARY.rglob("*.py")):
        name = path.relative_to(LIBRARY.parent).as_posix()
        text = path.read_text()
        if text.count("\n") > 400:
            too_big.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                too_big.append(f"{name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_big == []


# ---------------------------------------------------------------------------------------------------------------
# Issue 9's "no import cycles": no library module imports another that imports it back, lazily or not.


def test_library_modules_import_each_other_without_cycles():
    import ast
    from pathlib import Path

    library = Path(l1ra.__file__).parent
    modules = {p.stem for p in library.glob("*.py")} - {"__init__"}
    graph = {}
    for name in modules:
        deps = set()
        for node in ast.walk(ast.parse((library / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    deps.add(node.module.split(".")[0])
                elif node.level == 1:
                    deps.update(a.name for a in node.names)
                elif node.module and node.module.startswith("l1ra."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("l1ra."))
        graph[name] = deps & modules
    done, path = set(), []

    def visit(node):
        assert node not in path, "import cycle: " + " -> ".join(path[path.index(node):] + [node])
        if node in done:
            return
        path.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        path.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


# ---- benchmarks/ use the application's public names -----------------------------------------------------------

BENCHMARKS = LIBRARY.parents[1] / "benchmarks"
# The application's packages; a script imports these, or a name in their __all__, never a module inside them.
PACKAGES = ("l1ra.app", "l1ra.app.compare", "l1ra.app.train", "l1ra.app.deploy")


def private_imports(path: Path) -> list[str]:
    """Every import of the application in `path` that is not a package of PACKAGES or a name in its __all__."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [f"{path.name}:{node.lineno} import {a.name}" for a in node.names
                      if a.name.startswith("l1ra.app") and a.name not in PACKAGES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("l1ra.app"):
            if node.module not in PACKAGES:
                found.append(f"{path.name}:{node.lineno} from {node.module}")
                continue
            public = getattr(importlib.import_module(node.module), "__all__", ())
            found += [f"{path.name}:{node.lineno} from {node.module} import {a.name}" for a in node.names
                      if a.name not in public]
    return found


def test_benchmarks_import_only_the_public_names_of_the_application():
    found = {path.name: private_imports(path) for path in sorted(BENCHMARKS.rglob("*.py"))}
    assert found, BENCHMARKS
    assert [line for lines in found.values() for line in lines] == []


def test_the_public_names_of_the_application_resolve():
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", ()):
            assert getattr(module, name) is not None, f"{package}.{name}"
        assert set(getattr(module, "__all__", ())) <= set(dir(module)), package
        with pytest.raises(AttributeError, match="has no attribute 'nope'"):
            getattr(module, "nope")
