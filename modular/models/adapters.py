"""Domain-owned trunk capacity: per-domain low-rank deltas on the frozen trunk, applied only to that domain's rows.

A `DomainAdapters` module holds, for one place of the model (a projection, a norm, the embedding or the
output head), one small delta per domain that owns one. Deltas start at zero (LoRA's B = 0, a norm's
scale delta = 0), so a stage starts from the base function, and a row of domain d gets d's delta only:
a domain without a delta (the anchor) computes exactly what the base computes, and what an earlier
domain computes never involves a later domain's parameters. Legend: B rows, T positions, I in, O out.

Targets (continual.adapter_targets): q_proj, k_proj, v_proj, o_proj (attention), dense_ffn (gate, up
and down of dense FFN layers), norms (RMSNorm scales), embeddings (the token embedding), lm_head.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from modular.routing.context import RoutingContext

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGETS = (*ATTENTION_TARGETS, "dense_ffn", "norms", "embeddings", "lm_head")
ADAPTER_PLACES = {  # a target → the places of the model that get a delta
    "q_proj": ["q_proj"], "k_proj": ["k_proj"], "v_proj": ["v_proj"], "o_proj": ["o_proj"],
    "dense_ffn": ["gate_proj", "up_proj", "down_proj"],
    "norms": ["input_layernorm", "post_attention_layernorm", "norm"],
    "embeddings": ["embed_tokens"], "lm_head": ["lm_head"],
}


class LowRankDelta(nn.Module):
    """x [N, I] → (x Aᵀ) Bᵀ · scale [N, O]; B starts at zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, generator=None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))  # [r, I]
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))  # [O, r]
        with torch.no_grad():  # Kaiming-uniform like nn.Linear (and PEFT's LoRA)
            bound = 1.0 / math.sqrt(in_features)
            self.lora_A.uniform_(-bound, bound, generator=generator)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.lora_A.t()) @ self.lora_B.t() * self.scale

    def dense_delta(self) -> Tensor:
        """[O, I] the delta as one weight matrix (for merging into the frozen weight)."""
        return self.lora_B @ self.lora_A * self.scale


class EmbeddingDelta(nn.Module):
    """ids → A[ids] Bᵀ · scale: a low-rank delta on the embedding table (A random, B zero)."""

    def __init__(self, num_embeddings: int, dim: int, rank: int, alpha: float, generator=None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(num_embeddings, rank))  # [V, r]
        self.lora_B = nn.Parameter(torch.zeros(dim, rank))  # [D, r]
        with torch.no_grad():
            self.lora_A.normal_(0.0, 1.0, generator=generator)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank

    def forward(self, ids: Tensor) -> Tensor:
        return self.lora_A[ids] @ self.lora_B.t() * self.scale

    def dense_delta(self) -> Tensor:
        """[V, D] the delta on the embedding table."""
        return self.lora_A @ self.lora_B.t() * self.scale


class ScaleDelta(nn.Module):
    """An additive delta on a norm's scale vector (zero at the start)."""

    def __init__(self, dim: int):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(dim))
        self.rank, self.alpha = 0, 0.0

    def dense_delta(self) -> Tensor:
        return self.delta


