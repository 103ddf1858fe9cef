"""One MoE layer's forward + backward on the CPU: ours against a dense roofline and Hugging Face Mixtral.

For each shape, every candidate runs in this process on the same input and the same upstream
gradient, interleaved in rounds so that machine noise hits all alike; times are the best round
(and the median), ratios are taken between best rounds.

  dense roofline   the same FLOPs as one SwiGLU FFN (modular.models.ffn) over T·k tokens
  ours             modular.models.moe.MoELayer, kernels.backend=torch (router, dispatch, experts, combine;
                   the layer also computes its aux losses and routing statistics, which HF's block does not)
  ours, per bank   the same layer forced onto the generic path (gather, bank forward on grouped_mm, combine)
  HF <impl>        transformers' MixtralSparseMoeBlock with the same weights, config._experts_implementation
                   = eager | grouped_mm | batched_mm (batched_mm gathers a copy of the weights per assignment;
                   skipped when that and its gradient would not fit in half the available memory)

Peak memory: torch.profiler with profile_memory=True records every allocation and free of torch's
CPU allocator; the peak of their running sum over one forward + backward (parameter gradients set
to None before) is the memory the step itself needed: activations, temporaries and gradients.
(tracemalloc cannot see torch's allocations; RSS includes whatever malloc keeps cached.)

With --kernels, also one grouped matmul alone (forward + backward) per implementation: per-expert
loop over unsorted rows (HF eager's way), and on rows sorted by expert: a Python loop over segments,
padded bmm, and torch._grouped_mm (our GroupedMM), against one dense matmul of the same FLOPs.

Run it on a quiet machine: when other processes share the cores, every per-expert implementation
(ours, HF eager, HF grouped_mm) slows down far more than the dense chain, because each of its many
short parallel regions waits for a descheduled thread (seen here: 10-50x against 2x).

    python benchmarks/moe_layer.py [--rounds 20] [--threads 2] [--shapes mixtral fine] [--kernels] [--per-round]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from contextlib import contextmanager

import torch

SHAPES = {  # E experts, k per token, d model, ffn per expert, T tokens
    "mixtral": {"E": 8, "k": 2, "d": 512, "ffn": 1024, "T": 4096},
    "fine": {"E": 64, "k": 8, "d": 512, "ffn": 128, "T": 4096},
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def build_ours(s, generic_path: bool = False):
    from modular.config import compose_config
    from modular.models.moe import MoELayer

    cfg = compose_config(["experts=swiglu", f"experts.num_experts={s['E']}", f"experts.ffn_dim={s['ffn']}",
                          "routing=topk", f"routing.top_k={s['k']}"])
    torch.manual_seed(0)
    layer = MoELayer(s["d"], s["E"], cfg.experts, cfg.routing, init_std=0.02, backend="torch")
    if generic_path:
        layer.fused_swiglu = False
    return layer


def build_hf(ours, s, impl: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=s["d"], intermediate_size=s["ffn"], num_local_experts=s["E"],
                           num_experts_per_tok=s["k"], router_jitter_noise=0.0)
    config._experts_implementation = impl
    block = MixtralSparseMoeBlock(config)
    bank = ours.banks[0]
    with torch.no_grad():
        block.gate.weight.copy_(bank.router_weight)
        block.experts.gate_up_proj.copy_(torch.cat([bank.w_gate, bank.w_up], dim=1))  # [E, 2F, D]
        block.experts.down_proj.copy_(bank.w_down)  # [E, D, F]
    return block


def build_dense(s):
    from modular.models.ffn import SwiGLUFFN

    torch.manual_seed(1)
    ffn = SwiGLUFFN(s["d"], s["ffn"])
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return ffn


def make_step(module, x, upstream, reshape=None):
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        xi = x.detach().requires_grad_(True)
        y = module(xi if reshape is None else xi.view(reshape))
        y.backward(upstream.view(y.shape))
        return y

    return step


@contextmanager
def quiet_stderr():
    """The profiler's kineto backend prints start/stop lines on the C-level stderr; hide them."""
    fd = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


