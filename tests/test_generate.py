"""Generation: greedy equals argmax decoding of our model (plain and under a domain's route), sampling is
reproducible by seed, the route is forced or inferred from the prompt, and `modular generate` works on plain
runs and refuses bad input in one sentence."""

import pytest
import torch

from helpers import tiny_cfg
from modular.cli import main
from modular.continual import lifecycle
from modular.data.tokenizer import ByteTokenizer
from modular.errors import ConfigError
from modular.generate import choose_route, generate
from modular.models import build_model
from modular.models.domain_classifier import DomainClassifier
from modular.train.evaluate import mixture_logprobs

TOKENIZER = ByteTokenizer()


def plain_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_cfg("experts.num_experts=4", "experts.ffn_dim=32")).eval()


def routed_model():
    """Two domains: en (the anchor) and de with a bank and attention deltas of its own (random, as if trained)."""
    model = plain_model()
    lifecycle.set_domain_route(model, "en")
    for layer in model.moe_layers:
        lifecycle.add_experts(layer, 2, init="random", router_init="random", domain="de",
                              generator=torch.Generator().manual_seed(1))
    lifecycle.set_domain_route(model, "de")
    lifecycle.add_adapters(model, "de", ["q_proj", "k_proj", "v_proj", "o_proj"], rank=4)
    with torch.no_grad():
        for j, (name, p) in enumerate(model.named_parameters()):
            if ".deltas.de." in name:
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(j))
    return model.eval()


@torch.no_grad()
def argmax_reference(model, prompt: str, n: int, domain_id=None) -> list[int]:
    """Greedy decoding written out: the most likely next token of the whole sequence so far, n times."""
    ids = [TOKENIZER.bos_id, *TOKENIZER.encode(prompt)]
    new = []
    for _ in range(n):
        x = torch.tensor([ids])
        kwargs = {} if domain_id is None else {"domain_ids": torch.tensor([domain_id])}
        token = int(model(x, **kwargs).logits[0, -1].argmax())
        if token == TOKENIZER.eos_id:
            break
        ids.append(token)
        new.append(token)
    return new


def test_greedy_equals_argmax_decoding_and_is_deterministic():
    model = plain_model()
    first = generate(model, TOKENIZER, "The cat sat", max_new_tokens=12)
    assert first.token_ids == argmax_reference(model, "The cat sat", 12)
    assert len(first.token_ids) > 0 and first.route == "plain" and first.domain is None
    assert generate(model, TOKENIZER, "The cat sat", max_new_tokens=12) == first
    assert first.text == TOKENIZER.decode(first.token_ids)


def test_sampling_is_reproducible_by_seed_and_top_1_is_greedy():
    model = plain_model()
    kwargs = {"max_new_tokens": 16, "temperature": 1.5}
    a = generate(model, TOKENIZER, "Hallo", seed=1, **kwargs)
    assert generate(model, TOKENIZER, "Hallo", seed=1, **kwargs) == a
    assert generate(model, TOKENIZER, "Hallo", seed=2, **kwargs).token_ids != a.token_ids
    greedy = generate(model, TOKENIZER, "Hallo", max_new_tokens=16)
    assert generate(model, TOKENIZER, "Hallo", seed=3, top_k=1, **kwargs).token_ids == greedy.token_ids


def test_a_forced_route_decodes_as_that_domain():
    model = routed_model()
    de = generate(model, TOKENIZER, "Der Hund", max_new_tokens=10, domain="de")
    assert de.domain == "de" and de.route == "forced"
    assert de.token_ids == argmax_reference(model, "Der Hund", 10, domain_id=1)
    en = generate(model, TOKENIZER, "Der Hund", max_new_tokens=10, domain="en")
    assert en.token_ids == argmax_reference(model, "Der Hund", 10, domain_id=0) != de.token_ids


