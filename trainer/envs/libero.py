"""LIBERO (the real benchmark) behind the project's env protocol (trainer.envs.base.Env).

The episode follows the OpenVLA / OpenVLA-OFT LIBERO evaluation (shared/docs/OPENVLA_SPEC.md §5):
- `OffScreenRenderEnv` of the task's BDDL file with 256x256 cameras (agentview + robot0_eye_in_hand);
- reset: seed, `env.reset()`, `env.set_init_state(<one of the task's 50 benchmark initial states>)`, then 10 wait
  steps with the dummy action [0, 0, 0, 0, 0, 0, -1] (gripper open) while the objects settle;
- the scene: `env.reset()` places what the initial state does not cover (fixtures: cabinets, stoves, racks) from
  numpy's global random state, and `set_init_state` does not move them back. The official evaluation seeds one env
  per task with 0 once and runs trial k after k earlier resets, so its trial k has the fixtures of the k-th draw. A
  reset with `seed=OFFICIAL_SCENE` (trainer.envs.seeding) rebuilds exactly that scene for initial state k in any
  worker: seed 0, then k replayed resets (measured: set_init_state and steps consume no random numbers, and a soft
  reset draws what a hard one draws, with one exception, reproduced: every hard reset reloads the model, which
  appends another set of the "open/close/turn on/off" joint samplers of articulated objects to a LIBERO list that
  is never cleared, so the official env's reset k runs k + 2 sets of them; official-scene resets run as many). The
  random state after each official reset is kept, so a worker that serves trials of a task in increasing order
  replays each earlier reset at most once. Any other seed seeds numpy with it before the reset (training: a fresh
  scene per episode, drawn by the same LIBERO samplers, one set of joint samplers per reset);
- then up to `max_steps` policy actions (220 / 280 / 300 / 520 / 400 for spatial / object / goal / 10 / 90);
  success is LIBERO's goal predicate (`done` of its step), which ends the episode with reward 1.
- Observation: the raw camera frames (upside down, as MuJoCo renders them; the policy's processor rotates them,
  `image_pipeline = "libero"`), proprio = [eef_pos (3), axis-angle of eef_quat (3), gripper_qpos (2)] (§4.2),
  instruction = the task's language.
Actions arrive in the env convention (gripper -1 open, +1 close); this class does no gripper post-processing.

Two things make it cheaper than the reference loop without changing what the policy sees:
- The simulator is kept between episodes of the same task (making one costs ~5-10 s), and reset without rebuilding
  the MuJoCo model (robosuite `hard_reset=False`, ~0.5 s instead of 5-10 s). The one piece of state a soft reset
  would carry over is the Panda gripper's `current_action`, which is zeroed as a rebuild would; with that, the sim
  state matched a hard-reset env exactly, step for step (tests/test_libero_env.py checks it).
- Cameras are rendered only for the observations that are returned (the last wait step, the last action of a chunk)
  instead of at every step (~0.25 s of 0.28 s per step on CPU). The camera observables stay enabled, so robosuite
  samples them at the same sub-step as before; only the rendering of frames nobody reads is skipped. An episode reset
  with `record_frames=True` (one whose video is recorded) renders after every action and returns those frames in
  `StepResult.frames`, so that its video has every step, not one frame per 8-action chunk.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

from trainer.envs.base import PROPRIO_DIM, Observation, StepResult, check_action_chunk
from trainer.envs.seeding import OFFICIAL_SCENE

# Max policy steps per suite, after the wait steps: the longest training demo plus a margin (OPENVLA_SPEC §5).
SUITE_MAX_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
NUM_STEPS_WAIT = 10
WAIT_ACTION = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])  # do nothing, gripper open
CAMERA_SIZE = 256
PRIMARY_CAMERA = "agentview"
WRIST_CAMERA = "robot0_eye_in_hand"
ROBOSUITE_DEFAULT_HORIZON = 1000  # LIBERO's ControlEnv default; robosuite refuses to step past it


def quat_to_axis_angle(quat_xyzw: np.ndarray) -> np.ndarray:
    """Axis-angle (unit axis times angle in radians, shape [3]) of a quaternion in robosuite's (x, y, z, w) order.

    Follows the convention of robosuite's `quat2axisangle`, which produced the proprio of the LIBERO training data
    used by OpenVLA-OFT: the sign of the quaternion is NOT canonicalised, so the angle is 2*acos(w) in [0, 2*pi]
    (a quaternion with w < 0 gives an angle above pi). A (near) identity rotation gives zeros.
    """
    x, y, z, w = np.asarray(quat_xyzw, dtype=np.float64)
    w = min(max(w, -1.0), 1.0)
    sin_half_angle = np.sqrt(1.0 - w * w)
    if sin_half_angle < 1e-12:
        return np.zeros(3)
    angle = 2.0 * np.arccos(w)
    return np.array([x, y, z]) / sin_half_angle * angle


def _numpy_reconstruct_function():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct  # numpy 1.x
    return _reconstruct


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and refuses every other global (no arbitrary code runs while loading)."""

    def find_class(self, module: str, name: str):
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")):
            return _numpy_reconstruct_function()
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected here")


