#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the built-in default: GRPO on the toy reach task with the tiny
# random-initialised policy, one CPU process (about 5 minutes on 2 cores). Prints greedy and sampled success before
# and after training; outputs (metrics.jsonl, plots, checkpoints) go to runs/tiny_toy_cpu. Extra args override the
# config, e.g. --train.iterations 20.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # the tiny model is fastest on one thread beside the env workers
exec .venv/bin/python -m trainer train --config configs/tiny_toy_cpu.yaml --train.resume false "$@"
