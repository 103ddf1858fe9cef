"""Corpus formats: gzip/zstd JSON Lines and text, Parquet, Arrow, datasets folders; streamed like plain files.
Every format must give the same documents and the same shard as the plain JSON Lines it was made from."""

import gzip
import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from modular.data.config import DataConfig, DomainConfig
from modular.data.corpus import iter_documents
from modular.data.shards import build_domain_shards
from modular.data.tokenizer import ByteTokenizer
from modular.errors import DataError

TEXTS = [f"Document {i}: " + "Grüße, naïve café — 日本語 " * (1 + i % 9) + f"end {i}." for i in range(600)]


def _lines(texts, field="text") -> bytes:
    return "".join(json.dumps({field: t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)).encode()


def _cfg(tmp_path, train, text_field=None, **kw) -> DataConfig:
    kw.setdefault("num_workers", 1)
    return DataConfig(domains={"d": DomainConfig(train=str(train), text_field=text_field)},
                      cache_dir=str(tmp_path / "cache"), **kw)


def _all_docs(cfg) -> list[str]:
    return [d.text for split in ("train", "val") for d in iter_documents(cfg, "d", split)]


def _write_arrow_stream(path, texts, column="text", batch=170):
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, pa.schema([(column, pa.string())])) as w:
        for i in range(0, len(texts), batch):
            w.write_table(pa.table({column: texts[i:i + batch]}))
    return path


def make_corpus(tmp_path, fmt: str):
    """(path, text_field) of TEXTS written in `fmt`; several gzip members / zstd frames / row groups / files."""
    half = len(TEXTS) // 2
    if fmt == "jsonl.gz":
        path = tmp_path / "c.jsonl.gz"
        path.write_bytes(gzip.compress(_lines(TEXTS[:half])) + gzip.compress(_lines(TEXTS[half:])))
    elif fmt == "jsonl.zst":
        path = tmp_path / "c.jsonl.zst"
        z = zstandard.ZstdCompressor(write_checksum=True)
        path.write_bytes(z.compress(_lines(TEXTS[:half])) + z.compress(_lines(TEXTS[half:])))
    elif fmt == "parquet":
        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"body": TEXTS, "n": list(range(len(TEXTS)))}), path, row_group_size=130)
        return path, "body"
    elif fmt == "arrow":
        path = _write_arrow_stream(tmp_path / "c.arrow", TEXTS)
    elif fmt == "arrow-file":
        path = tmp_path / "c_file.arrow"
        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, pa.schema([("text", pa.string())])) as w:
            w.write_table(pa.table({"text": TEXTS}), max_chunksize=200)
    elif fmt == "hf":
        import datasets

        datasets.disable_progress_bars()
        path = tmp_path / "saved"
        datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(len(TEXTS)))}).save_to_disk(
            str(path), max_shard_size="40KB")
        assert len(list(path.glob("*.arrow"))) > 1  # several files, read in order
    elif fmt == "parquet-folder":
        path = tmp_path / "pq"
        path.mkdir()
        pq.write_table(pa.table({"text": TEXTS[:half]}), path / "train-00000-of-00002.parquet")
        pq.write_table(pa.table({"text": TEXTS[half:]}), path / "train-00001-of-00002.parquet")
    else:
        raise ValueError(fmt)
    return path, None


