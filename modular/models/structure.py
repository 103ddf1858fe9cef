"""A model's structure (banks per MoE layer, vocabulary blocks), saved with checkpoints and re-applied on load.

The config describes the model as composed; continual runs grow, merge and shrink banks and grow the
vocabulary, so a checkpoint records the banks and row blocks it holds and loading rebuilds exactly those
before reading weights.
"""

from __future__ import annotations

from modular.errors import CheckpointError
from modular.experts import EXPERT_REGISTRY
from modular.models.decoder import ModularLM
from modular.models.embedding import apply_vocab_structure, vocab_structure


def model_structure(model: ModularLM) -> dict:
    """{layer index: [{"type", "experts"} per bank]} plus, under "parents", each expert's parent (or None),
    and, for domain-owned routing, "domains", the owner of each bank, each domain's experts and the
    domain adapters."""
    from modular.models.adapters import adapter_structure

    moe = [(i, layer.mlp) for i, layer in enumerate(model.layers) if layer.is_moe]
    structure = {str(i): [{"type": b.registry_name, "experts": b.num_experts} for b in layer.banks] for i, layer in moe}
    structure["parents"] = {str(i): layer.expert_parents for i, layer in moe}
    vocab = vocab_structure(model)
    if len(vocab) > 1:
        structure["vocab"] = vocab
    if model.domains:
        structure["domains"] = {
            "names": list(model.domains),
            "bank_domains": {str(i): list(layer.bank_domains) for i, layer in moe},
            "access": {str(i): layer.domain_access for i, layer in moe if layer.domain_access is not None},
            "adapters": adapter_structure(model),
        }
        if model.domain_classifier is not None:
            structure["domains"]["classifier"] = {"buckets": model.domain_classifier.buckets,
                                                  "classes": model.domain_classifier.num_domains}
    return structure


def apply_structure(model: ModularLM, structure: dict) -> None:
    """Replace each MoE layer's banks with fresh ones of the recorded types and sizes, and the vocabulary's row
    blocks with the recorded ones (weights loaded after)."""
    moe = {str(i): layer.mlp for i, layer in enumerate(model.layers) if layer.is_moe}
    structure = dict(structure)
    parents = structure.pop("parents", {})
    domains = structure.pop("domains", None)
    apply_vocab_structure(model, structure.pop("vocab", None))
    if set(structure) != set(moe):
        raise CheckpointError(
            f"The checkpoint has MoE layers {sorted(structure, key=int)} but the model has {sorted(moe, key=int)}; "
            "it belongs to another model."
        )
    for key, banks in structure.items():
        layer = moe[key]
        if [(b.registry_name, b.num_experts) for b in layer.banks] == [(b["type"], b["experts"]) for b in banks]:
            continue
        cfg = layer.experts_cfg
        new_banks = []
        for b in banks:
            if b["type"] not in EXPERT_REGISTRY:
                raise CheckpointError(f"The checkpoint uses expert type '{b['type']}', which is not registered here.")
            new_banks.append(EXPERT_REGISTRY[b["type"]].from_config(layer.d_model, b["experts"], cfg, layer.init_std))
        layer.set_banks(new_banks)
        layer.router.resize(layer.num_experts)
        layer.expert_parents = [None] * layer.num_experts
    for key, layer_parents in parents.items():
        if key in moe and len(layer_parents) == moe[key].num_experts:
            moe[key].expert_parents = list(layer_parents)
    if domains is not None:
        from modular.models.adapters import rebuild_adapters

        model.domains[:] = list(domains["names"])
        for key, layer in moe.items():
            layer.bank_domains = list(domains["bank_domains"].get(key, [None] * len(layer.banks)))
            layer.set_domain_access(domains["access"].get(key))
        rebuild_adapters(model, domains["adapters"])
        if "classifier" in domains:
            from modular.models.domain_classifier import DomainClassifier

            c = domains["classifier"]
            model.domain_classifier = DomainClassifier(c["buckets"], c["classes"]).to(model.embed_tokens.weight.device)
