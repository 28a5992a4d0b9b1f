"""The policy's image pipeline run in the env workers (trainer/envs/preprocess.py, env.preprocess_in_workers): the
model inputs must be exactly those the trainer process makes from the raw frames, for resets, steps and replacement
workers, and a rollout must collect the same episodes with it as without."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.envs.pool import EnvPool, ResetRequest
from trainer.envs.preprocess import PreparedObservation, PrepareViews
from trainer.envs.sharding import build_work_items
from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer
from trainer.models.processor import ImagePipeline
from trainer.rollout import collect_episodes

STANDIN = {"step_seconds": 0.0, "render_seconds": 0.0, "max_steps": 24, "success_per_step": 0.05}


def libero_policy(name="tiny-oft") -> VLAPolicy:
    """A tiny policy with LIBERO's image pipeline (rotate, JPEG, Lanczos resize to 32 px, centre crop)."""
    model, tokenizer = load_model_and_tokenizer(name, seed=0)
    return VLAPolicy(model, tokenizer, EnvSettings("libero", True, "toy")).eval()


def raw(observation) -> object:
    """The plain Observation inside a PreparedObservation (what a worker without the transform would send)."""
    from dataclasses import fields

    from trainer.envs.base import Observation

    return Observation(**{f.name: getattr(observation, f.name) for f in fields(Observation)})


def assert_same_inputs(a, b):
    assert torch.equal(a.images, b.images) and a.images.dtype == torch.uint8
    assert torch.equal(a.text_ids, b.text_ids) and torch.equal(a.text_mask, b.text_mask)
    assert (a.proprio is None and b.proprio is None) or torch.equal(a.proprio, b.proprio)


FULL_SIZE = ImagePipeline("libero", size=224)  # the released models' pipeline, the costly one


@pytest.fixture(scope="module")
def pools():
    """Stand-in env workers: raw frames, the tiny policy's pipeline, and the full-size one (one start each: a worker
    that prepares images imports the model package, which takes seconds)."""
    policy = libero_policy()
    with EnvPool("libero_standin", 2, STANDIN, start_timeout_s=300) as plain, \
         EnvPool("libero_standin", 2, STANDIN, observation_transform=policy.worker_transform(),
                 start_timeout_s=300) as prepared, \
         EnvPool("libero_standin", 1, STANDIN, observation_transform=PrepareViews(FULL_SIZE, 2),
                 start_timeout_s=300) as full_size:
        yield {"plain": plain, "prepared": prepared, "full_size": full_size}


def test_workers_prepare_exactly_the_inputs_the_trainer_makes(pools, monkeypatch):
    policy = libero_policy()
    pool = pools["prepared"]
    replies = pool.reset({0: ResetRequest(1, 3, 11), 1: ResetRequest(4, 0, 12)})
    observations = [replies[0].observation, replies[1].observation]
    steps = pool.step({0: np.zeros((8, 7)), 1: np.zeros((8, 7))})
    observations += [steps[0].result.observation, steps[1].result.observation]
    for observation in observations:
        assert isinstance(observation, PreparedObservation)
        assert observation.views.shape == (2, 32, 32, 3) and observation.pipeline == policy.image_pipeline
    pipeline_calls = []
    run_pipeline = ImagePipeline.__call__
    monkeypatch.setattr(ImagePipeline, "__call__", lambda self, frame: pipeline_calls.append(1) or run_pipeline(self,
                                                                                                             frame))
    prepared = policy.prepare(observations)
    assert pipeline_calls == []  # the trainer only stacked the workers' views
    assert_same_inputs(prepared, policy.prepare([raw(o) for o in observations]))
    assert len(pipeline_calls) == 8  # 4 observations x 2 views, from the raw frames
    # the frames differ from one observation to the next, so equal inputs are not a coincidence
    assert not np.array_equal(observations[0].views, observations[1].views)

    full = pools["full_size"].reset({0: ResetRequest(2, 5, 13)})[0].observation
    assert full.views.shape == (2, 224, 224, 3)
    np.testing.assert_array_equal(full.views, np.stack([FULL_SIZE(full.primary_image), FULL_SIZE(full.wrist_image)]))


def test_views_from_another_pipeline_are_not_used(pools):
    policy = libero_policy()
    observation = pools["full_size"].reset({0: ResetRequest(0, 0, 1)})[0].observation
    assert observation.views.shape[1] == 224
    assert_same_inputs(policy.prepare([observation]), policy.prepare([raw(observation)]))  # 32 px from the raw frames
    one_view = PreparedObservation(**vars(raw(observation)), views=observation.views[:1], pipeline=policy.image_pipeline)
    assert policy.prepare([one_view]).images.shape == (1, 2, 32, 32, 3)  # OFT wants two views: made here


def test_a_replacement_worker_prepares_images_too():
    policy = libero_policy("tiny")
    toy = {"crash_at_step": 1, "fault_init_state_id": 7, "max_steps": 4}
    with EnvPool("toy", 1, toy, observation_transform=policy.worker_transform(), start_timeout_s=300,
                 step_timeout_s=60) as pool:
        pool.reset({0: ResetRequest(0, 7, 1)})
        pool.step({0: np.zeros((1, 7))})
        crashed = pool.step({0: np.zeros((1, 7))})[0]
        assert not crashed.ok and pool.stats.workers[0].restarts == 1
        observation = pool.reset({0: ResetRequest(1, 2, 3)})[0].observation
    assert isinstance(observation, PreparedObservation) and observation.views.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("pipeline", [False, True])
def test_rollouts_with_images_prepared_in_the_workers_collect_the_same_episodes(pipeline, pools):
    policy = libero_policy()
    items = build_work_items([(0, 1), (3, 2)], samples_per_group=2)
    runs = [collect_episodes(policy, pools[kind], items, run_seed=2, temperature=1.4, pipeline=pipeline)[0]
            for kind in ("plain", "prepared")]
    for a, b in zip(*runs, strict=True):
        assert (a.seed, a.length, a.success, a.rewards) == (b.seed, b.length, b.success, b.rewards)
        assert all(torch.equal(x, y) for x, y in zip(a.token_ids, b.token_ids, strict=True))
        for x, y in zip(a.inputs, b.inputs, strict=True):
            assert_same_inputs(x, y)
