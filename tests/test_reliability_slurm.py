"""scripts/slurm_train.sbatch's signal path, on the CPU with a fake `srun` and `scontrol` on PATH.

SLURM marks a job that reaches its time limit TIMEOUT and `--requeue` does not requeue it (sbatch man page), so the
script asks for USR1 before the limit (`--signal=B:USR1@600`), forwards SIGTERM to srun, waits until the trainer has
saved and exited, then runs `scontrol requeue $SLURM_JOB_ID` itself. A plain SIGTERM (preemption, scancel) is
forwarded the same way but not requeued by the script.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_train.sbatch"

# srun stands for the launcher: it logs its arguments, and on SIGTERM "saves" for a second (the trainer's checkpoint)
# before it exits, so the test sees whether the batch shell waited for it.
FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$EVENTS"
trap 'sleep 1; echo saved >> "$EVENTS"; exit 0' TERM
touch "$EVENTS.started"
for _ in $(seq 600); do sleep 0.1; done
echo "srun ran to its end" >> "$EVENTS"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1" in
    show) echo node0; echo node1 ;;
    *) echo "scontrol $*" >> "$EVENTS" ;;
esac
"""


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_the_batch_script_forwards_the_stop_waits_for_the_save_then_requeues_on_usr1(tmp_path, sig, requeued):
    fake_bin, events = tmp_path / "bin", tmp_path / "events.log"
    fake_bin.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "EVENTS": str(events), "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_SUBMIT_DIR": str(ROOT)}
    log = tmp_path / "batch.log"
    with open(log, "w") as out:  # a file, not a pipe: a fake srun left behind must not hold the test's reads open
        proc = subprocess.Popen(["bash", str(SCRIPT), "--config", "configs/x.yaml"], env=env, cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not Path(f"{events}.started").exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(sig)  # what SLURM sends to the batch shell (B:USR1 before the limit; TERM on preemption)
        proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the batch shell and whatever it started (the fake srun)
            os.killpg(proc.pid, signal.SIGKILL)
    output = log.read_text()
    assert proc.returncode == 0, output
    lines = events.read_text().splitlines()
    assert lines[0].startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c") and lines[0].endswith(
        "launch --config configs/x.yaml"), lines
    # The launcher got SIGTERM and finished saving before anything else happened; the requeue came after it.
    assert lines[1:] == (["saved", "scontrol requeue 4242"] if requeued else ["saved"]), (lines, output)
