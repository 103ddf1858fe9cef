"""Messages a user can act on: they name the file, the CLI key and what to do, in one sentence."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modular.cli import main

ROOT = Path(__file__).resolve().parents[1]
T = ["model=tiny", "data=sample_en", "train.max_steps=2", "train.batch_size=2", "train.seq_len=32",
     "train.eval_every=1000", "experts.num_experts=4", "experts.ffn_dim=32", "train.progress=false",
     "train.eval_batches=1", "train.threads=1"]


def modular(*args, **env):
    return subprocess.run([sys.executable, "-m", "modular", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=300)


def test_a_wrong_config_dir_is_named(tmp_path):
    missing = modular("info", "model=tiny", MODULAR_CONFIG_DIR=str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "nowhere' does not exist; set MODULAR_CONFIG_DIR" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = modular("info", "model=tiny", MODULAR_CONFIG_DIR=str(tmp_path / "empty"))
    assert empty.returncode == 2 and "has no model/ presets" in empty.stderr
    assert "available presets are: none" not in empty.stderr


def test_a_preset_that_is_not_utf8_is_named(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "modular" / "configs", configs)
    with open(configs / "model" / "tiny.yaml", "ab") as f:
        f.write(b"# caf\xe9 in latin-1\n")
    proc = modular("info", "model=tiny", MODULAR_CONFIG_DIR=str(configs))
    assert proc.returncode == 2, proc.stderr
    assert f"Config file {configs / 'model' / 'tiny.yaml'} is not UTF-8" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_non_ascii_inside_a_list_says_how_to_quote(capsys):
    assert main(["info", "model=tiny", "continual.stream=[en,dé]"]) == 2
    err = capsys.readouterr().err
    assert "quote each list element" in err and "LexerNoViableAlt" not in err


def test_an_existing_export_names_the_cli_key(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *T, f"run.dir={run}"]) == 0
    out = tmp_path / "out"
    out.mkdir()
    assert main(["export", f"run.dir={run}", f"export.out={out}", "export.report=false"]) == 2
    err = capsys.readouterr().err
    assert "export.overwrite=true" in err


def test_resuming_with_other_data_settings_names_the_cli_keys(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *T, f"run.dir={run}"]) == 0
    assert main(["train", f"run.dir={run}", "train.max_steps=3", "train.batch_size=4"]) == 1
    err = capsys.readouterr().err
    assert "train.batch_size × the number of processes" in err and "strict=False" not in err


@pytest.mark.parametrize("error,code", [("ConfigError", 2), ("DataError", 1), ("CheckpointError", 1),
                                        ("RunFolderError", 1), ("ResourceError", 1)])
def test_one_exit_code_rule(error, code):
    import modular.errors as errors

    assert getattr(errors, error).exit_code == code
    assert f"{code}  " in errors.__doc__
