"""Speed options of the rollout that must not change what is collected: pipelined env steps (rollout.pipeline) and
the static-cache / CUDA-graph decoding (rollout.decode), on the toy task with subprocess env workers (EnvPool).

Each episode samples from its own stream (greedy choice and Gumbel noise), so the same items give the same seeds,
actions, rewards and log-probs however the policy calls were batched; only the batching may differ."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.envs.inline import InlinePool
from trainer.envs.pool import EnvPool, ResetRequest
from trainer.envs.sharding import build_work_items
from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer
from trainer.rollout import Rollout, collect_episodes, worker_halves

TOY = EnvSettings("none", False, "toy")
ENV = {"success_radius": 0.35, "max_steps": 12}
GROUPS = [(0, 1), (1, 2), (2, 3), (0, 4), (1, 5)]
_POLICIES: dict[str, VLAPolicy] = {}


def make_policy(name: str) -> VLAPolicy:
    if name not in _POLICIES:
        model, tokenizer = load_model_and_tokenizer(name, seed=0)
        policy = VLAPolicy(model, tokenizer, TOY, value_head=True).eval()
        with torch.no_grad():  # a value head that says something (its output layer starts at zero)
            last = policy.value_head.net[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=torch.Generator().manual_seed(5)))
        _POLICIES[name] = policy
    return _POLICIES[name]


class EventPool:
    """Wraps a pool; logs resets, steps (begin and end of each, with the workers) in order."""

    def __init__(self, pool, events: list):
        self.pool, self.events = pool, events
        self.num_workers = pool.num_workers

    def reset(self, requests, timeout_s=None):
        self.events.append(("reset", sorted(requests)))
        return self.pool.reset(requests, timeout_s)

    def reset_begin(self, requests, timeout_s=None):
        self.events.append(("reset_begin", sorted(requests)))
        return self.pool.reset_begin(requests, timeout_s)

    def reset_end(self, pending):
        replies = self.pool.reset_end(pending)
        self.events.append(("reset_end", sorted(replies)))
        return replies

    def step(self, actions, timeout_s=None):
        self.events.append(("step", sorted(actions)))
        return self.pool.step(actions, timeout_s)

    def step_begin(self, actions, timeout_s=None):
        self.events.append(("begin", sorted(actions)))
        return self.pool.step_begin(actions, timeout_s)

    def step_end(self, pending):
        replies = self.pool.step_end(pending)
        self.events.append(("end", sorted(replies)))
        return replies


def logged_acts(policy: VLAPolicy, events: list):
    original = type(policy).act.__get__(policy)

    def act(inputs, *args, **kwargs):
        events.append(("act", len(inputs)))
        return original(inputs, *args, **kwargs)

    return act


def rollout(policy, pool, events, **options):
    policy.act = logged_acts(policy, events)
    try:
        return collect_episodes(policy, EventPool(pool, events), build_work_items(GROUPS, samples_per_group=2),
                                temperature=1.3, run_seed=11, greedy_probability=0.3, **options)
    finally:
        del policy.act


def assert_same_episodes(reference, other, log_prob_atol=1e-5):
    for a, b in zip(reference, other, strict=True):
        assert (a.item, a.seed, a.success, a.length, a.rewards, a.greedy, a.env_error) == \
               (b.item, b.seed, b.success, b.length, b.rewards, b.greedy, b.env_error)
        assert all(torch.equal(x, y) for x, y in zip(a.token_ids, b.token_ids, strict=True))
        torch.testing.assert_close(torch.stack(b.log_probs), torch.stack(a.log_probs), rtol=0, atol=log_prob_atol)
        np.testing.assert_allclose(b.values, a.values, rtol=0, atol=1e-5)
        for x, y in zip(a.inputs, b.inputs, strict=True):
            assert torch.equal(x.images, y.images) and torch.equal(x.text_ids, y.text_ids)


@pytest.fixture(scope="module")
def toy_pool():
    with EnvPool("toy", 4, ENV, step_timeout_s=30, reset_timeout_s=30, start_timeout_s=120) as pool:
        yield pool


@pytest.mark.parametrize("name", ["tiny", "tiny-oft"])
def test_pipelined_rollout_collects_the_same_episodes_and_overlaps_policy_and_env_steps(name, toy_pool):
    policy = make_policy(name)
    plain_events, piped_events = [], []
    plain, plain_stats = rollout(policy, toy_pool, plain_events)
    piped, piped_stats = rollout(policy, toy_pool, piped_events, pipeline=True)
    assert_same_episodes(plain, piped)
    assert 0 < sum(e.success for e in plain) < len(plain)  # both outcomes, and ...
    assert any(any(e.greedy) and not all(e.greedy) for e in plain)  # ... greedy and sampled steps within an episode
    assert plain_stats.env_steps == piped_stats.env_steps == sum(e.length for e in plain)

    # lockstep: one act for all live workers, then one blocking step of them all
    assert [kind for kind, _ in plain_events if kind in ("begin", "end")] == []
    # pipelined: acts for one half at a time, each sent with step_begin before the other half's act
    halves = [set(half) for half in worker_halves(4)]
    assert all(any(set(workers) <= half for half in halves) for kind, workers in piped_events if kind == "begin")
    assert all(size <= 2 for kind, size in piped_events if kind == "act")
    assert piped_stats.policy_calls == sum(1 for kind, _ in piped_events if kind == "act") > plain_stats.policy_calls
    # the parent's time outside policy calls and env waits is timed in parts; only the pipeline sends on its own
    assert piped_stats.send_seconds > 0 and plain_stats.send_seconds == 0
    assert min(piped_stats.draw_seconds, piped_stats.record_seconds, plain_stats.record_seconds) > 0
    # the workers' own step time covers every chunk the episodes stored, in both loops
    chunks = sum(len(e.token_ids) for e in plain)
    assert plain_stats.worker_steps == piped_stats.worker_steps == chunks
    assert plain_stats.worker_step_seconds > 0 and piped_stats.worker_step_seconds > 0
    overlapped = 0
    for start, (kind, workers) in enumerate(piped_events):
        if kind != "begin":
            continue
        end = next(i for i in range(start + 1, len(piped_events)) if piped_events[i] == ("end", workers)
                   or (piped_events[i][0] == "end" and set(piped_events[i][1]) <= set(workers)))
        overlapped += any(k == "act" for k, _ in piped_events[start + 1:end])
    assert overlapped >= len([e for e in piped_events if e[0] == "begin"]) // 2  # most steps ran beside an act


def test_static_decoding_collects_the_same_episodes(toy_pool):
    policy = make_policy("tiny")
    dynamic, _ = rollout(policy, toy_pool, [])
    static, _ = rollout(policy, toy_pool, [], decode="static")
    both, _ = rollout(policy, toy_pool, [], decode="static", pipeline=True)
    assert_same_episodes(dynamic, static)
    assert_same_episodes(dynamic, both)


def test_pipelined_rollout_stops_early_and_keeps_what_was_stepped(toy_pool):
    policy = make_policy("tiny-oft")
    events, checks = [], []

    def fourth_check() -> bool:
        checks.append(1)
        return len(checks) == 4

    episodes, stats = collect_episodes(policy, EventPool(toy_pool, events), build_work_items(GROUPS, 2),
                                       run_seed=3, pipeline=True, should_stop=fourth_check)
    # the check runs before each half's act: two acts per half happened, and the steps they sent were collected
    assert stats.policy_calls == 3
    begun = [w for kind, workers in events if kind == "begin" for w in workers]
    ended = [w for kind, workers in events if kind == "end" for w in workers]
    assert sorted(begun) == sorted(ended)  # nothing left in flight
    started = [e for e in episodes if e.seed != 0]
    assert len(started) >= 4 and all(e.env_error in ("stopped", None) for e in episodes)
    assert sum(e.num_policy_steps for e in started) == len(begun)  # every step sent was recorded
    assert all(e.env_error == "stopped" for e in episodes if e.seed == 0)
    # the pool is usable afterwards: no worker is left busy
    assert toy_pool.reset({0: ResetRequest(0, 0, 1)})[0].ok


def test_sampling_streams_do_not_depend_on_the_batch():
    """The same episode acts the same whether its env shares policy calls with 3 other envs or with none (in-process
    pool: one worker vs four, on items whose env seeds match, i.e. the same worker index)."""
    policy = make_policy("tiny-oft")
    items = build_work_items([(0, 1)], samples_per_group=1)
    alone, _ = collect_episodes(policy, InlinePool("toy", 1, ENV), items, run_seed=4, temperature=1.5)
    crowded, _ = collect_episodes(policy, InlinePool("toy", 4, ENV), items + build_work_items([(1, 2), (2, 3)], 2)[1:],
                                  run_seed=4, temperature=1.5)
    assert_same_episodes(alone, crowded[:1])


def test_pool_step_begin_refuses_a_worker_whose_step_is_in_flight(toy_pool):
    toy_pool.reset({0: ResetRequest(0, 0, 1), 1: ResetRequest(1, 1, 2)})
    chunk = np.zeros((1, 7))
    pending = toy_pool.step_begin({0: chunk})
    with pytest.raises(RuntimeError, match="in flight"):
        toy_pool.step_begin({0: chunk})
    with pytest.raises(RuntimeError, match="in flight"):
        toy_pool.reset_begin({0: ResetRequest(0, 0, 3)})
    other = toy_pool.step_begin({1: chunk})  # another worker may step meanwhile
    assert toy_pool.step_end(other)[1].ok and toy_pool.step_end(pending)[0].ok
    # resets the same way: worker 1 resets in the background while worker 0 steps; then worker 1 steps again
    resets_before = toy_pool.stats.workers[1].resets
    resetting = toy_pool.reset_begin({1: ResetRequest(2, 0, 5)})
    with pytest.raises(RuntimeError, match="in flight"):
        toy_pool.step_begin({1: chunk})
    assert toy_pool.step({0: chunk})[0].ok
    reply = toy_pool.reset_end(resetting)[1]
    assert reply.ok and reply.observation is not None and toy_pool.stats.workers[1].resets == resets_before + 1
    assert toy_pool.step({1: chunk})[1].ok
    assert toy_pool.step({0: chunk})[0].ok  # and worker 0 takes calls again


def test_training_rollout_options(toy_pool):
    from types import SimpleNamespace

    from trainer.train import rollout_options

    def config(pipeline=True, decode="auto"):
        return SimpleNamespace(rollout=SimpleNamespace(pipeline=pipeline, decode=decode))

    cpu = SimpleNamespace(device=torch.device("cpu"), backend="single")
    assert rollout_options(config(), cpu, toy_pool) == {"pipeline": True, "decode": "dynamic"}
    assert rollout_options(config(), cpu, InlinePool("toy", 1))["pipeline"] is False  # in-process envs cannot overlap
    assert rollout_options(config(pipeline=False), cpu, toy_pool)["pipeline"] is False
    for backend, decode in (("single", "graphs"), ("ddp", "graphs"), ("fsdp", "dynamic"), ("deepspeed_zero3", "dynamic")):
        gpu = SimpleNamespace(device=torch.device("cuda"), backend=backend)
        assert rollout_options(config(), gpu, toy_pool)["decode"] == decode
    assert rollout_options(config(decode="static"), cpu, toy_pool)["decode"] == "static"


@pytest.mark.parametrize("pipeline", [False, True])
def test_first_resets_sent_ahead_give_the_same_episodes(toy_pool, pipeline):
    """Rollout.send_first_resets (what the training loop does before its update): the workers reset in the
    background, take no other call meanwhile, and the rollout then collects exactly the episodes it would have."""
    policy = make_policy("tiny-oft")
    items = build_work_items(GROUPS, samples_per_group=2)
    options = {"temperature": 1.3, "run_seed": 11, "greedy_probability": 0.3, "episode_offset": 5}
    reference, _ = collect_episodes(policy, toy_pool, items, pipeline=pipeline, **options)
    events = []
    ahead = Rollout(policy, EventPool(toy_pool, events), items, **options)
    ahead.send_first_resets()
    assert events == [("reset_begin", [0, 1, 2, 3])]
    with pytest.raises(RuntimeError, match="in flight"):  # the workers are busy until collect receives them
        toy_pool.step_begin({0: np.zeros((1, 7))})
    episodes, stats = ahead.collect(pipeline=pipeline)
    assert events[1] == ("reset_end", [0, 1, 2, 3])  # received first, then the episodes ran as usual
    assert_same_episodes(reference, episodes)
    assert stats.env_steps == sum(e.length for e in reference)
