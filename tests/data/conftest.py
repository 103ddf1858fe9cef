"""Shared fixtures for the data tests: tiny corpora written into tmp_path, and one BPE trained per session.
Helpers are handed out as fixtures (not imported from conftest) so they never clash with other test folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modular.data.config import DataConfig, DomainConfig, sample_data_config
from modular.data.tokenizer import tokenizer_train_command

_MULTILINGUAL = [
    "Grüße aus München: Äpfel, Öl und Übermut — schön, nicht wahr?",
    "Où est la bibliothèque ? À côté de l'hôpital, près du café.",
    "¿Dónde está la estación? ¡Mañana llegará el señor Muñoz!",
    "def f(x):\n\treturn {'k': [x, None]}  # tabs, braces\r\n",
    "日本語のテキスト, русский текст, emoji 🚀🎉 and combining e\u0301 marks.",
]


def _write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({field: text, "source": "test"}, ensure_ascii=False) + "\n" for text in texts)
    return path


@pytest.fixture
def multilingual() -> list[str]:
    return list(_MULTILINGUAL)


@pytest.fixture
def write_jsonl():
    return _write_jsonl


@pytest.fixture
def make_config(tmp_path):
    """make_config({"a": [texts]}, val={"a": [texts]}, **DataConfig fields): a DataConfig in tmp_path."""

    def make(domains: dict[str, list[str]], val: dict[str, list[str]] | None = None,
             **overrides) -> DataConfig:
        cfg_domains = {}
        for name, texts in domains.items():
            train = _write_jsonl(tmp_path / "corpus" / name / "train.jsonl", texts)
            val_path = None
            if val and name in val:
                val_path = str(_write_jsonl(tmp_path / "corpus" / name / "val.jsonl", val[name]))
            cfg_domains[name] = DomainConfig(train=str(train), val=val_path)
        overrides.setdefault("cache_dir", str(tmp_path / "cache"))
        overrides.setdefault("num_workers", 1)
        return DataConfig(domains=cfg_domains, **overrides)

    return make


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE trained on the embedded sample's train splits by the CLI command."""
    out = tmp_path_factory.mktemp("bpe") / "tok"
    assert tokenizer_train_command(sample_data_config(), 512, str(out)) == 0
    return out
