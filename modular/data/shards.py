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
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from modular.atomic import fsync_dir, sha256_file
from modular.data.config import DataConfig, as_data_config, default_cache_dir, resolve_path
from modular.data.corpus import CHUNK_BYTES, domain_config, jsonl_ranges, list_corpus_files, read_texts
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
        doc_offsets = np.load(path / "doc_offsets.npy")
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
    identity = [{"path": str(f), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]
    key_material = {"format": FORMAT_VERSION, "domain": domain, "split": split, "keep": plan.keep,
                    "val_fraction": plan.val_fraction if plan.keep else None, "sources": identity,
                    "text_field": cfg.text_field, "on_bad_bytes": cfg.on_bad_bytes,
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
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes 0700; a cache folder is meant to be readable like any other
    except OSError as e:
        raise DataError(f"cannot write the shard cache in {root} ({e.strerror}); set data.cache_dir to a "
                        "writable folder.") from None
    try:
        started = time.perf_counter()
        meta = _write_shard(tmp, files, plan, cfg.text_field, cfg.on_bad_bytes, cfg.num_workers, tokenizer,
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
    file_index: int
    file_bytes: int  # bytes of the file this chunk covered (for the progress bar)
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
    tasks = [(i, f, start, end) for i, f in enumerate(files) for start, end in jsonl_ranges(f, chunk_bytes)]
    sources = [{"path": str(f), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns,
                "sha256": sha256_file(f)} for f in files]
    docs_read = [0] * len(files)
    lengths: list[np.ndarray] = []
    num_bytes = docs_replaced = 0
    total = sum(s["size"] for s in sources)
    with open(tmp / "tokens.bin", "wb") as out, \
            tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenising {domain}/{split}",
                 disable=None if progress is None else not progress) as bar:
        for chunk in _run_tasks(job, tasks, num_workers):
            out.write(chunk.tokens.tobytes())
            lengths.append(chunk.doc_lengths)
            docs_read[chunk.file_index] += chunk.docs_read
            num_bytes += chunk.num_bytes
            docs_replaced += chunk.docs_replaced
            bar.update(chunk.file_bytes)
        out.flush()
        os.fsync(out.fileno())

    for f, n in zip(files, docs_read):
        if n == 0:
            raise DataError(f"{f} contains no documents; remove it from domain {domain!r} or add text to it.")
    doc_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if len(doc_lengths) == 0:
        if plan.keep is None:
            raise DataError(f"domain {domain!r} has no {split} documents in data.domains.{domain}.{split}.")
        advice = f"give data.domains.{domain}.val a path" if split == "val" else "lower data.val_fraction"
        raise DataError(f"domain {domain!r} has no {split} documents: the val_fraction={plan.val_fraction} "
                        f"hash split puts none of its {sum(docs_read)} documents there; {advice} "
                        "or add documents.")
    doc_offsets = np.zeros(len(doc_lengths) + 1, dtype=np.int64)
    np.cumsum(doc_lengths, out=doc_offsets[1:])
    with open(tmp / "doc_offsets.npy", "wb") as f:
        np.save(f, doc_offsets)
        f.flush()
        os.fsync(f.fileno())
    if docs_replaced:
        log.warning("domain %s/%s: invalid UTF-8 replaced by U+FFFD in %d documents",
                    domain, split, docs_replaced)
    return {"format": FORMAT_VERSION, "domain": domain, "split": split, "dtype": dtype.name,
            "num_docs": len(doc_lengths), "num_tokens": int(doc_offsets[-1]), "num_bytes": int(num_bytes),
            "docs_with_replaced_bytes": int(docs_replaced), "packing": "[bos] ids [eos] per document",
            "tokenizer": tokenizer.describe(), "split_rule": plan.describe(), "text_field": text_field,
            "on_bad_bytes": on_bad_bytes, "sources": sources,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _run_tasks(job: _Job, tasks: list, num_workers: int) -> Iterator[_Chunk]:
    """Chunks in task order (so the shard is the same whatever the worker count)."""
    workers = min(num_workers, len(tasks))
    pool = None
    if workers > 1:
        try:
            pool = _mp_context().Pool(workers, initializer=_init_worker, initargs=(job,))
        except (OSError, ValueError, ImportError) as e:  # e.g. no /dev/shm or semaphores in a sandbox
            log.warning("cannot start %d tokenisation processes (%s); tokenising in this process", workers, e)
    if pool is None:
        for task in tasks:
            yield _tokenize_range(job, task)
        return
    with pool:
        yield from pool.imap(_worker_task, tasks)


def _mp_context():
    # fork starts workers in milliseconds and copies the loaded tokenizer; elsewhere use the safe default.
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)


_worker_job: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _worker_job
    _worker_job = job
    # The processes are the parallelism; Rust threads inside each would only oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _worker_task(task) -> _Chunk:
    return _tokenize_range(_worker_job, task)


def _tokenize_range(job: _Job, task) -> _Chunk:
    file_index, path, start, end = task
    texts, docs_read, docs_replaced = [], 0, 0
    for _, text, bad in read_texts(path, text_field=job.text_field, on_bad_bytes=job.on_bad_bytes,
                                   start=start, end=end):
        docs_read += 1
        if job.plan.keeps(text):
            texts.append(text)
            docs_replaced += bad
    tokens, doc_lengths = _pack(job.tokenizer.encode_batch(texts) if texts else [], job.tokenizer, job.dtype)
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return _Chunk(file_index, end - start, tokens, doc_lengths, num_bytes, docs_read, docs_replaced)


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
