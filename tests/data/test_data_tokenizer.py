"""Byte and Hugging Face tokenizers: exact round trips, fixed special ids, fingerprints, BPE training."""

from __future__ import annotations

import json

import pytest

from modular.data.config import TokenizerConfig, resolve_path
from modular.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    load_tokenizer,
    tokenizer_train_command,
    train_bpe,
)
from modular.errors import ConfigError, DataError


def test_byte_tokenizer_round_trips_multilingual_text_and_code(multilingual):
    tok = ByteTokenizer()
    for text in multilingual:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8")) and max(ids) < 256
        assert tok.decode(ids) == text
    assert [a.tolist() for a in tok.encode_batch(multilingual)] == [tok.encode(t) for t in multilingual]


def test_byte_tokenizer_special_ids_are_fixed_and_dropped_on_decode():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.decode([257] + tok.encode("Öl") + [258, 256]) == "Öl"
    assert tok.decode(tok.encode("Ö")[:1]) == "\ufffd"  # half a character from a cut window
    assert tok.fingerprint() == ByteTokenizer().fingerprint() and len(tok.fingerprint()) == 64


def test_load_tokenizer_rejects_unknown_kind_and_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="kind='wordpiece' is unknown; use one of byte, hf"):
        load_tokenizer(TokenizerConfig(kind="wordpiece"))
    with pytest.raises(ConfigError, match="path is required with kind=hf"):
        load_tokenizer(TokenizerConfig(kind="hf"))
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path / "missing")))
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=r"is not a tokenizer\.json"):
        load_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path)))


def test_bpe_trained_on_the_sample_loads_and_round_trips(bpe_dir, multilingual):
    tok = load_tokenizer(TokenizerConfig(kind="hf", path=str(bpe_dir)))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 512
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    sample = resolve_path("pkg://modular/data/sample/de/val.jsonl")
    german = json.loads(sample.read_text(encoding="utf-8").splitlines()[0])["text"]
    for text in multilingual + [german]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(i > 2 for i in ids)  # text never encodes to a special token
    # BPE must actually merge: sample German text needs well under one token per byte.
    assert len(tok.encode(german)) < 0.75 * len(german.encode("utf-8"))
    assert tok.decode([1] + tok.encode("Äpfel") + [2]) == "Äpfel"


def test_fingerprint_is_stable_across_loads_and_differs_between_tokenizers(bpe_dir, tmp_path):
    a, b = HFTokenizer(bpe_dir), HFTokenizer(bpe_dir / "tokenizer.json")
    assert a.fingerprint() == b.fingerprint() != ByteTokenizer().fingerprint()
    other = train_bpe(["abc abd abe " * 50, "xyz " * 80], 262, tmp_path / "other")
    assert HFTokenizer(other).fingerprint() != a.fingerprint()


def test_train_bpe_refuses_small_vocab_and_existing_output(bpe_dir, tmp_path):
    with pytest.raises(ConfigError, match="vocab_size=100 is too small; use an integer >= 260"):
        train_bpe(["text"], 100, tmp_path / "t")
    with pytest.raises(DataError, match="already exists"):
        train_bpe(["text"], 300, bpe_dir)
    assert not (tmp_path / "t").exists()


def test_tokenizer_without_end_of_text_token_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="has no end-of-text token"):
        HFTokenizer(tmp_path)


def test_pretrained_folder_special_tokens_come_from_its_config(bpe_dir, tmp_path):
    folder = tmp_path / "pretrained"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<pad>"}}))
    assert HFTokenizer(folder).eos_id == 0  # the folder's choice wins over the <eos> name


def test_folder_without_tokenizer_json_loads_offline_through_transformers(bpe_dir, tmp_path, monkeypatch,
                                                                          multilingual):
    # A GPT-2 style folder (vocab.json + merges.txt, no tokenizer.json) made from the session's BPE.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = json.loads((bpe_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    folder = tmp_path / "gpt2_style"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(model["vocab"]), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
         "add_prefix_space": False}), encoding="utf-8")
    converted, reference = HFTokenizer(folder), HFTokenizer(bpe_dir)
    assert (converted.bos_id, converted.eos_id, converted.pad_id) == (1, 2, 0)
    for text in multilingual:
        ids = converted.encode(text)
        assert ids == reference.encode(text) and converted.decode(ids) == text


def test_train_command_learns_from_train_splits_only_and_prints_a_summary(make_config, tmp_path, capsys):
    train = [f"alpha beta gamma {i} " * 20 for i in range(30)]
    cfg = make_config({"d": train}, val={"d": ["qqqq xqxq " * 200]})
    assert tokenizer_train_command(cfg, 300, str(tmp_path / "tok")) == 0
    out = capsys.readouterr().out
    assert "vocab_size 300 (asked 300), 30 train documents" in out and "data.tokenizer.path=" in out
    model = json.loads((tmp_path / "tok" / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    merged = [token for token in model["vocab"] if len(token) > 1 and not token.startswith("<")]
    assert any("al" in t for t in merged) and not any("q" in t for t in merged)  # val text was never seen


def test_train_command_on_bad_input_fails_cleanly(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    cfg = {"domains": {"d": {"train": str(bad)}}}
    with pytest.raises(DataError, match=r"bad\.jsonl has invalid UTF-8 at byte offset 28;"):  # 15 + 13
        tokenizer_train_command(cfg, 300, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
