"""Models from scratch: a locally trained byte-level BPE tokenizer and a small Llama config.

No machine of this project reaches a model hub (DESIGN.md section 5), so the default run builds its
own model: a byte-level BPE tokenizer trained with `tokenizers` on the training text, and a small
`LlamaForCausalLM` with random weights. Both are written with `save_pretrained`, so everything
downstream loads them through the same `from_pretrained` path a user takes with real Llama weights.

The tokenizer behaves like Llama's: the post-processor prepends `<s>` (BOS) and never appends
`</s>` (EOS); the training data code appends EOS itself. Special token ids are fixed:
`<pad>` = 0, `<s>` = 1, `</s>` = 2, `<unk>` = 3.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
# The order fixes the ids: <pad>=0, <s>=1, </s>=2, <unk>=3.
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]
# 4 special tokens + the 256 byte symbols of the byte-level alphabet.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`, with Llama-like special tokens.

    Every byte has a symbol, so any string can be encoded and `<unk>` never occurs; it exists only
    so that code expecting an unk token finds one. Training is deterministic: the same texts and
    `vocab_size` give the same vocabulary and merges, in any process.

    Args:
        texts (`Iterable[str]`):
            The training text, e.g. `prompt + completion` of every training row.
        vocab_size (`int`, *optional*, defaults to 4096):
            Upper bound on the vocabulary, special tokens and the 256 byte symbols included. The
            result is smaller when the text has fewer distinct merges. At least 260.

    Returns:
        `PreTrainedTokenizerFast`: `<pad>` = 0, `<s>` = 1 (BOS, prepended to every encoded
        sequence), `</s>` = 2 (EOS, never added automatically), `<unk>` = 3; `padding_side="right"`.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"`vocab_size` must be at least {MIN_VOCAB_SIZE} (4 special tokens + 256 bytes), got {vocab_size}."
        )
    texts = list(texts)
    if not texts:
        raise ValueError("`texts` is empty: the tokenizer needs some training text.")

    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    # add_prefix_space=False keeps " Name" (with its space, as in every completion) and "Name" at
    # the start of a prompt as different tokens, as GPT-2 and Llama-3 tokenizers do.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            # Like Llama: BOS in front of each sequence, no EOS.
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="right",
    )


def small_llama_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 256,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 4,
    intermediate_size: int = 688,
    max_position_embeddings: int = 512,
    **kwargs,
) -> LlamaConfig:
    """A small `LlamaConfig` whose vocabulary and special ids match `tokenizer`.

    The defaults are the 4.5M-parameter model of DESIGN.md section 6 (with a ~2.7k vocabulary),
    which shows the reversal curse and BICO's cure within minutes on 2 CPU cores.

    Args:
        tokenizer (`PreTrainedTokenizerFast`):
            Gives `vocab_size` (`len(tokenizer)`) and `bos_token_id` / `eos_token_id` / `pad_token_id`.
        hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size,
        max_position_embeddings (`int`):
            As in `LlamaConfig`; defaults 256, 4, 4, 4, 688, 512.
        kwargs:
            Any other `LlamaConfig` field, e.g. `tie_word_embeddings=True` or `rope_theta`; may also
            override the fields taken from the tokenizer (e.g. a `vocab_size` padded to a multiple of 64).
    """
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    fields.update(kwargs)
    return LlamaConfig(**fields)


def build_scratch_model(
    texts: Iterable[str],
    output_dir: str | os.PathLike,
    seed: int = 0,
    vocab_size: int = 4096,
    **config_kwargs,
) -> Path:
    """Train a tokenizer on `texts`, build a random small Llama and save both to `output_dir`.

    Load the result with `AutoTokenizer.from_pretrained(output_dir)` and
    `AutoModelForCausalLM.from_pretrained(output_dir)`.

    Args:
        texts (`Iterable[str]`):
            Tokenizer training text (the training rows' `prompt + completion`).
        output_dir (`str` or `os.PathLike`):
            Created if missing; receives `config.json`, the weights and the tokenizer files.
        seed (`int`, *optional*, defaults to 0):
            Seeds the weight initialisation; the same seed and texts give identical weights.
        vocab_size (`int`, *optional*, defaults to 4096):
            Passed to `train_tokenizer`.
        config_kwargs:
            Passed to `small_llama_config` (e.g. `hidden_size=32, num_hidden_layers=2`).

    Returns:
        `Path`: `output_dir`.
    """
    output_dir = Path(output_dir)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    config = small_llama_config(tokenizer, **config_kwargs)
    # nn.Module init draws from the global RNG: seed it for this model only and restore the caller's
    # RNG state afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    model.save_pretrained(output_dir)
    return output_dir
