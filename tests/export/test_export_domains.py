"""Exporting a domain-routed model (continual=isolate): one domain's route reloaded by transformers equals our
model under that route (exactly where only deltas are merged; within the stated merge tolerance where its
experts are merged), the route as Mixtral is exact, the PEFT folders load with peft and equal the dense route,
every domain merged into one model follows task arithmetic / TIES, and MoE formats refuse the routed model."""

import json

import pytest
import torch
import torch.nn.functional as F
from export_helpers import build, hf_model, make_experts_identical

from modular.continual import lifecycle
from modular.errors import ConfigError
from modular.export.domains import (
    export_all_domains_dense,
    export_domain_dense,
    merge_domain_states,
    route_state_dict,
)
from modular.export.formats import export_format
from modular.export.moe import export_moe

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "dense_ffn", "norms", "embeddings", "lm_head"]


def grown(own_banks: bool, targets=ALL_TARGETS, domains=("en", "de"), identical: bool = False, spread: float = 0.0,
          moe_layers: str = "[1]"):
    """(model, cfg): by default layer 0 dense, layer 1 MoE; every domain after the first has random (trained-looking)
    deltas on `targets` and, with own_banks, a bank of 2 experts of its own.

    identical: every expert equal (then merging a route's experts is exact); spread: each expert then moved by
    relative Gaussian noise of that size (experts within ~spread of one another)."""
    model, cfg = build(f"model.moe_layers={moe_layers}")
    if identical:
        make_experts_identical(model)
    lifecycle.set_domain_route(model, domains[0])
    for k, d in enumerate(domains[1:]):
        if own_banks:
            for layer in model.moe_layers:
                lifecycle.add_experts(layer, 2, init="copy" if identical else "random", router_init="random",
                                      domain=d, generator=torch.Generator().manual_seed(10 + k))
        lifecycle.set_domain_route(model, d)
        lifecycle.add_adapters(model, d, list(targets), rank=4, generator=torch.Generator().manual_seed(20 + k))
        with torch.no_grad():
            for j, (name, p) in enumerate(model.named_parameters()):
                if f".deltas.{d}." in name:
                    p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(100 * k + j))
    if spread:
        with torch.no_grad():
            for layer in model.moe_layers:
                for bank in layer.banks:
                    for name in bank.expert_param_names:
                        w = getattr(bank, name)
                        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(3)) * spread * w.std())
    return model.eval(), cfg


def batches(n: int = 2, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 259, (4, 32), generator=g) for _ in range(n)]


def route_logits(model, ids, domain: str):
    return model(ids, domain_ids=torch.full((ids.shape[0],), model.domains.index(domain))).logits


