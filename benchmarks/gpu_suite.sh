#!/usr/bin/env bash
# One prepared run for a lent GPU (H100): every benchmarks/bench_*.py (one stage each), then the GPU kernel tests
# (the sm_90a inspection only on request: it runs offline anywhere). Everything lands under $OUT in a few files:
#   gpu_suite.log (all stage output + per-stage exit codes), inspect.txt, results.tar.gz (benchmarks/results/),
#   and a copy of the GPU benchmarks' tables (results/{motion_flow_gpu,pipeline,local_attention}.md).
# Total budget under 8 minutes; each stage is guarded by `timeout`.
#
#   bash benchmarks/fetch_gpu_wheels.sh   # here, once: diffusers wheels into .whl/ (git-ignored)
#   bash benchmarks/gpu_suite.sh          # on the GPU machine (device tool: carry [".whl"]), $OUT set by the caller
#   bash benchmarks/gpu_suite.sh --dry    # CPU: tiny interpreter version, OUT defaults to a temp dir
#
# Environment knobs (mainly for the dry run / CI):
#   FASTVMT_SUITE_TESTS    pytest arguments of the test stage
#   FASTVMT_SUITE_BENCH    pytest arguments of one benchmark stage (default: one stage per file of BENCH_STAGES)
#   FASTVMT_SUITE_INSPECT  arguments of `python -m fastvmt_kernels.inspect` (default: none = every kernel)
#   FASTVMT_SUITE_SKIP     space-separated stages to skip: tests inspect bench bench_<file> (GPU default: inspect)
#   FASTVMT_SUITE_BENCH_TIMEOUT  seconds for the FASTVMT_SUITE_BENCH stage (default 200; e.g. inductor compilation)
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry" ]] && DRY=1
# The kernel-level test files (the pipeline/testbed/CLI tests exercise the same kernels on tiny models); the joint-
# attention tests last: if the stage runs out of time, the core kernels have been tested.
GPU_TEST_FILES="tests/test_index_math.py tests/test_motion_flow.py tests/test_local_attention_triton.py tests/test_device_limits.py tests/test_local_attention_reference.py tests/test_adamw.py tests/test_losses.py tests/test_joint_local_attention.py"
# Benchmark files, one stage each with its own timeout (seconds), most needed first: a slow one cannot starve the rest.
BENCH_STAGES=("motion_flow 60" "motion_flow_host 25" "pipeline 175" "local_attention 110")
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
  TESTS_ARGS="${FASTVMT_SUITE_TESTS:--rf --durations=8 $GPU_TEST_FILES}"
  BENCH_ARGS="${FASTVMT_SUITE_BENCH:-}"
  INSPECT_ARGS="${FASTVMT_SUITE_INSPECT:-}"
  RESULTS_SRC="benchmarks/results"
  T_TESTS=110; T_INSPECT=60; T_BENCH="${FASTVMT_SUITE_BENCH_TIMEOUT:-200}"
  # The sm_90a inspection needs no GPU (it compiles offline, also on the CPU machines): skipped unless asked for.
  FASTVMT_SUITE_SKIP="${FASTVMT_SUITE_SKIP-inspect}"
fi
mkdir -p "$OUT"
# Only what this run writes comes back: benchmarks/results/ already holds the committed tables of earlier runs, which a
# skipped, failed or timed-out stage would otherwise return under the expected names.
STARTED="$OUT/.suite_started"
touch "$STARTED"
sleep 1  # file times have one-second resolution on some file systems
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

BENCH_ENV="FASTVMT_BENCH_COMMAND='bash benchmarks/gpu_suite.sh'"
if [[ -n "$BENCH_ARGS" ]]; then  # explicit pytest arguments: one bench stage
  stage bench "$T_BENCH" "$BENCH_ENV python -m pytest -q -p no:cacheprovider --continue-on-collection-errors $BENCH_ARGS"
else
  for entry in "${BENCH_STAGES[@]}"; do
    read -r name limit <<< "$entry"
    stage "bench_$name" "$limit" "$BENCH_ENV python -m pytest -q -p no:cacheprovider benchmarks/bench_$name.py"
  done
fi
# A fresh GPU machine spends most of the test stage compiling kernel specialisations (run 5: 52 of 126 tests in 140 s;
# the same tests took 39 s with a warm cache): with pytest-xdist carried in .whl/, TEST_WORKERS processes compile
# in parallel (each its own CUDA context; the tests are small).
TEST_WORKERS=8
XDIST=""
if [[ $DRY == 0 ]] && python -c "import xdist" 2> /dev/null; then XDIST="-n $TEST_WORKERS"; fi
stage tests "$T_TESTS" "python -m pytest -q -p no:cacheprovider $XDIST $TESTS_ARGS"
stage inspect "$T_INSPECT" "env -u TRITON_INTERPRET python -m fastvmt_kernels.inspect $INSPECT_ARGS | tee '$OUT/inspect.txt'"

if [[ -d "$RESULTS_SRC" ]]; then
  NEW_RESULTS=$(cd "$RESULTS_SRC" && find . -maxdepth 1 -type f -newer "$STARTED" | sort)
  if [[ -n "$NEW_RESULTS" ]]; then
    (cd "$RESULTS_SRC" && tar -czf "$OUT/results.tar.gz" $NEW_RESULTS)
  fi
  # The device tool returns at most 8 files: copy the GPU benchmarks' tables beside the tarball, those written now.
  for table in motion_flow_gpu motion_flow_host_gpu pipeline pipeline_end_to_end local_attention; do
    if [[ "$RESULTS_SRC/$table.md" -nt "$STARTED" ]]; then cp "$RESULTS_SRC/$table.md" "$OUT"/; fi
  done
  log "results written by this run: $(echo $NEW_RESULTS | tr '\n' ' ')"
fi
rm -f "$STARTED"
log "=== suite done: failed=$FAILED, files: $(ls "$OUT" | tr '\n' ' ')"
exit $FAILED
