"""A cost model of expert parallelism: all-to-all bytes and time against expert-GEMM time (docs/scaling.md).

Per MoE layer and token, with top-k routing, model width D, expert width F, EP size P, b bytes per element:
  all-to-all  each of the k copies of a token's hidden vector leaves its rank with probability (P-1)/P
              (uniform routing), once to reach its expert (dispatch) and once back (combine):
              forward bytes sent = 2·k·D·b·(P-1)/P; backward sends the gradients the same way (×2 in training).
  expert GEMM SwiGLU: 3 matrices of D·F per expert, 2 FLOPs per multiply-add: forward 6·k·D·F FLOPs;
              training ≈ 3× forward (the backward computes two products per forward one).
Both grow with k·D, so their ratio does not depend on k, D or the batch:
  forward   comm / GEMM = [2·b·(P-1)/P / BW] / [6·F / R] = b·R·(P-1) / (3·F·BW·P)
  training  comm / GEMM = [4·b·(P-1)/P / BW] / [18·F / R] = 2·b·R·(P-1) / (9·F·BW·P)
with BW the all-to-all bandwidth per rank (bytes/s) and R the achieved GEMM rate (FLOP/s). A fixed
latency per collective (5 all-to-alls per layer and step in training: the counts exchange, dispatch and
combine forward, their gradients backward) adds to the communication time.
Run `python -m modular.parallel.cost_model` for the tables of docs/scaling.md.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


@dataclass(frozen=True)
class Hardware:
    """Achieved (not peak) rates of one rank."""

    name: str
    gemm_flops: float  # FLOP/s the grouped expert GEMMs reach
    bw_intra: float  # all-to-all bytes/s per rank inside a node
    bw_inter: float  # all-to-all bytes/s per rank for traffic leaving the node
    ranks_per_node: int
    latency: float = 0.0  # seconds per all-to-all call (launch + synchronisation)


# Assumptions, written down (see docs/scaling.md for where each number comes from):
H100_NODE = Hardware("8x H100 SXM, NVLink 4 + 8x400 Gb/s InfiniBand", gemm_flops=600e12, bw_intra=300e9,
                     bw_inter=40e9, ranks_per_node=8, latency=30e-6)


def a2a_bytes_per_token(d_model: int, top_k: int, ep: int, dtype: str = "bf16", training: bool = True) -> float:
    """Bytes one rank sends per token per MoE layer (it receives as many under balanced routing)."""
    if ep <= 1:
        return 0.0
    passes = 2 if training else 1
    return passes * 2 * top_k * d_model * DTYPE_BYTES[dtype] * (ep - 1) / ep


def expert_flops_per_token(d_model: int, ffn_dim: int, top_k: int, training: bool = True,
                           matrices: int = 3) -> float:
    """Expert-GEMM FLOPs per token per MoE layer (SwiGLU: 3 matrices; GELU MLP: 2)."""
    forward = 2 * matrices * top_k * d_model * ffn_dim
    return 3 * forward if training else forward


def effective_bandwidth(ep: int, hw: Hardware) -> float:
    """Per-rank all-to-all bandwidth when the EP group spans ceil(ep / ranks_per_node) nodes.

    Of a rank's (ep-1) destinations, min(ep, g)-1 are in its node; the rest cross the network, and the
    slower share decides: time = V·(intra share / bw_intra + inter share / bw_inter)."""
    if ep <= 1:
        return float("inf")
    inside = (min(ep, hw.ranks_per_node) - 1) / (ep - 1)
    return 1.0 / (inside / hw.bw_intra + (1.0 - inside) / hw.bw_inter)


@dataclass
class LayerTime:
    ep: int
    comm_s: float
    gemm_s: float

    @property
    def comm_fraction(self) -> float:
        return self.comm_s / (self.comm_s + self.gemm_s)


def layer_time(tokens_per_rank: int, d_model: int, ffn_dim: int, top_k: int, ep: int, hw: Hardware,
               dtype: str = "bf16", training: bool = True) -> LayerTime:
    """Seconds one MoE layer spends in all-to-all and in expert GEMMs per step, on one rank.

    Balanced routing: every rank computes tokens_per_rank·k expert rows whatever the EP size.
    """
    volume = tokens_per_rank * a2a_bytes_per_token(d_model, top_k, ep, dtype, training)
    calls = (5 if training else 3) if ep > 1 else 0  # the counts exchange, 2 all-to-alls forward, 2 backward
    comm = volume / effective_bandwidth(ep, hw) + calls * hw.latency
    gemm = tokens_per_rank * expert_flops_per_token(d_model, ffn_dim, top_k, training) / hw.gemm_flops
    return LayerTime(ep, comm, gemm)


def comm_over_gemm(ffn_dim: int, ep: int, hw: Hardware, dtype: str = "bf16", training: bool = True) -> float:
    """The batch-independent ratio (training 2·b·R·(P-1) / (9·F·BW·P), forward 3/2 of it), latency left out."""
    if ep <= 1:
        return 0.0
    forward = DTYPE_BYTES[dtype] * hw.gemm_flops * (ep - 1) / (3 * ffn_dim * effective_bandwidth(ep, hw) * ep)
    return forward * 2 / 3 if training else forward


def crossover_ep(tokens_per_rank: int, d_model: int, ffn_dim: int, top_k: int, hw: Hardware, dtype: str = "bf16",
                 sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256)) -> int | None:
    """The smallest EP size at which the all-to-all takes longer than the expert GEMMs (None: never)."""
    for ep in sizes:
        t = layer_time(tokens_per_rank, d_model, ffn_dim, top_k, ep, hw, dtype)
        if t.comm_s > t.gemm_s:
            return ep
    return None


MODELS = {  # (d_model, expert ffn_dim, top_k): shapes of published MoE models and of this repo's default
    "modular small (default)": (256, 256, 2),
    "Mixtral 8x7B": (4096, 14336, 2),
    "Qwen1.5-MoE-A2.7B": (2048, 1408, 4),
    "DeepSeek-V3": (7168, 2048, 8),
}


def tables(tokens_per_rank: int = 8192, hw: Hardware = H100_NODE, dtype: str = "bf16") -> str:
    sizes = (2, 4, 8, 16, 32, 64)
    lines = [f"{hw.name}; {tokens_per_rank} tokens per rank per step, {dtype}, training (fwd + bwd)", "",
             "| model (D, F, k) | bytes/token/layer at EP=8 | " + " | ".join(f"EP={p}" for p in sizes)
             + " | comm > GEMM from |",
             "|---|---|" + "---|" * len(sizes) + "---|"]
    for name, (d, f, k) in MODELS.items():
        cells = []
        for ep in sizes:
            t = layer_time(tokens_per_rank, d, f, k, ep, hw, dtype)
            cells.append(f"{100 * t.comm_fraction:.0f}%")
        cross = crossover_ep(tokens_per_rank, d, f, k, hw, dtype)
        lines.append(f"| {name} ({d}, {f}, {k}) | {a2a_bytes_per_token(d, k, 8, dtype):,.0f} | " + " | ".join(cells)
                     + f" | {'EP=' + str(cross) if cross else 'never (up to 256)'} |")
    lines.append("")
    lines.append("cells: share of the MoE layer's time spent in all-to-all (comm / (comm + expert GEMM)).")
    return "\n".join(lines)


if __name__ == "__main__":
    print(tables())
