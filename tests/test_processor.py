import math

import numpy as np
import pytest
import torch

from trainer.models.processor import (
    DINO_MEAN,
    DINO_STD,
    ImagePipeline,
    center_crop_area,
    crop_and_resize_bilinear,
    libero_gripper,
    libero_image,
    normalize_proprio,
    pixel_values,
    prompt_for,
    select_norm_stats,
    unnormalize_actions,
)


def test_prompt_format():
    assert prompt_for("Pick up the BLACK bowl") == "In: What action should the robot take to pick up the black bowl?\nOut:"


def test_dino_constants_are_the_bf16_rounded_imagenet_values():
    rounded = torch.tensor([0.485, 0.456, 0.406, 0.229, 0.224, 0.225]).to(torch.bfloat16).float().tolist()
    assert rounded == list(DINO_MEAN + DINO_STD)


def test_crop_and_resize_samples_where_tensorflow_does():
    # A linear ramp is reproduced exactly by bilinear sampling, so each output is the sample position itself:
    # box 0.1..0.9 on a 5-pixel axis samples rows/cols 0.4, 1.2, 2.0, 2.8, 3.6.
    y, x = np.mgrid[0:5, 0:5].astype(np.float64)
    image = (10 * y + x)[..., None]
    out = crop_and_resize_bilinear(image, (0.1, 0.1, 0.9, 0.9), 5)[..., 0]
    samples = np.array([0.4, 1.2, 2.0, 2.8, 3.6])
    np.testing.assert_allclose(out, 10 * samples[:, None] + samples[None, :], atol=1e-12)


def test_center_crop_hand_computed_pixel():
    # 8x8 ramp image along x with value 20*x. Side sqrt(0.9); offset (1-side)/2; x_j = offset*7 + j*side*7/7.
    image = np.tile((20 * np.arange(8, dtype=np.uint8))[None, :, None], (8, 1, 3))
    out = center_crop_area(image)
    side = math.sqrt(0.9)
    offset = (1 - side) / 2
    for j in (0, 3, 7):
        x = offset * 7 + j * side
        expected = math.floor((20 * x / 255.0) * 255.5)
        assert out[4, j, 0] == expected
    assert out.dtype == np.uint8 and out.shape == image.shape


def test_center_crop_keeps_a_constant_image():
    image = np.full((16, 16, 3), 77, dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_area(image), image)


def test_libero_pipeline_rotates_180_degrees():
    frame = np.zeros((4, 4, 3), dtype=np.uint8)
    frame[0, 0] = [255, 0, 0]  # top-left red pixel ends bottom-right
    out = libero_image(frame, size=4, jpeg_round_trip=False, center_crop=False)
    assert out[3, 3].tolist() == [255, 0, 0]
    assert out[0, 0].tolist() == [0, 0, 0]


def test_libero_pipeline_shapes_and_resize():
    frame = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    out = ImagePipeline("libero", size=224)(frame)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    flat = ImagePipeline("libero", size=224)(np.full((256, 256, 3), 200, dtype=np.uint8))
    assert np.abs(flat.astype(int) - 200).max() <= 1  # JPEG + Lanczos + crop of a flat image stay flat


def test_pipeline_rejects_bad_frames():
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        ImagePipeline("none", size=32)(np.zeros((32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="unknown image pipeline"):
        ImagePipeline("bogus", size=32)(np.zeros((32, 32, 3), dtype=np.uint8))


def test_pixel_values_normalisation_and_channel_order():
    images = torch.zeros(2, 2, 4, 4, 3, dtype=torch.uint8)
    images[:, :, :, :, 0] = 255
    out = pixel_values(images)
    assert out.shape == (2, 12, 4, 4)
    # view 0: DINO channels 0..2, SigLIP channels 3..5; view 1 follows.
    assert out[0, 0, 0, 0].item() == pytest.approx((1 - DINO_MEAN[0]) / DINO_STD[0])
    assert out[0, 1, 0, 0].item() == pytest.approx((0 - DINO_MEAN[1]) / DINO_STD[1])
    assert out[0, 3, 0, 0].item() == pytest.approx(1.0)
    assert out[0, 4, 0, 0].item() == pytest.approx(-1.0)
    assert torch.equal(out[:, 6:], out[:, :6])


def test_unnormalize_with_q01_q99_and_mask():
    stats = {"q01": [0.0, -2.0, 0, 0, 0, 0, 0], "q99": [1.0, 2.0, 1, 1, 1, 1, 1],
             "mask": [True, True, True, True, True, True, False]}
    normalized = np.array([0.5, -1.0, 1.0, 0.0, 0.0, 0.0, 0.3])
    out = unnormalize_actions(normalized, stats)
    # 0.5*(a+1)*(q99-q01)+q01: 0.75, -2, 1, 0.5 ...; the masked gripper passes through.
    np.testing.assert_allclose(out, [0.75, -2.0, 1.0, 0.5, 0.5, 0.5, 0.3])
    with_eps = unnormalize_actions(normalized, stats, range_eps=1e-8)
    assert with_eps[0] == pytest.approx(0.75 + 0.75e-8)


def test_libero_gripper_binarises_and_inverts():
    actions = np.array([[0, 0, 0, 0, 0, 0, 0.9], [0, 0, 0, 0, 0, 0, 0.1], [1, 2, 3, 4, 5, 6, 0.5]])
    out = libero_gripper(actions)
    assert out[:, -1].tolist() == [-1.0, 1.0, 0.0]  # open -> -1, close -> +1 (sign(0) stays 0, as released)
    np.testing.assert_array_equal(out[:, :-1], actions[:, :-1])


def test_proprio_normalisation():
    stats = {"q01": [0.0] * 8, "q99": [2.0] * 8}
    out = normalize_proprio(np.array([1.0, 0.0, 2.0, 5.0, -3.0, 0.5, 1.5, 1.0]), stats)
    np.testing.assert_allclose(out, [0, -1, 1, 1, -1, -0.5, 0.5, 0], atol=1e-6)


def test_norm_stats_selection():
    stats = {"libero_spatial_no_noops": {"action": {}}, "bridge": {"action": {}}}
    assert select_norm_stats(stats, "libero_spatial")[0] == "libero_spatial_no_noops"
    with pytest.raises(KeyError, match="available"):
        select_norm_stats(stats, "libero_goal")
    with pytest.raises(ValueError, match="set unnorm_key"):
        select_norm_stats(stats, None)
