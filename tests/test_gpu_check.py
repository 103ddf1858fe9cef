"""The GPU check's Python parts on the CPU (benchmarks/gpu_check.sh --dry-run runs them all; this keeps the
fast ones working): the training table, the sync-site finder, the summary, and the shell script's plumbing.
"""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _benchmark(name):
    """A script of benchmarks/ as a module (benchmarks/ is not a package)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_training_rows_and_table_in_a_dry_run(tmp_path):
    # The real Trainer.train_step on a toy model: a matmul row, the dense model and the torch backend.
    tt = _benchmark("train_throughput")
    out = tmp_path / "rows.jsonl"
    rc = tt.main(["--gpu", "--dry-run", "--rows", "matmul,dense,torch", "--steps", "1", "--warmup", "1",
                  "--out", str(out)])
    assert rc == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in records] == ["matmul", "dense", "torch"]
    moe, dense = records[2], records[1]
    assert moe["total_params"] > 2 * moe["active_params"]  # 8 experts, top-2
    # The dense twin has the MoE's active parameters, up to the router.
    assert abs(dense["active_params"] - moe["active_params"]) / moe["active_params"] < 0.02
    assert "train.dtype=bf16" in moe["overrides"] and "kernels.backend=torch" in moe["overrides"]
    table = tt.gpu_table(records + [{"row": "triton", "error": "RuntimeError: boom"}])
    assert any(line.startswith("| torch |") for line in table)
    assert any("FAILED: RuntimeError: boom" in line for line in table)
    # tokens/s x FLOPs/token over the measured matmul peak, as printed
    mfu = moe["tokens_per_s"] * moe["train_flops_per_token"] / (records[0]["tflops"] * 1e12)
    assert f"{mfu:.3f}" in next(line for line in table if line.startswith("| torch |"))


def test_sync_sites_are_found_with_their_location():
    sync = _benchmark("sync_check")
    from modular.routing.stats import RoutingStats, routing_stats_vector

    probs = torch.softmax(torch.randn(6, 4), -1)
    expert_idx = probs.topk(2, -1).indices.reshape(-1)
    token_idx = torch.arange(6).repeat_interleave(2)
    weight = torch.rand(12)

    def read_stats():  # the statistics are read on the host here (a logging step does this)
        return RoutingStats(routing_stats_vector(probs, expert_idx, token_idx, weight, 4, 0), 4, [4]).as_dict()

    sites = sync.find_sync_sites(read_stats, dry_run=True)
    assert sites, "RoutingStats.as_dict reads values back to the host"
    assert all(s["site"].startswith("modular/routing/stats.py:") for s in sites)
    assert all(s["count"] >= 1 and s["code"] for s in sites)
    # Nothing is reported for code that stays on the device, and torch's own internals are not sites.
    assert sync.find_sync_sites(lambda: torch.randn(3).sum().item(), dry_run=True) == []
    lines = sync.report([{"backend": "torch", "sites": sites, "error_mode": "pass", "peak_gib": None,
                          "syncs_per_step": sum(s["count"] for s in sites)}], dry_run=True)
    assert lines[0].startswith("### kernels.backend=torch: FAIL")


def test_gpu_check_script_runs_its_env_step_and_packs_the_results(tmp_path):
    # The shell script's plumbing (steps, timeouts, summary, tar) with only its first, fast step.
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_STEPS": "env", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.tar.gz", "steps.tsv", "summary.md"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| env | ok |" in summary and "no wandb/avalanche/gguf" in summary
    # The summary, then the step statuses are printed last (a lent machine shows only the output's tail).
    assert summary.rstrip() in proc.stdout
    assert re.fullmatch(r"\[gpu_check\] +env ok \d+", proc.stdout.rstrip().splitlines()[-1])
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        assert {"./env.json", "./logs/env.log", "./summary.md"} <= set(tar.getnames())
    bad = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--fast"],
                         capture_output=True, text=True, env=env, timeout=60, check=False)
    assert bad.returncode == 2 and "the only option is --dry-run" in bad.stderr


def test_summary_shows_failed_steps_with_their_log_tail(tmp_path):
    summary = _benchmark("gpu_summary")
    (tmp_path / "logs").mkdir()
    (tmp_path / "steps.tsv").write_text("kernel_tests\tFAILED (exit 1)\t12\ngmm_bf16\tTIMEOUT after 120s\t120\n")
    (tmp_path / "logs" / "kernel_tests.log").write_text(
        "FAILED tests/kernels/test_triton_gmm.py::test_x - AssertionError\n1 failed, 3 passed in 2.00s\n")
    (tmp_path / "logs" / "gmm_bf16.log").write_text("compiling...\n")
    text = summary.summarize_run(tmp_path)
    assert "## Kernel tests, native (fp32/fp16/bf16, MODULAR_GMM_AUTOTUNE=0): FAILED (exit 1)" in text
    assert "FAILED tests/kernels/test_triton_gmm.py::test_x - AssertionError" in text
    assert "## Grouped GEMM, bf16 (benchmarks/gmm_gpu.py): TIMEOUT after 120s" in text
    assert "compiling..." in text  # no table came out: the log's tail is shown instead


WARM_CHECK = r"""
import sys, torch
sys.path[:0] = [{repo!r}, {repo!r} + "/benchmarks", {repo!r} + "/tests"]
import sm90_compile as sc  # compile-only launches for sm_90, no GPU needed
import gmm_gpu
from helpers import tiny_cfg
from modular.kernels import triton_gmm as g, triton_swiglu as s
from modular.models.moe import MoELayer

