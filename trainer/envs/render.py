"""Choose MuJoCo's rendering backend for this host and rank, before mujoco / robosuite is imported.

- GPU host: EGL on the GPU of this rank's local device.
- CPU host: OSMesa (software rendering; Debian package libosmesa6).
- The user wins: an explicit `backend` argument, or a `MUJOCO_GL` already in the environment (and a
  `MUJOCO_EGL_DEVICE_ID` already set is kept as it is).

Which EGL device is "this rank's GPU" (checked on a 2-GPU host, NVIDIA driver 580): `eglQueryDevicesEXT` lists *all*
of the host's GPUs whatever `CUDA_VISIBLE_DEVICES` says, in the physical order, and each device's
`EGL_CUDA_DEVICE_NV` attribute gives its CUDA index *within the visible set* (none for hidden GPUs). So with
`CUDA_VISIBLE_DEVICES=1` the rank's GPU is EGL device 1, not 0; robosuite 1.4 also asserts that
`MUJOCO_EGL_DEVICE_ID` appears in `CUDA_VISIBLE_DEVICES`. We pick the EGL device whose CUDA index is the rank's local
device (found by a small ctypes probe of libEGL); without the probe, the physical index listed in
`CUDA_VISIBLE_DEVICES` at the rank's position. The error users report, "MUJOCO_EGL_DEVICE_ID ... between 0 and 0,
got 1", appears when only one EGL device is enumerated (e.g. no NVIDIA EGL vendor library, so Mesa's single device)
while the id names a physical GPU.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from collections.abc import Mapping, Sequence

BACKENDS = ("egl", "osmesa", "glfw")


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


def choose_egl_device_id(
    environ: Mapping[str, str],
    gpu_count: int,
    local_rank: int | None = None,
    egl_device_cuda_indices: Sequence[int | None] | None = None,
) -> int:
    """EGL device index for the rank's GPU.

    egl_device_cuda_indices: for each EGL device (in EGL order), its CUDA index in the visible set or None
    (from `probe_egl_device_cuda_indices`); when given and it contains the rank's device, that answer is exact.
    """
    cuda_index = local_cuda_index(environ, gpu_count, local_rank)
    if egl_device_cuda_indices is not None:
        if cuda_index in egl_device_cuda_indices:
            return list(egl_device_cuda_indices).index(cuda_index)
        if all(index is None for index in egl_device_cuda_indices):
            raise ValueError(
                f"EGL lists {len(egl_device_cuda_indices)} device(s) but none is an NVIDIA GPU: the NVIDIA EGL library "
                "is missing (libEGL_nvidia.so.0 and its glvnd file egl_vendor.d/10_nvidia.json; on containers also "
                "NVIDIA_DRIVER_CAPABILITIES=all). Install it, or render on the CPU with MUJOCO_GL=osmesa."
            )
    visible = parse_visible_devices(environ)
    if visible and cuda_index < len(visible) and visible[cuda_index].isdigit():
        return int(visible[cuda_index])  # physical index: EGL enumerates all GPUs in physical order
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
    """
    if backend is None and environ.get("MUJOCO_GL"):
        backend = environ["MUJOCO_GL"]
    if backend is None:
        backend = "egl" if gpu_count > 0 else "osmesa"
    backend = backend.lower()
    if backend not in BACKENDS:
        raise ValueError(f"unknown MuJoCo rendering backend {backend!r}: expected one of {', '.join(BACKENDS)}")

    if backend == "osmesa":
        return {"MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}
    if backend == "glfw":
        return {"MUJOCO_GL": "glfw"}  # a window system: PyOpenGL's default platform

    render_env = {"MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl"}
    if environ.get("MUJOCO_EGL_DEVICE_ID"):
        render_env["MUJOCO_EGL_DEVICE_ID"] = environ["MUJOCO_EGL_DEVICE_ID"]
    elif gpu_count > 0:
        device_id = choose_egl_device_id(environ, gpu_count, local_rank, egl_device_cuda_indices)
        render_env["MUJOCO_EGL_DEVICE_ID"] = str(device_id)
    # else: EGL without a GPU (Mesa's software EGL device); robosuite then takes device 0.

    visible_value = environ.get("CUDA_VISIBLE_DEVICES", "")
    device_id_value = render_env.get("MUJOCO_EGL_DEVICE_ID")
    if device_id_value is not None and visible_value and device_id_value not in visible_value:
        # robosuite 1.4 asserts this at import with a less helpful message; say what to change instead.
        raise ValueError(
            f"MUJOCO_EGL_DEVICE_ID={device_id_value} does not appear in CUDA_VISIBLE_DEVICES={visible_value!r}, which "
            "robosuite 1.4 requires: list GPUs by index in CUDA_VISIBLE_DEVICES, or set MUJOCO_EGL_DEVICE_ID to the "
            "EGL device of your GPU yourself, or render with MUJOCO_GL=osmesa"
        )
    return render_env


def detect_gpu_count(environ: Mapping[str, str] | None = None) -> int:
    """GPUs visible to this process, without initialising CUDA (env workers must stay light)."""
    environ = os.environ if environ is None else environ
    visible = parse_visible_devices(environ)
    if visible is not None:
        return len(visible) if glob.glob("/dev/nvidia[0-9]*") else 0
    return len(glob.glob("/dev/nvidia[0-9]*"))


def probe_egl_device_cuda_indices() -> list[int | None] | None:
    """For each EGL device, its CUDA index in this process's visible set (None if hidden or not NVIDIA).

    Returns None when libEGL or its device-query extensions are unavailable. Uses ctypes only, so it can run before
    mujoco and PyOpenGL are imported.
    """
    egl_cuda_device_attribute = 0x323A  # EGL_CUDA_DEVICE_NV
    try:
        egl = ctypes.CDLL("libEGL.so.1")
    except OSError:
        return None
    egl.eglGetProcAddress.restype = ctypes.c_void_p
    egl.eglGetProcAddress.argtypes = [ctypes.c_char_p]
    query_devices_address = egl.eglGetProcAddress(b"eglQueryDevicesEXT")
    query_attribute_address = egl.eglGetProcAddress(b"eglQueryDeviceAttribEXT")
    if not query_devices_address or not query_attribute_address:
        return None
    query_devices = ctypes.CFUNCTYPE(
        ctypes.c_uint, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int)
    )(query_devices_address)
    query_attribute = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_long))(
        query_attribute_address
    )
    max_devices = 64
    devices = (ctypes.c_void_p * max_devices)()
    device_count = ctypes.c_int(0)
    if not query_devices(max_devices, devices, ctypes.byref(device_count)):
        return None
    cuda_indices: list[int | None] = []
    for egl_index in range(device_count.value):
        cuda_index = ctypes.c_long(-1)
        found = query_attribute(devices[egl_index], egl_cuda_device_attribute, ctypes.byref(cuda_index))
        cuda_indices.append(int(cuda_index.value) if found and cuda_index.value >= 0 else None)
    return cuda_indices


