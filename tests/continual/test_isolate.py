"""Domain-owned experts and trunk adapters (continual=isolate): earlier domains bitwise unchanged under oracle
routing, rows never reach another domain's bank, zero-initialised deltas keep the function, the domain
classifier separates domains, bad input is one sentence, and a stopped stream resumes exactly."""

import copy
import json
import signal

import pytest
import torch

from helpers import tiny_cfg
from modular.cli import main
from modular.continual import lifecycle
from modular.models import build_model
from modular.models.domain_classifier import DomainClassifier

SMALL = ["model=tiny", "experts.num_experts=4", "experts.ffn_dim=32", "continual.steps_per_stage=4",
         "train.batch_size=2", "train.seq_len=32", "train.eval_batches=1", "train.progress=false",
         "continual.usage_batches=1", "continual.stage_warmup_steps=1", "continual.plots=false",
         "continual=isolate", "continual.inference.steps=30", "continual.adapter_rank=4", "train.threads=1"]


def grown_model(domains=("en", "de", "fr"), targets=("q_proj", "k_proj", "v_proj", "o_proj", "norms", "lm_head",
                                                      "embeddings")):
    """A tiny MoE model after growing a bank and deltas for each domain after the first, all trained to random."""
    cfg = tiny_cfg("experts.num_experts=4", "experts.ffn_dim=32", "model.moe_layers=[1]")
    torch.manual_seed(0)
    model = build_model(cfg)
    lifecycle.set_domain_route(model, domains[0])
    for d in domains[1:]:
        for layer in model.moe_layers:
            lifecycle.add_experts(layer, 2, init="random", router_init="random", domain=d,
                                  generator=torch.Generator().manual_seed(1))
        lifecycle.set_domain_route(model, d)
        lifecycle.add_adapters(model, d, list(targets), rank=4)
        with torch.no_grad():  # trained deltas: nothing is zero any more
            for name, p in model.named_parameters():
                if f".deltas.{d}." in name:
                    p.normal_(0.0, 0.05)
    return cfg, model.eval()


def test_a_row_never_reaches_a_bank_its_domain_may_not_use():
    _, model = grown_model()
    x = torch.randint(0, 259, (6, 16))
    domains = torch.tensor([0, 1, 2, 1, 0, 2])
    model(x, domain_ids=domains)
    layer = model.moe_layers[0]
    for d in range(3):
        model(x[domains == d], domain_ids=domains[domains == d])
        counts = layer.last_stats["tokens_per_expert"]
        allowed = set(layer.domain_access[d])
        assert allowed == set(range(4)) | ({4, 5} if d == 1 else {6, 7} if d == 2 else set())
        assert all(int(c) == 0 for e, c in enumerate(counts) if e not in allowed), (d, counts)
        assert int(counts.sum()) == 2 * int((domains == d).sum()) * 16  # top-2 of every token


def test_mixed_batches_route_each_row_as_its_own_domain():
    _, model = grown_model()
    x = torch.randint(0, 259, (6, 16))
    domains = torch.tensor([0, 1, 2, 1, 0, 2])
    mixed = model(x, domain_ids=domains).logits
    for d in range(3):
        alone = model(x[domains == d], domain_ids=domains[domains == d]).logits
        torch.testing.assert_close(mixed[domains == d], alone, rtol=1e-5, atol=1e-5)


