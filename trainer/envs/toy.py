"""A built-in TOY reach task: three coloured targets, move the agent to the one the instruction names.

It exists for demos, tests and CPU smoke runs, not as a benchmark. It needs no assets, steps in microseconds, and a
tiny transformer policy learns it with GRPO in minutes on a CPU (shared/docs/PLATFORM_NOTES.md, last section).

World: a square arena [-1, 1]^2 (x right, y up). Three targets sit at FIXED places, one per colour; task_id picks the
colour named in the instruction (0 red, 1 green, 2 blue). The agent starts near the centre at a place that is a
deterministic function of init_state_id (a sunflower spiral filling a small disc, so the 50 init states are evenly
spread), plus a small uniform jitter drawn from the reset seed. Fixed target places are what makes the task
learnable from pixels by a tiny policy; with random places it did not learn (PLATFORM_NOTES).

Actions: a chunk of shape [k, 7] in [-1, 1] (values outside are clipped). Only dims 0 and 1 move the agent, by
action * step_size per step, clipped to the arena; the other five dims are ignored so that the action interface is
LIBERO's. The chunk runs open-loop until it ends or the episode does. Success: the agent is within success_radius of
the named target -> reward 1, done. The episode also ends after max_steps actions.

Observation (policy-ready, so image_pipeline is "none"):
- primary_image: 32x32x3 uint8, the whole arena: dark grey floor, the three targets as discs of the success radius
  in pure red / green / blue, the agent as a small white disc drawn on top.
- wrist_image: 32x32x3 uint8, a camera that follows the agent: centred on it at twice the primary zoom (it sees a
  1x1 patch of the 2x2 arena); whatever lies outside the arena is black.
- proprio: float32[8] = [agent x, agent y, 0, 0, 0, 0, 0, 0].

Defaults (targets 0.6 from the centre, step_size 0.2, success_radius 0.2, 8 steps) make a uniformly random policy
succeed about 8% of the time, and one that keeps a random direction for the whole episode about 10%, while moving
straight at the target (`expert_action`) succeeds always, in at most 3 steps. Some chance successes are what give
GRPO's first groups a signal; tests/test_toy_env.py checks both rates.

Fault injection (for the worker pool's tests only; both act on the calling PROCESS): crash_at_step=N makes the
process exit abruptly (os._exit) and hang_at_step=N makes it sleep forever, when an action is about to run while
N actions of the episode have already run. fault_init_state_id restricts the fault to episodes reset to that init
state, so a restarted worker serving another episode runs normally. init_delay_s makes construction slow, as
LIBERO's is, to test that a pool builds its envs in parallel.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np

from trainer.envs.base import ACTION_DIM, PROPRIO_DIM, Observation, StepResult, check_action_chunk

IMAGE_SIZE = 32
ARENA_HALF_WIDTH = 1.0
NUM_INIT_STATES = 50
START_DISC_RADIUS = 0.15  # init states fill a disc of this radius around the centre

COLOUR_NAMES = ("red", "green", "blue")
TARGET_COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
# Fixed places, 0.6 from the centre on three diagonals (up-right, up-left, down-left). On a diagonal, both action
# dimensions that move the agent point the same way for every step, so a policy that puts its probability mass on the
# right side of each dimension succeeds even when acting greedily (argmax over 256 bins is brittle while the
# distribution is broad, and a target straight up would need the argmax of dx to sit in the few bins around 0).
_D = 0.6 / math.sqrt(2.0)
TARGET_POSITIONS = np.array([[_D, _D], [-_D, _D], [-_D, -_D]], dtype=np.float64)
FLOOR_COLOUR = np.array([40, 40, 40], dtype=np.uint8)
OUTSIDE_COLOUR = np.array([0, 0, 0], dtype=np.uint8)
AGENT_COLOUR = np.array([255, 255, 255], dtype=np.uint8)
AGENT_DRAW_RADIUS = 0.09  # about 1.5 pixels in the primary image
PRIMARY_PIXELS_PER_UNIT = IMAGE_SIZE / (2 * ARENA_HALF_WIDTH)
WRIST_PIXELS_PER_UNIT = 2 * PRIMARY_PIXELS_PER_UNIT  # the wrist camera zooms in 2x
# The wrist view is a crop of one pre-rendered canvas: the arena at wrist resolution plus half a view of black on each
# side, so that a view centred anywhere in the arena fits. Rendering once and cropping keeps a step in microseconds.
WRIST_CANVAS_SIZE = int(2 * ARENA_HALF_WIDTH * WRIST_PIXELS_PER_UNIT) + IMAGE_SIZE

_GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))


def world_to_pixel(xy: np.ndarray | tuple[float, float]) -> tuple[int, int]:
    """(row, col) of the primary-image pixel that contains world point (x, y)."""
    x, y = float(xy[0]), float(xy[1])
    col = int((x + ARENA_HALF_WIDTH) / (2 * ARENA_HALF_WIDTH) * IMAGE_SIZE)
    row = int((ARENA_HALF_WIDTH - y) / (2 * ARENA_HALF_WIDTH) * IMAGE_SIZE)
    return min(max(row, 0), IMAGE_SIZE - 1), min(max(col, 0), IMAGE_SIZE - 1)


def init_state_position(init_state_id: int) -> np.ndarray:
    """Start position for an init state (before the seed's jitter): point i of a sunflower spiral in the start disc."""
    radius = START_DISC_RADIUS * math.sqrt((init_state_id + 0.5) / NUM_INIT_STATES)
    angle = init_state_id * _GOLDEN_ANGLE
    return np.array([radius * math.cos(angle), radius * math.sin(angle)])


def _pixel_axes(size: int, pixels_per_unit: float) -> tuple[np.ndarray, np.ndarray]:
    """World x of each column and world y of each row of a size x size camera looking at the arena centre."""
    offsets = (np.arange(size) + 0.5 - size / 2) / pixels_per_unit
    return offsets, -offsets  # row 0 is the top of the image (largest y)


def _disc_mask(xs: np.ndarray, ys: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    return (ys[:, None] - centre[1]) ** 2 + (xs[None, :] - centre[0]) ** 2 < radius**2


class ToyReachEnv:
    """Toy reach task implementing trainer.envs.base.Env (see the module docstring for the rules)."""

    suite = "toy"
    image_pipeline = "none"

    def __init__(
        self,
        max_steps: int = 8,
        step_size: float = 0.2,
        success_radius: float = 0.2,
        start_jitter: float = 0.02,
        crash_at_step: int | None = None,
        hang_at_step: int | None = None,
        fault_init_state_id: int | None = None,
        init_delay_s: float = 0.0,
    ):
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if step_size <= 0 or success_radius <= 0 or start_jitter < 0:
            raise ValueError(
                f"need step_size > 0, success_radius > 0, start_jitter >= 0; "
                f"got {step_size}, {success_radius}, {start_jitter}"
            )
        self.max_steps = max_steps
        self.step_size = step_size
        self.success_radius = success_radius
        self.start_jitter = start_jitter
        self.crash_at_step = crash_at_step
        self.hang_at_step = hang_at_step
        self.fault_init_state_id = fault_init_state_id
        if init_delay_s > 0:
            time.sleep(init_delay_s)  # stands in for a slow simulator start (LIBERO: ~5 s) in the pool's tests

        self._primary_axes = _pixel_axes(IMAGE_SIZE, PRIMARY_PIXELS_PER_UNIT)
        self._primary_background = self._render_scene(*self._primary_axes)
        self._wrist_canvas = self._render_scene(*_pixel_axes(WRIST_CANVAS_SIZE, WRIST_PIXELS_PER_UNIT))
        # The wrist camera follows the agent, so the agent is always the same disc in the middle of the view.
        wrist_axes = _pixel_axes(IMAGE_SIZE, WRIST_PIXELS_PER_UNIT)
        self._wrist_agent_mask = _disc_mask(*wrist_axes, np.zeros(2), AGENT_DRAW_RADIUS)

        self._position: np.ndarray | None = None  # None until the first reset
        self._task_id = 0
        self._init_state_id = 0
        self._elapsed_steps = 0
        self._done = True
        self._record_frames = False

    # --- Env protocol -------------------------------------------------------------------------------------------
    def num_tasks(self) -> int:
        return len(COLOUR_NAMES)

    def num_init_states(self, task_id: int) -> int:
        self._check_task_id(task_id)
        return NUM_INIT_STATES

    def instruction(self, task_id: int) -> str:
        self._check_task_id(task_id)
        return f"move to the {COLOUR_NAMES[task_id]} target"

    def reset(self, task_id: int, init_state_id: int, seed: int, record_frames: bool = False) -> Observation:
        self._check_task_id(task_id)
        if not 0 <= init_state_id < NUM_INIT_STATES:
            raise ValueError(f"init_state_id {init_state_id} is out of range: the toy task has {NUM_INIT_STATES}")
        jitter = np.random.default_rng(seed).uniform(-self.start_jitter, self.start_jitter, size=2)
        self._position = init_state_position(init_state_id) + jitter
        self._task_id = task_id
        self._init_state_id = init_state_id
        self._elapsed_steps = 0
        self._done = False
        self._record_frames = record_frames
        return self._observe()

    def step(self, actions: np.ndarray) -> StepResult:
        actions = self._check_actions(actions)
        if self._position is None or self._done:
            raise RuntimeError("the episode is over (or never started): call reset() before step()")
        success = False
        executed = 0
        frames = [] if self._record_frames else None  # a video: the primary frame after every action
        for action in actions:
            self._maybe_inject_fault()
            moved = self._position + np.clip(action[:2], -1.0, 1.0) * self.step_size
            self._position = np.clip(moved, -ARENA_HALF_WIDTH, ARENA_HALF_WIDTH)
            self._elapsed_steps += 1
            executed += 1
            success = self._distance_to_target() <= self.success_radius
            if frames is not None:
                frames.append(self._observe().primary_image)
            if success or self._elapsed_steps >= self.max_steps:
                self._done = True
                break
        return StepResult(
            observation=self._observe(),
            reward=1.0 if success else 0.0,
            success=success,
            done=self._done,
            steps_executed=executed,
            info={"elapsed_steps": self._elapsed_steps, "distance_to_target": self._distance_to_target()},
            frames=frames,
        )

    def close(self) -> None:
        pass

    # --- helpers ------------------------------------------------------------------------------------------------
    def expert_action(self) -> np.ndarray:
        """The informed action [7]: straight at the named target, full speed on the larger axis, no overshoot."""
        if self._position is None:
            raise RuntimeError("call reset() first")
        action = np.zeros(ACTION_DIM)
        action[:2] = np.clip((TARGET_POSITIONS[self._task_id] - self._position) / self.step_size, -1.0, 1.0)
        return action

    @property
    def agent_position(self) -> np.ndarray:
        if self._position is None:
            raise RuntimeError("call reset() first")
        return self._position.copy()

    @property
    def target_position(self) -> np.ndarray:
        return TARGET_POSITIONS[self._task_id].copy()

    def _distance_to_target(self) -> float:
        dx, dy = self._position - TARGET_POSITIONS[self._task_id]
        return math.hypot(dx, dy)

    def _check_task_id(self, task_id: int) -> None:
        if not 0 <= task_id < len(COLOUR_NAMES):
            names = ", ".join(f"{i}={name}" for i, name in enumerate(COLOUR_NAMES))
            raise ValueError(f"task_id {task_id} is out of range: the toy task has {len(COLOUR_NAMES)} ({names})")

    _check_actions = staticmethod(check_action_chunk)

    def _maybe_inject_fault(self) -> None:
        if self.fault_init_state_id is not None and self._init_state_id != self.fault_init_state_id:
            return
        if self.crash_at_step is not None and self._elapsed_steps == self.crash_at_step:
            os._exit(17)  # an abrupt death, as a segfaulting simulator would die: no cleanup, no reply
        if self.hang_at_step is not None and self._elapsed_steps == self.hang_at_step:
            while True:
                time.sleep(3600)

    def _render_scene(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Floor, outside-of-arena and targets (everything but the agent) as seen by a camera with these pixel axes."""
        inside_arena = (np.abs(ys[:, None]) <= ARENA_HALF_WIDTH) & (np.abs(xs[None, :]) <= ARENA_HALF_WIDTH)
        image = np.where(inside_arena[..., None], FLOOR_COLOUR, OUTSIDE_COLOUR).astype(np.uint8)
        for position, colour in zip(TARGET_POSITIONS, TARGET_COLOURS):
            image[_disc_mask(xs, ys, position, self.success_radius)] = colour
        return image

    def _observe(self) -> Observation:
        primary = self._primary_background.copy()
        primary[_disc_mask(*self._primary_axes, self._position, AGENT_DRAW_RADIUS)] = AGENT_COLOUR
        # Top-left corner of the crop whose centre is nearest the agent (off by at most half a wrist pixel).
        x, y = float(self._position[0]), float(self._position[1])
        left = round((x + ARENA_HALF_WIDTH) * WRIST_PIXELS_PER_UNIT)
        top = round((ARENA_HALF_WIDTH - y) * WRIST_PIXELS_PER_UNIT)
        wrist = self._wrist_canvas[top : top + IMAGE_SIZE, left : left + IMAGE_SIZE].copy()
        wrist[self._wrist_agent_mask] = AGENT_COLOUR
        proprio = np.zeros(PROPRIO_DIM, dtype=np.float32)
        proprio[:2] = self._position
        return Observation(
            primary_image=primary,
            wrist_image=wrist,
            proprio=proprio,
            instruction=self.instruction(self._task_id),
        )


def toy_observations(states_per_task: int = 8) -> list[Observation]:
    """One reset observation per (task, initial state 0..states_per_task-1), seeded by the state: a fixed probe set."""
    env = ToyReachEnv()
    return [env.reset(task, state, seed=state) for task in range(env.num_tasks()) for state in range(states_per_task)]
