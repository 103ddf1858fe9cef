"""Tokenizers behind one interface: raw UTF-8 bytes, or a Hugging Face `tokenizers` file loaded offline.
Also byte-level BPE training (`train_bpe`) and the `modular tokenizer train` command built on it.

ByteTokenizer ids (fixed): 0..255 are the bytes, 256 = <pad>, 257 = <bos>, 258 = <eos>; vocab_size 259.
"""

from __future__ import annotations

import hashlib
import json
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from modular.atomic import atomic_write_text
from modular.data.config import TOKENIZER_KINDS, DataConfig, TokenizerConfig, as_data_config, resolve_path
from modular.errors import ConfigError, DataError
from modular.hf_folders import refuse_custom_code

BPE_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2 in a tokenizer made by train_bpe
MIN_BPE_VOCAB = 256 + len(BPE_SPECIAL_TOKENS) + 1  # the byte alphabet, the specials and one merge
_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>")
_EOS_NAMES = ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character table (the one tokenizers' ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


class Tokenizer(ABC):
    """Text <-> token ids. Documents are packed as [bos_id] + encode(text) + [eos_id] (no BOS when None)."""

    kind: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of the text alone, without special tokens."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids; special tokens are dropped."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A sha256 hex digest of everything that decides the ids; equal fingerprints encode identically."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id, "fingerprint": self.fingerprint()}


class ByteTokenizer(Tokenizer):
    kind = "byte"
    pad_id, bos_id, eos_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        # A window can cut a multi-byte character in half; show that as U+FFFD rather than fail.
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return hashlib.sha256(b"modular-byte-v1:pad=256,bos=257,eos=258").hexdigest()


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer from a tokenizer.json file or a local pretrained-tokenizer folder, offline."""

    kind = "hf"

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = resolve_path(str(path))
        names: dict = {}
        if self.path.is_dir():
            refuse_custom_code(self.path, DataError)  # its custom class may tokenize differently: never half-load it
            names = _special_token_names(self.path)
            file = self.path / "tokenizer.json"
            self._tok = _load_json(RustTokenizer, file) if file.is_file() else _load_pretrained(self.path)
        elif self.path.is_file():
            self._tok = _load_json(RustTokenizer, self.path)
        else:
            raise DataError(f"data.tokenizer.path={str(path)!r}: {self.path} does not exist.")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._find_id(names.get("bos_token"), _BOS_NAMES)
        eos_id = self._find_id(names.get("eos_token"), _EOS_NAMES)
        if eos_id is None:
            raise DataError(f"tokenizer {self.path} has no end-of-text token; it needs one of "
                            f"{', '.join(_EOS_NAMES)} to separate packed documents.")
        self.eos_id = eos_id
        pad_id = self._find_id(names.get("pad_token"), _PAD_NAMES)
        self.pad_id = eos_id if pad_id is None else pad_id
        self._fingerprint: str | None = None

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` itself (vocabulary growth and export read its model and merges)."""
        return self._tok

    def _find_id(self, configured: str | None, candidates: Sequence[str]) -> int | None:
        for name in ([configured] if configured else []) + list(candidates):
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            definition = f"{self._tok.to_str()}|bos={self.bos_id},eos={self.eos_id},pad={self.pad_id}"
            self._fingerprint = hashlib.sha256(definition.encode("utf-8")).hexdigest()
        return self._fingerprint


def _load_json(rust_tokenizer_cls, file: Path):
    try:
        return rust_tokenizer_cls.from_file(str(file))
    except Exception as e:  # noqa: BLE001 -- the Rust side raises a bare Exception for any parse error
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{file} is not a tokenizer.json the tokenizers library can read ({reason}).") \
            from None


def _load_pretrained(folder: Path):
    """A folder without tokenizer.json (e.g. sentencepiece files): let transformers convert it, offline."""
    from modular.hf_folders import auto_tokenizer

    try:
        hf = auto_tokenizer(folder)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 -- transformers raises many types; all mean "cannot load it"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{folder} holds no tokenizer.json and transformers cannot load it offline "
                        f"({reason}).") from None
    if not getattr(hf, "is_fast", False):
        raise DataError(f"{folder} holds a slow tokenizer only; save it with a tokenizer.json "
                        "(a fast tokenizer).")
    return hf.backend_tokenizer


def _special_token_names(folder: Path) -> dict:
    """bos/eos/pad token strings named by a pretrained folder's tokenizer_config.json, if any."""
    names: dict = {}
    for file_name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = folder / file_name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{file} is not readable JSON ({e}).") from None
        for key in ("bos_token", "eos_token", "pad_token"):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[key] = value
    return names


def load_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    if cfg.kind == "byte":
        return ByteTokenizer()
    if cfg.kind == "hf":
        if not cfg.path:
            raise ConfigError("data.tokenizer.path is required with kind=hf: a tokenizer.json file "
                              "or a folder holding one.")
        return HFTokenizer(cfg.path)
    raise ConfigError(f"data.tokenizer.kind={cfg.kind!r} is unknown; "
                      f"use one of {', '.join(TOKENIZER_KINDS)}.")


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path, *,
              show_progress: bool = False) -> Path:
    """Train a byte-level BPE (<pad>, <bos>, <eos> = ids 0, 1, 2) and write out_dir/tokenizer.json."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(f"vocab_size={vocab_size!r} is too small; use an integer >= {MIN_BPE_VOCAB} "
                          "(256 byte symbols, 3 special tokens and at least one merge).")
    folder = resolve_path(str(out_dir))
    if folder.exists() and not folder.is_dir():
        raise DataError(f"output {folder} is a file; name a folder to write tokenizer.json into.")
    target = folder / "tokenizer.json"
    if target.exists():
        raise DataError(f"{target} already exists; choose another output folder or delete it first.")
    tok = RustTokenizer(models.BPE())
    # No prefix space and no normaliser, so decode(encode(text)) gives back exactly the text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=show_progress)
    tok.train_from_iterator(texts, trainer=trainer)
    atomic_write_text(target, tok.to_str())
    return target


def tokenizer_train_command(data_cfg: DataConfig, vocab_size: int, out: str) -> int:
    """`modular tokenizer train`: BPE on every domain's train split (never on val); prints a summary."""
    from modular.data.corpus import iter_documents

    cfg = as_data_config(data_cfg)
    seen = {"docs": 0, "bytes": 0}

    def texts() -> Iterable[str]:
        for domain in cfg.domains:
            for doc in iter_documents(cfg, domain, "train"):
                seen["docs"] += 1
                seen["bytes"] += len(doc.text.encode("utf-8"))
                yield doc.text

    path = train_bpe(texts(), vocab_size, out, show_progress=sys.stderr.isatty())
    tok = HFTokenizer(path)
    print(f"trained a byte-level BPE tokenizer: vocab_size {tok.vocab_size} (asked {vocab_size}), "
          f"{seen['docs']} train documents, {seen['bytes']:,} bytes from {len(cfg.domains)} domains")
    print(f"wrote {path}")
    print("bytes per token on each domain's val split (higher compresses better):")
    for domain in cfg.domains:
        val_texts = [doc.text for doc in iter_documents(cfg, domain, "val")]
        n_bytes = sum(len(t.encode("utf-8")) for t in val_texts)
        n_tokens = sum(len(ids) for ids in tok.encode_batch(val_texts))
        print(f"  {domain:<12} {n_bytes / max(n_tokens, 1):6.2f}")
    print(f"use it with: data.tokenizer.kind=hf data.tokenizer.path={path.parent}")
    return 0
