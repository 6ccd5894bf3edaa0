#!/usr/bin/env bash
# Mutation testing of one core module with mutmut: plant one small bug at a time (a flipped
# comparison, a changed constant, a dropped argument ...) and run the module's tests; a
# mutant that no test kills is a bug the suite would let through.
#   bash scripts/mutation.sh OUT MODULE [TEST ...]      e.g.
#   bash scripts/mutation.sh outputs/mutation/losses algorithms/losses.py
#   bash scripts/mutation.sh outputs/mutation core     # every module of the map below
# Without TESTs a module of the core gets its own fast tests (the map below). Runs on CPU in
# a scratch copy of the tracked files (the checkout is not touched) for at most
# MUTATION_BUDGET_S seconds (default 1800; the run can be continued by calling again with
# the same OUT) with MUTATION_JOBS workers (default: all cores); writes OUT/survivors.txt
# (`mutmut results`: the surviving and untested mutants), OUT/stats.json (counts) and
# OUT/mutmut.log. `mutmut show <name>` in OUT/work
# prints a mutant's diff. Needs `pip install -e ".[mutation]"`. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$(realpath -m "${1:?usage: mutation.sh OUT MODULE [TEST ...]}")
MODULE=${2:?usage: mutation.sh OUT MODULE [TEST ...]}
shift 2
declare -A TESTS=(
  [algorithms/losses.py]="tests/test_losses.py tests/test_latent_diagnostics.py tests/test_radd_losses.py
    tests/test_fast_paths.py::test_chunked_cross_entropy_matches_log_softmax
    tests/test_fast_paths.py::test_chunked_cross_entropy_in_bfloat16_keeps_float32_output
    tests/test_fast_paths.py::test_row_chunks_cover_the_rows_once_in_bounded_pieces"
  [algorithms/objectives.py]="tests/test_losses.py tests/test_radd_losses.py tests/test_padding_and_schedules.py tests/test_collapse_remedies.py"
  [noise_schedule.py]="tests/test_noise_schedule.py tests/test_losses.py"
  [sampling/samplers.py]="tests/test_samplers.py tests/test_samplers_radd.py tests/test_conditional.py"
  [algorithms/radd.py]="tests/test_radd_losses.py tests/test_radd_jobs.py"
  [data/order.py]="tests/test_order_and_resume_state.py tests/test_resume.py tests/test_distributed.py tests/test_resume_accumulation.py"
  [checkpointing/resume_state.py]="tests/test_order_and_resume_state.py tests/test_resume_accumulation.py"
)
if [ "$MODULE" = core ]; then  # every module of the map, one after the other, OUT/<name>
  for m in noise_schedule.py algorithms/losses.py algorithms/objectives.py sampling/samplers.py \
    algorithms/radd.py data/order.py checkpointing/resume_state.py; do
    bash "$ROOT/scripts/mutation.sh" "$OUT/$(basename "$m" .py)" "$m"
  done
  exit 0
fi
SELECTED=("$@")
if [ ${#SELECTED[@]} -eq 0 ]; then
  [ -n "${TESTS[$MODULE]:-}" ] || { echo "error: no default tests for $MODULE: name them" >&2; exit 2; }
  read -r -a SELECTED <<< "$(tr '\n' ' ' <<< "${TESTS[$MODULE]}")"  # entries may span lines
fi
[ -f "$MODULE" ] || { echo "error: $MODULE is not a file of this checkout" >&2; exit 2; }
[ -x .venv/bin/mutmut ] || { echo "error: mutmut is missing: pip install -e \".[mutation]\"" >&2; exit 2; }
WORK=$OUT/work
mkdir -p "$WORK"
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$WORK"  # tracked files only
ln -sfn "$ROOT/.venv" "$WORK/.venv"
# mutmut's fork server installs a SIGTERM handler (kill the other workers, exit 0) that
# every test process inherits; Lightning chains to it, so a test that sends itself a stop
# signal (tests/test_resume_accumulation.py) ended pytest with exit 0: a false "survived".
cat > "$WORK/mutmut_signals.py" <<'PLUGIN'
import signal


def pytest_configure(config):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
PLUGIN
list() { printf '"%s", ' "$@" | sed 's/, $//'; }
cat >> "$WORK/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["."]
only_mutate = ["$MODULE"]
pytest_add_cli_args_test_selection = [$(list "${SELECTED[@]}")]
pytest_add_cli_args = ["-p", "mutmut_signals", "-q", "-p", "no:cacheprovider", "-x"]
process_isolation = "forkserver"  # torch's thread pools do not survive a plain fork
EOF
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export VADD_CACHE_DIR=${VADD_CACHE_DIR:-$ROOT/.cache/vadd}
cd "$WORK"
set +e
timeout "${MUTATION_BUDGET_S:-1800}" .venv/bin/mutmut run --max-children "${MUTATION_JOBS:-$(nproc)}" \
  > "$OUT/mutmut.log" 2>&1
status=$?
set -e
.venv/bin/mutmut results > "$OUT/survivors.txt" 2>&1 || true
.venv/bin/mutmut export-cicd-stats > /dev/null 2>&1 || true
cp mutants/mutmut-cicd-stats.json "$OUT/stats.json" 2>/dev/null || true
echo "[mutation] $MODULE: $(tr -d ' \n' < "$OUT/stats.json" 2>/dev/null || echo 'no stats')"
echo "[mutation] survivors in $OUT/survivors.txt$([ $status -eq 124 ] && echo ' (budget reached: call again to go on)')"
