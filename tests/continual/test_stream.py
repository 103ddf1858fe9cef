"""`modular continual` end to end on the embedded sample: report, plots, strategies, bad input, resume."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modular.cli import main

SMALL = ["model=tiny", "experts.num_experts=4", "experts.ffn_dim=32", "continual.steps_per_stage=4",
         "train.batch_size=2", "train.seq_len=32", "train.eval_batches=1", "train.progress=false",
         "continual.usage_batches=1", "continual.stage_warmup_steps=1"]


def report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def test_add_freeze_merge_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["continual", *SMALL, "continual=add_freeze_merge", "continual.merge_budget=5",
                 "continual.review_steps=2", "continual.distill_weight=0.5", f"run.dir={run}"]) == 0
    r = report(run)
    assert r["domains"] == ["en", "de", "code_py"]
    assert len(r["matrix"]) == 3 and all(len(row) == 3 for row in r["matrix"])
    for key in ("domains", "stages", "matrix", "forgetting", "backward_transfer", "forward_transfer", "flops",
                "params_total", "params_active", "routing"):
        assert key in r
    # grown by 2 per stage, then merged back to the budget of 5 experts per layer
    assert [s["experts_per_layer"]["0"] for s in r["stages"]] == [4, 5, 5]
    assert r["params_total"][0] < r["params_total"][1] == r["params_total"][2]
    assert all(f > 0 for f in r["flops"])
    assert len(r["routing"][-1]["en"]) == 2  # banks after the merge: originals + merged
    for png in ("matrix.png", "perplexity.png", "routing.png"):
        assert (run / png).stat().st_size > 1000
    md = (run / "report.md").read_text()
    assert "R[stage][domain]" in md and "Forgetting and transfer" in md
    assert "| 2 code_py |" in capsys.readouterr().out


@pytest.mark.parametrize("strategy", ["naive", "replay", "joint"])
def test_baselines_run_in_the_same_harness(strategy, tmp_path):
    run = tmp_path / strategy
    assert main(["continual", *SMALL, f"continual={strategy}", "continual.stream=[en,de]", f"run.dir={run}"]) == 0
    r = report(run)
    assert r["strategy"] == strategy and len(r["matrix"]) == 2
    assert r["params_total"][0] == r["params_total"][1]  # no growth


def test_dense_naive_baseline(tmp_path):
    run = tmp_path / "dense"
    assert main(["continual", *SMALL, "model.moe_layers=none", "continual=naive", "continual.stream=[en,de]",
                 f"run.dir={run}"]) == 0
    assert report(run)["routing"] == [{}, {}]


BAD = [
    (["continual.stream=[en,klingon]"], "klingon"),
    (["continual.stream=[]"], "continual.stream is empty"),
    (["continual.freeze=[old_experts,decoder]"], "'decoder'"),
    (["continual.strategy=add_freeze_merge", "continual.merge_budget=3"], "merge_budget=3"),
    (["continual.strategy=replay", "continual.replay=0.2", "continual.stream=[en]"], "earlier stage"),
    (["continual.strategy=teleport"], "continual.strategy='teleport'"),
    (["continual.first_stage_steps=0"], "train.init_from"),
    (["continual.first_stage_steps=-1"], "first_stage_steps=-1"),
    (["continual.router_margin=-1"], "router_margin=-1"),
    (["continual.router_init=psychic"], "continual.router_init='psychic'"),
]


@pytest.mark.parametrize("overrides,fragment", BAD, ids=[b[1] for b in BAD])
def test_bad_continual_input(overrides, fragment, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["continual", *SMALL, *overrides, f"run.dir={run}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_resume_mid_stream_gives_the_same_matrix(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    args = [*SMALL, "continual.stream=[en,de,code_py]", "continual.steps_per_stage=6", "train.checkpoint_every=2",
            "train.threads=1", "continual.plots=false"]
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "modular", "continual", *args, f"run.dir={reference}"], check=True,
                   env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "modular", "continual", *args, f"run.dir={killed}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / "stages" / "01-de" / "checkpoints" / "step_0000004"  # mid-way through stage 1
    deadline = time.time() + 180
    while time.time() < deadline and not target.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists()
    state = json.loads((killed / "continual_state.json").read_text())
    assert len(state["stages"]) == 1  # stopped inside stage 1
    subprocess.run([sys.executable, "-m", "modular", "continual", f"run.dir={killed}"], check=True, env=env,
                   capture_output=True)
    assert report(killed)["matrix"] == report(reference)["matrix"]


def _stage_steps(run: Path) -> list[int]:
    return [st["steps"] for st in report(run)["stages"]]


NEEDS_AVALANCHE = pytest.mark.skipif(importlib.util.find_spec("avalanche") is None,
                                     reason="runs through Avalanche: needs the avalanche extra "
                                            "(pip install -e '.[avalanche]')")


@pytest.mark.parametrize("strategy", ["add_freeze", "add_freeze_trunk", "add_freeze_distill",
                                      pytest.param("ewc", marks=NEEDS_AVALANCHE),
                                      pytest.param("avalanche_replay", marks=NEEDS_AVALANCHE)])
def test_stream_starts_from_a_base_model_that_knows_the_first_domain(strategy, tmp_path):
    """first_stage_steps=0 with train.init_from: stage 0 only evaluates the initial model, which is the base."""
    base = tmp_path / "base"
    assert main(["continual", *SMALL, "continual=naive", "continual.stream=[en]", "continual.first_stage_steps=6",
                 f"run.dir={base}"]) == 0
    assert _stage_steps(base) == [6]
    base_ckpt = next((base / "checkpoints").iterdir())
    run = tmp_path / strategy
    assert main(["continual", *SMALL, f"continual={strategy}", "continual.stream=[en,de]",
                 "continual.first_stage_steps=0", f"train.init_from={base_ckpt}", f"run.dir={run}"]) == 0
    r = report(run)
    assert _stage_steps(run) == [0, 4] and r["stages"][0]["tokens"] == 0 and r["flops"][0] == 0
    assert r["matrix"][0][0] == pytest.approx(report(base)["matrix"][0][0], rel=1e-6)  # stage 0 = the base, en
    if strategy == "add_freeze_trunk":  # the shared trunk is bitwise the base's after the de stage
        from safetensors.torch import load_file

        stage0, stage1 = sorted((run / "checkpoints").iterdir())
        before, after = load_file(stage0 / "model.safetensors"), load_file(stage1 / "model.safetensors")
        trunk = [n for n in before if "self_attn" in n or "norm" in n or "embed" in n]
        assert trunk and all(torch.equal(before[n], after[n]) for n in trunk)


def test_frozen_router_rows_stay_bitwise_through_the_stage_and_its_router_review(tmp_path):
    from safetensors.torch import load_file

    from modular.train.checkpoint import latest_checkpoint

    run = tmp_path / "run"
    args = ["continual", *SMALL, "continual=add_freeze", "continual.stream=[en,de]", "continual.review_steps=3",
            "train.keep_checkpoints=2", f"run.dir={run}"]
    assert main(args) == 0
    stage0, stage1 = sorted((run / "checkpoints").iterdir())
    assert latest_checkpoint(run) == stage1
    before, after = load_file(stage0 / "model.safetensors"), load_file(stage1 / "model.safetensors")
    old_rows = [n for n in before if n.endswith("banks.0.router_weight")]
    assert old_rows
    for name in old_rows:
        assert torch.equal(before[name], after[name]), name
    new_rows = [n for n in after if n.endswith("banks.1.router_weight")]
    assert new_rows and all(n not in before for n in new_rows)


def test_contrast_router_init_gets_the_router_inputs_of_the_new_and_the_earlier_domains(tmp_path, monkeypatch):
    from modular.continual import lifecycle

    calls, real_add = [], lifecycle.add_experts

    def spy(layer, num_new, **kwargs):
        calls.append(kwargs)
        return real_add(layer, num_new, **kwargs)

    monkeypatch.setattr(lifecycle, "add_experts", spy)
    run = tmp_path / "run"
    assert main(["continual", *SMALL, "continual=add_freeze", "continual.stream=[en,de]", "continual.router_init=contrast",
                 "continual.router_margin=2.0", f"run.dir={run}"]) == 0
    assert calls and all(c["router_init"] == "contrast" and c["margin"] == 2.0 for c in calls)
    for c in calls:
        new, old = c["domain_inputs"]
        assert new.mean.shape == old.mean.shape and not torch.allclose(new.mean, old.mean)
    assert len(report(run)["routing"][1]["de"]) == 2


def test_distillation_counts_the_teachers_forward_passes_in_the_stage_flops(tmp_path):
    from modular.config import compose_config
    from modular.models import build_model
    from modular.models.summary import summarize

    flops = {}
    for weight in (0.0, 0.5):
        run = tmp_path / f"distill{weight}"
        assert main(["continual", *SMALL, "continual=add_freeze", "continual.stream=[en,de]",
                     f"continual.distill_weight={weight}", f"run.dir={run}"]) == 0
        flops[weight] = report(run)["flops"]
        tokens = report(run)["stages"][1]["tokens"]
    assert flops[0.0][0] == flops[0.5][0]  # stage 0 has no teacher
    cfg = compose_config([*SMALL, "continual=add_freeze"])
    teacher_per_token = summarize(build_model(cfg), cfg.train.seq_len)["flops_per_token"]  # the model before stage 1
    assert flops[0.5][1] - flops[0.0][1] == pytest.approx(teacher_per_token * tokens, rel=1e-9)
