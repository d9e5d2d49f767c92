#!/usr/bin/env bash
# One prepared run for a lent GPU (H100): GPU kernel tests, the sm_90a inspection, then every
# benchmarks/bench_*.py. Everything lands under $OUT in a few files:
#   gpu_suite.log (all stage output + per-stage exit codes), inspect.txt, results.tar.gz (benchmarks/results/),
#   and a copy of each results/*.md.
# Total budget under 8 minutes; each stage is guarded by `timeout`.
#
#   bash benchmarks/fetch_gpu_wheels.sh   # here, once: diffusers wheels into .whl/ (git-ignored)
#   bash benchmarks/gpu_suite.sh          # on the GPU machine (device tool: carry [".whl"]), $OUT set by the caller
#   bash benchmarks/gpu_suite.sh --dry    # CPU: tiny interpreter version, OUT defaults to a temp dir
#
# Environment knobs (mainly for the dry run / CI):
#   FASTVMT_SUITE_TESTS    pytest arguments of the test stage
#   FASTVMT_SUITE_BENCH    pytest arguments of the benchmark stage (default: benchmarks)
#   FASTVMT_SUITE_INSPECT  arguments of `python -m fastvmt_kernels.inspect` (default: none = every kernel)
#   FASTVMT_SUITE_SKIP     space-separated stages to skip: tests inspect bench
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry" ]] && DRY=1
if [[ $DRY == 1 ]]; then
  OUT="${OUT:-$(mktemp -d -t fastvmt-gpu-suite-dry-XXXXXX)}"
  export FASTVMT_BENCH_DRY=1 TRITON_INTERPRET=1
  export FASTVMT_BENCH_OUT="$OUT/results"
  TESTS_ARGS="${FASTVMT_SUITE_TESTS:-tests/test_local_attention_triton.py -k opcheck}"
  BENCH_ARGS="${FASTVMT_SUITE_BENCH:-benchmarks/bench_local_attention.py --benchmark-disable}"
  INSPECT_ARGS="${FASTVMT_SUITE_INSPECT:---filter local_attention_fwd}"
  RESULTS_SRC="$FASTVMT_BENCH_OUT"
  T_TESTS=120; T_INSPECT=120; T_BENCH=180
else
  : "${OUT:?set OUT to the output folder}"
  export FASTVMT_GPU_TESTS=1
  unset TRITON_INTERPRET
  TESTS_ARGS="${FASTVMT_SUITE_TESTS:-tests -k \"not pipeline and not testbed and not cli and not gpu_suite_dry and not test_inspect\"}"
  BENCH_ARGS="${FASTVMT_SUITE_BENCH:-benchmarks}"
  INSPECT_ARGS="${FASTVMT_SUITE_INSPECT:-}"
  RESULTS_SRC="benchmarks/results"
  T_TESTS=140; T_INSPECT=60; T_BENCH=250
fi
mkdir -p "$OUT"
# Wheels carried to the GPU machine (benchmarks/fetch_gpu_wheels.sh; the device tool's carry: [".whl"]).
if [[ $DRY == 0 ]] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastvmt-site .whl/*.whl \
    && export PYTHONPATH="/tmp/fastvmt-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/gpu_suite.log"
: > "$LOG"
SKIP=" ${FASTVMT_SUITE_SKIP:-} "
FAILED=0

log() { echo "$*" | tee -a "$LOG"; }

stage() {  # stage NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  if [[ "$SKIP" == *" $name "* ]]; then log "=== stage $name: skipped"; return; fi
  log "=== stage $name (timeout ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" bash -c "set -o pipefail; $*" >> "$LOG" 2>&1
  local rc=$?
  log "=== stage $name: rc=$rc in $((SECONDS - start))s"
  [[ $rc != 0 ]] && FAILED=1
}

log "fastvmt gpu suite, dry=$DRY, $(date -u +%Y-%m-%dT%H:%M:%SZ), OUT=$OUT"
if command -v nvidia-smi > /dev/null; then nvidia-smi >> "$LOG" 2>&1; else log "no nvidia-smi (CPU run)"; fi
python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" >> "$LOG" 2>&1

stage tests "$T_TESTS" "python -m pytest -q -p no:cacheprovider $TESTS_ARGS"
stage inspect "$T_INSPECT" "env -u TRITON_INTERPRET python -m fastvmt_kernels.inspect $INSPECT_ARGS | tee '$OUT/inspect.txt'"
stage bench "$T_BENCH" "FASTVMT_BENCH_COMMAND='bash benchmarks/gpu_suite.sh' python -m pytest -q -p no:cacheprovider --continue-on-collection-errors $BENCH_ARGS"

if [[ -d "$RESULTS_SRC" ]]; then
  tar -czf "$OUT/results.tar.gz" -C "$RESULTS_SRC" . && cp "$RESULTS_SRC"/*.md "$OUT"/ 2> /dev/null
fi
log "=== suite done: failed=$FAILED, files: $(ls "$OUT" | tr '\n' ' ')"
exit $FAILED
