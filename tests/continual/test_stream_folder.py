"""A continual run's folder: validated before anything is written, locked, and damaged files are one sentence."""

import json

import pytest

from modular.cli import main
from modular.run.folder import LOCK, MARKER, RunFolder

SMALL = ["model=tiny", "experts.num_experts=4", "experts.ffn_dim=32", "continual.steps_per_stage=2",
         "train.batch_size=2", "train.seq_len=32", "train.eval_batches=1", "train.progress=false",
         "continual.usage_batches=1", "continual.stage_warmup_steps=1", "continual=naive", "continual.stream=[en,de]",
         "train.threads=1"]


@pytest.fixture()
def stream(tmp_path):
    run = tmp_path / "stream"
    assert main(["continual", *SMALL, f"run.dir={run}"]) == 0
    return run


def test_a_stream_folder_has_its_marker(stream):
    assert json.loads((stream / MARKER).read_text())["command"] == "continual"
    assert (stream / LOCK).read_text() == ""


@pytest.mark.parametrize("content", ['{"stages": [', "[]", b"\xff"])
def test_a_damaged_state_file_is_one_sentence(stream, content, capsys):
    path = stream / "continual_state.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    overrides = (stream / "overrides.json").read_text()
    assert main(["continual", f"run.dir={stream}"]) == 1
    err = capsys.readouterr().err
    assert "continual_state.json is damaged" in err and len(err.strip().splitlines()) == 1
    assert (stream / "overrides.json").read_text() == overrides


def test_a_refused_resume_of_a_stream_saves_nothing(stream, capsys):
    before = {n: (stream / n).read_text() for n in ("overrides.json", "config.json", "continual_state.json")}
    assert main(["continual", f"run.dir={stream}", "model.d_model=128"]) == 1
    assert "does not fit this model" in capsys.readouterr().err
    assert {n: (stream / n).read_text() for n in before} == before


def test_a_stream_in_use_is_refused(stream, capsys):
    with RunFolder(stream, "train"):
        assert main(["continual", f"run.dir={stream}"]) == 1
    assert "is in use by modular train" in capsys.readouterr().err


def test_resume_from_is_for_modular_train(stream, capsys):
    assert main(["continual", f"run.dir={stream}", f"train.resume_from={stream}"]) == 2
    assert "train.resume_from" in capsys.readouterr().err
