"""Growing a byte-level BPE tokenizer: existing ids and old text's tokens never change, the new language
compresses, the learnt segmentation is the one the tokenizer applies, and tokenizers that cannot grow are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import english_bpe, russian_texts
from modular.data import vocab_growth as vg
from modular.data.config import resolve_path
from modular.data.tokenizer import ByteTokenizer, HFTokenizer
from modular.errors import ConfigError, UserError


def english(n: int | None = None) -> list[str]:
    path = resolve_path("pkg://modular/data/sample/en/val.jsonl")
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    return texts[:n] if n else texts


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_growth")
    old = HFTokenizer(english_bpe(root / "en_bpe"))
    backend = vg.rust_tokenizer_of(old)
    train = russian_texts(120, seed=0)
    new_chars = vg.new_characters(vg.character_counts(train), vg.character_counts(english()), 1e-5)
    merges = vg.learn_merges(backend, train, new_chars, max_new_tokens=150)
    new = vg.write_tokenizer_folder(root / "grown", vg.grown_tokenizer_json(backend, merges), old, {"test": True})
    return old, new, merges, new_chars, root


def test_existing_ids_never_change_and_new_ones_follow(grown):
    old, new, merges, _, _ = grown
    old_vocab, new_vocab = old.backend.get_vocab(), new.backend.get_vocab()
    assert all(new_vocab[token] == i for token, i in old_vocab.items())
    assert new.vocab_size == old.vocab_size + len(merges.new_tokens) and 0 < len(merges.new_tokens) <= 150
    assert sorted(new_vocab[t] for t in merges.new_tokens) == list(range(old.vocab_size, new.vocab_size))
    old_merges = json.loads(old.backend.to_str())["model"]["merges"]
    new_merges = json.loads(new.backend.to_str())["model"]["merges"]
    assert new_merges[:len(old_merges)] == old_merges  # every old merge keeps its rank
    assert (new.bos_id, new.eos_id, new.pad_id) == (old.bos_id, old.eos_id, old.pad_id)


def test_old_text_tokenizes_as_before_and_the_new_language_compresses(grown):
    old, new, _, _, _ = grown
    texts = english()
    assert [a.tolist() for a in new.encode_batch(texts)] == [a.tolist() for a in old.encode_batch(texts)]
    assert vg.changed_token_share(old, new, texts) == 0.0
    ru = russian_texts(10, seed=7)  # unseen documents of the new language
    before, after = vg.tokens_per_byte(old, ru), vg.tokens_per_byte(new, ru)
    assert before > 0.7 and after < 0.5 * before, (before, after)
    assert vg.changed_token_share(old, new, ru) > 0.5
    for text in ru:
        assert new.decode(new.encode(text)) == text


def test_every_merge_holds_a_new_character_and_the_learnt_segmentation_is_the_tokenizers(grown):
    _, new, merges, new_chars, _ = grown
    assert "ы" in new_chars and "e" not in new_chars
    for a, b in merges.merges:
        assert vg.whole_characters(vg.token_bytes(a + b)) & new_chars, (a, b)
    assert merges.segmentation
    for word, tokens in merges.segmentation.items():  # HF's BPE (old merges first, then ours by rank) agrees
        assert [t.value for t in new.backend.model.tokenize(word)] == tokens, word


def test_a_character_rare_in_earlier_text_still_counts_as_new():
    earlier = vg.character_counts(["a" * 100_000 + "ж"])
    new = vg.character_counts(["жжжaaa"])
    assert vg.new_characters(new, earlier, 1e-5) == {"ж"}
    assert vg.new_characters(new, earlier, 1e-6) == set()  # 1 in 100,001 is above a share of 1e-6


def test_the_changed_share_counts_tokens_that_moved(grown):
    old, new, _, _, _ = grown
    mixed = ["The system works. Система работает."]
    share = vg.changed_token_share(old, new, mixed)
    n_old = len(old.encode(mixed[0]))
    n_english = len(old.encode("The system works. "))
    assert 0 < share <= (n_old - n_english) / n_old + 1e-12  # only the Russian part changed


def test_a_tokenizer_that_cannot_grow_is_refused_in_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match=r"data.tokenizer.kind=byte has a fixed vocabulary of 256 bytes"):
        vg.rust_tokenizer_of(ByteTokenizer())
    from tokenizers import Tokenizer, models, pre_tokenizers

    word_level = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1}, unk_token="<eos>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match="needs a byte-level BPE tokenizer") as err:
        vg.rust_tokenizer_of(HFTokenizer(tmp_path))
    assert "\n" not in str(err.value)


def test_a_folder_that_cannot_be_written_is_one_sentence(grown, tmp_path):
    old, _, merges, _, _ = grown
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=r"cannot be created: .* is a file"):
        vg.check_writable(blocker / "tokenizer")
    with pytest.raises(UserError, match="is a file; it cannot hold the grown tokenizer"):
        vg.check_writable(blocker)
    with pytest.raises(UserError, match="cannot write the grown tokenizer to"):
        vg.write_tokenizer_folder(blocker / "tokenizer", vg.grown_tokenizer_json(old.backend, merges), old, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing half-written beside it


def test_rewriting_the_folder_is_atomic(grown):
    old, new, merges, _, root = grown
    folder = root / "rewritten"
    text = vg.grown_tokenizer_json(old.backend, merges)
    vg.write_tokenizer_folder(folder, text, old, {"n": 1})
    again = vg.write_tokenizer_folder(folder, text, old, {"n": 2})
    assert json.loads((folder / "growth.json").read_text()) == {"n": 2}
    assert again.fingerprint() == new.fingerprint()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def smollm2_like(folder: Path) -> HFTokenizer:
    """A tokenizer built like SmolLM2's: Digits + ByteLevel pre-tokenizer, specials at ids 0..2 with HF names,
    tokenizer_config.json naming them and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(english(), trainer=trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    return HFTokenizer(folder)


def test_an_hf_tokenizer_like_smollm2s_grows_the_same_way(tmp_path):
    old = smollm2_like(tmp_path / "smol")
    backend = vg.rust_tokenizer_of(old)
    train = russian_texts(60, seed=0)
    new_chars = vg.new_characters(vg.character_counts(train), vg.character_counts(english()), 1e-5)
    merges = vg.learn_merges(backend, train, new_chars, max_new_tokens=80)
    new = vg.write_tokenizer_folder(tmp_path / "grown", vg.grown_tokenizer_json(backend, merges), old, {})
    assert (new.bos_id, new.eos_id, new.pad_id) == (old.bos_id, old.eos_id, old.pad_id) == (1, 2, 0)
    assert json.loads((tmp_path / "grown" / "tokenizer_config.json").read_text())["chat_template"]
    assert all(new.backend.token_to_id(t) == i for t, i in old.backend.get_vocab().items())
    texts = english(20) + ["Version 3.11 costs 42 dollars."]
    assert [a.tolist() for a in new.encode_batch(texts)] == [a.tolist() for a in old.encode_batch(texts)]
    ru = russian_texts(5, seed=3)
    assert vg.tokens_per_byte(new, ru) < 0.6 * vg.tokens_per_byte(old, ru)
