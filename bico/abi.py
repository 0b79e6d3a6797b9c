"""GLM autoregressive blank infilling (ABI): the special tokens and the training collator.

The BICO paper (Lv et al., arXiv 2311.07468, section 5) compares against GLM (Du et al., ACL 2022,
section 2.1), whose blank-infilling objective resists the reversal curse by design. This module
builds that objective for any causal LM; `bico.abi_generation` holds the matching inference.

    * Spans: lengths from Poisson(3) restricted to 1..39, drawn until at least 15% of the tokens are
      covered, placed at random with no two spans overlapping or touching (`bico.abi_spans`).
    * Part A: the text with each span replaced by one `[MASK]`. Part B: the spans in shuffled order,
      each read as `[START] span` and predicted left to right, ending with `[END]`. Loss only on Part B.
    * Attention: Part A attends to all of Part A and to none of Part B; Part B attends to all of Part
      A and causally within Part B.

What differs from stock Llama training: the collator's Llama format gives one position id per token
(Part B tokens take their `[MASK]`'s index plus the offset inside the span) and a 4D boolean mask; run
the forward inside `bico.bidirectional(model)` so that Part A's bidirectional block uses the
bidirectional RoPE of the patch (a key ahead of its query is seen as if it were behind). The native
GLM format (`position_ids` (B, 2, L) and a separation index) is for THUDM GLM remote-code checkpoints.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from .abi_spans import (  # noqa: F401  (sample_spans and span_length_distribution are public here too)
    DEFAULT_MASK_RATIO, DEFAULT_MAX_SPAN, DEFAULT_POISSON_LAMBDA, check_sampler_args, sample_spans, span_length_distribution,
)


IGNORE_INDEX = -100  # labels with this value carry no loss (the HF convention)
OBJECTIVE = "abi"  # the value of `config.bico_objective` for ABI-trained models
MASK_TOKEN, START_TOKEN, END_TOKEN = "[MASK]", "[START]", "[END]"
# Names the same roles have in native GLM tokenizers (`sop` / `eop`); found before adding new tokens.
START_ALIASES = (START_TOKEN, "<|startofpiece|>")
END_ALIASES = (END_TOKEN, "<|endofpiece|>")
FORMATS = ("llama", "glm")


class AbiTokens(NamedTuple):
    """The ids of the three blank-infilling tokens."""

    mask_token_id: int
    start_token_id: int
    end_token_id: int


def _find_token(tokenizer: PreTrainedTokenizerBase, names: Sequence[str | None]) -> int | None:
    vocab = tokenizer.get_vocab()
    for name in names:
        if name is not None and name in vocab:
            return vocab[name]
    return None


def abi_token_ids(tokenizer: PreTrainedTokenizerBase) -> AbiTokens:
    """The ids of `[MASK]`, `[START]` and `[END]` in `tokenizer` (native GLM names accepted).

    Raises:
        ValueError: a token is missing; `add_abi_tokens(tokenizer, model)` adds them.
    """
    found = {
        MASK_TOKEN: _find_token(tokenizer, (tokenizer.mask_token, MASK_TOKEN)),
        START_TOKEN: _find_token(tokenizer, START_ALIASES),
        END_TOKEN: _find_token(tokenizer, END_ALIASES),
    }
    missing = [name for name, token_id in found.items() if token_id is None]
    if missing:
        raise ValueError(
            f"`tokenizer` has no {', '.join(missing)} token; call `bico.abi.add_abi_tokens(tokenizer, model)` "
            "before building ABI batches."
        )
    return AbiTokens(*found.values())


def add_abi_tokens(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module | None = None) -> AbiTokens:
    """Add `[MASK]`, `[START]` and `[END]` to `tokenizer` when missing, and grow `model`'s embeddings to match.

    The tokens are special: the tokenizer never splits them and `decode(..., skip_special_tokens=True)`
    drops them. `[MASK]` becomes `tokenizer.mask_token` (unless the tokenizer already has a mask
    token); `[START]` / `[END]` are extra special tokens. Tokens already present (including GLM's
    `<|startofpiece|>` / `<|endofpiece|>`) are reused, so calling this twice changes nothing.

    The embedding matrix (and an untied `lm_head`) is resized with `resize_token_embeddings`, whose
    default `mean_resizing=True` starts each new row near the mean of the old ones (drawn from the
    global torch RNG). Resize before wrapping the model with peft: with LoRA the new rows stay
    frozen unless they are made trainable (e.g. `LoraConfig(trainable_token_indices=...)` or
    `modules_to_save=["embed_tokens", "lm_head"]`).

    Args:
        tokenizer (`PreTrainedTokenizerBase`): Modified in place.
        model (`torch.nn.Module`, *optional*): A `PreTrainedModel`; its embeddings are resized only when
            smaller than `len(tokenizer)`.

    Returns:
        `AbiTokens`: the ids of `[MASK]`, `[START]`, `[END]`.
    """
    to_add = {}
    if _find_token(tokenizer, (tokenizer.mask_token, MASK_TOKEN)) is None:
        to_add["mask_token"] = MASK_TOKEN
    extra = [aliases[0] for aliases in (START_ALIASES, END_ALIASES) if _find_token(tokenizer, aliases) is None]
    if extra:
        to_add["extra_special_tokens"] = extra
    if to_add:
        tokenizer.add_special_tokens(to_add, replace_extra_special_tokens=False)
    if model is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return abi_token_ids(tokenizer)


def prepare_abi_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> AbiTokens:
    """Ready a model for ABI training: `add_abi_tokens(tokenizer, model)` and `config.bico_objective = "abi"`.

    The recorded objective makes `bico-eval` (and evaluations during training) use blank-infilling
    inference (`bico.abi_generation`) for this model. Call it before wrapping the model with peft.
    """
    tokens = add_abi_tokens(tokenizer, model)
    model.config.bico_objective = OBJECTIVE
    return tokens


@dataclass
class AbiExample:
    """One blank-infilling sequence: Part A followed by Part B, before padding.

    Args:
        input_ids (`list[int]`): Part A (the text with `[MASK]`s), then `[START] span` for each span.
        targets (`list[int]`): What each position predicts: -100 in Part A, then `span + [END]` for each span.
        positions (`list[int]`): GLM position 1: the index in Part A; Part B tokens take their `[MASK]`'s.
        block_positions (`list[int]`): GLM position 2: 0 in Part A, 1..len+1 inside each span (`[START]` = 1).
        part_a_length (`int`): Number of Part A tokens.
    """

    input_ids: list[int]
    targets: list[int]
    positions: list[int]
    block_positions: list[int]
    part_a_length: int

    @property
    def llama_positions(self) -> list[int]:
        """One position per token: Part A index, or `[MASK]` index + offset in the span (`[START]` = 0)."""
        return [position + max(block - 1, 0) for position, block in zip(self.positions, self.block_positions)]


def build_abi_example(
    input_ids: Sequence[int], spans: Sequence[tuple[int, int]], order: Sequence[int], tokens: AbiTokens
) -> AbiExample:
    """Cut `input_ids` into Part A and Part B.

    Args:
        input_ids (`Sequence[int]`): The whole text (BOS and EOS included).
        spans (`Sequence[tuple[int, int]]`): Sorted, disjoint half-open spans in `input_ids` coordinates.
        order (`Sequence[int]`): A permutation of `range(len(spans))`: the order of the spans in Part B.
        tokens (`AbiTokens`): The special token ids.
    """
    part_a, mask_index, cursor = [], [], 0
    for start, end in spans:
        part_a.extend(input_ids[cursor:start])
        mask_index.append(len(part_a))
        part_a.append(tokens.mask_token_id)
        cursor = end
    part_a.extend(input_ids[cursor:])
    example = AbiExample(
        input_ids=part_a,
        targets=[IGNORE_INDEX] * len(part_a),
        positions=list(range(len(part_a))),
        block_positions=[0] * len(part_a),
        part_a_length=len(part_a),
    )
    for index in order:
        start, end = spans[index]
        span = list(input_ids[start:end])
        example.input_ids += [tokens.start_token_id, *span]
        example.targets += [*span, tokens.end_token_id]
        example.positions += [mask_index[index]] * (len(span) + 1)
        example.block_positions += list(range(1, len(span) + 2))
    return example


def abi_attention_mask(
    part_a_lengths: torch.Tensor, part_b_starts: torch.Tensor, lengths: torch.Tensor, max_length: int
) -> torch.Tensor:
    """The blank-infilling attention mask: True where query i may attend to key j.

    Row b holds Part A in columns [0, part_a_lengths[b]), Part B in [part_b_starts[b], lengths[b]),
    and padding elsewhere. Part A queries see all of Part A; Part B queries see all of Part A and
    Part B up to themselves; no real query sees padding. A padding query sees only itself, so no
    row is empty (an empty row is NaN in most attention kernels).

    Args:
        part_a_lengths, part_b_starts, lengths (`torch.LongTensor` of shape `(B,)`).
        max_length (`int`): L.

    Returns:
        `torch.BoolTensor` of shape `(B, 1, L, L)`.
    """
    index = torch.arange(max_length, device=lengths.device)
    query, key = index[None, :, None], index[None, None, :]  # (1, L, 1), (1, 1, L)
    a = part_a_lengths[:, None, None]  # (B, 1, 1)
    b_start, end = part_b_starts[:, None, None], lengths[:, None, None]
    query_a, key_a = query < a, key < a
    query_b, key_b = (query >= b_start) & (query < end), (key >= b_start) & (key < end)
    allowed = (key_a & (query_a | query_b)) | (key_b & query_b & (key <= query))  # (B, L, L)
    allowed |= ~(query_a | query_b) & (query == key)
    return allowed[:, None]  # (B, 1, L, L)


def _pad(rows: Sequence[Sequence[int]], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out


def collate_abi_examples(
    examples: Sequence[AbiExample], pad_token_id: int, format: str = "llama", pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Pad blank-infilling examples into a batch in the Llama or the native GLM layout.

    Args:
        examples (`Sequence[AbiExample]`): From `build_abi_example`.
        pad_token_id (`int`): Written at padding (hidden by the mask, so any id works).
        format (`str`, *optional*, defaults to `"llama"`): `"llama"` or `"glm"`.
        pad_to_multiple_of (`int`, *optional*): Round L up to a multiple of this.

    Returns:
        `dict[str, torch.Tensor]`, for `"llama"` (L = longest example + 1):
            `input_ids` (B, L) long; `attention_mask` (B, 1, L, L) bool (see `abi_attention_mask`);
            `position_ids` (B, L) long (`AbiExample.llama_positions`, 0 on padding); `labels` (B, L)
            long in the HF convention (the model's shift makes output t predict `labels[t + 1]`,
            i.e. `labels[t + 1] = targets[t]`; the extra column holds the last `[END]`).
        for `"glm"` (L = longest example), as THUDM GLM models take them:
            `input_ids` (B, L); `position_ids` (B, 2, L) (position, block position; 0 on padding);
            `attention_mask` (B,) long, the separation index = Part A length; `labels` (B, L)
            aligned with the logits (GLM's loss does not shift): `labels[t] = targets[t]`.
    """
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}, got {format!r}.")
    if not examples:
        raise ValueError("`examples` is empty.")
    longest = max(len(example.input_ids) for example in examples)
    length = longest + 1 if format == "llama" else longest
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = _pad([example.input_ids for example in examples], length, pad_token_id)  # (B, L)
    part_a = torch.tensor([example.part_a_length for example in examples])  # (B,)
    if format == "glm":
        positions = _pad([example.positions for example in examples], length, 0)
        blocks = _pad([example.block_positions for example in examples], length, 0)
        return {
            "input_ids": input_ids,
            "position_ids": torch.stack([positions, blocks], dim=1),  # (B, 2, L)
            "attention_mask": part_a,  # (B,) separation index
            "labels": _pad([example.targets for example in examples], length, IGNORE_INDEX),
        }
    lengths = torch.tensor([len(example.input_ids) for example in examples])  # (B,)
    return {
        "input_ids": input_ids,
        "attention_mask": abi_attention_mask(part_a, part_a, lengths, length),  # (B, 1, L, L)
        "position_ids": _pad([example.llama_positions for example in examples], length, 0),
        # Output t predicts labels[t + 1] after the model's shift, so targets move one column right.
        "labels": _pad([[IGNORE_INDEX, *example.targets] for example in examples], length, IGNORE_INDEX),
    }