g._num_programs = lambda device: 132
for tuner in (g._gmm_kernel, g._gmm_dw_kernel):  # one config: enough to compare argument patterns
    tuner.configs = tuner.configs[:1]
g._check_inputs = s._check_inputs = s._check_swiglu_inputs = lambda *a, **k: None  # CPU tensors, JIT kernels

def compiled(fn):
    with sc.CompileRecorder() as recorder:
        try:
            fn()
        except AssertionError:  # nothing is computed: a benchmark's correctness check fails after its launches
            pass
    assert not recorder.errors, recorder.errors
    return recorder.hashes

T, D, F, k, bf16 = 16, 32, 48, 2, torch.bfloat16
for E in (8, 16):  # an expert count that is not a multiple of 16 (Mixtral's 8) and one that is
    real = compiled(lambda: gmm_gpu.measure_layer(T, E, D, F, k, bf16, device="cpu", bench=gmm_gpu._one_call))
    warm = compiled(lambda: [sc.launch_patterns(p, bf16, E, D, F, T, k) for p in ("fused", "permuted")])
    assert real == warm, ("layer", E, len(real), len(warm))
    real = compiled(lambda: gmm_gpu.measure(T, k, E, D, F, bf16, 1.0, 1, device="cpu", bench=gmm_gpu._one_call))
    assert real == compiled(lambda: sc.launch_patterns("gmm", bf16, E, D, F, T, k)), ("gmm", E)
    # Training: the MoE layer under bf16 autocast, as Trainer.train_step runs it.
    cfg = tiny_cfg(f"experts.num_experts={{E}}", f"experts.ffn_dim={{F}}")
    layer = MoELayer(D, E, cfg.experts, cfg.routing)
    layer.set_backend("triton")
    def train_step():
        with torch.autocast("cpu", dtype=bf16):
            y = layer(torch.randn(T, D, requires_grad=True))
        y.float().sum().backward()
    warm = compiled(lambda: sc.launch_patterns("fused", bf16, E, D, F, T, k, torch.float32))
    assert compiled(train_step) == warm, ("train", E)
print("warm patterns match")
"""


def test_cache_warm_up_compiles_what_the_real_code_paths_compile():
    # benchmarks/gpu_check.sh first compiles the kernels of its steps in parallel (sm90_compile.py --warm),
    # by replaying the ops' launches on empty tensors. A drift between that replay and the real code
    # (another argument, stride or dtype) would silently make the warm-up useless: compare the compiled
    # kernels' cache keys, on the CPU, for the same (small) shapes.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", WARM_CHECK.format(repo=str(REPO))], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    assert proc.returncode == 0 and "warm patterns match" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
