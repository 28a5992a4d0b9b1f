"""The training loop end to end on the tiny model and the toy task: outputs and logging, the gradient guard, phases.

Runs are in-process (a few seconds each with one intra-op thread); test hooks wrap functions of `trainer.algos`, and
`Learner.update` / `trainer.train.objective` to know which iteration (and phase) a loss call belongs to.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import trainer.algos
import trainer.config
import trainer.learner
import trainer.train
from trainer.checkpoint import CHECKPOINTS, latest_checkpoint
from trainer.config import dump
from trainer.logging import read_metrics
from trainer.train import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_toy_cpu.yaml")
# Small and fast, and one optimizer step per iteration whatever the shipped config says (the tests count steps).
FAST = ["--env.groups_per_iteration", "4", "--rollout.num_generations", "4", "--env.num_workers", "16",
        "--algo.ppo_epochs", "1", "--algo.num_mini_batches", "1", "--algo.epsilon", "0.2", "--algo.epsilon_high", "0.28",
        "--train.eval_episodes_per_task", "4", "--algo.micro_batch_size", "64", "--log.progress", "false"]
PER_ITERATION_KEYS = ["iteration", "rollout/success_rate", "eval/greedy_success_rate", "eval/sampled_success_rate",
                      "train/loss", "train/grad_norm", "guard/skipped_steps_total", "phase"]


def _config(output_dir: Path, *extra: str):
    return load_config(["--config", CONFIG, "--train.output_dir", str(output_dir), *FAST, *extra])


def _train(output_dir: Path, *extra: str) -> dict:
    return trainer.train.train(_config(output_dir, *extra))


def _by_iteration(run: Path) -> dict[int, dict]:
    return {r["iteration"]: r for r in read_metrics(run / "metrics.jsonl")}


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


class _IterationTag:
    """Wraps Learner.update and the recipe's objective to record the 0-based iteration (and phase) whose update is
    running."""

    def __init__(self, monkeypatch):
        self.iteration: int | None = None
        self.bc_phase: bool | None = None
        update, objective = trainer.learner.Learner.update, trainer.train.objective
        signature = inspect.signature(update)

        def tagged_update(*args, **kwargs):
            self.iteration = signature.bind(*args, **kwargs).arguments["iteration"]
            try:
                return update(*args, **kwargs)
            finally:
                self.iteration = self.bc_phase = None

        def tagged_objective(*args, **kwargs):
            self.bc_phase = kwargs["bc_phase"]
            return objective(*args, **kwargs)

        monkeypatch.setattr(trainer.learner.Learner, "update", tagged_update)
        monkeypatch.setattr(trainer.train, "objective", tagged_objective)


# --- 4. outputs and logging ------------------------------------------------------------------------------------------


def test_outputs_config_metrics_plots_and_a_failing_wandb_never_stop_the_run(tmp_path, monkeypatch, capsys):
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)  # conftest disables wandb; here: no key -> offline
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    calls = []

    def broken_log(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("simulated wandb outage")

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", broken_log)
    monkeypatch.setattr(wandb, "log", broken_log)

    run = tmp_path / "run"
    config = _config(run, "--train.iterations", "2", "--train.eval_every", "1", "--log.wandb", "true",
                     "--log.plots", "true")
    trainer.train.train(config)
    output = capsys.readouterr().out

    # The resolved config, re-loadable, identical after a round trip.
    reloaded = load_config(["--config", str(run / "config.yaml")])
    assert dump(reloaded) == dump(config)
    assert reloaded.train.iterations == 2 and reloaded.env.groups_per_iteration == 4

    # metrics.jsonl: the pre-training evaluation, then one object per iteration with the documented keys.
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert {"eval/greedy_success_rate", "eval/sampled_success_rate"} <= records[0].keys()
    for record in records[1:]:
        missing = [k for k in PER_ITERATION_KEYS if k not in record]
        assert not missing, f"iteration {record['iteration']} lacks {missing}"
        assert record["phase"] == "rl"
        assert 0.0 <= record["rollout/success_rate"] <= 1.0
        assert 0.0 <= record["eval/greedy_success_rate"] <= 1.0
        assert record["guard/skipped_steps_total"] == 0.0
        # where the iteration's time went: the update and the rollout (policy, env, input stacking) inside it
        assert 0 < record["time/update_seconds"] < record["time/iteration_seconds"]
        assert 0 < record["time/prepare_seconds"] < record["time/rollout_seconds"] < record["time/iteration_seconds"]
        parts = ["policy", "env", "prepare", "draw", "send", "record"]
        assert all(record[f"time/{part}_seconds"] >= 0 for part in parts)
        assert record["time/draw_seconds"] > 0 and record["time/record_seconds"] > 0
        assert 0 < record["time/worker_chunk_seconds"] <= record["time/worker_step_seconds"]
        assert sum(record[f"time/{part}_seconds"] for part in parts) <= record["time/rollout_seconds"]
        if record["train/samples"] > 0:
            assert isinstance(record["train/loss"], float) and record["train/grad_norm"] > 0
        else:  # no update ran (every group all-equal): the keys are there, empty
            assert record["train/loss"] is None and record["train/grad_norm"] is None

    # Plots are valid PNGs.
    for name in ("success.png", "loss.png"):
        assert _is_png(run / "plots" / name), name
    import matplotlib.image

    assert matplotlib.image.imread(run / "plots" / "success.png").ndim == 3

    # wandb ran offline under output_dir/wandb; its failure was reported once and the run carried on.
    assert (run / "wandb").is_dir()
    assert list((run / "wandb").glob("offline-run-*")), list((run / "wandb").iterdir())
    assert calls, "wandb's log was never called: the failure was not exercised"
    assert output.count("wandb logging failed") == 1, output
    assert latest_checkpoint(run).name == "iter-000002"


def test_wandb_that_cannot_start_is_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("simulated: no wandb today")

    monkeypatch.setattr(wandb, "init", broken_init)
    run = tmp_path / "run"
    _train(run, "--train.iterations", "1", "--train.eval_every", "0", "--log.wandb", "true", "--log.plots", "false")
    output = capsys.readouterr().out
    assert "wandb could not start" in output and "simulated: no wandb today" in output
    assert [r["iteration"] for r in read_metrics(run / "metrics.jsonl")] == [1]


# --- 5. the gradient guard -------------------------------------------------------------------------------------------


def _trainable_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    tensors = dict(load_file(str(checkpoint / "adapter_model.safetensors")))
    if (checkpoint / "trainable.safetensors").is_file():
        tensors.update(load_file(str(checkpoint / "trainable.safetensors")))
    return tensors


def _initial_weights(config) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    from trainer.dist import Dist

    policy = trainer.train.build_run_policy(config, Dist.create())
    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(policy.vla).items()}
    tensors.update({n: p.detach().clone() for n, p in policy.named_parameters() if n.startswith("value_head")})
    return tensors


@pytest.mark.parametrize("poison, reason", [(float("nan"), "nonfinite_grad_norm"),
                                            (1e9, "grad_norm_above_threshold")])
def test_guard_skips_a_bad_step_counts_it_and_leaves_the_weights_unchanged(tmp_path, monkeypatch, poison, reason):
    """Iteration 1's loss gets `poison * mean(log-probs)` added (NaN, or a huge finite gradient); iteration 2 is
    normal. PPO (value head + GAE) so that every iteration has samples to update on."""
    tag = _IterationTag(monkeypatch)
    original = trainer.algos.ppo_clip_loss

    def poisoned(log_probs, *args, **kwargs):
        loss, parts = original(log_probs, *args, **kwargs)
        if tag.iteration == 0:
            loss = loss + poison * log_probs.mean()
        return loss, parts

    monkeypatch.setattr(trainer.algos, "ppo_clip_loss", poisoned)
    run = tmp_path / "run"
    extra = ["--algo.name", "ppo", "--train.iterations", "2", "--train.eval_every", "0",
             "--train.checkpoint_every", "1", "--log.plots", "false", "--algo.ppo_epochs", "1"]
    _train(run, *extra)
    lines = _by_iteration(run)
    first, second = lines[1], lines[2]

    assert first["train/samples"] > 0 and first["train/step_skipped"] == 1.0
    assert first[f"guard/{reason}"] == 1.0
    other = {"nonfinite_grad_norm", "grad_norm_above_threshold"} - {reason}
    assert f"guard/{other.pop()}" not in first
    assert first["guard/skipped_steps_total"] == 1.0
    if reason == "grad_norm_above_threshold":
        assert first["train/grad_norm"] > 1000.0 and first["train/grad_norm"] != float("inf")
    else:
        assert first["train/grad_norm"] in ("nan", "inf", "-inf")  # non-finite values are logged as strings

    # Iteration 2 is healthy: stepped, and the total stays.
    assert second["train/step_skipped"] == 0.0 and f"guard/{reason}" not in second
    assert second["guard/skipped_steps_total"] == 1.0
    state = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1 and state["skip_reasons"] == {reason: 1}

    # Weights after the skipped step are the initial ones, bit for bit; after the healthy step they moved.
    initial = _initial_weights(_config(tmp_path / "fresh", *extra))
    after_skip = _trainable_weights(run / CHECKPOINTS / "iter-000001")
    after_step = _trainable_weights(run / CHECKPOINTS / "iter-000002")
    assert initial.keys() == after_skip.keys() and any(k.startswith("value_head") for k in initial)
    for key in initial:
        assert torch.equal(initial[key], after_skip[key]), key
        assert torch.isfinite(after_step[key]).all(), key
    assert any(not torch.equal(initial[k], after_step[k]) for k in initial)


# --- 6. phases -------------------------------------------------------------------------------------------------------


def test_phases_bc_warmup_then_handover_with_decreasing_greedy_probability_then_rl(tmp_path, monkeypatch):
    """BC warm-up clones the greedy tokens of SUCCESSFUL episodes; a random-initialised tiny policy rarely succeeds
    greedily, so a test hook marks the warm-up's (greedy) episodes successful to give it data."""
    tag = _IterationTag(monkeypatch)
    calls: list[tuple[str, int | None, bool | None]] = []
    bc_original, ppo_original = trainer.algos.behaviour_cloning_loss, trainer.algos.ppo_clip_loss
    greedy_probabilities = []

    def bc_spy(logits, target_ids, *args, **kwargs):
        calls.append(("bc", tag.iteration, tag.bc_phase))
        loss, parts = bc_original(logits, target_ids, *args, **kwargs)
        # Cross-entropy of the policy's logits against the rollout's greedy tokens, computed independently.
        manual = torch.nn.functional.cross_entropy(logits.detach().flatten(0, 1).float(), target_ids.flatten())
        torch.testing.assert_close(parts["bc_loss"], manual, rtol=1e-5, atol=1e-6)
        return loss, parts

    def ppo_spy(*args, **kwargs):
        calls.append(("ppo", tag.iteration, tag.bc_phase))
        return ppo_original(*args, **kwargs)

    class RolloutWithTeacherSuccesses(trainer.train.Rollout):  # the training loop's rollouts (not evaluations')
        def collect(self, **kwargs):
            episodes, stats = super().collect(**kwargs)
            greedy_probabilities.append(self.greedy_probability)
            if self.greedy_probability == 1.0:  # the warm-up's greedy rollouts: pretend the teacher succeeded
                for episode in episodes:
                    episode.success = True
            return episodes, stats

    monkeypatch.setattr(trainer.algos, "behaviour_cloning_loss", bc_spy)
    monkeypatch.setattr(trainer.algos, "ppo_clip_loss", ppo_spy)
    monkeypatch.setattr(trainer.train, "Rollout", RolloutWithTeacherSuccesses)
    run = tmp_path / "run"
    _train(run, "--algo.phases.bc_warmup_iterations", "1", "--algo.phases.handover_iterations", "2",
           "--algo.phases.handover_greedy_start", "1.0",  # the schedule from 1 (the default starts at 0.75)
           "--train.iterations", "4",
           "--train.eval_every", "0", "--log.plots", "false", "--train.checkpoint_every", "0",
           "--algo.name", "ppo", "--algo.ppo_epochs", "1")
    lines = _by_iteration(run)
    assert [lines[i]["phase"] for i in (1, 2, 3, 4)] == ["bc_warmup", "handover", "handover", "rl"]
    logged = [lines[i]["phase/greedy_probability"] for i in (1, 2, 3, 4)]
    assert logged == [1.0, 1.0, 0.5, 0.0]  # greedy warm-up, then linear decay 1 -> 1/2, then sampled only
    assert greedy_probabilities == logged  # the rollouts used them

    # Warm-up: the update is the behaviour-cloning cross-entropy (and nothing else); after it, the RL loss.
    warmup = lines[1]
    assert warmup["train/samples"] == warmup["rollout/env_steps"]  # every (successful) step is a BC target
    assert warmup["train/loss"] == pytest.approx(warmup["train/bc_loss"], rel=1e-6)
    # The targets are the policy's own greedy tokens and the (single) step comes after the forward passes.
    assert warmup["train/bc_accuracy"] >= 0.99
    assert "train/approx_kl" not in warmup and "train/value_loss" not in warmup
    assert {c[1] for c in calls if c[0] == "bc"} == {0} and all(c[2] for c in calls if c[0] == "bc")
    assert {c[1] for c in calls if c[0] == "ppo"} == {1, 2, 3} and not any(c[2] for c in calls if c[0] == "ppo")
    for i in (2, 3, 4):
        assert "train/bc_loss" not in lines[i] and "train/approx_kl" in lines[i]