def apply_render_env(backend: str | None = None, local_rank: int | None = None) -> dict[str, str]:
    """Choose the backend for this process and write it into os.environ. Call before mujoco/robosuite is imported.

    Returns the variables it set. Raises RuntimeError if mujoco was already imported with different settings
    (MuJoCo reads them once, at import).
    """
    gpu_count = detect_gpu_count()
    chosen_backend = backend or os.environ.get("MUJOCO_GL") or ("egl" if gpu_count > 0 else "osmesa")
    needs_probe = chosen_backend.lower() == "egl" and gpu_count > 0 and not os.environ.get("MUJOCO_EGL_DEVICE_ID")
    egl_device_cuda_indices = probe_egl_device_cuda_indices() if needs_probe else None
    render_env = choose_render_env(os.environ, gpu_count, backend, local_rank, egl_device_cuda_indices)

    changed = {key: value for key, value in render_env.items() if os.environ.get(key) != value}
    if changed and ("mujoco" in sys.modules or "robosuite" in sys.modules):
        raise RuntimeError(
            f"the MuJoCo rendering backend must be chosen before mujoco/robosuite is imported; this process imported "
            f"them already, and these settings would change: {changed}. Call apply_render_env() first, or set them "
            "in the environment before starting Python."
        )
    os.environ.update(render_env)
    return render_env
