"""Regenerate tests/fixtures/libero_image_pipeline.npz: real LIBERO frames and what the official TensorFlow image
steps make of them. Not part of the project's dependencies; it documents how the fixture was made.

Two steps, in two environments (TensorFlow is not a project dependency):

    # 1. render real frames with the project's venv (OSMesa on a CPU host)
    PYTHONPATH=$PWD .venv/bin/python scripts/image_fixtures.py render /tmp/libero_frames.npz

    # 2. apply the official TensorFlow functions in a scratch venv
    python3.11 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu==2.21.0 numpy pillow
    /tmp/tfenv/bin/python scripts/image_fixtures.py reference /tmp/libero_frames.npz tests/fixtures/libero_image_pipeline.npz

The `reference` step calls the TensorFlow functions in the order and with the arguments the official evaluation code
uses (openvla/openvla `experiments/robot/libero/libero_utils.py` resize_image + `experiments/robot/openvla_utils.py`
crop_and_resize / get_vla_action; moojink/openvla-oft `experiments/robot/openvla_utils.py` resize_image_for_policy,
prepare_images_for_vla and center_crop_image). Those call sequences are re-typed here, not imported: the official
repositories need a GPU stack to import.

Frames: the official scene procedure (one env per task, env.seed(0), reset, set_init_state, 10 no-op steps), 256 px
cameras as the official evaluation uses, agentview and wrist views; libero_spatial task 0 (also after 12 policy-like
steps, so that the wrist view shows the moving gripper) and libero_goal task 0.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

CAMERA_SIZE = 256
POLICY_SIZE = 224
CROP_AREA = 0.9
WAIT_ACTION = [0, 0, 0, 0, 0, 0, -1]
# (suite, task, init state, extra steps before the frame is taken)
SCENES = [("libero_spatial", 0, 0, 0), ("libero_spatial", 0, 1, 12), ("libero_goal", 0, 0, 0)]


def render(out_path: str, backend: str = "osmesa") -> None:
    from trainer.envs.libero_setup import ensure_libero_ready
    from trainer.envs.render import apply_render_env

    apply_render_env(backend)
    ensure_libero_ready()
    from libero.libero import benchmark
    from libero.libero.envs import OffScreenRenderEnv

    frames, names = [], []
    for suite, task_id, init_id, extra_steps in SCENES:
        task_suite = benchmark.get_benchmark_dict()[suite]()
        env = OffScreenRenderEnv(bddl_file_name=task_suite.get_task_bddl_file_path(task_id),
                                 camera_heights=CAMERA_SIZE, camera_widths=CAMERA_SIZE)
        env.seed(0)
        env.reset()
        obs = env.set_init_state(task_suite.get_task_init_states(task_id)[init_id])
        for _ in range(10):
            obs, _, _, _ = env.step(WAIT_ACTION)
        rng = np.random.default_rng(init_id)
        for _ in range(extra_steps):  # a short reach forward and down, so that the wrist view moves
            action = np.array([0.4, 0.1, -0.3, 0.0, 0.0, 0.0, -1.0]) + rng.normal(0, 0.05, 7)
            obs, _, _, _ = env.step(action.tolist())
        env.close()
        for view in ("agentview", "robot0_eye_in_hand"):
            frames.append(np.asarray(obs[f"{view}_image"], dtype=np.uint8))
            names.append(f"{suite}/task{task_id}/init{init_id}/step{extra_steps}/{view}")
    np.savez_compressed(out_path, frames=np.stack(frames), names=np.array(names))
    print(f"{len(frames)} frames written to {out_path}")


def reference(frames_path: str, out_path: str) -> None:
    import tensorflow as tf
    from PIL import Image

    def resize_like_rlds_builder(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """OpenVLA resize_image / OFT resize_image_for_policy: JPEG round trip, Lanczos3 with antialias, round."""
        jpeg = tf.image.encode_jpeg(img)
        decoded = tf.io.decode_image(jpeg, expand_animations=False, dtype=tf.uint8)
        resized = tf.image.resize(decoded, (POLICY_SIZE, POLICY_SIZE), method="lanczos3", antialias=True)
        resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
        return np.frombuffer(jpeg.numpy(), dtype=np.uint8), decoded.numpy(), resized.numpy()

    def center_crop(img: np.ndarray) -> np.ndarray:
        """OpenVLA get_vla_action(center_crop=True) / OFT center_crop_image: area-0.9 centre box, back to 224."""
        image = tf.convert_to_tensor(np.array(Image.fromarray(img).convert("RGB")))
        orig_dtype = image.dtype
        image = tf.image.convert_image_dtype(image, tf.float32)
        image = tf.expand_dims(image, axis=0)
        batch_size = 1
        new_heights = tf.reshape(tf.clip_by_value(tf.sqrt(CROP_AREA), 0, 1), shape=(batch_size,))
        new_widths = tf.reshape(tf.clip_by_value(tf.sqrt(CROP_AREA), 0, 1), shape=(batch_size,))
        height_offsets = (1 - new_heights) / 2
        width_offsets = (1 - new_widths) / 2
        boxes = tf.stack([height_offsets, width_offsets, height_offsets + new_heights, width_offsets + new_widths],
                         axis=1)
        image = tf.image.crop_and_resize(image, boxes, tf.range(batch_size), (POLICY_SIZE, POLICY_SIZE))[0]
        image = tf.clip_by_value(image, 0, 1)
        image = tf.image.convert_image_dtype(image, orig_dtype, saturate=True)
        return np.asarray(Image.fromarray(image.numpy()).convert("RGB"))

    data = np.load(frames_path)
    frames, names = data["frames"], data["names"]
    arrays = {"frames": frames, "names": names, "tensorflow_version": np.array(tf.__version__)}
    for index, (frame, name) in enumerate(zip(frames, names)):
        rotated = np.ascontiguousarray(frame[::-1, ::-1])  # get_libero_image / get_libero_wrist_image
        jpeg, decoded, resized = resize_like_rlds_builder(rotated)
        arrays[f"jpeg_{index}"] = jpeg
        arrays["decoded"] = arrays.get("decoded", []) + [decoded]
        arrays["resized"] = arrays.get("resized", []) + [resized]
        # OpenVLA evaluates the agentview image only; OFT both views, each through the same two steps (its
        # prepare_images_for_vla skips the resize because the image is already 224 px).
        arrays["final"] = arrays.get("final", []) + [center_crop(resized)]
        print(f"{name}: jpeg {len(jpeg)} bytes")
    for key in ("decoded", "resized", "final"):
        arrays[key] = np.stack(arrays[key])
    np.savez_compressed(out_path, **arrays)
    print(f"written {out_path} (TensorFlow {tf.__version__})")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    render_parser = sub.add_parser("render")
    render_parser.add_argument("out")
    render_parser.add_argument("--backend", default="osmesa", help="osmesa (the committed fixture) or egl (GPU hosts: "
                               "the same scenes, to measure how far OSMesa frames are from EGL ones)")
    reference_parser = sub.add_parser("reference")
    reference_parser.add_argument("frames")
    reference_parser.add_argument("out")
    args = parser.parse_args(argv)
    if args.step == "render":
        render(args.out, args.backend)
    else:
        reference(args.frames, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
