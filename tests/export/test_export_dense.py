"""MoE → merged dense Llama: exact where the math is exact, reloaded through transformers (fp32, 1e-5)."""

import json

import pytest
import torch
from export_helpers import assert_same_logits, build, hf_model, ids, make_experts_identical

from modular.data.tokenizer import ByteTokenizer
from modular.errors import ConfigError
from modular.export import calibrate, expert_frequencies, export_dense

pytest.importorskip("transformers")

CALIBRATION = [ids(batch=2, length=16, seed=s) for s in range(3)]


@pytest.mark.parametrize("merge", ["uniform", "frequency", "concat"])
def test_identical_experts_merge_to_the_same_function(tmp_path, merge):
    # Shared experts are concatenated and the dense layer 0 is zero-padded to the merged width: both exact.
    model, cfg = build("experts.shared_experts=1", "experts.shared_ffn_dim=40", "model.moe_layers=[1]")
    make_experts_identical(model)
    out = export_dense(model, cfg, ByteTokenizer(), tmp_path / merge, merge=merge,
                       calibration_batches=CALIBRATION if merge != "uniform" else None)
    hf = hf_model(out)
    assert type(hf).__name__ == "LlamaForCausalLM"
    expected_width = 4 * 24 + 40 if merge == "concat" else 24 + 40  # E·F or F, plus the shared expert
    assert hf.config.intermediate_size == expected_width
    assert_same_logits(model, hf, ids())


def test_frequencies_come_from_the_router_statistics():
    model, _ = build()
    freqs = expert_frequencies(model, CALIBRATION)
    assert set(freqs) == {0, 1}
    counts = torch.zeros(4)
    for batch in CALIBRATION:
        model(batch)
        counts += model.moe_stats()[1]["tokens_per_expert"].float()
    torch.testing.assert_close(freqs[1], counts / counts.sum())
    calibration = calibrate(model, CALIBRATION)
    assert calibration.tokens == 3 * 2 * 16
    assert all(abs(m - 1.0) < 1e-6 for m in calibration.routing_mass.values())  # renormalised top-k


def test_frequency_weights_and_routing_mass_are_recorded(tmp_path):
    model, cfg = build("routing.normalize=false")
    out = export_dense(model, cfg, None, tmp_path / "d", merge="frequency", calibration_batches=CALIBRATION)
    info = json.loads((out / "modular_export.json").read_text())
    layer = info["layers"]["1"]
    assert info["merge"] == "frequency" and abs(sum(layer["weights"]) - 1) < 1e-5
    # Unnormalised softmax top-2 of 4: the selected probabilities sum to between 1/2 and 1.
    assert layer["routing_mass_source"] == "calibration" and 0.5 <= layer["routing_mass"] <= 1.0
    assert hf_model(out).config.intermediate_size == 24  # every layer merged to the expert width F


def test_large_exports_are_sharded_with_an_index(tmp_path):
    model, cfg = build()
    make_experts_identical(model)
    out = export_dense(model, cfg, ByteTokenizer(), tmp_path / "sharded", merge="uniform", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / name).is_file() for name in shards)
    assert not (out / "model.safetensors").exists()
    assert_same_logits(model, hf_model(out), ids())


def test_low_rank_experts_merge_with_their_bank_base_as_the_ties_base(tmp_path):
    model, cfg = build("experts.type=lowrank", "experts.rank=4")  # B = 0 at init: every expert is the base
    out = export_dense(model, cfg, None, tmp_path / "ties", merge="ties")
    assert_same_logits(model, hf_model(out), ids())


def test_masked_experts_are_left_out(tmp_path):
    model, cfg = build()
    router = model.layers[0].mlp.router
    if not hasattr(router, "logit_offset"):
        pytest.skip("routers have no logit offsets in this version")
    from modular.routing.base import MASKED_LOGIT

    make_experts_identical(model)
    with torch.no_grad():
        model.layers[0].mlp.banks[0].w_down[3].normal_()  # a different expert that is never routed to …
        router.logit_offset[3] = MASKED_LOGIT  # … because it is masked
    out = export_dense(model, cfg, None, tmp_path / "masked", merge="uniform")
    assert json.loads((out / "modular_export.json").read_text())["layers"]["0"]["experts"] == 3
    assert_same_logits(model, hf_model(out), ids())


def test_bad_requests_are_refused_with_one_sentence(tmp_path):
    model, cfg = build()
    with pytest.raises(ConfigError, match="merge='frequency' needs router frequencies"):
        export_dense(model, cfg, None, tmp_path / "a")
    with pytest.raises(ConfigError, match="merge='ties' needs a base FFN for layer 0"):
        export_dense(model, cfg, None, tmp_path / "b", merge="ties")
    with pytest.raises(ConfigError, match="merge='mean' is unknown"):
        export_dense(model, cfg, None, tmp_path / "c", merge="mean")
    with pytest.raises(ConfigError, match="frequencies\\[1\\] has 3 entries"):
        export_dense(model, cfg, None, tmp_path / "d", frequencies={0: torch.ones(4), 1: torch.ones(3)})
    gelu, gcfg = build("experts.type=gelu")
    with pytest.raises(ConfigError, match="gelu experts"):
        export_dense(gelu, gcfg, None, tmp_path / "e", merge="uniform")
    assert list(tmp_path.iterdir()) == []
