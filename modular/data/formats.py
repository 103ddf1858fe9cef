"""Corpus file formats: which files a path names, and how each is cut into bounded pieces of work.
JSON Lines and text (plain, gzip, zstd), Parquet, Arrow and `datasets.save_to_disk` folders, all streamed.

Plain files are cut into byte ranges that the tokenising process reads itself. Compressed streams and
columnar files are read here, in order, a few MB at a time, and their content travels with the piece;
so memory stays bounded whatever the corpus size. Offsets in pieces and messages are byte offsets
(for a compressed file: into its decompressed text) or, for Parquet/Arrow rows, row indices.
"""

from __future__ import annotations

import importlib
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from modular.errors import DataError

TEXT_KINDS = {".jsonl": "jsonl", ".txt": "txt"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
COLUMNAR_KINDS = {".parquet": "parquet", ".arrow": "arrow"}
SUPPORTED = ".jsonl, .txt (plain, .gz or .zst), .parquet, .arrow or a datasets.save_to_disk folder"
# Optional packages: module -> the pip extra that installs it.
EXTRAS = {"pyarrow": "parquet", "zstandard": "zstd", "datasets": "hf"}
READ_BLOCK = 256 << 10  # compressed bytes fed to a decoder at once (bounds its output too)
ROWS_PER_BATCH = 1024  # rows read from a columnar file at once
HF_SPLIT_NAMES = ("train", "validation", "valid", "val", "dev", "test")


def require(module: str, purpose: str):
    """Import an optional package, or say in one sentence which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS[module.split(".")[0]]
        raise DataError(f"{purpose} needs the {module.split('.')[0]} package, which is not installed; install it "
                        f"with pip install \"modular-moe[{extra}]\".") from None


def file_kind(path: Path) -> tuple[str, str | None] | None:
    """(kind, compression) of a corpus file by its name: ("jsonl", "gzip"), ("parquet", None), ...; None if unknown."""
    name = path.name.lower()
    for suffix, compression in [*COMPRESSIONS.items(), ("", None)]:
        if suffix and not name.endswith(suffix):
            continue
        stem = name[:len(name) - len(suffix)] if suffix else name
        for ext, kind in TEXT_KINDS.items():
            if stem.endswith(ext):
                return kind, compression
        if compression is None:
            for ext, kind in COLUMNAR_KINDS.items():
                if stem.endswith(ext):
                    return kind, None
    return None


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk` (state.json beside dataset_info.json)."""
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def source_kind(path: Path) -> tuple[str, str | None] | None:
    return ("hf_dataset", None) if is_saved_dataset(path) else file_kind(path)


def source_members(path: Path) -> list[Path]:
    """The files a source consists of (itself, or a saved dataset's files): its identity for the cache."""
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def source_size(path: Path) -> int:
    return sum(p.stat().st_size for p in source_members(path))


def list_directory(folder: Path, key: str, spec: str) -> list[Path]:
    """The corpus sources below a folder: supported files and save_to_disk folders, in path order."""
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if is_saved_dataset(p))
        raise DataError(f"{key}={spec!r} is a datasets DatasetDict with splits {', '.join(splits) or 'none'}; "
                        f"name one split's folder, e.g. {key}={Path(spec) / (splits[0] if splits else 'train')}.")
    if is_saved_dataset(folder):
        return [folder]
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in list(dirs):
            if is_saved_dataset(here / d):
                found.append(here / d)
                dirs.remove(d)  # its .arrow files belong to it
        found += [here / f for f in files if not f.startswith(".") and file_kind(here / f)]
    found.sort()
    _refuse_mixed_splits(found, folder, key, spec)
    return found


def _refuse_mixed_splits(sources: list[Path], folder: Path, key: str, spec: str) -> None:
    """A Hugging Face dataset folder usually holds several splits: reading them all as one would mix them."""
    splits: dict[str, Path] = {}
    for p in sources:
        if p.is_dir() or file_kind(p)[0] not in COLUMNAR_KINDS.values():
            continue
        for part in (*p.relative_to(folder).parent.parts, p.name.lower()):
            split = next((s for s in HF_SPLIT_NAMES if part == s or part.startswith((f"{s}-", f"{s}_", f"{s}."))), None)
            if split:
                splits.setdefault(split, p)
                break
    if len(splits) > 1:
        names = ", ".join(sorted(splits))
        example = splits.get("train") or next(iter(splits.values()))
        raise DataError(f"{key}={spec!r} holds the files of several splits ({names}); name one split's files with a "
                        f"glob, e.g. {key}={folder / example.relative_to(folder).parent / 'train*'}{example.suffix}.")


