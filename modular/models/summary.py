"""What a composed model is: layers, experts per bank, total vs active parameters, FLOPs per token.

Active parameters are those one token touches: everything but the routed experts it was not sent to.
FLOPs per token follow Kaplan et al. (2020): 2 per active matmul parameter (the embedding lookup is
free, the output projection is not) plus 2·n_layers·seq_len·d_model for attention scores and values;
training costs about 3× the forward.
"""

from __future__ import annotations

from modular.models.decoder import ModularLM
from modular.models.moe import MoELayer


def experts_per_token(moe: MoELayer) -> float:
    """Average routed experts per token, as the router states it (k for token choice, c·k for expert choice)."""
    return type(moe.router).experts_per_token(moe.routing_cfg, moe.num_experts)


def parameter_count(module) -> int:
    """Parameters of `module`, every expert stack counted at all of its experts.

    Under expert parallelism a rank holds only a slice of each stack (modular.parallel), but a summary
    describes the whole model, the same on every rank and in one process.
    """
    stacks = {}
    for m in module.modules():
        for name in getattr(m, "expert_param_names", ()):
            p = getattr(m, name)
            stacks[id(p)] = p[0].numel() * m.num_experts
    return sum(stacks.get(id(p), p.numel()) for p in module.parameters())


def moe_layer_params(moe: MoELayer) -> tuple[int, float]:
    """(total, active) parameters of one MoE layer."""
    total = parameter_count(moe)
    routed_total = sum(bank.params_per_expert() * bank.num_experts for bank in moe.banks)
    mean_per_expert = routed_total / moe.num_experts
    active = total - routed_total + experts_per_token(moe) * mean_per_expert
    return total, active


def summarize(model: ModularLM, seq_len: int | None = None) -> dict:
    seq_len = seq_len or model.max_seq_len
    total = parameter_count(model)
    embedding = model.embed_tokens.num_rows * model.embed_tokens.dim
    tied = model.lm_head.tied
    layers = []
    active = total
    for i, layer in enumerate(model.layers):
        attn = sum(p.numel() for p in layer.self_attn.parameters())
        entry = {"index": i, "ffn": "moe" if layer.is_moe else "dense", "attention_params": attn}
        if layer.is_moe:
            moe = layer.mlp
            moe_total, moe_active = moe_layer_params(moe)
            active -= moe_total - moe_active
            entry.update(
                experts=moe.num_experts,
                banks=[{"experts": b.num_experts, "type": b.registry_name, "ffn_dim": b.ffn_dim} for b in moe.banks],
                router=moe.router.registry_name,
                top_k=moe.top_k,
                experts_per_token=experts_per_token(moe),
                shared_experts=moe.shared_experts.num_shared if moe.shared_experts is not None else 0,
                ffn_params=moe_total,
                ffn_active_params=round(moe_active),
            )
        else:
            entry.update(ffn_params=sum(p.numel() for p in layer.mlp.parameters()), ffn_dim=layer.mlp.ffn_dim)
        layers.append(entry)
    # Domain deltas: a token uses its own domain's only (the largest domain's set counts as active).
    per_domain: dict[str, int] = {}
    for name, p in model.named_parameters():
        if ".deltas." in name:
            domain = name.split(".deltas.", 1)[1].split(".", 1)[0]
            per_domain[domain] = per_domain.get(domain, 0) + p.numel()
    active -= sum(per_domain.values()) - max(per_domain.values(), default=0)
    # matmul parameters: all active ones except the embedding lookup and the norm scales, plus the
    # output projection, which is a matmul even when tied to the embedding.
    norms = sum(p.numel() for n, p in model.named_parameters() if n.endswith("layernorm.weight") or n == "norm.weight")
    active_matmul = active - norms - embedding + (embedding if tied else 0)
    n_layers = len(model.layers)
    flops = 2 * active_matmul + 2 * n_layers * seq_len * model.d_model
    return {
        "total_params": int(total),
        "active_params": round(active),
        "embedding_params": int(embedding),
        "tied_embeddings": bool(tied),
        "flops_per_token": round(flops),
        "train_flops_per_token": round(3 * flops),
        "seq_len": int(seq_len),
        "n_layers": n_layers,
        "moe_layers": [e["index"] for e in layers if "experts" in e],
        "layers": layers,
    }


def format_summary(summary: dict, cfg=None) -> str:
    def human(n: float) -> str:
        for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= scale:
                return f"{n / scale:.2f}{unit}"
        return str(int(n))

    lines = []
    if cfg is not None:
        m = cfg.model
        lines.append(
            f"model {m.name}: d_model={m.d_model} layers={m.n_layers} heads={m.n_heads} kv_heads={m.n_kv_heads} "
            f"vocab={m.vocab_size} rope_theta={m.rope_theta} tied_embeddings={m.tie_embeddings}"
        )
    lines.append(f"{'layer':>5}  {'ffn':<5}  {'experts (banks)':<18}  {'router':<14}  {'k':>4}  {'ffn params':>11}  {'active':>9}")
    for e in summary["layers"]:
        if "experts" in e:  # an MoE layer
            banks = "+".join(str(b["experts"]) for b in e["banks"])
            shared = f" +{e['shared_experts']}sh" if e["shared_experts"] else ""
            experts = f"{e['experts']} ({banks}){shared} {e['banks'][0]['type']}"
            lines.append(
                f"{e['index']:>5}  {'moe':<5}  {experts:<18}  {e['router']:<14}  {e['experts_per_token']:>4g}  "
                f"{human(e['ffn_params']):>11}  {human(e['ffn_active_params']):>9}"
            )
        else:
            lines.append(
                f"{e['index']:>5}  {'dense':<5}  {'-':<18}  {'-':<14}  {'-':>4}  {human(e['ffn_params']):>11}  "
                f"{human(e['ffn_params']):>9}"
            )
    lines.append(
        f"parameters: {human(summary['total_params'])} total, {human(summary['active_params'])} active per token "
        f"({summary['active_params'] / summary['total_params']:.1%}); embedding {human(summary['embedding_params'])}"
        f"{' (tied)' if summary['tied_embeddings'] else ''}"
    )
    lines.append(
        f"FLOPs per token: {human(summary['flops_per_token'])} forward, {human(summary['train_flops_per_token'])} "
        f"training (seq_len {summary['seq_len']})"
    )
    return "\n".join(lines)
