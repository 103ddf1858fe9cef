"""Compiles every Triton kernel variant the grouped GEMM and the SwiGLU op launch for sm_90 (H100/H200) on a CPU.
Catches what the interpreter hides, before GPU time is spent: compile errors, configs over the shared-memory limit.

No GPU is needed: a stand-in for Triton's CUDA driver names an sm_90 target, and every launch becomes a
compile-only warm-up (Triton's own argument specialisation, so the variants are the ones a GPU builds for
these shapes). The launch paths of `modular.kernels.triton_gmm` and `triton_swiglu` run on CPU tensors;
their outputs are never computed. For each kernel variant (flags such as gather / scatter / row-dot) and
dtype, the first config is compiled (at model widths and at the tests' odd ones) and, for the
training dtype, every autotune config; the table says how many compile, how many fit the
227 KiB of shared memory a block may use on sm_90 (the autotuner skips the others; with
MODULAR_GMM_AUTOTUNE=0 only the first config exists, so it must fit), and whether the reduction loop
is software-pipelined (asynchronous copies into shared memory).

    python benchmarks/sm90_compile.py [--dtypes bf16,fp16,fp32] [--sweep-dtypes bf16] [--first-config-only]

Exit code 1 when a variant fails to compile, has no config that fits, or its first config does not fit.

With --warm (benchmarks/gpu_check.sh runs it first on the GPU machine): the same compile-only launches
at the shapes of the GPU check's steps, every autotune config, in parallel processes, into Triton's
on-disk cache. The autotuner compiles its configs one after another; warmed, the steps load them.

    python benchmarks/sm90_compile.py --warm gmm,layer,train [--dtype bf16] [--jobs 15]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":  # must be decided before the kernels are defined
    del os.environ["TRITON_INTERPRET"]

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gmm_gpu, train_throughput: the shapes to warm

SM90_MAX_SHARED = 232448  # bytes a block may opt into on sm_90 (227 KiB), as Triton checks at load time
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLAGS = ("MULTI_BANK", "GATHER_A", "SCATTER_C", "SCALE", "ROW_DOT", "GATHER_H", "SUBSET", "GATHER_DY",
         "GATHER_X", "EVEN_INNER")


class _Sm90Driver:
    """Just enough of Triton's CUDA driver for compiling: the target, a device and a stream id."""

    capability = 90  # --warm on a GPU machine sets the device's own

    def __init__(self, capability: int | None = None):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability or _Sm90Driver.capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class CompileRecorder:
    """Turns every JIT launch into a compile-only warm-up and records what was built."""

    def __init__(self, verbose: bool = False):
        from triton.runtime.jit import JITFunction

        self.verbose = verbose
        self.records: dict[tuple, dict] = {}
        self.hashes: set[str] = set()  # Triton's cache keys of the compiled kernels
        self.errors: list[tuple[tuple, str]] = []
        self._jit = JITFunction
        self._original_run = JITFunction.run

    def __enter__(self):
        from triton.runtime import driver

        driver.set_active(_Sm90Driver())
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            names = fn.arg_names
            bound = {**dict(zip(names, args)), **kwargs}
            first_ptr = next(a for a in args if isinstance(a, torch.Tensor))
            flags = tuple(f for f in FLAGS if bound.get(f))
            config = tuple(bound.get(k) for k in ("BLOCK_ROWS", "BLOCK_COLS", "BLOCK_INNER")) + (
                kwargs.get("num_warps"), kwargs.get("num_stages"))
            key = (fn.__name__, str(first_ptr.dtype).replace("torch.", ""), flags, config)
            try:
                kernel = recorder._original_run(fn, *args, grid=grid, warmup=True, **kwargs)
            except Exception as err:  # noqa: BLE001  (every compile failure is a finding to report)
                recorder.errors.append((key, f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"))
                return None
            recorder.hashes.add(kernel.hash)
            ttgir = kernel.asm.get("ttgir", "")
            if key not in recorder.records and recorder.verbose:
                print(f"  compiled {key}: {int(kernel.metadata.shared)} bytes of shared memory", flush=True)
            recorder.records[key] = {
                "shared": int(kernel.metadata.shared),
                "pipelined": "async_copy" in ttgir or "async_tma" in ttgir,
                "wgmma": "warp_group_dot" in ttgir,
            }
            return kernel

        self._jit.run = run
        return self

    def __exit__(self, *exc):
        from triton.runtime import driver

        self._jit.run = self._original_run
        driver._active = None  # back to the lazily created real driver (there is none on a CPU machine)
        return False


def drive_launch_paths(dtype: torch.dtype, odd: bool = False) -> None:
    """Calls every launch path the ops use, once, on small CPU tensors of the given dtype.

    Sizes are multiples of 16 like real model widths (Triton specialises on divisibility by 16);
    `odd` uses the test suites' widths that are not (K = 80 with a masked reduction tail, F = 24).
    """
    from modular.kernels import triton_gmm as g
    from modular.kernels import triton_swiglu as s

    gen = torch.Generator().manual_seed(0)
    T, D, F, top_k = 64, (80 if odd else 128), (24 if odd else 256), 2
    bank_sizes = [3, 5]
    E = sum(bank_sizes)
    A = T * top_k

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    expert_idx = torch.randint(0, E, (A,), generator=gen)
    token_idx = torch.arange(A) // top_k
    order = torch.argsort(expert_idx, stable=True)
    counts = torch.bincount(expert_idx, minlength=E)
    token_sorted = token_idx[order]
    weight_sorted = torch.rand(A, generator=gen)
    x = rand(T, D)
    x_sorted = x[token_sorted]
    w_gate = [rand(n, F, D) for n in bank_sizes]
    w_up = [rand(n, F, D) for n in bank_sizes]
    w_down = [rand(n, D, F) for n in bank_sizes]
    one_bank = [torch.cat(w_gate)]

    # triton_gmm: plain, multi-bank, gather, scatter (+ dropped slots), and their backward kernels.
    y = g._forward(x_sorted, one_bank, counts, None, None, None, -1)
    g._forward(x_sorted, w_gate, counts, None, None, None, -1)
    g._forward(x, one_bank, counts, token_sorted, None, None, -1)
    h = rand(A, F)
    g._forward(h, [torch.cat(w_down)], counts, None, order, weight_sorted, A)
    g._forward(h, w_down, counts, None, order, weight_sorted, A + 7)
    g._grad_x(y, x_sorted, one_bank, counts, None, None, None, True, False)
    g._grad_x(y, x, w_gate, counts, token_sorted, None, None, True, False)
    g._grad_w(y, x_sorted, counts, None, None, None, [E], [True])
    g._grad_w(y, x_sorted, counts, None, None, None, bank_sizes, [False, True])
    # triton_swiglu: the whole expert step, forward and backward (gather, scatter, row-dot epilogue).
    _out, gate, up = s._swiglu_forward(x, w_gate, w_up, w_down, counts, token_sorted, order, weight_sorted, token_idx)
    s._swiglu_backward(rand(T, D), x, gate, up, w_gate, w_up, w_down, counts, token_sorted, weight_sorted,
                       True, [True, True], [True, True], [True, True], True)


def compile_all(dtypes: list[torch.dtype], first_config_only: bool = False, sweep_dtypes=(torch.bfloat16,),
                verbose: bool = False) -> CompileRecorder:
    """The first config (what MODULAR_GMM_AUTOTUNE=0 and the GPU test suites use) for every dtype, at model
    widths and at the tests' odd widths; then, unless first_config_only, every autotune config at
    model widths for sweep_dtypes (the training dtype: what the benchmarks and training tune over)."""
    import triton

    from modular.kernels import triton_gmm as g

    g._num_programs = lambda device: 132  # an H100 SXM / H200 has 132 SMs; only the grid size depends on it
    tuners = [g._gmm_kernel, g._gmm_dw_kernel]
    full = {id(t): list(t.configs) for t in tuners}
    assert all(isinstance(t, triton.runtime.autotuner.Autotuner) for t in tuners)
    passes = [(0, dtype, odd) for dtype in dtypes for odd in (False, True)]
    if not first_config_only:
        n_configs = max(len(c) for c in full.values())
        passes += [(i, dtype, False) for i in range(1, n_configs) for dtype in sweep_dtypes if dtype in dtypes]
    with CompileRecorder(verbose) as recorder:
        try:
            for i, dtype, odd in passes:
                for t in tuners:
                    t.configs = [full[id(t)][min(i, len(full[id(t)]) - 1)]]
                drive_launch_paths(dtype, odd=odd)
        finally:
            for t in tuners:
                t.configs = full[id(t)]
    recorder.first_configs = {  # what MODULAR_GMM_AUTOTUNE=0 keeps
        t.fn.fn.__name__ if hasattr(t.fn, "fn") else t.fn.__name__: _config_tuple(full[id(t)][0]) for t in tuners
    }
    return recorder


# ---------------------------------------------------------------------------------------------------
# Warm-up of Triton's cache for a GPU run: the same compiles, at the run's shapes, in parallel
# ---------------------------------------------------------------------------------------------------


def launch_patterns(kind: str, dtype: torch.dtype, E: int, D: int, F: int, T: int, top_k: int,
                    weight_dtype: torch.dtype | None = None) -> None:
    """The kernel launches of one workload, with the argument patterns of the real ops, on empty CPU tensors.

    kind "gmm": benchmarks/gmm_gpu.py's grouped GEMM x [T·k, D] -> [T·k, F] (forward, dX, dW);
    "permuted": the same for the three GEMMs of a SwiGLU expert step after a permute (gate/up D -> F,
    down F -> D); "fused": the SwiGLU op's forward and backward (triton_swiglu.py). Only the launches
    are made (no torch math on the empty tensors), so real model sizes cost no memory traffic. The
    routing weights are in `weight_dtype` (default `dtype`; the model's router gives fp32 under autocast).
    tests/test_gpu_check.py checks that these compile exactly what the real code paths compile.
    """
    from modular.kernels import triton_gmm as g

    A = T * top_k
    counts = torch.full((E,), A // E, dtype=torch.int64)
    counts[0] += A - int(counts.sum())

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt)

    def gmm(k_in, m_out):  # what the op and its autograd formula launch for x [A, k_in] @ w[E, m_out, k_in].T
        x, w, dy = empty(A, k_in), [empty(E, m_out, k_in)], empty(A, m_out)
        g._forward(x, w, counts, None, None, None, -1)
        g._grad_x(dy, x, w, counts, None, None, None, True, False)
        g._grad_w(dy, x, counts, None, None, None, [E], [True])

    if kind == "gmm":
        gmm(D, F)
    elif kind == "permuted":
        gmm(D, F)  # gate and up
        gmm(F, D)  # down
    elif kind == "fused":  # triton_swiglu._swiglu_forward and _swiglu_backward, launch by launch
        x, w_gate, w_down = empty(T, D), [empty(E, F, D)], [empty(E, D, F)]
        token_sorted = torch.zeros(A, dtype=torch.int64)
        order = torch.arange(A)
        weight_sorted = empty(A, dt=weight_dtype or dtype)
        g._forward(x, w_gate, counts, token_sorted, None, None, -1)  # gate, up
        h = empty(A, F)
        g._forward(h, w_down, counts, None, order, weight_sorted, A)
        dy = empty(T, D)
        g._grad_x(dy, h, w_down, counts, None, token_sorted, weight_sorted, True, True)
        g._grad_w(dy, h, counts, None, token_sorted, weight_sorted, [E], [True])
        d_gate = empty(A, F)
        g._grad_w(d_gate, x, counts, token_sorted, None, None, [E], [True])  # dW gate, up
        g._launch_gmm(d_gate, w_gate, counts, empty(A, D), A, transpose_w=False)  # dx rows of gate, up
    else:
        raise ValueError(f"launch pattern '{kind}' is unknown; allowed: gmm, permuted, fused.")


def gpu_workloads(names: list[str]) -> list[tuple]:
    """(kind, E, D, F, T, top_k, routing weight dtype or None) of the GPU check's steps: gmm_gpu.py's shapes and layer shapes, and the
    training model of train_throughput.py --gpu, read from those scripts so that they cannot drift."""
    import gmm_gpu
    import train_throughput

    from modular.config import compose_config

    tokens = 16384  # gmm_gpu.py's default --tokens
    out = []
    if "gmm" in names:
        out += [("gmm", e, k, m, tokens, 2, None) for e, k, m in gmm_gpu.SHAPES]
    if "layer" in names:
        for _, e, d, f, k in gmm_gpu.LAYER_SHAPES:
            out += [("fused", e, d, f, tokens, k, None), ("permuted", e, d, f, tokens, k, None)]
    if "train" in names:
        cfg = compose_config(train_throughput.GPU_MODEL)
        # Under bf16 autocast the router's weights come out fp32 (bf16 logits + an fp32 offset).
        out.append(("fused", cfg.experts.num_experts, cfg.model.d_model, cfg.experts.ffn_dim,
                    cfg.train.batch_size * cfg.train.seq_len, cfg.routing.top_k, "fp32"))
    return out


def _warm_task(task: tuple) -> tuple[int, list[str]]:
    """One (workload, dtype name, config index, capability) in a worker process: (kernels compiled, errors)."""
    (kind, E, D, F, T, top_k, weight_dtype), dtype_name, index, capability = task
    from modular.kernels import triton_gmm as g

    _Sm90Driver.capability = capability
    g._num_programs = lambda device: 132
    tuners = [g._gmm_kernel, g._gmm_dw_kernel]
    full = [list(t.configs) for t in tuners]
    for t, configs in zip(tuners, full):
        t.configs = [configs[min(index, len(configs) - 1)]]
    try:
        with CompileRecorder() as recorder:
            launch_patterns(kind, DTYPES[dtype_name], E, D, F, T, top_k, DTYPES.get(weight_dtype))
    finally:
        for t, configs in zip(tuners, full):
            t.configs = configs
    return len(recorder.hashes), [f"{key}: {message}" for key, message in recorder.errors]


def warm(names: list[str], dtype_name: str, jobs: int, first_config_only: bool = False) -> int:
    """Compiles every kernel the named GPU-check steps will launch, into Triton's cache, in `jobs` processes."""
    import concurrent.futures
    import multiprocessing
    import time

    from modular.kernels import triton_gmm as g

    n_configs = 1 if first_config_only else max(len(g._gmm_kernel.configs), len(g._gmm_dw_kernel.configs))
    major, minor = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else (9, 0)
    tasks = [(w, dtype_name, i, 10 * major + minor) for i in range(n_configs) for w in gpu_workloads(names)]
    start = time.perf_counter()
    compiled, errors = 0, []
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no state shared with this one
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        for n, errs in pool.map(_warm_task, tasks):
            compiled += n
            errors += errs
    print(f"warmed Triton's cache for {', '.join(names)} ({dtype_name}): {len(tasks)} tasks, {compiled} kernels "
          f"compiled or found in the cache, {len(errors)} errors, {time.perf_counter() - start:.0f} s "
          f"with {jobs} processes")
    for e in errors[:20]:
        print(f"- {e}")
    return 1 if errors else 0


def _config_tuple(cfg) -> tuple:
    kw = cfg.kwargs
    return (kw["BLOCK_ROWS"], kw["BLOCK_COLS"], kw["BLOCK_INNER"], cfg.num_warps, cfg.num_stages)


def summarize(recorder: CompileRecorder) -> tuple[list[str], list[str]]:
    """(markdown table rows, problems). A variant is (kernel, dtype, flags)."""
    variants: dict[tuple, dict] = {}
    for (name, dtype, flags, config), rec in recorder.records.items():
        v = variants.setdefault((name, dtype, flags), {"configs": {}, "errors": []})
        v["configs"][config] = rec
    for (name, dtype, flags, config), message in recorder.errors:
        v = variants.setdefault((name, dtype, flags), {"configs": {}, "errors": []})
        v["errors"].append(f"{config}: {message}")
    lines = [("| kernel | dtype | flags | configs compiled | fit in 227 KiB | first config fits | "
             "pipelined | wgmma | max shared KiB |"), "|---|---|---|---:|---:|---|---|---|---:|"]
    problems = []
    for (name, dtype, flags), v in sorted(variants.items()):
        configs = v["configs"]
        fits = {c: r["shared"] <= SM90_MAX_SHARED for c, r in configs.items()}
        first = recorder.first_configs.get(name)
        first_fits = fits.get(first)
        label = f"{name} {dtype} {'+'.join(flags) or '-'}"
        if v["errors"]:
            problems += [f"{label}: compile error {e}" for e in v["errors"]]
        if configs and not any(fits.values()):
            problems.append(f"{label}: no config fits in shared memory")
        if first_fits is False:
            problems.append(f"{label}: the first config {first} needs {configs[first]['shared']} bytes of shared "
                            "memory (MODULAR_GMM_AUTOTUNE=0 keeps only that one)")
        pipelined = sorted({r["pipelined"] for r in configs.values()})
        wgmma = sorted({r["wgmma"] for r in configs.values()})
        lines.append(
            f"| {name} | {dtype} | {'+'.join(flags) or '-'} | {len(configs)}/{len(configs) + len(v['errors'])} | "
            f"{sum(fits.values())} | {'—' if first_fits is None else ('yes' if first_fits else 'NO')} | "
            f"{'/'.join('yes' if p else 'no' for p in pipelined) or '—'} | "
            f"{'/'.join('yes' if w else 'no' for w in wgmma) or '—'} | "
            f"{max((r['shared'] for r in configs.values()), default=0) / 1024:.0f} |"
        )
    return lines, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma-separated: bf16, fp16, fp32")
    parser.add_argument("--first-config-only", action="store_true",
                        help="only the config MODULAR_GMM_AUTOTUNE=0 keeps (fast)")
    parser.add_argument("--sweep-dtypes", default="bf16",
                        help="dtypes whose every autotune config is compiled (default: the training dtype)")
    parser.add_argument("--verbose", action="store_true", help="print each kernel as it is compiled")
    parser.add_argument("--warm", metavar="STEPS",
                        help="instead of the check: compile the kernels of these GPU-check steps (comma-separated "
                             "from gmm, layer, train) at their shapes into Triton's cache, in parallel")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="--warm: the dtype")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="--warm: processes")
    args = parser.parse_args(argv)
    try:
        dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
        sweep = [DTYPES[d] for d in args.sweep_dtypes.split(",")]
    except KeyError as err:
        print(f"error: --dtypes has {err}; allowed are {', '.join(DTYPES)}.", file=sys.stderr)
        return 2
    if args.warm:
        names = args.warm.split(",")
        bad = [n for n in names if n not in ("gmm", "layer", "train")]
        if bad:
            print(f"error: --warm has {', '.join(bad)}; allowed are gmm, layer and train.", file=sys.stderr)
            return 2
        return warm(names, args.dtype, args.jobs, args.first_config_only)
    import triton

    recorder = compile_all(dtypes, args.first_config_only, sweep, args.verbose)
    lines, problems = summarize(recorder)
    print(f"# sm_90 compile check, triton {triton.__version__}, torch {torch.__version__} "
          f"(compiled on this CPU, nothing launched)\n")
    print("\n".join(lines))
    if problems:
        print("\nproblems:\n" + "\n".join(f"- {p}" for p in problems))
        return 1
    print("\nno problems: every variant compiles, some config fits, and the first config fits.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
