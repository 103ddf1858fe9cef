"""Mixture loader and validation windows: shapes, labels, proportions, determinism, exact resume, limits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modular.data.loader import MixtureLoader, ValidationSet, validation_sets
from modular.data.shards import build_all_shards, build_domain_shards
from modular.errors import CheckpointError, ConfigError, DataError


@pytest.fixture
def letter_shards(make_config):
    """Three domains whose text uses one letter each, so every token tells which domain it came from."""
    cfg = make_config({"a": ["a" * 300] * 4, "b": ["b" * 500] * 3, "c": ["c" * 200] * 5},
                      val={"a": ["a" * 50], "b": ["b" * 50], "c": ["c" * 50]})
    return cfg, build_all_shards(cfg, "train")


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_have_shifted_targets_and_correct_domain_labels(letter_shards):
    _, shards = letter_shards
    loader = MixtureLoader(shards, batch_size=16, seq_len=32, seed=1)
    for batch in _take(loader, 10):
        assert batch.tokens.shape == (16, 33) and batch.tokens.dtype == torch.int64
        assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
        for row, domain_id in zip(batch.tokens, batch.domain_ids):
            letters = {chr(t) for t in row.tolist() if t < 256}
            assert letters == {batch.domain_names[domain_id]}


def test_mixture_proportions_follow_weights(letter_shards):
    _, shards = letter_shards
    weights = {"a": 1.0, "b": 2.0, "c": 5.0}
    loader = MixtureLoader(shards, batch_size=64, seq_len=8, weights=weights, seed=7)
    ids = torch.cat([b.domain_ids for b in _take(loader, 100)])
    n = len(ids)  # 6400 independent draws: each count is Binomial(n, p)
    for i, name in enumerate(loader.domain_names):
        p = weights[name] / 8.0
        count = int((ids == i).sum())
        # 3 standard deviations: a correct sampler fails this with probability ~0.3%; uniform sampling
        # (p = 1/3) would miss by more than 25 standard deviations for every domain.
        assert abs(count - n * p) <= 3 * np.sqrt(n * p * (1 - p)), (name, count, n * p)


def test_same_seed_same_batches_other_seed_or_rank_differs(letter_shards):
    _, shards = letter_shards
    first = [b.tokens for b in _take(MixtureLoader(shards, 8, 16, seed=3), 5)]
    second = [b.tokens for b in _take(MixtureLoader(shards, 8, 16, seed=3), 5)]
    other_seed = [b.tokens for b in _take(MixtureLoader(shards, 8, 16, seed=4), 5)]
    other_rank = [b.tokens for b in _take(MixtureLoader(shards, 8, 16, seed=3, rank=1), 5)]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert not all(torch.equal(x, y) for x, y in zip(first, other_seed))
    assert not all(torch.equal(x, y) for x, y in zip(first, other_rank))
    assert not torch.equal(first[0], first[1])


def test_restored_loader_continues_exactly(letter_shards):
    _, shards = letter_shards
    weights = {"a": 1.0, "b": 1.0, "c": 3.0}
    loader = MixtureLoader(shards, 8, 16, weights=weights, seed=11)
    _take(loader, 5)
    state = json.loads(json.dumps(loader.state_dict()))  # must survive a JSON checkpoint
    expected = _take(loader, 4)
    fresh = MixtureLoader(shards, 8, 16, weights=weights, seed=11)
    fresh.load_state_dict(state)
    resumed = _take(fresh, 4)
    assert state["step"] == 5 and fresh.step == 9
    for x, y in zip(expected, resumed):
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.domain_ids, y.domain_ids)
    # Without the restore the stream would start over, so the check above is not vacuous.
    assert not torch.equal(MixtureLoader(shards, 8, 16, weights=weights, seed=11).batch_at(0).tokens,
                           expected[0].tokens)


def test_restore_into_a_differently_configured_loader_is_refused(letter_shards):
    _, shards = letter_shards
    state = MixtureLoader(shards, 8, 16, seed=1).state_dict()
    other = MixtureLoader(shards, 4, 16, seed=1)
    with pytest.raises(CheckpointError, match="batch_size=8 but this one has batch_size=4"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)
    assert other.step == 0 == state["step"]
    with pytest.raises(CheckpointError, match="not a version-1 MixtureLoader state"):
        other.load_state_dict({"position": 3})


def test_from_config_uses_config_weights_or_a_subset(letter_shards):
    cfg, _ = letter_shards
    cfg.domains["b"].weight = 3.0
    loader = MixtureLoader.from_config(cfg, 4, 8)
    assert loader.domain_names == ("a", "b", "c") and loader.weights == (1.0, 3.0, 1.0)
    replay = MixtureLoader.from_config(cfg, 4, 8, weights={"c": 0.8, "a": 0.2})
    assert replay.domain_names == ("c", "a") and set(next(replay).domain_ids.tolist()) <= {0, 1}


def test_bad_loader_arguments(letter_shards):
    _, shards = letter_shards
    with pytest.raises(ConfigError, match="seq_len=0 is not allowed"):
        MixtureLoader(shards, 4, 0)
    with pytest.raises(ConfigError, match="weight of domain 'a' is 0"):
        MixtureLoader(shards, 4, 8, weights={"a": 0, "b": 1, "c": 1})
    with pytest.raises(ConfigError, match="give one weight per domain"):
        MixtureLoader(shards, 4, 8, weights={"a": 1})
    with pytest.raises(DataError, match="domain 'c' has 1010 training tokens, fewer than seq_len\\+1=1201"):
        MixtureLoader(shards, 4, 1200)


def test_validation_covers_every_token_once_in_order(letter_shards):
    cfg, _ = letter_shards
    shard = build_domain_shards(cfg, "a", "val")  # one document: 52 tokens
    val = ValidationSet(shard, batch_size=2, seq_len=10)
    batches = list(val)
    assert val.num_windows == 5 and len(val) == len(batches) == 3 and len(batches[-1].tokens) == 1
    targets = torch.cat([b.targets.reshape(-1) for b in batches])
    assert torch.equal(targets, torch.from_numpy(shard.tokens[1:51].astype(np.int64)))
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(batches, val))  # deterministic re-iteration
    assert val.num_target_tokens == 50 and val.num_bytes == pytest.approx(50 * 50 / 51)
    limited = ValidationSet(shard, batch_size=2, seq_len=10, max_batches=1)
    assert len(limited) == 1 and limited.num_windows == 2


def test_validation_longer_than_val_tokens_is_a_data_error(letter_shards):
    cfg, _ = letter_shards
    with pytest.raises(DataError, match="domain 'a' has 52 val tokens, fewer than seq_len\\+1=65"):
        validation_sets(cfg, batch_size=2, seq_len=64)
    sets = validation_sets(cfg, batch_size=2, seq_len=51)
    assert sorted(sets) == ["a", "b", "c"] and all(len(s) == 1 for s in sets.values())
    assert next(iter(sets["b"])).domain_names == ("b",)


def test_a_shared_tokenizer_is_used_for_train_and_val(letter_shards, bpe_dir):
    from modular.data.tokenizer import HFTokenizer

    cfg, _ = letter_shards
    tok = HFTokenizer(bpe_dir)
    loader = MixtureLoader.from_config(cfg, 4, 8, tokenizer=tok)
    val = validation_sets(cfg, 2, 8, tokenizer=tok)["a"]
    assert loader.batch_at(0).tokens.max() < tok.vocab_size and val.shard.meta["tokenizer"]["kind"] == "hf"
    assert tok.decode(val.shard.document(0)) == "a" * 50
