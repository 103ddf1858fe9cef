#!/usr/bin/env bash
# One command for a lent GPU (H100/H200): native Triton kernel tests, the GPU benchmark tables, a bf16
# training run (triton vs torch vs dense, eager and compiled) and the host syncs of a training step.
#
# Usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run]
#   OUTDIR gets summary.md (printed last), results.tar.gz (every log, JSON and table) and steps.tsv;
#   both are rewritten after every step, so a run cut short still leaves what it measured.
#   --dry-run: the same steps on this CPU with Triton's interpreter and tiny shapes (checks the script).
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (seconds for all steps; default 420 on a
# GPU, 2400 in a dry run), GPU_CHECK_STEPS (comma-separated step names to run; default all).
# Every step has its own timeout, capped by what is left of the budget; a failed or timed-out step is
# recorded with its log, and the next one runs. Missing pure-Python deps come from .gpu_deps/
# (benchmarks/gpu_deps.sh), which must be on PYTHONPATH; this script puts it there.
set -u -o pipefail

if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run]" >&2
    exit 2
fi
out="$1"
dry=0
if [ "${2:-}" = "--dry-run" ]; then
    dry=1
elif [ -n "${2:-}" ]; then
    echo "error: the second argument is '$2'; the only option is --dry-run." >&2
    exit 2
fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo" || exit 1
mkdir -p "$out" || exit 1
out="$(cd "$out" && pwd)"
# Logs live outside OUTDIR (only a few files may come back from a lent machine) and are packed there.
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
mkdir -p "$work/logs"
: > "$work/steps.tsv"

PY="${PYTHON:-python3}"
export PYTHONPATH="$repo:$repo/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MODULAR_CACHE="$work/cache"  # token shards of the embedded sample
export TRITON_CACHE_AUTOTUNING=1    # autotune results on disk: later steps reuse the earlier ones' tuning
if [ "$dry" = 1 ]; then
    export TRITON_INTERPRET=1
    budget="${GPU_CHECK_BUDGET_S:-2400}"
    dry_flag="--dry-run"
else
    unset TRITON_INTERPRET
    budget="${GPU_CHECK_BUDGET_S:-420}"
    dry_flag=""
fi
deadline=$((SECONDS + budget))
selected=",${GPU_CHECK_STEPS:-all},"

finish() {
    # summary.md, steps.tsv and results.tar.gz in OUTDIR, from whatever the steps have left so far.
    "$PY" "$repo/benchmarks/gpu_summary.py" "$work" > "$work/summary.md" 2> "$work/logs/summary.err" \
        || { echo "(the summary failed: see logs/summary.err)"; cat "$work/steps.tsv"; } > "$work/summary.md"
    cp "$work/summary.md" "$work/steps.tsv" "$out/"
    tar -czf "$out/results.tar.gz.tmp" -C "$work" --exclude=cache . && mv "$out/results.tar.gz.tmp" "$out/results.tar.gz"
}

# step NAME TIMEOUT_S COMMAND...: runs COMMAND with its output in logs/NAME.log, records the outcome.
step() {
    local name="$1" limit="$2"
    shift 2
    if [ "$selected" != ",all," ] && [[ "$selected" != *",$name,"* ]]; then
        return 0
    fi
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 20 ]; then
        printf '%s\tskipped (budget spent)\t0\n' "$name" >> "$work/steps.tsv"
        echo "[gpu_check] $name: skipped, the budget is spent"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit="$left"
    local start=$SECONDS
    echo "[gpu_check] $name (timeout ${limit}s) ..."
    timeout --kill-after=10 "$limit" "$@" > "$work/logs/$name.log" 2>&1
    local rc=$? status
    case "$rc" in
        0) status="ok" ;;
        124|137) status="TIMEOUT after ${limit}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$work/steps.tsv"
    echo "[gpu_check] $name: $status in $((SECONDS - start))s"
    finish
}

# --- the steps, most important first -------------------------------------------------------------

step env 60 "$PY" - "$work/env.json" <<'EOF'
import importlib.util, json, os, platform, shutil, subprocess, sys
import torch
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
try:
    import triton
    env["triton"] = triton.__version__
except ImportError as err:
    env["triton"] = f"missing ({err})"
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    env["gpu"] = f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        env["driver, max SM clock, power limit"] = q.stdout.strip()
else:
    env["gpu"] = "none (dry run)" if os.environ.get("TRITON_INTERPRET") == "1" else "none"
env["cc"] = shutil.which("cc") or shutil.which("gcc") or "missing (Triton needs a C compiler)"
env["cpus"] = os.cpu_count()
import hydra, omegaconf  # noqa: E401  (from .gpu_deps on the GPU machine)
env["hydra"] = f"{hydra.__version__} from {os.path.dirname(os.path.dirname(hydra.__file__))}"
import modular.cli, modular.train.trainer, modular.kernels.triton_swiglu, modular.models  # noqa: E401
heavy = [m for m in ("wandb", "avalanche", "gguf") if m in sys.modules]
env["imported at start-up"] = ", ".join(heavy) if heavy else "no wandb/avalanche/gguf (good)"
print(json.dumps(env, indent=1))
open(sys.argv[1], "w").write(json.dumps(env) + "\n")
EOF

kernel_tests=(tests/kernels/test_triton_gmm.py tests/kernels/test_triton_swiglu.py
              tests/kernels/test_moe_triton_backend.py tests/kernels/test_torch_gmm.py)
MODULAR_GMM_AUTOTUNE=0 step kernel_tests 150 "$PY" -m pytest -q -p no:cacheprovider -rfE \
    --junitxml="$work/kernel_tests.xml" "${kernel_tests[@]}" \
    --deselect tests/kernels/test_triton_gmm.py::test_autotuned_kernels_on_gpu

step gmm_bf16 120 "$PY" benchmarks/gmm_gpu.py --dtype bf16 $dry_flag
step gmm_layer 120 "$PY" benchmarks/gmm_gpu.py --dtype bf16 --layer $dry_flag

if [ "$dry" = 1 ]; then
    train_args=(--steps 1 --warmup 1)
else
    train_args=(--steps 10 --warmup 3)
fi
step train_eager 150 "$PY" benchmarks/train_throughput.py --gpu $dry_flag --rows matmul,triton,dense,torch \
    "${train_args[@]}" --out "$work/train_eager.jsonl"
step sync_check 90 "$PY" benchmarks/sync_check.py --backends triton,torch --json "$work/sync.json" $dry_flag
step train_compile 200 "$PY" benchmarks/train_throughput.py --gpu $dry_flag --rows triton+compile,dense+compile \
    "${train_args[@]}" --out "$work/train_compile.jsonl"
if [ "$dry" = 0 ]; then  # the interpreter runs one config: nothing to sweep on a CPU
    step autotuned_tests 120 "$PY" -m pytest -q -p no:cacheprovider -rfE \
        tests/kernels/test_triton_gmm.py::test_autotuned_kernels_on_gpu
fi

finish
echo
echo "[gpu_check] work folder: $work (packed into $out/results.tar.gz)"
echo
cat "$out/summary.md"
if grep -qv $'\tok\t' "$work/steps.tsv"; then
    exit 1
fi
exit 0
