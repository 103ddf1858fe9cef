"""A memory budget checked before anything is allocated: parameters, gradients and optimizer moments,
activations, and a tokenizer's training, estimated from the config and compared with the memory available.

The estimate is deliberately simple (fp32 everywhere, every saved activation counted once) so it errs on the
large side; it exists to refuse sizes that cannot fit with a sentence, instead of an allocator's traceback
or the OS killing the process minutes later. `train.check_memory=false` skips it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from modular.errors import ConfigError, ResourceError

FP32 = 4
TRAIN_BYTES_PER_PARAM = 4 * FP32  # weights, gradients, two Adam moments
TOKENIZER_BYTES_PER_TOKEN = 1024  # BPE training: vocabulary, merges and pair counts per token of the vocabulary
MAX_TOKENIZER_VOCAB = 2**31 - 1  # the tokenizers library stores ids as 32-bit integers
WHAT = {"train": "training run", "continual": "continual run", "build": "model"}


@dataclass
class Estimate:
    """Bytes of each part of a run's memory."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{name} {gib(b)}" for name, b in self.parts.items() if b)


def gib(n: float) -> str:
    """Bytes for a reader: MiB, GiB or TiB (in powers of ten beyond a million TiB)."""
    for unit, size in (("MiB", 2**20), ("GiB", 2**30)):
        if n < 1024 * size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 2**40:,.1f} TiB" if n < 2**60 else f"{n / 2**40:.2g} TiB"


def parameter_count(cfg, extra_experts_per_layer: int = 0, ep: int = 1) -> int:
    """Parameters of the model a config builds (routed experts divided over `ep` ranks), from its sizes alone."""
    from modular.models.config import experts_per_moe_layer, moe_layer_indices

    m, e = cfg.model, cfg.experts
    D, V, L = int(m.d_model), int(m.vocab_size), int(m.n_layers)
    head = D // max(1, int(m.n_heads))
    attention = 2 * D * D + 2 * D * int(m.n_kv_heads) * head + 2 * D  # q, o; k, v; two norms
    moe = moe_layer_indices(m) if L <= 100_000 else []  # a huge layer count is refused by the dense part anyway
    dense_layers = L - len(moe)
    total = V * D * (1 if m.tie_embeddings else 2) + D + L * attention + dense_layers * 3 * D * int(m.ffn_dim)
    from modular.experts import EXPERT_REGISTRY

    F = int(e.ffn_dim)
    per_expert, base = EXPERT_REGISTRY[e.type].parameter_counts(e, D)  # the expert type states its sizes
    shared = int(e.shared_experts) * 3 * D * int(e.shared_ffn_dim or F)
    for experts in (experts_per_moe_layer(cfg) if moe else []):
        experts += extra_experts_per_layer
        total += experts * D + -(-experts // ep) * per_expert + base + shared  # router rows, experts, the rest
    return total


def activation_bytes(cfg) -> int:
    """What one training micro-batch keeps for the backward pass."""
    m, t = cfg.model, cfg.train
    D, L, V = int(m.d_model), int(m.n_layers), int(m.vocab_size)
    N = int(t.batch_size) * int(t.seq_len)
    ffn = max(int(m.ffn_dim), int(cfg.routing.top_k) * int(cfg.experts.ffn_dim))
    per_layer = N * (16 * D + 3 * ffn) + N * int(m.n_heads) * int(t.seq_len)  # residual path, FFN, attention weights
    return FP32 * (L * per_layer + 3 * N * V)  # + logits, their softmax and gradient


def estimate(cfg, command: str, parallel=None) -> Estimate:
    """The memory `command` ("train", "continual" or "build": the model alone) needs in one process."""
    ep = int(parallel.ep) if parallel is not None else 1
    extra = 0
    if command == "continual":
        from modular.continual.strategies.base import strategy_class

        if strategy_class(cfg.continual.strategy).grows_experts():  # grown by the last stage
            extra = int(cfg.continual.add_experts) * max(0, len(cfg.continual.stream) - 1)
    params = parameter_count(cfg, extra, ep)
    if command == "build":
        return Estimate({"parameters": FP32 * params})
    return Estimate({"parameters": FP32 * params,
                     "gradients and optimizer moments": (TRAIN_BYTES_PER_PARAM - FP32) * params,
                     "activations": activation_bytes(cfg)})


def available_memory(device=None) -> int | None:
    """Bytes this process can still allocate: free memory of a CUDA device, else the host's available memory
    (within a container's limit). None where it cannot be told."""
    if device is not None and getattr(device, "type", device) == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:  # cgroup v2: the container's limit less what it uses
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def check_budget(cfg, command: str, parallel=None) -> None:
    """Refuse, with the estimate and the memory available, a run that cannot fit. Allocates nothing."""
    if not cfg.train.check_memory:
        return
    from modular.run.setup import resolve_device

    need = estimate(cfg, command, parallel)
    device = parallel.device if parallel is not None else resolve_device(cfg.train.device)
    places = [(None, FP32 * parameter_count(cfg, 0, 1), "host")]  # the model is built on the host first
    places.append((device, need.total, "device" if device.type == "cuda" else "host"))
    for where, bytes_needed, name in places:
        have = available_memory(where)
        if have is not None and bytes_needed > have:
            largest = max(need.parts, key=need.parts.get)
            keys = {"parameters": "model.d_model, model.n_layers, model.vocab_size, experts.num_experts, "
                                  "experts.ffn_dim",
                    "gradients and optimizer moments": "model.d_model, model.n_layers, experts.num_experts",
                    "activations": "train.batch_size, train.seq_len, model.d_model"}[largest]
            raise ResourceError(
                f"This {WHAT[command]} needs about {gib(bytes_needed)} of {name} memory "
                f"({need.describe()}) but {gib(have)} is available; lower {keys} (or set train.check_memory=false "
                "if the estimate is wrong)."
            )


def check_tokenizer_budget(vocab_size: int) -> None:
    """Refuse a BPE vocabulary the tokenizers library cannot hold, or whose training cannot fit in memory."""
    if vocab_size > MAX_TOKENIZER_VOCAB:
        raise ConfigError(f"tokenizer.vocab_size={vocab_size} is not allowed; the tokenizers library numbers tokens "
                          f"with 32-bit integers, so it must be <= {MAX_TOKENIZER_VOCAB}.")
    need, have = vocab_size * TOKENIZER_BYTES_PER_TOKEN, available_memory()
    if have is not None and need > have:
        raise ResourceError(f"Training a tokenizer of tokenizer.vocab_size={vocab_size} needs about {gib(need)} of "
                            f"memory but {gib(have)} is available; use a smaller vocabulary.")