def test_ppo_critic_warmup_trains_only_the_critic_for_its_iterations_then_the_policy_too(tmp_path, monkeypatch):
    """algo.ppo.critic_warmup_iterations = 2: the first two updates are the value loss alone (no policy term is
    computed, the logged loss is value_coef x the value loss); the third is the full PPO objective."""
    tag = _IterationTag(monkeypatch)
    clip_calls: list[int | None] = []
    ppo_original = trainer.algos.ppo_clip_loss

    def ppo_spy(*args, **kwargs):
        clip_calls.append(tag.iteration)
        return ppo_original(*args, **kwargs)

    monkeypatch.setattr(trainer.algos, "ppo_clip_loss", ppo_spy)
    run = tmp_path / "run"
    _train(run, "--algo.name", "ppo", "--algo.ppo.critic_warmup_iterations", "2", "--algo.ppo.value_coef", "0.5",
           "--train.iterations", "3", "--train.eval_every", "0", "--log.plots", "false",
           "--train.checkpoint_every", "0")
    lines = _by_iteration(run)
    assert [lines[i]["phase"] for i in (1, 2, 3)] == ["critic_warmup", "critic_warmup", "rl"]
    assert clip_calls and set(clip_calls) == {2}  # the policy term only from the third update (0-based iteration 2)
    for i in (1, 2):
        assert "train/approx_kl" not in lines[i]
        assert lines[i]["train/loss"] == pytest.approx(0.5 * lines[i]["train/value_loss"], rel=1e-5)
    assert "train/approx_kl" in lines[3] and "train/value_loss" in lines[3]
    with pytest.raises(trainer.config.ConfigError, match="critic_warmup_iterations = -1"):  # refused when read
        _config(tmp_path / "bad", "--algo.ppo.critic_warmup_iterations", "-1")


