"""Observation -> model inputs: the LIBERO image pipeline, the prompt, pixel normalisation, (un)normalisation.

Facts from OPENVLA_SPEC §1.3, §2, §4.2 and §5. Images travel through rollouts as *processed uint8* frames
(after rotation / resize / crop, before normalisation) so trajectories stay small (150 kB per 224 px view instead
of 1.2 MB of float pixel values); `pixel_values()` normalises a batch of them on the model's device.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# DINOv2 (ImageNet) constants as the released processor stores them: rounded to bfloat16 by the conversion script.
DINO_MEAN = (0.484375, 0.455078125, 0.40625)
DINO_STD = (0.228515625, 0.2236328125, 0.224609375)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

CENTER_CROP_AREA = 0.9
JPEG_QUALITY = 95  # TensorFlow's encode_jpeg default, used when the RLDS training data was built


def prompt_for(instruction: str) -> str:
    """OpenVLA's prompt; the space after "Out:" is appended as its own token by the caller (29871 for Llama)."""
    return f"In: What action should the robot take to {instruction.lower()}?\nOut:"


# --- the official LIBERO image steps, re-derived from TensorFlow's kernels ------------------------------------------
# The official evaluation (and the RLDS data the checkpoints were trained on) makes each 224 px image with
# TensorFlow: encode_jpeg + decode_image, resize(method="lanczos3", antialias=True) then round / clip / cast, and a
# centre crop (crop_and_resize, bilinear) with convert_image_dtype on both sides. Each function below computes what
# the TensorFlow kernel computes, in the same float32 operations and order, so that the result is the same bytes
# (tests/test_image_fixtures.py checks it against TensorFlow 2.21 on real LIBERO frames).


def encode_decode_jpeg(image: np.ndarray) -> np.ndarray:
    """tf.image.encode_jpeg then tf.io.decode_image, as the RLDS builder and the official evaluation do.

    Encoding: TensorFlow's defaults (quality 95, 4:2:0 chroma subsampling, accurate forward DCT); PIL's libjpeg with
    these settings writes the same entropy-coded data (only the JFIF density field differs). Decoding must use
    libjpeg's *fast integer* IDCT with fancy upsampling, which is what TensorFlow's DecodeJpeg uses: simplejpeg
    exposes it. PIL decodes with the accurate IDCT, which differs by up to 16 grey levels on LIBERO frames.
    """
    try:
        import simplejpeg
    except ImportError as error:
        raise ImportError("the LIBERO image pipeline decodes JPEG with simplejpeg (libjpeg's fast integer IDCT, as "
                          "TensorFlow does): pip install simplejpeg (a project dependency; on hosts without a package "
                          "registry, carry its wheel)") from error

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:0")
    return simplejpeg.decode_jpeg(buffer.getvalue(), colorspace="RGB", fastdct=True, fastupsample=False)


_F32 = np.float32


@functools.lru_cache(maxsize=1)
def _c_sinf():
    """The C library's float sine, which TensorFlow's kernel calls (std::sin on a float); None where there is none.

    Why not numpy: sinf is not correctly rounded, and one unit in the last place of a Lanczos weight was enough to move
    4-6 of 903,168 resized values by one grey level (measured on the fixture frames); with glibc's sinf: none.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("m")
    if name is None:
        return None
    try:
        sinf = ctypes.CDLL(name).sinf
    except (OSError, AttributeError):
        return None
    sinf.restype, sinf.argtypes = ctypes.c_float, [ctypes.c_float]
    return sinf


def _sin_float32(values: np.ndarray) -> np.ndarray:
    sinf = _c_sinf()
    if sinf is None:  # the correctly rounded value: equal to sinf almost always
        return np.sin(values.astype(np.float64)).astype(_F32)
    return np.array([sinf(float(v)) for v in values.ravel()], dtype=_F32).reshape(values.shape)


def _lanczos3(x: np.ndarray) -> np.ndarray:
    """TensorFlow's Lanczos kernel of radius 3 (sampling_kernels.h) on float32 distances, in its float32 steps."""
    radius, pi = _F32(3.0), _F32(3.14159265359)
    x = np.abs(x.astype(_F32))
    with np.errstate(divide="ignore", invalid="ignore"):
        value = (radius * _sin_float32(pi * x)) * _sin_float32((pi * x) / radius) / (((pi * pi) * x) * x)
    return np.where(x > radius, _F32(0.0), np.where(x <= _F32(1e-3), _F32(1.0), value)).astype(_F32)


