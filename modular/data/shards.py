"""Packed token shards: one split of one domain, tokenised once in parallel, cached, read by memory map.
A shard folder holds tokens.bin (uint16, or uint32 when vocab_size > 65536), doc_offsets.npy and meta.json.

Packing convention: every document becomes [bos_id] + ids + [eos_id] (no BOS when the tokenizer has none),
concatenated in file order. The cache key hashes the files' identity (path, size, mtime), the split rule,
the reading options and the tokenizer fingerprint; a new key builds a new shard, a known one is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from modular.atomic import fsync_dir, sha256_file
from modular.data.config import DataConfig, as_data_config, default_cache_dir, resolve_path
from modular.data.corpus import CHUNK_BYTES, domain_config, list_corpus_files, piece_texts, text_field_of
from modular.data.formats import Piece, iter_pieces, source_members, source_size
from modular.data.split import SplitPlan, plan_split
from modular.data.tokenizer import Tokenizer, load_tokenizer
from modular.errors import DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class TokenShard:
    domain: str
    split: str
    path: Path
    tokens: np.ndarray  # (num_tokens,) memmap, the packed documents
    doc_offsets: np.ndarray  # (num_docs + 1,) int64: document i is tokens[doc_offsets[i]:doc_offsets[i + 1]]
    meta: dict
    reused: bool = False  # True when this call found it in the cache

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def num_bytes(self) -> int:
        """UTF-8 bytes of the documents' text (the denominator of bits per byte)."""
        return int(self.meta["num_bytes"])

    @property
    def num_docs(self) -> int:
        return int(self.meta["num_docs"])

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]]