X = torch.randint(0, 259, (3, 21), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_a_domain_whose_only_merge_is_its_deltas_exports_exactly(tmp_path):
    # every anchor expert equal: collapsing the route's experts is exact, so all that is tested is the deltas
    # (attention LoRA, dense-FFN LoRA, norm scales, embedding and head deltas), which must merge exactly
    model, cfg = grown(own_banks=False, identical=True)
    out = export_domain_dense(model, cfg, None, tmp_path / "de", "de", batches())
    hf = hf_model(out)
    ours = route_logits(model, X, "de")
    assert (ours - model(X).logits).abs().max() > 0.05  # the deltas matter
    # fp32 on the CPU: W + B·A summed once vs x·Wᵀ + (x·Aᵀ)·Bᵀ, ~1e-7 apart
    torch.testing.assert_close(hf(input_ids=X).logits, ours, rtol=1e-5, atol=1e-5)
    info = json.loads((out / "modular_export.json").read_text())
    assert info["kind"] == "domain-dense" and info["domain"] == "de" and info["deltas_exact"]
    assert set(info["deltas"]) >= {"q_proj", "gate_proj", "input_layernorm", "norm", "embed_tokens", "lm_head"}
    assert info["layers"]["1"]["merge_error"] < 1e-5
    # an embedding or head delta separates the two: the folder is untied (the anchor's route stays tied)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert route_state_dict(model, "en")[1] is True


@torch.no_grad()
def test_a_domain_with_its_own_bank_exports_within_the_stated_merge_tolerance(tmp_path):
    spread = 1e-2
    model, cfg = grown(own_banks=True, targets=["q_proj", "v_proj"], identical=True, spread=spread)
    calib = batches()
    out = export_domain_dense(model, cfg, None, tmp_path / "de", "de", calib)
    info = json.loads((out / "modular_export.json").read_text())["layers"]["1"]
    moe = model.moe_layers[0]
    allowed = moe.domain_access[1]
    assert info["experts_used"] == allowed == [0, 1, 2, 3, 4, 5]  # the anchor bank and de's own, no other

    # Reference, computed independently: the route's experts averaged by how often de's rows pick them
    # (float64), standing in for the MoE layer of our model under de's route.
    counts = torch.zeros(moe.num_experts, dtype=torch.float64)
    for ids in calib:
        route_logits(model, ids, "de")
        counts += moe.last_stats["tokens_per_expert"].double()
    freq = counts[allowed] / counts[allowed].sum()
    gate, up, down = ((w[allowed].double() * freq[:, None, None]).sum(0).float() for w in moe.stacked_swiglu_weights())
    assert info["weights"] == pytest.approx(freq.tolist(), abs=1e-6)
    handle = moe.register_forward_hook(lambda m, args, out: (F.silu(args[0] @ gate.t()) * (args[0] @ up.t())) @ down.t())
    try:
        merged_reference = route_logits(model, X, "de")
    finally:
        handle.remove()
    hf = hf_model(out)
    torch.testing.assert_close(hf(input_ids=X).logits, merged_reference, rtol=1e-5, atol=1e-5)

    # The stated tolerance: experts within relative `spread` of one another merge with a relative FFN output
    # error (recorded as merge_error) of at most 2·spread, and the logits move by at most that share of
    # their own size.
    ours = route_logits(model, X, "de")
    assert 0 < info["merge_error"] <= 2 * spread
    assert (hf(input_ids=X).logits - ours).abs().max() <= info["merge_error"] * ours.abs().max()


@torch.no_grad()
def test_a_domains_route_as_mixtral_is_exact(tmp_path):
    model, cfg = grown(own_banks=True, targets=["q_proj", "k_proj", "v_proj", "o_proj", "norms"],
                       domains=("en", "de", "fr"), moe_layers="all")  # Mixtral: every layer an MoE
    with pytest.raises(ConfigError, match="per-sequence domain routing"):
        export_format("mixtral").check(model, cfg)
    for d in ("en", "de", "fr"):
        out = export_moe(model, cfg, None, tmp_path / d, format="mixtral", domain=d)
        assert json.loads((out / "config.json").read_text())["num_local_experts"] == (4 if d == "en" else 6)
        torch.testing.assert_close(hf_model(out)(input_ids=X).logits, route_logits(model, X, d), rtol=1e-5, atol=1e-5)


def test_moe_formats_refuse_a_domain_routed_model_in_one_sentence():
    model, cfg = grown(own_banks=True, targets=["q_proj"])
    for name in ("mixtral", "qwen2-moe", "moe"):
        misfits = export_format(name).cannot_express(model, cfg)
        assert len(misfits) == 1 and misfits[0].startswith("per-sequence domain routing"), misfits


@torch.no_grad()
def test_peft_folders_load_with_peft_and_equal_each_domains_dense_route(tmp_path):
    pytest.importorskip("peft")
    from modular.export.peft_adapters import export_peft, load_peft_model

    model, cfg = grown(own_banks=True, domains=("en", "de", "fr"))
    calib = {d: batches(seed=i) for i, d in enumerate(model.domains)}
    out = export_peft(model, cfg, None, tmp_path / "peft", calib)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["base", "de", "fr"]
    for d in ("de", "fr"):
        dense = hf_model(export_domain_dense(model, cfg, None, tmp_path / f"dense-{d}", d, calib[d]))
        with_adapter = load_peft_model(out, d)
        expected = dense(input_ids=X).logits
        torch.testing.assert_close(with_adapter(input_ids=X).logits, expected, rtol=1e-5, atol=1e-5)
        # the HF convention's other use: merged into the base, still the same model
        merged = with_adapter.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=X).logits, expected, rtol=1e-5, atol=1e-5)
        record = json.loads((out / d / "modular_peft.json").read_text())
        assert "model.layers.0.self_attn.q_proj" in record["lora_targets"] and "model.embed_tokens" in record["lora_targets"]
        assert "model.layers.1.mlp" in record["modules_to_save"]  # the route's merged FFN (full rank)
    base = load_peft_model(out)
    anchor = hf_model(export_domain_dense(model, cfg, None, tmp_path / "dense-en", "en", calib["en"]))
    torch.testing.assert_close(base(input_ids=X).logits, anchor(input_ids=X).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_peft_adapters_of_delta_only_domains_equal_our_model_exactly(tmp_path):
    pytest.importorskip("peft")
    from modular.export.peft_adapters import export_peft, load_peft_model

    model, cfg = grown(own_banks=False, identical=True)
    out = export_peft(model, cfg, None, tmp_path / "peft", {d: batches() for d in model.domains})
    torch.testing.assert_close(load_peft_model(out, "de")(input_ids=X).logits, route_logits(model, X, "de"),
                               rtol=1e-5, atol=1e-5)


def test_domain_merges_follow_task_arithmetic_and_ties():
    g = torch.Generator().manual_seed(0)
    anchor = {"w": torch.randn(4, 3, generator=g)}
    states = {"en": anchor, "de": {"w": torch.randn(4, 3, generator=g)}, "fr": {"w": torch.randn(4, 3, generator=g)}}
    tau = [states[d]["w"].double() - anchor["w"].double() for d in ("de", "fr")]
    ta = merge_domain_states(states, "en", "task_arithmetic", scale=0.7)["w"]
    torch.testing.assert_close(ta.double(), anchor["w"].double() + 0.7 * (tau[0] + tau[1]), rtol=1e-6, atol=1e-6)
    # TIES, density 1: per entry the sign with more total mass wins, and the agreeing deltas are averaged
    stack = torch.stack(tau)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0).double()
    agree = (torch.sign(stack) == sign).double()
    mean = (stack * agree).sum(0) / agree.sum(0).clamp_min(1)
    ties = merge_domain_states(states, "en", "ties", scale=1.0, density=1.0)["w"]
    torch.testing.assert_close(ties.double(), anchor["w"].double() + mean, rtol=1e-6, atol=1e-6)
    assert torch.equal(merge_domain_states({"en": anchor}, "en")["w"], anchor["w"])  # only the anchor: itself


