"""Fault 1 of issue #16: SIGTERM to a real launcher (torchrun, as under SLURM) while the ranks are inside a long update.

torchrun forwards SIGTERM to every rank and SIGKILLs them `--shutdown-timeout` seconds later (30 by default in torch
2.14; TORCH_ELASTIC_SHUTDOWN_TIMEOUT; `accelerate launch` runs the same agent). The update here lasts longer than that
(a slow objective, tests/dist_scripts/slow_update_train.py), as a 7B model's does: before, the stop was seen only after
the update and the ranks were killed with nothing saved. Now the ranks agree to stop at the next micro-batch, save the
last completed iteration and exit 0 within the grace period.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer.checkpoint import CHECKPOINTS, LATEST, OPTIMIZER_TENSORS, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_toy_cpu.yaml")
SCRIPT = str(ROOT / "tests" / "dist_scripts" / "slow_update_train.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def test_sigterm_to_torchrun_during_a_long_update_saves_the_last_iteration_and_exits_cleanly(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "update-started"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
           and not k.startswith(("ACCELERATE_", "TRAINER_ACCELERATE"))}
    env.update(WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               UPDATE_MARKER=str(marker), SLOW_MICRO_BATCH_S="4")
    env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)  # torchrun's default grace period: 30 s
    # 6 groups x 4 = 24 episodes, 12 per rank, one policy step or more each: >= 12 micro-batches of >= 4 s.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), SCRIPT, "--config", CONFIG, "--train.output_dir", str(run),
               "--train.iterations", "3", "--train.eval_every", "0", "--train.checkpoint_every", "0",
               "--env.groups_per_iteration", "6", "--rollout.num_generations", "4", "--env.num_workers", "6",
               "--algo.ppo_epochs", "1", "--algo.num_mini_batches", "1", "--algo.micro_batch_size", "1",
               "--log.progress", "false", "--log.plots", "false"]
    log = tmp_path / "torchrun.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not all(Path(f"{marker}.rank{r}").exists() for r in range(2)):
            assert proc.poll() is None, f"torchrun ended before the update:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no update started in time:\n{log.read_text()}"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)  # what SLURM (or a user) sends to the launcher
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
            proc.wait()
    output = log.read_text()
    # Both ranks stopped at an agreed micro-batch and saved; none was SIGKILLed after the grace period.
    assert "stop requested: checkpoint of iteration 0 saved" in output, output
    assert "SIGKILL" not in output and "Signals.SIGKILL" not in output, output
    checkpoint = latest_checkpoint(run)
    assert checkpoint == run / CHECKPOINTS / "iter-000000"
    assert (run / CHECKPOINTS / LATEST).read_text().strip() == "iter-000000"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["iteration"] == 0
    assert sorted(p.name for p in checkpoint.glob("rng-rank*.json")) == ["rng-rank0.json", "rng-rank1.json"]
    # The update was abandoned before its only optimizer step: the saved state is iteration 0's exactly (no
    # optimizer state yet, LoRA B still zero as initialised), so resume redoes iteration 1 from where it began.
    assert load_file(str(checkpoint / OPTIMIZER_TENSORS)) == {}
    adapter = load_file(str(checkpoint / "adapter_model.safetensors"))
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(t) == 0 for t in lora_b)
