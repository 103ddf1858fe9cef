"""Vocabulary growth of a byte-level BPE tokenizer: merges learned on a new domain's text, appended after the old
ones, so existing ids never change and text without the new domain's characters tokenizes exactly as before.

The merges continue from the old tokenizer's segmentation of the new text (every old merge outranks every new
one), and a merge is admitted only when its bytes hold a whole character the earlier domains (almost) never use.
"""

from __future__ import annotations

import heapq
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from modular.atomic import atomic_dir
from modular.data.tokenizer import HFTokenizer, Tokenizer, bytes_to_unicode
from modular.errors import ConfigError, UserError

TOKENIZER_FILE = "tokenizer.json"
_CHAR_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def rust_tokenizer_of(tokenizer: Tokenizer):
    """The `tokenizers.Tokenizer` behind a modular tokenizer that can grow; one sentence for one that cannot."""
    if tokenizer.kind == "byte":
        raise ConfigError("vocabulary growth needs a BPE tokenizer, but data.tokenizer.kind=byte has a fixed "
                          "vocabulary of 256 bytes (nothing to grow); train one with `modular tokenizer train` and "
                          "use data.tokenizer.kind=hf, or set continual.grow_vocab.max_new_tokens=0.")
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        raise ConfigError(f"vocabulary growth needs a Hugging Face tokenizer; {type(tokenizer).__name__} has none.")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _has_byte_level(spec.get("pre_tokenizer")):
        where = getattr(tokenizer, "path", "the tokenizer")
        raise ConfigError(f"vocabulary growth needs a byte-level BPE tokenizer (as `modular tokenizer train` makes, "
                          f"or GPT-2's, Llama 3's, SmolLM2's), but {where} has a {model.get('type')} model without a "
                          "ByteLevel pre-tokenizer.")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("dropout"):
        raise ConfigError("vocabulary growth needs a plain byte-level BPE (no subword prefix or suffix, no dropout).")
    return backend


def _has_byte_level(pre_tokenizer: dict | None) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in pre_tokenizer.get("pretokenizers") or [])


def token_bytes(token: str) -> bytes:
    """The bytes a byte-level token string stands for (GPT-2's byte → printable character table)."""
    return bytes(_CHAR_TO_BYTE[c] for c in token)


def whole_characters(data: bytes) -> set[str]:
    """Characters whose every byte lies in `data` (a piece of a character at either end does not count)."""
    return set(data.decode("utf-8", errors="ignore"))


