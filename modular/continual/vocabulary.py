"""The vocabulary's lifecycle: grow a model's tokenizer, embedding and output head for a new domain's text.

`grow_vocabulary` (also `modular.continual.lifecycle.grow_vocabulary`) decides from tokens per byte whether the
domain is split badly, learns merges (modular/data/vocab_growth.py), saves the grown tokenizer and appends rows
that start as the mean of the old rows of the tokens each new token's text split into.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from modular.data import vocab_growth as vg
from modular.data.tokenizer import HFTokenizer, Tokenizer
from modular.errors import ConfigError
from modular.models.embedding import add_vocab_rows

GROWTH_RECORD = "growth.json"


@dataclass
class VocabGrowth:
    """What happened to the vocabulary for one domain, and why."""

    domain: str
    grew: bool
    reason: str  # one sentence: why it grew, or why not
    tokens_per_byte_before: float  # on the new domain's sample text, old tokenizer
    tokens_per_byte_after: float  # the same text under the tokenizer used from now on
    vocab_size_before: int
    vocab_size_after: int
    new_tokens: int
    merges: int
    new_characters: int  # characters of the new text the earlier domains (almost) never use
    changed_share: dict[str, float] = field(default_factory=dict)  # earlier domain -> share of its tokens changed
    tokenizer_path: str | None = None  # the grown tokenizer's folder
    seconds: float = 0.0
    tokenizer: Tokenizer | None = field(default=None, repr=False, compare=False)  # the one to use from now on

    @property
    def token_ids(self) -> range:
        return range(self.vocab_size_before, self.vocab_size_after)

    def record(self) -> dict:
        """JSON for reports (everything but the tokenizer object)."""
        out = asdict(self)
        out.pop("tokenizer")
        return out


def grow_vocabulary(model, tokenizer: Tokenizer, new_texts: Sequence[str], *, domain: str, out_dir: str | Path,
                    max_new_tokens: int, earlier_texts: Iterable[str] | Callable[[], Iterable[str]] = (),
                    earlier_val_texts: Mapping[str, Sequence[str]] | None = None,
                    tokens_per_byte_threshold: float = 0.0, new_char_share: float = 1e-5,
                    max_vocab_size: int | None = None, min_frequency: int = 2) -> VocabGrowth:
    """Grow `tokenizer` and `model` (a ModularLM) for `domain` when its text is split badly; returns what happened.

    new_texts: the new domain's training text to learn merges on; earlier_texts: the earlier domains' training
    text (or a callable giving it, read only if merges are learnt), whose characters the merges avoid;
    earlier_val_texts: {domain: texts} on which the share of changed tokens is measured. It grows when the old
    tokenizer needs more than `tokens_per_byte_threshold` tokens per byte of new_texts: up to max_new_tokens
    tokens, ids appended after the old ones, saved to out_dir (tokenizer.json, tokenizer_config.json,
    growth.json; written atomically). When out_dir already holds this growth (a resumed run, or another
    process of the same run), the saved tokenizer is used instead of learning it again. New embedding and
    output-head rows are the mean of the old rows of the tokens each new token's text split into; they belong
    to `domain`. One sentence (ConfigError) for a tokenizer that cannot grow or a size beyond max_vocab_size;
    UserError for a folder that cannot be written.
    """
    started = time.perf_counter()
    backend = vg.rust_tokenizer_of(tokenizer)
    before = model.vocab_size
    if tokenizer.vocab_size != before:
        raise ConfigError(f"vocabulary growth appends ids after the tokenizer's {tokenizer.vocab_size} tokens, but the "
                          f"model holds {before} rows; set model.vocab_size={tokenizer.vocab_size}.")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} is not allowed; add at least 1 token.")
    if max_vocab_size is not None and before + max_new_tokens > max_vocab_size:
        raise ConfigError(f"growing the vocabulary by up to {max_new_tokens} tokens could take it from {before} to "
                          f"{before + max_new_tokens} tokens, beyond model.max_vocab_size={max_vocab_size}; add at "
                          f"most {max(0, max_vocab_size - before)} tokens or raise model.max_vocab_size.")
    out_dir = Path(out_dir)
    vg.check_writable(out_dir)
    texts = list(new_texts)
    tpb = vg.tokens_per_byte(tokenizer, texts)
    result = VocabGrowth(domain=domain, grew=False, reason="", tokens_per_byte_before=tpb, tokens_per_byte_after=tpb,
                         vocab_size_before=before, vocab_size_after=before, new_tokens=0, merges=0, new_characters=0,
                         tokenizer=tokenizer)
    if tpb <= tokens_per_byte_threshold:
        result.reason = (f"{domain} needs {tpb:.3f} tokens per byte, not more than the threshold "
                         f"{tokens_per_byte_threshold}: the tokenizer already splits it well.")
        return _finish(result, started)

    saved = _saved_growth(out_dir, tokenizer, max_new_tokens)
    if saved is not None:
        grown, record = saved
        new_tokens = [grown.backend.id_to_token(i) for i in range(before, grown.vocab_size)]
        result.merges, result.new_characters = record["merges"], record["new_characters"]
    else:
        earlier = earlier_texts() if callable(earlier_texts) else earlier_texts
        new_chars = vg.new_characters(vg.character_counts(texts), vg.character_counts(earlier), new_char_share)
        result.new_characters = len(new_chars)
        merges = vg.learn_merges(backend, texts, new_chars, max_new_tokens, min_frequency) if new_chars else None
        if merges is None or not merges.new_tokens:
            result.reason = (f"{domain} needs {tpb:.3f} tokens per byte (threshold {tokens_per_byte_threshold}), but "
                             + ("none of its characters is new to the earlier domains, and merges over shared "
                                "characters would change how their text tokenizes." if not new_chars else
                                f"no pair of tokens holding one of its {len(new_chars)} new characters occurs "
                                f"{min_frequency} times."))
            return _finish(result, started)
        result.merges = len(merges.merges)
        new_tokens = merges.new_tokens
        record = {"base_fingerprint": tokenizer.fingerprint(), "max_new_tokens": max_new_tokens, "domain": domain,
                  "merges": len(merges.merges), "new_tokens": len(new_tokens), "new_characters": len(new_chars),
                  "first_id": before}
        grown = vg.write_tokenizer_folder(out_dir, vg.grown_tokenizer_json(backend, merges), tokenizer, record)
    _add_rows(model, backend, new_tokens, domain)
    result.grew = True
    result.tokenizer = grown
    result.tokenizer_path = str(out_dir)
    result.new_tokens = len(new_tokens)
    result.vocab_size_after = model.vocab_size
    result.tokens_per_byte_after = vg.tokens_per_byte(grown, texts)
    for name, val_texts in (earlier_val_texts or {}).items():
        result.changed_share[name] = vg.changed_token_share(tokenizer, grown, val_texts)
    result.reason = (f"{domain} needs {tpb:.3f} tokens per byte, more than the threshold {tokens_per_byte_threshold}: "
                     f"added {len(new_tokens)} tokens (ids {before}-{model.vocab_size - 1}), now "
                     f"{result.tokens_per_byte_after:.3f} tokens per byte.")
    return _finish(result, started)


def _finish(result: VocabGrowth, started: float) -> VocabGrowth:
    result.seconds = round(time.perf_counter() - started, 2)
    return result


def _saved_growth(folder: Path, tokenizer: Tokenizer, max_new_tokens: int) -> tuple[HFTokenizer, dict] | None:
    """The tokenizer a earlier call saved in `folder` for this same base tokenizer and budget, if any."""
    file = folder / GROWTH_RECORD
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("base_fingerprint") != tokenizer.fingerprint() or record.get("max_new_tokens") != max_new_tokens:
        return None
    return HFTokenizer(folder), record


@torch.no_grad()
def _add_rows(model, old_backend, new_tokens: list[str], domain: str) -> range:
    """Each new token's rows: the mean of the old rows of the tokens its text splits into under the old tokenizer."""
    pieces = [[t.id for t in old_backend.model.tokenize(token)] for token in new_tokens]
    embedding = model.embed_tokens.full_weight.detach()  # [V, D]
    head = None if model.lm_head.tied else model.lm_head.full_weight.detach()

    def means(rows_VD):
        return torch.stack([rows_VD[torch.tensor(ids, device=rows_VD.device)].float().mean(0) for ids in pieces])

    new_embedding = means(embedding).to(embedding.dtype)
    new_head = None if head is None else means(head).to(head.dtype)
    return add_vocab_rows(model, new_embedding, new_head, domain)


def load_run_tokenizer(run_dir: str | Path, record: dict | None) -> HFTokenizer | None:
    """The grown tokenizer a checkpoint of run_dir was trained with (its trainer state's "tokenizer"), or None."""
    if not record:
        return None
    from modular.errors import CheckpointError

    folder = Path(run_dir) / record["path"]
    if not (folder / vg.TOKENIZER_FILE).is_file():
        raise CheckpointError(f"the checkpoint was trained with the grown tokenizer in {folder}, which is missing; "
                              "restore that folder of the run.")
    tokenizer = HFTokenizer(folder)
    if tokenizer.fingerprint() != record.get("fingerprint"):
        raise CheckpointError(f"the tokenizer in {folder} is not the one the checkpoint was trained with (its "
                              "fingerprint differs); restore that folder of the run.")
    return tokenizer


def tokenizer_record(run_dir: str | Path, tokenizer: Tokenizer, grown_path: str | Path | None) -> dict | None:
    """What a checkpoint records of a grown tokenizer: its folder relative to run_dir and its fingerprint."""
    if grown_path is None:
        return None
    return {"path": str(Path(grown_path).resolve().relative_to(Path(run_dir).resolve())),
            "fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size}
