"""DataConfig validation, path resolution and the YAML presets in configs/data."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from modular.data.config import (
    DataConfig,
    DomainConfig,
    TokenizerConfig,
    as_data_config,
    resolve_path,
    sample_data_config,
    validate_data_config,
)
from modular.errors import ConfigError

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "data"


def _cfg(**overrides) -> DataConfig:
    fields = {"domains": {"en": DomainConfig(train="x.jsonl")}}
    fields.update(overrides)
    return DataConfig(**fields)


@pytest.mark.parametrize("overrides, words", [
    ({"domains": {}}, ["data.domains", "empty"]),
    ({"tokenizer": TokenizerConfig(kind="sentencepiece")}, ["'sentencepiece'", "byte, hf"]),
    ({"tokenizer": TokenizerConfig(kind="hf")}, ["data.tokenizer.path", "kind=hf"]),
    ({"domains": {"en": DomainConfig(train="x.jsonl", weight=0.0)}}, ["data.domains.en.weight=0.0", "> 0"]),
    ({"domains": {"en": DomainConfig(train="x.jsonl", weight=-1.0)}}, ["weight=-1.0"]),
    ({"domains": {"en": DomainConfig(train="x.jsonl", weight=float("nan"))}}, ["weight=nan"]),
    ({"domains": {"en": DomainConfig()}}, ["data.domains.en.train", "required"]),
    ({"domains": {"a/b": DomainConfig(train="x.jsonl")}}, ["'a/b'"]),
    ({"val_fraction": 0.0}, ["val_fraction=0.0", "whole percentage"]),
    ({"val_fraction": 0.025}, ["val_fraction=0.025"]),
    ({"on_bad_bytes": "ignore"}, ["on_bad_bytes='ignore'", "error, replace"]),
    ({"num_workers": -1}, ["num_workers=-1"]),
    ({"text_field": ""}, ["data.text_field"]),
])
def test_bad_values_raise_one_sentence_naming_them(overrides, words):
    with pytest.raises(ConfigError) as err:
        validate_data_config(_cfg(**overrides))
    message = str(err.value)
    assert all(w in message for w in words), message
    assert "\n" not in message and err.value.exit_code == 2


def test_good_config_passes_unchanged():
    cfg = _cfg(val_fraction=0.1, on_bad_bytes="replace", num_workers=0)
    assert validate_data_config(cfg) is cfg


def test_dictconfig_type_errors_and_missing_keys_become_config_errors():
    with pytest.raises(ConfigError, match=r"data\.domains\.en\.weight"):
        as_data_config(OmegaConf.create({"domains": {"en": {"train": "x", "weight": "heavy"}}}))
    with pytest.raises(ConfigError, match=r"data\.domains\.en\.train is required"):
        as_data_config(OmegaConf.create({"domains": {"en": {"weight": 2.0}}}))
    with pytest.raises(ConfigError, match="shuffle"):
        as_data_config({"domains": {"en": {"train": "x"}}, "shuffle": True})


def test_pkg_paths_find_the_embedded_sample_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = resolve_path("pkg://modular/data/sample/de/train.jsonl")
    assert path.is_file() and path.parts[-3:] == ("sample", "de", "train.jsonl")
    assert path.read_bytes().startswith(b'{"text": ')
    assert resolve_path("rel/x.jsonl") == tmp_path / "rel" / "x.jsonl"
    with pytest.raises(ConfigError, match="not_a_package_xyz"):
        resolve_path("pkg://not_a_package_xyz/a.jsonl")


def test_sample_data_config_lists_all_five_domains_with_existing_files():
    cfg = sample_data_config()
    assert list(cfg.domains) == ["en", "de", "fr", "es", "code_py"]
    for dom in cfg.domains.values():
        assert resolve_path(dom.train).is_file() and resolve_path(dom.val).is_file()
    with pytest.raises(ConfigError, match="'xx'"):
        sample_data_config(domains=("xx",))


def test_every_sample_folder_ships_its_licence_note():
    root = resolve_path("pkg://modular/data/sample")
    for domain in ["en", "de", "fr", "es", "code_py"]:
        assert (root / domain / "LICENSE-NOTE.txt").stat().st_size > 100
    assert "Public domain" in (root / "README.md").read_text(encoding="utf-8")


def test_sample_preset_equals_the_python_sample_config():
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(PRESETS / "sample.yaml"))
    assert as_data_config(merged) == sample_data_config()


def test_sample_en_preset_is_one_domain():
    preset = OmegaConf.load(PRESETS / "sample_en.yaml")
    cfg = as_data_config(OmegaConf.merge(OmegaConf.structured(DataConfig), preset))
    assert list(cfg.domains) == ["en"] and resolve_path(cfg.domains["en"].train).is_file()


def test_corpora_preset_root_defaults_to_shared_and_follows_modular_corpora(monkeypatch):
    monkeypatch.delenv("MODULAR_CORPORA", raising=False)
    raw = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(PRESETS / "corpora.yaml"))
    cfg = as_data_config(raw)
    assert sorted(cfg.domains) == ["code_py", "de", "en", "es", "fr", "ru"]  # ru: the lead asked for it (#16)
    assert cfg.domains["de"].val == "../shared/corpora/de/val.jsonl"
    monkeypatch.setenv("MODULAR_CORPORA", "/data/corpora")
    assert as_data_config(raw).domains["code_py"].train == "/data/corpora/code_py/train.jsonl"


def test_presets_compose_as_the_data_group_of_a_hydra_config():
    from dataclasses import dataclass, field

    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    @dataclass
    class Root:
        data: DataConfig = field(default_factory=DataConfig)

    ConfigStore.instance().store(name="data_test_root", node=Root)
    with initialize_config_dir(config_dir=str(PRESETS.parent), version_base=None):
        cfg = compose(config_name="data_test_root",
                      overrides=["+data=sample_en", "data.domains.en.weight=3", "data.num_workers=0"])
    data = as_data_config(cfg.data)
    assert list(data.domains) == ["en"] and data.domains["en"].weight == 3.0 and data.num_workers == 0
