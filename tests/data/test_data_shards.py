"""Token shards: exact round trip, byte counts, cache reuse and rebuild, parallel build, no partial output."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from modular.data.config import TokenizerConfig, sample_data_config
from modular.data.shards import build_all_shards, build_domain_shards
from modular.data.tokenizer import ByteTokenizer, HFTokenizer
from modular.errors import DataError


def _texts_of(shard, tok):
    return [tok.decode(shard.document(i)) for i in range(shard.num_docs)]


def test_shard_round_trip_packs_bos_text_eos(make_config, multilingual):
    cfg = make_config({"m": multilingual}, val={"m": multilingual[:1]})
    shard = build_domain_shards(cfg, "m", "train")
    tok = ByteTokenizer()
    assert shard.tokens.dtype == np.uint16 and shard.num_docs == len(multilingual)
    for i, text in enumerate(multilingual):
        doc = shard.document(i).tolist()
        assert doc == [tok.bos_id] + list(text.encode("utf-8")) + [tok.eos_id]
    assert _texts_of(shard, tok) == multilingual
    assert shard.num_bytes == sum(len(t.encode("utf-8")) for t in multilingual)
    assert shard.num_tokens == shard.num_bytes + 2 * len(multilingual)
    meta = json.loads((shard.path / "meta.json").read_text())
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint()
    assert meta["sources"][0]["sha256"] and meta["sources"][0]["size"] > 0


def test_hf_shard_round_trips_through_bpe(make_config, multilingual, bpe_dir):
    cfg = make_config({"m": multilingual}, tokenizer=TokenizerConfig(kind="hf", path=str(bpe_dir)))
    shard = build_domain_shards(cfg, "m", "train")
    tok = HFTokenizer(bpe_dir)
    assert shard.document(0)[0] == tok.bos_id and shard.document(0)[-1] == tok.eos_id
    assert _texts_of(shard, tok) == multilingual
    assert shard.num_tokens < shard.num_bytes  # BPE compresses even this short text


def test_second_build_reuses_the_cache_without_tokenising(make_config, monkeypatch):
    cfg = make_config({"a": ["alpha " * 20, "beta " * 30]})
    first = build_domain_shards(cfg, "a", "train")
    calls = []
    original = ByteTokenizer.encode_batch
    monkeypatch.setattr(ByteTokenizer, "encode_batch", lambda self, t: calls.append(1) or original(self, t))
    again = build_domain_shards(cfg, "a", "train")
    assert again.reused and not first.reused and again.path == first.path and calls == []
    assert np.array_equal(again.tokens, first.tokens)


def test_changed_input_or_tokenizer_rebuilds(make_config, write_jsonl, bpe_dir, tmp_path):
    cfg = make_config({"a": [f"first version {i}" for i in range(20)]})
    old = build_domain_shards(cfg, "a", "train")
    write_jsonl(tmp_path / "corpus" / "a" / "train.jsonl", [f"second, longer version {i}" for i in range(20)])
    new = build_domain_shards(cfg, "a", "train")
    assert not new.reused and new.path != old.path
    assert all(t.startswith("second, longer") for t in _texts_of(new, ByteTokenizer()))
    cfg.tokenizer = TokenizerConfig(kind="hf", path=str(bpe_dir))
    hf = build_domain_shards(cfg, "a", "train")
    assert not hf.reused and hf.path != new.path and hf.meta["tokenizer"]["kind"] == "hf"
    cfg.val_fraction = 0.5  # the hash-split setting is part of the key too
    assert build_domain_shards(cfg, "a", "train").path != hf.path


def test_parallel_build_equals_serial_build(tmp_path, caplog):
    tok = ByteTokenizer()
    serial_cfg = sample_data_config(("en",), cache_dir=str(tmp_path / "s"), num_workers=1)
    parallel_cfg = sample_data_config(("en",), cache_dir=str(tmp_path / "p"), num_workers=2)
    serial = build_domain_shards(serial_cfg, "en", "train", tokenizer=tok)
    parallel = build_domain_shards(parallel_cfg, "en", "train", tokenizer=tok, chunk_bytes=64 << 10)
    assert np.array_equal(serial.tokens, parallel.tokens)
    assert np.array_equal(serial.doc_offsets, parallel.doc_offsets)
    assert serial.num_docs == 168 and serial.num_bytes == 996_383  # as the corpus README states
    assert "cannot start" not in caplog.text  # the worker processes really ran


def test_hash_split_shards_are_disjoint_and_cover_the_file(make_config):
    texts = [f"document {i} " * (1 + i % 5) for i in range(400)]
    cfg = make_config({"d": texts}, val_fraction=0.2)
    shards = {s: build_domain_shards(cfg, "d", s) for s in ("train", "val")}
    tok = ByteTokenizer()
    train, val = (_texts_of(shards[s], tok) for s in ("train", "val"))
    assert not set(train) & set(val) and sorted(train + val) == sorted(texts)


def test_bad_utf8_fails_the_build_with_offset_and_leaves_nothing(tmp_path, make_config):
    cfg = make_config({"b": ["placeholder"]}, num_workers=2)
    bad = tmp_path / "corpus" / "b" / "train.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n' * 3 + b'{"text": "\xc3("}\n')
    with pytest.raises(DataError, match=r"train\.jsonl has invalid UTF-8 at byte offset 55;"):
        build_domain_shards(cfg, "b", "train", chunk_bytes=16)
    assert os.listdir(tmp_path / "cache") == []  # no shard and no temporary folder left behind
    cfg.on_bad_bytes = "replace"
    shard = build_domain_shards(cfg, "b", "train")
    assert _texts_of(shard, ByteTokenizer())[-1] == "\ufffd(" and shard.meta["docs_with_replaced_bytes"] == 1


def test_empty_file_among_others_and_empty_val_split_are_errors(tmp_path, make_config, write_jsonl):
    cfg = make_config({"d": ["one document"]})
    with pytest.raises(DataError, match=r"domain 'd' has no val documents: .* none of its 1 documents"):
        build_domain_shards(cfg, "d", "val")
    folder = tmp_path / "folder"
    write_jsonl(folder / "a.jsonl", ["text"])
    (folder / "b.jsonl").write_bytes(b"")
    cfg.domains["d"].train = str(folder)
    with pytest.raises(DataError, match=r"b\.jsonl contains no documents"):
        build_domain_shards(cfg, "d", "train")


def test_damaged_cache_entry_is_rebuilt(make_config):
    cfg = make_config({"a": ["some text " * 10]})
    shard = build_domain_shards(cfg, "a", "train")
    with open(shard.path / "tokens.bin", "r+b") as f:
        f.truncate(10)
    rebuilt = build_domain_shards(cfg, "a", "train")
    assert not rebuilt.reused and rebuilt.num_tokens == 102 and len(rebuilt.tokens) == 102


def test_build_all_shards_covers_every_domain(make_config):
    cfg = make_config({"a": ["aaa"], "b": ["bbb"]}, val={"a": ["va"], "b": ["vb"]})
    shards = build_all_shards(cfg, "val")
    assert {d: _texts_of(s, ByteTokenizer()) for d, s in shards.items()} == {"a": ["va"], "b": ["vb"]}
