#!/usr/bin/env bash
# One command for a lent GPU (H100/H200): native Triton kernel tests, the GPU benchmark tables, a bf16
# training run (triton vs torch vs dense, eager and compiled) and the host syncs of a training step.
#
# Usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run]
#   OUTDIR gets summary.md (printed last), results.tar.gz (every log, JSON and table) and steps.tsv;
#   both are rewritten after every step, so a run cut short still leaves what it measured.
#   --dry-run: the same steps on this CPU with Triton's interpreter and tiny shapes (checks the script).
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (seconds for all steps; default 400 on a
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
    budget="${GPU_CHECK_BUDGET_S:-400}"
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

wanted() {  # GPU_CHECK_STEPS selects steps by name
    [ "$selected" = ",all," ] || [[ "$selected" == *",$1,"* ]]
}

# The time a step may take: its own limit, capped by what is left of the budget (0: none left).
limit_for() {
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 20 ]; then echo 0; elif [ "$1" -gt "$left" ]; then echo "$left"; else echo "$1"; fi
}

record() {  # record NAME RC LIMIT START
    local status
    case "$2" in
        0) status="ok" ;;
        124|137) status="TIMEOUT after ${3}s" ;;
        *) status="FAILED (exit $2)" ;;
    esac
    printf '%s\t%s\t%s\n' "$1" "$status" "$((SECONDS - $4))" >> "$work/steps.tsv"
    echo "[gpu_check] $1: $status in $((SECONDS - $4))s"
    finish
}

skip() {
    printf '%s\tskipped (budget spent)\t0\n' "$1" >> "$work/steps.tsv"
    echo "[gpu_check] $1: skipped, the budget is spent"
}

# step NAME TIMEOUT_S COMMAND...: runs COMMAND with its output in logs/NAME.log, records the outcome.
step() {
    local name="$1" limit
    wanted "$name" || return 0
    limit="$(limit_for "$2")"
    shift 2
    [ "$limit" = 0 ] && { skip "$name"; return 0; }
    local start=$SECONDS
    echo "[gpu_check] $name (timeout ${limit}s) ..."
    timeout --kill-after=10 "$limit" "$@" > "$work/logs/$name.log" 2>&1
    record "$name" $? "$limit" "$start"
}

# background_step NAME TIMEOUT_S COMMAND...: the same, started in the background; background_wait records it.
bg_name=""
background_step() {
    bg_name="$1"
    wanted "$bg_name" || { bg_name=""; return 0; }
    bg_limit="$(limit_for "$2")"
    shift 2
    [ "$bg_limit" = 0 ] && { skip "$bg_name"; bg_name=""; return 0; }
    bg_start=$SECONDS
    echo "[gpu_check] $bg_name (background, timeout ${bg_limit}s) ..."
    {
        timeout --kill-after=10 "$bg_limit" "$@" > "$work/logs/$bg_name.log" 2>&1
        echo "$? $SECONDS" > "$work/$bg_name.done"  # its exit code and when it ended
    } &
    bg_pid=$!
}
background_wait() {
    [ -n "$bg_name" ] || return 0
    wait "$bg_pid"
    local rc end
    read -r rc end < "$work/$bg_name.done" || { rc=1; end=$SECONDS; }
    local now=$SECONDS
    record "$bg_name" "$rc" "$bg_limit" "$((bg_start + now - end))"
    bg_name=""
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

# Compiling the kernels of the timed steps (every autotune config, at their shapes) in parallel processes
# fills Triton's cache while the tests run; the autotuner would otherwise compile config after config.
if [ "$dry" = 1 ]; then
    warm_args=(--warm train --first-config-only --jobs 2)
else
    warm_args=(--warm gmm,layer,train --jobs "$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))")
fi
background_step warm_cache 200 "$PY" benchmarks/sm90_compile.py "${warm_args[@]}"

kernel_tests=(tests/kernels/test_triton_gmm.py tests/kernels/test_triton_swiglu.py
              tests/kernels/test_moe_triton_backend.py tests/kernels/test_torch_gmm.py)
# Spread over the cores where pytest-xdist is installed: the tests' time is mostly Triton compiling kernels.
xdist=()
if "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n 8); fi
MODULAR_GMM_AUTOTUNE=0 step kernel_tests 150 "$PY" -m pytest -q -p no:cacheprovider -rfE "${xdist[@]}" \
    --junitxml="$work/kernel_tests.xml" "${kernel_tests[@]}" \
    --deselect tests/kernels/test_triton_gmm.py::test_autotuned_kernels_on_gpu
background_wait  # the timed steps start on a quiet machine

step gmm_bf16 120 "$PY" benchmarks/gmm_gpu.py --dtype bf16 $dry_flag
step gmm_layer 120 "$PY" benchmarks/gmm_gpu.py --dtype bf16 --layer $dry_flag

if [ "$dry" = 1 ]; then
    train_args=(--steps 1 --warmup 1)
else
    train_args=(--steps 10 --warmup 3)
fi
step train_eager 150 "$PY" benchmarks/train_throughput.py --gpu $dry_flag --rows matmul,triton,dense,torch \
    "${train_args[@]}" --out "$work/train_eager.jsonl"
MODULAR_GMM_AUTOTUNE=0 step sync_check 90 "$PY" benchmarks/sync_check.py --backends triton,torch --json "$work/sync.json" $dry_flag
step train_compile 200 "$PY" benchmarks/train_throughput.py --gpu $dry_flag --rows triton+compile,dense+compile \
    "${train_args[@]}" --out "$work/train_compile.jsonl"
if [ "$dry" = 0 ]; then  # the interpreter runs one config: nothing to sweep on a CPU
    step autotuned_tests 120 "$PY" -m pytest -q -p no:cacheprovider -rfE \
        tests/kernels/test_triton_gmm.py::test_autotuned_kernels_on_gpu
fi

finish
echo
cat "$out/summary.md"
echo
echo "[gpu_check] steps (name, status, seconds), also in $out/summary.md and results.tar.gz:"
tr '\t' ' ' < "$work/steps.tsv" | sed 's/^/[gpu_check]   /'
failed=0
grep -qv $'\tok\t' "$work/steps.tsv" && failed=1
[ "${GPU_CHECK_KEEP_WORK:-0}" = 1 ] || rm -rf "$work"
exit "$failed"
