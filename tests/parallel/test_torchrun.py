"""`torchrun --nproc_per_node=2 -m modular train parallel.ep=2` on the CPU (gloo): the losses equal a
one-process run of the same global batch, and its checkpoint resumes in one process, exactly where it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modular.cli import main
from modular.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["model=tiny", "data=sample_en", "train.seq_len=32", "train.eval_batches=1", "train.warmup_steps=2",
          "train.progress=false", "experts.num_experts=4", "experts.ffn_dim=32", "train.max_steps=4",
          "train.log_every=1", "train.eval_every=100", "train.checkpoint_every=2", "train.threads=1"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records(run_dir) if "loss" in r]


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "modular", *args],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    single = root / "single"
    assert main(["train", *COMMON, "train.batch_size=4", f"run.dir={single}"]) == 0
    parallel = root / "ep2"
    proc = torchrun(["train", *COMMON, "train.batch_size=2", "parallel.ep=2", f"run.dir={parallel}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, single, parallel, proc


def test_ep2_losses_match_one_process_on_the_same_global_batch(runs):
    _, single, parallel, proc = runs
    want, got = losses(single), losses(parallel)
    assert [s for s, _ in got] == [1, 2, 3, 4]
    for (step, a), (_, b) in zip(want, got):
        assert b == pytest.approx(a, abs=1e-5), step
    eval_want, eval_got = records(single)[-1]["eval"]["en"], records(parallel)[-1]["eval"]["en"]
    assert eval_got["loss"] == pytest.approx(eval_want["loss"], abs=1e-5)
    first = records(parallel)[0]
    assert first["tokens"] == 4 * 32  # the global batch, not one rank's share
    assert sum(first["moe"]["layer_0"]["tokens_per_expert"]) == 2 * 4 * 32  # top-2 over the global batch
    for layer, stats in records(single)[0]["moe"].items():  # statistics of the global batch, as in one process
        assert first["moe"][layer]["tokens_per_expert"] == stats["tokens_per_expert"]
        assert first["moe"][layer]["entropy"] == pytest.approx(stats["entropy"], abs=1e-4)
        for name, value in stats["aux"].items():
            assert first["moe"][layer]["aux"][name] == pytest.approx(value, abs=1e-5), (layer, name)
    assert proc.stdout.count("training in") == 1  # rank 0 alone prints, logs and writes
    assert "dp=1, ep=2, gloo" in proc.stdout


def test_ep2_checkpoint_resumes_in_one_process_exactly(runs, tmp_path):
    _, single, parallel, _ = runs
    resumed = tmp_path / "resumed"
    shutil.copytree(parallel, resumed)
    shutil.rmtree(resumed / ckpt.CHECKPOINT_DIR / ckpt.step_dir_name(4))
    assert ckpt.latest_checkpoint(resumed).name == ckpt.step_dir_name(2)
    # one process, the same global batch: the saved overrides come back, these apply on top
    assert main(["train", f"run.dir={resumed}", "parallel.ep=1", "train.batch_size=4"]) == 0
    for (step, a), (_, b) in zip(losses(single), losses(resumed)):
        assert b == pytest.approx(a, abs=1e-5), step


def test_bad_mesh_is_one_sentence_and_exit_2():
    proc = torchrun(["train", *COMMON, "parallel.ep=4", "run.dir=/nonexistent/never-written"], timeout=120)
    assert proc.returncode != 0
    # each rank prints the one sentence and exits 2; the traceback after it is torchrun's own failure report
    ours = proc.stderr.split("Traceback")[0]
    assert ours.count("error: parallel.ep=4 needs at least 4 processes, but WORLD_SIZE=2") == 2, proc.stderr
    assert "exitcode  : 2" in proc.stderr or "exitcode : 2" in proc.stderr, proc.stderr[-2000:]
