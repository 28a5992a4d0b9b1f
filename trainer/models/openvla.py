"""OpenVLA and OpenVLA-OFT, written from the facts in OPENVLA_SPEC (no remote code).

Module names reproduce the released checkpoint's parameter names exactly:
``vision_backbone.featurizer.*`` (DINOv2 ViT-L/14 + 4 registers), ``vision_backbone.fused_featurizer.*`` (SigLIP
SO400M/14), ``projector.fc{1,2,3}.*``, ``language_model.*`` (transformers' LlamaForCausalLM); OFT adds
``proprio_projector.fc{1,2}.*`` and ``action_head.model.*``, which the OFT release ships as separate files.

Sequence layout. Every sample is laid out as

    [BOS] [image patches] [proprio (OFT)] [PAD ... PAD] [prompt after BOS] [space] [actions]

Padding sits between the fixed-size multimodal prefix and the prompt, so all sequences of a batch end at the same
index: the action positions are one slice for the whole batch. Position ids are the running count of real tokens,
so a padded sample gets exactly the positions (and, since pads are masked, exactly the outputs) it gets alone.

One entry point, ``forward``, serves everything (prefill, cached decoding steps, the training forward); wrappers such
as DDP, FSDP2 and PEFT only see calls of the top module's forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

from trainer.models.config import VLAConfig


class LayerScale(nn.Module):
    """timm's LayerScale with the parameter named ``scale_factor``, as in the HF port (transformers renames gamma)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.scale_factor = nn.Parameter(init.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


def create_vit(model_id: str, overrides: dict) -> nn.Module:
    vit = timm.create_model(model_id, pretrained=False, num_classes=0, **overrides)
    for block in vit.blocks:
        for name in ("ls1", "ls2"):
            layer = getattr(block, name)
            if isinstance(layer, timm.layers.LayerScale):
                setattr(block, name, LayerScale(layer.gamma))
    return vit