class DomainAdapters(nn.Module):
    """One place's deltas, keyed by the domain that owns each (`deltas[name]`)."""

    def __init__(self):
        super().__init__()
        self.deltas = nn.ModuleDict()

    def add(self, domain: str, delta: nn.Module) -> None:
        self.deltas[domain] = delta

    def _rows(self, ctx: RoutingContext | None, batch: int) -> list:
        """[(delta, row index or None for all rows)] for the domains of the batch that own a delta here."""
        if ctx is None or ctx.domain_ids is None or not len(self.deltas):
            return []
        ids = ctx.domain_ids.reshape(-1)
        present = ctx.present_domains()
        out = []
        for d in present:
            name = ctx.domain_names[d]
            if name not in self.deltas:
                continue
            if len(present) == 1:
                out.append((self.deltas[name], None))
            else:
                out.append((self.deltas[name], (ids == d).nonzero().squeeze(1)))
        return out

    def add_to(self, y: Tensor, x: Tensor, ctx: RoutingContext | None) -> Tensor:
        """y [B, ..., O] + each row's domain delta of x [B, ..., I] (low-rank or embedding deltas)."""
        for delta, rows in self._rows(ctx, y.shape[0]):
            y = y + delta(x) if rows is None else y.index_add(0, rows, delta(x.index_select(0, rows)))
        return y

    def scale_for(self, weight: Tensor, ctx: RoutingContext | None, batch: int, ndim: int) -> Tensor:
        """The norm scale of each row: [D] when no row has a delta or one domain does, else [B, 1…, D]."""
        rows = self._rows(ctx, batch)
        if not rows:
            return weight
        if len(rows) == 1 and rows[0][1] is None:
            return weight + rows[0][0].delta
        scales = weight.expand(batch, *([1] * (ndim - 2)), weight.shape[-1]).clone()
        for delta, index in rows:
            scales[index] = weight + delta.delta
        return scales


def place(adapters, name: str) -> DomainAdapters | None:
    """The deltas of one place (`name`) among a layer's adapters (an nn.ModuleDict), or None."""
    return adapters[name] if adapters is not None and name in adapters else None


def adapted(linear: nn.Module, x: Tensor, adapters: DomainAdapters | None, ctx: RoutingContext | None) -> Tensor:
    """linear(x) plus the row's domain delta of this projection, where it has one."""
    y = linear(x)
    return adapters.add_to(y, x, ctx) if adapters is not None else y


def make_delta(model, layer, place: str, rank: int, alpha: float, generator=None) -> nn.Module:
    """A fresh (zero) delta for `place` of `layer` (None for the model-level places embed_tokens, norm, lm_head)."""
    if place in ("input_layernorm", "post_attention_layernorm", "norm"):
        return ScaleDelta(model.d_model)
    if place == "embed_tokens":
        return EmbeddingDelta(model.vocab_size, model.d_model, rank, alpha, generator)
    if place == "lm_head":
        in_features, out_features = model.d_model, model.vocab_size
    else:
        linear = getattr(layer.self_attn, place, None) or getattr(layer.mlp, place)
        in_features, out_features = linear.in_features, linear.out_features
    if rank > min(in_features, out_features):
        raise ValueError(f"rank {rank} is larger than {place} ({out_features}×{in_features}).")
    return LowRankDelta(in_features, out_features, rank, alpha, generator)


def adapter_structure(model) -> list[dict]:
    """[{"where": "layers.3" or "", "place", "domain", "rank", "alpha"}] of every domain delta (checkpoints
    record it; `rebuild_adapters` recreates the modules before the weights are loaded)."""
    out = []
    containers = [(f"layers.{i}", layer.adapters) for i, layer in enumerate(model.layers)] + [("", model.adapters)]
    for where, container in containers:
        for place, adapters in container.items():
            for domain, delta in adapters.deltas.items():
                out.append({"where": where, "place": place, "domain": domain, "rank": delta.rank,
                            "alpha": delta.alpha})
    return out


def rebuild_adapters(model, records: list[dict]) -> None:
    """Recreate the domain deltas `adapter_structure` recorded (zero; the weights are loaded after)."""
    for layer in model.layers:
        layer.adapters = nn.ModuleDict()
    model.adapters = nn.ModuleDict()
    for r in records:
        layer = model.layers[int(r["where"].split(".")[1])] if r["where"] else None
        container = layer.adapters if layer is not None else model.adapters
        if r["place"] not in container:
            container[r["place"]] = DomainAdapters()
        container[r["place"]].add(r["domain"], make_delta(model, layer, r["place"], r["rank"], r["alpha"]))
