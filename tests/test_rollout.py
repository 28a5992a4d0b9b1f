"""The rollout collector on the toy task: trajectories, batching, chunking, seeds, early stop, videos, env faults.

Every rollout here runs the tiny random-init policies (`tiny`: one action per policy step, 7 tokens decoded with a KV
cache; `tiny-oft`: one forward per chunk of 8 actions, 56 tokens). A trajectory is checked by REPLAYING it in a fresh
ToyReachEnv: reset with the episode's (task, init state, seed), then execute the actions decoded from the stored token
ids; the observation before every policy step must be the one stored in `inputs`, and the rewards, success and length
must come out the same. That one check covers "token ids, inputs and rewards belong together, nothing is missing".

The relation between policy calls and episode lengths that is asserted (exact): a worker is addressed by every policy
step from the first one until its last episode ends, with no gap (an ended episode's worker is reset and joins the very
next policy call), so with S_w = sum over the episodes that worker w ran of (recorded policy steps + 1 if the episode
failed inside a step), the number of policy calls is max_w S_w, and worker w is in exactly the calls 1..S_w.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import psutil
import pytest
import torch

from trainer.envs.inline import InlinePool
from trainer.envs.pool import EnvPool
from trainer.envs.seeding import derive_seed
from trainer.envs.sharding import WorkItem, build_work_items
from trainer.envs.toy import ToyReachEnv
from trainer.models import EnvSettings, PolicyInputs, VLAPolicy, load_model_and_tokenizer
from trainer.models.processor import normalize_proprio
from trainer.rollout import Episode, Rollout, collect_episodes, success_rate, write_video

TOY = EnvSettings("none", False, "toy")
TOKENS_PER_STEP = {"tiny": 7, "tiny-oft": 56}
FORWARDS_PER_STEP = {"tiny": 7, "tiny-oft": 1}  # prefill + 6 cached decoding steps; one parallel-decoding forward
NEVER_SUCCEEDS = {"success_radius": 1e-3}  # the agent cannot get this close by chance: every episode runs max_steps
_POLICIES: dict[str, VLAPolicy] = {}



def make_policy(name: str) -> VLAPolicy:
    """The tiny policy with a value head whose output layer is randomised (it starts at zero), so values mean something.

    Cached: acting never changes the weights.
    """
    if name not in _POLICIES:
        model, tokenizer = load_model_and_tokenizer(name, seed=0)
        policy = VLAPolicy(model, tokenizer, TOY, value_head=True).eval()
        generator = torch.Generator().manual_seed(123)
        with torch.no_grad():
            last = policy.value_head.net[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=generator))
            last.bias.fill_(0.25)
        _POLICIES[name] = policy
    return _POLICIES[name]


# --- instrumentation -------------------------------------------------------------------------------------------------


class SpyPool:
    """Wraps a pool (the collector uses num_workers, reset and step only) and records every call and reply.

    before_reset(spy, requests) / after_step(spy, call_number, replies) hooks let a test inject faults at exact points.
    """

    def __init__(self, pool, before_reset=None, after_step=None):
        self.pool = pool
        self.num_workers = pool.num_workers
        self.before_reset, self.after_step = before_reset, after_step
        self.reset_calls: list[dict] = []  # {worker: ResetRequest}
        self.step_calls: list[dict] = []  # {worker: chunk (np.ndarray)}
        self.reset_ok: dict[int, bool] = {}  # seed -> did the reset succeed
        self.worker_of_seed: dict[int, int] = {}

    def reset(self, requests, timeout_s=None):
        if self.before_reset is not None:
            self.before_reset(self, requests)
        self.reset_calls.append(dict(requests))
        replies = self.pool.reset(requests, timeout_s)
        for worker, request in requests.items():
            self.worker_of_seed[request.seed] = worker
            self.reset_ok[request.seed] = replies[worker].ok
        return replies

    def step(self, actions, timeout_s=None):
        self.step_calls.append({w: np.asarray(a).copy() for w, a in actions.items()})
        replies = self.pool.step(actions, timeout_s)
        if self.after_step is not None:
            self.after_step(self, len(self.step_calls), replies)
        return replies


@dataclass
class PolicySpy:
    """Counts policy.act calls (with their batch sizes) and the forwards of the VLA they make."""

    act_batches: list[int] = field(default_factory=list)
    forward_batches: list[list[int]] = field(default_factory=list)  # per act call: batch size of each forward


@pytest.fixture
def spy_policy():
    """spy_policy(name) -> (policy, PolicySpy); the instrumentation is removed after the test."""
    undo = []

    def make(name: str, on_act=None):
        policy = make_policy(name)
        spy = PolicySpy()
        original_act = type(policy).act.__get__(policy)  # the method itself, not an earlier test's wrapper

        def act(inputs, *args, **kwargs):
            spy.act_batches.append(len(inputs))
            spy.forward_batches.append([])
            if on_act is not None:
                on_act(len(spy.act_batches))
            return original_act(inputs, *args, **kwargs)

        hook = policy.vla.register_forward_hook(
            lambda module, args, out: spy.forward_batches[-1].append(out.action_logits.shape[0]))
        policy.act = act  # an instance attribute shadows the method
        undo.append((policy, hook))
        return policy, spy

    yield make
    for policy, hook in undo:
        hook.remove()
        policy.__dict__.pop("act", None)


# --- checks shared by the tests ---------------------------------------------------------------------------------------


def assert_inputs_show(inputs: PolicyInputs, observation, policy: VLAPolicy) -> None:
    """The stored policy inputs (batch of 1) are exactly the model inputs of this observation."""
    assert len(inputs) == 1
    np.testing.assert_array_equal(inputs.images[0, 0].numpy(), observation.primary_image)
    if policy.config.num_images == 2:
        np.testing.assert_array_equal(inputs.images[0, 1].numpy(), observation.wrist_image)
    prompt = inputs.text_ids[0][inputs.text_mask[0].bool()].tolist()
    assert prompt == policy.prompt_ids(observation.instruction)
    assert (inputs.text_mask[0].cumsum(0) > 0).int().tolist() == inputs.text_mask[0].tolist()  # left padding only
    if policy.config.is_oft:
        np.testing.assert_array_equal(inputs.proprio[0].numpy(), normalize_proprio(observation.proprio,
                                                                                   policy.proprio_stats))


def env_actions_of(policy: VLAPolicy, token_ids: torch.Tensor) -> np.ndarray:
    normalized = policy.action_tokenizer.decode(token_ids[None]).reshape(1, policy.chunk_size, -1)
    return policy.to_env_actions(normalized)[0]


def replay(episode: Episode, policy: VLAPolicy, env_kwargs: dict) -> None:
    """Re-run the episode's actions in a fresh env; everything stored must agree (module docstring)."""
    env = ToyReachEnv(**env_kwargs)
    observation = env.reset(episode.item.task_id, episode.item.init_state_id, episode.seed)
    executed, result = 0, None
    for step, token_ids in enumerate(episode.token_ids):
        assert_inputs_show(episode.inputs[step], observation, policy)
        if episode.frames:
            np.testing.assert_array_equal(episode.frames[step], observation.primary_image)
        chunk = env_actions_of(policy, token_ids)
        assert chunk.shape == (policy.chunk_size, 7)
        result = env.step(chunk)
        executed += result.steps_executed
        assert episode.rewards[step] == result.reward
        assert result.done == (step == episode.num_policy_steps - 1 and episode.env_error is None)
        observation = result.observation
    if episode.env_error is None:
        assert result is not None and result.success == episode.success
        if episode.frames:
            np.testing.assert_array_equal(episode.frames[-1], observation.primary_image)
    assert executed == episode.length


