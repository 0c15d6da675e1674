#!/usr/bin/env bash
# The GPU measurement of D-LEAF's per-token cost as one prepared command (docs/performance.md, "On a GPU"):
#
#   bash scripts/gpu_check.sh                              # one GPU: the llava7b preset in bfloat16 (about 8 min)
#   bash scripts/gpu_check.sh --device cpu --preset tiny   # its rehearsal on a CPU (well under a minute)
#
# It runs scripts/bench.py --preset llava7b --device cuda --dtype bfloat16 followed by any flags given here (a later
# flag wins): first the checks (the benchmark's loop equals generate; D-LEAF at gamma 0 decodes plain decoding's
# tokens and logits; the compiled step computes the eager step's logits), then the paired steps, the whole-run
# timing, peak memory and scoring, writing bench.json after each phase. Then it writes bench.md and checks.md from
# whatever bench.json holds (also when the time limit cut the run short) and prints the checks.
#
# Output: --output_dir if given, else $OUT when set, else runs/gpu_check. Time limit of the benchmark itself:
# $GPU_CHECK_LIMIT_S seconds (default 450). Python: $PYTHON, else .venv/bin/python, else python3 (it needs a CUDA
# build of torch for --device cuda, and the project's dependencies; the project itself is imported from this
# checkout, installed or not). Exit status 0 only when the run finished and every check passed.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUTDIR="${OUT:-runs/gpu_check}"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --output_dir | --output-dir) OUTDIR="${args[$((i + 1))]:-$OUTDIR}" ;;
        --output_dir=* | --output-dir=*) OUTDIR="${args[$i]#*=}" ;;
    esac
done
export HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's dleaf, installed or not
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false

start=$(date +%s)
timeout --signal=INT --kill-after=20 "${GPU_CHECK_LIMIT_S:-450}" \
    "$PY" scripts/bench.py --preset llava7b --device cuda --dtype bfloat16 --output_dir "$OUTDIR" "$@"
rc=$?
echo "gpu_check: scripts/bench.py exited with status $rc after $(( $(date +%s) - start )) s" >&2

"$PY" -m dleaf.bench.summary "$OUTDIR" --bench_status "$rc"