def test_earlier_domains_are_bitwise_unchanged_by_a_later_stage():
    _, model = grown_model(domains=("en", "de"))
    x = torch.randint(0, 259, (3, 24))
    with torch.no_grad():
        before = {d: model(x, domain_ids=torch.full((3,), d)).logits.clone() for d in range(2)}
    later = copy.deepcopy(model)
    for layer in later.moe_layers:
        lifecycle.add_experts(layer, 2, init="random", router_init="random", domain="fr",
                              generator=torch.Generator().manual_seed(2))
    lifecycle.set_domain_route(later, "fr")
    lifecycle.add_adapters(later, "fr", ["q_proj", "k_proj", "v_proj", "o_proj", "norms", "lm_head", "embeddings"], 4)
    lifecycle.freeze(later, ["old_experts", "old_router", "attention", "embeddings", "norms", "dense_ffn",
                             "old_adapters"], {i: 2 for i, layer in enumerate(later.layers) if layer.is_moe},
                     current_domain="fr")
    later.train()
    optimizer = torch.optim.AdamW([p for p in later.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):  # train the new domain hard: nothing an earlier domain computes with may move
        out = later(x, x, domain_ids=torch.full((3,), 2))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    later.eval()
    for d in range(2):
        assert torch.equal(later(x, domain_ids=torch.full((3,), d)).logits, before[d]), d
    assert not torch.equal(later(x, domain_ids=torch.full((3,), 2)).logits, before[1])


def test_zero_initialised_deltas_leave_the_function_unchanged():
    cfg = tiny_cfg("experts.num_experts=4", "experts.ffn_dim=32", "model.moe_layers=[1]")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    lifecycle.set_domain_route(model, "en")
    x = torch.randint(0, 259, (2, 20))
    base = model(x, domain_ids=torch.zeros(2, dtype=torch.int64)).logits
    lifecycle.add_adapters(model, "de", ["q_proj", "k_proj", "v_proj", "o_proj", "dense_ffn", "norms", "lm_head",
                                         "embeddings"], rank=4)
    lifecycle.set_domain_route(model, "de")  # no bank of its own yet: the anchor's experts
    with_deltas = model(x, domain_ids=torch.ones(2, dtype=torch.int64)).logits
    torch.testing.assert_close(with_deltas, base, rtol=0, atol=0)


def test_the_classifier_separates_two_clearly_different_domains():
    g = torch.Generator().manual_seed(0)

    def text(domain: int, n: int, length: int) -> torch.Tensor:
        # two synthetic "languages": letters a-m vs letters n-z with spaces, as byte ids
        low, high = (97, 110) if domain == 0 else (110, 123)
        ids = torch.randint(low, high, (n, length), generator=g)
        ids[torch.rand(n, length, generator=g) < 0.15] = 32
        return ids

    clf = DomainClassifier(4096, 2)

    def sample(step):
        return torch.cat([text(0, 32, 256), text(1, 32, 256)]), torch.cat([torch.zeros(32), torch.ones(32)]).long()

    clf.fit(sample, steps=60, lr=0.05, generator=g)
    for d in (0, 1):
        predictions = clf(text(d, 200, 64)).argmax(1)
        assert float((predictions == d).double().mean()) > 0.99


BAD = [
    (["continual.add_experts=0"], "continual.add_experts=0"),
    (["continual.adapter_targets=[q_proj,wormhole]"], "'wormhole'"),
    (["continual.adapter_rank=1000"], "adapter_rank=1000"),
    (["+continual.domain_banks.de=[fr]"], "'fr'"),
    (["routing.bias_balancing=true"], "bias_balancing"),
    (["routing=expert_choice"], "token-choice router"),
]


@pytest.mark.parametrize("overrides,fragment", BAD, ids=[b[1] for b in BAD])
def test_bad_isolate_input_is_one_sentence(overrides, fragment, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["continual", *SMALL, *overrides, f"run.dir={run}"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1
    assert not (run / "checkpoints").exists()


def test_isolate_end_to_end_keeps_earlier_domains_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    assert main(["continual", *SMALL, f"run.dir={reference}"]) == 0
    report = json.loads((reference / "report.json").read_text())
    matrix, oracle = report["matrix_oracle"], report["matrix_oracle"]
    for j in range(2):  # under oracle routing an earlier domain's perplexity never moves after its stage
        assert all(row[j] == oracle[j][j] for row in oracle[j:]), j
    assert len(report["matrix"]) == 3 and "domain_accuracy" in report and "leak" in report
    assert set(report["domain_accuracy"][-1]) == {"en", "de", "code_py"}
    assert report["active_params_ratio"] <= 1.1  # a token uses one domain's deltas and top-k experts
    assert matrix  # the inferred matrix is the report's matrix
    capsys.readouterr()
    assert main(["eval", f"run.dir={reference}"]) == 0  # modular eval shows both routings of a domain-routed run
    out = capsys.readouterr().out
    assert "routed by the inferred domain (classifier, 64-token prefix, hard)" in out and "(oracle)" in out

    # stop in stage 1 after its first step, then resume: the same report
    stopped = tmp_path / "stopped"
    from modular.train.trainer import Trainer

    real_fit = Trainer.fit

    def fit_and_stop(self, *args, **kwargs):
        if self.log_prefix.get("stage") == 1 and not getattr(fit_and_stop, "done", False):
            fit_and_stop.done = True
            self.loss_hooks.append(lambda batch, out: signal.raise_signal(signal.SIGINT) or 0.0)
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit_and_stop)
    assert main(["continual", *SMALL, f"run.dir={stopped}"]) == 130
    monkeypatch.setattr(Trainer, "fit", real_fit)
    assert main(["continual", f"run.dir={stopped}"]) == 0
    resumed = json.loads((stopped / "report.json").read_text())
    assert resumed["matrix"] == report["matrix"] and resumed["matrix_oracle"] == report["matrix_oracle"]
    assert resumed["domain_accuracy"] == report["domain_accuracy"]
