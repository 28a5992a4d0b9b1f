"""Observation -> model inputs: the LIBERO image pipeline, the prompt, pixel normalisation, (un)normalisation.

Facts from OPENVLA_SPEC §1.3, §2, §4.2 and §5. Images travel through rollouts as *processed uint8* frames
(after rotation / resize / crop, before normalisation) so trajectories stay small (150 kB per 224 px view instead
of 1.2 MB of float pixel values); `pixel_values()` normalises a batch of them on the model's device.
"""

from __future__ import annotations

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


def _jpeg_round_trip(image: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def crop_and_resize_bilinear(image: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """TensorFlow ``crop_and_resize`` semantics (normalised box y1, x1, y2, x2; bilinear) on one HxWxC float image.

    Output pixel i samples the source at y = y1*(H-1) + i*(y2-y1)*(H-1)/(size-1), and likewise for x.
    """
    height, width = image.shape[:2]
    y1, x1, y2, x2 = box
    ys = y1 * (height - 1) + np.arange(size) * (y2 - y1) * (height - 1) / (size - 1)
    xs = x1 * (width - 1) + np.arange(size) * (x2 - x1) * (width - 1) / (size - 1)
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    y1i = np.minimum(y0 + 1, height - 1)
    x1i = np.minimum(x0 + 1, width - 1)
    wy = (ys - y0)[:, None, None]
    wx = (xs - x0)[None, :, None]
    top = image[y0][:, x0] * (1 - wx) + image[y0][:, x1i] * wx
    bottom = image[y1i][:, x0] * (1 - wx) + image[y1i][:, x1i] * wx
    return top * (1 - wy) + bottom * wy


def center_crop_area(image: np.ndarray, area: float = CENTER_CROP_AREA) -> np.ndarray:
    """Centre crop keeping `area` of the image (side sqrt(area)), resized back to the input size; uint8 in/out.

    As the OpenVLA LIBERO eval does: to float [0, 1], crop_and_resize, back to uint8 the way TensorFlow's
    convert_image_dtype does (multiply by 255.5 and truncate).
    """
    side = math.sqrt(area)
    offset = (1 - side) / 2
    as_float = image.astype(np.float32) / 255.0
    cropped = crop_and_resize_bilinear(as_float, (offset, offset, offset + side, offset + side), image.shape[0])
    return np.clip(np.floor(cropped * 255.5), 0, 255).astype(np.uint8)


def libero_image(raw_frame: np.ndarray, size: int, jpeg_round_trip: bool = True, center_crop: bool = True):
    """The LIBERO protocol for one camera frame: rotate 180°, (JPEG round trip), Lanczos resize, centre crop."""
    image = np.ascontiguousarray(raw_frame[::-1, ::-1])
    if jpeg_round_trip:
        image = _jpeg_round_trip(image)
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.LANCZOS))
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
    q01 = np.asarray(proprio_stats["q01"], dtype=np.float64)
    q99 = np.asarray(proprio_stats["q99"], dtype=np.float64)
    return np.clip(2.0 * (proprio - q01) / (q99 - q01 + 1e-8) - 1.0, -1.0, 1.0).astype(np.float32)


def libero_gripper(actions: np.ndarray) -> np.ndarray:
    """Model gripper (1 = open, 0 = close) -> LIBERO's (-1 = open, +1 = close): binarise with sign, then invert."""
    out = np.array(actions, dtype=np.float64, copy=True)
    out[..., -1] = -np.sign(2.0 * out[..., -1] - 1.0)
    return out


def select_norm_stats(norm_stats: dict, unnorm_key: str | None) -> tuple[str, dict]:
    """Pick the dataset statistics; LIBERO evals fall back from `<suite>` to `<suite>_no_noops`."""
    if not norm_stats:
        raise ValueError("the checkpoint's config.json has no norm_stats; cannot un-normalise actions")
    if unnorm_key is None:
        if len(norm_stats) != 1:
            raise ValueError(f"the checkpoint has statistics for several datasets; set unnorm_key to one of "
                             f"{sorted(norm_stats)}")
        unnorm_key = next(iter(norm_stats))
    for key in (unnorm_key, f"{unnorm_key}_no_noops"):
        if key in norm_stats:
            return key, norm_stats[key]
    raise KeyError(f"unnorm_key {unnorm_key!r} is not in the checkpoint's norm_stats; available: {sorted(norm_stats)}")
