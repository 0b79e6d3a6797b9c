"""Entity spans of a token row: which tokens of a name-description row are a name or a title.

Salient-span masking (REALM, Guu et al. 2020; DESIGN.md section 8) masks a named entity whole, so that
the name has to be predicted from the description around it rather than from its own other tokens.
Name-description rows (Berglund et al., arXiv 2309.12288) need no entity tagger. An entity is

    * a run of two or more capitalised words, as `bico.reverse.capitalised_runs` finds them (the
      person's name in a prompt, titles such as "Abyssal Melodies" in a description), or
    * an occurrence of a name the data set answers with (`bico.reverse.collect_names` over the
      training completions, found with `bico.reverse.find_names`), one-word names included.

A span loses the punctuation and quotes around it (`"Rye Nights",` -> `Rye Nights`), and overlapping
spans merge, so each entity is one unit. Spans reach the tokens through the tokenizer's offsets: a
token belongs to a span when its characters overlap the span's. This works alike for byte-level BPE
(GPT-2, Llama 3, SmolLM2: "ĠOrr" covers the space before the name too) and SentencePiece (Llama 2,
Mistral: "▁Orr" likewise), and needs a fast tokenizer (`return_offsets_mapping`).

The text of a row is the example's own `prompt + completion` when it tokenizes back to the row's ids
(`bico.collators.encode_rows` made them so, possibly cut and with EOS appended). Otherwise (e.g. in
`bico.BicoTrainer`, whose batches hold token ids only) the row is decoded: each run of non-special
tokens is decoded and tokenized again, with offsets, and must give its ids back. A row for which
neither works (ids that are not the tokenizer's own tokenization of their text, such as a word
split by hand) gets no entity: the masking schedule alone applies to it, `EntityFinder.unaligned`
counts it, and the first such row logs a warning.

`bico.masking.mask_placeholders` draws the coins; `bico.collators.BicoCollator` (and through it
`bico.BicoTrainer`) and `bico.demask.DemaskCollator` find the spans here.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from .reverse import Span, capitalised_runs, find_names


logger = logging.get_logger(__name__)

Offsets = list[tuple[int, int]]  # one half-open character range per token; (k, k) for special tokens


def _trim(text: str, span: Span) -> Span:
    """`span` without the punctuation, quotes and spaces at its ends."""
    start, end = span
    while start < end and not text[start].isalnum():
        start += 1
    while end > start and not text[end - 1].isalnum():
        end -= 1
    return start, end


def entity_spans(text: str, names: Iterable[str] = ()) -> list[Span]:
    """The entities of `text` as sorted, disjoint character spans (the rules: module docstring).

    Example: `entity_spans('Ever heard of Ada Orr? She wrote "Rye Nights".', ["Ada Orr"])` gives the
    spans of `Ada Orr` and `Rye Nights` (the run and the name of Ada Orr merge into one).
    """
    spans = sorted(span for span in (_trim(text, span) for span in capitalised_runs(text) + find_names(text, names))
                   if span[0] < span[1])
    merged: list[Span] = []
    for start, end in spans:
        if merged and start < merged[-1][1]:  # overlapping: one entity
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def span_tokens(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[list[int]]:
    """For each span, the indexes of the tokens whose characters overlap it; spans no token reaches are left out.

    Args:
        offsets (`Sequence[tuple[int, int]]`): Each token's character range, as `offset_mapping` gives it;
            an empty range (a special token's) belongs to no span.
        spans (`Sequence[tuple[int, int]]`): Half-open character ranges of the same text.
    """
    tokens = [[k for k, (left, right) in enumerate(offsets) if left < right and left < end and right > start]
              for start, end in spans]
    return [indexes for indexes in tokens if indexes]


class EntityFinder:
    """Finds the entity spans of token rows, as token positions (see the module docstring).

    Args:
        tokenizer (`PreTrainedTokenizerBase`): A fast tokenizer, the one that made the rows.
        names (`Iterable[str]`, *optional*): Names found wherever they occur, besides the capitalised
            runs, e.g. `bico.reverse.collect_names(train["completion"])`.

    Attributes:
        unaligned (`int`): Rows seen so far whose text could not be aligned with their tokens (they got
            no entity spans).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, names: Iterable[str] = ()):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"`tokenizer` ({type(tokenizer).__name__}) is not a fast tokenizer; whole-entity masking maps "
                "entities to tokens through `return_offsets_mapping`, which only fast tokenizers give. Load it "
                "with `AutoTokenizer.from_pretrained(..., use_fast=True)`, or set `entity_mask_prob` to 0."
            )
        self.tokenizer, self.names = tokenizer, tuple(names)
        self.special_ids = frozenset(tokenizer.all_special_ids)
        self.unaligned = 0

    def row_tokens(self, input_ids: Sequence[int], text: str | None = None) -> list[list[int]]:
        """The entity spans of one row, each as the indexes of its tokens in `input_ids`, in text order.

        Args:
            input_ids (`Sequence[int]`): The row's tokens, without padding.
            text (`str`, *optional*): The row's text (`bico.collators.row_text(example)`); decoded from `input_ids` when
                None or when it does not tokenize to `input_ids`.

        Returns:
            `list[list[int]]`: Empty for a row without entities, and for a row whose text cannot be
            aligned with its tokens (counted in `unaligned`).
        """
        pieces = self._align(list(input_ids), text)
        if pieces is None:
            self.unaligned += 1
            if self.unaligned == 1:
                logger.warning(
                    "a row's tokens are not the tokenizer's own tokenization of their decoded text, so its entities "
                    "cannot be located; it is masked by the schedule alone (`EntityFinder.unaligned` counts such rows)."
                )
            return []
        return [[first + k for k in tokens] for piece, offsets, first in pieces
                for tokens in span_tokens(offsets, entity_spans(piece, self.names))]

    def batch_positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, texts: Sequence[str | None] | None = None
    ) -> list[list[torch.Tensor]]:
        """Per row of a padded batch (either padding side), each entity span as the positions of its tokens.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`), attention_mask (`torch.LongTensor` of shape `(B, L)`):
                The batch; the row's tokens are where `attention_mask` is 1.
            texts (`Sequence[str | None]`, *optional*): Each row's text, or None to decode it.

        Returns:
            `list[list[torch.LongTensor]]`: B lists of 1-D position tensors, the `entities` of
            `bico.masking.mask_placeholders`.
        """
        texts = [None] * len(input_ids) if texts is None else texts
        spans = []
        for row, text in enumerate(texts):
            positions = attention_mask[row].cpu().nonzero().squeeze(1)  # (n,)
            ids = input_ids[row].cpu()[positions].tolist()
            spans.append([positions[tokens] for tokens in self.row_tokens(ids, text)])
        return spans

    def _align(self, ids: list[int], text: str | None) -> list[tuple[str, Offsets, int]] | None:
        """Texts covering the row's tokens: (text, offsets of its tokens, index of its first token in `ids`)."""
        if text is not None:
            encoding = self.tokenizer(text, return_offsets_mapping=True)  # special tokens added, as encode_rows does
            expected, n = encoding["input_ids"], len(encoding["input_ids"])
            # The row may be cut (a prefix of the encoding) or have EOS appended (special tokens after it).
            if ids[:n] == expected[: len(ids)] and self.special_ids.issuperset(ids[n:]):
                return [(text, encoding["offset_mapping"][: len(ids)], 0)]
        pieces, start = [], 0
        for special, group in itertools.groupby(ids, key=self.special_ids.__contains__):
            group = list(group)
            if not special:
                piece = self.tokenizer.decode(group, clean_up_tokenization_spaces=False)
                encoding = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
                if encoding["input_ids"] != group:
                    return None
                pieces.append((piece, encoding["offset_mapping"], start))
            start += len(group)
        return pieces
