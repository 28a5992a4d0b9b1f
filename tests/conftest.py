import os

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def toy_observations():
    """Three observations with different instructions (so prompts pad differently) and random frames."""
    from trainer.envs.base import Observation

    rng = np.random.default_rng(0)
    instructions = ["move to the red target", "go to the blue one, now please", "x"]
    return [
        Observation(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                    rng.uniform(-1, 1, 8).astype(np.float32), text)
        for text in instructions
    ]


def pytest_configure(config):
    # One torch thread per process: tests run beside env workers and other processes on a 2-core machine, where
    # torch's default pool made tiny-model runs 3-20x slower (measured). Subprocesses inherit the variable.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_torch_determinism():
    """train(deterministic=True) switches torch's global flag on; give every test the state it started with."""
    import torch

    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.set_num_threads(threads)
