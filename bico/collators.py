"""Training batches: the BICO placeholder-mask denoising collator, the NTP collator, and the objective per step.

BICO (Lv et al., arXiv 2311.07468, section 4.2) trains with *autoregressive mask denoising*: some input
tokens are replaced by a placeholder that no query can attend to, and the ordinary shifted
causal-LM loss makes output i predict the original token at i + 1, but only where that token was
masked. Each training step is BICO or plain next-token prediction (NTP), 50/50 (section 4.3).

What differs from a masked-LM collator (e.g. `transformers.DataCollatorForLanguageModeling`):
    * no `[MASK]` token is added: the placeholder is an existing id (pad, else unk, else eos) and it
      is hidden from every query by `attention_mask` 0, exactly like padding;
    * no 80/10/10 split: every masked token becomes the placeholder;
    * labels sit at the masked positions themselves; the model's shift turns them into
      "output i predicts masked token i + 1", so position 0 is never masked (nothing predicts it).

Which tokens are masked is the schedule's choice (`bico.masking`: the paper's fixed rate, a uniform
rate per row as in MLM-U, or whole-word spans), optionally with whole entities on top
(`entity_mask_prob`, `bico.entities`); the masking names are importable from here too.

Collators take a list of examples `{"input_ids": list[int], ...}` (see `encode_rows`) and return
padded tensors. They use no Accelerate and no model, so they fit any training loop.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .masking import (  # noqa: F401  (the masking API stays importable from here)
    DEFAULT_MASK_PROB,
    IGNORE_INDEX,
    SCHEDULES,
    check_schedule,
    find_word_starts,
    mask_placeholders,
    maskable_positions,
    word_start_table,
)


def encode_rows(
    prompts: Sequence[str], completions: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[list[dict], int]:
    """Tokenize `prompt + completion` rows into training examples ending with EOS.

    The tokenizer adds its own special tokens (BOS for Llama-style tokenizers); EOS is appended here
    because Llama-style tokenizers never add it. The text is tokenized as one string, so the ids
    match what the model sees when it reads the prompt and writes the completion.

    Args:
        prompts (`Sequence[str]`), completions (`Sequence[str]`): One row each; completions usually
            start with a space.
        tokenizer (`PreTrainedTokenizerBase`): Needs an `eos_token_id`.
        max_length (`int`): Longer sequences (EOS included) are cut to this many tokens and then
            end without EOS.

    Returns:
        `tuple[list[dict], int]`: the examples `{"input_ids": list[int], "index": int, "prompt": str,
        "completion": str}` (`index` = row number, used to seed the row's masking; the texts serve
        collators that rewrite the row, e.g. `bico.reverse.ReverseCollator`) and how many rows were truncated.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("`tokenizer` has no `eos_token_id`; training sequences must end with EOS.")
    if max_length < 2:
        raise ValueError(f"`max_length` must be at least 2, got {max_length}.")
    texts = [prompt + completion for prompt, completion in zip(prompts, completions, strict=True)]
    examples, truncated = [], 0
    for index, ids in enumerate(tokenizer(texts)["input_ids"]):
        ids = list(ids) + [tokenizer.eos_token_id]
        if len(ids) > max_length:
            truncated += 1
            ids = ids[:max_length]
        examples.append({"input_ids": ids, "index": index, "prompt": prompts[index], "completion": completions[index]})
    return examples, truncated


def row_text(example: dict) -> str | None:
    """The text of an `encode_rows` example, `prompt + completion`; None when it carries no such strings."""
    prompt, completion = example.get("prompt"), example.get("completion")
    return prompt + completion if isinstance(prompt, str) and isinstance(completion, str) else None


def row_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for the randomness of one row in one epoch (e.g. which tokens BICO masks).

    Keyed on the row rather than on the batch or the process, so the masks do not depend on the
    batch size, the number of processes or whether the run was resumed.
    """
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def choose_objective(seed: int, step: int, p_bico: float = 0.5, objective: str = "bico") -> str:
    """The objective of one optimizer step: `objective` with probability `p_bico`, else `"ntp"`.

    Drawn from an RNG keyed on `(seed, step)` alone, so every process picks the same objective at the
    same step without communicating, and a resumed run repeats the sequence of the original one.

    Args:
        seed (`int`): The run's seed.
        step (`int`): The optimizer step (0-based; all micro-batches of one step share it).
        p_bico (`float`, *optional*, defaults to 0.5): Probability of `objective`; 0 gives pure NTP,
            1 pure `objective`.
        objective (`str`, *optional*, defaults to `"bico"`): The non-NTP objective of the mix
            (`"bico"`, or another registered objective such as `"abi"`).

    Returns:
        `str`: `objective` or `"ntp"`.
    """
    if not 0.0 <= p_bico <= 1.0:
        raise ValueError(f"`p_bico` must be in [0, 1], got {p_bico}.")
    # random.Random seeds a str through SHA-512: the same on every process, platform and Python run.
    draw = random.Random(f"objective/{seed}/{step}").random()  # in [0, 1)
    return objective if draw < p_bico else "ntp"


def pad_examples(examples: Sequence[dict], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad `input_ids` of `examples` into a batch.

    Returns:
        `tuple[torch.LongTensor, torch.LongTensor]`: `input_ids` and `attention_mask`, both (B, L)
        with L the longest example; `attention_mask` is 1 on tokens and 0 on padding.
    """
    if not examples:
        raise ValueError("`examples` is empty.")
    lengths = [len(example["input_ids"]) for example in examples]
    if min(lengths) == 0:
        raise ValueError("an example has empty `input_ids`.")
    input_ids = torch.full((len(examples), max(lengths)), pad_token_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros_like(input_ids)
    for row, (example, length) in enumerate(zip(examples, lengths)):
        input_ids[row, :length] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :length] = 1
    return input_ids, attention_mask


