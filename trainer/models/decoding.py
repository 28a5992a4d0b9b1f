"""Sampling noise, and standard OpenVLA's decoding steps at fixed shapes (static KV cache, optional CUDA graphs).

Sampling is Gumbel-max: token = argmax(log_softmax(logits / T) + g), g drawn i.i.d. from Gumbel(0, 1), is an exact
sample of softmax(logits / T). The noise is drawn up front on the CPU from seeded generators, so
- a rollout can give every episode its own stream: an env's actions do not depend on which other envs shared its
  batch (the pipelined rollout splits batches differently from the plain one and still acts the same);
- runs are reproducible for a fixed seed (the draws are the same on any device);
- choosing a token needs no device-to-host copy and no random-number call on the device: a decoding step stays
  capture-safe, and the whole act synchronises once, at the end.

Standard OpenVLA decodes 7 tokens per action: one prefill (towers and prompt), then 6 steps of one token. With
transformers' dynamic cache each step concatenates every layer's keys and values, and at batch 16 a step is about
1,500 kernel launches whose CPU cost exceeds their GPU time (docs/benchmarks.md, the act profile: 65% of the GPU
idle). `StaticDecoder` keeps the keys and values in preallocated buffers that each step writes at a slot index held
on the device, so a step has the same shapes and addresses every time: it runs eagerly (the CPU path, and the
reference) or as the replay of a CUDA graph captured once per batch-size bucket. A batch smaller than its bucket is
padded: the padded rows compute garbage that no real row ever reads (attention and matrix rows are independent).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import numpy as np
import torch

from trainer.models.openvla import OpenVLA, VLAOutput


def sampling_noise(generator: torch.Generator | None, shape: tuple[int, ...]) -> torch.Tensor:
    """Gumbel(0, 1) noise on the CPU (float32) from `generator` (None: torch's global generator).

    From uniforms u in [tiny, 1): g = -log(-log(u)) lies in [-4.5, 16.6]; the truncation of the tails changes a
    sample's probability by less than 1e-7.

    The logarithms are numpy's: torch runs a log of this size (an OFT act: 56 x 256 per env) on its intra-op
    threads, and in a rollout every core is busy stepping envs, so each call waited for descheduled threads:
    17 ms per env and act, 5.5 s of a 34 s OFT iteration on an H200 host (docs/benchmarks.md). numpy's run on the
    calling thread (about 0.05 ms)."""
    uniform = torch.rand(shape, generator=generator, dtype=torch.float32).numpy()
    np.maximum(uniform, np.finfo(np.float32).tiny, out=uniform)
    return torch.from_numpy(-np.log(-np.log(uniform)))


def bucket_sizes(max_batch: int) -> list[int]:
    """Batch sizes a decoder is shaped for: powers of two below `max_batch`, and `max_batch` itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch]


