"""Choose MuJoCo's rendering backend for this host and rank, before mujoco / robosuite is imported.

- GPU host: EGL on the GPU of this rank's local device.
- CPU host: OSMesa (software rendering; Debian package libosmesa6).
- The user wins: an explicit `backend` argument, or a `MUJOCO_GL` already in the environment (and a
  `MUJOCO_EGL_DEVICE_ID` the user set is kept as it is).
- EGL unusable (no libEGL, no NVIDIA EGL device, the device's display does not initialise): OSMesa, with one
  warning (`RenderFallbackWarning`) that says why and what to install.

Which EGL device is "this rank's GPU" (measured on a 2-GPU host, NVIDIA driver 580): `eglQueryDevicesEXT` lists *all*
of the host's GPUs whatever `CUDA_VISIBLE_DEVICES` says, and each device's `EGL_CUDA_DEVICE_NV` attribute gives its
CUDA index *within the visible set* (none for hidden GPUs): with `CUDA_VISIBLE_DEVICES=1`, EGL 0 -> none and
EGL 1 -> CUDA 0. EGL's order need not be CUDA's either (RLinf saw CUDA 0-3 = EGL 2, 3, 0, 1 on one node). So the EGL
device is found by asking EGL (a small ctypes probe of libEGL, `probe_egl`), never by assuming equal indices; without
the probe the guess is the physical index listed in `CUDA_VISIBLE_DEVICES` at the rank's position.

Where the decision is made: the trainer process (which must not touch EGL) computes the variables for its env workers
with `choose_render_env` and marks its guess with TRAINER_EGL_CUDA_DEVICE (the rank's CUDA device); each worker then
calls `apply_render_env`, which probes EGL in that process and replaces the guess with EGL's own answer.

robosuite 1.4.0 and 1.4.1 assert at import (robosuite/utils/binding_utils.py), when CUDA_VISIBLE_DEVICES is not
empty, that `MUJOCO_EGL_DEVICE_ID.isdigit() and MUJOCO_EGL_DEVICE_ID in CUDA_VISIBLE_DEVICES` -- a substring test of
the EGL index against the CUDA list, which the right EGL index often fails (CUDA_VISIBLE_DEVICES=2 whose GPU is EGL
device 0; UUID entries). Its EGL context then reads only MUJOCO_EGL_DEVICE_ID. So when the check would refuse the right
id, `apply_render_env` imports robosuite's binding module with CUDA_VISIBLE_DEVICES empty for that import only and
restores it at once (no CUDA is initialised during that import; nothing is patched on disk).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import importlib
import os
import sys
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

BACKENDS = ("egl", "osmesa", "glfw")
OSMESA_ENV = {"MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}
# Set by choose_render_env next to its own choice of MUJOCO_EGL_DEVICE_ID: the CUDA device (index in the visible set)
# whose EGL device the rendering process must use. Its presence also says the id was not the user's.
EGL_CUDA_DEVICE_ENV = "TRAINER_EGL_CUDA_DEVICE"
EGL_CUDA_DEVICE_NV = 0x323A
EGL_DEVICE_EXT = 0x322C
EGL_PLATFORM_DEVICE_EXT = 0x313F


class RenderFallbackWarning(UserWarning):
    """EGL could not be used; this process renders with OSMesa (much slower). The message says why."""


class EglUnavailableError(ValueError):
    """The EGL devices were listed, but none of them is this process's GPU."""


def parse_visible_devices(environ: Mapping[str, str]) -> list[str] | None:
    """Entries of CUDA_VISIBLE_DEVICES (indices or UUIDs), [] when it hides all GPUs, None when it is unset."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def local_cuda_index(environ: Mapping[str, str], gpu_count: int, local_rank: int | None = None) -> int:
    """The rank's device within the visible set. LOCAL_RANK may exceed it when each rank sees only its own GPU."""
    if local_rank is None:
        local_rank = int(environ.get("LOCAL_RANK", "0"))
    return local_rank % gpu_count


