"""Training batches from a weighted mixture of domains, and per-domain validation windows.
Batch k depends only on (seed, rank, k), so a restored loader continues exactly where the saved one was.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from modular.data.config import DataConfig, as_data_config
from modular.data.shards import TokenShard, build_all_shards
from modular.data.tokenizer import Tokenizer
from modular.errors import CheckpointError, ConfigError, DataError

STATE_VERSION = 1


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T + 1) int64 windows
    domain_ids: torch.Tensor  # (B,) int64: row i came from domain_names[domain_ids[i]]
    domain_names: tuple[str, ...]

    @property
    def inputs(self) -> torch.Tensor:  # (B, T)
        return self.tokens[:, :-1]

    @property
    def targets(self) -> torch.Tensor:  # (B, T), inputs shifted left by one
        return self.tokens[:, 1:]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """On `device`; with non_blocking to a GPU the rows go through pinned memory, so the copy does not
        make the host wait."""
        tokens, domain_ids = self.tokens, self.domain_ids
        if non_blocking and torch.device(device).type == "cuda" and not tokens.is_cuda:
            tokens, domain_ids = tokens.pin_memory(), domain_ids.pin_memory()
        return Batch(tokens.to(device, non_blocking=non_blocking), domain_ids.to(device, non_blocking=non_blocking),
                     self.domain_names)


class MixtureLoader:
    """Endless batches: each row draws a domain with probability weight / sum(weights), then a uniform window.

    Windows cross document boundaries (documents are packed [bos] ids [eos]). `rank` gives each
    data-parallel process its own stream; state_dict() / load_state_dict() save and restore the position.
    With `num_shards` = W > 1 every step draws one global batch of W·batch_size rows and this loader
    yields rows [shard·batch_size, (shard+1)·batch_size) of it: the union over shards 0..W-1 is the
    batch a single loader with batch_size·W yields, and its state resumes at either world size.
    """

    def __init__(self, shards: Mapping[str, TokenShard], batch_size: int, seq_len: int, *,
                 weights: Mapping[str, float] | None = None, seed: int = 0, rank: int = 0,
                 shard: int = 0, num_shards: int = 1):
        _check_int("batch_size", batch_size, 1)
        _check_int("seq_len", seq_len, 1)
        _check_int("seed", seed, 0)
        _check_int("rank", rank, 0)
        _check_int("num_shards", num_shards, 1)
        _check_int("shard", shard, 0)
        if shard >= num_shards:
            raise ConfigError(f"shard={shard} is not allowed; use 0 <= shard < num_shards={num_shards}.")
        if not shards:
            raise ConfigError("the training mixture has no domains; give at least one shard.")
        weights = {d: 1.0 for d in shards} if weights is None else dict(weights)
        if set(weights) != set(shards):
            raise ConfigError(f"mixture weights name domains {sorted(weights)} but the shards are "
                              f"{sorted(shards)}; give one weight per domain.")
        for name, w in weights.items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
                raise ConfigError(f"mixture weight of domain {name!r} is {w!r}; use a number > 0.")
        self.domain_names = tuple(shards)
        self.weights = tuple(float(weights[d]) for d in self.domain_names)
        self.probabilities = np.array(self.weights) / sum(self.weights)
        self.batch_size, self.seq_len, self.seed, self.rank = batch_size, seq_len, seed, rank
        self.shard, self.num_shards = shard, num_shards
        self._tokens = [shards[d].tokens for d in self.domain_names]
        self._num_tokens = np.array([shards[d].num_tokens for d in self.domain_names], dtype=np.int64)
        for name, n in zip(self.domain_names, self._num_tokens):
            if n < seq_len + 1:
                raise DataError(f"domain {name!r} has {n} training tokens, fewer than "
                                f"seq_len+1={seq_len + 1}; use a shorter seq_len or more text.")
        self.step = 0

    @classmethod
    def from_config(cls, data_cfg: DataConfig, batch_size: int, seq_len: int, *,
                    weights: Mapping[str, float] | None = None, seed: int = 0, rank: int = 0,
                    progress: bool | None = None, tokenizer: Tokenizer | None = None,
                    shard: int = 0, num_shards: int = 1) -> MixtureLoader:
        """Build (or reuse) the train shards and mix them by `weights` (default: the config's weights).

        The keys of `weights` choose the domains, e.g. {"de": 0.8, "en": 0.2} for a stage with replay.
        """
        cfg = as_data_config(data_cfg)
        if weights is None:
            weights = {name: dom.weight for name, dom in cfg.domains.items()}
        shards = build_all_shards(cfg, "train", domains=list(weights), tokenizer=tokenizer, progress=progress)
        return cls(shards, batch_size, seq_len, weights=weights, seed=seed, rank=rank, shard=shard,
                   num_shards=num_shards)

    def batch_at(self, step: int) -> Batch:
        rng = np.random.default_rng([self.seed, self.rank, step])
        global_rows = self.batch_size * self.num_shards  # this loader keeps its shard's rows of them
        domain_ids = rng.choice(len(self.domain_names), size=global_rows, p=self.probabilities)  # (W·B,)
        starts = rng.integers(0, self._num_tokens[domain_ids] - self.seq_len)  # (W·B,): every window fits
        mine = slice(self.shard * self.batch_size, (self.shard + 1) * self.batch_size)
        domain_ids, starts = domain_ids[mine], starts[mine]  # (B,)
        rows = np.stack([self._tokens[d][s:s + self.seq_len + 1] for d, s in zip(domain_ids, starts)])
        return Batch(torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(domain_ids.astype(np.int64)),
                     self.domain_names)

    def __iter__(self) -> MixtureLoader:
        return self

    def __next__(self) -> Batch:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        """JSON-serialisable position plus the settings that decide the stream (checked on restore).

        batch_size is the global batch (rows over all shards), so a state resumes at another world size.
        """
        return {"version": STATE_VERSION, "step": self.step, "seed": self.seed, "rank": self.rank,
                "batch_size": self.batch_size * self.num_shards, "seq_len": self.seq_len, "domains": list(self.domain_names),
                "weights": list(self.weights), "num_tokens": [int(n) for n in self._num_tokens]}

    def load_state_dict(self, state: Mapping, strict: bool = True) -> None:
        """Continue from a saved position; strict=False restores only the step (the stream then differs)."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION or "step" not in state:
            raise CheckpointError(f"the data loader state is not a version-{STATE_VERSION} "
                                  "MixtureLoader state.")
        if strict:
            mine = self.state_dict()
            for key in ("seed", "rank", "batch_size", "seq_len", "domains", "weights", "num_tokens"):
                if state.get(key) != mine[key]:
                    raise CheckpointError(f"the run's data stream was saved with {key}={state.get(key)!r} but this one "
                                          f"has {key}={mine[key]!r}; resume with the settings it started with "
                                          f"({_SETTING[key]}).")
        self.step = int(state["step"])


# The command-line settings behind each field of a saved loader state (named in the message of a mismatch).
_SETTING = {"seed": "seed", "rank": "the same launch", "batch_size": "train.batch_size × the number of processes",
            "seq_len": "train.seq_len", "domains": "data.domains", "weights": "data.domains.<domain>.weight",
            "num_tokens": "the same data files and data.tokenizer"}


class ValidationSet:
    """A domain's val tokens as windows of seq_len + 1 at stride seq_len: each token is a target at most once.

    Iterating gives the same batches every time; the last batch may be smaller. bits per byte of a model:
    sum over all targets of the loss in nats / (ln 2 * num_bytes).
    """

    def __init__(self, shard: TokenShard, batch_size: int, seq_len: int, max_batches: int | None = None):
        _check_int("batch_size", batch_size, 1)
        _check_int("seq_len", seq_len, 1)
        if max_batches is not None:
            _check_int("max_batches", max_batches, 1)
        if shard.num_tokens < seq_len + 1:
            raise DataError(f"domain {shard.domain!r} has {shard.num_tokens} {shard.split} tokens, fewer "
                            f"than seq_len+1={seq_len + 1}; use a shorter seq_len or more validation text.")
        self.shard, self.batch_size, self.seq_len = shard, batch_size, seq_len
        self.num_windows = (shard.num_tokens - 1) // seq_len
        if max_batches is not None:
            self.num_windows = min(self.num_windows, max_batches * batch_size)

    @property
    def domain(self) -> str:
        return self.shard.domain

    @property
    def num_target_tokens(self) -> int:
        return self.num_windows * self.seq_len

    @property
    def num_bytes(self) -> float:
        """UTF-8 bytes the targets cover: exact when they cover the whole split, else pro rata."""
        return self.shard.num_bytes * self.num_target_tokens / (self.shard.num_tokens - 1)

    def __len__(self) -> int:
        return (self.num_windows + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        offsets = np.arange(self.seq_len + 1)
        for first in range(0, self.num_windows, self.batch_size):
            windows = np.arange(first, min(first + self.batch_size, self.num_windows))
            rows = np.asarray(self.shard.tokens[windows[:, None] * self.seq_len + offsets])  # (b, T + 1)
            yield Batch(torch.from_numpy(rows.astype(np.int64)), torch.zeros(len(windows), dtype=torch.int64),
                        (self.shard.domain,))


def validation_sets(data_cfg: DataConfig, batch_size: int, seq_len: int, *, max_batches: int | None = None,
                    domains: Sequence[str] | None = None, progress: bool | None = None,
                    tokenizer: Tokenizer | None = None) -> dict[str, ValidationSet]:
    """One ValidationSet per domain (all of data.domains unless `domains` is given)."""
    shards = build_all_shards(data_cfg, "val", domains=domains, tokenizer=tokenizer, progress=progress)
    return {d: ValidationSet(s, batch_size, seq_len, max_batches) for d, s in shards.items()}


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name}={value!r} is not allowed; use an integer >= {minimum}.")
