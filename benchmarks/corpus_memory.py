"""Peak memory of tokenising a corpus of a few GB in every format, through the real shard builder.

Writes a synthetic corpus (unique documents of random sentences, ~1.8 KB each) as .jsonl, .jsonl.gz,
.jsonl.zst, Parquet and a datasets.save_to_disk folder into a temporary folder, then tokenises each
in a fresh process with `modular.data.shards.build_domain_shards` (what `modular train` runs; byte
tokenizer, the train side of the 5% hash split, 2 tokenising processes) and prints per format: wall
time, throughput, the builder's own peak RSS and the peak proportional set size (PSS) of the builder
and its workers together, sampled every 0.1 s. The first row repeats plain JSON Lines at a quarter of
the size: equal peaks at 1x and 4x the size show that memory does not grow with the corpus.

    python benchmarks/corpus_memory.py [--gb 1.0] [--workers 2] [--formats jsonl,jsonl.gz,...] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "hf")
COMMON_WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there been one all we their has would when if so no out up into its time two "
         "more could will some only other these than then like our may new any over such after most also made "
         "river market garden engine letter season council window figure measure station winter process")
WORDS = tuple(COMMON_WORDS.split())

BUILD = r"""
import json, sys, time
from modular.data.config import DataConfig, DomainConfig
from modular.data.shards import build_domain_shards
path, cache, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = DataConfig(domains={"bench": DomainConfig(train=path)}, cache_dir=cache, num_workers=workers)
start = time.perf_counter()
shard = build_domain_shards(cfg, "bench", "train", progress=False)
# VmHWM, not ru_maxrss: Linux carries the parent's peak across exec into ru_maxrss, never into VmHWM.
hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - start, "tokens": shard.num_tokens, "docs": shard.num_docs,
                  "text_bytes": shard.num_bytes, "self_peak_rss": hwm}))
"""


def write_jsonl(path: Path, total_bytes: int, seed: int = 0) -> Path:
    """Unique documents of ~1.8 KB: random sentences of common words, each numbered; one JSON object a line."""
    rng = np.random.default_rng(seed)
    sentences = [" ".join(rng.choice(WORDS, size=rng.integers(6, 20))).capitalize() + "."
                 for _ in range(50_000)]
    written, i = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < total_bytes:
            picks = rng.integers(0, len(sentences), size=(1000, 30))
            # letters, spaces and full stops only: the JSON needs no escaping, so no json.dumps per line
            lines = [f'{{"text": "Document {i + n}. ' + " ".join(sentences[j] for j in row) + '"}\n'
                     for n, row in enumerate(picks)]
            f.writelines(lines)
            written += sum(len(line) for line in lines)
            i += len(lines)
    return path


def texts_of(jsonl: Path):
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            yield line[len('{"text": "'):-len('"}\n')]


def write_corpus(folder: Path, fmt: str, jsonl: Path) -> Path:
    """The corpus of `jsonl` in another format (the same documents)."""
    if fmt == "jsonl":
        return jsonl
    if fmt == "jsonl.gz":
        path = folder / "corpus.jsonl.gz"
        with open(jsonl, "rb") as src, gzip.open(path, "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst, 4 << 20)
    elif fmt == "jsonl.zst":
        import zstandard

        path = folder / "corpus.jsonl.zst"
        with open(jsonl, "rb") as src, open(path, "wb") as raw:
            zstandard.ZstdCompressor(level=3).copy_stream(src, raw)
    elif fmt in ("parquet", "hf"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "corpus.parquet"
        if not path.exists():
            with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
                batch = []
                for t in texts_of(jsonl):
                    batch.append(t)
                    if len(batch) == 20_000:
                        writer.write_table(pa.table({"text": batch}))
                        batch = []
                if batch:
                    writer.write_table(pa.table({"text": batch}))
        if fmt == "hf":
            import datasets

            datasets.disable_progress_bars()
            hf_path = folder / "corpus_hf"
            ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(folder / "hf_cache"))
            ds.save_to_disk(str(hf_path), max_shard_size="500MB")
            del ds
            shutil.rmtree(folder / "hf_cache", ignore_errors=True)
            path = hf_path
    else:
        raise SystemExit(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    return path


def measure(path: Path, cache: Path, workers: int) -> dict:
    """Tokenise in a fresh process; sample the PSS of it and its workers until it ends."""
    import psutil

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", BUILD, str(path), str(cache), str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    parent, peak_pss = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [parent, *parent.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):  # a worker that just ended
                    total += p.memory_full_info().pss
        except psutil.NoSuchProcess:
            break
        peak_pss = max(peak_pss, total)
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"tokenising {path} failed:\n{err}")
    return {**json.loads(out.strip().splitlines()[-1]), "tree_peak_pss": peak_pss}


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="GB of text per format")
    parser.add_argument("--workers", type=int, default=2, help="tokenising processes (data.num_workers)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--dir", default=None, help="where to write the corpora (default: a temporary folder)")
    args = parser.parse_args()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    total = int(args.gb * (1 << 30))
    folder = Path(args.dir or tempfile.mkdtemp(prefix="modular-corpus-memory-"))
    folder.mkdir(parents=True, exist_ok=True)
    import psutil

    print(f"# corpus memory: {args.gb:g} GB of text per format, {args.workers} tokenising processes; "
          f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
          f"{time.strftime('%Y-%m-%d')}; corpora in {folder}")
    rows = []
    try:
        started = time.perf_counter()
        jsonl = write_jsonl(folder / "corpus.jsonl", total)
        quarter = write_jsonl(folder / "corpus-quarter.jsonl", total // 4)
        print(f"  wrote {size_of(jsonl) / 2**30:.2f} GiB of JSON Lines in {time.perf_counter() - started:.0f} s",
              flush=True)
        for fmt, source in [("jsonl", quarter)] + [(fmt, jsonl) for fmt in formats]:
            started = time.perf_counter()
            path = write_corpus(folder, fmt, source)
            written = time.perf_counter() - started
            cache = folder / f"cache-{fmt}"
            result = measure(path, cache, args.workers)
            shutil.rmtree(cache, ignore_errors=True)
            rows.append((fmt, size_of(path), result))
            print(f"  {fmt}: {size_of(path) / 2**30:.2f} GiB written in {written:.0f} s, tokenised in "
                  f"{result['seconds']:.0f} s", flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    print()
    print("| format | file size | text | tokens (train split) | tokenise time | text MB/s | builder peak RSS "
          "| peak PSS, builder + workers |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for fmt, file_size, r in rows:
        print(f"| {fmt} | {file_size / 2**30:.2f} GiB | {r['text_bytes'] / 2**30:.2f} GiB | {r['tokens'] / 1e9:.2f}B | "
              f"{r['seconds']:.0f} s | {r['text_bytes'] / 2**20 / r['seconds']:.0f} | "
              f"{r['self_peak_rss'] / 2**20:.0f} MiB | {r['tree_peak_pss'] / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