def egl_device_for_cuda(egl_device_cuda_indices: Sequence[int | None], cuda_index: int) -> int | None:
    """The EGL index of the device whose EGL_CUDA_DEVICE_NV is cuda_index, None if no EGL device is that GPU."""
    for egl_index, device_cuda_index in enumerate(egl_device_cuda_indices):
        if device_cuda_index == cuda_index:
            return egl_index
    return None


def choose_egl_device_id(
    environ: Mapping[str, str],
    gpu_count: int,
    local_rank: int | None = None,
    egl_device_cuda_indices: Sequence[int | None] | None = None,
) -> int:
    """EGL device index for the rank's GPU.

    egl_device_cuda_indices: for each EGL device (in EGL order), its CUDA index in the visible set or None
    (from `probe_egl`); when given, the answer is exact, and an EGL that lists no NVIDIA GPU raises
    EglUnavailableError. Without it, a guess: the physical index in CUDA_VISIBLE_DEVICES at the rank's position.
    """
    cuda_index = local_cuda_index(environ, gpu_count, local_rank)
    if egl_device_cuda_indices is not None:
        egl_index = egl_device_for_cuda(egl_device_cuda_indices, cuda_index)
        if egl_index is not None:
            return egl_index
        if all(index is None for index in egl_device_cuda_indices):
            raise EglUnavailableError(
                f"EGL lists {len(egl_device_cuda_indices)} device(s) but none is an NVIDIA GPU: the NVIDIA EGL library "
                "is missing (libEGL_nvidia.so.0 and its glvnd file egl_vendor.d/10_nvidia.json; on containers also "
                "NVIDIA_DRIVER_CAPABILITIES=all). Install it, or render on the CPU with MUJOCO_GL=osmesa."
            )
        raise EglUnavailableError(
            f"no EGL device is CUDA device {cuda_index} (EGL devices' CUDA indices: {list(egl_device_cuda_indices)}); "
            "set MUJOCO_EGL_DEVICE_ID yourself, or render with MUJOCO_GL=osmesa"
        )
    visible = parse_visible_devices(environ)
    if visible and cuda_index < len(visible) and visible[cuda_index].isdigit():
        return int(visible[cuda_index])  # physical index: EGL enumerates all GPUs, usually in physical order
    return cuda_index


def choose_render_env(
    environ: Mapping[str, str],
    gpu_count: int,
    backend: str | None = None,
    local_rank: int | None = None,
    egl_device_cuda_indices: Sequence[int | None] | None = None,
) -> dict[str, str]:
    """The rendering environment variables for this process (pure: reads only its arguments).

    environ: the current environment (os.environ); gpu_count: GPUs visible to this process (0 on a CPU host);
    backend: "egl" / "osmesa" / "glfw" to force one; local_rank: defaults to environ["LOCAL_RANK"] or 0.
    When it picks the EGL device itself it also sets EGL_CUDA_DEVICE_ENV (the rank's CUDA device), so that the
    process that renders can check the choice against EGL (`apply_render_env`).
    """
    if backend is None and environ.get("MUJOCO_GL"):
        backend = environ["MUJOCO_GL"]
    if backend is None:
        backend = "egl" if gpu_count > 0 else "osmesa"
    backend = backend.lower()
    if backend not in BACKENDS:
        raise ValueError(f"unknown MuJoCo rendering backend {backend!r}: expected one of {', '.join(BACKENDS)}")

    if backend == "osmesa":
        return dict(OSMESA_ENV)
    if backend == "glfw":
        return {"MUJOCO_GL": "glfw"}  # a window system: PyOpenGL's default platform

    render_env = {"MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl"}
    user_device_id = environ.get("MUJOCO_EGL_DEVICE_ID") if not environ.get(EGL_CUDA_DEVICE_ENV) else None
    if user_device_id:
        render_env["MUJOCO_EGL_DEVICE_ID"] = user_device_id
    elif gpu_count > 0:
        if local_rank is None and environ.get(EGL_CUDA_DEVICE_ENV):
            local_rank = int(environ[EGL_CUDA_DEVICE_ENV])  # chosen for this process by its parent
        device_id = choose_egl_device_id(environ, gpu_count, local_rank, egl_device_cuda_indices)
        render_env["MUJOCO_EGL_DEVICE_ID"] = str(device_id)
        render_env[EGL_CUDA_DEVICE_ENV] = str(local_cuda_index(environ, gpu_count, local_rank))
    # else: EGL without a GPU (Mesa's software EGL device); robosuite then takes device 0.
    return render_env


