"""Behaviour pinned across refactors: short continual runs and an EP=2 run under gloo give the same report
matrices and losses as the code they were recorded with (tests/reference/behaviour.json, 1e-6).

The reference was recorded before the core was reshaped into strategy classes, one MoE forward with
dispatchers and a routing context; any change of numbers there is a change of behaviour. To record
anew after an intended change of numerics: `MODULAR_RECORD_REFERENCE=1 pytest tests/test_behaviour_reference.py`
(and say in the commit why the numbers moved).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modular.cli import main

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).parent / "reference" / "behaviour.json"
RECORD = os.environ.get("MODULAR_RECORD_REFERENCE") == "1"
TOLERANCE = 1e-6  # relative; the runs are deterministic on the CPU, this only absorbs printing of floats

SMALL = ["model=tiny", "experts.num_experts=4", "experts.ffn_dim=32", "continual.steps_per_stage=3",
         "train.batch_size=2", "train.seq_len=32", "train.eval_batches=1", "train.progress=false",
         "continual.usage_batches=1", "continual.stage_warmup_steps=1", "continual.plots=false",
         "train.log_every=1", "train.threads=1", "continual.stream=[en,de,code_py]"]
CONTINUAL = {
    "add_freeze_merge": ["continual=add_freeze_merge", "continual.merge_budget=5", "continual.review_steps=2"],
    "ewc": ["continual=ewc"],
    "add_freeze_distill": ["continual=add_freeze_distill"],
    "add_freeze_trunk": ["continual=add_freeze_trunk"],
}
EP_TRAIN = ["model=tiny", "data=sample_en", "train.seq_len=32", "train.eval_batches=1", "train.warmup_steps=2",
            "train.progress=false", "experts.num_experts=4", "experts.ffn_dim=32", "train.max_steps=3",
            "train.log_every=1", "train.eval_every=100", "train.threads=1", "train.batch_size=2", "parallel.ep=2"]
EP_CONTINUAL = ["model=tiny", "experts.num_experts=4", "experts.ffn_dim=32", "continual.steps_per_stage=3",
                "train.seq_len=32", "train.eval_batches=1", "train.progress=false", "continual.usage_batches=1",
                "continual.stage_warmup_steps=1", "continual.plots=false", "train.log_every=1", "train.threads=1",
                "train.batch_size=2", "parallel.ep=2", "continual=add_freeze_merge", "continual.stream=[en,de]",
                "continual.add_experts=2", "continual.merge_budget=6"]


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "modular", *args], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          check=False)


def _losses(run: Path) -> list[list[float]]:
    out = []
    for path in sorted(run.rglob("metrics.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                out.append([record["loss"], record["lm_loss"]])
    return out


def _continual_record(run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    return {"matrix": report["matrix"], "losses": _losses(run)}


def _train_record(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"losses": _losses(run), "eval": [r["eval"]["en"]["loss"] for r in records if "eval" in r]}


def _compare(got, want, where: str) -> None:
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got} vs {want}"
        for i, (g, w) in enumerate(zip(got, want)):
            _compare(g, w, f"{where}[{i}]")
    elif isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            _compare(got[k], want[k], f"{where}.{k}")
    else:
        assert got == pytest.approx(want, rel=TOLERANCE, abs=1e-9), where


def _check(name: str, got: dict) -> None:
    reference = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
    if RECORD:
        reference[name] = got
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE.write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
        return
    assert name in reference, f"no reference recorded for {name}"
    _compare(got, reference[name], name)


@pytest.mark.parametrize("strategy", sorted(CONTINUAL))
def test_continual_runs_match_the_reference(strategy, tmp_path):
    if strategy == "ewc" and importlib.util.find_spec("avalanche") is None:
        pytest.skip("ewc runs through Avalanche: needs the avalanche extra (pip install -e '.[avalanche]')")
    run = tmp_path / strategy
    assert main(["continual", *SMALL, *CONTINUAL[strategy], f"run.dir={run}"]) == 0
    _check(f"continual/{strategy}", _continual_record(run))


def test_ep2_train_matches_the_reference(tmp_path):
    run = tmp_path / "ep2"
    proc = torchrun(["train", *EP_TRAIN, f"run.dir={run}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check("ep2/train", _train_record(run))


def test_ep2_continual_matches_the_reference(tmp_path):
    run = tmp_path / "ep2c"
    proc = torchrun(["continual", *EP_CONTINUAL, f"run.dir={run}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check("ep2/continual", _continual_record(run))
