#!/usr/bin/env bash
# Writes benchmarks/results/triton_compat.md: the offline sm_90a compile report of every kernel configuration on
# triton 3.6.0 (this venv) beside triton 3.9.0 (laid over the venv's torch, as .ci/triton_compat does). No GPU needed.
#   . .venv/bin/activate && bash benchmarks/triton_compat_report.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NEW="${TRITON_COMPAT_VERSION:-3.9.0}"
overlay="$(mktemp -d)"
trap 'rm -rf "$overlay"' EXIT
pip install --quiet --no-warn-conflicts --target "$overlay" "triton==${NEW}" "numpy>=2.4,<2.5"
out=benchmarks/results/triton_compat.md
{
  echo "# Kernel compile report: triton $(python -c 'import triton; print(triton.__version__)') vs ${NEW} (offline sm_90a, no GPU)"
  echo
  echo "- command: \`bash benchmarks/triton_compat_report.sh\` (both reports from \`python -m fastvmt_kernels.inspect --check\`;"
  echo "  ${NEW} laid over this venv's torch $(python -c 'import torch; print(torch.__version__)') through PYTHONPATH, as \`.ci/triton_compat\` does)"
  echo "- code commit: \`$(git rev-parse --short HEAD)\`$(git diff --quiet HEAD -- fastvmt_kernels || echo ' plus uncommitted kernel changes'); date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- columns as in the README: registers, spill bytes (stack), shared memory, HGMMA instructions in the SASS, SASS"
  echo "  instructions of one hot-loop iteration (loop), spill reloads / stores inside it; \`--check\` passed on both"
  echo "- the kernel tests under the interpreter on ${NEW}: \`bash .ci/triton_compat\` (CI's second stage)"
  echo
  echo '```'
  python -m fastvmt_kernels.inspect --check 2>&1 | grep -v -i warn
  echo
  PYTHONPATH="$overlay" TRITON_DEFAULT_FP_FUSION=1 python -m fastvmt_kernels.inspect --check 2>&1 | grep -v -i warn
  echo '```'
} > "$out"
echo "$out"
