"""Hugging Face config objects for our models: LlamaConfig, MixtralConfig, Qwen2MoeConfig, GenerationConfig.

Every field is set explicitly from our config, so a transformers default change cannot alter the export.
"""

from __future__ import annotations

from typing import Any

import torch

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _common(cfg, special_ids: dict | None, dtype: torch.dtype) -> dict[str, Any]:
    """Fields every Llama-family config shares; `cfg` is our composed config."""
    m = cfg.model
    special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **(special_ids or {})}
    return dict(
        vocab_size=int(m.vocab_size),
        hidden_size=int(m.d_model),
        num_hidden_layers=int(m.n_layers),
        num_attention_heads=int(m.n_heads),
        num_key_value_heads=int(m.n_kv_heads),
        head_dim=int(m.d_model) // int(m.n_heads),
        hidden_act="silu",
        max_position_embeddings=int(m.max_seq_len),
        initializer_range=float(m.init_std),
        rms_norm_eps=float(m.norm_eps),
        tie_word_embeddings=bool(m.tie_embeddings),
        # Our RotaryEmbedding is HF's "default" rope: inv_freq = 1 / theta^(2i/d), no scaling.
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rope_theta)},
        attention_dropout=0.0,
        use_cache=True,
        dtype=dtype_name(dtype),
        **special,
    )


def llama_config(cfg, *, intermediate_size: int | None = None, special_ids: dict | None = None,
                 dtype: torch.dtype = torch.float32):
    """LlamaConfig of a dense model; `intermediate_size` defaults to model.ffn_dim (merged layers may be wider)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        **_common(cfg, special_ids, dtype),
        intermediate_size=int(intermediate_size or cfg.model.ffn_dim),
        attention_bias=False,
        mlp_bias=False,
        pretraining_tp=1,
        architectures=["LlamaForCausalLM"],
    )


def mixtral_config(cfg, *, num_experts: int, ffn_dim: int, special_ids: dict | None = None,
                   dtype: torch.dtype = torch.float32):
    """MixtralConfig: every layer an MoE of `num_experts` SwiGLU experts of width `ffn_dim`."""
    from transformers import MixtralConfig

    return MixtralConfig(
        **_common(cfg, special_ids, dtype),
        intermediate_size=int(ffn_dim),
        num_local_experts=int(num_experts),
        num_experts_per_tok=int(cfg.routing.top_k),
        router_aux_loss_coef=float(cfg.routing.aux_loss_weight),
        router_jitter_noise=float(cfg.routing.jitter),
        output_router_logits=False,
        sliding_window=None,
        architectures=["MixtralForCausalLM"],
    )


def qwen2_moe_config(cfg, *, num_experts: int, ffn_dim: int, shared_ffn_dim: int, dense_layers: list[int],
                     dense_ffn_dim: int, special_ids: dict | None = None, dtype: torch.dtype = torch.float32):
    """Qwen2MoeConfig: MoE layers with one shared expert each, dense layers listed in `mlp_only_layers`."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **_common(cfg, special_ids, dtype),
        intermediate_size=int(dense_ffn_dim),
        moe_intermediate_size=int(ffn_dim),
        shared_expert_intermediate_size=int(shared_ffn_dim),
        num_experts=int(num_experts),
        num_experts_per_tok=int(cfg.routing.top_k),
        norm_topk_prob=bool(cfg.routing.normalize),
        router_aux_loss_coef=float(cfg.routing.aux_loss_weight),
        output_router_logits=False,
        decoder_sparse_step=1,
        mlp_only_layers=[int(i) for i in dense_layers],
        qkv_bias=False,
        use_sliding_window=False,
        architectures=["Qwen2MoeForCausalLM"],
    )


def generation_config(special_ids: dict | None = None):
    """Greedy-by-default generation settings that name our special tokens (written as generation_config.json)."""
    from transformers import GenerationConfig

    special = {k: v for k, v in (special_ids or {}).items() if v is not None}
    return GenerationConfig(**special)
