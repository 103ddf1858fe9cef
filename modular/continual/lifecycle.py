"""The expert lifecycle: add a bank of new experts, freeze parts of the model, merge or remove experts.

Every expert operation works on the banks of each MoE layer (modular.models.MoELayer) and records where each
surviving expert came from (`ExpertOrigin`), so the optimizer can carry the moments of survivors and
give new experts fresh state (see `carry_optimizer_state`), and task-arithmetic merges know an
expert's parent. Legend: E experts, D d_model, G a group of experts merged into one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from modular.continual import merge as merge_math
from modular.continual.vocabulary import VocabGrowth, grow_vocabulary  # noqa: F401  (the vocabulary's lifecycle)
from modular.errors import ConfigError
from modular.experts import ExpertBank
from modular.models.decoder import ModularLM
from modular.models.moe import MoELayer
from modular.routing.base import MASKED_LOGIT


@dataclass
class ExpertOrigin:
    """Where global expert `index` of a layer came from after an operation."""

    survivor_of: int | None  # the old global index it is an unchanged copy of (keeps optimizer state)
    parent: int | None  # the expert it was initialised from (copy / upcycle), for task arithmetic


# -- bookkeeping ------------------------------------------------------------------------------


def parents_of(layer: MoELayer) -> list[int | None]:
    """The parent expert of every expert of the layer (None for the originals and random ones)."""
    return list(layer.expert_parents)


def _expert_rows(layer: MoELayer, name: str) -> Tensor:
    """[E, ...] one stacked parameter over all banks (banks must share a type)."""
    return torch.cat([getattr(bank, name).detach() for bank in layer.banks], dim=0)


def _check_same_type(layer: MoELayer, op: str) -> None:
    kinds = {type(bank) for bank in layer.banks}
    if len(kinds) > 1:
        names = sorted(kind.registry_name for kind in kinds)
        raise ConfigError(f"{op} needs banks of one expert type, but this layer mixes {names}.")


@torch.no_grad()
def measure_usage(model: ModularLM, batches, domain_ids=None) -> dict[int, Tensor]:
    """Tokens routed to each expert of every MoE layer over `batches` (inputs [B, T] tensors), eval mode;
    `domain_ids`: each batch's row domains, for a domain-routed model (default: its plain forward)."""
    was_training = model.training
    model.eval()
    usage: dict[int, Tensor] = {}
    device = next(model.parameters()).device
    try:
        for j, inputs in enumerate(batches):
            routing = {} if domain_ids is None else {"domain_ids": domain_ids[j]}
            model(inputs.to(device), **routing)
            for i, stats in model.moe_stats().items():
                counts = stats["tokens_per_expert"].to(torch.float64)
                usage[i] = usage.get(i, torch.zeros_like(counts)) + counts
    finally:
        model.train(was_training)
    return usage


@dataclass
class RouterInputs:
    """Statistics of the inputs of one MoE layer's router over some tokens (float64)."""

    mean: Tensor  # [D]
    cov: Tensor  # [D, D], covariance over the tokens


