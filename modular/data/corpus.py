"""Corpus readers: JSON Lines (one document per line, text under `text_field`) and plain .txt files.
A .txt file is one document (the whole file, verbatim); a directory or glob means every .jsonl/.txt in it.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from modular.data.config import DataConfig, DomainConfig, as_data_config, resolve_path
from modular.data.split import plan_split
from modular.errors import ConfigError, DataError

SUFFIXES = (".jsonl", ".txt")
CHUNK_BYTES = 4 << 20  # read JSON Lines in pieces this big: bounded memory, and a unit of parallel work


@dataclass(frozen=True)
class Document:
    text: str
    domain: str
    path: Path
    offset: int  # byte offset of the document (its line, for JSON Lines) in `path`


def domain_config(cfg: DataConfig, domain: str) -> DomainConfig:
    if domain not in cfg.domains:
        raise ConfigError(f"domain {domain!r} is not in data.domains; "
                          f"the config has {', '.join(cfg.domains)}.")
    return cfg.domains[domain]


def list_corpus_files(spec: str, key: str) -> list[Path]:
    """The sorted .jsonl/.txt files a config path names; `key` (data.domains.en.train) is for messages."""
    path = resolve_path(spec)
    if any(c in str(path) for c in "*?["):
        matches = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
        files = sorted(p for p in matches if p.suffix in SUFFIXES)
        if not files:
            raise DataError(f"{key}={spec!r} matches no .jsonl or .txt files.")
        return files
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"{key}={spec!r}: directory {path} holds no .jsonl or .txt files.")
        return files
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise DataError(f"{key}={spec!r}: file {path} is neither .jsonl nor .txt.")
        return [path]
    raise DataError(f"{key}={spec!r}: {path} does not exist.")


def jsonl_ranges(path: Path, target_bytes: int) -> list[tuple[int, int]]:
    """Cut a file into byte ranges of about `target_bytes` that end at line ends (a .txt file stays whole)."""
    size = path.stat().st_size
    if path.suffix != ".jsonl":
        return [(0, size)]
    ranges, start = [], 0
    with open(path, "rb") as f:
        while start < size:
            end = min(start + target_bytes, size)
            if end < size:
                f.seek(end)
                end += len(f.readline())
            ranges.append((start, end))
            start = end
    return ranges or [(0, 0)]


def read_texts(path: Path, *, text_field: str = "text", on_bad_bytes: str = "error", start: int = 0,
               end: int | None = None) -> Iterator[tuple[int, str, bool]]:
    """(byte offset, text, had bad bytes) of each non-blank document in bytes [start, end) of a file."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read() if end is None else f.read(end - start)
    if path.suffix == ".txt":
        text, bad = _decode(data, path, start, on_bad_bytes)
        if text.strip():
            yield start, text, bad
        return
    pos = start
    for line in data.split(b"\n"):
        offset, pos = pos, pos + len(line) + 1
        if not line.strip():
            continue
        line_text, bad = _decode(line, path, offset, on_bad_bytes)
        try:
            record = json.loads(line_text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: the line at byte offset {offset} is not valid JSON ({e.msg}); "
                            f"each line must be a JSON object with a {text_field!r} string.") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}: the line at byte offset {offset} has no {text_field!r} string; "
                            f"each line must be a JSON object with one (data.text_field names the key).")
        if b"\\ud" in line or b"\\uD" in line:  # only a JSON escape can smuggle in an unpaired surrogate
            text, bad_escape = _check_surrogates(text, path, offset, on_bad_bytes)
            bad = bad or bad_escape
        if text.strip():
            yield offset, text, bad


def _decode(data: bytes, path: Path, offset: int, on_bad_bytes: str) -> tuple[str, bool]:
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


def _check_surrogates(text: str, path: Path, offset: int, on_bad_bytes: str) -> tuple[str, bool]:
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
    for path in list_corpus_files(plan.source, key):
        found = False
        for start, end in jsonl_ranges(path, CHUNK_BYTES):
            for offset, text, _ in read_texts(path, text_field=cfg.text_field, on_bad_bytes=cfg.on_bad_bytes,
                                              start=start, end=end):
                found = True
                if plan.keeps(text):
                    yield Document(text=text, domain=domain, path=path, offset=offset)
        if not found:
            raise DataError(f"{path} contains no documents; remove it from {key} or add text to it.")
