"""MoE → HF MoE export: transformers reloads the folder offline and computes our logits (fp32, 1e-5)."""

import json
import os

import pytest
import torch
from export_helpers import assert_same_logits, build, hf_model, ids

from modular.data.tokenizer import ByteTokenizer
from modular.errors import ConfigError
from modular.export import export_moe

pytest.importorskip("transformers")


def test_mixtral_export_reloads_with_equal_logits(tmp_path):
    model, cfg = build("model.tie_embeddings=false")
    out = export_moe(model, cfg, ByteTokenizer(), tmp_path / "mixtral")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 4
    assert config["num_experts_per_tok"] == 2 and config["eos_token_id"] == 258 and config["bos_token_id"] == 257
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 258
    hf = hf_model(out)
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert_same_logits(model, hf, ids())


def test_mixtral_export_concatenates_banks_and_materialises_low_rank_experts(tmp_path):
    model, cfg = build("experts.type=lowrank", "experts.rank=4")
    with torch.no_grad():
        for moe in model.moe_layers:
            for name in ("b_gate", "b_up", "b_down"):  # LoRA-style zero init would hide the deltas
                getattr(moe.banks[0], name).normal_(0, 0.05)
            moe.add_bank(moe.new_bank(2))  # a second bank (as a continual stage adds): 6 experts
            for p in moe.banks[1].parameters():
                p.normal_(0, 0.05)
    hf = hf_model(export_moe(model, cfg, None, tmp_path / "grown"))
    assert hf.config.num_local_experts == 6
    assert_same_logits(model, hf, ids())


def test_qwen2_moe_export_with_shared_experts_dense_layers_and_unnormalised_router(tmp_path):
    model, cfg = build("experts.shared_experts=2", "experts.shared_ffn_dim=8", "model.moe_layers=[1]",
                       "model.n_layers=3", "routing.normalize=false")
    out = export_moe(model, cfg, ByteTokenizer(), tmp_path / "qwen")
    hf = hf_model(out)
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    assert hf.config.mlp_only_layers == [0, 2] and hf.config.norm_topk_prob is False
    assert_same_logits(model, hf, ids())


def test_refuses_existing_output_unless_overwrite(tmp_path):
    model, cfg = build()
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="already exists"):
        export_moe(model, cfg, None, out)
    assert (out / "old.txt").read_text() == "keep me"
    export_moe(model, cfg, None, out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging or backup folders left behind


def test_failure_midway_leaves_no_folder(tmp_path):
    model, cfg = build("model.vocab_size=100")  # the byte tokenizer has 259 tokens: refused while staging
    with pytest.raises(ConfigError, match="259 tokens but the model's vocabulary holds 100"):
        export_moe(model, cfg, ByteTokenizer(), tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_unfit_model_is_refused_before_writing(tmp_path):
    model, cfg = build("routing.score=sigmoid", "routing.bias_balancing=true")
    with pytest.raises(ConfigError, match=r"routing\.score=sigmoid.*routing\.bias_balancing=true"):
        export_moe(model, cfg, None, tmp_path / "out", format="mixtral")
    assert os.listdir(tmp_path) == []


def test_bf16_export_writes_bf16_weights_and_says_so(tmp_path):
    from safetensors import safe_open

    model, cfg = build()
    out = export_moe(model, cfg, None, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118  (safe_open is not a dict)
    assert dtypes == {torch.bfloat16}


def test_masked_experts_are_left_out_of_the_moe_export(tmp_path):
    model, cfg = build()
    if not hasattr(model.layers[0].mlp.router, "logit_offset"):
        pytest.skip("routers have no logit offsets in this version")
    from modular.routing.base import MASKED_LOGIT

    with torch.no_grad():
        for moe in model.moe_layers:  # grown but not yet trained: never routed to, so exactly absent
            moe.router.logit_offset[1] = MASKED_LOGIT
    hf = hf_model(export_moe(model, cfg, None, tmp_path / "masked"))
    assert hf.config.num_local_experts == 3
    assert_same_logits(model, hf, ids())
