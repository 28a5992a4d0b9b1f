"""The pool interface with the envs in this process: for the toy task, whose step costs microseconds.

A subprocess round trip costs ~100 µs per env and step, far more than the toy env itself, and a spawned worker costs
~0.3 s to start; the learning tests and the CPU demo run hundreds of toy envs, so they keep them in-process. It
offers no crash isolation: use EnvPool for anything that can crash or hang (LIBERO).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from trainer.envs import make_env
from trainer.envs.pool import (
    EnvInfo,
    PendingStep,
    PoolStats,
    ResetReply,
    ResetRequest,
    StepReply,
    WorkerStats,
    describe_env,
)
from trainer.envs.preprocess import TransformedEnv


class InlinePool:
    def __init__(self, suite: str, num_workers: int, env_kwargs: Mapping[str, Any] | None = None, *,
                 observation_transform=None, **_ignored):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.suite = suite
        self.num_workers = num_workers
        self._envs = [make_env(suite, **dict(env_kwargs or {})) for _ in range(num_workers)]
        if observation_transform is not None:  # as EnvPool's workers do it (trainer.envs.preprocess)
            self._envs = [TransformedEnv(env, observation_transform) for env in self._envs]
        self.info: EnvInfo = describe_env(self._envs[0])
        self.stats = PoolStats(workers=[WorkerStats() for _ in range(num_workers)])

    def reset(self, requests: Mapping[int, ResetRequest], timeout_s: float | None = None) -> dict[int, ResetReply]:
        replies = {}
        for index, request in requests.items():
            start = time.perf_counter()
            observation = self._envs[index].reset(request.task_id, request.init_state_id, request.seed,
                                                 record_frames=request.record_frames)
            seconds = time.perf_counter() - start
            self.stats.workers[index].resets += 1
            self.stats.workers[index].reset_seconds += seconds
            replies[index] = ResetReply(observation, None, seconds)
        self.stats.reset_calls += 1
        return replies

    def step_begin(self, actions: Mapping[int, np.ndarray], timeout_s: float | None = None) -> PendingStep:
        """EnvPool's asynchronous step, for the same rollout code: here the envs step at once, in this process."""
        return PendingStep(self.step(actions, timeout_s), time.perf_counter())

    def step_end(self, pending: PendingStep) -> dict[int, StepReply]:
        return pending.flight

    def step(self, actions: Mapping[int, np.ndarray], timeout_s: float | None = None) -> dict[int, StepReply]:
        started = time.perf_counter()
        replies = {}
        for index, chunk in actions.items():
            start = time.perf_counter()
            result = self._envs[index].step(np.asarray(chunk))
            seconds = time.perf_counter() - start
            stats = self.stats.workers[index]
            stats.steps += 1
            stats.actions += result.steps_executed
            stats.step_seconds += seconds
            replies[index] = StepReply(result, None, seconds)
        self.stats.step_calls += 1
        self.stats.step_call_seconds += time.perf_counter() - started
        return replies

    def close(self) -> None:
        for env in self._envs:
            env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
