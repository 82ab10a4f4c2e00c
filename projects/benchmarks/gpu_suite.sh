#!/usr/bin/env bash
# Everything that needs a GPU, in one call (under 8 minutes on one H200): offline install of the
# wheelhouse built by `make gpu-wheels`, then the parts of projects/benchmarks/gpu_suite.py (CUDA tests,
# MSDeformAttn Triton vs PyTorch, R50 inference FPS per stage, training memory, AMP training on shapes
# with its PQ, mask-wise merging on the GPU). Writes gpu_suite.json, gpu_suite.md and gpu_suite.log to
# OUT_DIR (default: $OUT). Each part reports its own status; a failing part never stops the next one.
#
#   bash projects/benchmarks/gpu_suite.sh [--dry-run] [--wheels DIR|none] [--parts a,b] [OUT_DIR]
#
#   --dry-run      the same parts on the CPU at tiny sizes (what the test suite runs)
#   --wheels DIR   wheelhouse to install from (default: .gpu-wheels of this checkout); "none" installs
#                  nothing and uses the interpreter's packages (e.g. a `make setup` checkout on a GPU box)
#   PYTHON=...     interpreter to use (default: python3, the one that holds torch on the GPU machine)
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
DRY=""
WHEELS="$REPO/.gpu-wheels"
PARTS=()
OUT_DIR="${OUT:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY="--dry-run" ;;
        --wheels) WHEELS="${2:?--wheels needs a folder or none}"; shift ;;
        --parts) PARTS=(--parts "${2:?--parts needs a list}"); shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        -*) echo "gpu_suite.sh: unknown option $1" >&2; exit 2 ;;
        *) OUT_DIR="$1" ;;
    esac
    shift
done
if [ -z "$OUT_DIR" ]; then
    echo "gpu_suite.sh: give an output folder (or set OUT)" >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PYTHON="${PYTHON:-python3}"
LOG="$OUT_DIR/gpu_suite.log"
: > "$LOG"

# Offline install: the wheels go to a folder of their own, put on PYTHONPATH after this checkout (so
# the project runs from its source tree) and before the interpreter's own packages.
SITE="${TMPDIR:-/tmp}/psf-gpu-suite-site"
start=$(date +%s)
if [ "$WHEELS" = "none" ]; then
    status=skipped; note="--wheels none: using the packages of $PYTHON"
elif compgen -G "$WHEELS/*.whl" > /dev/null; then
    rm -rf "$SITE"
    echo "===== install: $PYTHON -m pip install --no-index --no-deps --target $SITE $WHEELS/*.whl" >> "$LOG"
    if "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            --target "$SITE" "$WHEELS"/*.whl >> "$LOG" 2>&1; then
        status=passed; note="$(ls "$WHEELS" | grep -c '\.whl$') wheels from $WHEELS into $SITE"
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        status=failed; note="pip install from $WHEELS failed (see gpu_suite.log)"
    fi
elif [ -n "$DRY" ]; then
    status=skipped; note="dry run without a wheelhouse at $WHEELS: using the packages of $PYTHON"
else
    status=failed; note="no wheelhouse at $WHEELS: run 'make gpu-wheels' where a registry is reachable and carry .gpu-wheels"
fi
seconds=$(( $(date +%s) - start ))
echo "[gpu_suite] install: $status in ${seconds} s: $note"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

exec "$PYTHON" -m projects.benchmarks.gpu_suite --out "$OUT_DIR" $DRY "${PARTS[@]}" --install "$status" "$seconds" "$note"