def test_tokens_of_actions_the_env_never_executed_do_not_reach_the_loss(toy_observations):
    """An OFT chunk cut short by the end of an episode: the tokens of its unexecuted actions get no loss and no
    gradient, and the token mean is over executed tokens only."""
    from trainer.learner import Counts, Samples, collate
    from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer
    from trainer.models.lora import LoraSettings, apply_lora
    from trainer.rollout import executed_token_mask
    from trainer.train import RunConfig, objective

    model, tokenizer = load_model_and_tokenizer("tiny-oft", seed=0)
    policy = VLAPolicy(apply_lora(model, LoraSettings(rank=4)), tokenizer, EnvSettings("none", False, "toy"))
    inputs = policy.prepare(toy_observations[:2])
    acted = policy.act(inputs, generator=torch.Generator().manual_seed(0))
    masks = [executed_token_mask(56, 7, 8), executed_token_mask(56, 7, 3)]  # the second chunk ran 3 of 8 actions
    assert masks[1].tolist() == [1.0] * 21 + [0.0] * 35

    def samples_with(unexecuted_log_prob: float) -> Samples:
        samples = Samples()
        generator = torch.Generator().manual_seed(1)
        for i in range(2):
            old = acted.log_probs[i] + 0.1 * torch.randn(56, generator=generator)
            samples.inputs.append(inputs.select([i]))
            samples.token_ids.append(acted.token_ids[i])
            samples.old_log_probs.append(torch.where(masks[i].bool(), old, torch.tensor(unexecuted_log_prob)))
            samples.token_masks.append(masks[i])
            samples.advantages.append([1.0, -0.5][i])
            samples.returns.append(0.0)
            samples.old_values.append(0.0)
        return samples

    config = RunConfig()
    executed = float(sum(m.sum() for m in masks))
    results = []
    for unexecuted in (-3.0, -50.0):  # only the unexecuted tokens' rollout log-probs differ
        policy.zero_grad()
        batch = collate(samples_with(unexecuted), [0, 1], policy, torch.device("cpu"))
        loss, parts = objective(config.algo, policy, policy, batch, Counts(sequences=2.0, tokens=executed),
                                temperature=config.rollout.temperature, bc_phase=False)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
        results.append((loss.detach(), parts["approx_kl"], grads))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert all(torch.equal(results[0][2][n], results[1][2][n]) for n in results[0][2])
    # the value: the PPO token mean over the 77 executed tokens
    evaluated = policy.evaluate(inputs, acted.token_ids)
    samples = samples_with(-3.0)
    expected, _ = trainer.algos.ppo_clip_loss(
        evaluated.log_probs, torch.stack(samples.old_log_probs), torch.tensor(samples.advantages), torch.stack(masks),
        epsilon=config.algo.epsilon, epsilon_high=config.algo.epsilon_high, log_ratio_clamp=config.algo.log_ratio_clamp,
        advantage_clamp=config.algo.advantage_clamp, num_tokens_global=executed)
    torch.testing.assert_close(results[0][0], expected.detach())