def assert_complete(episode: Episode, policy: VLAPolicy, max_steps: int) -> None:
    """A finished episode's record: aligned per-step lists, rewards 1 on the success step only, length and chunking."""
    n = episode.num_policy_steps
    assert episode.env_error is None
    assert n >= 1
    assert len(episode.inputs) == len(episode.log_probs) == len(episode.values) == len(episode.rewards) == n
    assert len(episode.greedy) == n
    tokens = TOKENS_PER_STEP["tiny-oft" if policy.config.is_oft else "tiny"]
    for token_ids, log_probs in zip(episode.token_ids, episode.log_probs):
        assert token_ids.shape == (tokens,) and token_ids.dtype == torch.long
        first = policy.action_tokenizer.first_action_id
        assert ((token_ids >= first) & (token_ids < first + 256)).all()  # action tokens only
        assert log_probs.shape == (tokens,) and torch.isfinite(log_probs).all() and (log_probs <= 0).all()
    assert all(isinstance(v, float) and math.isfinite(v) for v in episode.values)
    if episode.success:
        assert episode.rewards == [0.0] * (n - 1) + [1.0] and episode.reward == 1.0
        assert episode.length <= max_steps
    else:
        assert episode.rewards == [0.0] * n and episode.reward == 0.0
        assert episode.length == max_steps
    assert n == math.ceil(episode.length / policy.chunk_size)  # open-loop chunks: one policy step per chunk
    # tokens are trained on only for executed actions: all of every chunk but maybe the last, which the end cuts
    masks = torch.stack(episode.token_masks)
    assert masks.shape == (n, tokens) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks[:-1] == 1).all()
    executed_last = episode.length - (n - 1) * policy.chunk_size
    assert masks[-1].tolist() == [1.0] * (7 * executed_last) + [0.0] * (tokens - 7 * executed_last)


