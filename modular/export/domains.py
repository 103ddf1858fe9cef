"""A domain-routed model (continual=isolate) for Hugging Face: one domain's route as plain weights, that route
collapsed into dense Llama weights, and every domain's route merged into one dense model.

A route is what the model computes for rows of one domain: the trunk with that domain's deltas, and in every
MoE layer the learned router choosing among the experts the domain may use. As plain weights it is exact
(W + B·A·scale, norm scales + delta, the embedding and head deltas, the domain's experts and router rows
alone). Collapsing its experts into one FFN is the merge of dense.py (by the domain's routing frequencies,
measured under its route on its validation data) and is not exact; its error is measured and recorded.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from modular.continual.merge import task_arithmetic, ties
from modular.errors import ConfigError
from modular.export.adapters import LlamaAdapter, swiglu_experts
from modular.export.config import DOMAIN_MERGES
from modular.export.dense import DEFAULT_TIES_DENSITY, calibrate, merged_state_dict
from modular.export.folder import write_hf_folder
from modular.export.writer import DEFAULT_MAX_SHARD_SIZE

# Defaults by measurement (a tiny isolate run en → de → code_py, mean exported perplexity over the three, the
# routes themselves 33.8): TIES λ=1 density 1.0 34.4, TIES density 0.2 34.7, task arithmetic λ=1 35.0, λ=0.5 35.3.
# Each domain's delta was trained alone against the frozen anchor, so λ = 1 keeps each domain's change whole.
DEFAULT_DOMAIN_SCALE = {"task_arithmetic": 1.0, "ties": 1.0}
DEFAULT_DOMAIN_DENSITY = 1.0  # TIES on domain deltas: keep every entry (sign election and disjoint mean only)

# Where each adapter place's delta lands in our state dict ({i}: the layer index).
_PLACE_KEYS = {
    "q_proj": "layers.{i}.self_attn.q_proj.weight", "k_proj": "layers.{i}.self_attn.k_proj.weight",
    "v_proj": "layers.{i}.self_attn.v_proj.weight", "o_proj": "layers.{i}.self_attn.o_proj.weight",
    "gate_proj": "layers.{i}.mlp.gate_proj.weight", "up_proj": "layers.{i}.mlp.up_proj.weight",
    "down_proj": "layers.{i}.mlp.down_proj.weight",
    "input_layernorm": "layers.{i}.input_layernorm.weight",
    "post_attention_layernorm": "layers.{i}.post_attention_layernorm.weight",
    "embed_tokens": "embed_tokens.weight", "norm": "norm.weight", "lm_head": "lm_head.weight",
}


# ---------------------------------------------------------------------------------------------
# What a model's routes are


def has_domain_routes(model) -> bool:
    """True when the plain MoE is not what the model computes for every row: several domains, an anchor route
    that leaves experts out, or domain deltas on the trunk."""
    domains = list(getattr(model, "domains", []) or [])
    if not domains:
        return False
    anchor_restricted = any(layer.domain_access is not None and
                            sorted(layer.domain_access[0]) != list(range(layer.num_experts))
                            for layer in model.moe_layers)
    return len(domains) > 1 or anchor_restricted or bool(domain_deltas(model, domains[0]))


def domain_routing_feature(model) -> str:
    """The feature a format without per-sequence routing lacks, in words (for `cannot_express`)."""
    return (f"per-sequence domain routing (each sequence takes the experts and trunk deltas of its domain: "
            f"{', '.join(model.domains)}); export one domain's route with export.domain=NAME, or every domain "
            f"merged into one dense model with format=llama-dense")


def domain_index(model, name: str, key: str = "export.domain") -> int:
    """The domain id of `name` (ModularLM.domains), or a ConfigError naming the run's domains."""
    domains = list(getattr(model, "domains", []) or [])
    if not domains:
        raise ConfigError(f"{key}={name} was given, but this run has no domain routes (only continual=isolate runs "
                          "route by domain); leave {key} unset.".replace("{key}", key))
    if name not in domains:
        raise ConfigError(f"{key}={name} names a domain this run never saw; its domains are: {', '.join(domains)}.")
    return domains.index(name)


def domain_deltas(model, domain: str) -> list[tuple[str, int | None, str, torch.nn.Module]]:
    """[(key in our state dict, layer index or None, place, delta module)] of every trunk delta `domain` owns."""
    out = []
    containers = [(i, layer.adapters) for i, layer in enumerate(model.layers)] + [(None, model.adapters)]
    for i, container in containers:
        for place, adapters in container.items():
            if domain in adapters.deltas:
                out.append((_PLACE_KEYS[place].format(i=i), i, place, adapters.deltas[domain]))
    return out


# ---------------------------------------------------------------------------------------------
# One route as plain weights (exact)


