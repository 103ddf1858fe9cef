"""Command-line habits: domains added with +data.domains.NAME..., user config folders, and --cfg job|all."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modular.cli import main
from modular.config import compose_config, to_dict
from modular.config_path import use_config_dirs

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---------------------------------------------------------------------------------------------
# Domains from the command line


def test_a_domain_added_field_by_field_joins_any_preset(tmp_path):
    cfg = compose_config(["model=tiny", "data=sample_en", f"+data.domains.legal.train={tmp_path}/l.jsonl",
                          f"+data.domains.legal.val={tmp_path}/v.jsonl", "+data.domains.legal.weight=2.5",
                          "+data.domains.legal.text_field=body", "continual.stream=[en,legal]"])
    assert list(cfg.data.domains) == ["en", "legal"]
    legal = cfg.data.domains.legal
    assert (legal.train, legal.val, legal.weight, legal.text_field) == (
        f"{tmp_path}/l.jsonl", f"{tmp_path}/v.jsonl", 2.5, "body")
    assert cfg.data.domains.en.weight == 1.0 and list(cfg.continual.stream) == ["en", "legal"]


def test_whole_domain_forms_replace_and_remove():
    added = compose_config(["data=sample_en", "+data.domains.legal={train:l.jsonl,weight:3}"])
    assert dict(added.data.domains.legal) == {"train": "l.jsonl", "val": None, "weight": 3.0, "text_field": None}
    replaced = compose_config(["data=sample", "data.domains={a:{train:a.jsonl},b:{train:b.txt.gz,val:bv.txt}}"])
    assert list(replaced.data.domains) == ["a", "b"] and replaced.data.domains.b.val == "bv.txt"
    removed = compose_config(["data=sample", "~data.domains.fr", "~data.domains.es", "data.domains.de.weight=0.5"])
    assert list(removed.data.domains) == ["en", "de", "code_py"] and removed.data.domains.de.weight == 0.5


ADD = "+data.domains.legal.train=l.jsonl"


@pytest.mark.parametrize("overrides,fragments", [
    (["+data.domains.legal.trian=x.jsonl"], ["'data.domains.legal.trian'", "allowed keys in a domain are: train, val"]),
    ([ADD, "+data.domains.legal.weight=heavy"], ["data.domains.legal.weight=heavy", "a number > 0"]),
    ([ADD, "+data.domains.legal.weight=-1"], ["data.domains.legal.weight=-1.0", "number > 0"]),
    (["+data.domains.legal.val=v.jsonl"], ["data.domains.legal.train is required"]),
    (["data.domains={legal:{path:x}}"], ["'data.domains.legal.path'"]),
    (["data.domains=3"], ["data.domains=3", "dict of domains"]),
    (["+data.domains.legal.train.deep=1"], ["'data.domains.legal.train.deep'"]),
    (["+data.domains.legal.train=[a,b"], ["does not parse"]),
    ([ADD, "+data.domains.legal.text_field=''"], ["data.domains.legal.text_field is an empty string"]),
])
def test_bad_domain_overrides_get_one_sentence(overrides, fragments, capsys, tmp_path):
    assert main(["info", "model=tiny", *overrides, f"run.dir={tmp_path / 'run'}"]) == 2
    line = _one_error_line(capsys)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not (tmp_path / "run").exists()


def test_the_stream_must_name_a_known_domain_even_an_added_one(capsys):
    code = main(["continual", "--cfg", "job", "model=tiny", "data=sample_en", "+data.domains.legal.train=l.jsonl",
                 "continual.stream=[en,legl]"])
    assert code == 2 and "continual.stream names domain 'legl'" in _one_error_line(capsys)


# ---------------------------------------------------------------------------------------------
# User config folders


@pytest.fixture
def user_configs(tmp_path):
    folder = tmp_path / "my_configs"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "x.yaml").write_text(
        "domains:\n  legal:\n    train: /corpora/legal.jsonl.gz\n    weight: 2.0\n", encoding="utf-8")
    (folder / "train").mkdir()
    (folder / "train" / "quick.yaml").write_text("max_steps: 7\nlog_every: 1\n", encoding="utf-8")  # overrides ours
    return folder


def test_a_user_preset_composes_beside_the_packaged_ones(user_configs, monkeypatch):
    with use_config_dirs([str(user_configs)]):
        cfg = compose_config(["data=x", "model=tiny", "train=quick"])
    assert cfg.model.name == "tiny" and cfg.model.d_model == 64  # packaged
    assert dict(cfg.data.domains.legal) == {"train": "/corpora/legal.jsonl.gz", "val": None, "weight": 2.0,
                                            "text_field": None}
    assert cfg.train.max_steps == 7  # the user's train/quick.yaml wins over the packaged one
    monkeypatch.setenv("MODULAR_CONFIG_PATH", str(user_configs))
    assert compose_config(["data=x", "model=tiny"]).data.domains.legal.weight == 2.0
    monkeypatch.delenv("MODULAR_CONFIG_PATH")
    assert compose_config(["train=quick"]).train.max_steps != 7  # nothing leaks after the command


def test_help_and_unknown_preset_list_user_presets(user_configs, capsys, monkeypatch):
    assert main(["train", "--config-dir", str(user_configs), "--help"]) == 0
    out = capsys.readouterr().out
    assert "corpora, corpora_de, sample, sample_en, x" in out and str(user_configs) in out
    monkeypatch.setenv("MODULAR_CONFIG_PATH", str(user_configs))
    assert main(["info", "data=y"]) == 2
    assert "Unknown data preset 'y'; available presets are: corpora, corpora_de, sample, sample_en, x." in \
        _one_error_line(capsys)


def test_a_config_folder_that_does_not_exist_is_one_sentence(tmp_path, capsys, monkeypatch):
    assert main(["info", f"--config-dir={tmp_path / 'nope'}", "model=tiny"]) == 2
    assert _one_error_line(capsys) == (f"error: Config folder '{tmp_path / 'nope'}' (from --config-dir) does not "
                                       "exist; give a folder that holds config groups such as data/ or model/.")
    monkeypatch.setenv("MODULAR_CONFIG_PATH", str(tmp_path / "gone"))
    assert main(["info"]) == 2 and "(from MODULAR_CONFIG_PATH) does not exist" in _one_error_line(capsys)


def test_modular_config_dir_still_replaces_the_packaged_folder(tmp_path, user_configs):
    replacement = tmp_path / "replacement"
    (replacement / "model").mkdir(parents=True)
    (replacement / "config.yaml").write_text("defaults:\n  - base_config\n  - model: only\n  - _self_\n", "utf-8")
    (replacement / "model" / "only.yaml").write_text("name: only\nd_model: 96\n", encoding="utf-8")
    code = ("from modular.config import compose_config, group_presets; c = compose_config(['+data=x']);"
            "print(c.model.name, c.model.d_model, group_presets('model'), group_presets('data'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "MODULAR_CONFIG_DIR": str(replacement),
                              "MODULAR_CONFIG_PATH": str(user_configs)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "only 96 ['only'] ['x']"


# ---------------------------------------------------------------------------------------------
# --cfg job | all


def test_cfg_job_prints_the_validated_config_and_runs_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = ["model=tiny", "+data.domains.legal.train=l.jsonl", f"run.dir={run}"]
    assert main(["train", "--cfg", "job", *overrides]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(compose_config(overrides))
    assert printed["data"]["domains"]["legal"]["train"] == "l.jsonl" and not run.exists()


@pytest.mark.parametrize("command", ["info", "train", "continual", "eval", "export", "upcycle", "tokenizer"])
def test_cfg_job_works_for_every_command_that_composes(command, capsys):
    args = ["train"] if command == "tokenizer" else []
    assert main([command, *args, "--cfg=job", "model=tiny", "seed=7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["seed"] == 7


def test_cfg_all_adds_the_chosen_presets_and_search_path(user_configs, capsys):
    assert main(["info", "--cfg", "all", "--config-dir", str(user_configs), "model=tiny", "data=x"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["hydra"]["runtime"]["choices"]["model"] == "tiny"
    assert printed["hydra"]["runtime"]["choices"]["data"] == "x"
    assert printed["hydra"]["searchpath"][0] == str(user_configs)
    assert printed["model"]["name"] == "tiny"


def test_cfg_with_a_bad_value_or_choice(capsys):
    assert main(["info", "--cfg", "yaml"]) == 2
    assert "--cfg yaml is not allowed; use --cfg job" in _one_error_line(capsys)
    assert main(["info", "--cfg", "job", "routing.top_k=99"]) == 2
    assert "routing.top_k=99" in _one_error_line(capsys)


def test_cfg_job_with_a_sweep_prints_each_member(capsys):
    assert main(["train", "-m", "--cfg", "job", "model=tiny", "seed=1,2"]) == 0
    out = capsys.readouterr().out
    members = out.split("# member ")[1:]
    assert [yaml.safe_load(m.split("\n", 1)[1])["seed"] for m in members] == [1, 2]


def test_cfg_through_the_console_script():
    proc = subprocess.run([sys.executable, "-m", "modular", "info", "--cfg", "job", "model=tiny"],
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stderr == ""
    assert json.loads(json.dumps(yaml.safe_load(proc.stdout)))["model"]["d_model"] == 64
