#!/usr/bin/env bash
# Every GPU/TPU measurement of the project, in one prepared run of under 8 minutes.
#
#   benchmarks/accelerator.sh            # on the accelerator machine: measure, write RESULTS.md sections
#   benchmarks/accelerator.sh --dry-run  # anywhere (CPU): the same steps at smoke shapes, nothing written
#
# Steps (each under its own time limit; the limits add up to 470 s on the accelerator; the dry run
# multiplies them by DRY_RUN_LIMIT_SCALE, default 4):
#   1. PPO iteration, ours vs TRL 1.8, GPT-2-small shape, float32   benchmarks/ppo_iteration.py --device gpu
#   2. the same in bfloat16                                          ... --device gpu --bf16
#   3. PPO iteration at the Qwen2.5-0.5B shape, update MFU, compile   benchmarks/ppo_qwen.py
#      seconds per phase
#   4. generate tokens/s, ours vs HF, and the bandwidth floor        benchmarks/generate.py --device gpu
#   5. GAE, associative scan vs its bytes floor                      benchmarks/gae.py
# Each script writes its own section of benchmarks/RESULTS.md and prints one JSON line last;
# the JSON lines are collected in $OUT/accelerator.jsonl (OUT defaults to benchmarks/out),
# each step's log in $OUT/<step>.log, and RESULTS.md is copied to $OUT. A failed or timed-out
# step is reported and the next one runs; the exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
: > "$OUT/accelerator.jsonl"
DRY=0
SCALE=1
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=1
  SCALE=${DRY_RUN_LIMIT_SCALE:-4}  # a shared CPU compiles slowly: the dry run is a check, not a budget
  export JAX_PLATFORMS=cpu
fi
if [[ $DRY == 0 ]]; then
  # JAX and torch share one device in steps 1, 2 and 4: JAX must not take 75% of it up front.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  "$PY" -c "import jax; d = jax.devices()[0]; assert d.platform != 'cpu', 'no accelerator: use --dry-run'; print(d)" \
    || exit 99
fi
failed=0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$(($2 * SCALE)); shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    tail -n 1 "$OUT/$name.log" | sed "s/^/{\"step\": \"$name\", \"result\": /; s/\$/}/" >> "$OUT/accelerator.jsonl"
    echo "   done in $((SECONDS - t0)) s"
  else
    echo "   FAILED (exit $?, $((SECONDS - t0)) s); last lines:"; tail -n 15 "$OUT/$name.log"
    failed=$((failed + 1))
  fi
}
if [[ $DRY == 1 ]]; then
  TRL_FLAG=--no-trl-1thread
  "$PY" -c "import trl" 2>/dev/null || { TRL_FLAG=--skip-trl; echo "(trl is not installed: the dry run skips the TRL half)"; }
  step ppo_gpt2_fp32 120 "$PY" benchmarks/ppo_iteration.py --device cpu --smoke --iterations 1 $TRL_FLAG
  step ppo_gpt2_bf16 120 "$PY" benchmarks/ppo_iteration.py --device cpu --smoke --bf16 --iterations 1 --skip-trl
  step ppo_qwen05b 150 "$PY" benchmarks/ppo_qwen.py --smoke
  step generate 150 "$PY" benchmarks/generate.py --device cpu --repeats 1 --no-write
  step gae 90 "$PY" benchmarks/gae.py --quick --repeats 2 --no-write
else
  step ppo_gpt2_fp32 110 "$PY" benchmarks/ppo_iteration.py --device gpu --iterations 3
  step ppo_gpt2_bf16 100 "$PY" benchmarks/ppo_iteration.py --device gpu --bf16 --iterations 3
  step ppo_qwen05b 130 "$PY" benchmarks/ppo_qwen.py --iterations 3
  step generate 90 "$PY" benchmarks/generate.py --device gpu --repeats 3
  step gae 40 "$PY" benchmarks/gae.py --repeats 5
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
fi
echo "accelerator.sh: $failed step(s) failed; results in $OUT/accelerator.jsonl"
exit "$failed"