@torch.no_grad()
def measure_router_inputs(model: ModularLM, batches) -> dict[int, RouterInputs]:
    """Mean and covariance of the router inputs of every MoE layer over `batches` (inputs [B, T]), eval mode."""
    sums: dict[int, Tensor] = {}
    squares: dict[int, Tensor] = {}
    counts: dict[int, int] = {}

    def hook_for(i: int):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sums[i] = sums.get(i, 0) + x.sum(0)
            squares[i] = squares.get(i, 0) + x.T @ x
            counts[i] = counts.get(i, 0) + x.shape[0]

        return hook

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    handles = [layer.mlp.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(model.layers)
               if layer.is_moe]
    try:
        for inputs in batches:
            model(inputs.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    stats = {}
    for i, total in sums.items():
        mean = total / counts[i]
        stats[i] = RouterInputs(mean, squares[i] / counts[i] - torch.outer(mean, mean))
    return stats


def contrast_direction(new: RouterInputs, old: RouterInputs, ridge: float = 0.1) -> Tensor:
    """w [D] with w·mean_new = 1 and w·mean_old = −1 that best separates single tokens of the two (Fisher).

    w lies in span(P mean_new, P mean_old) with P the inverse of the pooled covariance (plus `ridge` times
    its average variance on the diagonal, for directions the few measured tokens do not cover): the
    discriminant direction, shifted and scaled so that the two means land at ±1 without a bias term
    (routers have none). Zeros if the means cannot be told apart.
    """
    n, o = new.mean.to(torch.float64), old.mean.to(torch.float64)
    pooled = 0.5 * (new.cov + old.cov).to(torch.float64)
    dim = pooled.shape[0]
    pooled = pooled + ridge * (pooled.trace() / dim).clamp_min(1e-12) * torch.eye(dim, dtype=torch.float64)
    pn, po = torch.linalg.solve(pooled, torch.stack([n, o], dim=1)).unbind(1)
    gram = torch.stack([torch.stack([n @ pn, n @ po]), torch.stack([o @ pn, o @ po])])
    if torch.linalg.det(gram) <= 1e-9 * float(gram[0, 0]) * float(gram[1, 1]):
        return torch.zeros_like(n)
    a, b = torch.linalg.solve(gram, torch.tensor([1.0, -1.0], dtype=torch.float64))
    return a * pn + b * po


# -- add --------------------------------------------------------------------------------------


@torch.no_grad()
def add_experts(layer: MoELayer, num_new: int, *, init: str = "copy", copy_from: str = "top",
                router_init: str = "copy", usage: Tensor | None = None, noise: float = 0.0,
                generator: torch.Generator | None = None,
                domain_inputs: tuple[RouterInputs, RouterInputs] | None = None,
                margin: float = 1.0, domain: str | None = None) -> ExpertBank:
    """Append a bank of `num_new` experts to `layer` (added for `domain`, when it owns them); top_k (compute
    per token) is unchanged.

    init: random (fresh), copy (of the most-used experts by `usage`, or of all experts cyclically),
    mean (the average expert), upcycle (the usage-weighted average expert: the layer collapsed into one
    dense FFN, as export does, copied into every new expert). router_init: copy (the source experts'
    rows), mean, zero, random, masked (copied rows, logits held at −inf until `unmask_experts`), or
    contrast (copied rows moved along `contrast_direction` of `domain_inputs` = (router inputs measured on
    the new domain, on the earlier ones): the average new-domain token's logit for the new expert rises by
    `margin` standard deviations of the old experts' logits for it, the average earlier token's falls as
    much, so the new experts start out preferred by the new domain and avoided by the old ones).
    """
    if num_new < 1:
        raise ConfigError(f"continual.add_experts={num_new} is not allowed; add at least 1 expert.")
    _check_same_type(layer, "adding experts")
    old_e = layer.num_experts
    bank = layer.new_bank(num_new)
    names = bank.expert_param_names
    use = usage if usage is not None else torch.ones(old_e, dtype=torch.float64)
    if use.numel() != old_e:
        raise ConfigError(f"usage has {use.numel()} entries for a layer of {old_e} experts.")
    if init == "copy":
        ranked = torch.argsort(use, descending=True, stable=True) if copy_from == "top" else torch.arange(old_e)
        sources = [int(ranked[i % old_e]) for i in range(num_new)]
    else:
        sources = [None] * num_new
    if init in ("copy", "mean", "upcycle"):
        weights = use.clamp_min(0) if init == "upcycle" and float(use.sum()) > 0 else torch.ones(old_e)
        for name in names:
            rows = _expert_rows(layer, name)  # [E_old, ...]
            if init == "copy":
                new = rows[torch.tensor(sources)]
            else:
                new = merge_math.weighted_average(rows, weights).unsqueeze(0).expand(num_new, *rows.shape[1:])
            if noise > 0:
                new = new + noise * new.std() * torch.randn(new.shape, generator=generator, dtype=new.dtype)
            getattr(bank, name).copy_(new)
        for name, p in bank.named_parameters(recurse=False):  # shared parts (e.g. a low-rank base) follow bank 0
            if name not in names and name != "router_weight":
                p.copy_(getattr(layer.banks[0], name))
    old_rows = layer.router_weight().detach()  # [E_old, D]
    if router_init == "contrast" and domain_inputs is None:
        raise ConfigError("router_init='contrast' needs the router inputs of the new and the earlier domains.")
    if router_init in ("copy", "masked", "contrast"):
        if init == "copy":
            bank.router_weight.copy_(old_rows[torch.tensor(sources)])
        else:
            bank.router_weight.copy_(old_rows.mean(0, keepdim=True).expand(num_new, -1))
    elif router_init == "mean":
        bank.router_weight.copy_(old_rows.mean(0, keepdim=True).expand(num_new, -1))
    elif router_init == "zero":
        bank.router_weight.zero_()
    elif router_init == "random":
        bank.router_weight.normal_(0.0, layer.init_std, generator=generator)
    else:
        raise ConfigError(f"router_init='{router_init}' is unknown; allowed: copy, mean, zero, random, masked, "
                          "contrast.")
    if router_init == "contrast":
        new_inputs, old_inputs = domain_inputs
        mean_new = new_inputs.mean.to(old_rows.device, torch.float64)
        scale = float((old_rows.to(torch.float64) @ mean_new).std()) if old_e > 1 else 1.0
        shift = margin * scale * contrast_direction(new_inputs, old_inputs).to(old_rows.device)
        bank.router_weight.add_(shift.to(bank.router_weight.dtype))
    if noise > 0 and router_init in ("copy", "mean", "masked", "contrast"):
        # Copied rows tie with their sources and top-k would always pick the old expert: jitter them so a
        # copy wins about half of its source's tokens and starts receiving gradient.
        bank.router_weight.add_(noise * old_rows.std() * torch.randn(bank.router_weight.shape, generator=generator,
                                                                     dtype=bank.router_weight.dtype))
    bank.to(device=old_rows.device, dtype=old_rows.dtype)
    layer.add_bank(bank, domain)
    if router_init == "masked":
        layer.router.logit_offset[old_e:] = MASKED_LOGIT
    layer.expert_parents[old_e:] = sources  # copies descend from their source; other inits have no parent
    return bank


def unmask_experts(model: ModularLM) -> None:
    """Let every masked expert be routed to from now on."""
    for layer in model.moe_layers:
        layer.router.logit_offset.clamp_(min=0.0)


# -- freeze -----------------------------------------------------------------------------------


def freeze(model: ModularLM, targets: list[str], old_banks: dict[int, int] | None = None,
           current_domain: str | None = None) -> list[str]:
    """Freeze parts of the model (requires_grad=False): no gradient, no step, no decay, no moments.

    targets ⊆ old_experts, old_router, attention, embeddings, norms, dense_ffn, shared_experts, old_adapters.
    `old_banks` gives, per MoE layer index, how many leading banks are "old" (default: all but the last).
    `current_domain` is the stage's domain: `old_adapters` freezes every domain delta but its own, and
    `embeddings` freezes the embedding and output-head rows except the vocabulary rows it added (a grown
    tokenizer's new tokens train in their domain's stage). Returns the names of the parameters frozen.
    """
    from modular.continual.config import FREEZABLE

    unknown = [t for t in targets if t not in FREEZABLE]
    if unknown:
        raise ConfigError(f"continual.freeze contains '{unknown[0]}', which does not exist; "
                          f"freezable parts are: {', '.join(FREEZABLE)}.")
    frozen: list[str] = []

    def off(prefix: str, module: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
        for name, p in module.named_parameters():
            if name.split(".")[-1] in skip:
                continue
            if p.requires_grad:
                p.requires_grad_(False)
            frozen.append(f"{prefix}.{name}" if prefix else name)

    for i, layer in enumerate(model.layers):
        if "attention" in targets:
            off(f"layers.{i}.self_attn", layer.self_attn)
        if "norms" in targets:
            off(f"layers.{i}.input_layernorm", layer.input_layernorm)
            off(f"layers.{i}.post_attention_layernorm", layer.post_attention_layernorm)
        if not layer.is_moe:
            if "dense_ffn" in targets:
                off(f"layers.{i}.mlp", layer.mlp)
            continue
        moe = layer.mlp
        n_old = (old_banks or {}).get(i, len(moe.banks) - 1)
        for b, bank in enumerate(moe.banks[:n_old]):
            if "old_experts" in targets:
                off(f"layers.{i}.mlp.banks.{b}", bank, skip=("router_weight",))
            if "old_router" in targets:
                bank.router_weight.requires_grad_(False)
                frozen.append(f"layers.{i}.mlp.banks.{b}.router_weight")
        if "shared_experts" in targets and moe.shared_experts is not None:
            off(f"layers.{i}.mlp.shared_experts", moe.shared_experts)
    if "old_adapters" in targets:
        containers = [(f"layers.{i}.adapters", layer.adapters) for i, layer in enumerate(model.layers)]
        for prefix, container in [*containers, ("adapters", model.adapters)]:
            for place, adapters in container.items():
                for domain, delta in adapters.deltas.items():
                    if domain != current_domain:
                        off(f"{prefix}.{place}.deltas.{domain}", delta)
    if "embeddings" in targets:
        for prefix, matrix in (("embed_tokens", model.embed_tokens), ("lm_head", model.lm_head)):
            for name, block, owner in matrix.own_blocks():  # a tied head has none: frozen with the embedding
                if owner is None or owner != current_domain:
                    block.requires_grad_(False)
                    frozen.append(f"{prefix}.{name}")
    if "norms" in targets:
        off("norm", model.norm)
    return frozen


def unfreeze_all(model: ModularLM) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


# -- merge and remove -------------------------------------------------------------------------


def _cluster(features: Tensor, k: int, iterations: int = 25) -> list[list[int]]:
    """k-means on rows (deterministic farthest-point init); returns k non-empty groups of row indices."""
    n = features.shape[0]
    x = features.double()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    centers = [0]
    for _ in range(1, k):
        dist = torch.cdist(x, x[centers]).min(dim=1).values
        centers.append(int(dist.argmax()))
    c = x[centers].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        assign = torch.cdist(x, c).argmin(dim=1)
        for j in range(k):
            members = x[assign == j]
            if members.numel():
                c[j] = members.mean(0)
    groups = [sorted((assign == j).nonzero().flatten().tolist()) for j in range(k)]
    groups = [g for g in groups if g]
    while len(groups) < k:  # a centre lost all members: split the largest group
        groups.sort(key=len)
        big = groups.pop()
        groups += [big[: len(big) // 2], big[len(big) // 2:]]
    return sorted(groups)


def _groups_for(layer: MoELayer, mergeable: list[int], target: int, method: str, usage: Tensor) -> list[list[int]]:
    """Partition `mergeable` (global indices) into `target` groups, each merged into one expert."""
    if target >= len(mergeable):
        return [[e] for e in mergeable]
    if method == "frequency":
        ranked = sorted(mergeable, key=lambda e: -float(usage[e]))
        return [[e] for e in ranked[: target - 1]] + [sorted(ranked[target - 1:])]
    if method == "cluster":
        feats = torch.cat([_expert_rows(layer, n).reshape(layer.num_experts, -1)
                           for n in layer.banks[0].expert_param_names], dim=1)[mergeable]
        return [[mergeable[i] for i in g] for g in _cluster(feats, target)]
    # task arithmetic / ties: experts sharing a parent merge together; then cluster the groups to fit
    parents = parents_of(layer)
    by_parent: dict[int, list[int]] = {}
    for e in mergeable:
        if parents[e] is None:
            raise ConfigError(
                f"continual.merge_method='{method}' merges relative to each expert's parent, but expert {e} has none; "
                "use init=copy (or upcycle) for the experts it merges, or merge_method=frequency|cluster."
            )
        by_parent.setdefault(parents[e], []).append(e)
    groups = sorted(by_parent.values())
    while len(groups) > target:  # fold the two least-used groups together
        groups.sort(key=lambda g: float(usage[g].sum()))
        a, b = groups.pop(0), groups.pop(0)
        groups.append(sorted(a + b))
    return sorted(groups)


@torch.no_grad()
def merge_layer(layer: MoELayer, budget: int, *, method: str = "frequency", usage: Tensor | None = None,
                keep_banks: int = 1, density: float = 0.2) -> list[ExpertOrigin]:
    """Reduce `layer` to at most `budget` experts; the first `keep_banks` banks are kept as they are.

    The other banks' experts are grouped (by usage, by clustering their weights, or by shared parent)
    and each group becomes one expert: the usage-weighted average (frequency, cluster) or its parent
    plus the merged task vectors (task_arithmetic: their sum; ties: TIES-merging). A merged expert's
    router row is the usage-weighted mean of its group's rows, so it is routed to where they were.
    Returns the origin of every expert of the new layer.
    """
    _check_same_type(layer, "merging experts")
    E = layer.num_experts
    kept = sum(b.num_experts for b in layer.banks[:keep_banks])
    if budget < kept + (1 if len(layer.banks) > keep_banks else 0):
        raise ConfigError(
            f"continual.merge_budget={budget} is below the {kept} experts of the banks it must keep (plus one for "
            f"the merged experts); use a budget of at least {kept + 1}."
        )
    if budget < layer.top_k:
        raise ConfigError(f"continual.merge_budget={budget} is below routing.top_k={layer.top_k}; a token needs "
                          "top_k experts.")
    if E <= budget:
        return [ExpertOrigin(e, p) for e, p in zip(range(E), parents_of(layer))]
    usage = (usage if usage is not None else torch.ones(E, dtype=torch.float64)).double()
    weights = usage + 1e-6  # a never-used expert still counts a little, and no group sums to zero
    mergeable = list(range(kept, E))
    groups = _groups_for(layer, mergeable, budget - kept, method, usage)
    parents = parents_of(layer)
    template = layer.banks[0]
    new_bank = layer.new_bank(len(groups))
    new_bank.to(device=template.router_weight.device, dtype=template.router_weight.dtype)
    for name in template.expert_param_names + ("router_weight",):
        rows = _expert_rows(layer, name)
        merged = []
        for g in groups:
            idx = torch.tensor(g)
            if len(g) == 1:
                merged.append(rows[g[0]])
            elif method in ("task_arithmetic", "ties") and name != "router_weight":
                base = rows[parents[g[0]]] if len({parents[e] for e in g}) == 1 else rows[[parents[e] for e in g]].mean(0)
                if method == "ties":
                    merged.append(merge_math.ties(rows[idx], base, density=density))
                else:
                    merged.append(merge_math.task_arithmetic(rows[idx], base, scale=1.0 / len(g)))
            else:
                merged.append(merge_math.weighted_average(rows[idx], weights[idx]))
        getattr(new_bank, name).copy_(torch.stack(merged))
    for name, p in new_bank.named_parameters(recurse=False):
        if name not in template.expert_param_names and name != "router_weight":
            p.copy_(getattr(layer.banks[keep_banks], name))
    origins = [ExpertOrigin(e, parents[e]) for e in range(kept)]
    origins += [ExpertOrigin(g[0] if len(g) == 1 else None,
                             parents[g[0]] if len({parents[e] for e in g}) == 1 else None) for g in groups]
    _replace_banks(layer, list(layer.banks[:keep_banks]) + [new_bank], origins)
    return origins


@torch.no_grad()
def remove_experts(layer: MoELayer, num_remove: int, usage: Tensor, keep_banks: int = 1) -> list[ExpertOrigin]:
    """Drop the `num_remove` least-used experts outside the first `keep_banks` banks."""
    kept = sum(b.num_experts for b in layer.banks[:keep_banks])
    removable = list(range(kept, layer.num_experts))
    if num_remove > len(removable) or layer.num_experts - num_remove < layer.top_k:
        raise ConfigError(
            f"cannot remove {num_remove} experts: {len(removable)} are removable and top_k={layer.top_k} must remain."
        )
    drop = set(sorted(removable, key=lambda e: float(usage[e]))[:num_remove])
    survivors = [e for e in removable if e not in drop]
    parents = parents_of(layer)
    origins = [ExpertOrigin(e, parents[e]) for e in range(kept)] + [ExpertOrigin(e, parents[e]) for e in survivors]
    if survivors:
        template = layer.banks[0]
        bank = layer.new_bank(len(survivors))
        bank.to(device=template.router_weight.device, dtype=template.router_weight.dtype)
        for name, p in bank.named_parameters(recurse=False):
            if name in template.expert_param_names or name == "router_weight":
                p.copy_(_expert_rows(layer, name)[torch.tensor(survivors)])
            else:
                p.copy_(getattr(layer.banks[keep_banks], name))
        banks = list(layer.banks[:keep_banks]) + [bank]
    else:
        banks = list(layer.banks[:keep_banks])
    _replace_banks(layer, banks, origins)
    return origins


def _replace_banks(layer: MoELayer, banks: list[ExpertBank], origins: list[ExpertOrigin]) -> None:
    layer.set_banks(banks)
    keep = torch.tensor([o.survivor_of if o.survivor_of is not None else 0 for o in origins])
    layer.router.resize(layer.num_experts, keep=keep)
    # merged experts start unmasked and with no selection bias of their own
    layer.router.reset_experts(torch.tensor([o.survivor_of is None for o in origins]))
    layer.expert_parents = [o.parent for o in origins]


# -- optimizer --------------------------------------------------------------------------------


def carry_optimizer_state(old_optimizer: torch.optim.Optimizer, new_optimizer: torch.optim.Optimizer,
                          row_sources: dict[int, list[tuple[torch.nn.Parameter, int] | None]] | None = None) -> None:
    """Move per-parameter state from `old_optimizer` to `new_optimizer`.

    A parameter present in both keeps its state. `row_sources` maps id(new parameter) to, for each of
    its rows (experts), the (old parameter, old row) it survives from, or None: surviving rows keep
    their moments, new rows start at zero. Parameters in neither case start fresh (empty state);
    parameters of the old optimizer that are gone leave nothing behind. Rows are whole experts: under
    expert parallelism call it with the moments gathered (modular.parallel.optimizer_state).
    """
    row_sources = row_sources or {}
    for group in new_optimizer.param_groups:
        for p in group["params"]:
            if p in old_optimizer.state:
                new_optimizer.state[p] = {k: (v.clone() if torch.is_tensor(v) else v)
                                          for k, v in old_optimizer.state[p].items()}
            elif id(p) in row_sources:
                sources = row_sources[id(p)]
                live = [(old_p, r) for old_p, r in (src for src in sources if src is not None)
                        if old_optimizer.state.get(old_p)]
                if not live:
                    continue
                template = old_optimizer.state[live[0][0]]
                state = {}
                for key, value in template.items():
                    if torch.is_tensor(value) and value.shape == live[0][0].shape:
                        rows = torch.zeros_like(p)
                        for r, src in enumerate(sources):
                            if src is not None and old_optimizer.state.get(src[0]):
                                rows[r] = old_optimizer.state[src[0]][key][src[1]]
                        state[key] = rows
                    else:  # the step count: bias correction follows the survivors'
                        state[key] = value.clone() if torch.is_tensor(value) else value
                new_optimizer.state[p] = state


# -- domains: domain-owned routes and trunk adapters ------------------------------------------


def register_domain(model: ModularLM, domain: str) -> int:
    """Make `domain` one the model routes by (idempotent); returns its domain id."""
    if domain not in model.domains:
        model.domains.append(domain)
    return model.domains.index(domain)


def set_domain_route(model: ModularLM, domain: str, banks_of: list[str] | None = None) -> None:
    """Domain-owned experts: rows of `domain` may use the anchor bank (bank 0) plus the banks added for
    `domain` and for the domains in `banks_of` (continual.domain_banks); nothing else.

    The bank added for a domain is the one that records it in `MoELayer.bank_domains`.
    """
    d = register_domain(model, domain)
    for layer in model.moe_layers:
        owners = layer.bank_domains
        if len(owners) < len(layer.banks):  # banks added before their owner was recorded: anchor / unknown
            owners.extend([None] * (len(layer.banks) - len(owners)))
        uses = {domain, *(banks_of or [])}
        start, allowed = 0, []
        for b, bank in enumerate(layer.banks):
            if b == 0 or owners[b] in uses:
                allowed.extend(range(start, start + bank.num_experts))
            start += bank.num_experts
        access = list(layer.domain_access or [])
        access.extend([list(range(layer.banks[0].num_experts))] * (d + 1 - len(access)))
        access[d] = allowed
        layer.set_domain_access(access)


@torch.no_grad()
def add_adapters(model: ModularLM, domain: str, targets: list[str], rank: int, alpha: float | None = None,
                 generator: torch.Generator | None = None) -> list[str]:
    """Give `domain` its own zero-initialised deltas on the trunk places `targets` name
    (models/adapters.py: q_proj, k_proj, v_proj, o_proj, dense_ffn, norms, embeddings, lm_head).

    Returns the qualified names of the new parameters.
    """
    from modular.models.adapters import ADAPTER_PLACES, DomainAdapters, make_delta

    alpha = float(alpha if alpha is not None else rank)
    register_domain(model, domain)
    places = [p for t in targets for p in ADAPTER_PLACES[t]]
    new = []
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype

    def attach(container, key: str, layer, prefix: str) -> None:
        delta = make_delta(model, layer, key, rank, alpha, generator).to(device=device, dtype=dtype)
        if key not in container:
            container[key] = DomainAdapters()
        container[key].add(domain, delta)
        new.extend(f"{prefix}.{key}.deltas.{domain}.{n}" for n, _ in delta.named_parameters())

    for i, layer in enumerate(model.layers):
        for place in places:
            if place in ("embed_tokens", "lm_head", "norm"):
                continue
            if place in ("gate_proj", "up_proj", "down_proj") and layer.is_moe:
                continue  # MoE layers get their domain's capacity from its own expert bank
            attach(layer.adapters, place, layer, f"layers.{i}.adapters")
    for place in places:
        if place in ("embed_tokens", "lm_head", "norm"):
            attach(model.adapters, place, None, "adapters")
    return new
