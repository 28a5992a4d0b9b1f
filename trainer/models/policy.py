"""One policy API for rollout, training, evaluation and benchmark.

    inputs = policy.prepare(observations)                 # images through the env's pipeline, prompts, proprio
    out = policy.act(inputs, greedy=False, temperature=1) # actions for the env + token ids + per-token log-probs
    ev = policy.evaluate(inputs, out.token_ids, temperature=1)  # log-probs, entropy, values, with gradients

Both calls are batched: one model call for the whole batch (standard OpenVLA: one prefill plus 6 cached decoding
steps; OpenVLA-OFT: one forward per 8-action chunk). The distribution is over the 256 action tokens at the given
temperature, so rollout log-probs and update log-probs are the same function of the weights.

Greedy decoding comes in two forms. Training's greedy steps (behaviour-cloning warm-up, epsilon-greedy hand-over)
take the argmax over the 256 action ids, so that the update can recompute their log-probs. Evaluation asks for
`official_greedy`: the argmax over the whole vocabulary, mapped to a bin as the official `predict_action` does (an id
outside the action range clips to an end bin; a standard OpenVLA that emits </s> early ends its generation there, as
HF generate does). The two differ only where the top token is not an action token.

`act` / `evaluate` take an optional `model`: the DDP / FSDP / DeepSpeed wrapped module whose forward is this
policy's forward. Wrappers only ever see `forward` calls.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from trainer.envs.base import Observation
from trainer.models.action_tokenizer import ActionTokenizer
from trainer.models.openvla import OpenVLA, VLAOutput
from trainer.models.processor import (
    ImagePipeline,
    libero_gripper,
    normalize_proprio,
    pixel_values,
    prompt_for,
    select_norm_stats,
    unnormalize_actions,
)


class ValueHead(nn.Module):
    """Critic on the hidden state just before the first action token (a value head on the shared backbone)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        width = max(hidden_size // 4, 16)
        self.net = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width), nn.GELU(),
                                 nn.Linear(width, 1))
        nn.init.zeros_(self.net[-1].weight)  # start at V = 0: no spurious advantages before the critic learns
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.to(self.net[1].weight.dtype)).squeeze(-1).float()