# --- 7. videos of the evaluations --------------------------------------------------------------------------------------


def test_video_episodes_records_that_many_greedy_evaluation_episodes_per_evaluation_without_changing_them(tmp_path):
    """rollout.video_episodes: N mp4 files of the greedy evaluation in output_dir/videos/iter-XXXXXX/ at every
    evaluation (here the baseline and iteration 1), each a whole episode of the toy task's primary camera; the
    evaluation's results are those of the same run without videos."""
    import re

    import imageio.v2 as imageio

    common = ["--train.iterations", "1", "--train.eval_every", "1", "--log.plots", "false",
              "--train.checkpoint_every", "0"]
    _train(tmp_path / "plain", *common)
    _train(tmp_path / "videos", *common, "--rollout.video_episodes", "2")
    assert not (tmp_path / "plain" / "videos").exists()
    for iteration in (0, 1):
        folder = tmp_path / "videos" / "videos" / f"iter-{iteration:06d}"
        files = sorted(folder.glob("*.mp4"))
        assert len(files) == 2, files
        for path in files:
            assert re.fullmatch(r"task\d+_init\d+_(success|failure)\.mp4", path.name), path.name
            frames = imageio.mimread(path)
            assert 2 <= len(frames) <= 9  # the reset frame and one per step (the toy task: at most 8 steps)
            assert frames[0].shape == (32, 32, 3)
    plain, videos = _by_iteration(tmp_path / "plain"), _by_iteration(tmp_path / "videos")
    for iteration in (0, 1):
        for key in ("eval/greedy_success_rate", "eval/sampled_success_rate"):
            assert videos[iteration][key] == plain[iteration][key]