@functools.lru_cache(maxsize=16)
def _lanczos3_spans(input_size: int, output_size: int) -> tuple[np.ndarray, np.ndarray]:
    """First source index and normalised weights of every output pixel: TensorFlow's ComputeSpansCore for
    ScaleAndTranslate with scale = output / input, no translation and antialias=True (the kernel widens by 1/scale
    when downsampling)."""
    scale = _F32(output_size) / _F32(input_size)
    inv_scale = _F32(1.0 / float(scale))  # `1.0 / scale` is a double division in the kernel, stored as float
    inv_translate = -inv_scale * _F32(0.0)
    kernel_scale = max(inv_scale, _F32(1.0))
    radius = _F32(3.0)
    span_size = min(2 * math.ceil(radius * kernel_scale) + 1, input_size)
    one_over_kernel_scale = _F32(1.0) / kernel_scale
    starts = np.zeros(output_size, dtype=np.int64)
    weights = np.zeros((output_size, span_size), dtype=_F32)
    for x in range(output_size):
        sample = (_F32(x) + _F32(0.5)) * inv_scale + inv_translate
        if sample < 0 or sample > input_size:
            continue  # an empty span (only with translations, which the resize does not use)
        start = math.ceil((sample - radius * kernel_scale) - _F32(0.5))
        end = math.floor((sample + radius * kernel_scale) - _F32(0.5))
        start = min(max(start, 0), input_size - 1)
        end = min(max(end, 0), input_size - 1) + 1
        positions = (np.arange(start, end).astype(_F32) + _F32(0.5)) - sample
        raw = _lanczos3(np.abs(positions * one_over_kernel_scale))
        total = _F32(0.0)
        for weight in raw:  # summed in order, in float32
            total = _F32(total + weight)
        if abs(total) >= _F32(1000.0) * np.finfo(_F32).tiny:
            weights[x, : end - start] = raw * (_F32(1.0) / total)
        starts[x] = start
    return starts, weights


