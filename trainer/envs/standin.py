"""A stand-in for LIBERO where the simulator cannot go (the GPU benchmark host): LIBERO's observation shapes and a
configurable per-step cost, nothing else. It is for measuring throughput, never for learning.

Frames are 256x256x3 uint8 (primary and wrist), proprio float32[8], a LIBERO-style instruction, 10 tasks with 50
initial states, max_steps as libero_spatial (220). Each action sleeps `step_seconds`; each returned observation
(the end of a chunk) sleeps `render_seconds`, as LIBERO renders only the frames it returns. The defaults are the
per-step costs measured on the CPU machine with OSMesa (tests/test_libero_env.py, scripts/measure_rollout_costs.py):
about 15 ms of physics per action and 200 ms to render both 256 px cameras. Success comes with a fixed probability
per step so episodes end at realistic, varied lengths.
"""

from __future__ import annotations

import time

import numpy as np

from trainer.envs.base import ACTION_DIM, PROPRIO_DIM, Observation, StepResult

INSTRUCTIONS = [f"pick up the black bowl number {i} and place it on the plate" for i in range(10)]


class LiberoStandInEnv:
    suite = "libero_standin"
    image_pipeline = "libero"

    def __init__(self, max_steps: int = 220, step_seconds: float = 0.015, render_seconds: float = 0.2,
                 success_per_step: float = 0.005, camera_size: int = 256):
        self.max_steps = max_steps
        self.step_seconds = step_seconds
        self.render_seconds = render_seconds
        self.success_per_step = success_per_step
        self.camera_size = camera_size
        self._rng = np.random.default_rng(0)
        self._task = 0
        self._steps = 0
        self._record_frames = False

    def num_tasks(self) -> int:
        return len(INSTRUCTIONS)

    def num_init_states(self, task_id: int) -> int:
        return 50

    def instruction(self, task_id: int) -> str:
        return INSTRUCTIONS[task_id]

    def _observe(self) -> Observation:
        time.sleep(self.render_seconds)
        size = self.camera_size
        frame = self._rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        return Observation(frame, frame.copy(), self._rng.standard_normal(PROPRIO_DIM).astype(np.float32),
                           INSTRUCTIONS[self._task])

    def reset(self, task_id: int, init_state_id: int, seed: int, record_frames: bool = False) -> Observation:
        self._rng = np.random.default_rng(seed)
        self._task, self._steps = task_id, 0
        self._record_frames = record_frames
        return self._observe()

    def step(self, actions: np.ndarray) -> StepResult:
        actions = np.asarray(actions, dtype=np.float64).reshape(-1, ACTION_DIM)
        executed, success = 0, False
        frames, observation = ([] if self._record_frames else None), None
        for _ in actions:
            time.sleep(self.step_seconds)
            self._steps += 1
            executed += 1
            success = bool(self._rng.random() < self.success_per_step)
            if frames is not None:  # recording a video: a frame after every action
                observation = self._observe()
                frames.append(observation.primary_image)
            if success or self._steps >= self.max_steps:
                break
        done = success or self._steps >= self.max_steps
        observation = observation if observation is not None else self._observe()
        return StepResult(observation, float(success), success, done, executed, frames=frames)

    def close(self) -> None:
        pass