@dataclass(frozen=True)
class Piece:
    """A unit of tokenisation work: a byte range of a plain file, or content read from a stream."""

    source: int  # index of the source among the domain's sources
    path: Path
    size: int  # source bytes this piece stands for (the progress bar's unit)
    kind: str  # jsonl | txt | rows
    start: int = 0  # byte offset of the piece (decompressed, for a compressed file), or its first row
    end: int | None = None  # plain files: the end of the byte range, read by whoever tokenises the piece
    data: bytes | None = None  # a decompressed block of whole lines (or a whole .txt document)
    texts: list | None = None  # rows of a columnar source's text column

    @property
    def where(self) -> str:
        """The file, as messages name it."""
        return f"{self.path} (decompressed)" if self.data is not None else str(self.path)


def iter_pieces(sources: list[Path], text_field: str | list[str], chunk_bytes: int) -> Iterator[Piece]:
    """Every source cut into pieces of about chunk_bytes, in order; `text_field` may be one per source."""
    for i, path in enumerate(sources):
        field = text_field[i] if isinstance(text_field, list) else text_field
        kind, compression = source_kind(path) or (None, None)
        if kind is None:
            raise DataError(f"{path} is not a supported corpus file; use {SUPPORTED}.")
        if compression:
            yield from _compressed_pieces(i, path, kind, compression, chunk_bytes)
        elif kind in ("parquet", "arrow", "hf_dataset"):
            yield from _columnar_pieces(i, path, kind, field, chunk_bytes)
        else:
            for start, end in jsonl_ranges(path, chunk_bytes):
                yield Piece(i, path, end - start, kind, start=start, end=end)


def jsonl_ranges(path: Path, target_bytes: int) -> list[tuple[int, int]]:
    """Cut a plain file into byte ranges of about `target_bytes` that end at line ends (a .txt stays whole)."""
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


# ---------------------------------------------------------------------------------------------
# Compressed streams


def _compressed_pieces(index: int, path: Path, kind: str, compression: str, chunk_bytes: int) -> Iterator[Piece]:
    pending, start, read_before = bytearray(), 0, 0
    for read, block in decompressed_blocks(path, compression):
        pending += block
        if kind == "txt" or len(pending) < chunk_bytes:
            continue  # a .txt file is one document: it travels whole
        cut = pending.rfind(b"\n") + 1
        if cut == 0:
            continue  # one line longer than chunk_bytes: wait for its end
        yield Piece(index, path, read - read_before, kind, start=start, data=bytes(pending[:cut]))
        del pending[:cut]
        start, read_before = start + cut, read
    size = path.stat().st_size
    if pending or start == 0:
        yield Piece(index, path, size - read_before, kind, start=start, data=bytes(pending))


class _Decoder:
    """A gzip or zstd stream decoder over fed bytes; handles concatenated members (gzip) and frames (zstd)."""

    def __init__(self, compression: str):
        self.compression = compression
        self._zstd = require("zstandard", "Reading .zst files") if compression == "zstd" else None
        self._obj = None
        self.ended = False  # the last member/frame seen so far is complete

    def _new(self):
        return self._zstd.ZstdDecompressor().decompressobj() if self._zstd else zlib.decompressobj(31)

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            if self._obj is None:
                if self.compression == "gzip":
                    data = data.lstrip(b"\0")  # gzip files may be padded with zeros between or after members
                    if not data:
                        return
                self._obj, self.ended = self._new(), False
            if self._zstd:
                out = self._obj.decompress(data)
                data = b""
            else:
                out = self._obj.decompress(data, 4 << 20)
                data = self._obj.unconsumed_tail
            if out:
                yield out
            if self._obj.eof:
                data = self._obj.unused_data + data
                self._obj, self.ended = None, True

    @property
    def errors(self) -> tuple:
        return (self._zstd.ZstdError,) if self._zstd else (zlib.error,)


def decompressed_blocks(path: Path, compression: str) -> Iterator[tuple[int, bytes]]:
    """(compressed bytes read so far, decompressed bytes) of a gzip/zstd file; DataError names any bad offset."""
    decoder = _Decoder(compression)
    read = 0
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            try:
                for out in decoder.feed(block):
                    yield read, out
            except decoder.errors as e:
                offset = _error_offset(path, compression, read, len(block))
                raise DataError(f"{path} is corrupt at byte offset {offset} of its {compression} stream ({e}); "
                                "re-download or re-compress the file.") from None
            read += len(block)
            yield read, b""
    if not decoder.ended:
        raise DataError(f"{path} ends at byte offset {read} before the end of its {compression} stream (the file "
                        "is truncated or not compressed); re-download or re-compress the file.")


