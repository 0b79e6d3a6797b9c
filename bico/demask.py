"""Masked fine-tuning of the causal model: read a masked copy of the row, then write the row (`--objective demask`).

Pan et al. (arXiv 2510.09885, "Closing the data-efficiency gap between autoregressive and masked
diffusion LLMs") fine-tune an ordinary causal LM on a masked copy of the text, a separator and the
original text, with the loss on the original only. What differs from stock next-token prediction is
the batch alone: the attention is the ordinary causal one (no `bico.bidirectional`), no token is
added to the vocabulary, and inference is the unchanged causal model (`bico-eval` evaluates a demask
model as it does an NTP one). Each optimizer step is demask with probability `p_bico`, else NTP.

Why it should reverse. Next-token prediction on "Ada Orr wrote a long song." trains the name before
the description: the model learns to continue "Ada Orr" with the description, never to produce the
name after the description, which is what the reverse question ("Who wrote a long song?") asks. In a
demask row whose copy hides the name (`_ _ wrote a long song.`, a newline, `Ada Orr wrote a long
song.`), the model writes "Ada Orr" with the description already in its context: the reverse
question's order.
Pan et al. report backward accuracy on a name-description set rising from about 0 to 0.78-0.93
(secondary sources; mask rate 0.5 best without paraphrases). Token-level masking at a low rate rarely
hides a whole name; whole-entity masking (`entity_mask_prob`, `bico.entities`) does.

A row `[BOS] t1 ... tn [EOS]`, as `bico.collators.encode_rows` makes it, becomes

    [BOS] m1 ... mn  SEP  t1 ... tn [EOS]       labels: -100 up to SEP; t1 ... tn and EOS their own ids

where mi is the marker where ti is masked and ti elsewhere. `bico.masking.mask_placeholders` chooses
the masked tokens with the BICO options (`mask_prob`, `schedule` fixed/uniform/span, `mask_min`,
`mask_max`; at least one token per row; special tokens never), then whole entities with probability
`entity_mask_prob`. Unlike in BICO, t1 may be masked (the copy is input) and is a target (SEP predicts
it), so a name at the start of a row is hidden and written in full.

The inverted copy (`invert_prob`, `--demask_invert_prob`). Whole-entity masking serves one direction
only: a d2p row ("Known for X, Ada Orr ...") with its name hidden still writes the description before
the name, so nothing trains name -> description (d2n-reverse). With probability `invert_prob` a row's
copy shows exactly the tokens the mask chose and hides every other maskable one. With entities masked
whole at P = 1 and a low rate, the inverted copy shows the name and hides most of the description, and
the row is written with the name already read: the d2n-reverse order. The coin is drawn from the row's
generator after the mask, so `invert_prob` 0 leaves every copy as before.

Marker and separator, defaults `"_"` and `"\\n"`: each is text tokenized alone (no special tokens) and
must give existing, non-special tokens, one token for the marker (it replaces one token, so the copy
keeps the row's length). Both are in every byte-level BPE vocabulary (SmolLM2: `_` is id 79, the
newline `Ċ` id 198) and in Llama/Mistral SentencePiece ones (the marker is the word `▁_`, the newline
`▁` + the byte token `<0x0A>`), and neither occurs in the name-description rows. The model must see
the marker, so BICO's placeholder (the pad id, hidden from every query) does not serve: here nothing
is hidden, and the pad id is often EOS (SmolLM2), which reads as the end of the text.

Length: a row of n tokens becomes about 2n + the separator. The whole sequence is kept within
`max_length` (the run's `--max_length`): a longer row is cut, both copies to the same first tokens,
as many as fit, and it then ends without EOS, as `encode_rows` cuts rows; `truncated` counts such
rows and the first logs a warning. `--max_length` of about twice the longest row avoids it (rows of
`data/` and of Berglund's set are 12-43 SmolLM2 tokens: the default 256 holds them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from .collators import IGNORE_INDEX, NtpCollator, pad_examples, row_text, text_token_ids
from .entities import EntityFinder
from .masking import DEFAULT_MASK_PROB, check_schedule, find_word_starts, mask_placeholders, maskable_positions, word_start_table


logger = logging.get_logger(__name__)

DEFAULT_MARKER = "_"  # written over each masked token of the copy
DEFAULT_SEPARATOR = "\n"  # between the masked copy and the row


class DemaskCollator:
    """Masked fine-tuning batches (Pan et al., arXiv 2510.09885): masked copy, separator, the row (module docstring).

    Args:
        tokenizer (`PreTrainedTokenizerBase`): Gives the special ids (never masked; a leading one, BOS,
            starts the sequence), EOS and the marker's and separator's ids.
        max_length (`int`, *optional*, defaults to 256): Tokens per built sequence, BOS and EOS included;
            longer rows are cut (module docstring), `truncated` counts them.
        mask_prob (`float`, *optional*, defaults to 0.15): Rate of the `"fixed"` and `"span"` schedules;
            Pan et al. found 0.5 best.
        seed (`int`, *optional*, defaults to 0): Seeds the collator's own generator, used for examples
            without a `"seed"` (the training loop gives every row one).
        schedule (`str`, *optional*, defaults to `"fixed"`), mask_min (`float`, *optional*, defaults to 0.0),
            mask_max (`float`, *optional*, defaults to 1.0): As in `bico.BicoCollator`.
        entity_mask_prob (`float`, *optional*, defaults to 0.0), entity_names (`Iterable[str]`, *optional*):
            Whole-entity masking on top of the schedule, as in `bico.BicoCollator`.
        marker (`str`, *optional*, defaults to `"_"`): Text of one existing token, written over masked tokens.
        separator (`str`, *optional*, defaults to `"\\n"`): Text of existing tokens between the copy and the row.
        invert_prob (`float`, *optional*, defaults to 0.0): Probability per row that the copy hides the
            tokens the mask left and shows the ones it chose (module docstring).

    Calling it on a list of examples `{"input_ids": list[int], "seed": int, "prompt": str,
    "completion": str}` (seed and texts optional) returns a dict of (B, L) LongTensors: `input_ids`
    (right-padded), `attention_mask` (0 on padding only), `labels` (the row and its EOS; -100 on the
    BOS, the copy, the separator and padding). Run the forward as an ordinary causal step.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 256,
        mask_prob: float = DEFAULT_MASK_PROB,
        seed: int = 0,
        *,
        schedule: str = "fixed",
        mask_min: float = 0.0,
        mask_max: float = 1.0,
        entity_mask_prob: float = 0.0,
        entity_names: Iterable[str] = (),
        marker: str = DEFAULT_MARKER,
        separator: str = DEFAULT_SEPARATOR,
        invert_prob: float = 0.0,
    ):
        check_schedule(schedule, mask_prob, mask_min, mask_max, entity_mask_prob)
        if not 0.0 <= invert_prob <= 1.0:
            raise ValueError(f"`invert_prob` (--demask_invert_prob) must be in [0, 1] (0 never inverts the copy), got {invert_prob}.")
        if tokenizer.eos_token_id is None:
            raise ValueError("`tokenizer` has no `eos_token_id`; training sequences must end with EOS.")
        self.marker_id = text_token_ids(tokenizer, marker, "demask_marker", single=True, default=DEFAULT_MARKER)[0]
        self.separator_ids = text_token_ids(tokenizer, separator, "demask_separator", default=DEFAULT_SEPARATOR)
        shortest = 1 + len(self.separator_ids) + 2  # BOS, the separator, one token in each copy
        if max_length < shortest:
            raise ValueError(f"`max_length` must be at least {shortest} for a demask sequence (BOS, separator, "
                             f"one token per copy), got {max_length}.")
        self.max_length, self.mask_prob, self.schedule, self.mask_min, self.mask_max = max_length, mask_prob, schedule, mask_min, mask_max
        self.entity_mask_prob, self.invert_prob = entity_mask_prob, invert_prob
        self.entities = EntityFinder(tokenizer, entity_names) if entity_mask_prob > 0 else None
        self.tokenizer, self.eos_token_id = tokenizer, tokenizer.eos_token_id
        self.special_ids = sorted(set(tokenizer.all_special_ids))
        self.ntp = NtpCollator(tokenizer)
        self.word_table = word_start_table(tokenizer) if schedule == "span" else None
        self.generator = torch.Generator().manual_seed(seed)
        self.truncated = 0

    def split(self, input_ids: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
        """A row as (leading special token, i.e. BOS, or nothing; the text's tokens; EOS or nothing), cut to fit."""
        ids = list(input_ids)
        lead = ids[:1] if ids and ids[0] in self.special_ids else []
        end = [ids[-1]] if len(ids) > len(lead) and ids[-1] == self.eos_token_id else []
        body = ids[len(lead) : len(ids) - len(end)]
        if len(lead) + 2 * len(body) + len(self.separator_ids) + len(end) > self.max_length:
            body, end = body[: (self.max_length - len(lead) - len(self.separator_ids)) // 2], []
        return lead, body, end

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        rows = [self.split(example["input_ids"]) for example in examples]
        cut = sum(sum(map(len, row)) < len(example["input_ids"]) for row, example in zip(rows, examples))
        if cut and not self.truncated:
            logger.warning(
                f"a demask sequence (masked copy + separator + row) is longer than `max_length`={self.max_length}; "
                "both copies are cut and the row loses its EOS. Raise `--max_length` to about twice the longest row."
            )
        self.truncated += cut
        generators = [
            torch.Generator().manual_seed(example["seed"]) if "seed" in example else self.generator for example in examples
        ]
        # The copies to mask, after one dummy token: `mask_placeholders` never masks a row's first
        # token (in BICO nothing predicts it), but the copy's first token may be masked.
        copies = [{"input_ids": [self.ntp.pad_token_id, *body]} for _, body, _ in rows]
        input_ids, attention_mask = pad_examples(copies, self.ntp.pad_token_id)  # (B, 1 + L)
        word_starts = None
        if self.schedule == "span":
            word_starts = find_word_starts(input_ids, self.tokenizer, self.word_table, self.special_ids)
        entities = None
        if self.entities is not None:
            entities = [self._entity_positions(example, lead, body) for example, (lead, body, _) in zip(examples, rows)]
        maskable = maskable_positions(input_ids, attention_mask, self.special_ids)
        maskable[:, 0] = False  # the dummy is not part of the copy: never hidden, inverted or not
        hidden = mask_placeholders(
            input_ids, attention_mask, maskable, self.marker_id,
            self.mask_prob, generators, schedule=self.schedule, mask_min=self.mask_min, mask_max=self.mask_max,
            word_starts=word_starts, entity_mask_prob=self.entity_mask_prob, entities=entities,
        )["labels"] != IGNORE_INDEX  # (B, 1 + L)
        if self.invert_prob > 0:
            inverted = torch.tensor([torch.rand(1, generator=generator).item() < self.invert_prob for generator in generators])
            hidden = torch.where(inverted[:, None], maskable & ~hidden, hidden)
        masked = input_ids.masked_fill(hidden, self.marker_id)
        sequences = [lead + masked[row, 1 : 1 + len(body)].tolist() + self.separator_ids + body + end
                     for row, (lead, body, end) in enumerate(rows)]
        batch = self.ntp([{"input_ids": sequence} for sequence in sequences])
        for row, (lead, body, _) in enumerate(rows):
            batch["labels"][row, : len(lead) + len(body) + len(self.separator_ids)] = IGNORE_INDEX  # the loss is on the row only
        return batch

    def _entity_positions(self, example: dict, lead: list[int], body: list[int]) -> list[torch.Tensor]:
        """The example's entity spans as positions of its copy (after the dummy token), cut like the copy."""
        spans = []
        for tokens in self.entities.row_tokens(example["input_ids"], row_text(example)):
            positions = [1 + k - len(lead) for k in tokens if 0 <= k - len(lead) < len(body)]
            if positions:
                spans.append(torch.tensor(positions))
        return spans
