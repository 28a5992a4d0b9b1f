"""Checkpoints in the layouts their publishers release load, act and evaluate with no manual edits.

Tiny weights stand in for the 7B ones (config.json keeps our "trainer" key only for the tiny widths, with nothing in it
that says OFT); the files, their names, formats and the statistics are laid out as released:

- OpenVLA fine-tunes (openvla/openvla-7b-finetuned-libero-*): HF layout, sharded safetensors with an index, config.json
  whose norm_stats know only the pre-training mixture, the LIBERO statistics in dataset_statistics.json;
- OpenVLA-OFT LIBERO releases (moojink/openvla-7b-oft-finetuned-libero-*): openvla-7b's config.json, the merged VLA,
  `proprio_projector--150000_checkpoint.pt` and `action_head--150000_checkpoint.pt` (DDP-saved: "module." prefixes),
  dataset_statistics.json under `<suite>_no_noops`;
- SimpleVLA-RL's SFT checkpoints (Haozhan72/Openvla-oft-SFT-libero*-traj*): OpenVLA-OFT fine-tuned on the action
  tokens (use_l1_regression False, one view, no proprio), so no component files;
- RLinf's OFT LoRA base (RLinf/RLinf-OpenVLAOFT-LIBERO-130-Base-Lora): the same, merged weights at the top level
  (RLinf's LIBERO-130 recipe loads them with is_lora False), a `lora_adapter/` folder beside them, statistics under
  `libero_130_no_noops_trajall`; RLinf's OFT port runs the action slots without a trailing </s>.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.envs.base import Observation, StepResult
from trainer.envs.pool import EnvInfo, ResetReply, StepReply
from trainer.evaluate import evaluate, protocol_items
from trainer.models import (
    EnvSettings,
    VLAPolicy,
    build_model,
    load_model_and_tokenizer,
    manifest,
    preset,
    save_tiny_checkpoint,
)
from trainer.models.config import VLAConfig

FIXTURES = Path(__file__).parent / "fixtures"
LIBERO_STATS = {
    "action": {"q01": [-0.75, -0.66, -0.94, -0.11, -0.21, -0.18, 0.0], "q99": [0.94, 0.87, 0.94, 0.14, 0.18, 0.35, 1.0],
               "mask": [True] * 6 + [False]},
    "proprio": {"q01": [-0.3, -0.3, 0.0, 2.5, -1.0, -0.5, 0.0, -0.04], "q99": [0.2, 0.3, 1.3, 3.3, 1.0, 0.5, 0.04, 0.0]},
}
PRETRAINING_STATS = {"bridge_orig": {"action": {"q01": [-0.03] * 7, "q99": [0.03] * 7, "mask": [True] * 6 + [False]}}}


class SingleProcess:
    rank, world_size, is_main = 0, 1, True

    @staticmethod
    def sum_metrics(metrics):
        return dict(metrics)


class TwoStepPool:
    """LIBERO-shaped observations (256 px, upside down); every episode lasts two policy steps; worker 0 succeeds."""

    num_workers = 2
    info = EnvInfo(suite="libero_spatial", max_steps=16, image_pipeline="libero", num_init_states=(50,),
                   instructions=("pick up the black bowl and place it on the plate",))

    def __init__(self):
        self.rng = np.random.default_rng(0)
        self.steps = {}
        self.actions = []

    def _observation(self):
        def frame():
            return self.rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)

        return Observation(frame(), frame(), self.rng.uniform(-0.2, 0.2, 8).astype(np.float32), self.info.instructions[0])

    def reset(self, requests, timeout_s=None):
        self.steps.update({worker: 0 for worker in requests})
        return {worker: ResetReply(self._observation(), None, 0.0) for worker in requests}

    def step(self, actions, timeout_s=None):
        replies = {}
        for worker, chunk in actions.items():
            self.actions.append(np.asarray(chunk))
            self.steps[worker] += 1
            done = self.steps[worker] == 2
            result = StepResult(self._observation(), reward=float(done and worker == 0), success=done and worker == 0,
                                done=done, steps_executed=len(chunk))
            replies[worker] = StepReply(result, None, 0.0)
        return replies


def _as_released(directory: Path, oft_components: bool, dataset_statistics: dict) -> None:
    """Turn one of our tiny checkpoints into a publisher's layout: config.json says nothing about OFT and keeps only
    pre-training statistics, the LIBERO ones go to dataset_statistics.json, OFT parts become DDP-saved .pt files."""
    config = json.loads((directory / "config.json").read_text())
    config["trainer"]["family"], config["trainer"]["oft"] = "openvla", None
    config["norm_stats"] = PRETRAINING_STATS
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "dataset_statistics.json").write_text(json.dumps(dataset_statistics))
    for component in ("proprio_projector", "action_head"):
        path = directory / f"{component}.safetensors"
        if path.exists():
            if oft_components:
                state = {f"module.{k}": v for k, v in load_file(path).items()}
                torch.save(state, directory / f"{component}--150000_checkpoint.pt")
            path.unlink()


def _released_openvla(tmp_path) -> Path:
    directory = save_tiny_checkpoint(tmp_path / "openvla-7b-finetuned-libero-spatial", name="tiny", seed=3,
                                     max_shard_size="300KB")
    _as_released(directory, oft_components=False, dataset_statistics={"libero_spatial_no_noops": LIBERO_STATS})
    return directory


def _released_oft(tmp_path) -> Path:
    directory = save_tiny_checkpoint(tmp_path / "openvla-7b-oft-finetuned-libero-spatial", name="tiny-oft", seed=3,
                                     max_shard_size="300KB")
    _as_released(directory, oft_components=True, dataset_statistics={"libero_spatial_no_noops": LIBERO_STATS})
    return directory


def _token_oft(tmp_path, name: str, key: str) -> Path:
    """An OFT fine-tune on the action tokens with one view and no proprio (SimpleVLA-RL's SFT, RLinf's base)."""
    model, tokenizer = load_model_and_tokenizer("tiny-oft", seed=5)
    config = model.config
    config.trainer.oft.num_images, config.trainer.oft.use_proprio, config.trainer.oft.use_l1_head = 1, False, False
    single_view = build_model(config, seed=5)
    from trainer.models import save_vla

    directory = save_vla(single_view, tmp_path / name, tokenizer=tokenizer, max_shard_size="300KB")
    _as_released(directory, oft_components=False, dataset_statistics={key: LIBERO_STATS})
    return directory


def _policy(directory: Path, suite_key: str, **load):
    model, tokenizer = load_model_and_tokenizer(str(directory), **load)
    return VLAPolicy(model, tokenizer, EnvSettings("libero", True, suite_key)).eval()


def _first_observations(n=2):
    pool = TwoStepPool()
    return [r.observation for r in pool.reset({i: None for i in range(n)}).values()]


def test_openvla_finetune_layout_loads_its_dataset_statistics_acts_and_evaluates(tmp_path):
    directory = _released_openvla(tmp_path)
    assert len(list(directory.glob("model-*.safetensors"))) >= 2 and (directory / "model.safetensors.index.json").exists()
    policy = _policy(directory, "libero_spatial")
    assert policy.unnorm_key == "libero_spatial_no_noops"
    assert policy.describe_norm_stats() == ("'libero_spatial_no_noops' (for 'libero_spatial': the official "
                                            "<suite>_no_noops fallback), from dataset_statistics.json")
    assert "norm stats: 'libero_spatial_no_noops'" in policy.summary()
    result = policy.act(policy.prepare(_first_observations()), greedy=True, official_greedy=True)
    # un-normalised with the LIBERO statistics of dataset_statistics.json (not config.json's pre-training ones)
    q01, q99 = np.array(LIBERO_STATS["action"]["q01"][:6]), np.array(LIBERO_STATS["action"]["q99"][:6])
    expected = 0.5 * (result.normalized_actions[..., :6] + 1) * (q99 - q01) + q01
    np.testing.assert_allclose(result.env_actions[..., :6], expected)
    assert set(np.unique(result.env_actions[..., 6])) <= {-1.0, 1.0}
    pool = TwoStepPool()
    report = evaluate(policy, pool, protocol_items([0], 2, [50]), SingleProcess(), greedy=True)
    assert report.per_task == {0: (1, 2)} and len(pool.actions) == 4 and pool.actions[0].shape == (1, 7)
    assert report.actions.startswith("action tokens, argmax over the whole vocabulary")


def test_oft_release_layout_loads_as_oft_with_its_head_and_is_evaluated_with_it(tmp_path):
    directory = _released_oft(tmp_path)
    assert sorted(p.name for p in directory.glob("*--150000_checkpoint.pt")) == [
        "action_head--150000_checkpoint.pt", "proprio_projector--150000_checkpoint.pt"]
    # what the issue reported: the statistics exist only in dataset_statistics.json
    assert "libero_spatial_no_noops" not in json.loads((directory / "config.json").read_text())["norm_stats"]
    policy = _policy(directory, "libero_spatial")  # OFT's head files say OFT: no family needed
    oft = policy.config.trainer.oft
    assert (oft.num_images, oft.use_proprio, oft.use_l1_head, oft.stop_token) == (2, True, True, True)
    assert _policy(directory, "libero_spatial", family="oft").config == policy.config
    assert policy.eval_uses_l1_head and "greedy evaluation: L1 regression head" in policy.summary()
    reference, _ = load_model_and_tokenizer("tiny-oft", seed=3)
    for (name, ours), (_, theirs) in zip(policy.base_model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(ours, theirs), name
    inputs = policy.prepare(_first_observations())
    assert inputs.images.shape == (2, 2, 32, 32, 3) and inputs.proprio.shape == (2, 8)
    l1 = policy.act(inputs, greedy=True, use_l1_head=True)
    assert l1.env_actions.shape == (2, 8, 7)
    pool = TwoStepPool()
    report = evaluate(policy, pool, protocol_items([0], 2, [50]), SingleProcess(), greedy=True)
    assert report.actions.startswith("L1 regression head") and report.per_task == {0: (1, 2)}
    assert pool.actions[0].shape == (8, 7)
    assert "from dataset_statistics.json" in report.norm_stats


def test_released_oft_directory_through_the_run_config(tmp_path):
    """`--model.source <released OFT dir> --env.suite libero_spatial` builds an OFT policy (it raised
    KeyError: unnorm_key 'libero_spatial' before)."""
    from trainer.cli import load_eval_config
    from trainer.dist import Dist
    from trainer.train import build_run_policy

    config = load_eval_config(["--model.source", str(_released_oft(tmp_path)), "--env.suite", "libero_spatial"])
    assert config.model.use_l1_head_for_eval is None and not config.lora.enabled
    assert config.eval.trials == 50 and config.eval.mode == "greedy"  # the protocol's count and decode by default
    policy = build_run_policy(config, Dist.create(config.dist))
    assert policy.unnorm_key == "libero_spatial_no_noops" and policy.eval_uses_l1_head


def test_simplevla_rl_sft_layout_is_a_single_view_token_oft(tmp_path):
    directory = _token_oft(tmp_path, "Openvla-oft-SFT-libero10-trajall", "libero_10_no_noops")
    policy = _policy(directory, "libero_10", family="oft")
    oft = policy.config.trainer.oft
    assert (oft.num_images, oft.use_proprio, oft.use_l1_head) == (1, False, False)
    assert not policy.eval_uses_l1_head and policy.unnorm_key == "libero_10_no_noops"
    inputs = policy.prepare(_first_observations())
    assert inputs.images.shape[1] == 1 and inputs.proprio is None
    result = policy.act(inputs, greedy=True, official_greedy=True)
    assert result.env_actions.shape == (2, 8, 7)
    report = evaluate(policy, TwoStepPool(), protocol_items([0], 2, [50]), SingleProcess(), greedy=True)
    assert report.actions.startswith("action tokens, argmax over the whole vocabulary")


def test_rlinf_lora_base_layout_without_the_stop_token(tmp_path):
    directory = _token_oft(tmp_path, "RLinf-OpenVLAOFT-LIBERO-130-Base-Lora", "libero_130_no_noops_trajall")
    (directory / "lora_adapter").mkdir()
    (directory / "lora_adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 32}))
    save_file({"base_model.model.projector.fc1.lora_A.weight": torch.zeros(32, 80)},
              str(directory / "lora_adapter" / "adapter_model.safetensors"))
    with pytest.raises(KeyError, match="libero_130_no_noops_trajall"):  # RLinf's own key, not <suite>_no_noops
        _policy(directory, "libero_spatial", family="oft")
    rlinf = _policy(directory, "libero_130_no_noops_trajall", family="oft", stop_token=False)
    official = _policy(directory, "libero_130_no_noops_trajall", family="oft")
    assert not rlinf.config.trainer.oft.stop_token and "no </s> after the slots" in rlinf.summary()
    inputs = rlinf.prepare(_first_observations())
    without, with_stop = (p.base_model(pixel_values=_pixels(inputs), text_ids=inputs.text_ids,
                                       text_mask=inputs.text_mask) for p in (rlinf, official))
    # bidirectional attention: leaving </s> out changes every slot's state, and the slots are read one step earlier
    assert without.action_logits.shape == with_stop.action_logits.shape == (2, 56, 256)
    assert not torch.allclose(without.action_logits, with_stop.action_logits)
    report = evaluate(rlinf, TwoStepPool(), protocol_items([0], 2, [50]), SingleProcess(), greedy=True)
    assert report.per_task == {0: (1, 2)}


def test_eval_command_options_for_a_token_oft_release(tmp_path):
    """RLinf's base through the eval command's options: --model.family oft, --model.num_images 1 and
    --model.oft_stop_token false reach the loader; a wrong view count is refused by validation."""
    from trainer.cli import load_eval_config
    from trainer.config import ConfigError
    from trainer.dist import Dist
    from trainer.train import build_run_policy

    directory = _token_oft(tmp_path, "RLinf-OpenVLAOFT-LIBERO-130-Base-Lora", "libero_130_no_noops_trajall")
    args = ["--model.source", str(directory), "--model.family", "oft", "--env.suite", "libero_spatial",
            "--env.unnorm_key", "libero_130_no_noops_trajall"]
    config = load_eval_config([*args, "--model.num_images", "1", "--model.oft_stop_token", "false"])
    assert (config.model.num_images, config.model.oft_stop_token) == (1, False)
    policy = build_run_policy(config, Dist.create(config.dist))
    oft = policy.config.trainer.oft
    assert (oft.num_images, oft.stop_token, oft.use_l1_head) == (1, False, False)
    assert policy.unnorm_key == "libero_130_no_noops_trajall" and not policy.eval_uses_l1_head
    default = build_run_policy(load_eval_config(args), Dist.create())
    assert default.config.trainer.oft.stop_token and default.config.trainer.oft.num_images == 1
    with pytest.raises(ConfigError, match="num_images = 0"):
        load_eval_config([*args, "--model.num_images", "0"])


def _pixels(inputs):
    from trainer.models.processor import pixel_values

    return pixel_values(inputs.images)


def test_the_released_openvla_7b_config_json_resolves_to_the_full_size_preset():
    """tests/fixtures/openvla-7b_config.json: openvla/openvla-7b's config.json reconstructed from OPENVLA_SPEC §1.1
    (field names and values as the conversion script writes them; two norm_stats entries with placeholder numbers)."""
    config = VLAConfig.from_json_dict(json.loads((FIXTURES / "openvla-7b_config.json").read_text()))
    assert config.trainer.family == "openvla" and sorted(config.norm_stats) == ["bridge_orig", "fractal20220817_data"]
    ours, full_size = manifest(build_model(config, on_meta=True)), manifest(build_model(preset("openvla-7b"), on_meta=True))
    assert ours == full_size and ours["total_params"] == 7_541_237_184
    llm = build_model(config, on_meta=True).language_model.config
    assert (llm.hidden_size, llm.num_hidden_layers, llm.vocab_size, llm.rms_norm_eps, llm.max_position_embeddings) == (
        4096, 32, 32064, 1e-6, 2048)
    oft = manifest(build_model(config.as_oft(), on_meta=True))
    assert oft == manifest(build_model(preset("openvla-7b-oft"), on_meta=True))
