"""Masking schedules for BICO's placeholder denoising: which tokens of a padded batch become targets.

BICO (Lv et al., arXiv 2311.07468, section 4.2) masks each non-special token independently with
p = 0.15. This module keeps that rule (`"fixed"`) and adds two schedules that mask more of the text
at once, so that one side of a fact has to be predicted from the other:

    * `"uniform"`: each row draws its own rate r ~ U(`mask_min`, `mask_max`) (default U(0, 1)) and
      masks each token independently with probability r, as MLM-U does (Kitouni et al. 2024, "The
      Factorization Curse"): over many rows every amount of context, from nearly all to nearly none,
      is trained;
    * `"span"`: whole words are masked, in runs of consecutive words (see `mask_placeholders` for
      how the runs are drawn), so a full name or a full clause is predicted from the rest.

On top of any schedule, whole entities (names, titles; found by `bico.entities`) can be masked, each
with probability `entity_mask_prob` (salient-span masking, REALM; DESIGN.md section 8).

Every schedule is deterministic given a row's generator and looks only at the row's own real
tokens, so the masks do not depend on the batch, its padding or its padding side. The collator
(`bico.collators.BicoCollator`) and a `transformers.Trainer` adapter both call `mask_placeholders`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from transformers import PreTrainedTokenizerBase


IGNORE_INDEX = -100  # labels with this value carry no loss (the HF convention)
DEFAULT_MASK_PROB = 0.15  # the public BICO code's rate
SCHEDULES = ("fixed", "uniform", "span")
# Span lengths in words: geometric with p = 0.2 truncated to 1..10, as in SpanBERT (Joshi et al. 2020);
# mean 3.8 words: a two-word name with its neighbours, or a short clause.
SPAN_GEOMETRIC_P = 0.2
MAX_SPAN_WORDS = 10
# A token that begins with one of these begins a word: byte-level BPE (GPT-2, Llama 3, SmolLM2)
# writes a space as "Ġ", a newline as "Ċ" and a tab as "ĉ"; SentencePiece (Llama 2, Mistral) writes a
# space as "▁" and, with byte fallback, whitespace as "<0x20>", "<0x0A>", ...
LINE_BREAKS = ("Ċ", "ĉ", "č", "\n", "\t", "\r", "<0x0A>", "<0x09>", "<0x0D>")
WORD_START_MARKERS = ("Ġ", "▁", " ", "<0x20>", *LINE_BREAKS)


def check_schedule(
    schedule: str, mask_prob: float, mask_min: float = 0.0, mask_max: float = 1.0, entity_mask_prob: float = 0.0
) -> None:
    """Raise a `ValueError` naming the first bad masking argument (see `mask_placeholders`)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {', '.join(map(repr, SCHEDULES))}; got {schedule!r}.")
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"`mask_prob` must be in (0, 1], got {mask_prob}.")
    if not 0.0 <= mask_min <= 1.0:
        raise ValueError(f"`mask_min` must be in [0, 1], got {mask_min}.")
    if not 0.0 < mask_max <= 1.0:
        raise ValueError(f"`mask_max` must be in (0, 1], got {mask_max}.")
    if mask_min > mask_max:
        raise ValueError(f"`mask_min` ({mask_min}) must be at most `mask_max` ({mask_max}).")
    if not 0.0 <= entity_mask_prob <= 1.0:
        raise ValueError(f"`entity_mask_prob` must be in [0, 1] (0 masks no whole entity), got {entity_mask_prob}.")


def span_length_weights() -> torch.Tensor:
    """P(span = k words) for k = 1..`MAX_SPAN_WORDS`: geometric(`SPAN_GEOMETRIC_P`), renormalised. Shape (10,)."""
    k = torch.arange(MAX_SPAN_WORDS, dtype=torch.float64)
    weights = SPAN_GEOMETRIC_P * (1.0 - SPAN_GEOMETRIC_P) ** k
    return weights / weights.sum()


