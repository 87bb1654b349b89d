"""The l1ra application: the `train` and `compare` recipes, their data, reports, serving helpers and the CLI.

Built on the library (`import l1ra`) and never imported by it.
"""

from .lazy import lazy_exports

# The public surface for scripts (benchmarks/ use these names, or the packages l1ra.app.compare, .train, .deploy):
# the offline models that the pinned packages ship, the device plan and this process's memory, found on first use
# so that `l1ra --help` loads nothing more.
_LAZY = {"smollm2_dir": "assets", "smollm2_gguf": "assets", "minilm_dir": "assets",
         "current_plan": "devices", "cpu_bf16_native": "devices",
         "rss_mb": "memory", "peak_rss_mb": "memory", "keep_freed_memory": "memory"}

__all__ = [*_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
