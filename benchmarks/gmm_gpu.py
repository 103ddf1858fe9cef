"""GPU benchmark of the Triton grouped GEMM: TFLOP/s of forward, dX, dW vs torch._grouped_mm and cuBLAS.
Prints one table per run and names the device; needs CUDA and exits with a one-line message without it.

Usage: python benchmarks/gmm_gpu.py [--dtype bf16] [--tokens 16384] [--top-k 2] [--banks 1]
Every row does 2·N·M·K FLOPs (N = tokens·top_k) per GEMM; "dense" is one [N, K] @ [K, M] cuBLAS
matmul of the same FLOPs, the ceiling a grouped GEMM can hope to approach.

With --layer: forward + backward of a whole SwiGLU MoE layer's expert step (after routing) at
LAYER_SHAPES, one markdown table: ours fused (gather in the gate/up GEMMs' loads, weighted scatter in
the down GEMM's epilogue), permute + Triton grouped GEMM, permute + torch._grouped_mm (torchtitan-
style), and a dense SwiGLU FFN over tokens·top_k rows with the same FLOPs (the roofline). --top-k
is ignored there (each shape has its own).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

# Run from a checkout without installing: the package lives one level up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# (experts, K, M): fine-grained (DeepSeek/Qwen-MoE-like), Mixtral-like, and many tiny experts.
SHAPES = [(64, 2048, 1408), (8, 4096, 14336), (128, 1024, 512)]


def zipf_counts(n_rows: int, n_experts: int, skew: float, gen: torch.Generator) -> torch.Tensor:
    """Rows per expert with a Zipf-like law (skew 0 = uniform): some experts empty, some many tiles."""
    weights = torch.arange(1, n_experts + 1, dtype=torch.float64) ** -skew
    weights = weights[torch.randperm(n_experts, generator=gen)]
    return torch.multinomial(weights, n_rows, replacement=True, generator=gen).bincount(minlength=n_experts)


def measure(n_tokens: int, top_k: int, n_experts: int, k: int, m: int, dtype: torch.dtype, skew: float,
            n_banks: int, seed: int = 0, device: str = "cuda", bench=None) -> dict[str, float]:
    """TFLOP/s of each variant on one shape. `bench(fn) -> ms` defaults to triton.testing.do_bench;
    the tests pass a stand-in to run this code on CPU under the interpreter."""
    if bench is None:
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, warmup=25, rep=100)

    from modular.kernels import triton_gmm  # noqa: F401  (registers torch.ops.modular.*)

    gen = torch.Generator().manual_seed(seed)
    n = n_tokens * top_k
    counts = zipf_counts(n, n_experts, skew, gen).to(device)
    x = torch.randn(n, k, generator=gen).to(device, dtype)
    w = (torch.randn(n_experts, m, k, generator=gen) / k**0.5).to(device, dtype)
    dy = torch.randn(n, m, generator=gen).to(device, dtype)
    base, extra = divmod(n_experts, n_banks)
    bank_sizes = [base + (1 if b < extra else 0) for b in range(n_banks)]
    banks = [b.clone() for b in w.split(bank_sizes)]  # separate allocations, like separate parameters
    flops = 2.0 * n * m * k
    ops = torch.ops.modular
    all_banks = [True] * n_banks

    def tflops(fn, gemms: int = 1) -> float:
        return gemms * flops / (bench(fn) * 1e-3) / 1e12

    res = {
        "triton fwd": tflops(lambda: ops.triton_grouped_mm(x, banks, counts, None, None, None, -1)),
        "triton dX": tflops(
            lambda: ops.triton_grouped_mm_grad_x(dy, x, banks, counts, None, None, None, True, False)
        ),
        "triton dW": tflops(
            lambda: ops.triton_grouped_mm_grad_w(dy, x, counts, None, None, None, bank_sizes, all_banks)
        ),
    }
    if n_banks > 1:
        # The alternative to the pointer table: copy all banks into one tensor on every call.
        res["concat banks + triton fwd"] = tflops(
            lambda: ops.triton_grouped_mm(x, [torch.cat(banks)], counts, None, None, None, -1)
        )
    xg = x.clone().requires_grad_()
    wg = [b.clone().requires_grad_() for b in banks]
    res["triton fwd+bwd"] = tflops(
        lambda: torch.autograd.grad(
            ops.triton_grouped_mm(xg, wg, counts, None, None, None, -1), [xg, *wg], dy
        ),
        gemms=3,
    )
    if hasattr(torch, "_grouped_mm"):
        offs = counts.cumsum(0).to(torch.int32)
        w_t = w.transpose(-2, -1)
        try:
            res["torch._grouped_mm fwd"] = tflops(lambda: torch._grouped_mm(x, w_t, offs=offs))
            wt_g = w_t.detach().requires_grad_()
            res["torch._grouped_mm fwd+bwd"] = tflops(
                lambda: torch.autograd.grad(torch._grouped_mm(xg, wt_g, offs=offs), [xg, wt_g], dy), gemms=3
            )
        except RuntimeError as err:  # dtype or architecture not supported by this torch build
            print(f"  (torch._grouped_mm skipped: {str(err).splitlines()[0]})", file=sys.stderr)
    res["dense cuBLAS (same FLOPs)"] = tflops(lambda: x @ w[0].T)
    return res


# (name, experts, d_model, ffn, top_k): Mixtral-8x7B, DeepSeek-V2-Lite/Qwen1.5-MoE-like fine-grained,
# Qwen3-30B-A3B-like many small experts.
LAYER_SHAPES = [
    ("mixtral", 8, 4096, 14336, 2),
    ("fine", 64, 2048, 1408, 8),
    ("fine, 128 experts", 128, 2048, 768, 8),
]
LAYER_VARIANTS = ["ours fused", "permute + triton gmm", "permute + torch._grouped_mm",
                  "dense SwiGLU (same FLOPs)"]
# Largest |difference| / largest |reference| allowed between implementations, per dtype.
LAYER_TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 5e-3}


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def measure_layer(n_tokens: int, n_experts: int, d_model: int, ffn: int, top_k: int, dtype: torch.dtype,
                  seed: int = 0, device: str = "cuda", bench=None) -> dict:
    """Forward + backward of one SwiGLU MoE expert step, each LAYER_VARIANTS entry on the same routing.

    Returns {"flops": forward+backward FLOPs (18·A·D·F, A = tokens·top_k), "ms": {variant: ms},
    "skipped": {variant: reason}, "max_rel_diff": {variant: worst difference from permute + triton gmm
    over y and every gradient}}. Routing (random logits, softmax top-k, renormalized weights) and the
    expert sort are done once, outside the timed region, the same for every variant; each timed call
    returns the gradients of x, the three weights and the routing weights. Raises AssertionError when
    the three MoE implementations disagree beyond LAYER_TOL. `bench(fn) -> ms` as in `measure`.
    """
    if bench is None:
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, warmup=10, rep=50)

    import torch.nn.functional as F

    from modular.kernels.dispatch import combine, sort_by_expert
    from modular.kernels.triton_gmm import triton_grouped_mm
    from modular.kernels.triton_swiglu import triton_swiglu_moe
    from modular.routing.base import flat_token_choice

    gen = torch.Generator().manual_seed(seed)
    T, E, D, Fh, k = n_tokens, n_experts, d_model, ffn, top_k
    n_rows = T * k
    # Routing as a top-k softmax router produces it (modular/routing/topk.py), then the MoE layer's
    # Triton path (modular/models/moe.py): expert order, counts, sorted tokens and weights.
    probs = torch.softmax(torch.randn(T, E, generator=gen), dim=-1)
    top_w, top_e = torch.topk(probs, k, dim=-1)
    token_idx, expert_idx, weight = flat_token_choice(top_e, top_w / top_w.sum(-1, keepdim=True))
    token_sorted, order, counts = sort_by_expert(token_idx, expert_idx, E)
    token_idx, token_sorted, order, counts = (t.to(device) for t in (token_idx, token_sorted, order, counts))

    x = torch.randn(T, D, generator=gen).to(device, dtype).requires_grad_()
    w_gate = (torch.randn(E, Fh, D, generator=gen) / D**0.5).to(device, dtype).requires_grad_()
    w_up = (torch.randn(E, Fh, D, generator=gen) / D**0.5).to(device, dtype).requires_grad_()
    w_down = (torch.randn(E, D, Fh, generator=gen) / Fh**0.5).to(device, dtype).requires_grad_()
    weight = weight.to(device, dtype).requires_grad_()
    dy = torch.randn(T, D, generator=gen).to(device, dtype)
    leaves = [x, w_gate, w_up, w_down, weight]

    def fused():
        y = triton_swiglu_moe(x, [w_gate], [w_up], [w_down], counts, token_sorted, order, weight[order],
                              token_idx)
        return y, *torch.autograd.grad(y, leaves, dy)

    def permuted(gmm):
        def step():
            x_sorted = x.index_select(0, token_sorted)  # what dispatch.permute does after its sort
            h = F.silu(gmm(x_sorted, w_gate)) * gmm(x_sorted, w_up)
            y = combine(gmm(h, w_down), token_sorted, weight[order], T)
            return y, *torch.autograd.grad(y, leaves, dy)
        return step

    offs = counts.cumsum(0).to(torch.int32)

    def torch_gmm(a, w):
        return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)

    steps = {"ours fused": fused, "permute + triton gmm": permuted(lambda a, w: triton_grouped_mm(a, w, counts)),
             "permute + torch._grouped_mm": permuted(torch_gmm)}
    skipped = {}
    if not hasattr(torch, "_grouped_mm"):
        skipped["permute + torch._grouped_mm"] = f"torch {torch.__version__} has no torch._grouped_mm"

    # Correctness first: every MoE variant against permute + triton gmm, y and all five gradients.
    reference = steps["permute + triton gmm"]()
    max_rel_diff = {}
    for name, step in steps.items():
        if name in skipped or step is steps["permute + triton gmm"]:
            continue
        try:
            outputs = step()
        except RuntimeError as err:  # dtype or architecture not supported by this torch build
            skipped[name] = str(err).splitlines()[0]
            continue
        max_rel_diff[name] = max(_max_rel_diff(a, b) for a, b in zip(outputs, reference))
        if max_rel_diff[name] > LAYER_TOL[dtype]:
            raise AssertionError(f"{name} differs from permute + triton gmm by {max_rel_diff[name]:.2e} "
                                 f"(relative to the largest value; {LAYER_TOL[dtype]:.0e} allowed)")
    del reference

    # The roofline: one dense SwiGLU FFN over A rows, the same 3 GEMMs of A x D x F each.
    x_dense = torch.randn(n_rows, D, generator=gen).to(device, dtype).requires_grad_()
    dense_w = [w[0].detach().clone().requires_grad_() for w in (w_gate, w_up, w_down)]
    dy_dense = torch.randn(n_rows, D, generator=gen).to(device, dtype)

    def dense():
        y = (F.silu(x_dense @ dense_w[0].T) * (x_dense @ dense_w[1].T)) @ dense_w[2].T
        return torch.autograd.grad(y, [x_dense, *dense_w], dy_dense)

    steps["dense SwiGLU (same FLOPs)"] = dense
    ms = {name: bench(step) for name, step in steps.items() if name not in skipped}
    return {"flops": 18.0 * n_rows * D * Fh, "ms": ms, "skipped": skipped, "max_rel_diff": max_rel_diff}


def layer_table(results: list[tuple[str, dict]]) -> list[str]:
    """Markdown rows for (shape label, measure_layer result) pairs: ms, TFLOP/s, × dense, fused ÷ this."""
    lines = ["| shape | implementation | ms | TFLOP/s | × dense | fused ÷ this |",
             "|---|---|---:|---:|---:|---:|"]
    for label, res in results:
        ms = res["ms"]
        for i, name in enumerate(LAYER_VARIANTS):
            shape = label if i == 0 else ""
            if name in res["skipped"]:
                lines.append(f"| {shape} | {name} | — | — | — | skipped: {res['skipped'][name]} |")
                continue
            tflops = res["flops"] / (ms[name] * 1e-3) / 1e12
            dense = ms["dense SwiGLU (same FLOPs)"] / ms[name]
            ratio = f"{ms[name] / ms['ours fused']:.2f}" if "permute" in name else ""
            lines.append(f"| {shape} | {name} | {ms[name]:.3f} | {tflops:.1f} | {dense:.2f} | {ratio} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--skew", type=float, default=1.0,
                        help="Zipf exponent of tokens per expert (0 = uniform)")
    parser.add_argument("--banks", type=int, default=1,
                        help="split the experts into this many separate banks")
    parser.add_argument("--layer", action="store_true",
                        help="time the whole SwiGLU MoE expert step (fused vs permute) at LAYER_SHAPES")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("gmm_gpu.py needs a CUDA GPU and none is visible; nothing was measured.", file=sys.stderr)
        return 1
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("gmm_gpu.py measures compiled kernels; unset TRITON_INTERPRET (it is '1') and rerun.",
              file=sys.stderr)
        return 1

    props = torch.cuda.get_device_properties(0)
    if args.layer:
        print(f"**{props.name}** ({props.multi_processor_count} SMs), torch {torch.__version__}, "
              f"dtype {args.dtype}, {args.tokens} tokens; MoE expert step forward + backward (routing "
              f"and expert sort untimed); TFLOP/s = 18·T·k·d·ffn / time; fused ÷ this = this ms ÷ fused ms\n")
        results = []
        for name, n_experts, d_model, ffn, top_k in LAYER_SHAPES:
            res = measure_layer(args.tokens, n_experts, d_model, ffn, top_k, DTYPES[args.dtype])
            results.append((f"{name} (E={n_experts}, k={top_k}, d={d_model}, ffn={ffn})", res))
            torch.cuda.empty_cache()
        print("\n".join(layer_table(results)))
        return 0
    print(f"device: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"dtype {args.dtype}, tokens {args.tokens} x top-{args.top_k}, skew {args.skew}, "
          f"banks {args.banks}")
    for n_experts, k, m in SHAPES:
        res = measure(args.tokens, args.top_k, n_experts, k, m, DTYPES[args.dtype], args.skew, args.banks)
        print(f"\nE={n_experts} K={k} M={m}")
        print(f"  {'variant':<30} {'TFLOP/s':>8}")
        for name, value in res.items():
            print(f"  {name:<30} {value:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