def load_init_states(path: str | Path) -> np.ndarray:
    """A LIBERO init-state file (`.pruned_init`): a float64 array [num_init_states, state_dim].

    The files are torch.save archives (zip) of a plain numpy array. LIBERO reads them with
    `torch.load(weights_only=False)`, which runs whatever the pickle asks for. We read the pickle inside the archive
    with an unpickler that accepts only the few numpy globals an array needs (the same allow-list torch's
    `weights_only=True` uses for numpy), so a tampered file fails instead of running code, and no torch is needed.
    """
    with zipfile.ZipFile(path) as archive:
        pickle_names = [name for name in archive.namelist() if name.endswith("data.pkl")]
        if len(pickle_names) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the torch archive, found {pickle_names}")
        with archive.open(pickle_names[0]) as data:
            init_states = _NumpyArrayUnpickler(data).load()
    if not isinstance(init_states, np.ndarray) or init_states.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D numpy array of initial states, got {type(init_states).__name__}")
    return init_states


class _FrameGate:
    """Wraps a robosuite camera sensor so that it renders only when a frame is requested.

    robosuite calls the sensor at every control step; when no frame is requested the gate returns the last frame
    instead of rendering (the value is then never read). `frames_rendered` counts real renders.
    """

    is_frame_gate = True

    def __init__(self, camera_sensor):
        self.camera_sensor = camera_sensor
        self.render_requested = True  # robosuite calls the sensor once when it is installed (its shape check)
        self.frames_rendered = 0
        self.last_frame: np.ndarray | None = None

    def __call__(self, obs_cache):
        if self.render_requested or self.last_frame is None:
            self.last_frame = self.camera_sensor(obs_cache)
            self.frames_rendered += 1
        return self.last_frame


