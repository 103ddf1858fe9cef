"""GPU benchmark of the Triton grouped GEMM: TFLOP/s of forward, dX, dW vs torch._grouped_mm and cuBLAS.
Prints one table per run and names the device; needs CUDA and exits with a one-line message without it.

Usage: python benchmarks/gmm_gpu.py [--dtype bf16] [--tokens 16384] [--top-k 2] [--banks 1]
Every row does 2·N·M·K FLOPs (N = tokens·top_k) per GEMM; "dense" is one [N, K] @ [K, M] cuBLAS
matmul of the same FLOPs, the ceiling a grouped GEMM can hope to approach.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--skew", type=float, default=1.0,
                        help="Zipf exponent of tokens per expert (0 = uniform)")
    parser.add_argument("--banks", type=int, default=1,
                        help="split the experts into this many separate banks")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("gmm_gpu.py needs a CUDA GPU and none is visible; nothing was measured.", file=sys.stderr)
        return 1
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("gmm_gpu.py measures compiled kernels; unset TRITON_INTERPRET (it is '1') and rerun.",
              file=sys.stderr)
        return 1

    props = torch.cuda.get_device_properties(0)
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
