"""The LIBERO image pipeline against the official TensorFlow functions, on real LIBERO frames.

tests/fixtures/libero_image_pipeline.npz was made by scripts/image_fixtures.py: six 256 px frames rendered with LIBERO
(agentview and wrist views of libero_spatial and libero_goal scenes), then the official evaluation's TensorFlow 2.21
calls (encode_jpeg + decode_image, resize lanczos3 with antialias, round / clip / cast, centre crop_and_resize with
convert_image_dtype on both sides). Every stage must match exactly. The one place where exactness depends on the
platform is the sine in the Lanczos weights: with the C library's sinf (Linux) the resize is exact; the float64
fallback may move a value by one grey level, so where it is in use the test allows <= 1 level on <= 0.1% of values.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.envs.base import Observation
from trainer.models import processor
from trainer.models.processor import ImagePipeline

FIXTURE = Path(__file__).parent / "fixtures" / "libero_image_pipeline.npz"


@pytest.fixture(scope="module")
def reference():
    data = np.load(FIXTURE)
    return {key: data[key] for key in data.files}


def assert_matches(ours: np.ndarray, expected: np.ndarray, exact: bool, what: str) -> None:
    assert ours.shape == expected.shape and ours.dtype == expected.dtype == np.uint8, what
    diff = np.abs(ours.astype(int) - expected.astype(int))
    if exact:
        assert diff.max() == 0, f"{what}: {int((diff > 0).sum())} values differ, by up to {diff.max()} levels"
    else:
        assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, f"{what}: max {diff.max()}, {(diff > 0).mean():.2%}"


def view_indices(reference, view: str) -> list[int]:
    return [i for i, name in enumerate(reference["names"]) if str(name).endswith(view)]


def test_fixture_covers_both_views_of_two_suites(reference):
    names = [str(n) for n in reference["names"]]
    assert len(names) == 6 and str(reference["tensorflow_version"]) == "2.21.0"
    assert {n.split("/")[0] for n in names} == {"libero_spatial", "libero_goal"}
    assert len(view_indices(reference, "agentview")) == len(view_indices(reference, "robot0_eye_in_hand")) == 3
    assert reference["frames"].shape == (6, 256, 256, 3) and reference["final"].shape == (6, 224, 224, 3)


def test_jpeg_round_trip_equals_tensorflow(reference):
    for index, frame in enumerate(reference["frames"]):
        rotated = np.ascontiguousarray(frame[::-1, ::-1])
        assert_matches(processor.encode_decode_jpeg(rotated), reference["decoded"][index], True, f"frame {index}")


def test_resize_equals_tensorflow_lanczos3_antialias(reference):
    exact = processor._c_sinf() is not None
    for index, decoded in enumerate(reference["decoded"]):
        resized = processor.round_to_uint8(processor.resize_lanczos3(decoded, 224))
        assert_matches(resized, reference["resized"][index], exact, f"frame {index}")


def test_center_crop_equals_tensorflow(reference):
    for index, resized in enumerate(reference["resized"]):
        assert_matches(processor.center_crop_area(resized), reference["final"][index], True, f"frame {index}")


def test_pil_decoding_would_not_match(reference):
    """The reason for simplejpeg: PIL's accurate IDCT is not what TensorFlow decodes with."""
    import io

    from PIL import Image

    jpeg = reference["jpeg_0"].tobytes()
    pil = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(int)
    assert np.abs(pil - reference["decoded"][0]).max() > 5


@pytest.mark.parametrize("view", ["agentview", "robot0_eye_in_hand"])
def test_openvla_and_oft_pipeline_end_to_end(reference, view):
    """OpenVLA's evaluation uses the agentview steps; OFT applies the same steps to both views."""
    pipeline = ImagePipeline("libero", size=224)
    exact = processor._c_sinf() is not None
    for index in view_indices(reference, view):
        assert_matches(pipeline(reference["frames"][index]), reference["final"][index], exact, f"frame {index}")


def test_policy_prepare_gives_the_official_images_for_both_oft_views(reference):
    """Through the policy: OFT's two views in order [agentview, wrist], each through the official steps."""
    from trainer.models import EnvSettings, VLAPolicy, build_model, build_tiny_tokenizer, preset

    config = preset("tiny-oft")
    config.image_sizes = [224, 224]
    config.norm_stats["libero_spatial"] = config.norm_stats["toy"]
    policy = VLAPolicy(build_model(config, seed=0), build_tiny_tokenizer(config.base_vocab_size),
                       EnvSettings("libero", True, "libero_spatial"))
    primary, wrist = view_indices(reference, "agentview"), view_indices(reference, "robot0_eye_in_hand")
    observations = [Observation(reference["frames"][p], reference["frames"][w], np.zeros(8, np.float32), "pick")
                    for p, w in zip(primary, wrist)]
    images = policy.prepare(observations).images
    assert images.shape == (3, 2, 224, 224, 3)
    expected = torch.from_numpy(np.stack([reference["final"][primary], reference["final"][wrist]], axis=1))
    diff = (images.int() - expected.int()).abs()
    assert diff.max() <= (0 if processor._c_sinf() is not None else 1)
