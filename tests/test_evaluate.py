"""Evaluation counts as the official protocol counts, asks the envs for the official scenes, and decodes greedy actions
the official way (the L1 head of a released OFT checkpoint; the tokens of a policy trained here)."""


import numpy as np
import pytest

from trainer.envs.base import Observation, StepResult
from trainer.envs.pool import EnvInfo, ResetReply, StepReply
from trainer.envs.seeding import OFFICIAL_SCENE
from trainer.envs.sharding import WorkItem
from trainer.evaluate import evaluate, protocol_items
from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer
from trainer.rollout import success_rate


class SingleProcess:
    rank, world_size, is_main = 0, 1, True

    @staticmethod
    def sum_metrics(metrics):
        return dict(metrics)


def _observation(rng) -> Observation:
    return Observation(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                       rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), np.zeros(8, np.float32), "reach the target")


class ScriptedPool:
    """Three workers whose first step ends the episode: worker 0 succeeds, worker 1's env crashes, worker 2 fails."""

    num_workers = 3
    info = EnvInfo(suite="stub", max_steps=5, image_pipeline="none", num_init_states=(50,),
                   instructions=("reach the target",))

    def __init__(self):
        self.rng = np.random.default_rng(0)
        self.reset_seeds = []

    def reset(self, requests, timeout_s=None):
        self.reset_seeds += [request.seed for request in requests.values()]
        return {worker: ResetReply(_observation(self.rng), None, 0.0) for worker in requests}

    def step(self, actions, timeout_s=None):
        replies = {}
        for worker in actions:
            if worker == 1:
                replies[worker] = StepReply(None, "worker died during step (killed by SIGKILL)", 0.0)
            else:
                result = StepResult(_observation(self.rng), reward=float(worker == 0), success=worker == 0, done=True,
                                    steps_executed=1)
                replies[worker] = StepReply(result, None, 0.0)
        return replies


def _policy(name="tiny-oft"):
    model, tokenizer = load_model_and_tokenizer(name, seed=0)
    return VLAPolicy(model, tokenizer, EnvSettings("none", False, "toy")).eval()


def test_a_crashed_episode_counts_as_a_failure_and_the_errors_are_shown():
    pool = ScriptedPool()
    items = protocol_items([0], 3, [50])
    report = evaluate(_policy(), pool, items, SingleProcess(), greedy=True)
    assert report.per_task == {0: (1, 3)} and report.success_rate == pytest.approx(1 / 3)
    assert report.env_errors == 1 and report.errors_per_task == {0: 1}
    table = report.table()
    assert "(greedy; env errors: 1, counted as failures)" in table and "task 0: 1" in table
    data = report.to_json()
    assert data["success_rate"] == pytest.approx(1 / 3) and data["per_task"]["0"]["env_errors"] == 1
    assert data["env_errors_count_as_failures"] is True


def test_training_keeps_excluding_errored_episodes():
    """The training side's statistic (and its loss) still leaves crashed episodes out: 1 of the 2 that ran."""
    from trainer.rollout import collect_episodes

    episodes, _ = collect_episodes(_policy("tiny"), ScriptedPool(), protocol_items([0], 3, [50]),
                                   keep_trajectories=True)
    assert [e.env_error is not None for e in episodes] == [False, True, False]
    assert success_rate(episodes) == pytest.approx(1 / 2)


def test_stopped_episodes_are_not_counted():
    pool = ScriptedPool()
    report = evaluate(_policy(), pool, protocol_items([0], 3, [50]), SingleProcess(), greedy=True, stop=lambda: True)
    assert report.stopped == 3 and report.per_task == {0: (0, 0)} and report.env_errors == 0


def test_evaluation_asks_for_the_official_scene_of_every_trial():
    pool = ScriptedPool()
    evaluate(_policy(), pool, protocol_items([0], 3, [50]), SingleProcess(), greedy=False)
    assert pool.reset_seeds == [OFFICIAL_SCENE] * 3


def test_protocol_trial_k_starts_from_initial_state_k():
    items = protocol_items([0, 2], 3, [50, 50, 2])
    # task 2 has 2 initial states only: its third trial cycles back to state 0
    assert [(i.task_id, i.init_state_id) for i in items] == [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1), (2, 0)]
    assert items[5] == WorkItem(task_id=2, init_state_id=0, sample_index=0, group_id=5)


def test_released_oft_is_evaluated_with_its_l1_head_and_a_policy_trained_here_with_its_tokens():
    from trainer.models.lora import LoraSettings, apply_lora

    released = _policy("tiny-oft")
    assert released.eval_uses_l1_head
    report = evaluate(released, ScriptedPool(), protocol_items([0], 3, [50]), SingleProcess(), greedy=True)
    assert report.actions.startswith("L1 regression head")
    forced = evaluate(released, ScriptedPool(), protocol_items([0], 3, [50]), SingleProcess(), greedy=True,
                      use_l1_head=False)
    assert forced.actions.startswith("action tokens, argmax over the whole vocabulary")
    sampled = evaluate(released, ScriptedPool(), protocol_items([0], 3, [50]), SingleProcess(), greedy=False)
    assert sampled.actions.startswith("action tokens sampled")

    model, tokenizer = load_model_and_tokenizer("tiny-oft", seed=0)
    trained = VLAPolicy(apply_lora(model, LoraSettings(rank=4, alpha=4, target_modules="all-linear")), tokenizer,
                        EnvSettings("none", False, "toy"))
    assert not trained.eval_uses_l1_head and trained.config.trainer.oft.trained_on_tokens
    report = evaluate(trained, ScriptedPool(), protocol_items([0], 3, [50]), SingleProcess(), greedy=True)
    assert report.actions.startswith("action tokens, argmax over the whole vocabulary")
    assert "greedy evaluation: action tokens" in trained.summary()
    assert report.norm_stats == "'toy' (as requested), from preset"


def test_official_greedy_is_refused_for_trajectories():
    from trainer.rollout import collect_episodes

    with pytest.raises(ValueError, match="keep_trajectories=False"):
        collect_episodes(_policy("tiny"), ScriptedPool(), protocol_items([0], 1, [50]), official_greedy=True)


def test_summary_names_the_decoding_and_the_norm_stats():
    summary = _policy("tiny-oft").summary()
    assert "OpenVLA-OFT (2 view(s), proprio; 8-action chunks, L1 head)" in summary
    assert "greedy evaluation: L1 regression head" in summary and "norm stats: 'toy'" in summary




def test_summary_says_how_the_toy_and_libero_decode_greedily():
    """The toy suite has no official protocol: its summary names the action-id argmax that evaluate() uses for it;
    a LIBERO suite names the official whole-vocabulary argmax."""
    from trainer.build import EnvConfig, env_settings

    model, tokenizer = load_model_and_tokenizer("tiny", seed=0)
    toy = VLAPolicy(model, tokenizer, env_settings(EnvConfig(suite="toy")))
    assert "greedy evaluation: action tokens, argmax over the 256 action ids (no official protocol)" in toy.summary()
    libero = VLAPolicy(model, tokenizer, env_settings(EnvConfig(suite="libero_spatial", unnorm_key="toy")))
    assert "greedy evaluation: action tokens, argmax over the whole vocabulary (the official decode)" in libero.summary()
