#!/usr/bin/env bash
# Copies the pure-Python packages the GPU machine lacks (hydra, omegaconf, antlr4 runtime) from this
# machine's venv into .gpu_deps/, which travels with the repo: run(carry=[".gpu_deps"]), PYTHONPATH=$PWD:$PWD/.gpu_deps.
#
# Usage: bash benchmarks/gpu_deps.sh [SITE_PACKAGES]   (default: /work/main/.venv's site-packages)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
site="${1:-$(/work/main/.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')}"
dest="$repo/.gpu_deps"
packages=(hydra omegaconf antlr4)

tmp="$(mktemp -d "$repo/.gpu_deps.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
for pkg in "${packages[@]}"; do
    if [ ! -d "$site/$pkg" ]; then
        echo "error: $site/$pkg is missing; install hydra-core and omegaconf into that venv first." >&2
        exit 1
    fi
    if find "$site/$pkg" -name '*.so' | grep -q .; then  # the GPU machine runs another Python version
        echo "error: $site/$pkg holds compiled extensions; only pure-Python packages can travel." >&2
        exit 1
    fi
    cp -r "$site/$pkg" "$tmp/"
done
for dist in "$site"/hydra_core-*.dist-info "$site"/omegaconf-*.dist-info "$site"/antlr4_python3_runtime-*.dist-info; do
    cp -r "$dist" "$tmp/"
done
find "$tmp" -name '__pycache__' -type d -prune -exec rm -rf {} +
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT

# Keep it out of git status (and out of commits) in every worktree of this repository.
exclude="$(git -C "$repo" rev-parse --git-common-dir)/info/exclude"
case "$exclude" in /*) ;; *) exclude="$repo/$exclude" ;; esac
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.gpu_deps/' "$exclude" 2>/dev/null || echo '/.gpu_deps/' >> "$exclude"
echo "copied ${packages[*]} ($(du -sh "$dest" | cut -f1)) to $dest"
