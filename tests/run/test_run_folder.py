"""Run folders are sacred: identity, locks, nothing written before validation, resume by meaning, damaged files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modular.cli import main
from modular.errors import RunFolderError
from modular.run.folder import LOCK, MARKER, RunFolder
from modular.train import checkpoint as ckpt

# The issue's `T`, smaller experts, no progress bars.
T = ["model=tiny", "data=sample_en", "train.max_steps=4", "train.batch_size=2", "train.seq_len=64",
     "train.eval_every=1000", "experts.num_experts=4", "experts.ffn_dim=32", "train.progress=false",
     "train.eval_batches=1", "train.threads=1"]
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def steps_logged(run: Path) -> list[int]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


@pytest.fixture()
def run(tmp_path):
    folder = tmp_path / "run"
    assert main(["train", *T, "train.checkpoint_every=2", "train.log_every=1", f"run.dir={folder}"]) == 0
    return folder


def test_a_new_run_folder_has_its_marker_and_a_released_lock(run):
    assert json.loads((run / MARKER).read_text())["command"] == "train"
    assert (run / LOCK).read_text() == ""  # released: no holder recorded


def test_an_existing_folder_that_is_not_a_run_is_refused_untouched(tmp_path, capsys):
    hf_model = tmp_path / "hf_model"
    hf_model.mkdir()
    (hf_model / "config.json").write_text('{"model_type": "llama"}')
    assert main(["train", *T, f"run.dir={hf_model}"]) == 2
    err = capsys.readouterr().err
    assert "is not a modular run folder" in err and "config.json" in err
    assert sorted(p.name for p in hf_model.iterdir()) == ["config.json"]
    assert (hf_model / "config.json").read_text() == '{"model_type": "llama"}'


def test_an_empty_folder_becomes_a_run(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", *T, "train.max_steps=1", f"run.dir={empty}"]) == 0
    assert (empty / MARKER).is_file() and ckpt.latest_checkpoint(empty) is not None


def test_a_run_from_before_markers_is_adopted(run, capsys):
    (run / MARKER).unlink()
    assert main(["train", "train.max_steps=5", f"run.dir={run}"]) == 0
    assert (run / MARKER).is_file()
    assert "before run folders had a marker" in capsys.readouterr().err


def test_a_refused_resume_saves_nothing(run, capsys):
    before = {name: (run / name).read_text() for name in ("overrides.json", "config.json", "metrics.jsonl")}
    assert main(["train", f"run.dir={run}", "model.d_model=128"]) == 1
    assert "does not fit this model" in capsys.readouterr().err
    assert {name: (run / name).read_text() for name in before} == before
    assert main(["eval", f"run.dir={run}"]) == 0
    assert main(["train", f"run.dir={run}", "train.max_steps=5"]) == 0  # plain resume still works


def test_a_quoted_run_dir_finds_its_saved_overrides(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *T, "run.dir='runs/q'"]) == 0
    saved = json.loads(Path("runs/q/overrides.json").read_text())
    capsys.readouterr()
    assert main(["train", "run.dir='runs/q'", "train.max_steps=5"]) == 0
    assert "resuming runs/q from step 4" in capsys.readouterr().out
    after = json.loads(Path("runs/q/overrides.json").read_text())
    assert "model=tiny" in after and len(after) == len(saved)  # max_steps replaced, not appended


def test_a_non_ascii_run_dir_needs_no_quotes(tmp_path, capsys):
    folder = tmp_path / "café-ü"
    assert main(["train", *T, "train.max_steps=1", f"run.dir={folder}"]) == 0
    assert main(["train", "train.max_steps=2", f"run.dir={folder}"]) == 0
    assert "from step 1" in capsys.readouterr().out


def test_overrides_merge_by_key_as_hydra_reads_them():
    from modular.run.setup import merge_overrides, override_value

    merged = merge_overrides(["model=tiny", "train.max_steps=4", "run.dir='a b'", "+extra.key=1"],
                             ["train.max_steps=9", "run.dir=a b", "+extra.key=2"])
    assert merged == ["model=tiny", "+extra.key=1", "train.max_steps=9", "run.dir=a b", "+extra.key=2"]
    assert override_value(["run.dir='runs/q'"], "run.dir") == "runs/q"


def test_two_commands_never_write_one_run_folder(tmp_path):
    folder = tmp_path / "busy"
    args = [sys.executable, "-m", "modular", "train", *T, "train.max_steps=100000", "train.log_every=1",
            "train.checkpoint_every=100000", f"run.dir={folder}"]
    first = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((folder / "metrics.jsonl").exists()
                                              and (folder / "metrics.jsonl").read_text().count("\n") >= 1):
            time.sleep(0.05)
        second = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr
        assert f"pid {first.pid}" in second.stderr and "is in use by modular train" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGTERM)
        _out, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, err
    ckpt.verify_checkpoint(ckpt.latest_checkpoint(folder))


def test_a_stale_lock_of_a_dead_process_is_taken_over(run, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": "h", "command": "modular train",
                                        "since": "then"}))
    assert main(["train", "train.max_steps=5", f"run.dir={run}"]) == 0
    err = capsys.readouterr().err
    assert "taking over the stale lock" in err and f"pid {int(dead.stdout)}" in err


def test_a_lock_held_in_this_process_refuses_a_second_holder(run):
    with RunFolder(run, "train"), pytest.raises(RunFolderError, match="is in use by modular train"):
        RunFolder(run, "continual").open()
    RunFolder(run, "continual").open().close()  # released on exit


def test_a_missing_manifest_names_the_damaged_checkpoint_and_the_previous_valid_one(run, capsys):
    latest = ckpt.latest_checkpoint(run)
    assert latest.name == "step_0000004"
    (latest / "manifest.json").unlink()
    metrics = (run / "metrics.jsonl").read_text()
    assert main(["train", f"run.dir={run}", "train.max_steps=6"]) == 1
    err = capsys.readouterr().err
    previous = run / "checkpoints" / "step_0000002"
    assert "step_0000004 is damaged: it has no manifest.json" in err
    assert f"train.resume_from={previous}" in err
    assert (run / "metrics.jsonl").read_text() == metrics  # no silent restart
    assert main(["eval", f"run.dir={run}"]) == 1
    assert "is damaged" in capsys.readouterr().err  # not "no checkpoint yet"
    # going back as offered: step 4 is moved aside, the run continues from step 2 and forgets resume_from
    assert main(["train", f"run.dir={run}", f"train.resume_from={previous}", "train.max_steps=6"]) == 0
    assert "from step 2" in capsys.readouterr().out
    assert (run / "checkpoints" / "superseded" / "step_0000004").is_dir()
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]
    assert not any("resume_from" in o for o in json.loads((run / "overrides.json").read_text()))
    assert main(["train", f"run.dir={run}", "train.max_steps=7"]) == 0
    assert "from step 6" in capsys.readouterr().out


def test_resume_from_must_be_a_checkpoint_of_the_run(run, tmp_path, capsys):
    assert main(["train", f"run.dir={run}", f"train.resume_from={tmp_path}"]) == 1
    assert "is not a checkpoint of run.dir" in capsys.readouterr().err


def test_a_torn_last_line_of_metrics_is_dropped_on_resume(run):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a write cut short
    assert main(["train", f"run.dir={run}", "train.max_steps=5"]) == 0
    assert steps_logged(run) == [1, 2, 3, 4, 5]


def test_damage_inside_metrics_is_one_sentence(run, capsys):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["train", f"run.dir={run}", "train.max_steps=5"]) == 1
    err = capsys.readouterr().err
    assert "metrics.jsonl is damaged at line 2" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content", ['["model=tiny", "train.max', '{"not": "a list"}', b"\xff\xfe"])
def test_a_damaged_overrides_file_is_one_sentence(run, content, capsys):
    path = run / "overrides.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["train", f"run.dir={run}"]) == 1
    err = capsys.readouterr().err
    assert "overrides.json is damaged" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_file_as_run_dir_is_refused(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    assert main(["train", *T, f"run.dir={file}"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_info_writes_only_into_a_run_folder(tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["info", "model=tiny", f"run.dir={other}"]) == 2
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    assert main(["info", "model=tiny", f"run.dir={tmp_path / 'new'}"]) == 0
    assert (tmp_path / "new" / MARKER).is_file()