def open_shard(path: Path) -> TokenShard:
    """Open a finished shard folder; DataError if it is incomplete or from another format version."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT_VERSION}")
        dtype, num_tokens = np.dtype(meta["dtype"]), int(meta["num_tokens"])
        size = (path / "tokens.bin").stat().st_size
        if size != num_tokens * dtype.itemsize:
            raise ValueError(f"tokens.bin has {size} bytes, meta.json promises {num_tokens * dtype.itemsize}")
        doc_offsets = np.load(path / "doc_offsets.npy", mmap_mode="r")  # one int64 per document: not in RAM
        if len(doc_offsets) != meta["num_docs"] + 1 or doc_offsets[-1] != num_tokens:
            raise ValueError("doc_offsets.npy does not match meta.json")
        tokens = np.memmap(path / "tokens.bin", dtype=dtype, mode="r", shape=(num_tokens,))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"shard {path} is damaged ({e}); delete the folder and it will be rebuilt.") from None
    return TokenShard(domain=meta["domain"], split=meta["split"], path=path, tokens=tokens,
                      doc_offsets=doc_offsets, meta=meta)


def build_domain_shards(data_cfg: DataConfig, domain: str, split: str, *, tokenizer: Tokenizer | None = None,
                        progress: bool | None = None, chunk_bytes: int = CHUNK_BYTES) -> TokenShard:
    """The cached shard of `split` ("train" / "val") of `domain`, built first if missing or out of date.

    progress: None shows a bar only on a terminal. tokenizer: defaults to the config's (pass one to share it).
    """
    cfg = as_data_config(data_cfg)
    plan = plan_split(domain_config(cfg, domain), split, cfg.val_fraction)
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer)
    files = list_corpus_files(plan.source, f"data.domains.{domain}.{plan.source_field}")
    text_field = text_field_of(cfg, domain)
    identity = [{"path": str(f), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
                for source in files for f in source_members(source)]
    key_material = {"format": FORMAT_VERSION, "domain": domain, "split": split, "keep": plan.keep,
                    "val_fraction": plan.val_fraction if plan.keep else None, "sources": identity,
                    "text_field": text_field, "on_bad_bytes": cfg.on_bad_bytes,
                    "tokenizer": tokenizer.fingerprint()}
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()
    root = resolve_path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    final = root / f"{domain}.{split}.{key[:16]}"

    if final.exists():
        try:
            shard = open_shard(final)
            shard.reused = True
            log.info("reusing shard %s/%s: %s tokens from %s", domain, split, f"{shard.num_tokens:,}", final)
            return shard
        except DataError as e:
            log.warning("%s; rebuilding it", e)
            _remove_dir(final)

    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_builds(root)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix()}{final.name}-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes 0700; a cache folder is meant to be readable like any other
    except OSError as e:
        raise DataError(f"cannot write the shard cache in {root} ({e.strerror}); set data.cache_dir to a "
                        "writable folder.") from None
    try:
        started = time.perf_counter()
        meta = _write_shard(tmp, files, plan, text_field, cfg.on_bad_bytes, cfg.num_workers, tokenizer,
                            domain, split, progress, chunk_bytes)
        meta["key"] = key
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        _fsync_file(tmp / "meta.json")
        fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            # Another process published the same key first; its content is identical, keep it.
        fsync_dir(root)
        log.info("built shard %s/%s: %s documents, %s tokens in %.1f s", domain, split,
                 f"{meta['num_docs']:,}", f"{meta['num_tokens']:,}", time.perf_counter() - started)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return open_shard(final)


def build_all_shards(data_cfg: DataConfig, split: str, *, domains: Sequence[str] | None = None,
                     tokenizer: Tokenizer | None = None,
                     progress: bool | None = None) -> dict[str, TokenShard]:
    """One shard per domain (all of data.domains unless `domains` is given), sharing one tokenizer."""
    cfg = as_data_config(data_cfg)
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer)
    names = list(cfg.domains) if domains is None else list(domains)
    return {d: build_domain_shards(cfg, d, split, tokenizer=tokenizer, progress=progress) for d in names}


@dataclass(frozen=True)
class _Job:
    """What every tokenisation worker needs; pickled once per worker."""

    tokenizer: Tokenizer
    plan: SplitPlan
    text_field: str
    on_bad_bytes: str
    dtype: str


@dataclass
class _Chunk:
    source: int
    size: int  # source bytes this chunk covered (for the progress bar)
    tokens: np.ndarray
    doc_lengths: np.ndarray
    num_bytes: int  # UTF-8 bytes of the kept documents
    docs_read: int  # documents in the chunk, in either split
    docs_replaced: int  # kept documents that had invalid UTF-8 replaced


def _write_shard(tmp: Path, files: list[Path], plan: SplitPlan, text_field: str, on_bad_bytes: str,
                 num_workers: int, tokenizer: Tokenizer, domain: str, split: str, progress: bool | None,
                 chunk_bytes: int) -> dict:
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    job = _Job(tokenizer, plan, text_field, on_bad_bytes, dtype.name)
    sources = [{"path": str(f), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns,
                "sha256": sha256_file(f)} for source in files for f in source_members(source)]
    docs_read = [0] * len(files)
    num_docs = num_tokens = num_bytes = docs_replaced = 0
    total = sum(source_size(f) for f in files)
    workers = num_workers if total > chunk_bytes else 1  # one piece of work needs no second process
    # Document lengths go to disk as they come (one int64 each), so no list grows with the corpus.
    with open(tmp / "tokens.bin", "wb") as out, open(tmp / "doc_lengths.bin", "wb") as lengths_out, \
            tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenising {domain}/{split}",
                 disable=None if progress is None else not progress) as bar:
        for chunk in _run_tasks(job, iter_pieces(files, text_field, chunk_bytes), workers):
            out.write(chunk.tokens.tobytes())
            lengths_out.write(chunk.doc_lengths.astype(np.int64).tobytes())
            docs_read[chunk.source] += chunk.docs_read
            num_docs += len(chunk.doc_lengths)
            num_tokens += int(chunk.doc_lengths.sum())
            num_bytes += chunk.num_bytes
            docs_replaced += chunk.docs_replaced
            bar.update(chunk.size)
        out.flush()
        os.fsync(out.fileno())

    for f, n in zip(files, docs_read):
        if n == 0:
            raise DataError(f"{f} contains no documents; remove it from domain {domain!r} or add text to it.")
    if num_docs == 0:
        if plan.keep is None:
            raise DataError(f"domain {domain!r} has no {split} documents in data.domains.{domain}.{split}.")
        advice = f"give data.domains.{domain}.val a path" if split == "val" else "lower data.val_fraction"
        raise DataError(f"domain {domain!r} has no {split} documents: the val_fraction={plan.val_fraction} "
                        f"hash split puts none of its {sum(docs_read)} documents there; {advice} "
                        "or add documents.")
    _write_doc_offsets(tmp / "doc_lengths.bin", tmp / "doc_offsets.npy", num_docs)
    if docs_replaced:
        log.warning("domain %s/%s: invalid UTF-8 replaced by U+FFFD in %d documents",
                    domain, split, docs_replaced)
    return {"format": FORMAT_VERSION, "domain": domain, "split": split, "dtype": dtype.name,
            "num_docs": num_docs, "num_tokens": num_tokens, "num_bytes": int(num_bytes),
            "docs_with_replaced_bytes": int(docs_replaced), "packing": "[bos] ids [eos] per document",
            "tokenizer": tokenizer.describe(), "split_rule": plan.describe(), "text_field": text_field,
            "on_bad_bytes": on_bad_bytes, "sources": sources,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _write_doc_offsets(lengths_path: Path, offsets_path: Path, num_docs: int, block: int = 1 << 20) -> None:
    """doc_offsets.npy = [0, cumsum(lengths)], computed a block at a time through memory maps."""
    lengths = np.memmap(lengths_path, dtype=np.int64, mode="r", shape=(num_docs,))
    offsets = np.lib.format.open_memmap(offsets_path, mode="w+", dtype=np.int64, shape=(num_docs + 1,))
    offsets[0] = 0
    for first in range(0, num_docs, block):
        part = np.cumsum(lengths[first:first + block])
        offsets[first + 1:first + 1 + len(part)] = part + offsets[first]
    offsets.flush()
    del offsets, lengths
    _fsync_file(offsets_path)
    os.unlink(lengths_path)


def _run_tasks(job: _Job, pieces: Iterable[Piece], num_workers: int) -> Iterator[_Chunk]:
    """Chunks in piece order (so the shard is the same whatever the worker count).

    Pieces are handed out a few at a time: those read in this process carry their text, so only a
    bounded number may wait in the pool's queue.
    """
    pool = None
    if num_workers > 1:
        try:
            pool = _mp_context().Pool(num_workers, initializer=_init_worker, initargs=(job,))
        except (OSError, ValueError, ImportError) as e:  # e.g. no /dev/shm or semaphores in a sandbox
            log.warning("cannot start %d tokenisation processes (%s); tokenising in this process", num_workers, e)
    if pool is None:
        for piece in pieces:
            yield _tokenize_piece(job, piece)
        return
    with pool:
        in_flight: deque = deque()
        for piece in pieces:
            in_flight.append(pool.apply_async(_worker_task, (piece,)))
            if len(in_flight) >= 2 * num_workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


def _mp_context():
    # fork starts workers in milliseconds and copies the loaded tokenizer; elsewhere use the safe default.
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)


_worker_job: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _worker_job
    _worker_job = job
    # The processes are the parallelism; Rust threads inside each would only oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _worker_task(piece: Piece) -> _Chunk:
    return _tokenize_piece(_worker_job, piece)


def _tokenize_piece(job: _Job, piece: Piece) -> _Chunk:
    texts, docs_read, docs_replaced = [], 0, 0
    for _, text, bad in piece_texts(piece, text_field=job.text_field, on_bad_bytes=job.on_bad_bytes):
        docs_read += 1
        if job.plan.keeps(text):
            texts.append(text)
            docs_replaced += bad
    tokens, doc_lengths = _pack(job.tokenizer.encode_batch(texts) if texts else [], job.tokenizer, job.dtype)
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return _Chunk(piece.source, piece.size, tokens, doc_lengths, num_bytes, docs_read, docs_replaced)


def _pack(ids: list[np.ndarray], tokenizer: Tokenizer, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    doc_lengths = np.array([len(head) + len(a) + 1 for a in ids], dtype=np.int64)
    tokens = np.empty(int(doc_lengths.sum()), dtype=dtype)
    pos = 0
    for a in ids:
        if head:
            tokens[pos] = head[0]
            pos += 1
        tokens[pos:pos + len(a)] = a
        pos += len(a)
        tokens[pos] = tokenizer.eos_id
        pos += 1
    return tokens, doc_lengths


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _remove_dir(path: Path) -> None:
    # Rename first so no reader ever sees a half-deleted shard under the real name.
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return  # another process removed it first
    shutil.rmtree(trash, ignore_errors=True)


def _tmp_prefix(pid: int | None = None) -> str:
    """A build folder's name starts with its host and process, so a later build can tell an abandoned one."""
    return f".tmp-{socket.gethostname()}-{os.getpid() if pid is None else pid}-"


def _remove_abandoned_builds(root: Path) -> None:
    """Remove build folders left by killed processes of this host (a failure inside a build removes its own)."""
    host_prefix = f".tmp-{socket.gethostname()}-"
    for entry in root.glob(f"{host_prefix}*"):
        pid = entry.name[len(host_prefix):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
