"""Learning, end to end: the tiny policy on the toy task with the shipped configs, the real trainer, fixed seeds.

What the runs measured (docs/learning.md, scripts/learning_curves.py writes the full curves to docs/learning/):
GRPO (configs/tiny_toy_cpu.yaml) goes from greedy ~0.33 / sampled ~0.1-0.2 to greedy 1.0 / sampled >= 0.95 in 70
iterations, on 1 rank and on 2; at iteration 20 sampled success is ~0.4-0.5. PPO + GAE (configs/tiny_toy_ppo_cpu.yaml,
5 critic-only iterations first) reaches greedy 1.0 / sampled >= 0.98 on 2 ranks. Both at seed 0: other seeds of the
same configs do not all learn (docs/learning.md, "Seeds").

No test here times anything: each asserts success rates at fixed iterations, so a machine twice as slow takes twice as
long and passes the same way. The thresholds sit between what a run that learns reaches and what one that does not
(a policy that stops learning keeps its start: sampled ~0.1-0.25) with room for the seed-to-seed spread measured.
Approximate durations on an idle 2-core machine: the short test ~2 minutes, the others 3-6 minutes each.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRPO = ROOT / "configs" / "tiny_toy_cpu.yaml"
PPO = ROOT / "configs" / "tiny_toy_ppo_cpu.yaml"
SHORT = ("--train.iterations", "20", "--optim.scheduler", "constant")  # the first 20 iterations at the full rate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_on_toy(output_dir: Path, config: Path, *overrides: str, ranks: int = 1) -> list[dict]:
    """Run the trainer (under torchrun with gloo for ranks > 1, as tests/test_distributed.py does) and return the
    records of metrics.jsonl."""
    trainer = ["-m", "trainer", "train", "--config", str(config), "--train.output_dir", str(output_dir),
               "--train.checkpoint_every", "0", "--train.resume", "false", "--log.progress", "false", *overrides]
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
                                      str(_free_port())]
    log = output_dir.with_suffix(".log")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        completed = subprocess.run([sys.executable, *launcher, *trainer], env=dict(os.environ, OMP_NUM_THREADS="1"),
                                   cwd=ROOT, timeout=3000, stdout=handle, stderr=subprocess.STDOUT)
    assert completed.returncode == 0, log.read_text()[-4000:]
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    print(f"{output_dir.name}: (iteration, greedy, sampled) =", evaluations(records))
    return records


def evaluations(records: list[dict]) -> list[tuple[int, float, float]]:
    return [(r["iteration"], r["eval/greedy_success_rate"], r["eval/sampled_success_rate"])
            for r in records if "eval/greedy_success_rate" in r]


def rollout_success(records: list[dict], first: int, last: int) -> float:
    """Mean rollout success of iterations first..last (training episodes, 256 per iteration)."""
    values = [r["rollout/success_rate"] for r in records if first <= r["iteration"] <= last and "rollout/success_rate" in r]
    assert len(values) == last - first + 1
    return sum(values) / len(values)


def assert_reaches_the_bar(records: list[dict]) -> None:
    """Issue #15's bar over the full 70 iterations: from sampled <= 0.3 to greedy >= 0.9 and sampled >= 0.8, with
    healthy updates on the way."""
    (first_it, _, sampled_start), (last_it, greedy_end, sampled_end) = evaluations(records)[0], evaluations(records)[-1]
    assert (first_it, last_it) == (0, 70)
    assert sampled_start <= 0.3
    assert greedy_end >= 0.9 and sampled_end >= 0.8
    assert_healthy_updates(records)


def assert_healthy_updates(records: list[dict]) -> None:
    """PPO-style steps of a sane size: approx_kl in the range PPO recipes run at, never a blow-up, no skipped step."""
    kls = [r["train/approx_kl"] for r in records if isinstance(r.get("train/approx_kl"), (int, float))]
    assert kls and sorted(kls)[len(kls) // 2] < 0.03, kls  # the median update
    assert max(kls) < 0.2, kls
    assert records[-1]["guard/skipped_steps_total"] == 0


@pytest.fixture(scope="module")
def short_grpo(tmp_path_factory) -> list[dict]:
    return train_on_toy(tmp_path_factory.mktemp("learning") / "grpo_short", GRPO, *SHORT)


@pytest.mark.slow
def test_grpo_learns_within_20_iterations(short_grpo):
    """The short one (CI): 20 iterations on one process."""
    evals = evaluations(short_grpo)
    assert [it for it, _, _ in evals] == [0, 10, 20]
    (_, _, sampled_start), (_, _, sampled_end) = evals[0], evals[-1]
    assert sampled_start <= 0.3  # the random tiny policy starts low
    # Relative bars only: at iteration 20 the sampled success of one run depends on its random draws (0.40 with the
    # draws of the recorded curve, 0.26 with today's per-episode sampling streams, 0.23 for seed 1), while every run
    # improves by more than this margin (the 70-iteration demo reaches the bar: the test below).
    assert sampled_end >= sampled_start + 0.15
    assert rollout_success(short_grpo, 16, 20) >= rollout_success(short_grpo, 1, 5) + 0.1
    assert_healthy_updates(short_grpo)


@pytest.mark.slow
def test_grpo_reaches_greedy_09_and_sampled_08(tmp_path):
    """The demo's run (2 ranks, scripts/demo.sh): the issue's bar."""
    records = train_on_toy(tmp_path / "grpo", GRPO, ranks=2)
    assert_reaches_the_bar(records)


@pytest.mark.slow
def test_ppo_with_gae_reaches_greedy_09_and_sampled_08(tmp_path):
    """The shipped PPO config (5 critic-only iterations first) on 2 ranks: the issue's bar."""
    records = train_on_toy(tmp_path / "ppo", PPO, ranks=2)
    assert_reaches_the_bar(records)
    # The critic learned something while the returns still varied: a 5-iteration mean of its explained variance on
    # the rollout batch clearly above 0 (seed 0: up to ~0.5 around iteration 20). Not at the end: once every episode
    # succeeds the returns hardly vary and the figure is ~0.01-0.03 however good the critic is.
    explained = [r["critic/explained_variance"] for r in records if isinstance(r.get("critic/explained_variance"), float)]
    assert max(sum(explained[i:i + 5]) / 5 for i in range(len(explained) - 4)) > 0.2, explained


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_learn_like_one_rank_within_the_noise_of_a_second_seed(short_grpo, tmp_path):
    """The same global batch (32 groups x 8) split over 2 gloo ranks: its curve must differ from the 1-rank curve no
    more than a second seed's 1-rank curve does (plus a margin for this being one draw)."""
    two_ranks = train_on_toy(tmp_path / "grpo_2ranks", GRPO, *SHORT, ranks=2)
    other_seed = train_on_toy(tmp_path / "grpo_seed1", GRPO, *SHORT, "--train.seed", "1")

    def curve(records):  # rollout success per iteration and sampled success per evaluation
        return ([r["rollout/success_rate"] for r in records if "rollout/success_rate" in r],
                [sampled for _, _, sampled in evaluations(records)[1:]])

    def distance(a, b):
        (rollout_a, eval_a), (rollout_b, eval_b) = curve(a), curve(b)
        assert len(rollout_a) == len(rollout_b) == 20 and len(eval_a) == len(eval_b) == 2
        window = lambda xs: [sum(xs[i:i + 5]) / 5 for i in range(0, 20, 5)]  # 5-iteration means
        return max([abs(x - y) for x, y in zip(window(rollout_a), window(rollout_b))]
                   + [abs(x - y) for x, y in zip(eval_a, eval_b)])

    seed_noise = distance(short_grpo, other_seed)
    assert distance(two_ranks, short_grpo) <= max(seed_noise, 0.1) + 0.1, (distance(two_ranks, short_grpo), seed_noise)
    # and the 2-rank run learns on its own account
    # (+0.09 seen in CI, +0.15 locally; the binomial noise of the difference of two 1,280-episode means at p = 0.2 is
    # 0.016 sd, so +0.05 is three of those)
    assert rollout_success(two_ranks, 16, 20) >= rollout_success(two_ranks, 1, 5) + 0.05