def time_in_rounds(candidates: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of every call of every candidate: one warm-up call each (allocator, first-call overheads),
    then `rounds` rounds that call each candidate once, so machine noise hits them all alike."""
    for step in candidates.values():
        step()
    seconds = {n: [] for n in candidates}
    for _ in range(rounds):
        for n, step in candidates.items():
            start = time.perf_counter()
            step()
            seconds[n].append(time.perf_counter() - start)
    return seconds


def peak_bytes(step) -> int:
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def run_shape(name: str, s: dict, rounds: int, per_round: bool = False) -> None:
    T, k, d, E, ffn = s["T"], s["k"], s["d"], s["E"], s["ffn"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, d, generator=g)
    upstream = torch.randn(T, d, generator=g)
    x_dense = torch.randn(T * k, d, generator=g)
    up_dense = torch.randn(T * k, d, generator=g)

    ours = build_ours(s)
    candidates = {"dense roofline": make_step(build_dense(s), x_dense, up_dense),
                  "ours": make_step(ours, x, upstream),
                  "ours, per bank": make_step(build_ours(s, generic_path=True), x, upstream)}
    skipped = {}
    for impl in ("eager", "grouped_mm", "batched_mm"):
        # batched_mm gathers every assignment's weights: [T·k, 2F, D] + [T·k, D, F], and as much again
        # for their gradients. Never start it when that cannot fit: the machine is shared.
        need = 2 * T * k * 3 * ffn * d * 4
        if impl == "batched_mm" and need > 0.5 * available_bytes():
            skipped[f"HF {impl}"] = (f"would need ~{need / 2**30:.0f} GiB for gathered weights and their gradients, "
                                     f"{available_bytes() / 2**30:.0f} GiB available")
            continue
        candidates[f"HF {impl}"] = make_step(build_hf(ours, s, impl), x, upstream, reshape=(1, T, d))

    # Same weights, same input: our layer and HF's block compute the same function.
    y_ours = candidates["ours"]()
    for hf in [n for n in candidates if n.startswith("HF")]:
        diff = (candidates[hf]().reshape(T, d) - y_ours).abs().max().item()
        assert diff < 1e-4, f"{hf} differs from ours by {diff}"
    del y_ours  # timed steps start with no earlier output alive (holding one slowed ours 15-20% in some runs)

    seconds = time_in_rounds(candidates, rounds)
    peaks = {n: peak_bytes(step) for n, step in candidates.items()}
    if per_round:
        for n, v in seconds.items():
            print(f"{n}, ms per round: " + " ".join(f"{t * 1e3:.0f}" for t in v))

    flops = 3 * 3 * 2 * T * k * d * ffn  # 3 matmuls, forward + 2 backward, 2 FLOPs per multiply-add
    best = {n: min(v) for n, v in seconds.items()}
    roof = best["dense roofline"]
    hf_ref = {n: best[n] for n in ("HF grouped_mm", "HF eager") if n in best}
    print(f"\n### {name}: E={E}, k={k}, d={d}, ffn={ffn}, T={T}, fp32 — forward + backward, "
          f"{flops / 1e9:.1f} GFLOP of expert matmuls")
    cols = ["best ms", "median ms", "GFLOP/s", "× roofline"] + [f"ours ÷ {n}" for n in hf_ref] + ["peak MiB"]
    print("| candidate | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for n in candidates:
        cells = [f"{best[n] * 1e3:.0f}", f"{statistics.median(seconds[n]) * 1e3:.0f}", f"{flops / best[n] / 1e9:.0f}",
                 f"{roof / best[n]:.2f}"]
        cells += [f"{ref / best[n]:.2f}" if n == "ours" else "" for ref in hf_ref.values()]
        cells.append(f"{peaks[n] / 2**20:.0f}")
        print(f"| {n} | " + " | ".join(cells) + " |")
    for n, why in skipped.items():
        print(f"| {n} | skipped: {why} |" + " |" * (len(cols) - 1))


def unsorted_loop(x_AK, w_EMK, expert_A):
    """HF-eager style: per expert, find its rows, gather, matmul, scatter back (no sort)."""
    y = x_AK.new_empty(x_AK.shape[0], w_EMK.shape[1])
    for e, w in enumerate(w_EMK.unbind(0)):
        rows = torch.nonzero(expert_A == e).squeeze(-1)
        y = y.index_copy(0, rows, x_AK.index_select(0, rows) @ w.t())
    return y


def run_kernels(name: str, s: dict, rounds: int) -> None:
    """One grouped matmul x [T·k, d] by w [E, ffn, d], forward + backward, by implementation."""
    from modular.kernels.torch_gmm import torch_grouped_mm

    T, k, d, E, ffn = s["T"], s["k"], s["d"], s["E"], s["ffn"]
    g = torch.Generator().manual_seed(0)
    expert_A = torch.randint(0, E, (T * k,), generator=g)
    counts = torch.bincount(expert_A, minlength=E)
    x = torch.randn(T * k, d, generator=g)
    w = (torch.randn(E, ffn, d, generator=g) * 0.02).requires_grad_(True)
    w_dense = (torch.randn(ffn, d, generator=g) * 0.02).requires_grad_(True)
    upstream = torch.randn(T * k, ffn, generator=g)

    def step(fn, weight):
        def run():
            weight.grad = None
            xi = x.detach().requires_grad_(True)
            fn(xi, weight).backward(upstream)
        return run

    candidates = {"dense matmul (same FLOPs)": step(lambda a, b: a @ b.t(), w_dense),
                  "per-expert loop, unsorted": step(lambda a, b: unsorted_loop(a, b, expert_A), w)}
    for impl in ("segments", "padded_bmm", "grouped_mm"):
        candidates[f"sorted, {impl}"] = step(lambda a, b, impl=impl: torch_grouped_mm(a, b, counts, impl), w)
    seconds = time_in_rounds(candidates, rounds)
    best = {n: min(v) for n, v in seconds.items()}
    flops = 3 * 2 * T * k * d * ffn
    print(f"\n#### {name}, one grouped matmul [T·k={T * k}, d={d}] × [E={E}, ffn={ffn}, d], forward + backward")
    print("| implementation | best ms | median ms | GFLOP/s | × dense |")
    print("|---|---:|---:|---:|---:|")
    dense = best["dense matmul (same FLOPs)"]
    for n in candidates:
        print(f"| {n} | {best[n] * 1e3:.1f} | {statistics.median(seconds[n]) * 1e3:.1f} | "
              f"{flops / best[n] / 1e9:.0f} | {dense / best[n]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--kernels", action="store_true", help="also time one grouped matmul per implementation")
    parser.add_argument("--per-round", action="store_true", help="print every round's time (to see the noise)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    load = os.getloadavg()
    print(f"# MoE layer forward+backward, CPU: {cpu_model()}, {os.cpu_count()} cores, {args.threads} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{datetime.date.today().isoformat()}, load average at start {load[0]:.2f}, {args.rounds} rounds")
    for name in args.shapes:
        run_shape(name, SHAPES[name], args.rounds, args.per_round)
        if args.kernels:
            run_kernels(name, SHAPES[name], args.rounds)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
