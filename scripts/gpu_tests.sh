#!/usr/bin/env bash
# On a GPU machine (no network), from the checkout root: install the brought-along wheels and the
# project (scripts/gpu_setup.sh), then run the gpu-marked tests and the benchmarks, writing every
# log into RESULTS_DIR.
#
#   bash scripts/gpu_tests.sh RESULTS_DIR                        # pytest -m gpu: every gpu-marked test
#   bash scripts/gpu_tests.sh RESULTS_DIR -m gpu plugins/liger   # other pytest arguments instead
#   BENCHMARKS="moe cli_startup" bash scripts/gpu_tests.sh ...  # only these benchmarks/NAME.py
#   BENCHMARKS= bash scripts/gpu_tests.sh ...                   # no benchmarks
#
# Prepare here first (with network): bash scripts/fetch_gpu_wheels.sh (creates .whl/).
set -uo pipefail
results=${1:?usage: bash scripts/gpu_tests.sh RESULTS_DIR [PYTEST_ARGS...]}
shift
mkdir -p "$results"
source scripts/gpu_setup.sh
ftcore env > "$results/env.txt" 2>&1
cat "$results/env.txt"

[ $# -gt 0 ] || set -- -m gpu
python3 -m pytest -q -rs "$@" 2>&1 | tee "$results/tests.log"
status=${PIPESTATUS[0]}
[ "$status" -eq 5 ] && status=0  # no test selected

for name in ${BENCHMARKS-$(cd benchmarks && ls *.py | sed 's/\.py$//')}; do
  echo "== benchmarks/$name.py"
  python3 "benchmarks/$name.py" 2>&1 | tee "$results/bench-$name.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit "$status"