def assert_batching(spy: SpyPool, pspy: PolicySpy, stats, policy: VLAPolicy) -> None:
    """One batched act per policy step, covering exactly the live envs; the forwards it makes have that batch too."""
    assert len(pspy.act_batches) == len(spy.step_calls) == stats.policy_calls
    for batch, forwards, step_call in zip(pspy.act_batches, pspy.forward_batches, spy.step_calls):
        assert batch == len(step_call)
        assert forwards == [batch] * FORWARDS_PER_STEP["tiny-oft" if policy.config.is_oft else "tiny"]
        assert all(chunk.shape == (policy.chunk_size, 7) for chunk in step_call.values())


def assert_calls_match_lengths(episodes: list[Episode], spy: SpyPool, stats) -> None:
    """policy calls == max over workers of S_w, and worker w is in exactly the calls 1..S_w (module docstring)."""
    per_worker = {w: 0 for w in range(spy.num_workers)}
    for episode in episodes:
        if episode.seed not in spy.worker_of_seed:  # never started (stopped before its turn)
            continue
        failed_in_step = episode.env_error is not None and spy.reset_ok[episode.seed]
        per_worker[spy.worker_of_seed[episode.seed]] += episode.num_policy_steps + int(failed_in_step)
    assert stats.policy_calls == max(per_worker.values())
    for worker, total in per_worker.items():
        calls_with_worker = [number for number, call in enumerate(spy.step_calls, 1) if worker in call]
        assert calls_with_worker == list(range(1, total + 1))


def live_children() -> list[psutil.Process]:
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.NoSuchProcess:
            pass
    return alive


def assert_no_strays(pool: EnvPool, timeout_s: float = 10.0) -> None:
    """After close: no worker ever started by the pool (replacements included), nor anything under them, still runs."""
    started = set(pool.started_pids)
    deadline = time.monotonic() + timeout_s
    while True:
        strays = [p for p in live_children() if p.pid in started or "spawn_main" in " ".join(_cmdline(p))]
        still_there = [pid for pid in started if psutil.pid_exists(pid) and _not_zombie(pid)]
        if not strays and not still_there:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"stray processes after close: {strays} {still_there}")
        time.sleep(0.1)


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def make_pool(kind: str, num_workers: int, env_kwargs: dict, **pool_kwargs):
    if kind == "inline":
        return InlinePool("toy", num_workers, env_kwargs)
    return EnvPool("toy", num_workers, env_kwargs, step_timeout_s=pool_kwargs.pop("step_timeout_s", 30),
                   reset_timeout_s=30, start_timeout_s=120, **pool_kwargs)


# === 1. the main rollout: one per (pool, policy), checked from several sides ==========================================

MAIN_ENV = {"success_radius": 0.35, "max_steps": 12}
MAIN_GROUPS = [(0, 1), (1, 2), (2, 3), (0, 4)]
MAIN_TEMPERATURE = 1.3
_MAIN_RUNS: dict = {}


@dataclass
class Run:
    policy: VLAPolicy
    items: list[WorkItem]
    episodes: list[Episode]
    stats: object
    spy: SpyPool
    pspy: PolicySpy
    progress: list[int]


class Progress:
    def __init__(self):
        self.updates: list[int] = []

    def update(self, n):
        self.updates.append(n)


def main_run(kind: str, name: str, spy_policy) -> Run:
    """8 episodes (4 groups x 2 samples) on 3 workers; cached per (pool kind, policy)."""
    if (kind, name) not in _MAIN_RUNS:
        policy, pspy = spy_policy(name)
        items = build_work_items(MAIN_GROUPS, samples_per_group=2)
        progress = Progress()
        pool = make_pool(kind, 3, MAIN_ENV)
        try:
            spy = SpyPool(pool)
            episodes, stats = collect_episodes(policy, spy, items, temperature=MAIN_TEMPERATURE, run_seed=11,
                                               progress=progress)
        finally:
            pool.close()
        if kind == "envpool":
            assert_no_strays(pool)
        _MAIN_RUNS[kind, name] = Run(policy, items, episodes, stats, spy, pspy, progress.updates)
    return _MAIN_RUNS[kind, name]


@pytest.mark.parametrize("kind", ["inline", "envpool"])
@pytest.mark.parametrize("name", ["tiny", "tiny-oft"])
def test_trajectories_are_complete_and_replay_exactly(kind, name, spy_policy):
    run = main_run(kind, name, spy_policy)
    assert [e.item for e in run.episodes] == run.items  # item order, whatever order they finished in
    assert [e.group_id for e in run.episodes] == [0, 0, 1, 1, 2, 2, 3, 3]
    for episode in run.episodes:
        assert_complete(episode, run.policy, MAIN_ENV["max_steps"])
        replay(episode, run.policy, MAIN_ENV)
        assert episode.greedy == [False] * episode.num_policy_steps  # greedy_probability 0: all sampled
        assert episode.frames == []  # no video asked for
    # the config gives both outcomes, so both reward paths above were exercised
    assert 0 < sum(e.success for e in run.episodes) < len(run.episodes)
    assert success_rate(run.episodes) == pytest.approx(np.mean([e.success for e in run.episodes]))
    # each item was reset exactly once, with its own task, init state and seed
    requests = [(r.task_id, r.init_state_id, r.seed) for call in run.spy.reset_calls for r in call.values()]
    assert sorted(requests) == sorted((e.item.task_id, e.item.init_state_id, e.seed) for e in run.episodes)
    assert run.stats.env_steps == sum(e.length for e in run.episodes)
    assert run.progress == [1] * len(run.items)


