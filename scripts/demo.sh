#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the built-in default: GRPO on the toy reach task with the tiny
# random-initialised policy, on 2 CPU processes (gloo, one per core; one process: DEMO_PROCESSES=1). Training took
# 168 s on 2 cores at a load average of ~1.5 (greedy 0.33 -> 1.0, sampled 0.10 -> 0.98; docs/learning.md). Prints
# greedy and sampled success before -> after training and where the curve is; outputs (metrics.jsonl, plots,
# checkpoints) go to runs/tiny_toy_cpu. Extra args override the config, e.g. --train.iterations 20.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one torch thread per process: the tiny model is fastest this way
processes=${DEMO_PROCESSES:-2}
if [[ "$processes" == 1 ]]; then
  exec .venv/bin/python -m trainer train --config configs/tiny_toy_cpu.yaml --train.resume false "$@"
fi
exec .venv/bin/python -m accelerate.commands.launch --config_file accelerate_configs/cpu_2proc.yaml \
  --num_processes "$processes" -m trainer train --config configs/tiny_toy_cpu.yaml --train.resume false "$@"