@torch.no_grad()
def route_state_dict(model, domain: str) -> tuple[dict[str, Tensor], bool]:
    """(our state dict of `domain`'s route as a plain model, tied).

    The domain's trunk deltas are merged into the weights (summed in float64, then cast back), and every MoE
    layer holds only the experts the domain may use, as one SwiGLU bank with their router rows and per-expert
    router state (a top-k over a subset is that subset's own top-k, so the plain model computes the route).
    tied: the route's embedding and output head are still one matrix (False once either has a delta).
    """
    d = domain_index(model, domain)
    state = {k: v.detach() for k, v in model.state_dict().items()
             if ".adapters." not in k and not k.startswith(("adapters.", "domain_classifier."))}
    places = set()
    for key, _, place, delta in domain_deltas(model, domain):
        weight = state[key]
        state[key] = (weight.double() + delta.dense_delta().detach().double()).to(weight.dtype)
        places.add(place)
    tied = bool(model.model_cfg.tie_embeddings) and not places & {"embed_tokens", "lm_head"}
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    for i, layer in enumerate(model.layers):
        if not layer.is_moe:
            continue
        moe = layer.mlp
        allowed = list(range(moe.num_experts)) if moe.domain_access is None else sorted(moe.domain_access[d])
        gate, up, down, router = swiglu_experts(state, i, routable_only=False)
        keep = torch.tensor(allowed, dtype=torch.int64, device=gate.device)
        for k in [k for k in state if k.startswith(f"layers.{i}.mlp.banks.")]:
            del state[k]
        p = f"layers.{i}.mlp.banks.0."
        state[p + "w_gate"], state[p + "w_up"], state[p + "w_down"], state[p + "router_weight"] = (
            t.index_select(0, keep).contiguous() for t in (gate, up, down, router))
        for name in type(moe.router).per_expert_buffers:
            key = f"layers.{i}.mlp.router.{name}"
            if key in state:
                state[key] = state[key].index_select(0, keep.to(state[key].device))
    return state, tied


def route_cfg(cfg, tied: bool):
    """`cfg` as the route's weights need it: untied embeddings when a delta separated embedding and head."""
    if tied or not bool(cfg.model.tie_embeddings):
        return cfg
    from omegaconf import OmegaConf, open_dict

    out = copy.deepcopy(cfg) if not OmegaConf.is_config(cfg) else OmegaConf.create(OmegaConf.to_container(cfg))
    with open_dict(out):
        out.model.tie_embeddings = False
    return out


def allowed_experts(model, domain: str) -> dict[int, list[int]]:
    """{MoE layer index: the global experts `domain` may use}."""
    d = domain_index(model, domain)
    return {i: (list(range(layer.mlp.num_experts)) if layer.mlp.domain_access is None
                else sorted(layer.mlp.domain_access[d]))
            for i, layer in enumerate(model.layers) if layer.is_moe}


# ---------------------------------------------------------------------------------------------
# One route collapsed into dense weights (the experts' merge is approximate and measured)


def _ids(batch) -> Tensor:
    from modular.export.dense import _input_ids

    return _input_ids(batch)