@pytest.mark.parametrize("kind", ["inline", "envpool"])
@pytest.mark.parametrize("name", ["tiny", "tiny-oft"])
def test_one_batched_policy_call_per_step_for_all_live_envs(kind, name, spy_policy):
    run = main_run(kind, name, spy_policy)
    assert_batching(run.spy, run.pspy, run.stats, run.policy)
    assert run.pspy.act_batches[0] == 3  # all workers start together
    assert max(run.pspy.act_batches) == 3 and min(run.pspy.act_batches) >= 1
    assert_calls_match_lengths(run.episodes, run.spy, run.stats)
    # the calls are far fewer than one per env and step
    assert run.stats.policy_calls < sum(e.num_policy_steps for e in run.episodes)


def test_oft_chunks_run_open_loop(spy_policy):
    run = main_run("inline", "tiny-oft", spy_policy)
    lengths = [e.length for e in run.episodes]
    # a failed episode: 8 + 4 actions in 2 policy steps; the last chunk is cut by the step limit
    assert all(e.num_policy_steps == 2 for e in run.episodes if not e.success)
    assert any(length % 8 != 0 for length in lengths)
    assert all(chunk.shape == (8, 7) for call in run.spy.step_calls for chunk in call.values())
    assert run.stats.env_steps == sum(lengths) > run.stats.policy_calls


def test_envpool_and_inline_pool_give_the_same_episodes(spy_policy):
    for name in ("tiny", "tiny-oft"):
        inline, envpool = main_run("inline", name, spy_policy), main_run("envpool", name, spy_policy)
        for a, b in zip(inline.episodes, envpool.episodes):
            assert (a.seed, a.success, a.length, a.rewards) == (b.seed, b.success, b.length, b.rewards)
            assert all(torch.equal(x, y) for x, y in zip(a.token_ids, b.token_ids))