class LiberoEnv:
    """One LIBERO simulator serving episodes of one suite (any of its tasks); see the module docstring."""

    image_pipeline = "libero"
    simulator_per_task = True  # a reset to another task builds another simulator (1.3 s with EGL, 2.4 s with OSMesa)

    def __init__(
        self,
        suite: str,
        max_steps: int | None = None,
        num_steps_wait: int = NUM_STEPS_WAIT,
        camera_size: int = CAMERA_SIZE,
        render_backend: str | None = None,
        hard_reset: bool = False,
    ):
        """
        Args:
            suite: libero_spatial, libero_object, libero_goal, libero_10 or libero_90.
            max_steps: policy steps per episode after the wait steps; default: the suite's (SUITE_MAX_STEPS).
            num_steps_wait: dummy steps after set_init_state while objects settle (the benchmark uses 10).
            camera_size: height and width of both cameras (the benchmark uses 256).
            render_backend: "egl" / "osmesa" / "glfw"; default: chosen per host by trainer.envs.render
                (an MUJOCO_GL already set in the environment wins).
            hard_reset: rebuild the MuJoCo model at every reset, as robosuite's default does (5-10 s per reset on
                CPU); the default soft reset gives the same states (module docstring).
        """
        if suite not in SUITE_MAX_STEPS:
            raise ValueError(f"unknown LIBERO suite {suite!r}; valid suites: {', '.join(SUITE_MAX_STEPS)}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if num_steps_wait < 0 or camera_size < 1:
            raise ValueError(f"need num_steps_wait >= 0 and camera_size >= 1, got {num_steps_wait}, {camera_size}")
        self.suite = suite
        self.max_steps = max_steps if max_steps is not None else SUITE_MAX_STEPS[suite]
        self.num_steps_wait = num_steps_wait
        self.camera_size = camera_size
        self.hard_reset = hard_reset

        # Order matters: the rendering backend must be in the environment before mujoco is imported, and LIBERO's
        # config before libero.libero is imported (else it prompts on stdin).
        from trainer.envs.libero_setup import ensure_libero_ready
        from trainer.envs.render import apply_render_env

        apply_render_env(render_backend)
        ensure_libero_ready()
        from libero.libero import benchmark

        with contextlib.redirect_stdout(io.StringIO()):  # LIBERO prints the task order it uses
            self._benchmark = benchmark.get_benchmark_dict()[suite]()
        self._sim_env = None  # LIBERO's OffScreenRenderEnv, made on the first reset of a task
        self._joint_samplers: list = []
        self._sim_task_id: int | None = None
        self._init_states: np.ndarray | None = None  # of task _init_states_task_id (the files are read once)
        self._init_states_task_id: int | None = None
        self._frame_gates: dict[str, _FrameGate] = {}
        self._task_id: int | None = None
        self._init_state_id: int | None = None
        self._elapsed_steps = 0
        self._wait_steps_done = 0
        self._done = True
        # numpy's random state right after an official reset: (task_id, resets done since seed 0, state)
        self._official_random_state: tuple[int, int, tuple] | None = None
        self.scene_replay_resets = 0  # resets replayed to rebuild official scenes (diagnostics, tests)
        self._record_frames = False  # set per episode by reset(record_frames=...)

    # --- Env protocol -------------------------------------------------------------------------------------------
    def num_tasks(self) -> int:
        return self._benchmark.get_num_tasks()

    def num_init_states(self, task_id: int) -> int:
        self._check_task_id(task_id)
        return len(self._task_init_states(task_id))

    def instruction(self, task_id: int) -> str:
        self._check_task_id(task_id)
        return self._benchmark.get_task(task_id).language

    def reset(self, task_id: int, init_state_id: int, seed: int, record_frames: bool = False) -> Observation:
        self._done = True  # until this reset has finished
        self._check_task_id(task_id)
        init_states = self._task_init_states(task_id)
        if not 0 <= init_state_id < len(init_states):
            raise ValueError(
                f"init_state_id {init_state_id} is out of range: task {task_id} of {self.suite} has "
                f"{len(init_states)} initial states (0..{len(init_states) - 1})"
            )
        sim_env = self._simulator_for(task_id)
        if seed == OFFICIAL_SCENE:
            self._restore_official_random_state(task_id, init_state_id)
            self._reset_as_official(resets_before=init_state_id)
            self._official_random_state = (task_id, init_state_id + 1, np.random.get_state())
        else:
            sim_env.seed(seed)  # LIBERO seeds numpy's global generator: the scene the reset draws
            self._set_joint_sampler_copies(1)
            sim_env.reset()
        if not self.hard_reset:
            # A soft reset keeps the gripper's internal command; a rebuilt model would start it at zero.
            gripper = sim_env.env.robots[0].gripper
            gripper.current_action = np.zeros(gripper.dof)
        self._install_frame_gates()  # a hard reset replaces the camera sensors

        self._request_frames(self.num_steps_wait == 0)
        raw_obs = sim_env.set_init_state(init_states[init_state_id])
        for wait_step in range(self.num_steps_wait):
            self._request_frames(wait_step == self.num_steps_wait - 1)
            raw_obs, _, _, _ = sim_env.step(WAIT_ACTION)
        self._request_frames(False)
        self._task_id = task_id
        self._init_state_id = init_state_id
        self._wait_steps_done = self.num_steps_wait
        self._elapsed_steps = 0
        self._done = False
        self._record_frames = record_frames
        return self._observation(raw_obs)

    def step(self, actions: np.ndarray) -> StepResult:
        actions = self._check_actions(actions)
        if self._sim_env is None or self._done:
            raise RuntimeError("the episode is over (or never started): call reset() before step()")
        success = False
        executed = 0
        frames_before = self._frames_rendered()
        frames = [] if self._record_frames else None  # a video: the primary frame after every action
        for index, action in enumerate(actions):
            # Frames are needed only for the observation we return: after the chunk's last action, or the last one
            # the step limit allows, unless a video is being recorded. A success mid-chunk is not known in advance
            # (handled in _observation).
            last_of_chunk = index == len(actions) - 1 or self._elapsed_steps + 1 >= self.max_steps
            self._request_frames(last_of_chunk or frames is not None)
            raw_obs, _, success, _ = self._sim_env.step(action)
            if frames is not None:
                frames.append(np.array(raw_obs[f"{PRIMARY_CAMERA}_image"], dtype=np.uint8, copy=True))
            success = bool(success)  # LIBERO's `done` is its goal predicate
            executed += 1
            self._elapsed_steps += 1
            if success or self._elapsed_steps >= self.max_steps:
                self._done = True
                break
        self._request_frames(False)
        fresh_frames = self._frames_rendered() > frames_before
        return StepResult(
            observation=self._observation(raw_obs, fresh_frames=fresh_frames),
            reward=1.0 if success else 0.0,
            success=success,
            done=self._done,
            steps_executed=executed,
            info={"elapsed_steps": self._elapsed_steps, "task_id": self._task_id, "init_state_id": self._init_state_id},
            frames=frames,
        )

    def close(self) -> None:
        if self._sim_env is not None:
            self._sim_env.close()
        self._sim_env = None
        self._sim_task_id = None
        self._frame_gates = {}
        self._done = True

    def _restore_official_random_state(self, task_id: int, trial: int) -> None:
        """numpy's random state as the official evaluation has it before the reset of trial `trial` of `task_id`:
        seeded with 0 on the task's env, then `trial` resets. Continues from the kept state when it is not past it."""
        kept = self._official_random_state
        if kept is not None and kept[0] == task_id and kept[1] <= trial:
            resets_done = kept[1]
            np.random.set_state(kept[2])
        else:
            resets_done = 0
            self._sim_env.seed(0)
        while resets_done < trial:
            # The frame gates stay closed: a replayed reset renders nothing; only its random draws matter.
            self._reset_as_official(resets_before=resets_done)
            resets_done += 1
            self.scene_replay_resets += 1

    def _reset_as_official(self, resets_before: int) -> None:
        """A reset that draws from numpy's random state what the official env's reset number `resets_before` + 1
        draws: its list of joint samplers holds one set per model load, construction included (module docstring)."""
        self._set_joint_sampler_copies(resets_before + 2)
        self._sim_env.reset()

    def _set_joint_sampler_copies(self, copies: int) -> None:
        """LIBERO's joint samplers for articulated objects, `copies` sets of them for the coming reset. A hard reset's
        model load appends one set itself, so it starts from one fewer."""
        inner = self._sim_env.env
        inner.object_property_initializers = list(self._joint_samplers) * (copies - 1 if self.hard_reset else copies)

    # --- introspection (tests, diagnostics) ---------------------------------------------------------------------
    @property
    def sim_env(self):
        """LIBERO's OffScreenRenderEnv of the current task (None before the first reset)."""
        return self._sim_env

    @property
    def elapsed_steps(self) -> int:
        """Policy steps executed in the current episode (wait steps not counted)."""
        return self._elapsed_steps

    @property
    def wait_steps_done(self) -> int:
        return self._wait_steps_done

    def init_states(self, task_id: int) -> np.ndarray:
        """The task's benchmark initial states (MuJoCo states flattened), shape [num_init_states, state_dim]."""
        self._check_task_id(task_id)
        return self._task_init_states(task_id).copy()

    # --- helpers ------------------------------------------------------------------------------------------------
    def _simulator_for(self, task_id: int):
        """The simulator for task_id, reused when the task is unchanged (making one costs ~5-10 s)."""
        if self._sim_env is not None and self._sim_task_id == task_id:
            return self._sim_env
        self.close()
        from libero.libero.envs import OffScreenRenderEnv

        self._sim_env = OffScreenRenderEnv(
            bddl_file_name=self._benchmark.get_task_bddl_file_path(task_id),
            camera_heights=self.camera_size,
            camera_widths=self.camera_size,
            hard_reset=self.hard_reset,
            # LIBERO's horizon is 1000 steps; longer custom episodes need more or robosuite refuses to step.
            horizon=max(ROBOSUITE_DEFAULT_HORIZON, self.num_steps_wait + self.max_steps + 1),
        )
        self._sim_task_id = task_id
        # The joint samplers of one model load (the list LIBERO appends to at every load; see _reset_as_official)
        self._joint_samplers = list(self._sim_env.env.object_property_initializers)
        self._install_frame_gates()
        return self._sim_env

    def _task_init_states(self, task_id: int) -> np.ndarray:
        if self._init_states is None or self._init_states_task_id != task_id:
            from libero.libero import get_libero_path

            task = self._benchmark.get_task(task_id)
            path = Path(get_libero_path("init_states")) / task.problem_folder / task.init_states_file
            self._init_states = load_init_states(path)
            self._init_states_task_id = task_id
        return self._init_states

    def _install_frame_gates(self) -> None:
        from robosuite.utils.observables import sensor

        robosuite_env = self._sim_env.env
        for camera in (PRIMARY_CAMERA, WRIST_CAMERA):
            name = f"{camera}_image"
            observable = robosuite_env._observables[name]
            current_sensor = observable._sensor  # robosuite 1.4 keeps the sensor function here
            if getattr(current_sensor, "is_frame_gate", False):
                continue
            gate = _FrameGate(current_sensor)
            gated_sensor = sensor(modality=observable.modality)(gate)
            robosuite_env.modify_observable(observable_name=name, attribute="sensor", modifier=gated_sensor)
            gate.render_requested = False  # installing rendered one frame (robosuite's check); no more until asked
            self._frame_gates[name] = gate

    def _request_frames(self, requested: bool) -> None:
        for gate in self._frame_gates.values():
            gate.render_requested = requested

    def _frames_rendered(self) -> int:
        return sum(gate.frames_rendered for gate in self._frame_gates.values())

    def _observation(self, raw_obs: dict, fresh_frames: bool = True) -> Observation:
        if fresh_frames:
            primary_image = raw_obs[f"{PRIMARY_CAMERA}_image"]
            wrist_image = raw_obs[f"{WRIST_CAMERA}_image"]
        else:
            # The episode ended mid-chunk (success), so the last step sampled no frame: render the final state.
            sim = self._sim_env.sim
            size = self.camera_size
            primary_image = sim.render(camera_name=PRIMARY_CAMERA, height=size, width=size)
            wrist_image = sim.render(camera_name=WRIST_CAMERA, height=size, width=size)
        proprio = np.concatenate(
            [raw_obs["robot0_eef_pos"], quat_to_axis_angle(raw_obs["robot0_eef_quat"]), raw_obs["robot0_gripper_qpos"]]
        ).astype(np.float32)
        assert proprio.shape == (PROPRIO_DIM,)
        return Observation(
            primary_image=np.array(primary_image, dtype=np.uint8, copy=True),
            wrist_image=np.array(wrist_image, dtype=np.uint8, copy=True),
            proprio=proprio,
            instruction=self._benchmark.get_task(self._task_id).language,
        )

    def _check_task_id(self, task_id: int) -> None:
        num_tasks = self.num_tasks()
        if not (isinstance(task_id, (int, np.integer)) and 0 <= task_id < num_tasks):
            raise ValueError(
                f"task_id {task_id!r} is out of range: {self.suite} has {num_tasks} tasks (0..{num_tasks - 1})"
            )

    _check_actions = staticmethod(check_action_chunk)
