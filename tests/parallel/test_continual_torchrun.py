"""`torchrun --nproc_per_node=2 -m modular continual` on the CPU (gloo) equals one process on the same global
batch: stage evaluations, growth, freezing, merging with the optimizer's moments carried, and checkpoints
that resume the stream at another world size (mid-stage too).

Tolerance 1e-4 relative on perplexities, as loose as the train path's 1e-5 on losses allows after a few
stages: both runs do the same arithmetic on differently shaped matmuls (2 rows per rank instead of 4),
so they differ by float32 rounding only; a merge that dropped the moments it carries moves them by ~2e-3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_torchrun import torchrun

from modular.cli import main
from modular.train import checkpoint as ckpt

RTOL = 1e-4
COMMON = ["model=tiny", "experts.num_experts=4", "experts.ffn_dim=32", "continual.steps_per_stage=4",
          "train.seq_len=32", "train.eval_batches=1", "train.progress=false", "continual.usage_batches=1",
          "continual.stage_warmup_steps=1", "continual.plots=false", "train.checkpoint_every=2", "train.log_every=1",
          "train.threads=1"]
ADD_FREEZE = [*COMMON, "continual=add_freeze", "continual.stream=[en,de]"]
# 4 original experts + 4 added per stage, merged back to 6: a merged bank of 2, one expert per EP rank.
# The old experts keep training (only the old router rows are frozen), so the moments a merge carries
# to its surviving experts shape the next stage.
MERGE = [*COMMON, "continual=add_freeze_merge", "continual.stream=[en,de,code_py]", "continual.add_experts=4",
         "continual.merge_budget=6", "continual.freeze=[old_router]"]


def state(run: Path) -> dict:
    return json.loads((run / "continual_state.json").read_text())


def assert_same_stream(got: Path, want: Path) -> None:
    got_stages, want_stages = state(got)["stages"], state(want)["stages"]
    assert len(got_stages) == len(want_stages)
    for a, b in zip(got_stages, want_stages):
        for domain, r in b["eval"].items():
            assert a["eval"][domain]["ppl"] == pytest.approx(r["ppl"], rel=RTOL), (a["stage"], domain)
        for key in ("tokens", "params_total", "params_active", "experts_per_layer", "old_banks"):
            assert a[key] == b[key], (a["stage"], key)
        for domain, shares in b["routing"].items():
            assert a["routing"][domain] == pytest.approx(shares, abs=1e-3), (a["stage"], domain)


def keep_stages(run: Path, stages: int, mid_stage_step: int | None = None) -> None:
    """Cut a finished run folder back to where it stood after `stages` stages (optionally mid-way through the
    next one, at that stage's checkpoint `mid_stage_step`), as if it had been stopped there."""
    record = state(run)
    record["stages"] = record["stages"][:stages]
    stage_checkpoints = sorted((run / ckpt.CHECKPOINT_DIR).iterdir())  # one per stage, in order
    record["global_step"] = int(stage_checkpoints[stages - 1].name.split("_")[1])
    (run / "continual_state.json").write_text(json.dumps(record))
    for folder in stage_checkpoints[stages:]:
        shutil.rmtree(folder)
    for s, folder in enumerate(sorted((run / "stages").iterdir())):
        if s == stages and mid_stage_step is not None:
            for step in (folder / ckpt.CHECKPOINT_DIR).iterdir():
                if int(step.name.split("_")[1]) > mid_stage_step:
                    shutil.rmtree(step)
        elif s >= stages:
            shutil.rmtree(folder)
    for name in ("report.json", "report.md"):
        (run / name).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def add_freeze(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual_torchrun")
    single = root / "single"
    assert main(["continual", *ADD_FREEZE, "train.batch_size=4", f"run.dir={single}"]) == 0
    ep2 = root / "ep2"
    proc = torchrun(["continual", *ADD_FREEZE, "train.batch_size=2", "parallel.ep=2", f"run.dir={ep2}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return single, ep2, proc


def test_add_freeze_at_ep2_equals_one_process(add_freeze):
    single, ep2, proc = add_freeze
    assert_same_stream(ep2, single)
    assert [s["experts_per_layer"]["0"] for s in state(ep2)["stages"]] == [4, 6]
    # rank 0 alone prints and writes the run's files
    assert proc.stdout.count("continual run in") == 1 and "dp=1, ep=2, gloo" in proc.stdout
    assert proc.stdout.count("stage 1 (de) done") == 1
    assert json.loads((ep2 / "report.json").read_text())["matrix"] == [
        [s["eval"][d]["ppl"] for d in ("en", "de")] for s in state(ep2)["stages"]]


def test_frozen_parameters_stay_bitwise_unchanged_at_ep2(add_freeze):
    _, ep2, _ = add_freeze
    checkpoints = sorted((ep2 / ckpt.CHECKPOINT_DIR).iterdir())
    before, after = (load_file(c / "model.safetensors") for c in checkpoints)  # after stage 0, after stage 1
    frozen = [n for n in before if ".mlp.banks.0." in n]  # old experts and their router rows
    assert len(frozen) == 2 * 4  # w_gate, w_up, w_down, router_weight in both MoE layers
    for name in frozen:
        assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["layers.0.self_attn.q_proj.weight"], before["layers.0.self_attn.q_proj.weight"])
    assert after["layers.0.mlp.banks.1.w_gate"].shape[0] == 2  # the added bank, gathered whole on save


def test_stream_saved_at_ep2_resumes_in_one_process(add_freeze, tmp_path):
    single, ep2, _ = add_freeze
    resumed = tmp_path / "resumed"
    shutil.copytree(ep2, resumed)
    keep_stages(resumed, 1)
    assert len(state(resumed)["stages"]) == 1 and ckpt.latest_checkpoint(resumed).name == ckpt.step_dir_name(4)
    # the saved overrides come back (parallel.ep=2, batch 2 per rank); these apply on top: the same global batch
    assert main(["continual", f"run.dir={resumed}", "parallel.ep=1", "train.batch_size=4"]) == 0
    assert_same_stream(resumed, single)


def test_merge_at_ep2_resumed_mid_stage_from_one_process_stays_in_budget(tmp_path):
    single = tmp_path / "single"
    assert main(["continual", *MERGE, "train.batch_size=4", f"run.dir={single}"]) == 0
    ep2 = tmp_path / "ep2"
    shutil.copytree(single, ep2)
    keep_stages(ep2, 1, mid_stage_step=2)  # stopped half-way through stage 1, in one process
    stage_1 = ep2 / "stages" / "01-de"
    assert ckpt.latest_checkpoint(stage_1).name == ckpt.step_dir_name(2)
    proc = torchrun(["continual", f"run.dir={ep2}", "train.batch_size=2", "parallel.ep=2"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming the stream after stage 0 (en)" in proc.stdout
    assert [r["step"] for r in map(json.loads, (stage_1 / "metrics.jsonl").read_text().splitlines())
            if "loss" in r] == [1, 2, 3, 4]  # steps 3 and 4 at EP=2, after the one-process steps 1 and 2
    assert_same_stream(ep2, single)
    stages = state(ep2)["stages"]
    assert [s["experts_per_layer"] for s in stages] == [{"0": 4, "1": 4}, {"0": 6, "1": 6}, {"0": 6, "1": 6}]
    assert [s["params_total_during_stage"] > s["params_total"] for s in stages] == [False, True, True]
    last = load_file(ckpt.latest_checkpoint(ep2) / "model.safetensors")
    assert last["layers.1.mlp.banks.1.w_down"].shape[0] == 2  # the merged bank, whole in the checkpoint


def test_dp2_equals_one_process(add_freeze, tmp_path):
    single, _, _ = add_freeze
    dp2 = tmp_path / "dp2"
    proc = torchrun(["continual", *ADD_FREEZE, "train.batch_size=2", "parallel.ep=1", "parallel.dp=2",
                     f"run.dir={dp2}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dp=2, ep=1, gloo" in proc.stdout
    assert_same_stream(dp2, single)


REFUSED = [
    ([], ["parallel.ep=2", "continual.add_experts=3"],
     "continual.add_experts=3 cannot be split evenly over parallel.ep=2 ranks"),
    ([], ["parallel.ep=2", "continual=add_freeze_merge", "continual.merge_budget=5"],
     "continual.merge_budget=5 would leave a merged bank of 1 experts"),
    ([], ["parallel.ep=2", "continual=add_freeze_merge", "continual.merge_budget=6",
          "continual.merge_method=ties"], "continual.merge_method=ties merges experts by parent"),
    (["WORLD_SIZE"], ["continual=ewc"], "continual.strategy=ewc runs in one process only"),
    (["WORLD_SIZE"], ["routing=expert_choice", "continual.distill_weight=0.5"], "continual.distill_weight=0.5 under torchrun"),
]


@pytest.mark.parametrize("env,overrides,fragment", REFUSED, ids=["add_experts", "merge_budget", "merge_method", "avalanche", "distill"])
def test_what_cannot_run_in_parallel_is_refused_before_anything_is_written(env, overrides, fragment, tmp_path, capsys,
                                                                          monkeypatch):
    if env:  # as torchrun would start it; validation stops it before any process group is set up
        monkeypatch.setenv("WORLD_SIZE", "2")
    run = tmp_path / "run"
    assert main(["continual", *COMMON, "train.batch_size=2", *overrides, f"run.dir={run}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()


def test_isolate_at_ep2_equals_one_process(tmp_path):
    """Domain-owned routing under expert parallelism: every row's domain travels with it, each rank routes its
    rows among their domain's experts, and the stream (oracle and inferred matrices) equals one process."""
    isolate = [*COMMON, "continual=isolate", "continual.stream=[en,de]", "continual.adapter_rank=4",
               "continual.inference.steps=20"]
    single = tmp_path / "single"
    assert main(["continual", *isolate, "train.batch_size=4", f"run.dir={single}"]) == 0
    ep2 = tmp_path / "ep2"
    proc = torchrun(["continual", *isolate, "train.batch_size=2", "parallel.ep=2", f"run.dir={ep2}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_stream(ep2, single)
    for a, b in zip(state(ep2)["stages"], state(single)["stages"]):
        for domain, r in b["eval_oracle"].items():
            assert a["eval_oracle"][domain]["ppl"] == pytest.approx(r["ppl"], rel=RTOL), (a["stage"], domain)
    checkpoints = sorted((ep2 / ckpt.CHECKPOINT_DIR).iterdir())
    before, after = (load_file(c / "model.safetensors") for c in checkpoints)
    trained = [n for n in before if not n.startswith("domain_classifier.")]  # retrained after every stage
    for name in trained:  # everything else stage 0 had is frozen in stage 1 (the anchor and the trunk)
        old = after[name][: before[name].shape[0]] if ".router." in name else after[name]  # entries appended
        assert torch.equal(old, before[name]), name


def test_vocabulary_growth_at_ep2_equals_one_process(tmp_path, monkeypatch):
    """Rank 0 learns the merges and writes the tokenizer, every rank grows the same rows; frozen old rows stay
    bitwise, the new ones train, and the stream equals one process on the same global batch."""
    from helpers import corpora_with_russian, english_bpe
    from modular.data.tokenizer import HFTokenizer

    monkeypatch.setenv("MODULAR_CORPORA", str(corpora_with_russian(tmp_path / "corpora")))
    bpe = english_bpe(tmp_path / "bpe")
    size = HFTokenizer(bpe).vocab_size
    grow = [*COMMON, "continual=add_freeze", "continual.stream=[en,ru]", "data=corpora", "data.tokenizer.kind=hf",
            f"data.tokenizer.path={bpe}", f"model.vocab_size={size}", "continual.grow_vocab.max_new_tokens=64",
            "continual.freeze=[old_experts,old_router,embeddings]"]
    single = tmp_path / "single"
    assert main(["continual", *grow, "train.batch_size=4", f"run.dir={single}"]) == 0
    ep2 = tmp_path / "ep2"
    proc = torchrun(["continual", *grow, "train.batch_size=2", "parallel.ep=2", f"run.dir={ep2}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_stream(ep2, single)
    grown = [state(run)["stages"][1]["vocab"] for run in (single, ep2)]
    assert grown[0]["grew"] and grown[1]["new_tokens"] == grown[0]["new_tokens"]
    assert proc.stdout.count("vocabulary: ru needs") == 1  # rank 0 prints
    tokenizers = [HFTokenizer(run / "stages" / "01-ru" / "tokenizer") for run in (single, ep2)]
    assert tokenizers[0].fingerprint() == tokenizers[1].fingerprint()
    before, after = (load_file(c / "model.safetensors") for c in sorted((ep2 / ckpt.CHECKPOINT_DIR).iterdir()))
    assert after["embed_tokens.weight"].shape[0] == size + grown[0]["new_tokens"]
    assert torch.equal(after["embed_tokens.weight"][:size], before["embed_tokens.weight"])