def _gather_axis(image: np.ndarray, starts: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """out[i] = sum_k weights[i, k] * image[starts[i] + k] along `axis`, accumulated tap by tap in float32 from zero
    (GatherRows / GatherColumns). Taps past the image edge have zero weight and are skipped as the kernel does."""
    length = image.shape[axis]
    out_shape = list(image.shape)
    out_shape[axis] = len(starts)
    out = np.zeros(out_shape, dtype=_F32)
    for k in range(weights.shape[1]):
        index = starts + k
        inside = index < length
        tap = np.take(image, np.minimum(index, length - 1), axis=axis)
        w = np.where(inside, weights[:, k], _F32(0.0))
        shape = [1] * image.ndim
        shape[axis] = -1
        out += w.reshape(shape) * tap
    return out


def resize_lanczos3(image: np.ndarray, size: int) -> np.ndarray:
    """tf.image.resize(image, (size, size), method="lanczos3", antialias=True) on an HxWxC image: float32 result.

    Rows first, then columns, as TensorFlow's CPU kernel does; every product and sum in float32.
    """
    source = image.astype(_F32)
    row_starts, row_weights = _lanczos3_spans(image.shape[0], size)
    col_starts, col_weights = _lanczos3_spans(image.shape[1], size)
    return _gather_axis(_gather_axis(source, row_starts, row_weights, 0), col_starts, col_weights, 1)


def round_to_uint8(image: np.ndarray) -> np.ndarray:
    """tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8): round half to even, as tf.round does."""
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def crop_and_resize_bilinear(image: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """tf.image.crop_and_resize (bilinear, one box y1, x1, y2, x2 in normalised coordinates) on one HxWxC image.

    Output pixel i samples the source at y = y1*(H-1) + i * (y2-y1)*(H-1)/(size-1), and likewise for x, then
    interpolates top, bottom and between them as the kernel does. The arithmetic is in the image's float dtype:
    float32 (TensorFlow's kernel) for the evaluation pipeline.
    """
    dtype = image.dtype.type if np.issubdtype(image.dtype, np.floating) else _F32
    image = image.astype(dtype, copy=False)
    height, width = image.shape[:2]
    y1, x1, y2, x2 = (dtype(v) for v in box)
    height_scale = (y2 - y1) * dtype(height - 1) / dtype(size - 1)
    width_scale = (x2 - x1) * dtype(width - 1) / dtype(size - 1)
    steps = np.arange(size).astype(dtype)
    ys = y1 * dtype(height - 1) + steps * height_scale
    xs = x1 * dtype(width - 1) + steps * width_scale
    if ys.min() < 0 or ys.max() > height - 1 or xs.min() < 0 or xs.max() > width - 1:
        raise ValueError(f"crop box {box} reaches outside the image (TensorFlow would extrapolate with zeros)")
    top, bottom = np.floor(ys).astype(int), np.ceil(ys).astype(int)
    left, right = np.floor(xs).astype(int), np.ceil(xs).astype(int)
    y_lerp = (ys - top.astype(dtype))[:, None, None]
    x_lerp = (xs - left.astype(dtype))[None, :, None]
    top_rows, bottom_rows = image[top], image[bottom]
    top_left, top_right = top_rows[:, left], top_rows[:, right]
    bottom_left, bottom_right = bottom_rows[:, left], bottom_rows[:, right]
    upper = top_left + (top_right - top_left) * x_lerp
    lower = bottom_left + (bottom_right - bottom_left) * x_lerp
    return upper + (lower - upper) * y_lerp


def center_crop_area(image: np.ndarray, area: float = CENTER_CROP_AREA) -> np.ndarray:
    """Centre crop keeping `area` of the image (side sqrt(area)), resized back to the input size; uint8 in and out.

    As the OpenVLA / OFT LIBERO evaluation does it: convert_image_dtype to float32 (a multiplication by 1/255),
    crop_and_resize of the box computed in float32, clip to [0, 1], convert_image_dtype back with saturation
    (multiply by 255.5, clamp, truncate).
    """
    side = np.clip(np.sqrt(_F32(area)), _F32(0.0), _F32(1.0))
    offset = (_F32(1.0) - side) / _F32(2.0)
    as_float = image.astype(_F32) * _F32(1.0 / 255)
    cropped = crop_and_resize_bilinear(as_float, (offset, offset, offset + side, offset + side), image.shape[0])
    scaled = np.clip(cropped, _F32(0.0), _F32(1.0)) * _F32(255.5)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def libero_image(raw_frame: np.ndarray, size: int, jpeg_round_trip: bool = True, center_crop: bool = True):
    """The LIBERO protocol for one camera frame (primary or wrist): rotate 180°, JPEG round trip, Lanczos3 resize,
    round, centre crop. The same steps for OpenVLA and for each of OpenVLA-OFT's two views."""
    image = np.ascontiguousarray(raw_frame[::-1, ::-1])
    if jpeg_round_trip:
        image = encode_decode_jpeg(image)
    if image.shape[:2] != (size, size):
        image = round_to_uint8(resize_lanczos3(image, size))
    if center_crop:
        image = center_crop_area(image)
    return image


def plain_image(frame: np.ndarray, size: int) -> np.ndarray:
    """Frames that are already policy-ready (the toy env): only resized if needed (bicubic, as the processor)."""
    if frame.shape[:2] != (size, size):
        frame = np.asarray(Image.fromarray(frame).resize((size, size), Image.BICUBIC))
    return np.ascontiguousarray(frame)


@dataclass(frozen=True)
class ImagePipeline:
    name: str = "libero"  # "libero" or "none"
    size: int = 224
    jpeg_round_trip: bool = True
    center_crop: bool = True

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 uint8 camera frame, got {frame.dtype} {frame.shape}")
        if self.name == "libero":
            return libero_image(frame, self.size, self.jpeg_round_trip, self.center_crop)
        if self.name == "none":
            return plain_image(frame, self.size)
        raise ValueError(f"unknown image pipeline {self.name!r}; expected 'libero' or 'none'")


def pixel_values(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, N_img, S, S, 3] -> [B, 6*N_img, S, S]: per view, DINOv2-normalised then SigLIP-normalised channels."""
    if images.dtype != torch.uint8 or images.ndim != 5:
        raise ValueError(f"expected uint8 [B, N_img, S, S, 3] images, got {images.dtype} {tuple(images.shape)}")
    x = images.permute(0, 1, 4, 2, 3).float() / 255.0  # B, N, 3, S, S
    dino_mean, dino_std, siglip_mean, siglip_std = (
        torch.tensor(c, device=x.device).view(1, 1, 3, 1, 1) for c in (DINO_MEAN, DINO_STD, SIGLIP_MEAN, SIGLIP_STD)
    )
    both = torch.cat([(x - dino_mean) / dino_std, (x - siglip_mean) / siglip_std], dim=2)  # B, N, 6, S, S
    return both.flatten(1, 2).to(dtype)


# --- action / proprio (un)normalisation with norm_stats (BOUNDS_Q99) -------------------------------------------------


def unnormalize_actions(normalized: np.ndarray, action_stats: dict, range_eps: float = 0.0) -> np.ndarray:
    """[-1, 1] -> env units with the q01/q99 bounds; dims whose mask is False pass through unchanged.

    `range_eps` is 0 for OpenVLA and 1e-8 for OpenVLA-OFT, as each was released.
    """
    q01 = np.asarray(action_stats["q01"], dtype=np.float64)
    q99 = np.asarray(action_stats["q99"], dtype=np.float64)
    mask = np.asarray(action_stats.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
    scaled = 0.5 * (normalized + 1.0) * (q99 - q01 + range_eps) + q01
    return np.where(mask, scaled, normalized)


def normalize_proprio(proprio: np.ndarray, proprio_stats: dict) -> np.ndarray:
    """OFT's BOUNDS_Q99 proprio normalisation: dims whose mask is False pass through (then clipped, as OFT does)."""
    q01 = np.asarray(proprio_stats["q01"], dtype=np.float64)
    q99 = np.asarray(proprio_stats["q99"], dtype=np.float64)
    mask = np.asarray(proprio_stats.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
    scaled = np.where(mask, 2.0 * (proprio - q01) / (q99 - q01 + 1e-8) - 1.0, proprio)
    return np.clip(scaled, -1.0, 1.0).astype(np.float32)


def libero_gripper(actions: np.ndarray) -> np.ndarray:
    """Model gripper (1 = open, 0 = close) -> LIBERO's (-1 = open, +1 = close): binarise with sign, then invert."""
    out = np.array(actions, dtype=np.float64, copy=True)
    out[..., -1] = -np.sign(2.0 * out[..., -1] - 1.0)
    return out


def select_norm_stats(norm_stats: dict, unnorm_key: str | None) -> tuple[str, dict]:
    """Pick the dataset statistics as the official code does: the only dataset when no key is given
    (predict_action's _check_unnorm_key), else the key, falling back to `<key>_no_noops` (the LIBERO evaluations'
    check_unnorm_key: the released LIBERO fine-tunes were trained on the `<suite>_no_noops` datasets)."""
    if not norm_stats:
        raise ValueError("the checkpoint has no action statistics (no dataset_statistics.json, and config.json has no "
                         "norm_stats); cannot un-normalise actions")
    if unnorm_key is None:
        if len(norm_stats) != 1:
            raise ValueError(f"the checkpoint has statistics for several datasets; set unnorm_key to one of "
                             f"{sorted(norm_stats)}")
        unnorm_key = next(iter(norm_stats))
    for key in (unnorm_key, f"{unnorm_key}_no_noops"):
        if key in norm_stats:
            return key, norm_stats[key]
    raise KeyError(f"unnorm_key {unnorm_key!r} is not in the checkpoint's norm_stats (nor {unnorm_key}_no_noops); "
                   f"available: {sorted(norm_stats)}; pick one with env.unnorm_key (eval: --unnorm-key)")
