"""The command line: `eval` on the toy task (JSON + per-task table), config errors without tracebacks, `export`, and
both on a run directory of an earlier version.

`python -m trainer ...` runs in a subprocess where the exit code and the absence of a traceback matter; the rest calls
trainer.cli.main in-process (importing torch & co. costs ~10 s per process on a small CPU box).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoint import latest_checkpoint, load_weights
from trainer.cli import main
from trainer.dist import Dist
from trainer.train import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_toy_cpu.yaml")
SUBPROCESS_ENV = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
TOY_INSTRUCTIONS = ["move to the red target", "move to the green target", "move to the blue target"]



def _cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as caught:
        main(list(argv))
    return caught.value.code


def _check_report(report: dict, trials: int) -> None:
    assert set(report["per_task"]) == {"0", "1", "2"}
    total = 0
    for task, entry in report["per_task"].items():
        assert entry["trials"] == trials
        assert 0 <= entry["successes"] <= trials and isinstance(entry["successes"], int)
        assert entry["success_rate"] == pytest.approx(entry["successes"] / trials)
        assert entry["instruction"] == TOY_INSTRUCTIONS[int(task)]
        total += entry["successes"]
    assert report["success_rate"] == pytest.approx(total / (3 * trials))
    assert report["env_errors"] == 0


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and (parts[0].isdigit() or parts[0] == "all"):
            rows[parts[0]] = parts
    return rows


def test_eval_on_the_toy_task_writes_per_task_json_and_prints_a_table(tmp_path):
    out = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, "-m", "trainer", "eval", "--model.source", "tiny", "--env.suite", "toy",
                             "--eval.trials", "4", "--eval.output", str(out)],
                            cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    assert data["model"] == "tiny" and data["suite"] == "toy" and data["trials_per_task"] == 4
    assert list(data["results"]) == ["greedy"]
    report = data["results"]["greedy"]
    assert report["mode"] == "greedy"
    _check_report(report, trials=4)

    rows = _table_rows(result.stdout)
    assert set(rows) == {"0", "1", "2", "all"}, result.stdout
    for task in ("0", "1", "2"):
        assert float(rows[task][1]) == pytest.approx(report["per_task"][task]["success_rate"], abs=1e-3)
        assert rows[task][2] == "4"
        assert " ".join(rows[task][3:]) == TOY_INSTRUCTIONS[int(task)]
    assert rows["all"][2] == "12"
    assert f"results written to {out}" in result.stdout


def test_eval_both_modes_and_a_task_subset(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert _cli("eval", "--model.source", "tiny", "--env.suite", "toy", "--eval.trials", "2", "--env.task_ids", "[0,2]",
                "--eval.mode", "both", "--env.num_workers", "4", "--eval.output", str(out)) == 0
    data = json.loads(out.read_text())
    assert sorted(data["results"]) == ["greedy", "sampled (T=1.0)"]
    for report in data["results"].values():
        assert set(report["per_task"]) == {"0", "2"}
        assert all(entry["trials"] == 2 for entry in report["per_task"].values())
    printed = capsys.readouterr().out
    assert printed.count("(greedy;") == 1 and printed.count("(sampled (T=1.0);") == 1


def test_eval_of_a_training_run_uses_its_config_and_latest_checkpoint(tmp_path, capsys):
    from trainer.train import train

    run = tmp_path / "run"
    enabled = torch.are_deterministic_algorithms_enabled()
    train(load_config(["--config", CONFIG, "--train.output_dir", str(run), "--env.groups_per_iteration", "4",
                       "--rollout.num_generations", "4", "--env.num_workers", "16", "--train.iterations", "1",
                       "--train.eval_every", "0", "--log.progress", "false", "--log.plots", "false"]))
    torch.use_deterministic_algorithms(enabled)
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert _cli("eval", "--eval.run_dir", str(run), "--eval.trials", "2", "--env.num_workers", "4",
                "--eval.output", str(out)) == 0
    data = json.loads(out.read_text())
    assert data["suite"] == "toy"  # from the run's config: no --suite needed
    assert data["run_dir"] == str(run) and data["checkpoint"] == str(latest_checkpoint(run))
    _check_report(data["results"]["greedy"], trials=2)


def test_train_with_bad_values_exits_2_listing_every_problem_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trainer", "train", "--config", CONFIG, "--env.suite", "nowhere",
                             "--algo.name", "dqn", "--optim.lr=-1", "--train.output_dir", str(tmp_path / "run")],
                            cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for text in ("invalid config:", "env.suite = 'nowhere'", "algo.name = 'dqn'", "optim.lr = -1.0; expected > 0"):
        assert text in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


def test_missing_config_file_exits_2_with_its_path(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert _cli("train", "--config", str(missing)) == 2
    err = capsys.readouterr().err
    assert f"config file {missing} does not exist" in err


def test_eval_with_bad_task_ids_or_suite_is_a_clear_error(capsys):
    assert _cli("eval", "--model.source", "tiny", "--env.suite", "toy", "--eval.trials", "0") == 2
    assert "eval.trials = 0; expected >= 1" in capsys.readouterr().err  # refused before anything is built
    assert _cli("eval", "--model.source", "tiny", "--env.suite", "toy", "--env.task_ids", "[7]") == 2
    assert "env.task_ids [7] are not tasks of toy (0..2)" in capsys.readouterr().err
    assert _cli("eval", "--model.source", "tiny", "--env.suite", "toy_2") == 2
    assert "env.suite = 'toy_2'" in capsys.readouterr().err


def test_unknown_arguments_are_rejected(capsys):
    assert _cli("eval", "--model.source", "tiny", "--bogus", "1") == 2
    assert "--bogus" in capsys.readouterr().err
    assert _cli("export", "--run-dir", "x") == 2  # --out is required


# --- export -------------------------------------------------------------------------------------------------------


def test_export_writes_a_merged_openvla_model_that_acts_like_the_trained_policy(tmp_path, toy_observations):
    from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer, load_vla
    from trainer.train import build_run_policy, train

    run = tmp_path / "run"
    enabled = torch.are_deterministic_algorithms_enabled()
    train(load_config(["--config", CONFIG, "--train.output_dir", str(run), "--env.groups_per_iteration", "4",
                       "--rollout.num_generations", "4", "--env.num_workers", "16", "--train.iterations", "2",
                       "--train.eval_every", "0", "--train.checkpoint_every", "0", "--lora.include_lm_head", "true",
                       "--log.progress", "false", "--log.plots", "false"]))
    torch.use_deterministic_algorithms(enabled)
    out = tmp_path / "merged"
    result = subprocess.run([sys.executable, "-m", "trainer", "export", "--run-dir", str(run), "--out", str(out)],
                            cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "written to" in result.stdout
    files = {p.name for p in out.iterdir()}
    assert "config.json" in files and any(f.startswith("model") and f.endswith(".safetensors") for f in files)
    merged_weights = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in merged_weights), "adapter names leaked into the export"

    # The trained policy: fresh build + the run's latest checkpoint (LoRA applied, not merged).
    config = load_config(["--config", str(run / "config.yaml")])
    trained = build_run_policy(config, Dist.create()).eval()
    load_weights(latest_checkpoint(run), trained)
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "the adapter never moved: the comparison would be vacuous"

    settings = EnvSettings("none", False, "toy")
    model, tokenizer = load_model_and_tokenizer(str(out))
    exported = VLAPolicy(model, tokenizer, settings).eval()
    exported_too = VLAPolicy(load_vla(out, dtype=torch.float32), tokenizer, settings).eval()
    base = VLAPolicy(*load_model_and_tokenizer("tiny", seed=config.train.seed), settings).eval()

    inputs = trained.prepare(toy_observations)
    expected = trained.act(inputs, greedy=True)
    for policy in (exported, exported_too):
        got = policy.act(policy.prepare(toy_observations), greedy=True)
        assert torch.equal(got.token_ids, expected.token_ids)
        np.testing.assert_array_equal(got.env_actions, expected.env_actions)
        # Merging W + BA reorders float sums: log-probs agree to rounding, not bit for bit.
        torch.testing.assert_close(got.log_probs, expected.log_probs, atol=1e-5, rtol=1e-5)
    # ...and the export really contains the trained adapter (the untouched base model acts differently).
    untrained = base.act(base.prepare(toy_observations), greedy=True)
    assert not torch.allclose(untrained.log_probs, expected.log_probs, atol=1e-4)


# --- a run directory of an earlier version ---------------------------------------------------------------------------

OLD_RUN = ROOT / "tests" / "fixtures" / "old_run_e165e4f"  # config.yaml under the old option names, optimizer.pt


def test_eval_and_export_of_a_run_directory_of_an_earlier_version(tmp_path, capsys, toy_observations):
    """Its config.yaml loads (renamed options under their new names, with a warning) and its checkpoint's weights
    are the ones evaluated and exported."""
    from trainer.config import RenamedOptionWarning
    from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer
    from trainer.train import build_run_policy

    out = tmp_path / "eval.json"
    with pytest.warns(RenamedOptionWarning, match="algo.gamma -> algo.ppo.gamma"):
        assert _cli("eval", "--eval.run_dir", str(OLD_RUN), "--eval.trials", "2", "--env.num_workers", "4",
                    "--eval.output", str(out)) == 0
    data = json.loads(out.read_text())
    assert data["suite"] == "toy" and data["checkpoint"] == str(OLD_RUN / "checkpoints" / "iter-000001")
    _check_report(data["results"]["greedy"], trials=2)

    merged = tmp_path / "merged"
    with pytest.warns(RenamedOptionWarning):
        assert _cli("export", "--run-dir", str(OLD_RUN), "--out", str(merged)) == 0
    with pytest.warns(RenamedOptionWarning):
        config = load_config(["--config", str(OLD_RUN / "config.yaml")])
    trained = build_run_policy(config, Dist.create()).eval()
    assert load_weights(OLD_RUN / "checkpoints" / "iter-000001", trained)["iteration"] == 1
    assert any(p.abs().sum() > 0 for n, p in trained.named_parameters() if "lora_B" in n)  # trained adapters
    model, tokenizer = load_model_and_tokenizer(str(merged))
    exported = VLAPolicy(model, tokenizer, EnvSettings("none", False, "toy")).eval()
    expected = trained.act(trained.prepare(toy_observations), greedy=True)
    got = exported.act(exported.prepare(toy_observations), greedy=True)
    assert torch.equal(got.token_ids, expected.token_ids)
    torch.testing.assert_close(got.log_probs, expected.log_probs, atol=1e-5, rtol=1e-5)