def vit_patch_features(vit: nn.Module, images: torch.Tensor, checkpointing: bool = False,
                       reentrant: bool = False) -> torch.Tensor:
    """Output of the second-to-last block, prefix tokens (CLS, registers) dropped; the last block is never run.
    `reentrant`: the reentrant form of the block checkpoints (see OpenVLA.gradient_checkpointing_enable)."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    for block in vit.blocks[:-1]:
        if checkpointing and x.requires_grad:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=reentrant)
        else:
            x = block(x)
    return x[:, vit.num_prefix_tokens:]


def compile_blocks_for_training(model: OpenVLA) -> int:
    """torch.compile each ViT block and language-model decoder layer, for forwards that build a graph (the update):
    an eager block launches each small op (norms, LoRA's two thin matmuls, residuals) on its own, and the update with
    LoRA on the towers is launch-bound (issue #13). Forwards without gradients (rollouts, evaluation, the reference
    policy, the CUDA-graph decode) keep the eager blocks, so their numbers and graph capture stay as they were,
    unless `model.compiled_inference` is set (VLAPolicy.compiled_acting: OpenVLA-OFT's rollouts, one forward per
    chunk and no cache). Blocks of one class share one compiled code object; returns how many blocks were wrapped."""
    blocks = [*model.vision_backbone.featurizer.blocks, *model.vision_backbone.fused_featurizer.blocks,
              *model.language_model.model.layers]
    # A class's code object is recompiled for each tower's shapes, for a first block whose input needs no gradient,
    # and for prompt lengths and micro-batch sizes (then with dynamic shapes); past the limit dynamo runs eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    torch._dynamo.config.suppress_errors = True  # a block that fails to compile runs eagerly (with a warning)
    model.compiled_inference = False
    for block in blocks:
        eager = block.forward
        block.training_forward = torch.compile(eager)

        def forward(*args, _eager=eager, _block=block, **kwargs):
            compiled = torch.is_grad_enabled() or model.compiled_inference
            return (_block.training_forward if compiled else _eager)(*args, **kwargs)

        block.forward = forward
    return len(blocks)


class FusedVisionBackbone(nn.Module):
    def __init__(self, config: VLAConfig):
        super().__init__()
        dino_id, siglip_id = config.timm_model_ids
        dino_kwargs, siglip_kwargs = config.trainer.timm_model_kwargs
        self.featurizer = create_vit(dino_id, {"img_size": config.image_size, **dino_kwargs})
        self.fused_featurizer = create_vit(siglip_id, {"img_size": config.image_size, **siglip_kwargs})
        self.embed_dim = self.featurizer.embed_dim + self.fused_featurizer.embed_dim
        self.gradient_checkpointing = False
        self.reentrant_checkpointing = False

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 6, S, S] (DINOv2-normalised channels, then SigLIP-normalised) -> [N, patches, 2176]."""
        checkpointing, reentrant = self.gradient_checkpointing, self.reentrant_checkpointing
        dino = vit_patch_features(self.featurizer, pixel_values[:, :3], checkpointing, reentrant)
        siglip = vit_patch_features(self.fused_featurizer, pixel_values[:, 3:], checkpointing, reentrant)
        return torch.cat([dino, siglip], dim=2)


class Projector(nn.Module):
    """no-align+fused-gelu-mlp: 2176 -> 4·2176 -> 4096 -> 4096 with exact GELU between."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class ProprioProjector(nn.Module):
    def __init__(self, proprio_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(proprio)))


class MLPResNetBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.mlp_resnet_blocks = nn.ModuleList([MLPResNetBlock(hidden_dim) for _ in range(num_blocks)])
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    """OFT's continuous head: the 7 hidden states of one timestep, concatenated, -> 7 normalised action values."""

    def __init__(self, llm_dim: int, action_dim: int):
        super().__init__()
        self.action_dim = action_dim
        self.model = MLPResNet(num_blocks=2, input_dim=llm_dim * action_dim, hidden_dim=llm_dim,
                               output_dim=action_dim)

    def forward(self, action_hidden: torch.Tensor) -> torch.Tensor:
        batch, slots, dim = action_hidden.shape
        return self.model(action_hidden.reshape(batch, slots // self.action_dim, self.action_dim * dim))


@dataclass
class VLAOutput:
    action_logits: torch.Tensor  # [B, n_positions, n_bins]: logits over the action vocabulary
    value_hidden: torch.Tensor | None  # [B, H]: hidden state just before the first action token
    action_hidden: torch.Tensor | None = None  # [B, 56, H] (OFT): inputs of the L1 head
    past_key_values: DynamicCache | None = None
    attention_mask: torch.Tensor | None = None  # 2-D mask of the cached sequence (for decoding)
    next_position: torch.Tensor | None = None  # [B] position id of the next token (for decoding)
    values: torch.Tensor | None = None  # [B], filled by the policy's value head
    l1_actions: torch.Tensor | None = None  # [B, chunk, 7] normalised actions from OFT's L1 head, when asked for
    # [B, n_positions, vocab] logits over the whole vocabulary (model dtype), when asked for: the official greedy
    # decode takes its argmax there, not over the action ids only
    vocab_logits: torch.Tensor | None = None


class OpenVLA(nn.Module):
    def __init__(self, config: VLAConfig):
        super().__init__()
        self.config = config
        self.vision_backbone = FusedVisionBackbone(config)
        llm_config = LlamaConfig(**{k: v for k, v in config.text_config.items() if k not in ("model_type",)})
        llm_config._attn_implementation = "sdpa"
        llm_dim = llm_config.hidden_size
        self.projector = Projector(self.vision_backbone.embed_dim, llm_dim)
        self.language_model = LlamaForCausalLM(llm_config)
        self.action_dim = config.trainer.action_dim
        self.first_action_id = config.base_vocab_size - config.n_action_bins
        if config.is_oft:
            oft = config.trainer.oft
            self.proprio_projector = ProprioProjector(oft.proprio_dim, llm_dim) if oft.use_proprio else None
            self.action_head = L1RegressionActionHead(llm_dim, self.action_dim) if oft.use_l1_head else None
            self.num_action_slots = oft.chunk_size * self.action_dim
        else:
            self.proprio_projector = None
            self.action_head = None
            self.num_action_slots = self.action_dim
        self.reentrant_checkpointing = False  # set by gradient_checkpointing_enable for an int8 language model
        self.checkpointing_enabled = False  # gradient_checkpointing_enable / _disable

    # PEFT's "all-linear" leaves the output layer alone when the model names it.
    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.lm_head

    def gradient_checkpointing_enable(self, reentrant: bool = False) -> None:
        """Recompute every decoder layer and tower block in the backward instead of keeping its activations.

        Call it after `quantize_int8`. An int8 language model gets the reentrant form: bitsandbytes' MatMul8bitLt
        keeps an fp16 copy of its input as an attribute of its autograd context (not through save_for_backward),
        which the non-reentrant checkpoint cannot release, so every layer's inputs would stay alive for the whole
        forward (measured: docs/benchmarks.md). The reentrant form runs the forward under no_grad: no context at all.
        `reentrant=True` asks for that form anyway (DeepSpeed ZeRO-3 prefetches parameters only with it, see
        trainer/engine.py)."""
        int8 = any(type(m).__name__ == "Linear8bitLt" for m in self.language_model.modules())
        self.reentrant_checkpointing = reentrant or int8
        self.checkpointing_enabled = True
        self.vision_backbone.reentrant_checkpointing = self.reentrant_checkpointing
        kwargs = {"use_reentrant": self.reentrant_checkpointing}
        if hasattr(self.language_model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
            self.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.vision_backbone.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        """Undo `gradient_checkpointing_enable` (the benchmark measures the update both ways in one process)."""
        if hasattr(self.language_model, "activation_checkpointing_disable"):
            self.language_model.activation_checkpointing_disable()
        else:
            self.language_model.gradient_checkpointing_disable()
        self.vision_backbone.gradient_checkpointing = False
        self.vision_backbone.reentrant_checkpointing = False
        self.reentrant_checkpointing = False
        self.checkpointing_enabled = False

    def _language_model_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """The reentrant checkpoint only back-propagates into a layer whose input needs a gradient: with LoRA on the
        language model alone (nothing trainable before it), the input embeddings must ask for one."""
        needs_flag = self.reentrant_checkpointing and self.training and torch.is_grad_enabled()
        return inputs.detach().requires_grad_() if needs_flag and not inputs.requires_grad else inputs

    # --- pieces ---------------------------------------------------------------------------------------------------

    def _logits(self, hidden: torch.Tensor, full_vocabulary: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits over the action ids (float32) and, when asked for, over the whole vocabulary (model dtype)."""
        logits = self.language_model.lm_head(hidden)
        action_logits = logits[..., self.first_action_id: self.first_action_id + self.config.n_action_bins].float()
        return action_logits, (logits if full_vocabulary else None)

    def _prefix_embeddings(self, pixel_values: torch.Tensor, proprio: torch.Tensor | None) -> torch.Tensor:
        """[BOS] + patches of every view (+ proprio token): [B, 1 + n_img·P (+1), H]."""
        batch = pixel_values.shape[0]
        views = pixel_values.reshape(batch * self.config.num_images, 6, *pixel_values.shape[-2:])
        patches = self.projector(self.vision_backbone(views))
        patches = patches.reshape(batch, -1, patches.shape[-1])
        embed = self.language_model.get_input_embeddings()
        bos = embed(torch.full((batch, 1), self.language_model.config.bos_token_id, device=patches.device))
        parts = [bos, patches.to(bos.dtype)]
        if self.proprio_projector is not None:
            if proprio is None:
                raise ValueError("this OpenVLA-OFT model uses proprio: pass the normalised proprio state")
            parts.append(self.proprio_projector(proprio.to(bos.dtype)).unsqueeze(1))
        return torch.cat(parts, dim=1)

    # --- the one entry point --------------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        proprio: torch.Tensor | None = None,
        action_ids: torch.Tensor | None = None,
        use_cache: bool = False,
        decode_ids: torch.Tensor | None = None,
        past_key_values: DynamicCache | None = None,
        attention_mask: torch.Tensor | None = None,
        next_position: torch.Tensor | None = None,
        with_l1_actions: bool = False,
        full_vocabulary: bool = False,
    ) -> VLAOutput:
        """Three calls, all through here:

        * prefill / training: ``pixel_values`` [B, 6·n_img, S, S], ``text_ids``/``text_mask`` [B, T] (the prompt after
          BOS plus the space token, left-padded), ``proprio`` [B, 8] (OFT), and for OpenVLA optionally
          ``action_ids`` [B, 7] (teacher forcing: logits at the 7 positions that predict them);
        * a cached decoding step (OpenVLA): ``decode_ids`` [B, 1] with the cache, mask and position of the last call.

        ``full_vocabulary`` adds the logits over the whole vocabulary (``vocab_logits``), for the official greedy decode.
        """
        if decode_ids is not None:
            return self._decode_step(decode_ids, past_key_values, attention_mask, next_position, full_vocabulary)
        prefix = self._prefix_embeddings(pixel_values, proprio)
        batch, prefix_len = prefix.shape[:2]
        embed = self.language_model.get_input_embeddings()
        text = embed(text_ids)
        mask = torch.cat([torch.ones(batch, prefix_len, dtype=text_mask.dtype, device=text_mask.device), text_mask], 1)
        if self.config.is_oft:
            return self._forward_parallel(prefix, text, mask, with_l1_actions, full_vocabulary)
        parts, n_actions = [prefix, text], 0
        if action_ids is not None:
            parts.append(embed(action_ids))
            n_actions = action_ids.shape[1]
            mask = torch.cat([mask, torch.ones_like(action_ids, dtype=mask.dtype)], dim=1)
        inputs = self._language_model_inputs(torch.cat(parts, dim=1))
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache() if use_cache else None
        out = self.language_model.model(
            inputs_embeds=inputs, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=use_cache
        )
        hidden = out.last_hidden_state
        # The hidden state at the space token predicts the first action; with teacher forcing, the next 6 as well.
        first = hidden.shape[1] - 1 - n_actions
        predicting = hidden[:, first: first + max(n_actions, 1)]
        action_logits, vocab_logits = self._logits(predicting, full_vocabulary)
        return VLAOutput(
            action_logits=action_logits,
            vocab_logits=vocab_logits,
            value_hidden=hidden[:, first],
            past_key_values=out.past_key_values if use_cache else None,
            attention_mask=mask,
            next_position=positions[:, -1] + 1,
        )

    def _decode_step(self, ids, cache, mask, next_position, full_vocabulary: bool = False) -> VLAOutput:
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=mask.device)], dim=1)
        out = self.language_model.model(
            inputs_embeds=self.language_model.get_input_embeddings()(ids), attention_mask=mask,
            position_ids=next_position[:, None], past_key_values=cache, use_cache=True,
        )
        step = self._decoding_output(out.last_hidden_state, full_vocabulary)
        step.past_key_values, step.attention_mask, step.next_position = out.past_key_values, mask, next_position + 1
        return step

    def static_decode_step(self, ids: torch.Tensor, cache, mask: torch.Tensor, position: torch.Tensor) -> VLAOutput:
        """A decoding step on fixed buffers (trainer.models.decoding.StaticDecoder): ``ids``/``position`` [B, 1],
        ``mask`` [B, 1, 1, L] bool (True: attend), ``cache`` a StaticKVCache whose ``slot`` the token is written at.
        Device-side state only (the slot is unmasked and then advanced, the positions advanced, on the device), so the
        step can be captured in a CUDA graph. The same function as ``_decode_step`` on the dynamic cache (action
        logits only: the official whole-vocabulary greedy decode runs on the dynamic cache)."""
        mask.index_fill_(3, cache.slot, True)
        out = self.language_model.model(
            inputs_embeds=self.language_model.get_input_embeddings()(ids), attention_mask=mask, position_ids=position,
            past_key_values=cache, use_cache=True,
        )
        cache.slot.add_(1)
        position.add_(1)
        return self._decoding_output(out.last_hidden_state)

    def _decoding_output(self, hidden: torch.Tensor, full_vocabulary: bool = False) -> VLAOutput:
        """What one decoding step gives the action choice (shared by the dynamic and the static step)."""
        action_logits, vocab_logits = self._logits(hidden, full_vocabulary)
        return VLAOutput(action_logits=action_logits, vocab_logits=vocab_logits, value_hidden=None)

    def _forward_parallel(self, prefix, text, mask, with_l1_actions: bool, full_vocabulary: bool) -> VLAOutput:
        """OFT: all action slots in one bidirectional forward; empty (zero) embeddings at the slots, then </s> (left
        out for checkpoints trained without it: RLinf's OFT port)."""
        batch, slots = prefix.shape[0], self.num_action_slots
        embed = self.language_model.get_input_embeddings()
        empty_slots = torch.zeros(batch, slots, prefix.shape[-1], dtype=prefix.dtype, device=prefix.device)
        parts = [prefix, text, empty_slots]
        if self.config.trainer.oft.stop_token:
            parts.append(embed(torch.full((batch, 1), self.config.trainer.stop_token_id, device=prefix.device)))
        tail = len(parts) - 3  # tokens after the last slot
        inputs = self._language_model_inputs(torch.cat(parts, dim=1))
        mask = torch.cat([mask, torch.ones(batch, slots + tail, dtype=mask.dtype, device=mask.device)], dim=1)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        # Bidirectional attention over every real token (OFT replaces the causal mask): additive 4-D mask, keys only.
        blocked = torch.finfo(inputs.dtype).min
        bidirectional = torch.zeros(batch, 1, inputs.shape[1], inputs.shape[1], dtype=inputs.dtype,
                                    device=inputs.device)
        bidirectional = bidirectional.masked_fill(~mask.bool()[:, None, None, :], blocked)
        hidden = self.language_model.model(
            inputs_embeds=inputs, attention_mask=bidirectional, position_ids=positions, use_cache=False
        ).last_hidden_state
        # Each slot is read from the state one position before it (next-token style): from the space token on.
        end = hidden.shape[1] - 1 - tail  # exclusive: the last slot's own state is not used
        action_hidden = hidden[:, end - slots: end]
        l1_actions = None
        if with_l1_actions:
            if self.action_head is None:
                raise ValueError("this model has no L1 action head (OFTConfig.use_l1_head is false)")
            l1_actions = self.action_head(action_hidden).float()
        action_logits, vocab_logits = self._logits(action_hidden, full_vocabulary)
        return VLAOutput(
            action_logits=action_logits, vocab_logits=vocab_logits, value_hidden=hidden[:, end - slots],
            action_hidden=action_hidden, l1_actions=l1_actions,
        )
