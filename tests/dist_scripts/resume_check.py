"""Resume on ONE process from checkpoints written by 2-process runs (any backend): the trainable weights and the
optimizer state come back exactly, and the next update equals the one the 2-process run took after saving.

    python tests/dist_scripts/resume_check.py --out result.json RUN_DIR [RUN_DIR ...]

RUN_DIR is a backend_check.py output folder (ckpt/checkpoints/iter-000003, at_save*.safetensors, moved.safetensors).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import fixed_samples, flat_optimizer, max_abs_diff, run_update, tiny_config, tiny_engine, write_json
from safetensors.torch import load_file

from trainer.checkpoint import load_checkpoint
from trainer.dist import Dist, DistConfig
from trainer.train import TrainState


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist = Dist.create(DistConfig(timeout_minutes=3))  # a hang becomes an error naming the collective, not a wait
    assert dist.world_size == 1
    results = {"backend": dist.backend}
    for run in map(Path, args.runs):
        started = time.perf_counter()
        config = tiny_config()
        engine, scheduler = tiny_engine(config, dist)
        state = TrainState(**load_checkpoint(run / "ckpt" / "checkpoints" / "iter-000003", engine, scheduler))
        loaded = engine.trainable_state()
        loaded_optimizer = flat_optimizer(engine.optimizer_state())
        everything = fixed_samples(engine.policy)
        engine.policy.train()
        run_update(config, engine, everything, iteration=3, padding_inputs=everything.inputs[0])
        results[run.name] = {
            "weights_max_diff": max_abs_diff(load_file(str(run / "at_save.safetensors")), loaded),
            "optimizer_max_diff": max_abs_diff(load_file(str(run / "at_save_optimizer.safetensors")), loaded_optimizer),
            "optimizer_entries": len(loaded_optimizer),
            "next_update_max_diff": max_abs_diff(load_file(str(run / "moved.safetensors")),
                                                 engine.trainable_state()),
            "iteration": state.iteration, "skip_reasons": state.skip_reasons,
            "seconds": time.perf_counter() - started,
        }
    write_json(Path(args.out), results)


if __name__ == "__main__":
    main()