@torch.no_grad()
def test_every_domain_merged_loads_and_an_anchor_only_model_exports_its_route(tmp_path):
    model, cfg = grown(own_banks=True, domains=("en", "de", "fr"))
    calib = {d: batches(seed=i) for i, d in enumerate(model.domains)}
    out = export_all_domains_dense(model, cfg, None, tmp_path / "all", calib)
    info = json.loads((out / "modular_export.json").read_text())
    assert info["kind"] == "domains-merged-dense" and info["domain_merge"] == "ties"
    assert set(info["routes"]) == {"en", "de", "fr"}
    assert torch.isfinite(hf_model(out)(input_ids=X).logits).all()
    with pytest.raises(ConfigError, match="no validation data"):
        export_all_domains_dense(model, cfg, None, tmp_path / "missing", {"en": calib["en"]})
    assert not (tmp_path / "missing").exists()
    # a stage-0 isolate model (the anchor alone, no deltas): the all-domain export is its anchor route
    anchor_only, cfg0 = build("model.moe_layers=[1]")
    make_experts_identical(anchor_only)
    lifecycle.set_domain_route(anchor_only, "en")
    out0 = export_all_domains_dense(anchor_only, cfg0, None, tmp_path / "anchor", {"en": batches()})
    torch.testing.assert_close(hf_model(out0)(input_ids=X).logits, anchor_only(X).logits, rtol=1e-5, atol=1e-5)


def test_bad_domains_are_one_sentence(tmp_path):
    model, cfg = grown(own_banks=False, targets=["q_proj"])
    with pytest.raises(ConfigError, match=r"export.domain=xx names a domain this run never saw; its domains are: en, de"):
        export_domain_dense(model, cfg, None, tmp_path / "xx", "xx", batches())
    plain, cfg_plain = build()
    with pytest.raises(ConfigError, match="this run has no domain routes"):
        export_domain_dense(plain, cfg_plain, None, tmp_path / "p", "en", batches())
    assert list(tmp_path.iterdir()) == []
