"""Our dense decoder computes exactly what Hugging Face's LlamaForCausalLM computes (fp32, CPU)."""

import pytest
import torch

from helpers import tiny_cfg
from modular.models import build_model

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tied,kv_heads,theta", [(True, 2, 10000.0), (False, 4, 500000.0)])
def test_dense_model_matches_hf_llama(tied, kv_heads, theta):
    cfg = tiny_cfg("model.moe_layers=none", f"model.tie_embeddings={str(tied).lower()}",
                   f"model.n_kv_heads={kv_heads}", f"model.rope_theta={theta}")
    m = cfg.model
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    for name, p in ours.named_parameters():  # norms away from 1 so their math is exercised too
        if "norm" in name:
            torch.nn.init.normal_(p, 1.0, 0.2)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_dim,
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
        max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {}
    for name, tensor in ours.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        state[name if name == "lm_head.weight" else f"model.{name}"] = tensor
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}  # tied: HF shares it with the embedding
    ids = torch.randint(0, m.vocab_size, (2, 33))
    with torch.no_grad():
        ours_logits = ours(ids).logits
        hf_logits = hf(ids).logits
    torch.testing.assert_close(ours_logits, hf_logits, rtol=1e-5, atol=1e-5)