@torch.no_grad()
def merge_errors(model, domain_id: int, batches: Iterable, dense_state: Mapping[str, Tensor]) -> dict[int, float]:
    """{MoE layer: ‖FFN_merged(x) − MoE(x)‖ / ‖MoE(x)‖ over the tokens of `batches` under the route}: how far each
    layer's merged FFN is from the experts it replaces, on the inputs the route gives that layer."""
    moe_layers = {i: layer.mlp for i, layer in enumerate(model.layers) if layer.is_moe}
    sums = {i: [0.0, 0.0] for i in moe_layers}

    def hook(i):
        def record(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])
            gate, up, down = (dense_state[f"layers.{i}.mlp.{n}.weight"].to(x.dtype) for n in
                              ("gate_proj", "up_proj", "down_proj"))
            merged = (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
            y = output.reshape(-1, output.shape[-1])
            sums[i][0] += float((merged - y).double().pow(2).sum())
            sums[i][1] += float(y.double().pow(2).sum())
        return record

    handles = [moe.register_forward_hook(hook(i)) for i, moe in moe_layers.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            ids = _ids(batch).to(device)
            model(ids, domain_ids=torch.full((ids.shape[0],), domain_id, dtype=torch.int64, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {i: (err / norm) ** 0.5 if norm > 0 else 0.0 for i, (err, norm) in sums.items()}


def dense_route_state(model, cfg, domain: str, calibration_batches: Sequence, merge: str = "frequency",
                      seed_ffn=None, density: float = DEFAULT_TIES_DENSITY, scale: float | None = None
                      ) -> tuple[dict[str, Tensor], dict, bool]:
    """(dense state dict of `domain`'s route, record, tied): its deltas merged exactly, each MoE layer's allowed
    experts merged into one FFN by `merge` with the domain's routing frequencies under its route on
    `calibration_batches` (its validation data); the record holds each layer's measured merge error."""
    d = domain_index(model, domain)
    state, tied = route_state_dict(model, domain)
    allowed = allowed_experts(model, domain)
    frequencies, routing_mass = None, None
    batches = list(calibration_batches)
    if allowed and batches:
        calibration = calibrate(model, batches, domain_id=d)
        frequencies = {i: calibration.frequencies[i][torch.tensor(allowed[i])] for i in allowed}
        routing_mass = calibration.routing_mass
    elif allowed and merge in ("frequency", "concat"):
        raise ConfigError(f"merge='{merge}' of domain {domain}'s route needs calibration batches of its text.")
    dense, record = merged_state_dict(state, cfg, merge, frequencies, routing_mass, seed_ffn, density, scale)
    errors = merge_errors(model, d, batches, dense) if allowed and batches else {}
    for i, err in errors.items():
        record["layers"][str(i)].update({"experts_used": allowed[i], "merge_error": err})
    record.update({"domain": domain, "deltas": sorted({place for _, _, place, _ in domain_deltas(model, domain)}),
                   "deltas_exact": True,
                   "merge_error_definition": "‖FFN_merged(x) − MoE(x)‖ / ‖MoE(x)‖ over the calibration tokens under "
                                             "the route, per MoE layer"})
    return dense, record, tied


def export_domain_dense(model, cfg, tokenizer, out_dir: str | os.PathLike, domain: str, calibration_batches: Sequence,
                        merge: str = "frequency", seed_ffn=None, *, density: float = DEFAULT_TIES_DENSITY,
                        scale: float | None = None, overwrite: bool = False, dtype: torch.dtype | None = None,
                        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write `domain`'s route of a domain-routed model as a LlamaForCausalLM folder (see dense_route_state)."""
    state, record, tied = dense_route_state(model, cfg, domain, calibration_batches, merge, seed_ffn, density, scale)
    return write_hf_folder(LlamaAdapter(), state, route_cfg(cfg, tied), tokenizer, out_dir, overwrite=overwrite,
                           dtype=dtype, max_shard_size=max_shard_size,
                           info={"kind": "domain-dense", "exact": not record["layers"], **record})


# ---------------------------------------------------------------------------------------------
# Every domain's route merged into one dense model


def merge_domain_states(states: Mapping[str, Mapping[str, Tensor]], anchor: str, method: str = "ties",
                        scale: float | None = None, density: float = DEFAULT_DOMAIN_DENSITY) -> dict[str, Tensor]:
    """One state dict from every domain's dense route: the anchor's plus the merged task vectors (each route
    minus the anchor's) by task arithmetic or TIES, tensor by tensor."""
    if method not in DOMAIN_MERGES:
        raise ConfigError(f"export.domain_merge='{method}' is unknown; allowed: {', '.join(DOMAIN_MERGES)}.")
    scale = DEFAULT_DOMAIN_SCALE[method] if scale is None else scale
    base = states[anchor]
    others = [s for name, s in states.items() if name != anchor]
    out = {}
    for key, b in base.items():
        shapes = {tuple(s[key].shape) for s in others}
        if shapes - {tuple(b.shape)}:
            raise ConfigError(
                f"the domains' routes give {key} different shapes ({sorted(shapes | {tuple(b.shape)})}), so they cannot be "
                "merged tensor by tensor; use export.merge=frequency or uniform (one expert width per route), or export "
                "one domain with export.domain=NAME.")
        if not others or not b.is_floating_point():
            out[key] = b
            continue
        stack = torch.stack([s[key] for s in others])
        out[key] = task_arithmetic(stack, b, scale) if method == "task_arithmetic" else ties(stack, b, density, scale)
    return out


def export_all_domains_dense(model, cfg, tokenizer, out_dir: str | os.PathLike,
                             calibration_by_domain: Mapping[str, Sequence], merge: str = "frequency", seed_ffn=None, *,
                             domain_merge: str = "ties", domain_scale: float | None = None,
                             domain_density: float = DEFAULT_DOMAIN_DENSITY, density: float = DEFAULT_TIES_DENSITY,
                             scale: float | None = None, overwrite: bool = False, dtype: torch.dtype | None = None,
                             max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Every domain of a domain-routed model in one LlamaForCausalLM: each route made dense (dense_route_state,
    calibrated on its own domain's batches), then the routes merged relative to the anchor's (merge_domain_states)."""
    states, records, tied = {}, {}, True
    for domain in model.domains:
        if domain not in calibration_by_domain:
            raise ConfigError(f"domain {domain} has no validation data in data.domains to calibrate its route; add "
                              f"it (+data.domains.{domain}.val=PATH) or export another domain with export.domain=NAME.")
        states[domain], records[domain], route_tied = dense_route_state(
            model, cfg, domain, calibration_by_domain[domain], merge, seed_ffn, density, scale)
        tied = tied and route_tied
    merged = merge_domain_states(states, model.domains[0], domain_merge, domain_scale, domain_density)
    if tied:
        merged["lm_head.weight"] = merged["embed_tokens.weight"]
    scale_used = DEFAULT_DOMAIN_SCALE[domain_merge] if domain_scale is None else domain_scale
    info = {"kind": "domains-merged-dense", "exact": False, "merge": merge, "domain_merge": domain_merge,
            "domain_scale": scale_used, "domain_density": domain_density if domain_merge == "ties" else None,
            "anchor": model.domains[0], "routes": records}
    return write_hf_folder(LlamaAdapter(), merged, route_cfg(cfg, tied), tokenizer, out_dir, overwrite=overwrite,
                           dtype=dtype, max_shard_size=max_shard_size, info=info)