@pytest.mark.parametrize("name", ["tiny", "tiny-oft"])
def test_stored_log_probs_and_values_equal_evaluate(name, spy_policy):
    run = main_run("inline", name, spy_policy)
    policy = run.policy
    steps = [(e, t) for e in run.episodes for t in range(e.num_policy_steps)]
    inputs = PolicyInputs.collate([e.inputs[t] for e, t in steps], pad_id=policy.config.pad_token_id)
    token_ids = torch.stack([e.token_ids[t] for e, t in steps])
    stored = torch.stack([e.log_probs[t] for e, t in steps])
    with torch.no_grad():
        evaluated = policy.evaluate(inputs, token_ids, temperature=MAIN_TEMPERATURE)
        at_other_temperature = policy.evaluate(inputs, token_ids, temperature=1.0)
    # (the toy instructions all tokenize to the same length; prompts padded to different widths are covered by the
    # LIBERO rollout test, whose instructions differ in length)
    torch.testing.assert_close(evaluated.log_probs, stored, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(at_other_temperature.log_probs, stored, atol=1e-3)
    values = torch.tensor([e.values[t] for e, t in steps])
    torch.testing.assert_close(evaluated.values, values, atol=1e-5, rtol=1e-5)
    assert values.std() > 1e-3  # the randomised value head gives different values for different observations


class LongerBlueInstruction(SpyPool):
    """The toy task's instructions all tokenize to the same length; this makes task 2's longer, so that the rollout's
    batches mix prompt lengths and the stored inputs carry left padding."""

    LONG = "move to the blue target and stay there, please"

    def _rewrite(self, observation):
        if observation.instruction == "move to the blue target":
            observation.instruction = self.LONG

    def reset(self, requests, timeout_s=None):
        replies = super().reset(requests, timeout_s)
        for reply in replies.values():
            self._rewrite(reply.observation)
        return replies

    def step(self, actions, timeout_s=None):
        replies = super().step(actions, timeout_s)
        for reply in replies.values():
            self._rewrite(reply.result.observation)
        return replies


@pytest.mark.parametrize("name", ["tiny", "tiny-oft"])
def test_stored_log_probs_do_not_depend_on_prompt_padding(name):
    policy = make_policy(name)
    items = build_work_items([(0, 1), (2, 2)], samples_per_group=1)
    env_kwargs = {**NEVER_SUCCEEDS, "max_steps": 2 * policy.chunk_size}
    episodes, _ = collect_episodes(policy, LongerBlueInstruction(InlinePool("toy", 2, env_kwargs)), items,
                                   temperature=1.5, run_seed=8)
    short, long = episodes[0].inputs[0], episodes[1].inputs[0]
    assert short.text_ids.shape == long.text_ids.shape  # padded to the batch's width at rollout time
    assert short.text_mask.sum() < long.text_mask.sum() == long.text_mask.numel()  # the red prompt is left-padded
    assert long.text_mask.sum() == len(policy.prompt_ids(LongerBlueInstruction.LONG))
    steps = [(e, t) for e in episodes for t in range(e.num_policy_steps)]
    with torch.no_grad():
        for episode, t in steps:  # alone, without padding
            unpadded = policy.prepare([_observation_of(episode.inputs[t], policy)])
            alone = policy.evaluate(unpadded, episode.token_ids[t][None], temperature=1.5)
            torch.testing.assert_close(alone.log_probs[0], episode.log_probs[t], atol=1e-5, rtol=1e-5)
        inputs = PolicyInputs.collate([e.inputs[t] for e, t in steps], pad_id=policy.config.pad_token_id)
        together = policy.evaluate(inputs, torch.stack([e.token_ids[t] for e, t in steps]), temperature=1.5)
    torch.testing.assert_close(together.log_probs, torch.stack([e.log_probs[t] for e, t in steps]), atol=1e-5,
                               rtol=1e-5)


def _observation_of(inputs: PolicyInputs, policy: VLAPolicy):
    """An Observation whose prepared inputs are `inputs` without the padding (toy frames are used as they are)."""
    from trainer.envs.base import Observation

    prompt = inputs.text_ids[0][inputs.text_mask[0].bool()].tolist()
    instruction = next(text for text in ("move to the red target", LongerBlueInstruction.LONG)
                       if policy.prompt_ids(text) == prompt)
    images = inputs.images[0].numpy()
    proprio = np.zeros(8, dtype=np.float32)
    if inputs.proprio is not None:  # toy proprio stats are the identity on [-1, 1]
        proprio = inputs.proprio[0].numpy()
    return Observation(images[0], images[-1], proprio, instruction)


# === 2. greedy / epsilon-greedy, seeds, early stop, videos ============================================================


@pytest.mark.parametrize("name", ["tiny", "tiny-oft"])
@pytest.mark.parametrize("greedy_probability", [1.0, 0.5, 0.0])
def test_greedy_probability(name, greedy_probability):
    policy = make_policy(name)
    items = build_work_items([(0, 5), (2, 6)], samples_per_group=2)
    env_kwargs = {**NEVER_SUCCEEDS, "max_steps": 3 * policy.chunk_size}
    episodes, _ = collect_episodes(policy, InlinePool("toy", 4, env_kwargs), items, temperature=2.0,
                                   greedy_probability=greedy_probability, run_seed=2)
    flags, is_argmax = [], []
    for episode in episodes:
        assert_complete(episode, policy, env_kwargs["max_steps"])
        replay(episode, policy, env_kwargs)
        for inputs, token_ids, log_probs, greedy in zip(episode.inputs, episode.token_ids, episode.log_probs,
                                                        episode.greedy):
            with torch.no_grad():
                logits = policy.evaluate(inputs, token_ids[None], temperature=2.0).logits[0]
            local = policy.action_tokenizer.token_ids_to_local(token_ids)
            argmax = bool(torch.equal(logits.argmax(-1), local))
            flags.append(greedy)
            is_argmax.append(argmax)
            if greedy:
                assert argmax
                # the stored log-prob of a greedy step is still the log-prob under the sampling temperature
                expected = torch.log_softmax(logits / 2.0, -1).max(-1).values
                torch.testing.assert_close(log_probs, expected, atol=1e-5, rtol=1e-5)
    steps = len(flags)
    if greedy_probability == 1.0:
        assert all(flags)
    elif greedy_probability == 0.0:
        assert not any(flags)
        assert not any(is_argmax)  # near-uniform random policy: a sampled step matching argmax on all tokens is ~0
    else:
        assert 0.2 * steps < sum(flags) < 0.8 * steps
        assert is_argmax == flags  # exactly the greedy steps are argmax
    if greedy_probability == 1.0:
        # greedy is deterministic given the observations: the same episodes again give the same tokens
        again, _ = collect_episodes(policy, InlinePool("toy", 4, env_kwargs), items, temperature=2.0,
                                    greedy_probability=1.0, run_seed=2, generator=torch.Generator().manual_seed(99))
        for a, b in zip(episodes, again):
            assert all(torch.equal(x, y) for x, y in zip(a.token_ids, b.token_ids))


def test_seeds_differ_per_episode_and_are_reproducible():
    policy = make_policy("tiny-oft")
    items = build_work_items([(1, 7), (2, 8), (0, 9)], samples_per_group=2)
    env_kwargs = {"success_radius": 0.35, "max_steps": 8}  # one policy step (chunk) per episode: cheap runs

    def run(**kwargs):
        spy = SpyPool(InlinePool("toy", 2, env_kwargs))
        options = {"run_seed": 3, **kwargs}
        episodes, _ = collect_episodes(policy, spy, items, **options)
        for index, episode in enumerate(episodes):  # the documented derivation
            worker = spy.worker_of_seed[episode.seed]
            expected = derive_seed(options["run_seed"], options.get("rank", 0), worker,
                                   options.get("episode_offset", 0) + index)
            assert episode.seed == expected
        return episodes

    first, second = run(), run()
    seeds = [e.seed for e in first]
    assert len(set(seeds)) == len(items)
    assert seeds == [e.seed for e in second]
    for a, b in zip(first, second):
        assert (a.success, a.length, a.rewards) == (b.success, b.length, b.rewards)
        assert all(torch.equal(x, y) for x, y in zip(a.token_ids, b.token_ids))
        assert all(torch.equal(x, y) for x, y in zip(a.log_probs, b.log_probs))
    # the seed reaches the env: the two samples of a group start at slightly different (jittered) places
    for a, b in zip(first[0::2], first[1::2]):
        assert a.item.init_state_id == b.item.init_state_id
        assert not torch.equal(a.inputs[0].proprio, b.inputs[0].proprio)
    for other in (run(run_seed=4), run(episode_offset=len(items)), run(rank=1)):
        assert not set(seeds) & {e.seed for e in other}


def test_should_stop_ends_the_rollout_and_flags_unfinished_episodes(spy_policy):
    policy, pspy = spy_policy("tiny-oft")
    env_kwargs = {**NEVER_SUCCEEDS, "max_steps": 24}  # every episode: 3 policy steps
    items = build_work_items([(0, 1), (1, 2), (2, 3), (0, 4), (1, 5)], samples_per_group=1)
    spy = SpyPool(InlinePool("toy", 2, env_kwargs))
    progress = Progress()
    episodes, stats = collect_episodes(policy, spy, items, run_seed=0, progress=progress,
                                       should_stop=lambda: len(pspy.act_batches) >= 4)
    # workers 0/1 ran items 0/1 in calls 1-3, then items 2/3 started and made one step; item 4 never started
    assert stats.policy_calls == 4
    for episode in episodes[:2]:
        assert_complete(episode, policy, 24)
        replay(episode, policy, env_kwargs)
    for episode in episodes[2:4]:
        assert episode.env_error == "stopped"
        assert episode.num_policy_steps == 1 and episode.length == 8 and not episode.success
        replay(episode, policy, env_kwargs)  # what was recorded before the stop is consistent
    assert episodes[4].env_error == "stopped" and episodes[4].num_policy_steps == 0 and episodes[4].length == 0
    assert items[4].init_state_id not in {r.init_state_id for call in spy.reset_calls for r in call.values()}
    assert success_rate(episodes) == 0.0  # from the two finished episodes only
    assert math.isnan(success_rate(episodes[2:]))  # no finished episode: no evidence either way
    assert sum(progress.updates) == 4  # every started episode is reported once, the never-started one is not


def test_video_frames_are_recorded_for_selected_items_and_written_as_mp4(tmp_path):
    import imageio.v2 as imageio

    policy = make_policy("tiny")
    env_kwargs = {**NEVER_SUCCEEDS, "max_steps": 10}
    items = build_work_items([(0, 1), (1, 2)], samples_per_group=2)
    episodes, _ = collect_episodes(policy, InlinePool("toy", 2, env_kwargs), items, run_seed=4,
                                   record_video_items={1, 2})
    assert episodes[0].frames == [] and episodes[3].frames == []
    for episode in (episodes[1], episodes[2]):
        assert len(episode.frames) == 1 + episode.num_policy_steps == 11  # the reset frame, then one per step
        assert all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for f in episode.frames)
        replay(episode, policy, env_kwargs)  # frame t is the observation policy step t saw; the last the final state
    frames = episodes[1].frames
    assert any(not np.array_equal(frames[0], f) for f in frames[1:])  # the agent moved

    for rotate in (False, True):
        path = tmp_path / f"episode_{int(rotate)}.mp4"
        write_video(frames, path, fps=10, rotate_180=rotate)
        with imageio.get_reader(str(path)) as reader:
            assert reader.get_meta_data()["fps"] == pytest.approx(10)
            decoded = [np.asarray(frame) for frame in reader]
        assert len(decoded) == len(frames)
        for original, frame in zip(frames, decoded):
            assert frame.shape == (32, 32, 3)
            expected = original[::-1, ::-1] if rotate else original
            error = np.abs(frame.astype(int) - expected.astype(int)).mean()
            assert error < 12  # lossy, but the same picture
            if rotate:
                assert error < np.abs(frame.astype(int) - original.astype(int)).mean()



