"""Corpus readers: JSON Lines (one document per line, text under `text_field`), .txt files (one document
each, verbatim), either gzip/zstd compressed, and Parquet/Arrow/datasets text columns (modular.data.formats).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from modular.data.config import DataConfig, DomainConfig, as_data_config, resolve_path
from modular.data.formats import SUPPORTED, Piece, iter_pieces, jsonl_ranges, list_directory, source_kind
from modular.data.split import plan_split
from modular.errors import ConfigError, DataError

__all__ = ["CHUNK_BYTES", "Document", "domain_config", "iter_documents", "jsonl_ranges", "list_corpus_files",
           "piece_texts", "read_texts", "text_field_of"]

CHUNK_BYTES = 4 << 20  # read corpora in pieces this big: bounded memory, and a unit of parallel work


@dataclass(frozen=True)
class Document:
    text: str
    domain: str
    path: Path
    offset: int  # byte offset of the document (its line, for JSON Lines) in `path`; row index for columns


def domain_config(cfg: DataConfig, domain: str) -> DomainConfig:
    if domain not in cfg.domains:
        raise ConfigError(f"domain {domain!r} is not in data.domains; "
                          f"the config has {', '.join(cfg.domains)}.")
    return cfg.domains[domain]


def text_field_of(cfg: DataConfig, domain: str) -> str:
    """The key (JSON Lines) or column (Parquet, Arrow) holding a domain's text."""
    return domain_config(cfg, domain).text_field or cfg.text_field


def list_corpus_files(spec: str, key: str) -> list[Path]:
    """The sorted corpus sources a config path names (files, and datasets folders); `key` is for messages."""
    path = resolve_path(spec)
    if any(c in str(path) for c in "*?["):
        matches = [Path(p) for p in glob.glob(str(path), recursive=True)]
        files = sorted(p for p in matches if (p.is_file() or p.is_dir()) and source_kind(p))
        if not files:
            raise DataError(f"{key}={spec!r} matches no corpus files ({SUPPORTED}).")
        return files
    if path.is_dir():
        files = list_directory(path, key, spec)
        if not files:
            raise DataError(f"{key}={spec!r}: directory {path} holds no .jsonl or .txt files (plain, .gz or .zst), "
                            ".parquet or .arrow files or datasets folders.")
        return files
    if path.is_file():
        if source_kind(path) is None:
            raise DataError(f"{key}={spec!r}: file {path} is neither .jsonl nor .txt (plain, .gz or .zst), nor "
                            ".parquet or .arrow.")
        return [path]
    raise DataError(f"{key}={spec!r}: {path} does not exist.")


def read_texts(path: Path, *, text_field: str = "text", on_bad_bytes: str = "error", start: int = 0,
               end: int | None = None) -> Iterator[tuple[int, str, bool]]:
    """(byte offset, text, had bad bytes) of each non-blank document in bytes [start, end) of a plain file."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read() if end is None else f.read(end - start)
    kind = "txt" if path.suffix == ".txt" else "jsonl"
    yield from parse_texts(data, str(path), kind, start=start, text_field=text_field, on_bad_bytes=on_bad_bytes)


def piece_texts(piece: Piece, *, text_field: str = "text",
                on_bad_bytes: str = "error") -> Iterator[tuple[int, str, bool]]:
    """(offset, text, had bad bytes) of each non-blank document of a piece (modular.data.formats)."""
    if piece.texts is not None:
        for row, text in enumerate(piece.texts, start=piece.start):
            if not isinstance(text, str):
                raise DataError(f"{piece.path}: row {row} has no {text_field!r} text (it is null); "
                                "drop such rows or fill them in.")
            if text.strip():
                yield row, text, False
    elif piece.data is not None:
        yield from parse_texts(piece.data, piece.where, piece.kind, start=piece.start, text_field=text_field,
                               on_bad_bytes=on_bad_bytes)
    else:
        yield from read_texts(piece.path, text_field=text_field, on_bad_bytes=on_bad_bytes, start=piece.start,
                              end=piece.end)


def parse_texts(data: bytes, where: str, kind: str, *, start: int, text_field: str,
                on_bad_bytes: str) -> Iterator[tuple[int, str, bool]]:
    """Documents of `data`, which begins at byte `start` of a .txt (one document) or JSON Lines text."""
    if kind == "txt":
        text, bad = _decode(data, where, start, on_bad_bytes)
        if text.strip():
            yield start, text, bad
        return
    pos = start
    for line in data.split(b"\n"):
        offset, pos = pos, pos + len(line) + 1
        if not line.strip():
            continue
        line_text, bad = _decode(line, where, offset, on_bad_bytes)
        try:
            record = json.loads(line_text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: the line at byte offset {offset} is not valid JSON ({e.msg}); "
                            f"each line must be a JSON object with a {text_field!r} string.") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{where}: the line at byte offset {offset} has no {text_field!r} string; "
                            f"each line must be a JSON object with one (data.text_field names the key).")
        if b"\\ud" in line or b"\\uD" in line:  # only a JSON escape can smuggle in an unpaired surrogate
            text, bad_escape = _check_surrogates(text, where, offset, on_bad_bytes)
            bad = bad or bad_escape
        if text.strip():
            yield offset, text, bad


def _decode(data: bytes, path: Path | str, offset: int, on_bad_bytes: str) -> tuple[str, bool]:
    try:
        text = data.decode("utf-8")
        bad = False
    except UnicodeDecodeError as e:
        if on_bad_bytes != "replace":
            raise DataError(f"{path} has invalid UTF-8 at byte offset {offset + e.start}; "
                            "fix the file or set data.on_bad_bytes=replace.") from None
        text, bad = data.decode("utf-8", errors="replace"), True
    if offset == 0 and text.startswith("\ufeff"):
        text = text[1:]  # a byte-order mark is file metadata, not text
    return text, bad


def _check_surrogates(text: str, path: Path | str, offset: int, on_bad_bytes: str) -> tuple[str, bool]:
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        if on_bad_bytes != "replace":
            raise DataError(f"{path}: the line at byte offset {offset} has an unpaired surrogate escape "
                            "(not valid Unicode); fix the file or set data.on_bad_bytes=replace.") from None
        return text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace"), True


def iter_documents(data_cfg: DataConfig, domain: str, split: str) -> Iterator[Document]:
    """Every document of one split of a domain, in file order; a file with no documents is an error."""
    cfg = as_data_config(data_cfg)
    plan = plan_split(domain_config(cfg, domain), split, cfg.val_fraction)
    key = f"data.domains.{domain}.{plan.source_field}"
    field = text_field_of(cfg, domain)
    sources = list_corpus_files(plan.source, key)
    found = [False] * len(sources)
    for piece in iter_pieces(sources, field, CHUNK_BYTES):
        if piece.source > 0 and not found[piece.source - 1]:
            raise DataError(f"{sources[piece.source - 1]} contains no documents; remove it from {key} or add text to it.")
        for offset, text, _ in piece_texts(piece, text_field=field, on_bad_bytes=cfg.on_bad_bytes):
            found[piece.source] = True
            if plan.keeps(text):
                yield Document(text=text, domain=domain, path=piece.path, offset=offset)
    if sources and not found[-1]:
        raise DataError(f"{sources[-1]} contains no documents; remove it from {key} or add text to it.")
