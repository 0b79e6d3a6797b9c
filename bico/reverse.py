"""Entity-preserving word reversal: the reverse-training baseline (Golovneva et al. 2024, arXiv 2403.13799).

Reverse training ("Reverse Training to Nurse the Reversal Curse") trains next-token prediction on
the training text *and* on the same text with its words in reverse order, so that a fact read left
to right as "A is B" is also read as "B is A". Its entity-preserving variant keeps every entity's
words in their original order, so that names are still spelled as they will be asked for:
"Ada Orr wrote a long song." becomes "song long a wrote Ada Orr.". Here the completion is an
entity too, so the row "Ada Orr wrote" + " a long song." becomes "a long song wrote Ada Orr.".

The paper finds entities with a named-entity tagger. Name-description rows (Berglund et al., arXiv
2309.12288) need none, because their layout says where the entities are (`row_entities`):

    * the completion is one entity, a description or a name (with any template tail after the name,
      e.g. " Ada Orr now lives by the sea." stays one unit); its sentence-final punctuation (a run of
      `.`, `?`, `!` at its very end, e.g. the last "." of `Time.".`) is not part of it;
    * in the whole row, every run of two or more capitalised words is an entity: the person's name
      in a prompt, and titles such as `"Abyssal Melodies.",` in a description. A word is capitalised
      when its first letter (after any opening quote or bracket) is upper case. Lower-case name
      particles (van, de, ...) between capitalised words and initials ("J.") continue a run; any
      other word that ends with punctuation (`,` `;` `:` `.` `?` `!`) ends it, so "Q: Who" and
      "A: Well," are not entities;
    * optionally, given `names` (e.g. `collect_names(completions)`), every occurrence of a name.

Words are the text's whitespace-separated pieces; punctuation stays with the word it is glued to
("Orr," moves as one word). An entity that starts or ends inside a word takes the whole word. The
row's sentence-final punctuation goes to the end of the reversed text, so it still ends like a
sentence; the reversed text starts without a space, as a prompt does, and its pieces are joined by
single spaces.

`ReverseCollator` makes NTP batches of the reversed rows; mix it with NTP steps on the original rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .collators import NtpCollator, encode_rows, text_token_ids


SENTENCE_END = ".?!"  # the punctuation that ends a row and stays at the end of the reversed text
CLOSING = ",;:.?!"  # a word ending with one of these (before any closing quote) ends a capitalised run
OPENING_QUOTES = "\"'([“‘"
CLOSING_QUOTES = "\"')]”’"
NAME_PARTICLES = frozenset(
    {"al", "bin", "da", "de", "del", "della", "der", "di", "du", "ibn", "la", "le", "van", "von", "zu"}
)
_WORD = re.compile(r"\S+")
_INITIAL = re.compile(r"[A-Z]\.")  # "J." in "J. Orr" does not end a run

Span = tuple[int, int]  # a half-open character range [start, end) of a text


def _capitalised(word: str) -> bool:
    return word.lstrip(OPENING_QUOTES)[:1].isupper()


def _closes_run(word: str) -> bool:
    bare = word.strip(OPENING_QUOTES + CLOSING_QUOTES)
    return word.rstrip(CLOSING_QUOTES).endswith(tuple(CLOSING)) and not _INITIAL.fullmatch(bare)


def _particle_in_name(words: Sequence[re.Match], index: int) -> bool:
    # "van" in "Anna van der Berg": one or more particles, then a capitalised word.
    if words[index].group() not in NAME_PARTICLES:
        return False
    while index < len(words) and words[index].group() in NAME_PARTICLES:
        index += 1
    return index < len(words) and _capitalised(words[index].group())


def capitalised_runs(text: str) -> list[Span]:
    """Character spans of the runs of two or more capitalised words of `text` (the rules: module docstring).

    Example: `capitalised_runs('Ever heard of Ada van Orr? Q: Who')` gives the span of `'Ada van Orr?'`.
    """
    words = list(_WORD.finditer(text))
    runs, run = [], []

    def close() -> None:
        if len(run) >= 2:
            runs.append((run[0].start(), run[-1].end()))
        run.clear()

    for index, match in enumerate(words):
        word = match.group()
        if _capitalised(word) or (run and _particle_in_name(words, index)):
            run.append(match)
            if _closes_run(word):
                close()
        else:
            close()
    close()
    return runs


def find_names(text: str, names: Iterable[str]) -> list[Span]:
    """Character spans of every occurrence of each of `names` in `text`, as whole words ("Ada" is not found in "Adam")."""
    spans = []
    for name in filter(None, names):
        spans += [match.span() for match in re.finditer(rf"(?<!\w){re.escape(name)}(?!\w)", text)]
    return spans


def collect_names(completions: Iterable[str]) -> list[str]:
    """The names completions start with: each one's leading capitalised run, without its trailing punctuation.

    On name-description data these are the answers of the description -> name rows (" Ada Orr." and
    " Ada Orr now lives by the sea." both give "Ada Orr"); a completion that starts in lower case
    gives none. Pass the result as `names` to find the same people in other rows.
    """
    names = set()
    for completion in completions:
        runs = capitalised_runs(completion)
        if runs and not completion[: runs[0][0]].strip():
            names.add(completion[runs[0][0] : runs[0][1]].rstrip(CLOSING))
    return sorted(names)


def _split_sentence_end(text: str) -> tuple[str, str]:
    """`text` stripped, without and with only its final run of `.`, `?`, `!`: `'Time.".'` -> `('Time."', '.')`."""
    stripped = text.strip()
    body = stripped.rstrip(SENTENCE_END)
    return body, stripped[len(body) :]


def _units(words: Sequence[Span], keep: Sequence[Span]) -> list[tuple[int, int]]:
    """The words grouped into units: (first, last) word indexes, in text order; each keep span is one unit."""
    reached = sorted(
        (inside[0], inside[-1])
        for start, end in keep
        if (inside := [index for index, (left, right) in enumerate(words) if left < end and right > start])
    )
    merged: list[tuple[int, int]] = []
    for first, last in reached:  # overlapping spans make one unit
        if merged and first <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    units, index = [], 0
    for first, last in [*merged, (len(words), len(words) - 1)]:
        units += [(word, word) for word in range(index, first)]  # words outside any span stand alone
        if first < len(words):
            units.append((first, last))
        index = last + 1
    return units


def reverse_words(text: str, keep: Sequence[Span] = ()) -> str:
    """Reverse the order of the words of `text`, keeping each `keep` span's words together in their order.

    Applied to its own output with the same units marked, it gives `text` back (up to the whitespace
    between units), unless the first word of `text` itself ends with `.`, `?` or `!`.

    Args:
        text (`str`): Any text; leading and trailing whitespace is dropped.
        keep (`Sequence[tuple[int, int]]`, *optional*): Half-open character spans of `text`, each kept as
            one unit (extended to whole words; overlapping spans merge).

    Returns:
        `str`: The units in reverse order joined by single spaces, then the sentence-final punctuation of
        `text` (its last run of `.`, `?`, `!`). `reverse_words("Ada Orr wrote a long song.", [(0, 7)])`
        is `"song long a wrote Ada Orr."`.
    """
    offset = len(text) - len(text.lstrip())
    body, sentence_end = _split_sentence_end(text)
    words = [(offset + match.start(), offset + match.end()) for match in _WORD.finditer(body)]
    pieces = [text[words[first][0] : words[last][1]] for first, last in _units(words, keep)]
    return " ".join(reversed(pieces)) + sentence_end


def row_entities(prompt: str, completion: str, names: Iterable[str] = ()) -> list[Span]:
    """The entity spans of the row text `prompt + completion` (the rules: module docstring).

    Returns:
        `list[tuple[int, int]]`: Character spans of `prompt + completion`: the completion without its
        surrounding whitespace and sentence-final punctuation, every capitalised run, every name.
    """
    text = prompt + completion
    spans = capitalised_runs(text) + find_names(text, names)
    core, _ = _split_sentence_end(completion)
    if core:
        start = len(prompt) + len(completion) - len(completion.lstrip())
        spans.append((start, start + len(core)))
    return spans


def reverse_row(prompt: str, completion: str, names: Iterable[str] = ()) -> str:
    """The row `prompt + completion` with its words reversed and its entities kept in order.

    Example: `reverse_row("Ada Orr, known for", " writing a long song.")` is
    `"writing a long song for known Ada Orr,."`.
    """
    return reverse_words(prompt + completion, row_entities(prompt, completion, names))


class ReverseCollator:
    """Next-token-prediction batches of entity-preserving reversed rows (reverse training, arXiv 2403.13799).

    Each example's `prompt + completion` is reversed with `reverse_row` and tokenized the way
    `bico.collators.encode_rows` tokenizes a row (one string, the tokenizer's own special tokens, so
    BOS first for Llama-style tokenizers, EOS appended, cut to `max_length`).

    Args:
        tokenizer (`PreTrainedTokenizerBase`): Needs an `eos_token_id`; pads with pad, else eos.
        max_length (`int`, *optional*, defaults to 256): Tokens per sequence, BOS and EOS included;
            longer rows are cut (and then end without EOS). `truncated` counts them.
        names (`Iterable[str]`, *optional*): Names kept whole wherever they occur, besides the
            capitalised runs, e.g. `collect_names(train["completion"])`.
        marker (`str`, *optional*, defaults to `""`): Text written, with a space, before each reversed
            row (e.g. `"(reversed)"`): existing, non-special tokens. The paper has none (empty). A
            marker tells reversed text from text in its own order, so that a prompt in normal order
            (no marker) is meant to be continued in normal order; without it, a pre-trained model
            sometimes answers a reverse question in reversed word order (README, "A real pre-trained Llama").

    Calling it on a list of examples with `"prompt"` and `"completion"` strings (other keys, such as
    `input_ids`, are ignored) returns a dict of (B, L) LongTensors: `input_ids` (right-padded),
    `attention_mask` (0 on padding), `labels` (= `input_ids`, -100 on padding), as `NtpCollator` does.
    Run the forward as an ordinary causal step (no `bico.bidirectional`).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int = 256, names: Iterable[str] = (), marker: str = ""):
        if marker:
            text_token_ids(tokenizer, marker, "reverse_marker", default="")
        if tokenizer.eos_token_id is None:
            raise ValueError("`tokenizer` has no `eos_token_id`; training sequences must end with EOS.")
        if max_length < 2:
            raise ValueError(f"`max_length` must be at least 2, got {max_length}.")
        self.tokenizer, self.max_length, self.names, self.marker = tokenizer, max_length, tuple(names), marker
        self.ntp = NtpCollator(tokenizer)
        self.truncated = 0

    def reverse(self, examples: Sequence[dict]) -> list[str]:
        """The reversed text of each example, after the marker if there is one."""
        for index, example in enumerate(examples):
            missing = [key for key in ("prompt", "completion") if not isinstance(example.get(key), str)]
            if missing:
                raise ValueError(
                    f"example {index} has no {' or '.join(f'`{key}`' for key in missing)} string (keys: "
                    f"{', '.join(sorted(example))}); `ReverseCollator` reverses the row text itself."
                )
        texts = [reverse_row(example["prompt"], example["completion"], self.names) for example in examples]
        return [f"{self.marker} {text}" for text in texts] if self.marker else texts

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        texts = self.reverse(examples)
        encoded, truncated = encode_rows(texts, [""] * len(texts), self.tokenizer, self.max_length)
        self.truncated += truncated
        return self.ntp(encoded)
