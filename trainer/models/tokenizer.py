"""Text tokenizers: the checkpoint's own (Llama-2 SentencePiece for OpenVLA), or a tiny character tokenizer.

The tiny tokenizer is laid out like Llama-2's so that all code paths are the same: <unk>=0, <s>=1, </s>=2, the
word-boundary piece "▁"=3 (Llama's 29871), characters, whole words of the prompt template and the toy task (built
from characters by BPE merges, so a prompt is ~20 tokens as with Llama rather than ~70 characters; unknown words
fall back to characters), filler up to the base vocabulary (whose last 256 ids are the action tokens, as in OpenVLA),
and <PAD> as an added token right after the base vocabulary.
"""

from __future__ import annotations

import string
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPACE_PIECE = "▁"
# Words of OpenVLA's prompt template and of the toy task's instructions, each a single token of the tiny vocabulary.
TINY_WORDS = ["▁In", "▁What", "▁action", "▁should", "▁the", "▁robot", "▁take", "▁to", "Out", "▁move", "▁red",
              "▁green", "▁blue", "▁target", "▁pick", "▁up", "▁put", "▁place", "▁on", "▁in", "▁and", "▁open",
              "▁close", "▁bowl", "▁plate"]


def _merges_for(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that build each word left to right from its characters (every prefix becomes a token)."""
    merges = []
    for word in words:
        for end in range(2, len(word) + 1):
            merge = (word[: end - 1], word[end - 1])
            if merge not in merges:
                merges.append(merge)
    return merges


def build_tiny_tokenizer(base_vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<unk>", "<s>", "</s>"]
    characters = [SPACE_PIECE] + list(string.ascii_lowercase + string.ascii_uppercase + string.digits) + list(
        string.punctuation + "\n"
    )
    merges = _merges_for(TINY_WORDS)
    pieces = specials + characters + [a + b for a, b in merges]
    n_action_tokens = 256
    if len(pieces) > base_vocab_size - n_action_tokens:
        raise ValueError(f"base_vocab_size {base_vocab_size} leaves no room for {len(pieces)} text pieces")
    pieces += [f"<extra_{i}>" for i in range(base_vocab_size - len(pieces))]
    vocab = {piece: i for i, piece in enumerate(pieces)}

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE_PIECE, prepend_scheme="first", split=False)
    backend.decoder = decoders.Metaspace(replacement=SPACE_PIECE, prepend_scheme="first", split=False)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side="right",
        model_max_length=512,
    )
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    return tokenizer


def load_tokenizer(checkpoint_dir: str | Path):
    """The checkpoint's tokenizer, from its own files only (no hub)."""
    try:
        return AutoTokenizer.from_pretrained(str(checkpoint_dir), local_files_only=True)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"no usable tokenizer files in {checkpoint_dir} (expected tokenizer.json or tokenizer.model with "
            f"tokenizer_config.json, as in the released OpenVLA checkpoints): {error}"
        ) from error