class StaticKVCache:
    """Preallocated keys and values [batch, kv heads, length, head dim] per layer. A decoding step writes its token at
    `slot` (a one-element device tensor that the step itself advances) and attends over the whole buffer; the mask
    hides the slots not written yet. Duck-types the one method of transformers' Cache that Llama attention calls
    (`update`); the model gets a ready 4-D mask, so transformers never asks the cache for mask sizes."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, num_kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slot = torch.zeros(1, dtype=torch.long, device=device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        rows = key_states.shape[0]
        keys, values = self.keys[layer_idx][:rows], self.values[layer_idx][:rows]
        keys.index_copy_(2, self.slot, key_states)
        values.index_copy_(2, self.slot, value_states)
        return keys, values

    def load(self, cache, rows: int) -> None:
        """Copy a prefill's dynamic cache (transformers' DynamicCache) into rows [0, rows) and slots [0, length)."""
        for index, layer in enumerate(cache.layers):
            length = layer.keys.shape[2]
            self.keys[index][:rows, :, :length].copy_(layer.keys)
            self.values[index][:rows, :, :length].copy_(layer.values)


class StaticDecoder:
    """The decoding steps of standard OpenVLA's `act` with a static cache, for batches of up to `max_batch` whose
    prefill (prefix + prompt) is at most `max_prefill` tokens long.

        decoder.start(prefill_output, batch)         # after the prefill: its cache, mask and positions
        out = decoder.step(token_ids)                # [batch, 1] ids in, out.action_logits [batch, 1, bins]

    `graphs=True` (CUDA only) captures one step per batch-size bucket in a CUDA graph, lazily, at the first `start`
    of that size; later steps are graph replays. A graph holds the addresses of the weights it read: build the
    decoder inside the weight state it will act with (after any merge of the adapters or gathering of sharded
    weights) and drop it when that state ends (`weights_version` says which state it was built in).

    `autocast_dtype`: the dtype fp32 LoRA adapters compute in (VLAPolicy.adapters_in_base_dtype). Graphs are
    captured with autocast's weight cache off, so that the casts of the adapter weights are part of the graph and a
    replay reads the live weights, not copies cached at capture time.
    """

    def __init__(self, model: OpenVLA, max_batch: int, max_prefill: int, *, graphs: bool = False,
                 autocast_dtype: torch.dtype | None = None, weights_version: int = 0):
        text = model.language_model.config
        embed = model.language_model.get_input_embeddings().weight
        self.device, self.dtype = embed.device, embed.dtype
        if graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {self.device}")
        self.model = model
        self.graphs = graphs
        self.autocast_dtype = autocast_dtype
        self.weights_version = weights_version
        self.decode_steps = model.action_dim - 1
        self.buckets = bucket_sizes(max_batch)
        # The prefill, the decoding steps, and one scratch slot that warm-up and capture write into; a multiple of 16
        # keys, so that SDPA's memory-efficient kernel takes the mask without padding it at every step.
        self.length = -(-(max_prefill + self.decode_steps + 1) // 16) * 16
        self.scratch_slot = self.length - 1
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.cache = StaticKVCache(text.num_hidden_layers, max_batch, text.num_key_value_heads, self.length,
                                   head_dim, self.dtype, self.device)
        self.mask = torch.zeros(max_batch, 1, 1, self.length, dtype=torch.bool, device=self.device)  # True: attend
        self.ids = torch.zeros(max_batch, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(max_batch, 1, dtype=torch.long, device=self.device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._graph_outputs: dict[int, VLAOutput] = {}
        self._size = self._rows = 0
        self.fallbacks = 0  # act calls whose batch or prompt did not fit, decoded with the dynamic cache instead
        self.capture_error: str | None = None  # why capturing failed (the decoder then runs its steps eagerly)

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def fits(self, batch: int, prefill_length: int) -> bool:
        return batch <= self.max_batch and prefill_length + self.decode_steps <= self.scratch_slot

    def bucket(self, batch: int) -> int:
        return next(size for size in self.buckets if size >= batch)

    def start(self, prefill: VLAOutput, batch: int) -> None:
        """Take over a prefill (its dynamic cache, 2-D mask and next positions) for the decoding steps that follow."""
        length = prefill.attention_mask.shape[1]
        if not self.fits(batch, length):
            raise ValueError(f"a batch of {batch} with a prefill of {length} tokens does not fit this decoder "
                             f"(up to {self.max_batch} rows and {self.scratch_slot - self.decode_steps} tokens)")
        size = self.bucket(batch)
        if self.graphs and size not in self._graphs:
            try:
                self._capture(size)
            except Exception as error:  # noqa: BLE001 -- a speed lever must not end a training run
                self.graphs, self.capture_error = False, f"{type(error).__name__}: {error}"
                torch.cuda.synchronize(self.device)
                warnings.warn(f"capturing a decoding step in a CUDA graph failed ({self.capture_error}); the static "
                              f"cache's steps run eagerly instead", stacklevel=3)
        self.cache.load(prefill.past_key_values, batch)
        self.mask[:size].fill_(False)
        self.mask[:batch, 0, 0, :length] = prefill.attention_mask.bool()
        self.position[:batch, 0] = prefill.next_position
        self.cache.slot.fill_(length)
        self._size, self._rows = size, batch

    def step(self, token_ids: torch.Tensor) -> VLAOutput:
        """One decoding step for the rows of the last `start`: logits of the next action token."""
        self.ids[: self._rows].copy_(token_ids)
        if self.graphs:
            self._graphs[self._size].replay()
            out = self._graph_outputs[self._size]
        else:
            out = self._step(self._size)
        return VLAOutput(action_logits=out.action_logits[: self._rows], value_hidden=None)

    def _step(self, size: int) -> VLAOutput:
        return self.model.static_decode_step(self.ids[:size], self.cache, self.mask[:size], self.position[:size])

    def _capture(self, size: int) -> None:
        """Warm up on a side stream (as CUDA graph capture requires), then capture one step of `size` rows. Both
        write at the scratch slot; `start` then overwrites the state they leave."""
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)
                    if self.autocast_dtype is not None else nullcontext())
        self.mask[:size].fill_(False)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), autocast:
            for _ in range(2):
                self.cache.slot.fill_(self.scratch_slot)
                self._step(size)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.cache.slot.fill_(self.scratch_slot)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), autocast:
            self._graph_outputs[size] = self._step(size)
        self._graphs[size] = graph
