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

import warnings
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from trainer.envs.base import Observation
from trainer.envs.preprocess import PreparedObservation, PrepareViews
from trainer.models.action_tokenizer import ActionTokenizer
from trainer.models.decoding import StaticDecoder, sampling_noise
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
    official_decode: bool = True  # greedy evaluation decodes as the official code does (LIBERO); the toy has no protocol


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
        self._adapters_merged = False  # inside merged_adapters
        self._weights_version = 0  # bumped when merged_adapters folds or restores weights (see static_decoder)

    # --- what this policy is (printed by training and in evaluation reports) ------------------------------------

    @property
    def eval_uses_l1_head(self) -> bool:
        """How greedy evaluation decodes an OFT model by default: with the L1 head when the checkpoint has one and was
        released that way (the official OpenVLA-OFT LIBERO evaluation), with the action tokens for a policy trained
        here on them (evaluated as it was trained)."""
        oft = self.config.trainer.oft
        return self.config.is_oft and oft.use_l1_head and not oft.trained_on_tokens

    def describe_actions(self, greedy: bool, use_l1_head: bool, temperature: float = 1.0, official: bool = True) -> str:
        if use_l1_head:
            return "L1 regression head (the official OpenVLA-OFT LIBERO evaluation)"
        if greedy and official:
            return "action tokens, argmax over the whole vocabulary (the official decode)"
        if greedy:
            return f"action tokens, argmax over the {self.config.n_action_bins} action ids (no official protocol)"
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
        greedy = self.describe_actions(True, self.eval_uses_l1_head, official=self.env.official_decode)
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
        """Model inputs of a batch of observations. Views that the env workers already put through this policy's
        image pipeline (`worker_transform`) are only stacked; raw frames go through the pipeline here."""
        views = []
        for obs in observations:
            if (isinstance(obs, PreparedObservation) and obs.pipeline == self.image_pipeline
                    and len(obs.views) == self.config.num_images):
                views.append(obs.views)
                continue
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

    def worker_transform(self) -> PrepareViews:
        """The observation transform for env workers (EnvPool's observation_transform) that runs this policy's image
        pipeline in the workers: `prepare` then only stacks the views (trainer/envs/preprocess.py)."""
        return PrepareViews(self.image_pipeline, self.config.num_images)

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
        autocast's cache casts each adapter weight once for the prefill and all decoding steps, not once per step.
        Off while the adapters are merged (`merged_adapters`): they do not run, and autocast would only add its
        dispatch cost to every op and fp32 casts around the towers' normalisation layers."""
        dtype = self._active_autocast_dtype()
        return nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def _active_autocast_dtype(self) -> torch.dtype | None:
        return None if self._adapters_merged else self.adapter_compute_dtype

    def _mergeable_lora_layers(self) -> list[nn.Module]:
        """The LoRA layers `merged_adapters` would merge (none when any of them cannot be merged exactly)."""
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.vla.modules() if isinstance(m, LoraLayer) and not m.merged and not m.disable_adapters]
        return layers if layers and _all_mergeable(layers, self.vla) else []

    def merge_copy_bytes(self) -> int:
        """Bytes of the base-weight copies `merged_adapters` keeps while merged (0: nothing would be merged)."""
        weights = [layer.get_base_layer().weight for layer in self._mergeable_lora_layers()]
        return sum(w.numel() * w.element_size() for w in weights)

    @contextmanager
    def compiled_acting(self, enabled: bool = True):
        """OpenVLA-OFT acts through the blocks compiled for the update (model.compile_blocks) inside this context:
        its act is one forward per chunk without a cache, which the compiled blocks serve as the update's forwards
        (fused kernels, fewer launches). A no-op for standard OpenVLA (its decode steps use a cache and CUDA graphs of
        the eager blocks) and where the blocks are not compiled. The actions equal the eager ones up to float
        rounding (tests/test_compile_blocks.py)."""
        model = self.base_model
        use = enabled and self.config.is_oft and hasattr(model, "compiled_inference")
        previous = getattr(model, "compiled_inference", False)
        if use:
            model.compiled_inference = True
        try:
            yield use
        finally:
            if use:
                model.compiled_inference = previous

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
        Under FSDP2 only inside the engine's rollout weights (every unit gathered: the merge writes into the gathered
        copies, never the shards); not for DeepSpeed modules (partitioned or owned by its engine). The
        `adapters_in_base_dtype` autocast is harmless while merged: the adapters are not called, and the base layers
        compute as they do unmerged.
        """
        layers = self._mergeable_lora_layers()
        if not layers:
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
            self._adapters_merged = True
            self._weights_version += 1
            yield
        finally:
            self._adapters_merged = False
            self._weights_version += 1
            with torch.no_grad(), torch.autocast(device_type, enabled=False):
                for layer, weight, original in originals:
                    if layer.merged:
                        layer.unmerge()  # resets PEFT's state; its bf16 arithmetic alone would drift
                    weight.copy_(original)

    # --- acting -----------------------------------------------------------------------------------------------------

    @staticmethod
    def _choose(logits: torch.Tensor, greedy: torch.Tensor, temperature: float, noise: torch.Tensor | None):
        """The action choice: per position, argmax (greedy rows) or a sample over the action vocabulary at
        `temperature`; returns local indices and their log-probs (the same function of the logits as `evaluate`).

        Sampling is Gumbel-max with the given noise (trainer.models.decoding.sampling_noise), an exact sample of
        softmax(logits / T) that needs no random-number call and no copy to the host here. `greedy` is a bool tensor
        [B]; `noise` matches `logits` (None when every row is greedy)."""
        log_probs = torch.log_softmax(logits / temperature, dim=-1)
        argmax = log_probs.argmax(-1)
        if noise is None:
            choice = argmax
        else:
            sampled = (log_probs + noise).argmax(-1)
            greedy_rows = greedy.view(-1, *([1] * (argmax.ndim - 1)))
            choice = torch.where(greedy_rows, argmax, sampled)
        return choice, log_probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1)

    def _choose_tokens(self, action_logits: torch.Tensor, greedy: torch.Tensor, temperature: float,
                       noise: torch.Tensor | None, vocab_logits: torch.Tensor | None = None):
        """Token ids and their log-probs per position (`_choose` over the action ids). With `vocab_logits` (the
        official greedy decode) greedy rows take the argmax over the whole vocabulary instead, with the log-prob under
        the whole-vocabulary softmax; sampled rows stay on the action ids."""
        local, log_probs = self._choose(action_logits, greedy, temperature, noise)
        token_ids = self.action_tokenizer.local_to_token_ids(local)
        if vocab_logits is None:
            return token_ids, log_probs
        vocab_log_probs = torch.log_softmax(vocab_logits.float() / temperature, dim=-1)
        vocab_argmax = vocab_log_probs.argmax(-1)
        rows = greedy.view(-1, *([1] * (vocab_argmax.ndim - 1)))
        vocab_chosen = vocab_log_probs.gather(-1, vocab_argmax.unsqueeze(-1)).squeeze(-1)
        return (torch.where(rows, vocab_argmax, token_ids),
                torch.where(rows, vocab_chosen.to(log_probs.dtype), log_probs))

    def sampling_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gumbel noise [batch, action positions, bins] for one act (CPU, from `generator`)."""
        return sampling_noise(generator, (batch, self.base_model.num_action_slots, self.config.n_action_bins))

    @torch.no_grad()
    def act(self, inputs: PolicyInputs, greedy=False, temperature: float = 1.0, model: nn.Module | None = None,
            use_l1_head: bool = False, generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
            decoder: StaticDecoder | None = None, official_greedy: bool = False) -> ActResult:
        """Actions for a batch. `greedy` is a bool or a bool tensor [B] (per-sample greedy, for epsilon-greedy).

        noise: Gumbel noise [B, action positions, bins] for the sampled rows (`sampling_noise`); a rollout draws it
            per episode, so that an env's actions do not depend on the batch it was in. Default: drawn here for the
            whole batch from `generator` (a CPU generator; None: torch's global one).
        decoder: a StaticDecoder (`static_decoder`) for standard OpenVLA's decoding steps; None: the dynamic cache.
        official_greedy: greedy steps decode as the official code (argmax over the whole vocabulary; module
            docstring), on the dynamic cache. For evaluation: the token ids it returns may lie outside the action
            range, which the update cannot train on.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
        batch = len(inputs)
        greedy = torch.as_tensor(greedy, dtype=torch.bool).expand(batch)
        if bool(greedy.all()):
            noise = None
        elif noise is None:
            noise = self.sampling_noise(batch, generator)
        elif noise.shape != (batch, self.base_model.num_action_slots, self.config.n_action_bins):
            raise ValueError(f"noise must have shape [{batch}, {self.base_model.num_action_slots}, "
                             f"{self.config.n_action_bins}], got {tuple(noise.shape)}")
        # Eval mode: no dropout, and the KV cache stays on (transformers drops it under gradient checkpointing). Only
        # switched when needed: switching visits every module (about 5,800 with LoRA on OpenVLA-7B, 20-50 ms of CPU
        # per act), and rollouts run in eval mode already.
        was_training = self.training
        if was_training:
            self.eval()
        try:
            with self.adapters_in_base_dtype():
                full_vocabulary = official_greedy and not use_l1_head and bool(greedy.any())
                return self._act(inputs, greedy, temperature, model or self, use_l1_head, noise, decoder,
                                 full_vocabulary)
        finally:
            if was_training:
                self.train()

    def _act(self, inputs, greedy, temperature, model, use_l1_head, noise, decoder, full_vocabulary) -> ActResult:
        inputs = inputs.to(self.device)
        greedy = greedy.to(self.device)
        noise = None if noise is None else noise.to(self.device, non_blocking=True)
        if self.config.is_oft:
            out = model(inputs, with_l1_actions=use_l1_head, full_vocabulary=full_vocabulary)
            token_ids, log_probs = self._choose_tokens(out.action_logits, greedy, temperature, noise, out.vocab_logits)
        else:
            out = model(inputs, use_cache=True, full_vocabulary=full_vocabulary)
            # The whole-vocabulary logits come from the dynamic steps only (OpenVLA.static_decode_step).
            static = (decoder is not None and not full_vocabulary
                      and decoder.fits(len(inputs), out.attention_mask.shape[1]))
            if static:
                self._check_decoder(decoder)
                decoder.start(out, len(inputs))
            elif decoder is not None and not full_vocabulary:
                decoder.fallbacks += 1
                if decoder.fallbacks == 1:
                    warnings.warn(f"a batch of {len(inputs)} with a prefill of {out.attention_mask.shape[1]} tokens "
                                  f"does not fit the static decoder: decoded with the dynamic cache (slower); give "
                                  f"static_decoder a larger max_batch / max_text_tokens", stacklevel=3)
            token_steps, log_prob_steps = [], []
            step = out
            for index in range(self.config.trainer.action_dim):
                vocab_logits = None if step.vocab_logits is None else step.vocab_logits[:, -1]
                ids, log_prob = self._choose_tokens(step.action_logits[:, -1], greedy, temperature,
                                                    None if noise is None else noise[:, index], vocab_logits)
                token_steps.append(ids)
                log_prob_steps.append(log_prob)
                if index + 1 < self.config.trainer.action_dim:
                    if static:
                        step = decoder.step(ids[:, None])
                    else:
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

    def static_decoder(self, max_batch: int, graphs: bool = False, max_text_tokens: int = 64) -> StaticDecoder | None:
        """A StaticDecoder for acting on batches of up to `max_batch` with prompts of up to `max_text_tokens` tokens
        (longer ones fall back to the dynamic cache), or None for OpenVLA-OFT (no decoding steps).

        Build it inside the weight state it will act with (e.g. inside `merged_adapters`): CUDA graphs hold the
        addresses of what they read, and `act` refuses a decoder built in another state."""
        if self.config.is_oft:
            return None
        base = self.base_model
        prefix = 1 + self.config.num_images * base.vision_backbone.featurizer.patch_embed.num_patches
        return StaticDecoder(base, max_batch, prefix + max_text_tokens, graphs=graphs,
                             autocast_dtype=self._active_autocast_dtype(), weights_version=self._weights_version)

    def _check_decoder(self, decoder: StaticDecoder) -> None:
        if decoder.weights_version != self._weights_version or decoder.model is not self.base_model:
            raise RuntimeError("this StaticDecoder was built for another model or weight state (adapters merged or "
                               "restored since); build a new one with policy.static_decoder() inside the current state")

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