def robosuite_accepts_egl_device(environ: Mapping[str, str]) -> bool:
    """Whether robosuite 1.4's import-time check passes: with CUDA_VISIBLE_DEVICES non-empty, MUJOCO_EGL_DEVICE_ID
    must be digits and a substring of CUDA_VISIBLE_DEVICES (robosuite/utils/binding_utils.py, 1.4.0 and 1.4.1)."""
    visible = environ.get("CUDA_VISIBLE_DEVICES", "")
    device_id = environ.get("MUJOCO_EGL_DEVICE_ID")
    if visible == "" or device_id is None:
        return True
    return device_id.isdigit() and device_id in visible


# --- what needs the real machine: probing EGL, writing os.environ --------------------------------------------------


@dataclass(frozen=True)
class EglProbe:
    """What this process's libEGL reports. cuda_indices: per EGL device, its CUDA index in the visible set (None for
    hidden or non-NVIDIA devices); None with `error` set when EGL cannot list devices at all."""

    cuda_indices: tuple[int | None, ...] | None
    error: str | None = None


def detect_gpu_count(environ: Mapping[str, str] | None = None) -> int:
    """GPUs visible to this process, without initialising CUDA (env workers must stay light)."""
    environ = os.environ if environ is None else environ
    visible = parse_visible_devices(environ)
    if visible is not None:
        return len(visible) if glob.glob("/dev/nvidia[0-9]*") else 0
    return len(glob.glob("/dev/nvidia[0-9]*"))


class _Egl:
    """The few EGL entry points the probe needs, through ctypes (usable before mujoco / PyOpenGL are imported)."""

    def __init__(self):
        self.library = ctypes.CDLL("libEGL.so.1")
        self.library.eglGetProcAddress.restype = ctypes.c_void_p
        self.library.eglGetProcAddress.argtypes = [ctypes.c_char_p]
        self.library.eglGetError.restype = ctypes.c_int

    def function(self, name: str, restype, *argtypes):
        address = self.library.eglGetProcAddress(name.encode())
        if not address:
            raise OSError(f"libEGL has no {name} (the EGL_EXT_device_enumeration / platform_device extensions)")
        return ctypes.CFUNCTYPE(restype, *argtypes)(address)

    def devices(self) -> list[int]:
        query_devices = self.function("eglQueryDevicesEXT", ctypes.c_uint, ctypes.c_int,
                                      ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int))
        max_devices = 64
        devices = (ctypes.c_void_p * max_devices)()
        count = ctypes.c_int(0)
        if not query_devices(max_devices, devices, ctypes.byref(count)):
            raise OSError(f"eglQueryDevicesEXT failed (EGL error 0x{self.library.eglGetError():x})")
        return [devices[i] for i in range(count.value)]

    def cuda_index(self, device: int) -> int | None:
        query_attribute = self.function("eglQueryDeviceAttribEXT", ctypes.c_uint, ctypes.c_void_p, ctypes.c_int,
                                        ctypes.POINTER(ctypes.c_ssize_t))
        value = ctypes.c_ssize_t(-1)
        found = query_attribute(device, EGL_CUDA_DEVICE_NV, ctypes.byref(value))
        self.library.eglGetError()  # a hidden or non-NVIDIA device sets EGL_BAD_ATTRIBUTE: clear it
        return int(value.value) if found and value.value >= 0 else None

    def initialize_device_display(self, device: int) -> str | None:
        """Open and initialise the device's display as MuJoCo will; None on success, else what failed."""
        get_display = self.function("eglGetPlatformDisplayEXT", ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                    ctypes.c_void_p)
        display = get_display(EGL_PLATFORM_DEVICE_EXT, device, None)
        if not display:
            return f"eglGetPlatformDisplayEXT gave no display (EGL error 0x{self.library.eglGetError():x})"
        self.library.eglInitialize.restype = ctypes.c_uint
        self.library.eglInitialize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        if not self.library.eglInitialize(display, None, None):
            return f"eglInitialize failed (EGL error 0x{self.library.eglGetError():x})"
        # Left initialised: MuJoCo initialises the same display again (allowed), and terminates it at exit.
        return None

    def display_device(self, display: int) -> int | None:
        query_display = self.function("eglQueryDisplayAttribEXT", ctypes.c_uint, ctypes.c_void_p, ctypes.c_int,
                                      ctypes.POINTER(ctypes.c_ssize_t))
        value = ctypes.c_ssize_t(0)
        if not query_display(display, EGL_DEVICE_EXT, ctypes.byref(value)):
            return None
        return value.value


