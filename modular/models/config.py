"""The `model` config group: the decoder's sizes and which layers hold a mixture of experts.

`validate_model` checks the group; `moe_layer_indices` and `experts_per_moe_layer` read the layout of the MoE layers.
"""

# OmegaConf 2.3 reads typing.Optional / typing.List in structured configs but not `X | None` or `list[...]`.
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from modular.errors import ConfigError, require, require_positive_int


@dataclass
class ModelConfig:
    """The decoder: sizes, attention, and which layers hold a mixture of experts."""

    name: str = "small"
    vocab_size: int = 259  # the byte tokenizer: 256 bytes + pad, bos, eos
    max_vocab_size: Optional[int] = None  # the most tokens vocabulary growth may take it to (null: no limit)
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: n_heads % n_kv_heads == 0
    ffn_dim: int = 688  # hidden size of the dense SwiGLU FFN (dense layers)
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    # Which layers are MoE: "all", "none", "every_n" (with moe_every / moe_offset) or a list of indices.
    moe_layers: Any = "all"
    moe_every: int = 2
    moe_offset: int = 1


def moe_layer_indices(model: ModelConfig | Any) -> list[int]:
    """The indices of the layers whose FFN is a mixture of experts."""
    pattern = model.moe_layers
    n = model.n_layers
    if isinstance(pattern, str):
        if pattern == "all":
            return list(range(n))
        if pattern == "none":
            return []
        if pattern == "every_n":
            return [i for i in range(n) if i % model.moe_every == model.moe_offset % model.moe_every]
        raise ConfigError(
            f"model.moe_layers='{pattern}' is not allowed; use 'all', 'none', 'every_n' or a list of layer indices."
        )
    try:
        indices = [int(i) for i in pattern]
    except (TypeError, ValueError):
        raise ConfigError(
            f"model.moe_layers={pattern!r} is not allowed; use 'all', 'none', 'every_n' or a list of layer indices."
        ) from None
    for i in indices:
        if not 0 <= i < n:
            raise ConfigError(
                f"model.moe_layers contains {i}, which is out of range; layer indices go from 0 to {n - 1}."
            )
    if len(set(indices)) != len(indices):
        raise ConfigError(f"model.moe_layers={indices} lists a layer twice; list each MoE layer once.")
    return sorted(indices)


def experts_per_moe_layer(cfg) -> list[int]:
    """Expert count of each MoE layer, in layer order."""
    moe = moe_layer_indices(cfg.model)
    per_layer = cfg.experts.num_experts_per_layer
    if per_layer is None:
        return [cfg.experts.num_experts] * len(moe)
    return [int(e) for e in per_layer]


def validate_model(cfg) -> None:
    m = cfg.model
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
        require_positive_int(m[key], f"model.{key}")
    require(
        m.max_vocab_size is None or (isinstance(m.max_vocab_size, int) and m.max_vocab_size >= m.vocab_size),
        f"model.max_vocab_size={m.max_vocab_size} is not allowed; it must be null or an integer >= "
        f"model.vocab_size={m.vocab_size}.",
    )
    require(
        m.d_model % m.n_heads == 0,
        f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
        "d_model must be a multiple of n_heads.",
    )
    require(
        m.n_heads % m.n_kv_heads == 0,
        f"model.n_kv_heads={m.n_kv_heads} does not divide model.n_heads={m.n_heads}; "
        "n_heads must be a multiple of n_kv_heads.",
    )
    require((m.d_model // m.n_heads) % 2 == 0,
            f"model head size {m.d_model // m.n_heads} is odd; rotary embeddings need an even head size.")
    require(m.rope_theta > 0, f"model.rope_theta={m.rope_theta} is not allowed; it must be > 0.")
    require(m.norm_eps > 0, f"model.norm_eps={m.norm_eps} is not allowed; it must be > 0.")
    require(m.init_std > 0, f"model.init_std={m.init_std} is not allowed; it must be > 0.")
    if isinstance(m.moe_layers, str) and m.moe_layers == "every_n":
        require_positive_int(m.moe_every, "model.moe_every")
    moe_layer_indices(m)