@dataclass
class PolicyInputs:
    """Model inputs of a batch of observations, compact enough to keep in trajectories for the update."""

    images: torch.Tensor  # uint8 [B, n_img, S, S, 3], after the env's image pipeline
    text_ids: torch.Tensor  # long [B, T]: prompt after BOS + space token, left-padded
    text_mask: torch.Tensor  # long [B, T]
    proprio: torch.Tensor | None  # float [B, 8], normalised (OFT)

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> PolicyInputs:
        return replace(self, images=self.images.to(device), text_ids=self.text_ids.to(device),
                       text_mask=self.text_mask.to(device),
                       proprio=None if self.proprio is None else self.proprio.to(device))

    def select(self, index) -> PolicyInputs:
        return replace(self, images=self.images[index], text_ids=self.text_ids[index],
                       text_mask=self.text_mask[index], proprio=None if self.proprio is None else self.proprio[index])

    @staticmethod
    def collate(parts: list[PolicyInputs], pad_id: int) -> PolicyInputs:
        """Concatenate batches whose prompts were padded to different lengths (re-padded on the left)."""
        width = max(p.text_ids.shape[1] for p in parts)

        def left_pad(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

        return PolicyInputs(
            images=torch.cat([p.images for p in parts]),
            text_ids=torch.cat([left_pad(p.text_ids, pad_id) for p in parts]),
            text_mask=torch.cat([left_pad(p.text_mask, 0) for p in parts]),
            proprio=None if parts[0].proprio is None else torch.cat([p.proprio for p in parts]),
        )


@dataclass
class ActResult:
    env_actions: np.ndarray  # [B, chunk, 7] in env units (chunk = 1 for OpenVLA, 8 for OFT)
    # long [B, n_tokens] (7 or 56); with official_greedy they may include non-action ids (evaluation only)
    token_ids: torch.Tensor
    # float [B, n_tokens] at the sampling temperature: under the 256-way action distribution, or under the
    # whole-vocabulary softmax for official greedy steps
    log_probs: torch.Tensor
    values: torch.Tensor | None  # float [B] (with a value head)
    normalized_actions: np.ndarray = field(default=None)  # [B, chunk, 7] in [-1, 1], before un-normalisation


@dataclass
class EvalResult:
    log_probs: torch.Tensor  # [B, n_tokens]
    entropy: torch.Tensor  # [B, n_tokens]
    values: torch.Tensor | None  # [B]
    logits: torch.Tensor  # [B, n_tokens, n_bins] (for behaviour cloning)


@dataclass(frozen=True)
class EnvSettings:
    """How observations and actions of one environment family are translated (LIBERO or toy)."""

    image_pipeline: str = "libero"
    binarize_gripper: bool = True  # LIBERO: sign + invert the gripper dimension
    unnorm_key: str | None = None


def mixed_precision_adapters(vla: nn.Module, compute_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype LoRA adapters should compute in, or None to leave them as they are.

    PEFT keeps LoRA weights in fp32 on a bf16 base (so that small optimizer updates are not rounded away) and by
    default casts every adapted layer's input to fp32 for them: fp32 GEMMs plus full-size fp32 copies, casts and adds
    around every linear layer, which took about half of the OpenVLA-7B update's GPU time (docs/benchmarks.md).
    Mixed precision instead: the weights and their gradients stay fp32, the adapters compute in the base's dtype
    under autocast, and PEFT's input cast is switched off."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in vla.modules() if isinstance(m, BaseTunerLayer)]
    adapter_dtypes = {p.dtype for layer in layers for name, p in layer.named_parameters() if "lora_" in name}
    if compute_dtype == torch.float32 or torch.float32 not in adapter_dtypes:
        return None
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return compute_dtype


def _has_lora(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def _all_mergeable(layers: list[nn.Module], model: nn.Module) -> bool:
    """Whether these LoRA layers' adapters can all be folded into their base weights without loss: every base is a
    plain nn.Linear (not a subclass such as bitsandbytes' Linear8bitLt) whose weight no other module uses."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    bases = [layer.get_base_layer() for layer in layers]
    return all(type(base) is nn.Linear and uses[id(base.weight)] == 1 for base in bases)


class VLAPolicy(nn.Module):
    def __init__(self, vla: nn.Module, tokenizer, env: EnvSettings, value_head: bool = False):
        super().__init__()
        self.vla = vla  # OpenVLA, or a PEFT model wrapping it
        base = self.base_model
        self.config = base.config
        self.tokenizer = tokenizer
        self.env = env
        self.action_tokenizer = ActionTokenizer(self.config.base_vocab_size, self.config.n_action_bins)
        self.unnorm_key, stats = select_norm_stats(self.config.norm_stats, env.unnorm_key)
        self.requested_unnorm_key = env.unnorm_key
        self.action_stats = stats["action"]
        self.proprio_stats = stats.get("proprio")
        if self.config.is_oft and self.config.trainer.oft.use_proprio and self.proprio_stats is None:
            raise ValueError(f"norm_stats[{self.unnorm_key!r}] has no 'proprio' statistics, which OFT needs")
        self.image_pipeline = ImagePipeline(env.image_pipeline, size=self.config.image_size)
        self.value_head = ValueHead(self.config.text_config.get("hidden_size", 4096)) if value_head else None
        self._prompt_cache: dict[str, list[int]] = {}
        self.adapter_compute_dtype = mixed_precision_adapters(vla, self.compute_dtype)
        if self.config.is_oft and _has_lora(vla):
            # Built for fine-tuning here (RL on the action tokens); kept in the config so that exports say so too.
            self.config.trainer.oft.trained_on_tokens = True

    # --- what this policy is (printed by training and in evaluation reports) ------------------------------------

    @property
    def eval_uses_l1_head(self) -> bool:
        """How greedy evaluation decodes an OFT model by default: with the L1 head when the checkpoint has one and was
        released that way (the official OpenVLA-OFT LIBERO evaluation), with the action tokens for a policy trained
        here on them (evaluated as it was trained)."""
        oft = self.config.trainer.oft
        return self.config.is_oft and oft.use_l1_head and not oft.trained_on_tokens

    def describe_actions(self, greedy: bool, use_l1_head: bool, temperature: float = 1.0) -> str:
        if use_l1_head:
            return "L1 regression head (the official OpenVLA-OFT LIBERO evaluation)"
        if greedy:
            return "action tokens, argmax over the whole vocabulary (the official decode)"
        return f"action tokens sampled at temperature {temperature:g} over the {self.config.n_action_bins} action ids"

    def describe_norm_stats(self) -> str:
        requested = self.requested_unnorm_key
        if requested is None:
            how = "the checkpoint's only dataset"
        elif requested != self.unnorm_key:
            how = f"for {requested!r}: the official <suite>_no_noops fallback"
        else:
            how = "as requested"
        return f"{self.unnorm_key!r} ({how}), from {self.config.norm_stats_source}"

    def summary(self) -> str:
        """Lines for logs: the model's inputs and outputs, where its action statistics come from, how it decodes."""
        config = self.config
        if config.is_oft:
            oft = config.trainer.oft
            inputs = f"{oft.num_images} view(s)" + (", proprio" if oft.use_proprio else "")
            outputs = f"{oft.chunk_size}-action chunks" + (", L1 head" if oft.use_l1_head else "")
            family = f"OpenVLA-OFT ({inputs}; {outputs}{'' if oft.stop_token else '; no </s> after the slots'})"
        else:
            family = "OpenVLA (one view, 7 tokens decoded one by one)"
        greedy = self.describe_actions(True, self.eval_uses_l1_head)
        return "\n".join([f"model: {family}", f"norm stats: {self.describe_norm_stats()}",
                          f"greedy evaluation: {greedy}", f"sampling: over the {config.n_action_bins} action ids"])

    @property
    def base_model(self) -> OpenVLA:
        vla = self.vla
        while not isinstance(vla, OpenVLA):
            vla = vla.get_base_model() if hasattr(vla, "get_base_model") else vla.module
        return vla

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def compute_dtype(self) -> torch.dtype:
        dtype = self.base_model.projector.fc1.weight.dtype
        return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16  # int8: bf16

    @property
    def chunk_size(self) -> int:
        return self.config.trainer.oft.chunk_size if self.config.is_oft else 1

    # --- observations -> inputs -------------------------------------------------------------------------------------

    def prompt_ids(self, instruction: str) -> list[int]:
        """Token ids after BOS, ending with the space token that precedes the actions."""
        if instruction not in self._prompt_cache:
            ids = self.tokenizer(prompt_for(instruction))["input_ids"]
            if ids and ids[0] == self.tokenizer.bos_token_id:
                ids = ids[1:]
            space = self.config.trainer.space_token_id
            self._prompt_cache[instruction] = ids if ids and ids[-1] == space else ids + [space]
        return self._prompt_cache[instruction]

    def prepare(self, observations: list[Observation]) -> PolicyInputs:
        views = []
        for obs in observations:
            frames = [obs.primary_image, obs.wrist_image][: self.config.num_images]
            views.append(np.stack([self.image_pipeline(f) for f in frames]))
        prompts = [self.prompt_ids(obs.instruction) for obs in observations]
        width = max(len(p) for p in prompts)
        pad = self.config.pad_token_id
        text_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        text_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        proprio = None
        if self.config.is_oft and self.config.trainer.oft.use_proprio:
            proprio = torch.from_numpy(np.stack([normalize_proprio(o.proprio, self.proprio_stats) for o in observations]))
        return PolicyInputs(torch.from_numpy(np.stack(views)), text_ids, text_mask, proprio)

    # --- the module's forward: what DDP / FSDP / DeepSpeed wrap ----------------------------------------------------

    def forward(self, inputs: PolicyInputs | None = None, **kwargs) -> VLAOutput:
        if inputs is not None:
            kwargs.update(pixel_values=pixel_values(inputs.images, self.compute_dtype), text_ids=inputs.text_ids,
                          text_mask=inputs.text_mask, proprio=inputs.proprio)
        with self.adapters_in_base_dtype():
            out = self.vla(**kwargs)
        if self.value_head is not None and out.value_hidden is not None:
            with torch.autocast(self.device.type, enabled=False):  # fp32 critic, also inside an act's autocast
                out.values = self.value_head(out.value_hidden)
        return out

    def adapters_in_base_dtype(self):
        """Autocast for fp32 adapters on a bf16 base (see `mixed_precision_adapters`). Nested around a whole `act`,
        autocast's cache casts each adapter weight once for the prefill and all decoding steps, not once per step."""
        if self.adapter_compute_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.adapter_compute_dtype)

    @contextmanager
    def merged_adapters(self):
        """LoRA adapters folded into the base weights (W + scaling * B @ A) for a rollout, restored exactly after.

        Why: with adapters attached every adapted linear layer runs two extra small GEMMs plus a multiply and an add
        per forward; on an H200, OpenVLA-7B's `act` at batch 16 went from 24.8 to 45.6 actions/s merged (plain
        model: 47.7; docs/benchmarks.md). Merged, PEFT's layers see `merged` and call the plain base layer only.

        Cost: a copy of every adapted base weight is kept while merged (about 13 GB for OpenVLA-7B's language model
        in bf16), because un-merging in bf16 (W + d - d) does not give W back bit for bit. On exit PEFT's unmerge
        resets its `merged` state and the copies are written back: the base weights are bit-identical to before, so
        the update trains exactly the weights it would have trained without this. Exceptions inside restore too.

        Why the log-probs are still right: a merged layer computes the same function up to rounding (in bf16, W + d is
        rounded once into the weight instead of adding a separately rounded adapter output). The rollout's log-probs
        are the behaviour policy's own (computed with the weights that chose the actions), which is what the PPO /
        GRPO importance ratio needs; the update then evaluates the unmerged model, and the ratio absorbs the rounding.

        Does nothing when there is nothing to merge (no LoRA, or all merged / disabled already), when any adapted
        base layer is not a plain nn.Linear (an LLM.int8 base cannot take W + d without re-quantising, a loss), or
        when an adapted weight is shared with another parameter (tied embeddings: merging would change both).
        Not for FSDP / DeepSpeed modules: their parameters are flattened or partitioned (the trainer only merges on
        single-process and DDP runs). The `adapters_in_base_dtype` autocast is harmless while merged: the adapters
        are not called, and the base layers compute as they do unmerged.
        """
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.vla.modules() if isinstance(m, LoraLayer) and not m.merged and not m.disable_adapters]
        if not layers or not _all_mergeable(layers, self.vla):
            yield
            return
        originals = []
        # No autocast while merging or restoring: the delta B @ A is computed in the adapters' own (fp32) precision.
        device_type = self.device.type
        try:
            with torch.no_grad(), torch.autocast(device_type, enabled=False):
                for layer in layers:
                    weight = layer.get_base_layer().weight
                    originals.append((layer, weight, weight.detach().clone()))
                    # In place (safe_merge would swap in a new tensor and clone again); an fp32 delta is rounded into
                    # a bf16 weight by the in-place add.
                    layer.merge(safe_merge=False)
            yield
        finally:
            with torch.no_grad(), torch.autocast(device_type, enabled=False):
                for layer, weight, original in originals:
                    if layer.merged:
                        layer.unmerge()  # resets PEFT's state; its bf16 arithmetic alone would drift
                    weight.copy_(original)

    # --- acting -----------------------------------------------------------------------------------------------------

    def _choose(self, action_logits: torch.Tensor, greedy, temperature: float, generator=None,
                vocab_logits: torch.Tensor | None = None):
        """Token ids and their log-probs per position. Sampled steps draw from the action ids at `temperature`; greedy
        steps take the argmax over the action ids, or with `vocab_logits` (official greedy) over the whole vocabulary,
        with the log-prob under the whole-vocabulary softmax."""
        scaled = action_logits / temperature
        log_probs = torch.log_softmax(scaled, dim=-1)
        flat = log_probs.reshape(-1, log_probs.shape[-1])
        # Sampled on the CPU with the caller's (CPU) generator: the same draws on any device, and a few kB to move.
        sampled = torch.multinomial(flat.exp().float().cpu(), 1, generator=generator).to(action_logits.device)
        sampled = sampled.reshape(log_probs.shape[:-1])
        argmax = log_probs.argmax(-1)
        greedy_mask = torch.as_tensor(greedy, device=action_logits.device, dtype=torch.bool)
        if greedy_mask.ndim == 1:  # per-sample choice (epsilon-greedy hand-over)
            greedy_mask = greedy_mask.view(-1, *([1] * (argmax.ndim - 1)))
        choice = torch.where(greedy_mask, argmax, sampled)
        token_ids = self.action_tokenizer.local_to_token_ids(choice)
        chosen_log_probs = log_probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        if vocab_logits is not None:
            vocab_log_probs = torch.log_softmax(vocab_logits.float() / temperature, dim=-1)
            vocab_argmax = vocab_log_probs.argmax(-1)
            token_ids = torch.where(greedy_mask, vocab_argmax, token_ids)
            vocab_chosen = vocab_log_probs.gather(-1, vocab_argmax.unsqueeze(-1)).squeeze(-1)
            chosen_log_probs = torch.where(greedy_mask, vocab_chosen, chosen_log_probs)
        return token_ids, chosen_log_probs

    @torch.no_grad()
    def act(self, inputs: PolicyInputs, greedy=False, temperature: float = 1.0, model: nn.Module | None = None,
            use_l1_head: bool = False, generator: torch.Generator | None = None,
            official_greedy: bool = False) -> ActResult:
        """Actions for a batch. `greedy` is a bool or a bool tensor [B] (per-sample greedy, for epsilon-greedy).

        `official_greedy`: greedy steps decode as the official code (argmax over the whole vocabulary; module
        docstring). For evaluation: the token ids it returns may lie outside the action range, which the update
        cannot train on.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
        was_training = self.training
        self.eval()  # no dropout, and the KV cache stays on (transformers drops it under gradient checkpointing)
        try:
            with self.adapters_in_base_dtype():
                full_vocabulary = official_greedy and not use_l1_head and bool(torch.as_tensor(greedy).any())
                return self._act(inputs, greedy, temperature, model or self, use_l1_head, generator, full_vocabulary)
        finally:
            self.train(was_training)

    def _act(self, inputs, greedy, temperature, model, use_l1_head, generator, full_vocabulary) -> ActResult:
        inputs = inputs.to(self.device)
        if self.config.is_oft:
            out = model(inputs, with_l1_actions=use_l1_head, full_vocabulary=full_vocabulary)
            token_ids, log_probs = self._choose(out.action_logits, greedy, temperature, generator, out.vocab_logits)
        else:
            out = model(inputs, use_cache=True, full_vocabulary=full_vocabulary)
            token_steps, log_prob_steps = [], []
            step = out
            for index in range(self.config.trainer.action_dim):
                vocab_logits = None if step.vocab_logits is None else step.vocab_logits[:, -1]
                ids, log_prob = self._choose(step.action_logits[:, -1], greedy, temperature, generator, vocab_logits)
                token_steps.append(ids)
                log_prob_steps.append(log_prob)
                if index + 1 < self.config.trainer.action_dim:
                    step = model(decode_ids=ids[:, None], past_key_values=step.past_key_values,
                                 attention_mask=step.attention_mask, next_position=step.next_position,
                                 full_vocabulary=full_vocabulary)
            token_ids, log_probs = torch.stack(token_steps, 1), torch.stack(log_prob_steps, 1)
            if full_vocabulary:
                token_ids, log_probs = self._end_at_stop_token(token_ids, log_probs, inputs.text_ids)
        if use_l1_head:
            normalized = out.l1_actions.cpu().numpy()
        else:
            normalized = self.action_tokenizer.decode(token_ids).reshape(len(inputs), self.chunk_size, -1)
        return ActResult(self.to_env_actions(normalized), token_ids, log_probs.float(), out.values,
                         normalized_actions=normalized)

    def _end_at_stop_token(self, token_ids: torch.Tensor, log_probs: torch.Tensor, text_ids: torch.Tensor):
        """What the official predict_action decodes when generation emits </s> before the 7th token: HF generate stops
        there, and the last 7 ids of the sequence are taken, so the end of the prompt fills the front (log-prob 0)."""
        stop = token_ids == self.config.trainer.stop_token_id
        if not stop.any():
            return token_ids, log_probs
        token_ids, log_probs = token_ids.clone(), log_probs.clone()
        n = token_ids.shape[1]
        for row in torch.nonzero(stop.any(1)).flatten().tolist():
            generated = int(torch.nonzero(stop[row])[0]) + 1  # tokens up to and including </s>
            token_ids[row] = torch.cat([text_ids[row, text_ids.shape[1] - (n - generated):], token_ids[row, :generated]])
            log_probs[row] = torch.cat([log_probs.new_zeros(n - generated), log_probs[row, :generated]])
        return token_ids, log_probs

    def to_env_actions(self, normalized: np.ndarray) -> np.ndarray:
        range_eps = 1e-8 if self.config.is_oft else 0.0
        actions = unnormalize_actions(normalized, self.action_stats, range_eps)
        return libero_gripper(actions) if self.env.binarize_gripper else actions

    # --- training ---------------------------------------------------------------------------------------------------

    def evaluate(self, inputs: PolicyInputs, token_ids: torch.Tensor, temperature: float = 1.0,
                 model: nn.Module | None = None) -> EvalResult:
        """Per-token log-probs and entropy of given action tokens, and values, in one batched forward (with grad)."""
        model = model or self
        inputs = inputs.to(self.device)
        token_ids = token_ids.to(self.device)
        if self.config.is_oft:
            out = model(inputs)
        else:
            out = model(inputs, action_ids=token_ids)
        log_probs_all = torch.log_softmax(out.action_logits / temperature, dim=-1)
        local = self.action_tokenizer.token_ids_to_local(token_ids)
        log_probs = log_probs_all.gather(-1, local.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_probs_all.exp() * log_probs_all).sum(-1)
        return EvalResult(log_probs, entropy, out.values, out.action_logits)
