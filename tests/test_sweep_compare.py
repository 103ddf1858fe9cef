"""Sweeps (-m) and `modular compare`: every member in its own folder, failures recorded, reruns resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modular.cli import main
from modular.compare import compare_paths
from modular.errors import ConfigError
from modular.sweep import expand_sweep, folder_name, run_sweep

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["model=tiny", "data=sample_en", "train.max_steps=3", "train.log_every=1", "train.eval_every=3",
              "train.batch_size=2", "train.seq_len=32", "train.eval_batches=1", "train.progress=false",
              "train.threads=1", "data.num_workers=1"]


def test_expansion_is_the_cartesian_product_in_order_with_quoted_commas():
    common, members = expand_sweep(["model=tiny", "train.lr=0.1,0.2", "data.text_field='a,b',c", "seed=range(1,3)"])
    assert common == ["model=tiny"]
    assert members == [
        ["train.lr=0.1", "data.text_field='a,b'", "seed=1"], ["train.lr=0.1", "data.text_field='a,b'", "seed=2"],
        ["train.lr=0.1", "data.text_field=c", "seed=1"], ["train.lr=0.1", "data.text_field=c", "seed=2"],
        ["train.lr=0.2", "data.text_field='a,b'", "seed=1"], ["train.lr=0.2", "data.text_field='a,b'", "seed=2"],
        ["train.lr=0.2", "data.text_field=c", "seed=1"], ["train.lr=0.2", "data.text_field=c", "seed=2"]]
    assert expand_sweep(["continual.stream=[en,de]"]) == (["continual.stream=[en,de]"], [[]])
    assert folder_name(3, "continual=add_freeze train.lr=0.1") == "03-continual-add_freeze-train.lr-0.1"


@pytest.mark.parametrize("override,fragment", [
    ("train.lr=0.1,", "Sweep override 'train.lr=0.1,' does not parse"),
    ("train.lr=[0.1,0.2", "Sweep override 'train.lr=[0.1,0.2' does not parse"),
    ("run.dir=a,b", "run.dir=a,b is not allowed; run.dir is the sweep folder"),
])
def test_a_sweep_value_that_does_not_parse_is_one_sentence(override, fragment, capsys, tmp_path):
    assert main(["train", "-m", "model=tiny", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_sweeps_run_train_and_continual_only(capsys):
    assert main(["info", "-m", "model=tiny,small"]) == 2
    assert "modular info cannot sweep (-m); sweeps run: train, continual." in capsys.readouterr().err


def test_three_member_sweep_with_a_failing_member_then_resume_and_compare(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    args = ["train", "--multirun", *TINY_TRAIN, "train.lr=0.003,oops,0.01", f"run.dir={sweep}"]
    assert main(args) == 1  # one member failed
    out = capsys.readouterr()
    assert "error: train.lr=oops failed: train.lr=oops is not allowed; it must be a number." in out.err
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert manifest["command"] == "train" and manifest["common"] == TINY_TRAIN
    assert [(m["name"], m["status"]) for m in manifest["members"]] == [
        ("00-train.lr-0.003", "done"), ("01-train.lr-oops", "failed"), ("02-train.lr-0.01", "done")]
    failed = manifest["members"][1]
    assert failed["error"] == "train.lr=oops is not allowed; it must be a number." and failed["exit_code"] == 2
    for member in ("00-train.lr-0.003", "02-train.lr-0.01"):
        saved = json.loads((sweep / member / "overrides.json").read_text())
        assert saved[-1] == f"run.dir={sweep / member}" and f"train.lr={member.rsplit('-', 1)[1]}" in saved
    # the sweep compared its members at the end
    assert (sweep / "compare.md").is_file() and (sweep / "compare.png").stat().st_size > 0
    assert "| train.lr=0.003 | done | 3 |" in out.out

    # Rerunning the same command skips what finished and retries the failure.
    stamp = (sweep / "00-train.lr-0.003" / "metrics.jsonl").stat().st_mtime_ns
    assert main(args) == 1
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == 2
    assert (sweep / "00-train.lr-0.003" / "metrics.jsonl").stat().st_mtime_ns == stamp

    # compare from the command line, into a folder of our choosing
    assert main(["compare", str(sweep), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    metrics = [json.loads(line) for line in (sweep / "02-train.lr-0.01" / "metrics.jsonl").read_text().splitlines()]
    last_loss = [m["loss"] for m in metrics if "loss" in m][-1]
    val = [m["eval"]["en"]["loss"] for m in metrics if "eval" in m][-1]
    assert f"| train.lr=0.01 | done | 3 | 192 | {last_loss:.4f} | {val:.4f} | en {val:.3f} |" in printed
    assert "| train.lr=oops | failed | train.lr=oops is not allowed; it must be a number. |" in printed
    assert (tmp_path / "cmp" / "compare.md").read_text().count("\n| train.lr=") == 3
    assert (tmp_path / "cmp" / "compare.png").is_file()


def test_an_unfinished_member_resumes_and_other_overrides_are_refused(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    args = ["train", "-m", *TINY_TRAIN, "seed=1,2", f"run.dir={sweep}"]
    assert main(args) == 0
    manifest = json.loads((sweep / "sweep.json").read_text())
    manifest["members"][1]["status"] = "running"  # as a killed sweep leaves it
    (sweep / "sweep.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main([*args[:-1], "train.max_steps=5", f"run.dir={sweep}"]) == 2  # other common overrides: refused
    assert "holds a sweep of 'modular train' with the overrides" in capsys.readouterr().err
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "done before, skipped" in out and f"{sweep / '01-seed-2'} already reached train.max_steps=3" in out
    assert json.loads((sweep / "sweep.json").read_text())["members"][1]["status"] == "done"


def test_the_default_sweep_folder_is_found_again_by_the_same_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["train", "-m", *TINY_TRAIN, "train.max_steps=1", "seed=3,4"]
    assert main(args) == 0
    folders = list((tmp_path / "runs").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("modular-sweep-")
    assert main(args) == 0 and capsys.readouterr().out.count("done before, skipped") == 2


def test_a_continual_sweep_on_a_domain_added_from_the_command_line(tmp_path, capsys):
    legal = tmp_path / "legal.jsonl"
    legal.write_text("".join(json.dumps({"text": f"Clause {i}: the lessee shall pay the rent on day {i % 28}. " * 3})
                             + "\n" for i in range(300)), encoding="utf-8")
    sweep = tmp_path / "cs"
    code = main(["continual", "-m", "model=tiny", "data=sample_en", f"+data.domains.legal.train={legal}",
                 "continual.stream=[en,legal]", "continual=naive,replay,add_freeze", "continual.steps_per_stage=2",
                 "continual.eval_batches=1", "continual.usage_batches=1", "continual.plots=false",
                 "train.batch_size=2", "train.seq_len=32", "train.eval_batches=1", "train.progress=false",
                 "train.threads=1", "data.num_workers=1", f"run.dir={sweep}"])
    assert code == 0
    capsys.readouterr()
    result = compare_paths([sweep], echo=False)
    rows = result["rows"]
    assert [r["label"] for r in rows] == ["continual=naive", "continual=replay", "continual=add_freeze"]
    for row in rows:
        report = json.loads((Path(row["path"]) / "report.json").read_text())
        assert row["kind"] == "continual" and row["domains"] == ["en", "legal"]
        assert row["final_average_perplexity"] == report["final_average_perplexity"]
        assert row["mean_forgetting"] == report["mean_forgetting_relative"]
        assert row["plasticity"] == report["plasticity"][1] and row["flops"] == report["flops_total"]
        assert (row["params_total"], row["params_active"]) == (report["params_total"][-1], report["params_active"][-1])
    assert rows[2]["params_total"] > rows[0]["params_total"]  # add_freeze grew experts for legal
    assert rows[2]["params_active"] == pytest.approx(rows[0]["params_active"], rel=0.01)  # only router rows grew
    table = result["markdown"]
    assert f"| continual=add_freeze | done | add_freeze | {rows[2]['final_average_perplexity']:.2f} |" in table


def test_compare_on_bad_input(tmp_path, capsys):
    assert main(["compare"]) == 2
    assert "modular compare needs at least one run or sweep folder" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'} is not a run or sweep folder" in capsys.readouterr().err
    assert main(["compare", str(tmp_path), "--bogus"]) == 2
    assert "does not know the option --bogus" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", str(empty), f"compare.out={tmp_path / 'o'}"]) == 0
    assert "| empty | unfinished |" in capsys.readouterr().out


def test_a_sweep_is_refused_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="sweeps \\(-m\\) run in one process"):
        run_sweep("train", TINY_TRAIN, [], tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_a_sweep_through_the_console_script_exits_non_zero_on_failure(tmp_path):
    sweep = tmp_path / "s"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "modular", "train", "-m", *TINY_TRAIN, "train.max_steps=1",
                           "train.batch_size=2,0", f"run.dir={sweep}"], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    statuses = [m["status"] for m in json.loads((sweep / "sweep.json").read_text())["members"]]
    assert statuses == ["done", "failed"]
