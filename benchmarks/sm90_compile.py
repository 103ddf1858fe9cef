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

SM90_MAX_SHARED = 232448  # bytes a block may opt into on sm_90 (227 KiB), as Triton checks at load time
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLAGS = ("MULTI_BANK", "GATHER_A", "SCATTER_C", "SCALE", "ROW_DOT", "GATHER_H", "SUBSET", "GATHER_DY",
         "GATHER_X", "EVEN_INNER")


class _Sm90Driver:
    """Just enough of Triton's CUDA driver for compiling: the target, a device and a stream id."""

    def __init__(self, capability: int = 90):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

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
        self.errors: list[tuple[tuple, str]] = []
        self._jit = JITFunction
        self._original_run = JITFunction.run
        self.variant = ()

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
    args = parser.parse_args(argv)
    try:
        dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
        sweep = [DTYPES[d] for d in args.sweep_dtypes.split(",")]
    except KeyError as err:
        print(f"error: --dtypes has {err}; allowed are {', '.join(DTYPES)}.", file=sys.stderr)
        return 2
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