def probe_egl() -> EglProbe:
    """List the EGL devices and their CUDA indices in this process (ctypes only; before mujoco is imported)."""
    try:
        egl = _Egl()
    except OSError as error:
        return EglProbe(None, f"libEGL.so.1 cannot be loaded ({error}): install the GL loader (Debian/Ubuntu: "
                              "libegl1 libglvnd0 libopengl0), or render with MUJOCO_GL=osmesa")
    try:
        return EglProbe(tuple(egl.cuda_index(device) for device in egl.devices()))
    except OSError as error:
        return EglProbe(None, f"EGL cannot list its devices: {error}")


def probe_egl_device_cuda_indices() -> list[int | None] | None:
    """For each EGL device, its CUDA index in this process's visible set; None when EGL cannot list devices."""
    probe = probe_egl()
    return None if probe.cuda_indices is None else list(probe.cuda_indices)


def egl_display_error(egl_index: int) -> str | None:
    """None if EGL device egl_index's display initialises in this process, else what failed."""
    try:
        egl = _Egl()
        devices = egl.devices()
        if not 0 <= egl_index < len(devices):
            return f"EGL device {egl_index} does not exist (EGL lists {len(devices)})"
        return egl.initialize_device_display(devices[egl_index])
    except OSError as error:
        return str(error)


def plan_render_env(
    environ: Mapping[str, str],
    gpu_count: int,
    backend: str | None = None,
    local_rank: int | None = None,
    egl_probe: EglProbe | None = None,
) -> tuple[dict[str, str], str | None]:
    """choose_render_env with the fallback: (variables, None), or (OSMesa's variables, why EGL cannot be used).

    egl_probe: what `probe_egl` found in the rendering process; None means "not probed" (then the guess stands).
    """
    try:
        render_env = choose_render_env(environ, gpu_count, backend, local_rank,
                                       egl_probe.cuda_indices if egl_probe is not None else None)
    except EglUnavailableError as error:
        return dict(OSMESA_ENV), str(error)
    if render_env["MUJOCO_GL"] == "egl" and gpu_count > 0 and egl_probe is not None and egl_probe.error:
        return dict(OSMESA_ENV), egl_probe.error
    return render_env, None


_fallback_reason: str | None = None  # why this process renders with OSMesa although EGL was asked for


def fallback_reason() -> str | None:
    """Why this process fell back from EGL to OSMesa (None if it did not)."""
    return _fallback_reason


