"""Corpus readers: formats, directories and globs, domain labels, and bad inputs with clear messages."""

from __future__ import annotations

import pytest

from modular.data.config import DataConfig, DomainConfig
from modular.data.corpus import iter_documents, list_corpus_files
from modular.errors import ConfigError, DataError


def _docs(cfg, domain="d", split="train"):
    return [d.text for d in iter_documents(cfg, domain, split)]


def test_jsonl_txt_directory_and_glob(tmp_path, write_jsonl, multilingual):
    root = tmp_path / "c"
    write_jsonl(root / "a.jsonl", multilingual[:2])
    (root / "sub").mkdir()
    (root / "sub" / "b.txt").write_text("one file is\n\none document\n", encoding="utf-8")
    (root / "notes.md").write_text("ignored", encoding="utf-8")
    (root / ".hidden").mkdir()
    write_jsonl(root / ".hidden" / "x.jsonl", ["hidden folders are skipped"])
    expected = multilingual[:2] + ["one file is\n\none document\n"]
    for spec in [str(root), str(root / "**" / "*.*")]:
        cfg = DataConfig(domains={"d": DomainConfig(train=spec, val=spec)})
        docs = list(iter_documents(cfg, "d", "val"))
        assert [d.text for d in docs] == expected, spec
        assert {d.domain for d in docs} == {"d"}
    assert list_corpus_files(str(root / "a.jsonl"), "k") == [root / "a.jsonl"]


def test_blank_lines_and_custom_text_field(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"body": "first"}\n\n   \n{"body": "second"}', encoding="utf-8")
    cfg = DataConfig(domains={"d": DomainConfig(train=str(path), val=str(path))}, text_field="body")
    assert _docs(cfg, split="val") == ["first", "second"]


def test_missing_path_names_key_and_path(tmp_path):
    cfg = DataConfig(domains={"d": DomainConfig(train=str(tmp_path / "nope.jsonl"))})
    with pytest.raises(DataError, match=r"data\.domains\.d\.train=.*nope\.jsonl.*does not exist"):
        _docs(cfg)


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"\n\n")
    cfg = DataConfig(domains={"d": DomainConfig(train=str(tmp_path / "empty.jsonl"))})
    with pytest.raises(DataError, match=r"empty\.jsonl contains no documents"):
        _docs(cfg)


def test_empty_domain_directory_and_glob_are_errors(tmp_path):
    (tmp_path / "only.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(DataError, match=r"holds no \.jsonl or \.txt files"):
        list_corpus_files(str(tmp_path), "data.domains.d.train")
    with pytest.raises(DataError, match=r"data\.domains\.d\.train=.*matches no"):
        list_corpus_files(str(tmp_path / "*.jsonl"), "data.domains.d.train")
    with pytest.raises(DataError, match=r"neither \.jsonl nor \.txt"):
        list_corpus_files(str(tmp_path / "only.csv"), "data.domains.d.train")


def test_invalid_utf8_names_file_and_byte_offset_or_is_replaced(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = b'{"text": "fine"}\n'
    path.write_bytes(good + b'{"text": "caf\xe9 au lait"}\n')
    cfg = DataConfig(domains={"d": DomainConfig(train=str(path), val=str(path))})
    offset = len(good) + len(b'{"text": "caf')
    with pytest.raises(DataError) as err:
        _docs(cfg, split="val")
    assert str(path) in str(err.value) and f"byte offset {offset};" in str(err.value)
    assert "on_bad_bytes=replace" in str(err.value)
    cfg.on_bad_bytes = "replace"
    assert _docs(cfg, split="val") == ["fine", "caf\ufffd au lait"]


def test_invalid_utf8_in_txt_and_unpaired_surrogate_escape(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"ok \xff\xfe")
    cfg = DataConfig(domains={"d": DomainConfig(train=str(tmp_path / "t.txt"))})
    with pytest.raises(DataError, match=r"t\.txt has invalid UTF-8 at byte offset 3;"):
        _docs(cfg)
    (tmp_path / "s.jsonl").write_text('{"text": "lone \\ud800 half"}\n', encoding="utf-8")
    cfg = DataConfig(domains={"d": DomainConfig(train=str(tmp_path / "s.jsonl"))}, val_fraction=0.99)
    with pytest.raises(DataError, match="byte offset 0 has an unpaired surrogate"):
        list(iter_documents(cfg, "d", "val")) + list(iter_documents(cfg, "d", "train"))
    cfg.on_bad_bytes = "replace"
    texts = _docs(cfg, split="val") + _docs(cfg, split="train")
    assert texts == ["lone \ufffd\ufffd\ufffd half"]


def test_malformed_json_and_missing_field_name_the_offset(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"text": "a"}\n{"text": oops}\n', encoding="utf-8")
    cfg = DataConfig(domains={"d": DomainConfig(train=str(path), val=str(path))})
    with pytest.raises(DataError, match=r"j\.jsonl: the line at byte offset 14 is not valid JSON"):
        _docs(cfg, split="val")
    path.write_text('{"content": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="byte offset 0 has no 'text' string"):
        _docs(cfg, split="val")


def test_unknown_domain_is_a_config_error(make_config):
    cfg = make_config({"d": ["x"]})
    with pytest.raises(ConfigError, match=r"domain 'zz' is not in data\.domains"):
        _docs(cfg, domain="zz")


def test_utf8_bom_is_not_part_of_the_text(tmp_path):
    (tmp_path / "b.txt").write_bytes("\ufeffhallo".encode("utf-8"))
    cfg = DataConfig(domains={"d": DomainConfig(train=str(tmp_path / "b.txt"), val=str(tmp_path / "b.txt"))})
    assert _docs(cfg, split="val") == ["hallo"]
