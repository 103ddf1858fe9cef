"""MoE → merged dense Llama: collapse every MoE layer (routed + shared experts) into one SwiGLU FFN.

Merges: "uniform"/"frequency" parameter averages (width F), "task_arithmetic"/"ties" on task vectors
against a base FFN (width F), and "concat", the exact static-weight ensemble Σ_e a_e·FFN_e (width E·F).
Shared experts are always concatenated (exact: the sum of two SwiGLU FFNs is one FFN of the summed width).

What is exact: concatenation of hidden units, zero-padding to a common width, scaling down_proj. What is
not: replacing token-dependent routing weights by constants, and averaging experts' parameters (exact
only when the experts are equal, e.g. right after upcycling).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from modular.continual.merge import concat_swiglu, task_arithmetic, ties, weighted_average
from modular.errors import ConfigError
from modular.export.adapters import (
    LlamaAdapter,
    _bank_tensors,
    bank_classes,
    dense_ffn,
    is_moe_layer,
    num_layers,
    routable,
    shared_expert,
    swiglu_experts,
)
from modular.export.folder import write_hf_folder
from modular.export.formats import ExportFormat, register_export_format
from modular.export.writer import DEFAULT_MAX_SHARD_SIZE

MERGE_METHODS = ("uniform", "frequency", "concat", "task_arithmetic", "ties")
DEFAULT_TASK_ARITHMETIC_SCALE = 0.3  # Ilharco et al. (2023) pick λ in [0.3, 0.5] on validation data
DEFAULT_TIES_SCALE = 1.0  # Yadav et al. (2023): λ = 1 after the disjoint mean
DEFAULT_TIES_DENSITY = 0.2


# ---------------------------------------------------------------------------------------------
# Calibration: how often the router picks each expert, and how much weight it gives per token


@dataclass
class Calibration:
    """Router statistics over calibration data, keyed by MoE layer index."""

    frequencies: dict[int, Tensor] = field(default_factory=dict)  # [E] share of routed assignments, sums to 1
    routing_mass: dict[int, float] = field(default_factory=dict)  # mean Σ combine weights per token
    tokens: int = 0


def _input_ids(batch) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        return batch["input_ids"]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise ConfigError(f"calibration batch of type {type(batch).__name__} is not allowed; "
                      "use input-id tensors [B, T] or (inputs, targets) pairs.")


@torch.no_grad()
def calibrate(model, batches: Iterable, domain_id: int | None = None) -> Calibration:
    """Run `model` (eval mode) over `batches` and collect per-layer expert frequencies and routing mass.

    Frequencies come from `model.moe_stats()` (assignments after any capacity drops); the routing mass
    (how much total weight a token's routed experts get: 1 for a renormalised top-k) from the routers.
    domain_id: route every row as that domain of a domain-routed model (ModularLM.domains); None = its
    plain forward.
    """
    moe_layers = {i: layer.mlp for i, layer in enumerate(model.layers) if layer.is_moe}
    counts = {i: torch.zeros(moe.num_experts, dtype=torch.float64) for i, moe in moe_layers.items()}
    mass = {i: 0.0 for i in moe_layers}
    tokens = {i: 0 for i in moe_layers}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seen = 0
    try:
        for batch in batches:
            ids = _input_ids(batch).to(device)
            if domain_id is None:
                model(ids)
            else:
                model(ids, domain_ids=torch.full((ids.shape[0],), domain_id, dtype=torch.int64, device=device))
            seen += ids.numel()
            for i, stats in model.moe_stats().items():
                counts[i] += stats["tokens_per_expert"].double().cpu()
                mass[i] += stats["routing_mass"] * stats["num_tokens"]
                tokens[i] += stats["num_tokens"]
    finally:
        model.train(was_training)
    if seen == 0:
        raise ConfigError("the calibration batches are empty; give at least one batch of token ids.")
    freqs = {i: (c / c.sum() if c.sum() > 0 else torch.full_like(c, 1.0 / c.numel())).float() for i, c in counts.items()}
    return Calibration(frequencies=freqs, routing_mass={i: mass[i] / max(tokens[i], 1) for i in moe_layers}, tokens=seen)


def expert_frequencies(model, batches: Iterable) -> dict[int, Tensor]:
    """{MoE layer index: [E] share of routed assignments per expert} over calibration batches."""
    return calibrate(model, batches).frequencies


# ---------------------------------------------------------------------------------------------
# Merging one state dict


def routing_mass_is_one(cfg) -> bool:
    """True when every token's combine weights sum to exactly 1 by construction (no calibration needed)."""
    from modular.routing import ROUTER_REGISTRY

    r = cfg.routing
    return r.capacity_factor is None and ROUTER_REGISTRY[r.type].weights_sum_to_one(r)


def seed_ffns(seed) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
    """{layer: (gate [F,D], up [F,D], down [D,F])} from a dense ModularLM, its state dict, or such a dict."""
    if seed is None:
        return {}
    if hasattr(seed, "state_dict") and hasattr(seed, "layers"):
        seed = seed.state_dict()
    if isinstance(seed, Mapping) and seed and all(isinstance(k, int) for k in seed):
        return {int(k): tuple(v) for k, v in seed.items()}  # type: ignore[misc]
    if isinstance(seed, Mapping):
        return {i: dense_ffn(seed, i) for i in range(num_layers(seed)) if f"layers.{i}.mlp.gate_proj.weight" in seed}
    raise ConfigError(f"seed_ffn of type {type(seed).__name__} is not allowed; pass the dense seed model, "
                      "its state dict, or {layer: (gate, up, down)}.")


def _base_for(state_dict, i: int, seeds: dict, method: str, shape: tuple) -> tuple[Tensor, Tensor, Tensor]:
    if i in seeds:
        base = seeds[i]
        if tuple(base[0].shape) != shape:
            raise ConfigError(
                f"the seed FFN of layer {i} has shape {tuple(base[0].shape)} but its experts have {shape}; "
                "the seed must be the dense model the experts were upcycled from."
            )
        return base
    classes = bank_classes(state_dict, i)
    # experts that are deltas on a shared base FFN (low-rank): that base is the natural task-vector base
    base = classes[0].base_swiglu_from_state(_bank_tensors(state_dict, i, 0)) if len(classes) == 1 else None
    if base is not None:
        return base
    raise ConfigError(
        f"merge='{method}' needs a base FFN for layer {i}: set export.seed_model=PATH (seed_ffn from Python), the "
        "dense model the experts were upcycled from; for a model trained from scratch use merge='frequency', "
        "'uniform' or 'concat'."
    )


def merge_layer(state_dict, i: int, method: str, weights_E: Tensor | None, routing_mass: float,
                seeds: dict, density: float, scale: float, routable_only: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """One MoE layer's routed + shared experts as one SwiGLU FFN: (gate [W,D], up [W,D], down [D,W]).

    weights_E has one entry per expert merged (the routable ones when routable_only); None = uniform.
    """
    gate_E, up_E, down_E, _ = swiglu_experts(state_dict, i, routable_only)
    E = gate_E.shape[0]
    if weights_E is None:
        weights_E = torch.full((E,), 1.0 / E)
    if method == "concat":
        gate, up, down = concat_swiglu(gate_E, up_E, down_E, weights_E)
        down = down * routing_mass
    else:
        if method in ("uniform", "frequency"):
            gate, up, down = (weighted_average(w, weights_E) for w in (gate_E, up_E, down_E))
        else:
            base = _base_for(state_dict, i, seeds, method, tuple(gate_E.shape[1:]))
            merge = (lambda w, b: task_arithmetic(w, b, scale)) if method == "task_arithmetic" else \
                (lambda w, b: ties(w, b, density, scale))
            gate, up, down = (merge(w, b.to(w.dtype)) for w, b in zip((gate_E, up_E, down_E), base))
        # Σ_selected w_e·FFN_e(x) ≈ m·FFN_merged(x), m = the routing mass (1 for renormalised top-k).
        down = down * routing_mass
    shared = shared_expert(state_dict, i)
    if shared is not None:
        gate = torch.cat([gate, shared[0]])
        up = torch.cat([up, shared[1]])
        down = torch.cat([down, shared[2]], dim=1)
    return gate, up, down


def merged_state_dict(state_dict: Mapping[str, Tensor], cfg, merge: str = "frequency",
                      frequencies: Mapping[int, Tensor] | None = None, routing_mass: Mapping[int, float] | None = None,
                      seed_ffn=None, density: float = DEFAULT_TIES_DENSITY, scale: float | None = None
                      ) -> tuple[dict[str, Tensor], dict]:
    """Our state dict with every MoE layer replaced by a dense FFN, and a record of what was done."""
    if merge not in MERGE_METHODS:
        raise ConfigError(f"merge='{merge}' is unknown; allowed: {', '.join(MERGE_METHODS)}.")
    n = int(cfg.model.n_layers)
    moe = [i for i in range(n) if is_moe_layer(state_dict, i)]
    if merge == "frequency" and frequencies is None:
        raise ConfigError("merge='frequency' needs router frequencies: pass frequencies= or calibration_batches=.")
    if scale is None:
        scale = DEFAULT_TASK_ARITHMETIC_SCALE if merge == "task_arithmetic" else DEFAULT_TIES_SCALE
    seeds = seed_ffns(seed_ffn)
    exact_mass = routing_mass_is_one(cfg)
    out = {k: v for k, v in state_dict.items() if not any(k.startswith(f"layers.{i}.mlp.") for i in moe)}
    record = {"merge": merge, "density": density if merge == "ties" else None,
              "scale": scale if merge in ("task_arithmetic", "ties") else None, "layers": {}}
    # Masked experts (logit offset -1e4) never get a token: leave them out of every merge. A router that
    # does not route by the logits (hash) ignores the offsets, so there every expert counts.
    from modular.routing import ROUTER_REGISTRY

    routable_only = ROUTER_REGISTRY[cfg.routing.type].routes_by_logits
    for i in moe:
        mask = routable(state_dict, i) if routable_only else None
        E_all = int(swiglu_experts(state_dict, i, routable_only=False)[3].shape[0])
        E = int(mask.sum()) if mask is not None else E_all
        weights = None
        if merge in ("frequency", "concat") and frequencies is not None:
            if i not in frequencies:
                raise ConfigError(f"frequencies has no entry for MoE layer {i}; give one per MoE layer ({moe}).")
            weights = torch.as_tensor(frequencies[i], dtype=torch.float64).reshape(-1)
            if weights.numel() != E_all:
                raise ConfigError(f"frequencies[{i}] has {weights.numel()} entries but layer {i} has {E_all} experts.")
            if mask is not None:
                weights = weights[mask]
            if float(weights.sum()) <= 0:  # no calibration token reached this layer's routable experts
                weights = None
        if exact_mass:
            mass, mass_source = 1.0, "exact"
        elif routing_mass is not None and i in routing_mass:
            mass, mass_source = float(routing_mass[i]), "calibration"
        else:
            mass, mass_source = 1.0, "assumed"
        gate, up, down = merge_layer(state_dict, i, merge, weights, mass, seeds, density, scale, routable_only)
        out[f"layers.{i}.mlp.gate_proj.weight"] = gate
        out[f"layers.{i}.mlp.up_proj.weight"] = up
        out[f"layers.{i}.mlp.down_proj.weight"] = down
        record["layers"][str(i)] = {
            "experts": E, "width": int(gate.shape[0]),
            "weights": [round(float(w), 6) for w in (weights if weights is not None else torch.full((E,), 1.0 / E))]
            if merge in ("uniform", "frequency", "concat") else None,
            "routing_mass": mass, "routing_mass_source": mass_source,
            "shared_width": int(shared_expert(state_dict, i)[0].shape[0]) if shared_expert(state_dict, i) else 0,
        }
    return out, record


def export_dense(model, cfg, tokenizer, out_dir: str | os.PathLike, merge: str = "frequency",
                 frequencies: Mapping[int, Tensor] | None = None, seed_ffn=None, *,
                 calibration_batches: Iterable | None = None, density: float = DEFAULT_TIES_DENSITY,
                 scale: float | None = None, overwrite: bool = False, dtype: torch.dtype | None = None,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Collapse every MoE layer into one dense SwiGLU FFN and write a LlamaForCausalLM folder.

    merge: uniform | frequency | concat | task_arithmetic | ties (see the module docstring).
    frequencies: {MoE layer: [E]} router frequencies; computed from `calibration_batches` when not given
      (calibration also measures the routing mass for routers whose weights do not sum to 1).
    seed_ffn: the dense model the experts were upcycled from (task_arithmetic / ties base).
    Layers of different widths are zero-padded to the widest (exact). Returns the folder.
    """
    routing_mass = None
    if calibration_batches is not None:
        calibration = calibrate(model, calibration_batches)
        frequencies = frequencies if frequencies is not None else calibration.frequencies
        routing_mass = calibration.routing_mass
    state, record = merged_state_dict(model.state_dict(), cfg, merge, frequencies, routing_mass, seed_ffn,
                                      density, scale)
    return write_hf_folder(LlamaAdapter(), state, cfg, tokenizer, out_dir, overwrite=overwrite, dtype=dtype,
                           max_shard_size=max_shard_size, info={"kind": "merged-dense", "exact": False, **record})


@register_export_format("llama-dense")
class LlamaDenseFormat(ExportFormat):
    """Every MoE layer merged into one dense SwiGLU FFN: a LlamaForCausalLM (export.merge picks how)."""

    exact = False

    @property
    def needs_calibration(self) -> bool:
        e = self.export_cfg
        return e is not None and e.merge in ("frequency", "concat")

    def needs_seed(self) -> bool:
        return self.export_cfg is not None and self.export_cfg.merge in ("task_arithmetic", "ties")

    def write(self, model, cfg, tokenizer, out_dir, *, seed_model=None, calibration_batches=None, overwrite=False,
              dtype=None, max_shard_size=DEFAULT_MAX_SHARD_SIZE) -> Path:
        """calibration_batches: for a domain-routed model, {domain: batches of its text} (each route is
        calibrated on its own domain); else one list of batches."""
        e = self.export_cfg
        if getattr(model, "domains", None):
            from modular.export.domains import domain_index, export_all_domains_dense, export_domain_dense

            by_domain = calibration_batches if isinstance(calibration_batches, Mapping) else None
            if by_domain is None:
                raise ConfigError("a domain-routed model is calibrated domain by domain; pass calibration_batches="
                                  "{domain: batches of its text}.")
            common = {"merge": e.merge, "seed_ffn": seed_model, "density": e.density, "scale": e.scale,
                      "overwrite": overwrite, "dtype": dtype, "max_shard_size": max_shard_size}
            if e.domain is not None:
                domain_index(model, e.domain)
                if e.domain not in by_domain:
                    raise ConfigError(f"export.domain={e.domain} has no validation data in data.domains to calibrate "
                                      f"its route; add it (+data.domains.{e.domain}.val=PATH).")
                return export_domain_dense(model, cfg, tokenizer, out_dir, e.domain, by_domain[e.domain], **common)
            return export_all_domains_dense(model, cfg, tokenizer, out_dir, by_domain, domain_merge=e.domain_merge,
                                            domain_scale=e.domain_scale, domain_density=e.domain_density, **common)
        if e.domain is not None:
            from modular.export.domains import domain_index

            domain_index(model, e.domain)  # raises: the model has no domain routes
        return export_dense(model, cfg, tokenizer, out_dir, merge=e.merge, seed_ffn=seed_model,
                            calibration_batches=calibration_batches, density=e.density, scale=e.scale,
                            overwrite=overwrite, dtype=dtype, max_shard_size=max_shard_size)