def test_the_route_is_inferred_from_the_prompt_with_the_runs_method():
    from omegaconf import OmegaConf

    from modular.continual.config import InferenceConfig

    model = routed_model()
    inference = OmegaConf.structured(InferenceConfig)
    with pytest.raises(ConfigError, match="no trained domain classifier"):
        generate(model, TOKENIZER, "Der Hund", max_new_tokens=2, inference_cfg=inference)

    # a classifier that has learned: bytes below 'n' are en, from 'n' on are de
    model.domain_classifier = DomainClassifier(4096, 2)
    g = torch.Generator().manual_seed(0)

    def sample(step):
        en = torch.randint(97, 110, (16, 64), generator=g)
        de = torch.randint(110, 123, (16, 64), generator=g)
        return torch.cat([en, de]), torch.cat([torch.zeros(16), torch.ones(16)]).long()

    model.domain_classifier.fit(sample, steps=40, lr=0.05, generator=g)
    result = generate(model, TOKENIZER, "zuvor storz", max_new_tokens=6, inference_cfg=inference)
    assert result.domain == "de" and result.route.startswith("inferred") and result.posterior["de"] > 0.5
    assert result.token_ids == argmax_reference(model, "zuvor storz", 6, domain_id=1)
    assert "route: de (inferred, classifier) (posterior en " in result.describe()

    # nothing likely enough: the anchor's route
    unsure = OmegaConf.merge(inference, {"min_posterior": 1.0})
    assert generate(model, TOKENIZER, "zuvor", max_new_tokens=2, inference_cfg=unsure).domain == "en"

    # likelihood: p(prompt | route) under each route, no classifier involved
    likely = OmegaConf.merge(inference, {"method": "likelihood", "min_posterior": 0.0})
    ids = torch.tensor([TOKENIZER.encode("Der Hund bellt")])
    route = choose_route(model, ids, None, likely)
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(model(ids[:, :-1], domain_ids=torch.tensor([d])).logits[0], ids[0, 1:],
                                                 reduction="sum") for d in (0, 1)]
    assert route["domain_id"] == int(torch.stack(nll).argmin())

    # soft: the routes' next-token distributions mixed by the posterior
    soft = OmegaConf.merge(likely, {"mode": "soft"})
    mixed = generate(model, TOKENIZER, "Der Hund bellt", max_new_tokens=1, inference_cfg=soft)
    assert mixed.route == "soft" and sum(mixed.weights.values()) == pytest.approx(1.0)
    x = torch.tensor([[TOKENIZER.bos_id, *TOKENIZER.encode("Der Hund bellt")]])
    weights = torch.tensor([[mixed.weights["en"], mixed.weights["de"]]])
    with torch.no_grad():
        assert mixed.token_ids == [int(mixture_logprobs(model, x, weights)[0, -1].argmax())]


def test_bad_generation_input_is_one_sentence():
    model = routed_model()
    with pytest.raises(ConfigError, match="needs a prompt"):
        generate(model, TOKENIZER, "")
    with pytest.raises(ConfigError, match=r"generate.domain=fr names a domain this run never saw; its domains are: en, de"):
        generate(model, TOKENIZER, "x", domain="fr")
    with pytest.raises(ConfigError, match="this run has no domain routes"):
        generate(plain_model(), TOKENIZER, "x", domain="en")


def test_modular_generate_on_a_plain_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "model=tiny", "experts.num_experts=4", "experts.ffn_dim=32", "train.max_steps=2",
                 "train.batch_size=2", "train.seq_len=32", "train.eval_batches=1", "train.progress=false",
                 "train.threads=1", "data=sample_en", f"run.dir={run}"]) == 0
    capsys.readouterr()
    # the prompt is free text: commas, quotes and brackets never reach hydra's parser
    prompt = "Hello, world [it's] {x}"
    assert main(["generate", f"run.dir={run}", f"prompt={prompt}", "generate.max_new_tokens=5"]) == 0
    first = capsys.readouterr().out
    assert "plain forward" in first and prompt in first
    assert main(["generate", f"run.dir={run}", f"generate.prompt={prompt}", "generate.max_new_tokens=5"]) == 0
    assert capsys.readouterr().out == first  # greedy: the same text again

    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for args, fragment, code in [
        ([f"run.dir={run}"], "needs a prompt", 2),
        ([f"run.dir={run}", "prompt="], "needs a prompt", 2),
        ([f"run.dir={run}", "prompt=x", "generate.domain=en"], "no domain routes", 2),
        ([f"run.dir={run}", "prompt=x", "generate.temperature=-1"], "generate.temperature=-1", 2),
        ([f"run.dir={run}", "prompt=x", "generate.top_k=-2"], "generate.top_k=-2", 2),
        (["prompt=x"], "needs run.dir", 2),
    ]:
        assert main(["generate", *args]) == code, args
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err and err.count("\n") == 1, err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # generating writes nothing

    # a run folder with no checkpoint yet (modular info wrote it): one sentence, nothing written
    empty = tmp_path / "info-only"
    assert main(["info", "model=tiny", f"run.dir={empty}"]) == 0
    capsys.readouterr()
    assert main(["generate", f"run.dir={empty}", "prompt=x"]) == 1
    assert "has no checkpoint yet" in capsys.readouterr().err
