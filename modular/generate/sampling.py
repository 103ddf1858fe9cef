"""Sampling text from a ModularLM: greedy or temperature / top-k, reproducible by seed, under one route.

On a domain-routed run the route is forced (a domain name) or inferred from the prompt with the run's
continual.inference method (hard: the most likely domain, the anchor when none is likely enough; soft: the
routes' next-token distributions mixed by the posterior). Other runs use their plain forward. The model has no
key-value cache: each step runs the last max_seq_len tokens again (fine for the small models trained here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from modular.errors import ConfigError


@dataclass
class GenerationResult:
    prompt: str
    text: str  # the continuation alone (decoded new tokens)
    token_ids: list[int]  # the new tokens
    domain: str | None = None  # the route generated with (hard); None: plain forward or soft mixing
    route: str = "plain"  # plain | forced | inferred | anchor fallback | soft
    posterior: dict[str, float] | None = field(default=None)  # the prompt's domain posterior, when inferred
    weights: dict[str, float] | None = field(default=None)  # soft mixing: each route's weight

    def describe(self) -> str:
        """One line saying which route generated the text, and why."""
        if self.route == "plain":
            return "route: the model's plain forward (the run has no domain routes)"
        post = "" if self.posterior is None else \
            " (posterior " + ", ".join(f"{d} {p:.3f}" for d, p in self.posterior.items()) + ")"
        if self.route == "soft":
            return "route: the routes mixed by the posterior: " + ", ".join(f"{d} {w:.3f}" for d, w in self.weights.items())
        return f"route: {self.domain} ({self.route}){post}"


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    if not prompt:
        raise ConfigError('modular generate needs a prompt to continue; give prompt="some text" (or generate.prompt).')
    ids = tokenizer.encode(prompt)
    bos = getattr(tokenizer, "bos_id", None)
    return ([bos] if bos is not None else []) + list(ids)  # documents were trained as <bos> text <eos>


@torch.no_grad()
def choose_route(model, prompt_ids: Tensor, domain: str | None, inference_cfg) -> dict:
    """{"domain_id", "weights", "route", "posterior"} for a [1, P] prompt: forced, inferred or plain."""
    domains = list(getattr(model, "domains", []) or [])
    if not domains:
        if domain is not None:
            raise ConfigError(f"generate.domain={domain} was given, but this run has no domain routes (only "
                              "continual=isolate runs route by domain); leave generate.domain unset.")
        return {"domain_id": None, "weights": None, "route": "plain", "posterior": None}
    if domain is not None:
        if domain not in domains:
            raise ConfigError(f"generate.domain={domain} names a domain this run never saw; its domains are: "
                              f"{', '.join(domains)}.")
        return {"domain_id": domains.index(domain), "weights": None, "route": "forced", "posterior": None}
    from modular.continual.domain_inference import DomainRouter

    router = DomainRouter(model, inference_cfg)
    if inference_cfg.method == "likelihood" and prompt_ids.shape[1] < 2:  # nothing to score: the anchor's route
        return {"domain_id": 0, "weights": None, "route": "anchor fallback: prompt too short to score",
                "posterior": None}
    posterior_BK = router.posterior(prompt_ids)
    posterior = {d: float(p) for d, p in zip(domains, posterior_BK[0])}
    if inference_cfg.mode == "soft":
        weights_BK = router.route(prompt_ids)
        return {"domain_id": None, "weights": weights_BK, "route": "soft", "posterior": posterior}
    chosen = int(router.hard_route(posterior_BK)[0])
    likely = max(posterior.values()) >= inference_cfg.min_posterior
    how = f"inferred, {inference_cfg.method}" if likely else \
        f"anchor fallback: no domain reached min_posterior {inference_cfg.min_posterior}"
    return {"domain_id": chosen, "weights": None, "route": how, "posterior": posterior}


@torch.no_grad()
def decode_tokens(model, ids_BT: Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                  generator: torch.Generator | None = None, domain_id: int | None = None,
                  weights_BK: Tensor | None = None, eos_id: int | None = None) -> Tensor:
    """[B, T + n] the prompt and up to max_new_tokens new tokens (stopping after eos_id when all rows reach it).

    temperature 0: argmax; else softmax(logits / temperature), restricted to the top_k most likely (0: all),
    sampled with `generator` (on the CPU, so one seed gives one text on any device)."""
    from modular.train.evaluate import mixture_logprobs

    device = next(model.parameters()).device
    ids = ids_BT.to(device)
    B = ids.shape[0]
    route = None if domain_id is None else torch.full((B,), domain_id, dtype=torch.int64, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            window = ids[:, -model.max_seq_len:]
            if weights_BK is not None:
                scores = mixture_logprobs(model, window, weights_BK.to(device))[:, -1]  # [B, V] log-probabilities
            else:
                scores = model(window, **({"domain_ids": route} if route is not None else {})).logits[:, -1].float()
            if temperature == 0:
                next_B = scores.argmax(dim=-1)
            else:
                scores = scores / temperature
                if 0 < top_k < scores.shape[-1]:
                    kth = scores.topk(top_k, dim=-1).values[:, -1:]
                    scores = scores.masked_fill(scores < kth, float("-inf"))
                probs = torch.softmax(scores.double(), dim=-1).cpu()
                next_B = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
            if eos_id is not None:
                next_B = torch.where(done, torch.full_like(next_B, eos_id), next_B)
                done = done | (next_B == eos_id)
            ids = torch.cat([ids, next_B[:, None]], dim=1)
            if eos_id is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)
    return ids


def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             seed: int = 0, domain: str | None = None, inference_cfg=None) -> GenerationResult:
    """Continue `prompt` with `model` (a ModularLM) and `tokenizer` (modular.data.tokenizer).

    domain: force that route of a domain-routed model; None infers it from the prompt with `inference_cfg`
    (continual.inference; default: the config's defaults, the trained classifier)."""
    if inference_cfg is None:
        from omegaconf import OmegaConf

        from modular.continual.config import InferenceConfig

        inference_cfg = OmegaConf.structured(InferenceConfig)
    prompt_ids = _prompt_ids(tokenizer, prompt)
    ids = torch.tensor([prompt_ids], dtype=torch.int64)
    text_ids = ids[:, 1:] if getattr(tokenizer, "bos_id", None) is not None else ids
    route = choose_route(model, text_ids.to(next(model.parameters()).device), domain, inference_cfg)
    generator = torch.Generator().manual_seed(int(seed))
    out = decode_tokens(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                        domain_id=route["domain_id"], weights_BK=route["weights"], eos_id=tokenizer.eos_id)
    new = out[0, ids.shape[1]:].tolist()
    if new and new[-1] == tokenizer.eos_id:
        new = new[:-1]
    domains = list(getattr(model, "domains", []) or [])
    weights = None if route["weights"] is None else {d: float(w) for d, w in zip(domains, route["weights"][0])}
    return GenerationResult(prompt=prompt, text=tokenizer.decode(new), token_ids=new,
                            domain=None if route["domain_id"] is None else domains[route["domain_id"]],
                            route=route["route"], posterior=route["posterior"], weights=weights)


def generate_from_run(run_dir: str | Path, prompt: str, overrides: list[str] | None = None) -> GenerationResult:
    """generate() from the latest checkpoint of a run folder, with its tokenizer and its generate / continual
    .inference config (`overrides`: more key=value settings, e.g. generate.temperature=0.8)."""
    model, cfg, _, _ = load_for_generation([f"run.dir={run_dir}", *(overrides or [])])
    return _generate_with(model, cfg, prompt)


def load_for_generation(overrides: list[str]):
    """(model on its device, cfg, run folder, checkpoint) of the run the overrides name."""
    from modular.run.setup import load_run_model, resolve_device

    model, cfg, folder, checkpoint = load_run_model(overrides, "generate")
    return model.to(resolve_device(cfg.train.device)), cfg, folder, checkpoint


def _generate_with(model, cfg, prompt: str | None) -> GenerationResult:
    from modular.data.tokenizer import load_tokenizer

    g = cfg.generate
    return generate(model, load_tokenizer(cfg.data.tokenizer), prompt if prompt is not None else (g.prompt or ""),
                    max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k, seed=g.seed,
                    domain=g.domain, inference_cfg=cfg.continual.inference)


def generate_command(args: list[str]) -> int:
    """`modular generate run.dir=DIR prompt="..." [generate.max_new_tokens=N generate.temperature=T ...]`.

    The prompt (prompt= or generate.prompt=) is taken as written, never parsed as an override: free text may hold
    commas, quotes and brackets."""
    prompt, overrides = None, []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") in ("prompt", "generate.prompt"):
            prompt = value
        else:
            overrides.append(arg)
    if prompt is None:  # a generate.prompt from a config file or preset
        from modular.run.setup import compose_run, override_value

        prompt = compose_run(overrides)[0].generate.prompt if override_value(overrides, "run.dir") else None
    if not prompt:
        raise ConfigError('modular generate needs a prompt to continue; give prompt="some text" (or generate.prompt).')
    model, cfg, _, _ = load_for_generation(overrides)
    result = _generate_with(model, cfg, prompt)
    print(result.describe())
    print(result.prompt + result.text)
    return 0
