"""Rendering per rank: CUDA device -> EGL device by EGL's own answer, the OSMesa fallback, robosuite 1.4's check.

Everything here runs on a CPU host: the mapping and the fallback are pure functions fed with what EGL would report;
the fallback path of `apply_render_env` runs against this machine's real libEGL (Mesa: one device that is no NVIDIA
GPU), and robosuite's import-time device check runs for real in subprocesses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from trainer.envs import render
from trainer.envs.render import (
    EGL_CUDA_DEVICE_ENV,
    OSMESA_ENV,
    EglProbe,
    EglUnavailableError,
    RenderFallbackWarning,
    choose_egl_device_id,
    choose_render_env,
    egl_device_for_cuda,
    plan_render_env,
    robosuite_accepts_egl_device,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# RLinf's node: CUDA 0-3 were EGL 2, 3, 0, 1, i.e. EGL device k reports EGL_CUDA_DEVICE_NV = [2, 3, 0, 1][k].
RLINF_NODE = [2, 3, 0, 1]


class TestMapping:
    def test_each_cuda_device_gets_the_egl_device_that_names_it(self):
        assert [egl_device_for_cuda(RLINF_NODE, cuda) for cuda in range(4)] == [2, 3, 0, 1]
        for local_rank, expected in enumerate([2, 3, 0, 1]):
            assert choose_egl_device_id({}, 4, local_rank, RLINF_NODE) == expected
            chosen = choose_render_env({"LOCAL_RANK": str(local_rank)}, 4, egl_device_cuda_indices=RLINF_NODE)
            assert chosen["MUJOCO_EGL_DEVICE_ID"] == str(expected)
            assert chosen[EGL_CUDA_DEVICE_ENV] == str(local_rank)
        # without EGL's answer the guess (equal indices) is wrong on that node for every rank
        assert [choose_egl_device_id({}, 4, rank) for rank in range(4)] == [0, 1, 2, 3]

    def test_hidden_devices(self):
        # measured on the 2x H200 host: CUDA_VISIBLE_DEVICES=1 -> EGL 0 reports no CUDA device, EGL 1 is CUDA 0
        environ = {"CUDA_VISIBLE_DEVICES": "1", "LOCAL_RANK": "0"}
        assert choose_egl_device_id(environ, 1, egl_device_cuda_indices=[None, 0]) == 1
        # one GPU per process on RLinf's node: physical GPU 2 is EGL device 0
        assert choose_egl_device_id({"CUDA_VISIBLE_DEVICES": "2"}, 1, 0, [0, None, None, None]) == 0
        assert choose_egl_device_id({"CUDA_VISIBLE_DEVICES": "2"}, 1, 0) == 2  # the guess would pick GPU 0's device
        # two of four GPUs visible, in reverse order
        environ = {"CUDA_VISIBLE_DEVICES": "3,1"}
        assert choose_egl_device_id(environ, 2, 0, [None, 1, None, 0]) == 3
        assert choose_egl_device_id(environ, 2, 1, [None, 1, None, 0]) == 1

    def test_uuid_entries(self):
        environ = {"CUDA_VISIBLE_DEVICES": "GPU-0d6c3f1e-aaaa,GPU-77b2e9c4-bbbb"}
        # EGL's answer works whatever CUDA_VISIBLE_DEVICES holds
        assert choose_egl_device_id(environ, 2, 0, [1, 0]) == 1
        assert choose_egl_device_id(environ, 2, 1, [1, 0]) == 0
        # without it a UUID gives no physical index: the visible-set index is the only guess
        assert choose_egl_device_id(environ, 2, 1) == 1

    def test_no_egl_device_for_the_rank(self):
        with pytest.raises(EglUnavailableError, match="NVIDIA EGL library is missing"):
            choose_egl_device_id({}, 1, 0, [None])
        with pytest.raises(EglUnavailableError, match="no EGL device is CUDA device 2"):
            choose_egl_device_id({}, 4, 2, [0, 1, None])

    def test_worker_replaces_the_parents_guess_with_egl_answer(self):
        # The trainer (rank 1, both GPUs visible) guessed EGL 1 and marked the rank's CUDA device; in the worker EGL
        # says CUDA 1 is EGL device 3.
        parent = choose_render_env({"LOCAL_RANK": "1"}, 4, local_rank=1)
        assert parent["MUJOCO_EGL_DEVICE_ID"] == "1" and parent[EGL_CUDA_DEVICE_ENV] == "1"
        worker_environ = {"LOCAL_RANK": "1", **parent}
        in_worker = choose_render_env(worker_environ, 4, egl_device_cuda_indices=RLINF_NODE)
        assert in_worker["MUJOCO_EGL_DEVICE_ID"] == "3" and in_worker[EGL_CUDA_DEVICE_ENV] == "1"
        # the marker, not LOCAL_RANK, names the device (a launcher may give each rank one GPU and any LOCAL_RANK)
        worker_environ = {"LOCAL_RANK": "7", **parent}
        assert choose_render_env(worker_environ, 4, egl_device_cuda_indices=RLINF_NODE)["MUJOCO_EGL_DEVICE_ID"] == "3"
        # a device id the user set (no marker) is kept, even where EGL would say otherwise
        user = {"MUJOCO_GL": "egl", "MUJOCO_EGL_DEVICE_ID": "0", "LOCAL_RANK": "1"}
        chosen = choose_render_env(user, 4, egl_device_cuda_indices=RLINF_NODE)
        assert chosen["MUJOCO_EGL_DEVICE_ID"] == "0" and EGL_CUDA_DEVICE_ENV not in chosen


class TestFallback:
    def test_unusable_egl_falls_back_to_osmesa_with_the_reason(self):
        no_library = EglProbe(None, "libEGL.so.1 cannot be loaded (...)")
        env, reason = plan_render_env({}, 2, egl_probe=no_library)
        assert env == OSMESA_ENV and reason.startswith("libEGL.so.1 cannot be loaded")
        env, reason = plan_render_env({"CUDA_VISIBLE_DEVICES": "0"}, 1, egl_probe=EglProbe((None,)))
        assert env == OSMESA_ENV and "none is an NVIDIA GPU" in reason
        # usable EGL: no fallback, EGL's device
        env, reason = plan_render_env({"LOCAL_RANK": "2"}, 4, egl_probe=EglProbe(tuple(RLINF_NODE)))
        assert reason is None and env["MUJOCO_EGL_DEVICE_ID"] == "0"
        # CPU host, or OSMesa asked for: nothing to fall back from
        assert plan_render_env({}, 0, egl_probe=no_library) == (OSMESA_ENV, None)
        assert plan_render_env({"MUJOCO_GL": "osmesa"}, 2, egl_probe=no_library) == (OSMESA_ENV, None)
        # not probed: the guess stands
        env, reason = plan_render_env({"LOCAL_RANK": "1"}, 2)
        assert reason is None and env["MUJOCO_EGL_DEVICE_ID"] == "1"

    @pytest.fixture
    def clean_render_state(self, monkeypatch):
        for key in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "MUJOCO_EGL_DEVICE_ID", EGL_CUDA_DEVICE_ENV, "LOCAL_RANK"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
        monkeypatch.setattr(render, "_fallback_reason", None)
        monkeypatch.delitem(sys.modules, "mujoco", raising=False)
        monkeypatch.delitem(sys.modules, "robosuite", raising=False)
        monkeypatch.setattr(render, "detect_gpu_count", lambda environ=None: 1)  # pretend this host has a GPU

    def test_apply_falls_back_once_with_this_hosts_real_egl(self, clean_render_state):
        # This machine's libEGL is Mesa's: one device, which is no NVIDIA GPU. Asked for EGL on "GPU 0", the process
        # must render with OSMesa and say why, once.
        probe = render.probe_egl()
        assert probe.error is None and probe.cuda_indices and set(probe.cuda_indices) == {None}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert render.apply_render_env() == OSMESA_ENV
            assert render.apply_render_env() == OSMESA_ENV  # a second env in the same process: no second warning
        fallbacks = [w for w in caught if issubclass(w.category, RenderFallbackWarning)]
        assert len(fallbacks) == 1
        assert "rendering with OSMesa" in str(fallbacks[0].message) and "NVIDIA EGL library" in str(fallbacks[0].message)
        assert os.environ["MUJOCO_GL"] == "osmesa" and "MUJOCO_EGL_DEVICE_ID" not in os.environ
        assert render.fallback_reason() and render.describe_render_device()["fallback_reason"] == render.fallback_reason()

    def test_apply_falls_back_when_the_display_does_not_initialise(self, clean_render_state, monkeypatch):
        monkeypatch.setattr(render, "probe_egl", lambda: EglProbe((0,)))
        monkeypatch.setattr(render, "egl_display_error", lambda index: f"eglInitialize failed on {index}")
        with pytest.warns(RenderFallbackWarning, match="EGL device 0 does not initialise: eglInitialize failed on 0"):
            assert render.apply_render_env() == OSMESA_ENV

    def test_apply_uses_egl_answer_when_egl_works(self, clean_render_state, monkeypatch):
        monkeypatch.setattr(render, "probe_egl", lambda: EglProbe((None, 0)))  # CUDA_VISIBLE_DEVICES=1 on 2 GPUs
        monkeypatch.setattr(render, "egl_display_error", lambda index: None)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
        monkeypatch.setattr(render, "import_robosuite_past_its_device_check", lambda: None)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RenderFallbackWarning)
            chosen = render.apply_render_env()
        assert chosen["MUJOCO_GL"] == "egl" and chosen["MUJOCO_EGL_DEVICE_ID"] == "1"
        assert os.environ["MUJOCO_EGL_DEVICE_ID"] == "1" and render.fallback_reason() is None


class TestRobosuiteDeviceCheck:
    def test_replica_of_robosuites_check(self):
        assert robosuite_accepts_egl_device({"CUDA_VISIBLE_DEVICES": "1", "MUJOCO_EGL_DEVICE_ID": "1"})
        assert not robosuite_accepts_egl_device({"CUDA_VISIBLE_DEVICES": "2", "MUJOCO_EGL_DEVICE_ID": "0"})
        assert not robosuite_accepts_egl_device({"CUDA_VISIBLE_DEVICES": "GPU-ab", "MUJOCO_EGL_DEVICE_ID": "0"})
        assert robosuite_accepts_egl_device({"CUDA_VISIBLE_DEVICES": "", "MUJOCO_EGL_DEVICE_ID": "3"})
        assert robosuite_accepts_egl_device({"CUDA_VISIBLE_DEVICES": "0,1"})
        assert robosuite_accepts_egl_device({"CUDA_VISIBLE_DEVICES": "10", "MUJOCO_EGL_DEVICE_ID": "1"})  # substring!

    @pytest.mark.skipif(importlib.util.find_spec("robosuite") is None, reason="robosuite not installed")
    @pytest.mark.parametrize("through_trainer", [False, True], ids=["plain import", "apply_render_env guard"])
    def test_real_robosuite_import_with_the_right_egl_id(self, through_trainer):
        # RLinf's node, rank on physical GPU 2 alone: its EGL device is 0, which robosuite's check refuses.
        script = (
            "import json, os\n"
            "from trainer.envs import render\n"
            + ("render.import_robosuite_past_its_device_check()\n" if through_trainer else "")
            + "import robosuite.utils.binding_utils\n"
            "print(json.dumps({k: os.environ.get(k) for k in ('CUDA_VISIBLE_DEVICES', 'MUJOCO_EGL_DEVICE_ID')}))\n"
        )
        environ = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl",
                   "CUDA_VISIBLE_DEVICES": "2", "MUJOCO_EGL_DEVICE_ID": "0"}
        result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, env=environ,
                                timeout=300)
        if not through_trainer:
            assert result.returncode != 0
            assert "MUJOCO_EGL_DEVICE_ID needs to be set to one of the device id specified" in result.stderr
        else:
            assert result.returncode == 0, result.stderr[-2000:]
            # the variables are as before the import: CUDA keeps its device, EGL keeps the right one
            assert json.loads(result.stdout.strip().splitlines()[-1]) == {"CUDA_VISIBLE_DEVICES": "2",
                                                                         "MUJOCO_EGL_DEVICE_ID": "0"}