def _pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    # Padding is marked by attention_mask, so any id works; Llama-2/3 tokenizers have no pad token.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("`tokenizer` has neither `pad_token_id` nor `eos_token_id` to pad with.")
    return pad


class NtpCollator:
    """Next-token prediction batches: loss on every real token (prompt, completion and EOS).

    Args:
        tokenizer (`PreTrainedTokenizerBase`): Gives the pad id (pad, else eos).

    Calling it on a list of examples `{"input_ids": list[int]}` returns a dict of (B, L) LongTensors:
        `input_ids` (right-padded), `attention_mask` (0 on padding), `labels` (= `input_ids`, -100 on
        padding). The model's shift makes output i predict token i + 1.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.pad_token_id = _pad_token_id(tokenizer)

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_examples(examples, self.pad_token_id)
        # From the mask, not the id: the pad id may also be a real token (e.g. pad = eos).
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def default_placeholder_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The placeholder BICO writes over masked tokens: the pad id, else unk, else eos (no new vocabulary).

    The id hardly matters: a placeholder is hidden from every query as a key; only its own query reads it.
    """
    for token_id in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError("`tokenizer` has no pad, unk or eos token; pass `placeholder_id` explicitly.")


def _example_labels(examples: Sequence[dict], length: int) -> torch.Tensor | None:
    """The examples' own `labels`, right-padded with -100 to (B, `length`); `None` if none has any."""
    if all(example.get("labels") is None for example in examples):
        return None
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    for row, example in enumerate(examples):
        if example.get("labels") is None:
            labels[row, : len(example["input_ids"])] = torch.as_tensor(example["input_ids"])  # all of it may be masked
            continue
        if len(example["labels"]) != len(example["input_ids"]):
            raise ValueError(
                f"example {row} has {len(example['labels'])} `labels` for {len(example['input_ids'])} `input_ids`; "
                "they must have the same length."
            )
        labels[row, : len(example["labels"])] = torch.as_tensor(example["labels"], dtype=torch.long)
    return labels


