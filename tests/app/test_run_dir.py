"""`l1ra.app.run_dir`: the one owner of the `l1ra train` folder layout. Every command that takes a run folder finds
its adapter the same way: the run's adapter/, else its latest checkpoint; a checkpoint or adapter/ folder; any PEFT
adapter folder."""

from __future__ import annotations

import json

import pytest

from l1ra.app import run_dir as rd
from l1ra.app.cli import main
from l1ra.app.errors import UserError


def _adapter(folder, base="org/base"):
    folder.mkdir(parents=True)
    (folder / rd.ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
    return folder


def _run(root, options=True):
    root.mkdir(parents=True, exist_ok=True)
    config = {"model_path": "/models/trained-on", **({"options": {"r": 8}} if options else {})}
    (root / rd.RUN_CONFIG).write_text(json.dumps(config))
    return root


def test_a_run_folder_gives_its_adapter_and_its_base_model(tmp_path):
    run = _run(tmp_path / "run")
    _adapter(run / rd.ADAPTER)
    _adapter(run / "checkpoint-40")
    for src in (run, run / rd.ADAPTER):
        found = rd.find_adapter(src)
        assert (found.adapter, found.run) == (run / rd.ADAPTER, run)
        assert found.base_model() == "/models/trained-on"  # the run's, not the adapter's own field
        assert found.is_trained_run()


def test_a_checkpoint_belongs_to_its_run(tmp_path):
    run = _run(tmp_path / "run")
    _adapter(run / "checkpoint-5")
    _adapter(run / "checkpoint-40")
    (run / "checkpoint-100").mkdir()  # no adapter in it: not a checkpoint to load
    found = rd.find_adapter(run)  # an interrupted run: no adapter/ yet, the latest checkpoint
    assert (found.adapter, found.run) == (run / "checkpoint-40", run)
    assert not found.is_trained_run()  # --curve needs the final adapter
    assert rd.find_adapter(run / "checkpoint-5").adapter == run / "checkpoint-5"
    assert rd.latest_checkpoint(run) == run / "checkpoint-40" and rd.checkpoint_step(run / "checkpoint-40") == 40
    assert rd.checkpoint_step(None) == 0 and rd.checkpoint_step(run / "adapter") == 0


def test_a_bare_adapter_names_its_own_base(tmp_path):
    found = rd.find_adapter(_adapter(tmp_path / "mine", base="org/other"))
    assert found.run is None and found.base_model() == "org/other" and not found.is_trained_run()
    # a train_config.json without the run's options (a hand-made folder) is not a run to re-score
    run = _run(tmp_path / "handmade", options=False)
    _adapter(run / rd.ADAPTER)
    assert not rd.find_adapter(run).is_trained_run()


def test_folders_without_an_adapter_are_user_errors(tmp_path):
    with pytest.raises(rd.RunDirError, match="no such folder"):
        rd.find_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"holds no adapter \(adapter/, checkpoint-N/ or adapter_config.json\)"):
        rd.find_adapter(tmp_path / "empty")


@pytest.mark.parametrize("command", ["export", "merge", "generate"])
def test_every_command_refuses_a_folder_without_an_adapter_alike(command, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    extra = {"export": ["--out", str(tmp_path / "x")], "merge": ["--out", str(tmp_path / "x")],
             "generate": ["hello"]}[command]
    assert main([command, str(tmp_path / "empty"), *extra]) == 2
    assert capsys.readouterr().err.strip() == (
        f"l1ra: error: {tmp_path / 'empty'}: holds no adapter (adapter/, checkpoint-N/ or adapter_config.json); pass "
        "an `l1ra train` output folder or a PEFT adapter folder")
