"""The policy's image pipeline run inside the env workers, so the trainer process only stacks tensors.

The LIBERO pipeline (rotate, JPEG round trip, Lanczos resize, centre crop: trainer.models.processor.ImagePipeline)
costs about 11 ms of CPU per 256 px frame: 0.37 s per OFT batch of 16 (two views each) in the trainer process,
as long as the model call on an H200 (issue 13). In the workers it runs in parallel, one process per env, while the
policy runs. The pipeline object is the policy's own (pickled to the workers), so the inputs are the ones the
trainer would have made; `VLAPolicy.prepare` uses the prepared views when they came from the same pipeline and runs
the pipeline itself otherwise.

Cost: a worker that prepares images imports the model package (trainer.models, for the pipeline's code) once at start.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from trainer.envs.base import Observation


@dataclass
class PreparedObservation(Observation):
    """An observation with its camera frames already put through `pipeline` (the raw frames stay, for videos)."""

    views: np.ndarray = None  # uint8 [n_img, S, S, 3]: primary (and wrist) after the pipeline
    pipeline: Any = None  # the ImagePipeline that made `views`


@dataclass(frozen=True)
class PrepareViews:
    """The observation transform an env worker applies: the first `num_images` frames (primary, wrist) through
    `pipeline` (the policy's ImagePipeline, VLAPolicy.image_pipeline)."""

    pipeline: Any
    num_images: int

    def __call__(self, observation: Observation) -> PreparedObservation:
        frames = [observation.primary_image, observation.wrist_image][: self.num_images]
        views = np.stack([self.pipeline(frame) for frame in frames])
        plain = {f.name: getattr(observation, f.name) for f in fields(Observation)}
        return PreparedObservation(**plain, views=views, pipeline=self.pipeline)


class TransformedEnv:
    """An env whose every returned observation goes through `transform` (what a worker serves when the pool has an
    observation transform). Everything else is the wrapped env's."""

    def __init__(self, env, transform):
        self.env = env
        self.transform = transform

    def __getattr__(self, name):  # suite, max_steps, image_pipeline, num_tasks, ... of the wrapped env
        return getattr(self.env, name)

    def reset(self, task_id: int, init_state_id: int, seed: int, record_frames: bool = False) -> Observation:
        return self.transform(self.env.reset(task_id, init_state_id, seed, record_frames=record_frames))

    def step(self, actions):
        result = self.env.step(actions)
        return replace(result, observation=self.transform(result.observation))

    def close(self) -> None:
        self.env.close()