def test_an_oft_video_has_a_frame_for_every_action_not_one_per_chunk():
    """OpenVLA-OFT runs 8 actions per policy step; the recorded episode must still show each of them (the env renders
    every action for it), while the other episodes keep one observation per chunk."""
    policy = make_policy("tiny-oft")
    env_kwargs = {**NEVER_SUCCEEDS, "max_steps": 20}  # 20 actions: chunks of 8, 8 and a cut-short 4
    items = build_work_items([(0, 1)], samples_per_group=2)
    episodes, _ = collect_episodes(policy, InlinePool("toy", 2, env_kwargs), items, run_seed=4,
                                   record_video_items={0})
    recorded, other = episodes
    assert recorded.num_policy_steps == 3 and recorded.length == 20
    assert len(recorded.frames) == 1 + 20 and other.frames == []
    # Replay action by action: frame k is the state after k actions.
    env = ToyReachEnv(**env_kwargs)
    observation = env.reset(recorded.item.task_id, recorded.item.init_state_id, recorded.seed)
    np.testing.assert_array_equal(recorded.frames[0], observation.primary_image)
    actions = np.concatenate([env_actions_of(policy, ids) for ids in recorded.token_ids])[:20]
    for k, action in enumerate(actions, start=1):
        observation = env.step(action[None]).observation
        np.testing.assert_array_equal(recorded.frames[k], observation.primary_image)
    assert len({f.tobytes() for f in recorded.frames}) > 3  # more pictures than the 3 chunk ends'


