"""results.json, the record of a comparison across sittings: every run under the key of its spec (`plan.spec_hash`),
the dev-split tuning, and per task the final runs each sitting reported."""

from __future__ import annotations

import json
from pathlib import Path


def load_results(output_dir: Path) -> dict:
    """The comparison so far (empty if none): runs are kept across sittings."""
    path = Path(output_dir) / "results.json"
    if path.is_file():
        results = json.loads(path.read_text())
        results.setdefault("sittings", [])
        results.setdefault("failures", [])
        results.setdefault("tuning", {})
        results.setdefault("final", {})
        return results
    return {"sittings": [], "runs": [], "failures": [], "tuning": {}, "final": {}}


def _setting(run: dict) -> str:
    spec = dict(run["spec"])
    spec.pop("seed")
    spec.pop("threads", None)
    return json.dumps(spec, sort_keys=True)


def final_runs(results: dict) -> list[dict]:
    """The reported runs: the final runs of every sitting (`results["final"]`; for a row run in several settings,
    only its latest setting), else every test-split run."""
    by_hash = {r.get("spec_hash"): r for r in results["runs"]}
    chosen = []
    for task, hashes in results.get("final", {}).items():
        runs = [by_hash[h] for h in hashes if h in by_hash]
        latest = {r["method"]: _setting(r) for r in runs}  # later sittings come later in the list
        chosen += [r for r in runs if _setting(r) == latest[r["method"]]]
    tasks = set(results.get("final", {}))
    chosen += [r for r in results["runs"] if r.get("split", "test") == "test" and r["task"] not in tasks]
    return chosen


def dev_runs(results: dict) -> list[dict]:
    """The dev comparison's runs (`--dev-seeds`): per task and row, the runs of its latest sitting."""
    by_hash = {r.get("spec_hash"): r for r in results["runs"]}
    return [by_hash[h] for rows in results.get("dev", {}).values() for hashes in rows.values() for h in hashes
            if h in by_hash]
