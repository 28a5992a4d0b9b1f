"""The one small environment protocol every env (LIBERO, toy) implements.

An env is reset to a (task, initial state) pair and stepped with a *chunk* of actions (shape [k, 7]); the chunk is
executed open-loop until it ends or the episode does. One call per chunk keeps inter-process traffic to one message
per policy query (OpenVLA-OFT executes 8 actions per query, standard OpenVLA 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

ACTION_DIM = 7  # [dx, dy, dz, droll, dpitch, dyaw, gripper]; gripper -1 = open, +1 = close (env convention)
PROPRIO_DIM = 8  # [eef_pos (3), eef_axis_angle (3), gripper_qpos (2)]


def check_action_chunk(actions) -> np.ndarray:
    """An env's input check: a chunk [k, 7] with k >= 1 of finite numbers, as float64."""
    actions = np.asarray(actions, dtype=np.float64)
    if actions.ndim != 2 or actions.shape[0] < 1 or actions.shape[1] != ACTION_DIM:
        raise ValueError(
            f"actions must have shape [k, {ACTION_DIM}] with k >= 1 (a chunk), got {actions.shape}; "
            f"wrap a single action as actions[None]"
        )
    if not np.all(np.isfinite(actions)):
        raise ValueError("actions contain NaN or inf")
    return actions


@dataclass
class Observation:
    """What a policy sees. Images are raw camera frames (uint8, HxWx3); the processor applies the env's pipeline."""

    primary_image: np.ndarray
    wrist_image: np.ndarray
    proprio: np.ndarray  # float32 [PROPRIO_DIM]
    instruction: str


@dataclass
class StepResult:
    observation: Observation
    reward: float  # 1.0 on the step that succeeds, else 0.0
    success: bool
    done: bool  # success or step limit reached
    steps_executed: int  # actions of the chunk actually executed (< k when the episode ended mid-chunk)
    info: dict = field(default_factory=dict)
    # The primary camera frame after EACH executed action, only for an episode reset with record_frames=True (a video
    # is being recorded); None otherwise. `observation` alone has one frame per chunk (8 actions for OpenVLA-OFT).
    frames: list[np.ndarray] | None = None


class Env(Protocol):
    """A single environment instance (lives inside one worker process)."""

    suite: str
    max_steps: int  # policy steps per episode (after any wait steps)
    image_pipeline: str  # "libero" (rotate 180, resize, centre crop) or "none" (frames are already policy-ready)

    def num_tasks(self) -> int: ...

    def num_init_states(self, task_id: int) -> int: ...

    def instruction(self, task_id: int) -> str: ...

    def reset(self, task_id: int, init_state_id: int, seed: int, record_frames: bool = False) -> Observation:
        """record_frames: fill StepResult.frames with a frame per executed action until the next reset (videos)."""
        ...

    def step(self, actions: np.ndarray) -> StepResult: ...

    def close(self) -> None: ...