class AbiCollator:
    """GLM blank-infilling training batches (arXiv 2311.07468 section 5; GLM section 2.1).

    Spans are sampled (see `sample_spans`) over the tokens between the leading and the trailing
    special tokens (BOS, EOS, ...), which are never masked. Part B lists the spans in a random order.

    Randomness: an example with a `"seed"` (int) uses `random.Random(seed)` (the training loop passes
    `bico.collators.row_seed(seed, epoch, index)`, which makes the spans independent of batching and
    resumption); otherwise the collator's own `random.Random(seed)` is used in call order, and
    `state_dict()` / `load_state_dict()` save and restore it.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): Must hold the ABI tokens (see `add_abi_tokens`).
        mask_ratio (`float`, *optional*, defaults to 0.15): Fraction of tokens covered by spans.
        poisson_lambda (`float`, *optional*, defaults to 3.0): Span-length Poisson mean.
        max_span (`int`, *optional*, defaults to 39): Longest span.
        seed (`int`, *optional*, defaults to 0): Seeds the collator's own generator.
        format (`str`, *optional*, defaults to `"llama"`): `"llama"` (Llama-family models, 4D mask)
            or `"glm"` (native GLM checkpoints); see `collate_abi_examples`.
        pad_to_multiple_of (`int`, *optional*): Round the batch length up to a multiple of this.

    Calling it on a list of examples `{"input_ids": list[int]}` (e.g. from `bico.collators.encode_rows`)
    returns the dict of `collate_abi_examples`. Run a Llama-family forward inside `bico.bidirectional`.

    Example:
        >>> add_abi_tokens(tokenizer, model)
        >>> collator = AbiCollator(tokenizer, seed=0)
        >>> batch = collator([{"input_ids": tokenizer("Ada Marlow built a glass bridge.").input_ids + [2]}])
        >>> with bico.bidirectional(model):
        ...     loss = model(**batch, use_cache=False).loss
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        mask_ratio: float = DEFAULT_MASK_RATIO,
        poisson_lambda: float = DEFAULT_POISSON_LAMBDA,
        max_span: int = DEFAULT_MAX_SPAN,
        seed: int = 0,
        format: str = "llama",
        pad_to_multiple_of: int | None = None,
    ):
        check_sampler_args(mask_ratio, poisson_lambda, max_span)
        if format not in FORMATS:
            raise ValueError(f"`format` must be one of {FORMATS}, got {format!r}.")
        self.tokens = abi_token_ids(tokenizer)
        self.mask_ratio, self.poisson_lambda, self.max_span = mask_ratio, poisson_lambda, max_span
        self.format = format
        self.pad_to_multiple_of = pad_to_multiple_of
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("`tokenizer` has neither `pad_token_id` nor `eos_token_id` to pad with.")
        self.pad_token_id = pad
        self.special_ids = {*tokenizer.all_special_ids, *self.tokens}
        self.rng = random.Random(seed)

    def maskable_range(self, input_ids: Sequence[int]) -> tuple[int, int]:
        """The half-open range spans may cover: `input_ids` without its leading and trailing special tokens."""
        start, end = 0, len(input_ids)
        while start < end and input_ids[start] in self.special_ids:
            start += 1
        while end > start and input_ids[end - 1] in self.special_ids:
            end -= 1
        return start, end

    def encode(self, input_ids: Sequence[int], rng: random.Random | None = None) -> AbiExample:
        """Sample spans for one text and build its `AbiExample` (uses the collator's generator by default)."""
        rng = self.rng if rng is None else rng
        input_ids = [int(token) for token in input_ids]
        start, end = self.maskable_range(input_ids)
        if start == end:
            raise ValueError(f"`input_ids` {input_ids[:8]}... has no non-special token to blank out.")
        spans = sample_spans(end - start, rng, self.mask_ratio, self.poisson_lambda, self.max_span)
        spans = [(start + left, start + right) for left, right in spans]
        order = list(range(len(spans)))
        rng.shuffle(order)
        return build_abi_example(input_ids, spans, order, self.tokens)

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        encoded = [
            self.encode(example["input_ids"], random.Random(example["seed"]) if "seed" in example else None)
            for example in examples
        ]
        return collate_abi_examples(encoded, self.pad_token_id, self.format, self.pad_to_multiple_of)

    def state_dict(self) -> dict:
        """The collator's own generator state (for `Accelerator.register_for_checkpointing`)."""
        return {"rng_state": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng_state"])


def __getattr__(name: str):
    # Inference lives in its own module; importing it lazily keeps `bico.abi.abi_generate` working
    # without a circular import (abi_generation imports this module).
    if name in ("abi_generate", "abi_score"):
        from . import abi_generation

        return getattr(abi_generation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
