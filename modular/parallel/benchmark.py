"""Measure what the cost model (modular.parallel.cost_model) predicts, on 2 local processes: all-to-all
bandwidth and latency, expert-GEMM rate, and the all-to-all share of an EP=2 MoE layer's training step.

    python -m modular.parallel.benchmark [--backend gloo|nccl] [--dtype fp32|bf16]

Prints a table (with the machine it ran on) for docs/scaling.md. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from modular.parallel.cost_model import a2a_bytes_per_token

D_MODEL, FFN, TOP_K, EXPERTS = 256, 256, 2, 8
TOKENS = (512, 2048, 8192)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _timed(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    dist.barrier()
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _worker(rank: int, world: int, port: int, backend: str, dtype_name: str, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dtype = DTYPES[dtype_name]
    from modular.config import compose_config
    from modular.models.moe import MoELayer
    from modular.parallel import all_to_all as a2a_module
    from modular.parallel.expert_parallel import ExpertPlacement, shard_bank
    from modular.parallel.mesh import ParallelContext

    ctx = ParallelContext(rank=rank, world_size=world, local_rank=rank, dp=1, ep=world, device=device,
                          backend=backend, ep_group=None, dp_group=None)
    cfg = compose_config(["model=tiny", f"experts.num_experts={EXPERTS}", f"experts.ffn_dim={FFN}",
                          f"routing.top_k={TOP_K}", "routing.aux_loss_weight=0", "routing.z_loss_weight=0"])
    rows = []
    for T in TOKENS:
        # 1. the all-to-all alone: T·k rows of D, an equal share to every rank
        x = torch.randn(T * TOP_K, D_MODEL, device=device, dtype=dtype)
        splits = [T * TOP_K // world] * world
        out = torch.empty_like(x)
        t_a2a = _timed(lambda out=out, x=x, splits=splits: dist.all_to_all_single(out, x, splits, splits))
        sent = T * TOP_K * D_MODEL * x.element_size() * (world - 1) / world
        # 2. the local experts' GEMMs, forward + backward, on the T·k rows this rank computes
        torch.manual_seed(0)
        layer = MoELayer(D_MODEL, EXPERTS, cfg.experts, cfg.routing).to(device=device, dtype=dtype)
        bank = layer.banks[0]
        counts = torch.full((EXPERTS // world,), T * TOP_K // (EXPERTS // world), dtype=torch.int64, device=device)
        bank_local = shard_bank(bank, ctx, broadcast=True)
        xg = torch.randn(T * TOP_K, D_MODEL, device=device, dtype=dtype, requires_grad=True)
        t_gemm = _timed(lambda bank=bank_local, xg=xg, counts=counts: bank(xg, counts).sum().backward())
        flops = 3 * 2 * 3 * D_MODEL * FFN * T * TOP_K  # training: 3 × forward of 3 matrices
        # 3. the whole EP layer, forward + backward, and the time spent inside its all-to-alls
        layer.place(ExpertPlacement(ctx))
        layer.train()
        torch.manual_seed(1 + rank)  # each rank its own tokens
        h = torch.randn(T, D_MODEL, device=device, dtype=dtype, requires_grad=True)
        inside = [0.0, 0.0]  # seconds inside all-to-alls, bytes sent to other ranks

        original = a2a_module.dist.all_to_all_single

        def counting(out, x, out_splits=None, in_splits=None, *args, original=original, inside=inside, **kwargs):
            t0 = time.perf_counter()
            result = original(out, x, out_splits, in_splits, *args, **kwargs)
            inside[0] += time.perf_counter() - t0
            if in_splits is not None:
                inside[1] += (sum(in_splits) - in_splits[rank]) * x[0].numel() * x.element_size()
            return result

        a2a_module.dist.all_to_all_single = counting
        try:
            layer(h).sum().backward()  # warm-up
            inside[0] = inside[1] = 0.0
            dist.barrier()
            t0 = time.perf_counter()
            repeats = 3
            for _ in range(repeats):
                layer(h).sum().backward()
            t_layer = (time.perf_counter() - t0) / repeats
            t_inside = inside[0] / repeats
            bytes_per_token = inside[1] / repeats / T
        finally:
            a2a_module.dist.all_to_all_single = original
        # The rank that reaches an all-to-all last waits least: its time inside is closest to the transfer
        # itself; the other's includes waiting for it (uneven expert loads, scheduling).
        inside_all = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(world)]
        dist.all_gather(inside_all, torch.tensor([t_inside], dtype=torch.float64, device=device))
        inside_all = [float(t) for t in inside_all]
        rows.append({"T": T, "a2a_s": t_a2a, "bytes": sent, "gemm_s": t_gemm, "flops": flops,
                     "layer_s": t_layer, "layer_a2a_min_s": min(inside_all), "layer_a2a_max_s": max(inside_all),
                     "bytes_per_token": bytes_per_token})
    if rank == 0:
        results.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def _fit_a2a(rows) -> tuple[float, float]:
    """(latency s, bandwidth B/s): bandwidth from the largest message, latency what is left of the smallest."""
    big, small = rows[-1], rows[0]
    bandwidth = big["bytes"] / big["a2a_s"]
    return max(0.0, small["a2a_s"] - small["bytes"] / bandwidth), bandwidth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="nccl" if torch.cuda.device_count() >= 2 else "gloo")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, port, args.backend, args.dtype, results), nprocs=2, start_method="spawn")
    rows = results.get()
    latency, bandwidth = _fit_a2a(rows)
    rate = max(r["flops"] / r["gemm_s"] for r in rows)
    device = (torch.cuda.get_device_name(0) if args.backend == "nccl"
              else f"CPU ({platform.processor() or 'x86_64'}, {os.cpu_count()} cores)")
    print(f"EP=2 on 2 processes, {args.backend}, {device}, {args.dtype}; D={D_MODEL}, F={FFN}, k={TOP_K}, "
          f"E={EXPERTS}")
    model_bytes = a2a_bytes_per_token(D_MODEL, TOP_K, 2, args.dtype)
    measured_bytes = ", ".join(f"{r['bytes_per_token']:.0f}" for r in rows)
    print(f"bytes sent per token per layer (fwd + bwd): model {model_bytes:.0f} (uniform routing), "
          f"measured {measured_bytes} (tokens/rank {', '.join(str(r['T']) for r in rows)})")
    print(f"fitted: all-to-all latency {latency * 1e3:.3f} ms, bandwidth {bandwidth / 1e9:.2f} GB/s per rank; "
          f"expert GEMM rate {rate / 1e9:.1f} GFLOP/s")
    print()
    print("| tokens/rank | one a2a ms (MB sent) | GEMM fwd+bwd ms: measured / model | layer fwd+bwd ms | "
          "a2a in layer ms: model / measured (min-max over ranks) | a2a share: model / measured |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        # forward: the counts exchange and 2 all-to-alls of rows; backward: 2 all-to-alls of gradients
        model_comm = 5 * latency + 4 * r["bytes"] / bandwidth
        model_gemm = r["flops"] / rate
        share = model_comm / (model_comm + model_gemm)
        print(f"| {r['T']} | {r['a2a_s'] * 1e3:.2f} ({r['bytes'] / 1e6:.2f}) | {r['gemm_s'] * 1e3:.1f} / "
              f"{model_gemm * 1e3:.1f} | {r['layer_s'] * 1e3:.1f} | {model_comm * 1e3:.1f} / "
              f"{r['layer_a2a_min_s'] * 1e3:.1f}-{r['layer_a2a_max_s'] * 1e3:.1f} | {100 * share:.0f}% / "
              f"{100 * r['layer_a2a_min_s'] / r['layer_s']:.0f}-{100 * r['layer_a2a_max_s'] / r['layer_s']:.0f}% |")


if __name__ == "__main__":
    main()
