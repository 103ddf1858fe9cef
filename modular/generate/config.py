"""The `generate` config group: what `modular generate` samples (length, temperature, top-k, seed) and which
route a domain-routed run generates with. Checked by `validate_generate`.
"""

# OmegaConf 2.3 reads typing.Optional in structured configs but not `X | None`.
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from modular.errors import ConfigError


@dataclass
class GenerateConfig:
    prompt: Optional[str] = None  # the text to continue (the command line also takes prompt="...")
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 samples from softmax(logits / temperature)
    top_k: int = 0  # sample among the k most likely tokens only; 0 = all
    seed: int = 0  # the sampling generator's seed (same seed, same text)
    domain: Optional[str] = None  # force a domain's route; null = inferred from the prompt (continual.inference)


def validate_generate(cfg) -> None:
    g = cfg.generate
    if not (isinstance(g.max_new_tokens, int) and g.max_new_tokens >= 1):
        raise ConfigError(f"generate.max_new_tokens={g.max_new_tokens} is not allowed; it must be an integer >= 1.")
    if not g.temperature >= 0:
        raise ConfigError(f"generate.temperature={g.temperature} is not allowed; it must be >= 0 (0 = greedy).")
    if not (isinstance(g.top_k, int) and g.top_k >= 0):
        raise ConfigError(f"generate.top_k={g.top_k} is not allowed; it must be an integer >= 0 (0 = all tokens).")