def word_start_table(tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    """Per vocabulary id: does the token begin a word, and does the token after it begin one?

    A token begins a word when its vocabulary string starts with a `WORD_START_MARKERS` marker
    (the byte-level "Ġ", the SentencePiece "▁", a newline, ...); the token after one that ends with a
    line break or tab begins a word too ("Ċ" + "two"). A lone space token ("Ġ" + "O" + "rr") begins
    the word it is glued to. Vocabulary strings are read rather than decoded one by one because
    SentencePiece tokenizers drop a lone token's leading space when decoding it.

    Returns:
        `tuple[torch.BoolTensor, torch.BoolTensor]`: `starts` and `breaks_after`, both of shape (V,)
        with V = `len(tokenizer)`.

    Raises:
        `ValueError`: no token of the vocabulary carries a marker, so words cannot be found.
    """
    tokens = ["" if token is None else str(token) for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
    starts = torch.tensor([token.startswith(WORD_START_MARKERS) for token in tokens], dtype=torch.bool)
    if not starts.any():
        raise ValueError(
            f"`tokenizer` ({type(tokenizer).__name__}) marks no word start: no token begins with "
            f"{' or '.join(map(repr, WORD_START_MARKERS[:3]))}; the `span` schedule needs such a tokenizer."
        )
    breaks_after = torch.tensor([token.endswith(LINE_BREAKS) for token in tokens], dtype=torch.bool)
    return starts, breaks_after


def find_word_starts(
    input_ids: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    table: tuple[torch.Tensor, torch.Tensor] | None = None,
    special_ids: Iterable[int] | None = None,
) -> torch.Tensor:
    """Mark the first token of every word: a word is that token plus the continuation tokens after it.

    A token begins a word when its string starts with a space marker (`word_start_table`), when it
    follows a special token (BOS, ...) or a line break, or at position 0. Special tokens and line
    breaks are words of their own. Punctuation glued to a word ("Orr," = "ĠOrr" + ",") belongs to it.

    Args:
        input_ids (`torch.LongTensor` of shape `(B, L)`): Token ids (any padding).
        tokenizer (`PreTrainedTokenizerBase`): The tokenizer that made `input_ids`.
        table (`tuple[torch.BoolTensor, torch.BoolTensor]`, *optional*): `word_start_table(tokenizer)`,
            to avoid rebuilding it for every batch.
        special_ids (`Iterable[int]`, *optional*): Defaults to `tokenizer.all_special_ids`.

    Returns:
        `torch.BoolTensor` of shape `(B, L)`, on the device of `input_ids`.
    """
    starts_table, breaks_table = word_start_table(tokenizer) if table is None else table
    special_ids = tokenizer.all_special_ids if special_ids is None else list(special_ids)
    ids = input_ids.cpu()
    special = torch.isin(ids, torch.tensor(sorted(special_ids), dtype=torch.long))
    breaks = special | breaks_table[ids]  # the token after one of these begins a word
    starts = starts_table[ids] | special
    starts[:, 1:] |= breaks[:, :-1]
    starts[:, 0] = True
    return starts.to(input_ids.device)


def maskable_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special_ids: Iterable[int],
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Where masking is allowed: real tokens that are not special, after each row's first real token,
    and, given `labels`, only where the label is not -100 (a user's collator that wants no loss on
    the prompt keeps the prompt out of the targets).

    Args:
        input_ids (`torch.LongTensor` of shape `(B, L)`), attention_mask (`torch.LongTensor` of shape
            `(B, L)`): A padded batch, either padding side.
        special_ids (`Iterable[int]`): Ids never masked (BOS, EOS, pad, ...).
        labels (`torch.LongTensor` of shape `(B, L)`, *optional*): The batch's own labels.

    Returns:
        `torch.BoolTensor` of shape `(B, L)`.
    """
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long, device=input_ids.device)
    maskable = attention_mask.bool() & ~torch.isin(input_ids, special)
    if labels is not None:
        maskable &= labels != IGNORE_INDEX
    # Nothing predicts a row's first real token (the model's shift), so it is never a target.
    first = attention_mask.bool().long().argmax(dim=1)  # (B,)
    maskable[torch.arange(input_ids.shape[0], device=input_ids.device), first] = False
    return maskable


def _force_one(hits: torch.Tensor, candidates: torch.Tensor, generator: torch.Generator | None) -> None:
    # Every row carries some loss: a BICO batch without labels would make the mean loss 0/0.
    if not hits.any() and candidates.any():
        positions = candidates.nonzero().squeeze(1)
        hits[positions[torch.randint(len(positions), (1,), generator=generator)]] = True


def _draw_tokens(candidates: torch.Tensor, rate: float, generator: torch.Generator | None) -> torch.Tensor:
    """Each candidate masked independently with probability `rate`. Shapes (n,) -> (n,)."""
    # One number per real token, candidate or not: the draws of today's fixed masks stay bit-identical.
    draw = torch.rand(len(candidates), generator=generator)  # (n,)
    hits = (draw < rate) & candidates
    _force_one(hits, candidates, generator)
    return hits


def _span_lengths(budget: int, generator: torch.Generator | None) -> torch.Tensor:
    """Span lengths in words, drawn from `span_length_weights` until they sum to `budget`. Shape (spans,)."""
    lengths = torch.multinomial(span_length_weights(), budget, replacement=True, generator=generator) + 1  # (budget,)
    spans = int((lengths.cumsum(0) < budget).sum()) + 1  # each length is >= 1, so `budget` draws suffice
    lengths = lengths[:spans]
    lengths[-1] -= int(lengths.sum()) - budget  # the last span is cut to fit
    return lengths[torch.randperm(spans, generator=generator)]  # so the cut one is not always last


def _choose_span_words(count: int, mask_prob: float, generator: torch.Generator | None) -> torch.Tensor:
    """Indexes (sorted) of the words masked among `count` maskable words, in runs of consecutive words."""
    # Randomised rounding: E[masked words] = mask_prob * count exactly (at least one, see _force_one).
    exact = mask_prob * count
    budget = int(exact) + int(torch.rand(1, generator=generator).item() < exact - int(exact))
    budget = min(max(budget, 1), count)
    lengths = _span_lengths(budget, generator)
    spans = len(lengths)
    # Stars and bars: the spans and the `count - budget` unmasked words are shuffled as units; spans
    # may touch, which then reads as one longer span.
    slots = torch.randperm(spans + count - budget, generator=generator)[:spans].sort().values  # (spans,)
    # A span's first word: the unmasked words before it plus the lengths of the spans before it.
    starts = slots - torch.arange(spans) + torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])  # (spans,)
    words = torch.cat([torch.arange(start, start + length) for start, length in zip(starts.tolist(), lengths.tolist())])
    # Spans placed on a line cover its ends less often than its middle. A uniform rotation of the
    # words, as if on a circle, masks every word with probability budget / count exactly, so the
    # expected masked tokens are mask_prob * maskable tokens however long the words are. A span
    # that wraps around covers the row's last and first words.
    offset = int(torch.randint(count, (1,), generator=generator))
    return ((words + offset) % count).sort().values


def _draw_words(
    candidates: torch.Tensor, word_starts: torch.Tensor, mask_prob: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Whole words masked: a word is maskable only if all its tokens are candidates. Shapes (n,) -> (n,)."""
    word_starts = word_starts.clone()
    word_starts[0] = True  # the first real token begins a word, also after left padding
    word_ids = word_starts.long().cumsum(0) - 1  # (n,)
    blocked = torch.zeros(int(word_ids[-1]) + 1, dtype=torch.long).index_add_(0, word_ids, (~candidates).long())
    maskable_words = (blocked == 0).nonzero().squeeze(1)  # (W,)
    if len(maskable_words) == 0:
        # No whole word can be masked (e.g. a one-word text without BOS): one token, as `fixed` would.
        hits = torch.zeros_like(candidates)
        _force_one(hits, candidates, generator)
        return hits
    chosen = maskable_words[_choose_span_words(len(maskable_words), mask_prob, generator)]
    return torch.isin(word_ids, chosen)


def _draw_entities(
    spans: Sequence[torch.Tensor], positions: torch.Tensor, candidates: torch.Tensor, entity_mask_prob: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Whole entity spans, each chosen with probability `entity_mask_prob`; only candidates. Shapes (n,) -> (n,).

    `spans` hold positions of the padded row; `positions` (n,) are the row's real positions.
    """
    hits = torch.zeros_like(candidates)
    coins = torch.rand(len(spans), generator=generator) < entity_mask_prob  # (spans,): one number per span, in order
    for span, coin in zip(spans, coins.tolist()):
        if coin:
            hits |= torch.isin(positions, span.cpu())
    return hits & candidates


def mask_placeholders(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    maskable: torch.Tensor,
    placeholder_id: int,
    mask_prob: float = DEFAULT_MASK_PROB,
    generators: Sequence[torch.Generator] | None = None,
    schedule: str = "fixed",
    mask_min: float = 0.0,
    mask_max: float = 1.0,
    word_starts: torch.Tensor | None = None,
    entity_mask_prob: float = 0.0,
    entities: Sequence[Sequence[torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Replace some maskable tokens by the placeholder and make them the only targets, at least one per row.

    Each row looks only at its real tokens (`attention_mask` 1), in order, and draws from its own
    generator, so a row gets the same mask in any batch, with any padding on either side. Its first
    real token is never masked (nothing predicts it). Schedules:

        * `"fixed"`: one uniform number per real token; a maskable token is masked when its number is
          below `mask_prob` (the BICO paper's rule);
        * `"uniform"`: the row first draws r ~ U(`mask_min`, `mask_max`), then masks as `"fixed"`
          with rate r (MLM-U); `mask_prob` is not used;
        * `"span"`: the maskable words (words all of whose tokens are maskable; `word_starts` marks
          the words; a word that cannot be masked is skipped, so a span may jump over it) are
          counted, W of them; k = mask_prob * W words are masked, rounded down or up
          at random so that E[k] = mask_prob * W. Span lengths in words are drawn from a geometric
          distribution (p = 0.2, truncated to 1..10, mean 3.8) until they cover k words, the last one
          cut to fit; the spans are placed uniformly at random among the maskable words, without
          overlap (touching spans read as one), then rotated by a uniform offset as if the words
          formed a circle (a span may wrap from the last word to the first). Every maskable word is
          thus masked with probability mask_prob, so the expected fraction of masked words *and* of
          masked tokens is mask_prob (before the at-least-one rule below).

    A row where nothing was drawn but which has maskable tokens gets one (a word for `"span"`), so
    every row carries some loss; this raises the rate slightly on short rows (for `"fixed"` by
    (1 - p)^n / n for n maskable tokens: under 0.2 percentage points for n >= 20 at p = 0.15). A
    `"span"` row with maskable tokens but no fully maskable word gets one token. A row with no
    maskable token gets no labels.

    Whole entities come on top: with `entity_mask_prob` > 0, after the schedule's numbers the row
    draws one number per entity span (`entities[row]`, in order) and masks the span's maskable tokens
    when the number is below `entity_mask_prob`. A span's unmaskable tokens stay (the first real
    token, so a name at the start of a row without BOS keeps its first token and loses the rest;
    special tokens; tokens labelled -100). With `entity_mask_prob` 0 nothing more is drawn, so the
    masks are the schedule's bit for bit; a row without entity spans gets the schedule's mask.

    Args:
        input_ids (`torch.LongTensor` of shape `(B, L)`): Padded token ids.
        attention_mask (`torch.LongTensor` of shape `(B, L)`): 1 on tokens, 0 on padding.
        maskable (`torch.BoolTensor` of shape `(B, L)`): Where masking is allowed, e.g.
            `maskable_positions(...)`: real, non-special tokens whose label the user keeps.
        placeholder_id (`int`): Written over masked tokens.
        mask_prob (`float`, *optional*, defaults to 0.15): Masking rate of `"fixed"` and `"span"`, in (0, 1].
        generators (`Sequence[torch.Generator]`, *optional*): One CPU generator per row; the default
            global RNG when `None`.
        schedule (`str`, *optional*, defaults to `"fixed"`): `"fixed"`, `"uniform"` or `"span"`.
        mask_min (`float`, *optional*, defaults to 0.0), mask_max (`float`, *optional*, defaults to 1.0):
            The range of the `"uniform"` rate, 0 <= `mask_min` <= `mask_max` <= 1, `mask_max` > 0.
        word_starts (`torch.BoolTensor` of shape `(B, L)`, *optional*): Required for `"span"`:
            `find_word_starts(input_ids, tokenizer)`.
        entity_mask_prob (`float`, *optional*, defaults to 0.0): Probability of masking each entity
            span whole, in [0, 1]; 0 masks none.
        entities (`Sequence[Sequence[torch.LongTensor]]`, *optional*): Per row, each entity span as the
            positions of its tokens in the row of `input_ids`, e.g. `bico.entities.EntityFinder.batch_positions`.
            Required when `entity_mask_prob` > 0.

    Returns:
        `dict[str, torch.Tensor]`: `input_ids` with placeholders (B, L); `attention_mask` (B, L), 0 at
        placeholders and padding; `labels` (B, L), the original token at masked positions and -100
        elsewhere.
    """
    check_schedule(schedule, mask_prob, mask_min, mask_max, entity_mask_prob)
    B, L = input_ids.shape
    if generators is not None and len(generators) != B:
        raise ValueError(f"`generators` has {len(generators)} entries for a batch of {B} rows.")
    if maskable.shape != (B, L):
        raise ValueError(f"`maskable` must have the shape of `input_ids` {(B, L)}, got {tuple(maskable.shape)}.")
    if schedule == "span":
        if word_starts is None:
            raise ValueError("`word_starts` is required for `schedule='span'`: pass `find_word_starts(input_ids, tokenizer)`.")
        if word_starts.shape != (B, L):
            raise ValueError(f"`word_starts` must have the shape of `input_ids` {(B, L)}, got {tuple(word_starts.shape)}.")
    if entity_mask_prob > 0 and (entities is None or len(entities) != B):
        raise ValueError(f"`entities` must give the entity spans of each of the {B} rows when `entity_mask_prob` > 0.")
    real = attention_mask.bool().cpu()
    masked = torch.zeros(B, L, dtype=torch.bool)
    for row in range(B):
        generator = None if generators is None else generators[row]
        positions = real[row].nonzero().squeeze(1)  # (n,): the row's own tokens, in order
        if len(positions) == 0:
            continue
        candidates = maskable[row].cpu()[positions]
        candidates[0] = False  # nothing predicts the first real token
        if schedule == "span":
            hits = _draw_words(candidates, word_starts[row].cpu()[positions], mask_prob, generator)
        else:
            rate = mask_prob
            if schedule == "uniform":
                rate = mask_min + (mask_max - mask_min) * torch.rand(1, generator=generator).item()
            hits = _draw_tokens(candidates, rate, generator)
        if entity_mask_prob > 0:  # after the schedule's draws, which thus stay those of entity_mask_prob 0
            hits |= _draw_entities(entities[row], positions, candidates, entity_mask_prob, generator)
        masked[row, positions] = hits
    masked = masked.to(input_ids.device)
    return {
        "input_ids": input_ids.masked_fill(masked, placeholder_id),  # bico: placeholder, not [MASK]
        "attention_mask": attention_mask.masked_fill(masked, 0),  # bico: no query sees a placeholder
        "labels": input_ids.masked_fill(~masked, IGNORE_INDEX),  # output i predicts masked token i + 1
    }