# === 3. env faults through the collector (EnvPool) ====================================================================

FAULT_ENV = {**NEVER_SUCCEEDS, "max_steps": 4}  # every episode: exactly 4 policy steps with `tiny`
# nine items with distinct init states, so a fault bound to one init state hits one episode only
FAULT_ITEMS = [WorkItem(task_id=i % 3, init_state_id=20 + i, sample_index=0, group_id=i) for i in range(9)]


def _wait_dead(pid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _not_zombie(pid) and psutil.pid_exists(pid):
        assert time.monotonic() < deadline, f"process {pid} survived SIGKILL"
        time.sleep(0.01)


def _kill_from_thread(pid: int) -> None:
    """SIGKILL `pid` from another thread (as an outside event would) and return once it is dead."""
    thread = threading.Thread(target=os.kill, args=(pid, signal.SIGKILL))
    thread.start()
    thread.join()
    _wait_dead(pid)


def _check_fault_run(episodes, spy, pspy, stats, pool, policy, env_kwargs, victim_index, victim_steps, error_patterns,
                     pids_before):
    victim = episodes[victim_index]
    assert victim.env_error is not None and any(p in victim.env_error for p in error_patterns), victim.env_error
    assert victim.num_policy_steps == victim_steps and not victim.success
    if victim_steps:
        replay(victim, policy, env_kwargs)  # what it recorded before the fault is still consistent
    for index, episode in enumerate(episodes):
        if index != victim_index:
            assert_complete(episode, policy, env_kwargs["max_steps"])
            replay(episode, policy, env_kwargs)
    assert_batching(spy, pspy, stats, policy)  # still one batched call per step, around the failure too
    assert_calls_match_lengths(episodes, spy, stats)
    # the pool recovered: worker 1 was replaced once, and the replacement served a later item to the end
    assert pool.stats.workers[1].restarts == 1 and pool.stats.workers[0].restarts == 0
    assert pool.worker_pids[1] != pids_before[1] and pool.worker_pids[0] == pids_before[0]
    later = [e for e in episodes if spy.worker_of_seed.get(e.seed) == 1 and e.env_error is None
             and FAULT_ITEMS.index(e.item) > victim_index]
    assert later, "the replacement worker served no later item"
    # the failed episode is no evidence: success_rate counts the others only (none succeeds in this env, so one is
    # marked successful here to see the denominator)
    assert success_rate(episodes) == 0.0
    next(e for e in episodes if e is not victim).success = True
    assert success_rate(episodes) == pytest.approx(1 / (len(episodes) - 1))


@pytest.mark.parametrize("fault", ["crash", "hang", "sigkill_mid_step", "sigkill_before_reset"])
def test_env_fault_loses_only_its_episode(fault, spy_policy):
    policy, pspy = spy_policy("tiny")
    per_worker = {}
    step_timeout_s = 30
    if fault == "crash":  # os._exit inside env.step of item 1's episode, when 2 actions have run
        per_worker = {1: {"crash_at_step": 2, "fault_init_state_id": FAULT_ITEMS[1].init_state_id}}
    elif fault == "hang":  # sleeps forever inside env.step: the pool's step deadline kills it
        per_worker = {1: {"hang_at_step": 2, "fault_init_state_id": FAULT_ITEMS[1].init_state_id}}
        step_timeout_s = 4
    killed = []

    def after_step(spy, call_number, replies):
        if fault == "sigkill_mid_step" and call_number == 2:  # item 1 on worker 1 has made 2 steps and goes on
            assert replies[1].ok and not replies[1].result.done
            killed.append(spy.pool.worker_pids[1])
            _kill_from_thread(killed[-1])

    def before_reset(spy, requests):
        if fault == "sigkill_before_reset" and len(spy.reset_calls) == 1:  # the second round of resets
            assert 1 in requests
            killed.append(spy.pool.worker_pids[1])
            _kill_from_thread(killed[-1])

    pool = EnvPool("toy", 3, FAULT_ENV, per_worker_env_kwargs=per_worker, step_timeout_s=step_timeout_s,
                   reset_timeout_s=30, start_timeout_s=120)
    try:
        pids_before = list(pool.worker_pids)
        spy = SpyPool(pool, before_reset=before_reset, after_step=after_step)
        started = time.monotonic()
        episodes, stats = collect_episodes(policy, spy, FAULT_ITEMS, run_seed=5)
        elapsed = time.monotonic() - started
        if fault == "crash":
            _check_fault_run(episodes, spy, pspy, stats, pool, policy, FAULT_ENV, 1, 2, ["exit code 17"], pids_before)
        elif fault == "hang":
            _check_fault_run(episodes, spy, pspy, stats, pool, policy, FAULT_ENV, 1, 2, ["(hung)"], pids_before)
            assert elapsed > step_timeout_s  # the hung step was waited for, once
        elif fault == "sigkill_mid_step":
            _check_fault_run(episodes, spy, pspy, stats, pool, policy, FAULT_ENV, 1, 2, ["killed by SIGKILL"],
                             pids_before)
        else:
            # the first round (items 0-2) ended together; worker 1 died before item 4's reset, so item 4 fails with
            # no step, and the replacement takes item 6 at once
            _check_fault_run(episodes, spy, pspy, stats, pool, policy, FAULT_ENV, 4, 0,
                             ["died before reset", "died during reset"], pids_before)
            assert spy.worker_of_seed[episodes[4].seed] == 1 and spy.reset_ok[episodes[4].seed] is False
            assert spy.worker_of_seed[episodes[6].seed] == 1 and episodes[6].env_error is None
        if killed:
            assert not _not_zombie(killed[0])
    finally:
        pool.close()
    assert_no_strays(pool)
    assert len(pool.started_pids) == 4  # three workers and one replacement, all gone now


def test_workers_keep_their_task_so_that_simulators_are_not_rebuilt(spy_policy):
    """next_item with keep_tasks (on where the pool's envs rebuild a simulator per task: LIBERO): the tasks are spread
    over the workers at the start, and each worker then takes the items of the task its env already has a simulator
    for (a LIBERO reset to another task rebuilds it: seconds). 3 groups of 8 on 12 workers (the OFT benchmark's
    iteration has 4 groups of 8 on 16): the earliest item first would give 8 of the workers a second task; here each
    worker keeps one."""
    policy, _ = spy_policy("tiny-oft")
    items = build_work_items([(0, 1), (1, 2), (2, 3)], samples_per_group=8)
    spy = SpyPool(InlinePool("toy", 12, {**NEVER_SUCCEEDS, "max_steps": 16}))
    rollout = Rollout(policy, spy, items, run_seed=0, keep_tasks=True)
    episodes, _ = rollout.collect()
    assert all(e.env_error is None and e.length == 16 for e in episodes)
    tasks_of_worker: dict[int, list[int]] = {}
    for call in spy.reset_calls:
        for worker, request in sorted(call.items()):
            tasks_of_worker.setdefault(worker, []).append(request.task_id)
    assert sorted(tasks_of_worker) == list(range(12)) and all(len(t) == 2 for t in tasks_of_worker.values())
    assert all(len(set(tasks)) == 1 for tasks in tasks_of_worker.values())  # no rebuild after the first reset
    assert Counter(tasks[0] for tasks in tasks_of_worker.values()) == {0: 4, 1: 4, 2: 4}  # spread evenly
    # the first wave takes one item of each task in turn; each task's items start in their order
    assert [spy.reset_calls[0][w].task_id for w in range(6)] == [0, 1, 2, 0, 1, 2]
    by_seed = {e.seed: i for i, e in enumerate(episodes)}
    started = [by_seed[r.seed] for call in spy.reset_calls for _, r in sorted(call.items())]
    assert sorted(started) == list(range(24))
    for task in range(3):
        mine = [i for i in started if items[i].task_id == task]
        assert mine == sorted(mine)
    # which rule applies comes from the pool's envs: LIBERO's rebuild a simulator per task, the toy task's do not
    from trainer.envs.libero import LiberoEnv
    from trainer.envs.toy import ToyReachEnv

    assert LiberoEnv.simulator_per_task and not getattr(ToyReachEnv, "simulator_per_task", False)
    assert not Rollout(policy, InlinePool("toy", 2), items).keep_tasks
    assert not Rollout(policy, spy, items).keep_tasks  # a wrapper without the pool's info: the earliest item first