def _error_offset(path: Path, compression: str, block_start: int, block_len: int) -> int:
    """The first compressed byte at which a fresh decoder fails (the error path only: it decodes again)."""
    decoder = _Decoder(compression)
    with open(path, "rb") as f:
        done = 0
        try:
            while done < block_start:
                block = f.read(min(READ_BLOCK, block_start - done))
                for _ in decoder.feed(block):
                    pass
                done += len(block)
            for i in range(block_len):
                for _ in decoder.feed(f.read(1)):
                    pass
                done = block_start + i + 1
        except decoder.errors:
            return done
    return block_start


# ---------------------------------------------------------------------------------------------
# Columnar sources: Parquet, Arrow IPC, datasets.save_to_disk folders


def _columnar_pieces(index: int, path: Path, kind: str, field: str, chunk_bytes: int) -> Iterator[Piece]:
    files, total = [path], source_size(path)
    if kind == "hf_dataset":
        files = _saved_dataset_files(path, field)
    row, sent = 0, 0
    texts: list = []
    text_bytes = 0
    for array, read_fraction in _column_batches(files, field, path):
        texts += array.to_pylist()
        text_bytes += array.nbytes
        if text_bytes >= chunk_bytes:
            size = int(total * read_fraction) - sent
            yield Piece(index, path, size, "rows", start=row, texts=texts)
            sent += size
            row += len(texts)
            texts, text_bytes = [], 0
    if texts or row == 0:
        yield Piece(index, path, total - sent, "rows", start=row, texts=texts)


def _column_batches(files: list[Path], field: str, source: Path):
    """(arrow string array, fraction of the source read so far) per batch of the text column."""
    pa = require("pyarrow", f"Reading {source.name}")
    sizes = [f.stat().st_size for f in files]
    total = max(1, sum(sizes))
    done = 0
    for f, size in zip(files, sizes):
        if f.suffix == ".parquet":
            pq = require("pyarrow.parquet", f"Reading {f.name}")
            try:
                # Streamed page by page: without these a whole row group's column is read at once.
                pfile = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{f} is not a readable Parquet file ({e}).") from None
            _check_column(f, pfile.schema_arrow, field, pa)
            num_rows = max(1, pfile.metadata.num_rows)
            seen = 0
            try:
                for batch in pfile.iter_batches(batch_size=ROWS_PER_BATCH, columns=[field]):
                    seen += batch.num_rows
                    yield batch.column(0), (done + size * seen / num_rows) / total
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{f} is damaged after row {seen} ({e}).") from None
        else:
            stream = pa.OSFile(str(f), "rb")  # read, not memory-mapped: freed batch by batch
            try:
                try:
                    reader = pa.ipc.open_stream(stream)  # the format datasets writes
                    schema, batches = reader.schema, reader
                except pa.ArrowInvalid:
                    stream.seek(0)
                    reader = pa.ipc.open_file(stream)
                    schema = reader.schema
                    batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
                _check_column(f, schema, field, pa)
                column_index = schema.get_field_index(field)
                for batch in batches:
                    column = batch.column(column_index)
                    for start in range(0, batch.num_rows, ROWS_PER_BATCH):
                        part = column.slice(start, ROWS_PER_BATCH)
                        yield part, (done + stream.tell()) / total
            except pa.ArrowInvalid as e:
                raise DataError(f"{f} is not a readable Arrow file ({e}).") from None
            finally:
                stream.close()
        done += size


def _check_column(path: Path, schema, field: str, pa) -> None:
    if field not in schema.names:
        raise DataError(f"{path} has no column {field!r}; its columns are {', '.join(schema.names) or 'none'} "
                        "(data.text_field or data.domains.<name>.text_field names the text column).")
    column_type = schema.field(field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(f"{path}: column {field!r} holds {column_type}, not text; name a string column with "
                        "data.text_field or data.domains.<name>.text_field.")


def _saved_dataset_files(folder: Path, field: str) -> list[Path]:
    """The Arrow files of a save_to_disk folder, in row order, as `datasets` itself reads them."""
    datasets = require("datasets", f"Reading the datasets folder {folder}")
    try:
        ds = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError, OSError, json.JSONDecodeError) as e:
        raise DataError(f"{folder} is not a readable datasets folder ({e}).") from None
    if getattr(ds, "_indices", None) is not None:  # save_to_disk flattens them; an edited folder may not
        raise DataError(f"{folder} holds an indices mapping; save it again with ds.flatten_indices().save_to_disk().")
    if field not in ds.column_names:
        raise DataError(f"{folder} has no column {field!r}; its columns are {', '.join(ds.column_names)} "
                        "(data.text_field or data.domains.<name>.text_field names the text column).")
    return [Path(f["filename"]) for f in ds.cache_files]
