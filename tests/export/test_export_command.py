"""`modular export` / `modular upcycle` command functions, end to end on tiny runs."""

import json

import pytest
import torch
from export_helpers import TINY, assert_same_logits, hf_model, ids

from modular.config import compose_config

transformers = pytest.importorskip("transformers")


def save_seed_llama(folder):
    """A tiny tied Llama saved with transformers: the dense seed that `modular upcycle` starts from."""
    torch.manual_seed(0)
    seed = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)).eval()
    seed.save_pretrained(str(folder))
    return seed


def data_overrides(tmp_path):
    return ["data=sample_en", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0", "train.batch_size=2",
            "train.seq_len=32", "train.eval_batches=2", "train.progress=false", "export.calibration_batches=2"]


def make_run(tmp_path, *overrides):
    """A run folder with one checkpoint of an untrained tiny MoE, as `modular train` would leave it."""
    from modular.models import build_model
    from modular.models.structure import model_structure
    from modular.train.checkpoint import save_checkpoint

    run = tmp_path / "run"
    all_overrides = [*TINY, *data_overrides(tmp_path), *overrides]
    cfg = compose_config(all_overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    run.mkdir()
    (run / "overrides.json").write_text(json.dumps(all_overrides + [f"run.dir={run}"]))
    save_checkpoint(run, 5, model, None, {"structure": model_structure(model)}, {})
    return run, model.eval()


def test_export_command_writes_dense_and_moe_folders_with_reports(tmp_path, capsys):
    from modular.export.command import export_command

    run, model = make_run(tmp_path)
    assert export_command([f"run.dir={run}", "export.merge=uniform"]) == 0
    dense = run / "export" / "llama-dense"
    assert type(hf_model(dense)).__name__ == "LlamaForCausalLM"
    report = json.loads((dense / "export_report.json").read_text())
    assert set(report["domains"]) == {"en"} and report["domains"]["en"]["seed"] is None
    assert export_command([f"run.dir={run}", "export.format=moe", "export.report=false"]) == 0
    moe = run / "export" / "moe"
    assert_same_logits(model, hf_model(moe), ids())
    assert "exported" in capsys.readouterr().out


def test_upcycle_command_then_ties_export_returns_to_the_seed(tmp_path):
    from modular.export.command import export_command, upcycle_command
    from modular.models import build_model

    source = tmp_path / "seed"
    seed = save_seed_llama(source)
    run = tmp_path / "run"
    assert upcycle_command([f"upcycle.source={source}", "upcycle.num_experts=4", "upcycle.top_k=2",
                            f"run.dir={run}", *data_overrides(tmp_path)]) == 0
    record = json.loads((run / "upcycle.json").read_text())
    assert record["step0_max_abs_logit_diff"] < 1e-5 and record["num_experts"] == 4
    cfg = compose_config(json.loads((run / "overrides.json").read_text()))
    assert cfg.experts.num_experts == 4 and cfg.model.d_model == 32
    from safetensors.torch import load_file

    moe = build_model(cfg)
    moe.load_state_dict(load_file(str(run / "upcycled" / "model.safetensors")), strict=False)
    assert_same_logits(moe.eval(), seed, ids())

    from modular.models.structure import model_structure
    from modular.train.checkpoint import save_checkpoint

    save_checkpoint(run, 0, moe, None, {"structure": model_structure(moe)}, {})
    assert export_command([f"run.dir={run}", "export.merge=ties"]) == 0  # base: the upcycle source
    out = run / "export" / "llama-dense"
    assert_same_logits(seed, hf_model(out), ids())
    report = json.loads((out / "export_report.json").read_text())
    assert report["domains"]["en"]["seed"] is not None


def test_upcycle_command_refuses_architecture_overrides(tmp_path):
    from modular.errors import ConfigError
    from modular.export.command import upcycle_command

    with pytest.raises(ConfigError, match=r"model\.d_model=64 is not allowed with modular upcycle"):
        upcycle_command(["upcycle.source=x", "model.d_model=64", f"run.dir={tmp_path / 'r'}"])


def test_modular_train_continues_from_the_upcycled_model(tmp_path):
    from modular.cli import main
    from modular.export.command import upcycle_command
    from modular.models import build_model
    from modular.models.structure import apply_structure
    from modular.train import checkpoint as ckpt

    source = tmp_path / "seed"
    seed = save_seed_llama(source)
    run = tmp_path / "run"
    assert upcycle_command([f"upcycle.source={source}", "upcycle.num_experts=4", f"run.dir={run}",
                            *data_overrides(tmp_path)]) == 0
    # one step at a negligible learning rate: the checkpoint is the upcycled model, not a fresh init
    assert main(["train", f"run.dir={run}", "train.max_steps=1", "train.lr=1e-12", "train.warmup_steps=0"]) == 0
    latest = ckpt.latest_checkpoint(run)
    cfg = compose_config(json.loads((run / "overrides.json").read_text()))
    moe = build_model(cfg)
    apply_structure(moe, ckpt.read_trainer_state(latest)["structure"])
    ckpt.load_model_weights(moe, latest)
    assert_same_logits(moe.eval(), seed, ids())
