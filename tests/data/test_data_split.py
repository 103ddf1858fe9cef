"""The hash split: deterministic, disjoint, the right size, and the same rule the shared corpora used."""

from __future__ import annotations

import json

from modular.data.config import DomainConfig, resolve_path
from modular.data.corpus import iter_documents
from modular.data.split import is_val_document, plan_split


def test_rule_is_the_documented_sha1_formula():
    import hashlib

    texts = [f"document number {i}" for i in range(300)]
    expected = [int(hashlib.sha1(t.encode()).hexdigest(), 16) % 100 < 5 for t in texts]
    assert [is_val_document(t, 0.05) for t in texts] == expected
    assert 0 < sum(expected) < 300  # both splits occur, so the comparison above is not vacuous


def test_split_reproduces_the_embedded_sample_splits():
    # The sample's val files were made with this rule: every val document is val, every train one train.
    for domain in ["en", "de", "fr", "es", "code_py"]:
        for split in ["train", "val"]:
            path = resolve_path(f"pkg://modular/data/sample/{domain}/{split}.jsonl")
            with open(path, encoding="utf-8") as f:
                verdicts = {is_val_document(json.loads(line)["text"], 0.05) for line in f}
            assert verdicts == {split == "val"}, (domain, split)


def test_hash_split_is_disjoint_complete_deterministic_and_sized(make_config):
    texts = [f"doc {i}: " + "word " * (i % 7) for i in range(2000)]
    cfg = make_config({"d": texts}, val_fraction=0.1)
    train = [d.text for d in iter_documents(cfg, "d", "train")]
    val = [d.text for d in iter_documents(cfg, "d", "val")]
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(texts)
    assert val == [d.text for d in iter_documents(cfg, "d", "val")]
    # Binomial(2000, 0.1): sd = 13.4, so 3 sd is +-40 documents around 200.
    assert abs(len(val) - 200) <= 40


def test_explicit_val_path_uses_both_files_whole():
    plan = plan_split(DomainConfig(train="a.jsonl", val="b.jsonl"), "val", 0.05)
    assert plan.source == "b.jsonl" and plan.keep is None and plan.keeps("anything")
    plan = plan_split(DomainConfig(train="a.jsonl"), "val", 0.05)
    assert plan.source == "a.jsonl" and plan.keep == "val"