def apply_render_env(backend: str | None = None, local_rank: int | None = None) -> dict[str, str]:
    """Choose the backend for this process and write it into os.environ. Call before mujoco/robosuite is imported.

    For EGL on a GPU host it probes libEGL in this process (the device of this rank's GPU, and that its display
    initialises) and falls back to OSMesa with one RenderFallbackWarning when EGL cannot be used. Returns the
    variables it set. Raises RuntimeError if mujoco was already imported with different settings (MuJoCo reads them
    once, at import).
    """
    global _fallback_reason
    gpu_count = detect_gpu_count()
    chosen_backend = (backend or os.environ.get("MUJOCO_GL") or ("egl" if gpu_count > 0 else "osmesa")).lower()
    user_device_id = os.environ.get("MUJOCO_EGL_DEVICE_ID") and not os.environ.get(EGL_CUDA_DEVICE_ENV)
    already_imported = "mujoco" in sys.modules or "robosuite" in sys.modules
    egl_probe = None
    if chosen_backend == "egl" and gpu_count > 0 and not already_imported:
        egl_probe = probe_egl()
        if user_device_id:  # the user's device: probe only whether EGL works at all
            egl_probe = EglProbe(None, egl_probe.error)
    render_env, reason = plan_render_env(os.environ, gpu_count, backend, local_rank, egl_probe)
    if reason is None and egl_probe is not None and "MUJOCO_EGL_DEVICE_ID" in render_env:
        display_error = egl_display_error(int(render_env["MUJOCO_EGL_DEVICE_ID"]))
        if display_error:
            render_env, reason = dict(OSMESA_ENV), (
                f"EGL device {render_env['MUJOCO_EGL_DEVICE_ID']} does not initialise: {display_error}"
            )

    changed = {key: value for key, value in render_env.items() if os.environ.get(key) != value}
    if changed and already_imported:
        raise RuntimeError(
            f"the MuJoCo rendering backend must be chosen before mujoco/robosuite is imported; this process imported "
            f"them already, and these settings would change: {changed}. Call apply_render_env() first, or set them "
            "in the environment before starting Python."
        )
    if reason is not None:
        for key in ("MUJOCO_EGL_DEVICE_ID", EGL_CUDA_DEVICE_ENV):
            os.environ.pop(key, None)
        if _fallback_reason is None:  # one warning per process
            osmesa_missing = "" if ctypes.util.find_library("OSMesa") else (
                " OSMesa is not installed either (Debian/Ubuntu: libosmesa6): rendering will fail.")
            warnings.warn(f"EGL rendering is unusable in this process, rendering with OSMesa instead (much slower): "
                          f"{reason}.{osmesa_missing}", RenderFallbackWarning, stacklevel=2)
        _fallback_reason = reason
    os.environ.update(render_env)
    if render_env["MUJOCO_GL"] == "egl" and not already_imported and not robosuite_accepts_egl_device(os.environ):
        import_robosuite_past_its_device_check()
    return render_env


_import_lock = threading.Lock()


@contextlib.contextmanager
def _cuda_visible_devices_empty():
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def import_robosuite_past_its_device_check() -> None:
    """Import robosuite's binding module with CUDA_VISIBLE_DEVICES empty, so that its import-time check (see the
    module docstring) is skipped; the variable is restored right after. Its EGL context later reads only
    MUJOCO_EGL_DEVICE_ID, which holds the right EGL device."""
    if "robosuite.utils.binding_utils" in sys.modules:
        return
    with _import_lock, _cuda_visible_devices_empty():
        importlib.import_module("robosuite.utils.binding_utils")


def describe_render_device() -> dict:
    """What this process renders with, as the libraries themselves report it (for benchmarks and demonstrations):
    MUJOCO_GL, MUJOCO_EGL_DEVICE_ID, CUDA_VISIBLE_DEVICES, the fallback reason, and with EGL the device of the display
    robosuite opened: its EGL index and its CUDA index (EGL_CUDA_DEVICE_NV) in this process's visible set."""
    info = {key: os.environ.get(key) for key in ("MUJOCO_GL", "MUJOCO_EGL_DEVICE_ID", "CUDA_VISIBLE_DEVICES",
                                                 EGL_CUDA_DEVICE_ENV)}
    info["fallback_reason"] = _fallback_reason
    info["pid"] = os.getpid()
    if os.environ.get("MUJOCO_GL") != "egl":
        return info
    probe = probe_egl()
    info["egl_devices_cuda_indices"] = list(probe.cuda_indices) if probe.cuda_indices is not None else probe.error
    context_module = sys.modules.get("robosuite.renderers.context.egl_context")
    display = getattr(context_module, "EGL_DISPLAY", None) if context_module else None
    if display is None:
        info["display"] = "no EGL display opened yet"
        return info
    try:
        egl = _Egl()
        display_pointer = ctypes.cast(display, ctypes.c_void_p).value
        device = egl.display_device(display_pointer)
        devices = egl.devices()
        info["display_egl_device"] = devices.index(device) if device in devices else None
        info["display_cuda_device"] = egl.cuda_index(device) if device else None
    except (OSError, ctypes.ArgumentError, TypeError) as error:
        info["display"] = f"could not query the display's device: {error}"
    return info
