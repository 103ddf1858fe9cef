"""The decoder-only language model: Llama's math, with each layer's FFN dense or a mixture of experts.

Parameter names follow Hugging Face Llama (`layers.{i}.self_attn.q_proj`, `input_layernorm`, `mlp`…)
so that export is a small explicit mapping. Legend: B batch, T sequence, D d_model, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modular.models.adapters import adapted, place
from modular.models.attention import Attention
from modular.models.config import experts_per_moe_layer, moe_layer_indices
from modular.models.embedding import OutputHead, TokenEmbedding, VocabRows
from modular.models.ffn import SwiGLUFFN
from modular.models.moe import MoELayer
from modular.models.norm import RMSNorm
from modular.models.rope import RotaryEmbedding
from modular.routing.context import RoutingContext


@dataclass
class LMOutput:
    logits: Tensor  # [B, T, V]
    loss: Tensor | None = None  # language-model loss + weighted auxiliary losses
    lm_loss: Tensor | None = None  # cross-entropy alone
    aux_loss: Tensor | None = None  # sum of the MoE layers' weighted auxiliary losses


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, norm_eps: float, mlp: nn.Module):
        super().__init__()
        self.self_attn = Attention(d_model, n_heads, n_kv_heads)
        self.input_layernorm = RMSNorm(d_model, norm_eps)
        self.post_attention_layernorm = RMSNorm(d_model, norm_eps)
        self.mlp = mlp
        # Domain deltas on this layer's trunk, by place (q_proj…, gate_proj…, input_layernorm…): empty
        # until a domain gets its own trunk capacity (models/adapters.py, continual.lifecycle.add_adapters).
        self.adapters = nn.ModuleDict()

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoELayer)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: RoutingContext) -> Tensor:
        if not len(self.adapters):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
            h = self.post_attention_layernorm(x)
            return x + (self.mlp(h, ctx) if self.is_moe else self.mlp(h))
        a = self.adapters
        x = x + self.self_attn(self.input_layernorm(x, ctx, place(a, "input_layernorm")), cos, sin, ctx, a)
        h = self.post_attention_layernorm(x, ctx, place(a, "post_attention_layernorm"))
        return x + (self.mlp(h, ctx) if self.is_moe else self.mlp(h, ctx, a))


class ModularLM(nn.Module):
    def __init__(self, cfg):
        """`cfg` is the composed config (model, experts, routing, kernels groups)."""
        super().__init__()
        m = cfg.model
        self.model_cfg = m
        self.d_model = m.d_model
        self.max_seq_len = m.max_seq_len
        # row blocks, so that a grown vocabulary's new rows train while the old ones stay frozen (embedding.py)
        self.embed_tokens = TokenEmbedding(m.vocab_size, m.d_model)
        moe_indices = moe_layer_indices(m)
        experts = dict(zip(moe_indices, experts_per_moe_layer(cfg)))
        layers = []
        for i in range(m.n_layers):
            if i in experts:
                mlp = MoELayer(m.d_model, experts[i], cfg.experts, cfg.routing, m.init_std)
            else:
                mlp = SwiGLUFFN(m.d_model, m.ffn_dim)
            layers.append(DecoderLayer(m.d_model, m.n_heads, m.n_kv_heads, m.norm_eps, mlp))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(m.d_model, m.norm_eps)
        self.lm_head = OutputHead(m.vocab_size, m.d_model)
        self.rotary = RotaryEmbedding(m.d_model // m.n_heads, m.rope_theta)
        # The domains the model routes by, in the order they arrived (RoutingContext.domain_ids index it),
        # and the model-level domain deltas (embed_tokens, norm, lm_head); see models/adapters.py.
        self.domains: list[str] = []
        self.adapters = nn.ModuleDict()
        self.domain_classifier = None  # models/domain_classifier.py, once domains are inferred from text
        self._init_weights(m.init_std)
        if m.tie_embeddings:
            self.lm_head.tie_to(self.embed_tokens)
            self.register_state_dict_post_hook(_share_tied_weight)

    @property
    def vocab_size(self) -> int:
        """Tokens the model holds rows for: model.vocab_size, plus what vocabulary growth added."""
        return self.embed_tokens.num_rows

    def _init_weights(self, std: float) -> None:
        # Hugging Face Llama's init: N(0, std) for every linear and embedding; norms start at 1.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, VocabRows)):  # VocabRows: its first block, `weight`
                nn.init.normal_(module.weight, mean=0.0, std=std)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [layer.mlp for layer in self.layers if layer.is_moe]

    def set_backend(self, backend: str) -> None:
        for moe in self.moe_layers:
            moe.set_backend(backend)

    def forward(self, input_ids: Tensor, targets: Tensor | None = None, *,
                domain_ids: Tensor | None = None) -> LMOutput:
        """input_ids [B, T]; targets [B, T] aligned with the inputs (already shifted), -100 = ignore;
        domain_ids [B]: each row's domain, for domain-owned routing (None: no domain routing)."""
        _, T = input_ids.shape
        ctx = RoutingContext(token_ids=input_ids, domain_ids=domain_ids, domain_names=tuple(self.domains))
        a = self.adapters
        x = self.embed_tokens(input_ids)  # [B, T, D]
        if len(a):
            x = a["embed_tokens"].add_to(x, input_ids, ctx) if "embed_tokens" in a else x
        positions = torch.arange(T, device=input_ids.device)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, ctx)
        h = self.norm(x, ctx, place(a, "norm")) if len(a) else self.norm(x)
        logits = adapted(self.lm_head, h, place(a, "lm_head"), ctx)  # [B, T, V]
        moe = self.moe_layers
        aux = sum((layer.aux_loss for layer in moe), start=logits.new_zeros(())) if moe else logits.new_zeros(())
        if targets is None:
            return LMOutput(logits=logits, aux_loss=aux)
        lm_loss = F.cross_entropy(logits.float().reshape(-1, self.vocab_size), targets.reshape(-1), ignore_index=-100)
        return LMOutput(logits=logits, loss=lm_loss + aux, lm_loss=lm_loss, aux_loss=aux)

    def domain_ids_of(self, names, indices: Tensor) -> Tensor:
        """Domain ids (ModularLM.domains) of rows labelled `indices` into `names`; a domain the model does not
        know takes the anchor route (0)."""
        lookup = torch.tensor([self.domains.index(n) if n in self.domains else 0 for n in names], dtype=torch.int64)
        return lookup.to(indices.device)[indices]

    def moe_stats(self) -> dict[int, dict]:
        """Routing statistics of the last forward, keyed by layer index."""
        return {i: layer.mlp.last_stats for i, layer in enumerate(self.layers) if layer.is_moe}


def _share_tied_weight(model, state_dict, prefix, local_metadata) -> None:
    # A grown vocabulary's `weight` is a concatenation made per call: give the tied head the embedding's
    # tensor, so that the state dict holds it once (as before growth, when both name the same parameter).
    state_dict[prefix + "lm_head.weight"] = state_dict[prefix + "embed_tokens.weight"]