def character_counts(texts: Iterable[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    return counts


def new_characters(new: Counter[str], earlier: Counter[str], max_share: float) -> set[str]:
    """Characters of the new text that make up less than `max_share` of the earlier text's characters.

    Not "never": real corpora hold a stray letter of every script (an alphabet in a manual), and a merge over
    such a letter changes only the few earlier words that hold it; the share of changed tokens is measured.
    """
    total = sum(earlier.values())
    return {c for c in new if earlier.get(c, 0) <= max_share * total}


@dataclass
class Merges:
    """What `learn_merges` found: the merges in rank order and the tokens they add, in id order."""

    merges: list[tuple[str, str]]
    new_tokens: list[str]  # byte-level strings of the tokens not in the old vocabulary
    words: int  # distinct pre-tokenized words of the new text that hold a new character
    segmentation: dict[str, list[str]] = field(repr=False, default_factory=dict)  # word -> its tokens after growth


def learn_merges(backend, texts: Iterable[str], new_chars: set[str], max_new_tokens: int,
                 min_frequency: int = 2) -> Merges:
    """BPE merges on top of `backend`'s segmentation of `texts`, each holding a whole character of `new_chars`.

    Words (the tokenizer's own pre-tokenization) without a new character can never take such a merge, so they
    are skipped. Merges are greedy by frequency (ties: the smaller pair of strings), left to right within a
    word, until max_new_tokens new tokens exist or no admitted pair occurs min_frequency times.
    """
    normalizer, pre_tokenizer, model = backend.normalizer, backend.pre_tokenizer, backend.model
    vocab = backend.get_vocab(with_added_tokens=True)
    words: Counter[str] = Counter()
    for text in texts:
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        for word, (start, end) in pre_tokenizer.pre_tokenize_str(text):
            if not new_chars.isdisjoint(text[start:end]):
                words[word] += 1
    unique = sorted(words)
    seqs = [[t.value for t in model.tokenize(w)] for w in unique]
    counts = [words[w] for w in unique]

    admitted: dict[tuple[str, str], bool] = {}

    def admits(pair: tuple[str, str]) -> bool:
        ok = admitted.get(pair)
        if ok is None:
            merged = pair[0] + pair[1]
            # a merge into an old token could wake old merges of that token: its segmentation would then
            # differ from the one learned here; such pairs are left alone
            ok = merged not in vocab and not new_chars.isdisjoint(whole_characters(token_bytes(merged)))
            admitted[pair] = ok
        return ok

    pair_count: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair in pairwise(seq):
            if admits(pair):
                pair_count[pair] += counts[i]
                where[pair].add(i)
    heap = [(-n, pair) for pair, n in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    new_tokens: list[str] = []
    added: set[str] = set()
    while heap and len(new_tokens) < max_new_tokens:
        negative, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -negative:
            continue  # a stale entry: the count changed since it was pushed
        if -negative < min_frequency:
            break
        a, b = pair
        merged = a + b
        merges.append(pair)
        if merged not in added:
            added.add(merged)
            new_tokens.append(merged)
        changed: set[tuple[str, str]] = set()
        for i in where.pop(pair, ()):
            seq, c = seqs[i], counts[i]
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and seq[j] == a and seq[j + 1] == b:
                    out.append(merged)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            if len(out) == len(seq):
                continue  # a stale index: the pair left this word in an earlier merge
            for p in pairwise(seq):
                if admits(p):
                    pair_count[p] -= c
                    changed.add(p)
            for p in pairwise(out):
                if admits(p):
                    pair_count[p] += c
                    where[p].add(i)
                    changed.add(p)
            seqs[i] = out
        pair_count.pop(pair, None)
        for p in changed:
            n = pair_count.get(p, 0)
            if n > 0:
                heapq.heappush(heap, (-n, p))
            else:
                pair_count.pop(p, None)
    return Merges(merges, new_tokens, len(unique), dict(zip(unique, seqs)))


def grown_tokenizer_json(backend, merges: Merges) -> str:
    """tokenizer.json of `backend` with the new tokens appended (ids from its vocabulary size on) and the new
    merges ranked after every old one."""
    spec = json.loads(backend.to_str())
    model = spec["model"]
    vocab = model["vocab"]
    next_id = backend.get_vocab_size(with_added_tokens=True)
    taken = set(vocab.values()) | {t["id"] for t in spec.get("added_tokens") or []}
    if max(taken, default=-1) >= next_id:
        raise ConfigError(f"the tokenizer's ids reach {max(taken)} but its vocabulary size is {next_id}; "
                          "it cannot be grown without moving ids.")
    for token in merges.new_tokens:
        vocab[token] = next_id
        next_id += 1
    old = model.get("merges") or []
    as_strings = bool(old) and isinstance(old[0], str)  # tokenizers < 0.20 wrote "a b"
    model["merges"] = old + [f"{a} {b}" if as_strings else [a, b] for a, b in merges.merges]
    return json.dumps(spec, ensure_ascii=False)


# -- measurements ------------------------------------------------------------------------------------


def tokens_per_byte(tokenizer: Tokenizer, texts: Sequence[str]) -> float:
    """Tokens per UTF-8 byte of `texts` (1.0 for raw bytes; lower compresses better)."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(list(texts))) if texts else 0
    return n_tokens / n_bytes if n_bytes else 0.0


def changed_token_share(old: Tokenizer, new: Tokenizer, texts: Sequence[str]) -> float:
    """The share of `old`'s tokens of `texts` that `new` does not produce at the same place with the same id."""
    old_backend, new_backend = old.backend, new.backend
    total = changed = 0
    texts = list(texts)
    for a, b in zip(old_backend.encode_batch(texts, add_special_tokens=False),
                    new_backend.encode_batch(texts, add_special_tokens=False)):
        total += len(a.ids)
        if a.ids != b.ids:
            kept = set(zip(b.ids, b.offsets))
            changed += sum(1 for token in zip(a.ids, a.offsets) if token not in kept)
    return changed / total if total else 0.0


# -- the tokenizer folder ----------------------------------------------------------------------------


def write_tokenizer_folder(folder: str | Path, tokenizer_json: str, old: HFTokenizer, record: dict) -> HFTokenizer:
    """Write tokenizer.json, tokenizer_config.json (the old special tokens, by name) and growth.json into `folder`
    atomically; returns the grown tokenizer as loaded from there."""
    folder = Path(folder)
    config = _source_config(old)
    for key, token_id in (("bos_token", old.bos_id), ("eos_token", old.eos_id), ("pad_token", old.pad_id)):
        if token_id is not None:
            config[key] = old.backend.id_to_token(token_id)
    try:
        with atomic_dir(folder) as tmp:
            (tmp / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
            (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            (tmp / "growth.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write the grown tokenizer to {folder} ({e.strerror or e}); the run folder must "
                        "be writable.") from None
    return HFTokenizer(folder)


def _source_config(tokenizer: HFTokenizer) -> dict:
    """The source folder's tokenizer_config.json (chat template and all), if it has one."""
    path = Path(getattr(tokenizer, "path", ""))
    file = path / "tokenizer_config.json" if path.is_dir() else None
    if file is None or not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    config.pop("added_tokens_decoder", None)  # ids of the source's specials: unchanged, and tokenizer.json has them
    return config


def check_writable(folder: str | Path) -> None:
    """One sentence, before a run writes anything, when `folder` could not be created or written."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if existing == folder and not folder.is_dir():
        raise UserError(f"the tokenizer folder {folder} is a file; it cannot hold the grown tokenizer.")
    if not existing.is_dir():
        raise UserError(f"the tokenizer folder {folder} cannot be created: {existing} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"the tokenizer folder {folder} cannot be written: {existing} is not writable.")
