"""Every corpus format trains through `modular train`, added as a domain from the command line; TensorBoard logs."""

import gzip
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from modular.cli import main

TEXTS = [f"Section {i}. The tenant shall keep the premises in good repair; rent is due on day {i % 28}. "
         f"Schedule {i}: größere Räume, naïve clauses. " * 2 for i in range(240)]
RUN = ["model=tiny", "data=sample_en", "train.max_steps=2", "train.log_every=1", "train.eval_every=2",
       "train.batch_size=2", "train.seq_len=32", "train.eval_batches=1", "train.progress=false", "train.threads=1",
       "data.num_workers=1"]


def _jsonl(texts, field="text") -> bytes:
    return "".join(json.dumps({field: t}) + "\n" for t in texts).encode()


def write_format(folder, fmt):
    """(train path, val path or None, text field or None): small real files of the format."""
    train, val = TEXTS[:200], TEXTS[200:]
    if fmt == "jsonl.gz":
        (folder / "t.jsonl.gz").write_bytes(gzip.compress(_jsonl(train)))
        (folder / "v.jsonl.gz").write_bytes(gzip.compress(_jsonl(val)))
        return folder / "t.jsonl.gz", folder / "v.jsonl.gz", None
    if fmt == "jsonl.zst":
        (folder / "t.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(TEXTS)))
        return folder / "t.jsonl.zst", None, None  # the 5% hash split makes the val set
    if fmt == "txt.gz":
        docs = folder / "docs"
        docs.mkdir()
        for i in range(0, 200, 10):
            (docs / f"{i:03d}.txt.gz").write_bytes(gzip.compress("\n".join(TEXTS[i:i + 10]).encode()))
        (folder / "val.txt.gz").write_bytes(gzip.compress("\n".join(val).encode()))
        return docs, folder / "val.txt.gz", None
    if fmt == "parquet":
        pq.write_table(pa.table({"content": train, "id": list(range(200))}), folder / "t.parquet", row_group_size=64)
        pq.write_table(pa.table({"content": val}), folder / "v.parquet")
        return folder / "t.parquet", folder / "v.parquet", "content"
    if fmt == "hf":
        import datasets

        datasets.disable_progress_bars()
        datasets.Dataset.from_dict({"text": train}).save_to_disk(str(folder / "train"))
        datasets.Dataset.from_dict({"text": val}).save_to_disk(str(folder / "val"))
        return folder / "train", folder / "val", None
    raise ValueError(fmt)


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst", "txt.gz", "parquet", "hf"])
def test_each_format_trains_as_a_domain_added_on_the_command_line(tmp_path, fmt, capsys):
    train, val, field = write_format(tmp_path, fmt)
    domain = [f"+data.domains.lease.train={train}", "+data.domains.lease.weight=3"]
    domain += [f"+data.domains.lease.val={val}"] if val else []
    domain += [f"+data.domains.lease.text_field={field}"] if field else []
    run = tmp_path / "run"
    assert main(["train", *RUN, *domain, f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "lease" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval"] for r in records if "eval" in r]
    assert set(evals[-1]) == {"en", "lease"} and evals[-1]["lease"]["tokens"] > 0
    assert json.loads((run / "config.json").read_text())["data"]["domains"]["lease"]["weight"] == 3.0


def test_a_corrupt_file_stops_the_run_before_it_writes_anything(tmp_path, capsys):
    data = bytearray(gzip.compress(_jsonl(TEXTS)))
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.jsonl.gz").write_bytes(bytes(data))
    run = tmp_path / "run"
    code = main(["train", *RUN, f"+data.domains.lease.train={tmp_path / 'bad.jsonl.gz'}",
                 f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={run}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "bad.jsonl.gz is corrupt at byte offset" in err[0]
    assert not run.exists()
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("en.")] == []


def test_tensorboard_logs_what_metrics_jsonl_logs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["train", *RUN, "train.tensorboard.enabled=true", f"run.dir={run}"]) == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(s, pytest.approx(v)) for s, v in losses]
    val = [r["eval"]["en"]["loss"] for r in records if "eval" in r]
    assert [e.value for e in events.Scalars("eval/en/loss")] == [pytest.approx(v) for v in val]
    assert "moe/layer_0/entropy" in events.Tags()["scalars"]
    # resuming further appends; TensorBoard keeps one value per step
    assert main(["train", "train.max_steps=3", f"run.dir={run}"]) == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]


def test_tensorboard_missing_is_one_sentence_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    run = tmp_path / "run"
    assert main(["train", *RUN, "train.tensorboard.enabled=true", f"run.dir={run}"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: train.tensorboard.enabled=true needs the tensorboard package, which is not installed; install it with "
        "pip install \"modular-moe[tensorboard]\".")
    assert not run.exists()
