"""State-dict adapters: exact round trips ours → HF → ours, HF's in-memory layout, and the fit checks."""

import pytest
import torch
from export_helpers import build

from modular.errors import CheckpointError, ConfigError
from modular.export.adapters import LlamaAdapter, MixtralAdapter, Qwen2MoeAdapter
from modular.export.moe import choose_moe_adapter


def assert_round_trip(adapter, model, cfg):
    ours = model.state_dict()
    hf = adapter.to_hf(ours, cfg)
    back = adapter.from_hf(hf, adapter.hf_config(ours, cfg))
    assert set(back) == set(ours)
    for key, value in ours.items():
        assert torch.equal(back[key], value), key
    return hf


@pytest.mark.parametrize("tied", [True, False])
def test_llama_round_trip(tied):
    model, cfg = build("model.moe_layers=none", f"model.tie_embeddings={str(tied).lower()}")
    hf = assert_round_trip(LlamaAdapter(), model, cfg)
    assert ("lm_head.weight" in hf) is not tied  # tied: HF stores the embedding once
    assert "model.layers.1.mlp.gate_proj.weight" in hf


def test_mixtral_round_trip_uses_the_on_disk_names():
    model, cfg = build("model.tie_embeddings=false")
    hf = assert_round_trip(MixtralAdapter(), model, cfg)
    assert hf["model.layers.0.block_sparse_moe.gate.weight"].shape == (4, 32)
    assert hf["model.layers.1.block_sparse_moe.experts.3.w1.weight"].shape == (24, 32)  # gate
    assert hf["model.layers.1.block_sparse_moe.experts.3.w2.weight"].shape == (32, 24)  # down
    assert torch.equal(hf["model.layers.1.block_sparse_moe.experts.2.w3.weight"],
                       model.layers[1].mlp.banks[0].w_up[2])


@pytest.mark.parametrize("overrides", [
    ["experts.shared_experts=2", "experts.shared_ffn_dim=8", "model.moe_layers=[1]"],
    ["routing.normalize=false"],  # no shared expert: an all-zero placeholder on the HF side
])
def test_qwen2_moe_round_trip(overrides):
    model, cfg = build(*overrides)
    hf = assert_round_trip(Qwen2MoeAdapter(), model, cfg)
    layer = 1
    assert not hf[f"model.layers.{layer}.mlp.shared_expert_gate.weight"].any()  # sigmoid(0) = 1/2 …
    if model.layers[layer].mlp.shared_experts is not None:  # … undone by doubling down_proj
        torch.testing.assert_close(hf[f"model.layers.{layer}.mlp.shared_expert.down_proj.weight"],
                                   2 * model.layers[layer].mlp.shared_experts.ffn.down_proj.weight, rtol=0, atol=0)


def test_from_hf_reads_transformers_in_memory_fused_layout():
    transformers = pytest.importorskip("transformers")
    model, cfg = build("model.tie_embeddings=false")
    adapter = MixtralAdapter()
    hf_config = adapter.hf_config(model.state_dict(), cfg)
    hf_model = transformers.MixtralForCausalLM(hf_config)
    hf_model.load_state_dict(_fused(adapter.to_hf(model.state_dict(), cfg)), strict=True)
    back = adapter.from_hf(hf_model.state_dict(), hf_config)  # keys like mlp.experts.gate_up_proj [E, 2F, D]
    for key, value in model.state_dict().items():
        assert torch.equal(back[key], value), key


def _fused(hf_disk):
    """Mixtral's on-disk per-expert tensors → transformers 5's fused in-memory parameters."""
    out = {}
    for key, value in hf_disk.items():
        if ".experts." not in key and ".block_sparse_moe.gate." not in key:
            out[key] = value
    layers = {int(k.split(".")[2]) for k in hf_disk if ".block_sparse_moe." in k}
    for i in layers:
        p = f"model.layers.{i}.block_sparse_moe."
        E = hf_disk[p + "gate.weight"].shape[0]
        gate = torch.stack([hf_disk[p + f"experts.{e}.w1.weight"] for e in range(E)])
        up = torch.stack([hf_disk[p + f"experts.{e}.w3.weight"] for e in range(E)])
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [hf_disk[p + f"experts.{e}.w2.weight"] for e in range(E)])
        out[f"model.layers.{i}.mlp.gate.weight"] = hf_disk[p + "gate.weight"]
    return out


def test_mixtral_refusal_lists_every_feature_that_does_not_fit():
    model, cfg = build("experts.shared_experts=1", "model.moe_layers=[1]", "routing.normalize=false")
    with pytest.raises(ConfigError) as err:
        MixtralAdapter().to_hf(model.state_dict(), cfg)
    message = str(err.value)
    assert "routing.normalize=false" in message and "layers [0] are dense" in message
    assert "shared experts" in message


def test_auto_format_picks_mixtral_then_qwen_then_refuses():
    model, cfg = build()
    assert isinstance(choose_moe_adapter(model.state_dict(), cfg), MixtralAdapter)
    model, cfg = build("experts.shared_experts=1")
    assert isinstance(choose_moe_adapter(model.state_dict(), cfg), Qwen2MoeAdapter)
    model, cfg = build("experts.type=gelu", "routing.type=expert_choice", "routing.capacity_factor=1.0")
    with pytest.raises(ConfigError, match=r"fits no Hugging Face MoE format.*expert_choice.*gelu"):
        choose_moe_adapter(model.state_dict(), cfg)


def test_llama_adapter_refuses_moe_layers_and_pads_narrow_ffns():
    model, cfg = build()
    with pytest.raises(ConfigError, match="MoE layers"):
        LlamaAdapter().to_hf(model.state_dict(), cfg)
    dense, cfg = build("model.moe_layers=none")
    state = dict(dense.state_dict())
    state["layers.0.mlp.gate_proj.weight"] = state["layers.0.mlp.gate_proj.weight"][:40]
    state["layers.0.mlp.up_proj.weight"] = state["layers.0.mlp.up_proj.weight"][:40]
    state["layers.0.mlp.down_proj.weight"] = state["layers.0.mlp.down_proj.weight"][:, :40]
    hf = LlamaAdapter().to_hf(state, cfg)
    assert hf["model.layers.0.mlp.gate_proj.weight"].shape == (48, 32)
    assert not hf["model.layers.0.mlp.down_proj.weight"][:, 40:].any()


def test_qwen2_moe_import_refuses_a_real_shared_expert_gate():
    model, cfg = build("experts.shared_experts=1")
    adapter = Qwen2MoeAdapter()
    hf = adapter.to_hf(model.state_dict(), cfg)
    hf["model.layers.0.mlp.shared_expert_gate.weight"] = torch.full((1, 32), 0.1)
    with pytest.raises(CheckpointError, match="non-zero shared_expert_gate"):
        adapter.from_hf(hf, adapter.hf_config(model.state_dict(), cfg))


def test_from_hf_refuses_unmapped_tensors():
    model, cfg = build("model.moe_layers=none")
    adapter = LlamaAdapter()
    hf = adapter.to_hf(model.state_dict(), cfg)
    hf["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    with pytest.raises(CheckpointError, match=r"q_proj\.bias"):
        adapter.from_hf(hf, adapter.hf_config(model.state_dict(), cfg))
