"""GPU benchmark of the Triton grouped GEMM: TFLOP/s of forward, dX, dW vs torch._grouped_mm and cuBLAS.
Prints one table per run and names the device; needs CUDA and exits with a one-line message without it.

Usage: python benchmarks/gmm_gpu.py [--dtype bf16] [--tokens 16384] [--top-k 2] [--banks 1] [--layer] [--dry-run]
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


# Largest |error| / largest |reference| allowed for one grouped GEMM against the fp32 reference on the
# same (already rounded) inputs. Products of bf16/fp16 numbers are exact in fp32 and the kernels
# accumulate in fp32, so what is left is the final rounding of each output to the dtype (half an ulp:
# 2**-9 relative for bf16's 8-bit significand, 2**-12 for fp16) plus fp32 summation-order differences
# (~sqrt(K)·2**-24 relative, negligible). bf16 gets 1e-2 (2.5x its worst output rounding), fp16 2e-3;
# fp32 runs IEEE on both sides (no TF32 unless asked for), differing only in summation order.
GMM_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _segment_reference(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, counts: list[int]):
    """(y, dX, dW) of the grouped GEMM in fp32, one matmul per expert segment."""
    x32, w32, dy32 = x.float(), w.float(), dy.float()
    y = torch.empty(x.shape[0], w.shape[1], device=x.device)
    dx = torch.empty_like(x32)
    dw = torch.zeros_like(w32)
    start = 0
    for e, count in enumerate(counts):
        rows = slice(start, start + count)
        y[rows] = x32[rows] @ w32[e].T
        dx[rows] = dy32[rows] @ w32[e]
        dw[e] = dy32[rows].T @ x32[rows]
        start += count
    return y, dx, dw


def measure(n_tokens: int, top_k: int, n_experts: int, k: int, m: int, dtype: torch.dtype, skew: float,
            n_banks: int, seed: int = 0, device: str = "cuda", bench=None,
            errors: dict | None = None) -> dict[str, float]:
    """TFLOP/s of each variant on one shape. `bench(fn) -> ms` defaults to triton.testing.do_bench;
    the tests pass a stand-in to run this code on CPU under the interpreter.

    Correctness comes first: Triton's forward, dX and dW and torch._grouped_mm's forward are compared
    with an fp32 per-segment reference on the same inputs; the largest relative errors go into
    `errors` (when given), and an error over GMM_TOL raises AssertionError before anything is timed.
    """
    if bench is None:
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, warmup=25, rep=100)

    from modular.kernels import triton_gmm  # noqa: F401  (registers torch.ops.modular.*)

    gen = torch.Generator().manual_seed(seed)
    n = n_tokens * top_k
    counts = zipf_counts(n, n_experts, skew, gen).to(device)
    # Generated on the device: a Mixtral-sized weight stack is ~1 G numbers, seconds of CPU time.
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, k, generator=dev_gen, device=device).to(dtype)
    w = (torch.randn(n_experts, m, k, generator=dev_gen, device=device) / k**0.5).to(dtype)
    dy = torch.randn(n, m, generator=dev_gen, device=device).to(dtype)
    base, extra = divmod(n_experts, n_banks)
    bank_sizes = [base + (1 if b < extra else 0) for b in range(n_banks)]
    banks = [b.clone() for b in w.split(bank_sizes)]  # separate allocations, like separate parameters
    flops = 2.0 * n * m * k
    ops = torch.ops.modular
    all_banks = [True] * n_banks
    has_grouped_mm = hasattr(torch, "_grouped_mm")
    offs = counts.cumsum(0).to(torch.int32)
    w_t = w.transpose(-2, -1)

    def fwd():
        return ops.triton_grouped_mm(x, banks, counts, None, None, None, -1)

    def grad_x():
        return ops.triton_grouped_mm_grad_x(dy, x, banks, counts, None, None, None, True, False)

    def grad_w():
        return ops.triton_grouped_mm_grad_w(dy, x, counts, None, None, None, bank_sizes, all_banks)

    y_ref, dx_ref, dw_ref = _segment_reference(x, w, dy, counts.tolist())
    errs = {"triton fwd": _max_rel_diff(fwd(), y_ref), "triton dX": _max_rel_diff(grad_x()[0], dx_ref),
            "triton dW": _max_rel_diff(grad_w(), dw_ref)}
    skipped_grouped_mm = None
    if has_grouped_mm:
        try:
            errs["torch._grouped_mm fwd"] = _max_rel_diff(torch._grouped_mm(x, w_t, offs=offs), y_ref)
        except RuntimeError as err:  # dtype or architecture not supported by this torch build
            skipped_grouped_mm = str(err).splitlines()[0]
            print(f"  (torch._grouped_mm skipped: {skipped_grouped_mm})", file=sys.stderr)
    del y_ref, dx_ref, dw_ref
    if errors is not None:
        errors.update(errs)
    wrong = {name: err for name, err in errs.items() if err > GMM_TOL[dtype]}
    if wrong:
        raise AssertionError(", ".join(f"{name} is off by {err:.2e}" for name, err in wrong.items())
                             + f" (relative to the largest reference value; {GMM_TOL[dtype]:.0e} allowed)")

    def tflops(fn, gemms: int = 1) -> float:
        return gemms * flops / (bench(fn) * 1e-3) / 1e12

    res = {"triton fwd": tflops(fwd), "triton dX": tflops(grad_x), "triton dW": tflops(grad_w)}
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
    if has_grouped_mm and skipped_grouped_mm is None:
        res["torch._grouped_mm fwd"] = tflops(lambda: torch._grouped_mm(x, w_t, offs=offs))
        wt_g = w_t.detach().requires_grad_()
        try:
            res["torch._grouped_mm fwd+bwd"] = tflops(
                lambda: torch.autograd.grad(torch._grouped_mm(xg, wt_g, offs=offs), [xg, wt_g], dy), gemms=3
            )
        except RuntimeError as err:  # its backward is missing on some builds and devices
            print(f"  (torch._grouped_mm backward skipped: {str(err).splitlines()[0]})", file=sys.stderr)
    res["dense cuBLAS (same FLOPs)"] = tflops(lambda: x @ w[0].T)
    return res


def gmm_table(results: list[tuple[str, dict, dict]]) -> list[str]:
    """Markdown rows for (shape label, measure result, errors) triples: TFLOP/s, ÷ dense, max rel error."""
    lines = ["| shape | variant | TFLOP/s | ÷ dense | max rel err |", "|---|---|---:|---:|---:|"]
    for label, res, errors in results:
        if "error" in res:
            lines.append(f"| {label} | FAILED | — | — | {res['error']} |")
            continue
        dense = res["dense cuBLAS (same FLOPs)"]
        for i, (name, value) in enumerate(res.items()):
            err = f"{errors[name]:.1e}" if name in errors else ""
            lines.append(f"| {label if i == 0 else ''} | {name} | {value:.1f} | {value / dense:.2f} | {err} |")
    return lines


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


def measure_layer(n_tokens: int, n_experts: int, d_model: int, ffn: int, top_k: int, dtype: torch.dtype,
                  seed: int = 0, device: str = "cuda", bench=None) -> dict:
    """Forward + backward of one SwiGLU MoE expert step, each LAYER_VARIANTS entry on the same routing.

    Returns {"flops": forward+backward FLOPs (18·A·D·F, A = tokens·top_k), "ms": {variant: ms},
    "skipped": {variant: reason}, "max_rel_diff": {variant: worst difference from permute + triton gmm
    over y and every gradient}, "max_rel_err": {variant: the same against an fp32 reference}}. Routing
    (random logits, softmax top-k, renormalized weights) and the expert sort are done once, outside
    the timed region, the same for every variant; each timed call returns the gradients of x, the three
    weights and the routing weights. The fp32 reference runs the permuted step with one fp32 matmul
    per expert on fp32 copies of the same (rounded) inputs. Raises AssertionError when an MoE
    implementation is off beyond LAYER_TOL, before anything is timed. `bench(fn) -> ms` as in `measure`.
    """
    if bench is None:
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, warmup=10, rep=50)

    import torch.nn.functional as F

    from modular.kernels.dispatch import combine, sort_by_expert
    from modular.kernels.torch_gmm import torch_grouped_mm
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

    dev_gen = torch.Generator(device=device).manual_seed(seed)  # large tensors: generated on the device

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=dev_gen, device=device) * scale).to(dtype)

    x = randn(T, D).requires_grad_()
    w_gate = randn(E, Fh, D, scale=D**-0.5).requires_grad_()
    w_up = randn(E, Fh, D, scale=D**-0.5).requires_grad_()
    w_down = randn(E, D, Fh, scale=Fh**-0.5).requires_grad_()
    weight = weight.to(device, dtype).requires_grad_()
    dy = randn(T, D)
    leaves = [x, w_gate, w_up, w_down, weight]

    def fused():
        y = triton_swiglu_moe(x, [w_gate], [w_up], [w_down], counts, token_sorted, order, weight[order],
                              token_idx)
        return y, *torch.autograd.grad(y, leaves, dy)

    def permuted(gmm, leaves=leaves, dy=dy):
        x, w_gate, w_up, w_down, weight = leaves

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

    # Correctness first: y and all five gradients of every MoE variant against the fp32 reference,
    # and against permute + triton gmm (the same kernels composed without fusion).
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    fp32_reference = permuted(lambda a, w: torch_grouped_mm(a, w, counts, impl="segments"), leaves32, dy.float())()
    fp32_reference = [t.detach() for t in fp32_reference]
    del leaves32
    reference = steps["permute + triton gmm"]()
    max_rel_diff, max_rel_err = {}, {}
    for name, step in steps.items():
        if name in skipped:
            continue
        try:
            outputs = reference if name == "permute + triton gmm" else step()
        except RuntimeError as err:  # dtype or architecture not supported by this torch build
            skipped[name] = str(err).splitlines()[0]
            continue
        max_rel_err[name] = max(_max_rel_diff(a, b) for a, b in zip(outputs, fp32_reference))
        if name != "permute + triton gmm":
            max_rel_diff[name] = max(_max_rel_diff(a, b) for a, b in zip(outputs, reference))
        worst = max(max_rel_err[name], max_rel_diff.get(name, 0.0))
        if worst > LAYER_TOL[dtype]:
            raise AssertionError(f"{name} is off by {worst:.2e} from the fp32 reference or from permute + triton "
                                 f"gmm (relative to the largest value; {LAYER_TOL[dtype]:.0e} allowed)")
        del outputs
    del reference, fp32_reference

    # The roofline: one dense SwiGLU FFN over A rows, the same 3 GEMMs of A x D x F each.
    x_dense = randn(n_rows, D).requires_grad_()
    dense_w = [w[0].detach().clone().requires_grad_() for w in (w_gate, w_up, w_down)]
    dy_dense = randn(n_rows, D)

    def dense():
        y = (F.silu(x_dense @ dense_w[0].T) * (x_dense @ dense_w[1].T)) @ dense_w[2].T
        return torch.autograd.grad(y, [x_dense, *dense_w], dy_dense)

    steps["dense SwiGLU (same FLOPs)"] = dense
    ms = {name: bench(step) for name, step in steps.items() if name not in skipped}
    return {"flops": 18.0 * n_rows * D * Fh, "ms": ms, "skipped": skipped, "max_rel_diff": max_rel_diff,
            "max_rel_err": max_rel_err}


def layer_table(results: list[tuple[str, dict]]) -> list[str]:
    """Markdown rows for (shape label, measure_layer result) pairs: ms, TFLOP/s, × dense, fused ÷ this,
    the largest relative error against the fp32 reference; a result with "error" is one FAILED row."""
    lines = ["| shape | implementation | ms | TFLOP/s | × dense | fused ÷ this | max rel err vs fp32 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for label, res in results:
        if "error" in res:
            lines.append(f"| {label} | FAILED | — | — | — | — | {res['error']} |")
            continue
        ms = res["ms"]
        for i, name in enumerate(LAYER_VARIANTS):
            shape = label if i == 0 else ""
            if name in res["skipped"]:
                lines.append(f"| {shape} | {name} | — | — | — | skipped: {res['skipped'][name]} | |")
                continue
            tflops = res["flops"] / (ms[name] * 1e-3) / 1e12
            dense = ms["dense SwiGLU (same FLOPs)"] / ms[name]
            ratio = f"{ms[name] / ms['ours fused']:.2f}" if "permute" in name else ""
            err = f"{res['max_rel_err'][name]:.1e}" if name in res.get("max_rel_err", {}) else ""
            lines.append(f"| {shape} | {name} | {ms[name]:.3f} | {tflops:.1f} | {dense:.2f} | {ratio} | {err} |")
    return lines


# --dry-run: the whole script on the CPU under Triton's interpreter, tiny shapes, each variant run once.
DRY_SHAPES = [(4, 64, 48)]
DRY_LAYER_SHAPES = [("tiny", 4, 32, 16, 2)]
DRY_TOKENS = 16


def _one_call(fn) -> float:
    """The dry run's stand-in for do_bench: runs fn once and reports 1 ms (no timing on a CPU)."""
    fn()
    return 1.0


