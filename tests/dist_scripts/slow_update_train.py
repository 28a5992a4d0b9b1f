"""`python -m trainer train ARGS` whose update is slow, for the launcher SIGTERM test (tests/test_reliability_launch.py).

Every micro-batch of the update sleeps $SLOW_MICRO_BATCH_S seconds first, so that an update lasts longer than the
launcher's grace period between SIGTERM and SIGKILL (torchrun: 30 s), as a 7B model's update does; each rank touches
$UPDATE_MARKER.rank<r> when its first micro-batch starts, so the test knows when to send the signal.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trainer.train  # noqa: E402
from trainer.cli import main  # noqa: E402

real_objective = trainer.train.objective


def slow_objective(*args, **kwargs):
    Path(f"{os.environ['UPDATE_MARKER']}.rank{os.environ.get('RANK', '0')}").touch()
    time.sleep(float(os.environ["SLOW_MICRO_BATCH_S"]))
    return real_objective(*args, **kwargs)


trainer.train.objective = slow_objective  # train() binds the module's objective when it builds the loss function
main(["train", *sys.argv[1:]])