def test_next_rollouts_first_resets_go_out_before_the_update_and_train_the_same(tmp_path, monkeypatch):
    """rollout.reset_ahead with a subprocess pool (the toy task in EnvPool workers instead of in-process): the next
    iteration's first resets are sent before each update but the last (none before an evaluation), and the run's
    numbers are those of a run without."""
    from trainer.envs.pool import EnvPool

    def subprocess_pool(env, dist, num_workers=None, policy=None):
        env_kwargs = {} if env.max_steps is None else {"max_steps": env.max_steps}
        return EnvPool("toy", num_workers or env.num_workers, env_kwargs, start_timeout_s=120)

    events = []
    send, update = trainer.train.Rollout.send_first_resets, trainer.learner.Learner.update

    def sending(self):
        events.append("send")
        send(self)

    def updating(self, *args, **kwargs):
        events.append("update")
        return update(self, *args, **kwargs)

    monkeypatch.setattr(trainer.train, "make_env_pool", subprocess_pool)
    monkeypatch.setattr(trainer.train.Rollout, "send_first_resets", sending)
    monkeypatch.setattr(trainer.learner.Learner, "update", updating)
    common = ["--env.num_workers", "4", "--train.iterations", "4", "--train.eval_every", "3", "--log.plots", "false",
              "--train.checkpoint_every", "0"]
    _train(tmp_path / "ahead", *common)
    # iterations 1 and 2 send the next one's resets before their update; 3 does not (the evaluation after it needs
    # the workers), nor does the last
    assert events == ["send", "update", "send", "update", "update", "update"]
    events.clear()
    _train(tmp_path / "plain", *common, "--rollout.reset_ahead", "false")
    assert events == ["update"] * 4
    ahead, plain = _by_iteration(tmp_path / "ahead"), _by_iteration(tmp_path / "plain")
    assert ahead.keys() == plain.keys() == {0, 1, 2, 3, 4}
    for iteration, record in ahead.items():
        same = {k: v for k, v in record.items() if not k.startswith(("time/", "memory/"))}
        assert same == {k: v for k, v in plain[iteration].items() if not k.startswith(("time/", "memory/"))}