def _failure(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"


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
    parser.add_argument("--dry-run", action="store_true",
                        help="check the script on the CPU: Triton's interpreter, tiny shapes, nothing timed")
    args = parser.parse_args(argv)

    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before modular.kernels.triton_gmm is first imported
        device, bench, tokens = "cpu", _one_call, DRY_TOKENS
        shapes, layer_shapes = DRY_SHAPES, DRY_LAYER_SHAPES
        where = "dry run on the CPU (Triton interpreter; times are a 1 ms stand-in, not measurements)"
    else:
        if not torch.cuda.is_available():
            print("gmm_gpu.py needs a CUDA GPU and none is visible; nothing was measured.", file=sys.stderr)
            return 1
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("gmm_gpu.py measures compiled kernels; unset TRITON_INTERPRET (it is '1') and rerun.",
                  file=sys.stderr)
            return 1
        device, bench, tokens = "cuda", None, args.tokens
        shapes, layer_shapes = SHAPES, LAYER_SHAPES
        props = torch.cuda.get_device_properties(0)
        where = f"**{props.name}** ({props.multi_processor_count} SMs)"

    def peak_gib() -> str:
        if device != "cuda":
            return "—"
        peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return f"{peak:.1f}"

    dtype = DTYPES[args.dtype]
    failed = False
    peaks = []
    if args.layer:
        results = []
        for name, n_experts, d_model, ffn, top_k in layer_shapes:
            label = f"{name} (E={n_experts}, k={top_k}, d={d_model}, ffn={ffn})"
            try:
                res = measure_layer(tokens, n_experts, d_model, ffn, top_k, dtype, device=device, bench=bench)
            except (AssertionError, RuntimeError) as err:  # wrong results, OOM, compile errors: keep going
                res, failed = {"error": _failure(err)}, True
            results.append((label, res))
            peaks.append(f"{label}: {peak_gib()} GiB")
        print(f"{where}, torch {torch.__version__}, dtype {args.dtype}, {tokens} tokens; MoE expert step "
              f"forward + backward (routing and expert sort untimed); TFLOP/s = 18·T·k·d·ffn / time; "
              f"fused ÷ this = this ms ÷ fused ms; peak memory per shape: {'; '.join(peaks)}\n")
        print("\n".join(layer_table(results)))
        return 1 if failed else 0
    results = []
    for n_experts, k, m in shapes:
        label = f"E={n_experts} K={k} M={m}"
        errors: dict = {}
        try:
            res = measure(tokens, args.top_k, n_experts, k, m, dtype, args.skew, args.banks, device=device,
                          bench=bench, errors=errors)
        except (AssertionError, RuntimeError) as err:
            res, failed = {"error": _failure(err)}, True
        results.append((label, res, errors))
        peaks.append(f"{label}: {peak_gib()} GiB")
    print(f"{where}, torch {torch.__version__}, dtype {args.dtype}, tokens {tokens} x top-{args.top_k}, "
          f"skew {args.skew}, banks {args.banks}; errors against an fp32 per-expert reference "
          f"(allowed {GMM_TOL[dtype]:.0e}); peak memory per shape: {'; '.join(peaks)}\n")
    print("\n".join(gmm_table(results)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