class BicoCollator:
    """BICO placeholder-mask denoising batches (arXiv 2311.07468, section 4.2).

    Tokens are masked by `schedule` (see `bico.masking.mask_placeholders`; at least one per row): a
    masked token's id becomes `placeholder_id`, its `attention_mask` 0, and its label the original
    token; every other label is -100. BOS, EOS, pad, unk and any other special token are never
    masked, and neither is position 0. An example may carry its own `"labels"` (list[int], as long
    as `input_ids`): a token whose label is -100 there (e.g. a prompt token) is never masked, so it
    never becomes a target.

    Randomness: an example with a `"seed"` (int) draws its mask from a generator seeded with it (the
    training loop passes `row_seed(seed, epoch, index)`, which makes masks independent of batching
    and resumption); otherwise the collator's own generator, seeded with `seed`, is used in order.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): Gives the pad id, the special ids and, for `"span"`,
            the word starts.
        mask_prob (`float`, *optional*, defaults to 0.15): Masking rate of `"fixed"` (per token) and
            `"span"` (per word), in (0, 1].
        placeholder_id (`int`, *optional*): Defaults to `default_placeholder_id(tokenizer)` (pad, else
            unk, else eos).
        seed (`int`, *optional*, defaults to 0): Seeds the collator's own generator.
        never_mask (`Iterable[int]`, *optional*): Extra ids never masked, besides the tokenizer's special ids.
        schedule (`str`, *optional*, defaults to `"fixed"`): `"fixed"` (the paper's rule), `"uniform"`
            (a rate per row from U(`mask_min`, `mask_max`), MLM-U) or `"span"` (whole words in runs).
        mask_min (`float`, *optional*, defaults to 0.0), mask_max (`float`, *optional*, defaults to 1.0):
            The range of the `"uniform"` rate.
        entity_mask_prob (`float`, *optional*, defaults to 0.0): Probability of masking each entity of a
            row whole, on top of the schedule's mask (`bico.masking.mask_placeholders`); 0 keeps the
            schedule's masks bit for bit. Entities (`bico.entities`) are found in an example's
            `prompt + completion` when it has them, else in its decoded tokens; needs a fast tokenizer.
        entity_names (`Iterable[str]`, *optional*): Names that are entities wherever they occur, e.g.
            `bico.reverse.collect_names(train["completion"])`; capitalised runs are entities anyway.

    Calling it on a list of examples `{"input_ids": list[int]}` returns a dict of (B, L) LongTensors
    `input_ids`, `attention_mask`, `labels`. Run the forward inside `bico.bidirectional(model)`.

    Example:
        >>> collator = BicoCollator(tokenizer, mask_prob=0.15)
        >>> batch = collator([{"input_ids": [1, 57, 91, 23, 2]}])
        >>> with bico.bidirectional(model):
        ...     loss = model(**batch, use_cache=False).loss
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        mask_prob: float = DEFAULT_MASK_PROB,
        placeholder_id: int | None = None,
        seed: int = 0,
        never_mask: Iterable[int] = (),
        *,
        schedule: str = "fixed",
        mask_min: float = 0.0,
        mask_max: float = 1.0,
        entity_mask_prob: float = 0.0,
        entity_names: Iterable[str] = (),
    ):
        check_schedule(schedule, mask_prob, mask_min, mask_max, entity_mask_prob)
        self.mask_prob, self.schedule, self.mask_min, self.mask_max = mask_prob, schedule, mask_min, mask_max
        self.entity_mask_prob, self.entities = entity_mask_prob, None
        if entity_mask_prob > 0:
            from .entities import EntityFinder  # here: bico.entities imports bico.reverse, which imports this module

            self.entities = EntityFinder(tokenizer, entity_names)
        self.pad_token_id = _pad_token_id(tokenizer)
        self.placeholder_id = default_placeholder_id(tokenizer) if placeholder_id is None else placeholder_id
        if not 0 <= self.placeholder_id < len(tokenizer):
            raise ValueError(
                f"`placeholder_id` must be an existing token id in [0, {len(tokenizer)}), got {self.placeholder_id}."
            )
        self.special_ids = sorted({*tokenizer.all_special_ids, *never_mask})
        self.tokenizer = tokenizer
        # Built once: reading a 50k vocabulary per batch would cost more than the masking.
        self.word_table = word_start_table(tokenizer) if schedule == "span" else None
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_examples(examples, self.pad_token_id)
        generators = [
            torch.Generator().manual_seed(example["seed"]) if "seed" in example else self.generator
            for example in examples
        ]
        texts = [row_text(example) for example in examples]
        return self.mask_batch(input_ids, attention_mask, _example_labels(examples, input_ids.shape[1]), generators, texts)

    def mask_batch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        generators: Sequence[torch.Generator] | None = None,
        texts: Sequence[str | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Mask an already padded batch (either padding side), e.g. one a `transformers` collator made.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`), attention_mask (`torch.LongTensor` of shape `(B, L)`):
                The batch.
            labels (`torch.LongTensor` of shape `(B, L)`, *optional*): Its labels; a token labelled -100 is
                never masked.
            generators (`Sequence[torch.Generator]`, *optional*): One per row; the collator's own by default.
            texts (`Sequence[str | None]`, *optional*): Each row's text, where its entities are found; None
                decodes the row (see `bico.entities`). Used only with `entity_mask_prob` > 0.

        Returns:
            `dict[str, torch.Tensor]`: `input_ids`, `attention_mask`, `labels`, each (B, L) (see `mask_placeholders`).
        """
        maskable = maskable_positions(input_ids, attention_mask, self.special_ids, labels)
        word_starts = None
        if self.schedule == "span":
            word_starts = find_word_starts(input_ids, self.tokenizer, self.word_table, self.special_ids)
        generators = [self.generator] * len(input_ids) if generators is None else generators
        entities = None if self.entities is None else self.entities.batch_positions(input_ids, attention_mask, texts)
        return mask_placeholders(
            input_ids, attention_mask, maskable, self.placeholder_id, self.mask_prob, generators,
            schedule=self.schedule, mask_min=self.mask_min, mask_max=self.mask_max, word_starts=word_starts,
            entity_mask_prob=self.entity_mask_prob, entities=entities,
        )


def text_token_ids(tokenizer: PreTrainedTokenizerBase, text: str, name: str, single: bool = False, default: str | None = None) -> list[int]:
    """The ids of `text` tokenized alone, without special tokens; all existing, non-special tokens.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): The run's tokenizer.
        text (`str`): The text, e.g. a marker or a separator.
        name (`str`): The argument's name, for the error message.
        single (`bool`, *optional*, defaults to `False`): Require exactly one token.
        default (`str`, *optional*): The argument's default, named in the error message.

    Raises:
        `ValueError`: `text` gives no token, the unknown token, a special token, or (with `single`) more than one token.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if isinstance(text, str) else []
    tokens = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_ids)
    if not ids:
        problem = "maps to no token"
    elif tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        problem = f"maps to the unknown token {tokenizer.unk_token!r} ({tokens})"
    elif special.intersection(ids):
        problem = f"is a special token of the tokenizer ({tokens})"
    elif single and len(ids) > 1:
        problem = f"is {len(ids)} tokens {tokens}"
    else:
        return ids
    expected = "one existing token" if single else "existing tokens"
    raise ValueError(
        f"`{name}` {text!r} {problem}; it must be visible text that the tokenizer encodes, alone, as {expected}, "
        f"none of them special" + (f" (the default is {default!r})." if default is not None else ".")
    )