FORMATS = ["jsonl.gz", "jsonl.zst", "parquet", "arrow", "arrow-file", "hf", "parquet-folder"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_same_documents_and_builds_the_same_shard(tmp_path, fmt):
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(_lines(TEXTS))
    expected = build_domain_shards(_cfg(tmp_path, plain), "d", "train")
    path, field = make_corpus(tmp_path, fmt)
    cfg = _cfg(tmp_path, path, text_field=field)
    assert sorted(_all_docs(cfg)) == sorted(TEXTS)
    serial = build_domain_shards(cfg, "d", "train")
    parallel = build_domain_shards(_cfg(tmp_path / "p", path, text_field=field, num_workers=2), "d", "train",
                                   chunk_bytes=4096)  # many pieces, two processes
    for shard in (serial, parallel):
        assert np.array_equal(np.asarray(shard.tokens), np.asarray(expected.tokens))
        assert np.array_equal(np.asarray(shard.doc_offsets), np.asarray(expected.doc_offsets))
        assert shard.num_bytes == expected.num_bytes


def test_text_files_compressed_are_one_document_each(tmp_path):
    text = "Ein ganzes Dokument.\nZweite Zeile — über alles.\n" * 40
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "b.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(("B " + text).encode()))
    (tmp_path / "c.txt").write_text("C " + text, encoding="utf-8")
    cfg = _cfg(tmp_path, tmp_path, val_fraction=0.5)
    assert sorted(_all_docs(cfg)) == sorted([text, "B " + text, "C " + text])


def test_the_cache_key_follows_the_compressed_file(tmp_path):
    path, _ = make_corpus(tmp_path, "jsonl.zst")
    first = build_domain_shards(_cfg(tmp_path, path), "d", "train")
    assert build_domain_shards(_cfg(tmp_path, path), "d", "train").reused
    path.write_bytes(zstandard.ZstdCompressor().compress(_lines(TEXTS[:50])))
    again = build_domain_shards(_cfg(tmp_path, path), "d", "train")
    assert not again.reused and again.num_docs < first.num_docs


def test_corrupt_gzip_names_the_file_and_offset_and_leaves_no_shard(tmp_path):
    first, second = gzip.compress(_lines(TEXTS[:300])), gzip.compress(_lines(TEXTS[300:]))
    data = bytearray(first + second)
    data[len(first) + 3] = 0xE0  # the second member's header flags: reserved bits set
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        build_domain_shards(_cfg(tmp_path, path, num_workers=2), "d", "train", chunk_bytes=2048)
    message = str(err.value)
    assert f"{path} is corrupt at byte offset {len(first) + 3} of its gzip stream" in message
    assert len(message.splitlines()) == 1
    assert os.listdir(tmp_path / "cache") == []  # neither a shard nor a half-built folder


def test_corrupt_and_truncated_zstd(tmp_path):
    whole = zstandard.ZstdCompressor(write_checksum=True).compress(_lines(TEXTS))
    path = tmp_path / "t.jsonl.zst"
    path.write_bytes(whole[:-40])
    with pytest.raises(DataError, match=rf"t\.jsonl\.zst ends at byte offset {len(whole) - 40} before the end of its "
                                        r"zstd stream \(the file is truncated"):
        build_domain_shards(_cfg(tmp_path, path), "d", "train")
    bad = bytearray(whole)
    bad[0] = 0  # not a zstd frame
    path.write_bytes(bytes(bad))
    with pytest.raises(DataError, match=r"t\.jsonl\.zst is corrupt at byte offset 0 of its zstd stream"):
        build_domain_shards(_cfg(tmp_path, path), "d", "train")
    assert os.listdir(tmp_path / "cache") == []


def test_bad_json_inside_a_compressed_file_names_the_decompressed_offset(tmp_path):
    good = _lines(TEXTS[:3])
    path = tmp_path / "j.jsonl.gz"
    path.write_bytes(gzip.compress(good + b'{"text": oops}\n'))
    with pytest.raises(DataError, match=rf"j\.jsonl\.gz \(decompressed\): the line at byte offset {len(good)} is not "
                                        "valid JSON"):
        list(iter_documents(_cfg(tmp_path, path), "d", "train"))


def test_parquet_without_the_column_names_the_columns_present(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"content": ["a b c"], "url": ["x"]}), path)
    with pytest.raises(DataError) as err:
        build_domain_shards(_cfg(tmp_path, path), "d", "train")
    assert str(err.value) == (f"{path} has no column 'text'; its columns are content, url (data.text_field or "
                              "data.domains.<name>.text_field names the text column).")
    assert os.listdir(tmp_path / "cache") == []


def test_parquet_column_of_numbers_or_nulls_is_refused(tmp_path):
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(DataError, match=r"column 'text' holds int64, not text"):
        list(iter_documents(_cfg(tmp_path, path), "d", "train"))
    pq.write_table(pa.table({"text": ["fine", None]}), path)
    with pytest.raises(DataError, match=r"n\.parquet: row 1 has no 'text' text \(it is null\)"):
        list(iter_documents(_cfg(tmp_path, path), "d", "train"))


def test_saved_dataset_dict_and_mixed_split_folders_ask_for_one_split(tmp_path):
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"text": TEXTS[:10]})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"is a datasets DatasetDict with splits test, train; name one split's folder"):
        list(iter_documents(_cfg(tmp_path, tmp_path / "dd"), "d", "train"))
    assert len(_all_docs(_cfg(tmp_path, tmp_path / "dd" / "train"))) == 10
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    pq.write_table(pa.table({"text": TEXTS[:5]}), repo / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": TEXTS[5:9]}), repo / "test-00000-of-00001.parquet")
    with pytest.raises(DataError, match=r"holds the files of several splits \(test, train\); name one split's files"):
        list(iter_documents(_cfg(tmp_path, tmp_path / "repo"), "d", "train"))
    assert len(_all_docs(_cfg(tmp_path, repo / "train-*.parquet"))) == 5


@pytest.mark.parametrize("module,fmt,extra", [("pyarrow", "parquet", "parquet"), ("zstandard", "jsonl.zst", "zstd"),
                                              ("datasets", "hf", "hf")])
def test_a_missing_optional_package_names_its_extra(tmp_path, monkeypatch, module, fmt, extra):
    path, field = make_corpus(tmp_path, fmt)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    if module == "pyarrow":
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError) as err:
        build_domain_shards(_cfg(tmp_path, path, text_field=field), "d", "train")
    message = str(err.value)
    assert f"needs the {module} package, which is not installed" in message
    assert f'pip install "modular-moe[{extra}]"' in message and len(message.splitlines()) == 1


def test_a_build_folder_of_a_killed_process_is_removed(tmp_path):
    import socket

    cache = tmp_path / "cache"
    dead = cache / f".tmp-{socket.gethostname()}-999999999-d.train.0123-abc"
    alive = cache / f".tmp-{socket.gethostname()}-{os.getpid()}-d.train.4567-abc"
    for folder in (dead, alive):
        folder.mkdir(parents=True)
        (folder / "tokens.bin").write_bytes(b"\0" * 10)
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(_lines(TEXTS[:20]))
    build_domain_shards(_cfg(tmp_path, plain), "d", "train")
    assert not dead.exists() and alive.exists()  # a live process may still be writing its own


def test_shard_offsets_are_memory_mapped_and_match_the_documents(tmp_path):
    path, _ = make_corpus(tmp_path, "jsonl.gz")
    shard = build_domain_shards(_cfg(tmp_path, path), "d", "train")
    assert isinstance(shard.doc_offsets, np.memmap)
    tok = ByteTokenizer()
    docs = [tok.decode(shard.document(i)) for i in range(shard.num_docs)]
    assert docs == [d.text for d in iter_documents(_cfg(tmp_path, path), "d", "train")]
