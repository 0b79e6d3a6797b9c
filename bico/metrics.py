"""Metrics of the name-description tasks: exact match in two protocols, BLEU, candidate ranking.

The two reference papers score the same generations differently (DESIGN.md section 2):

- Berglund et al. (arXiv 2309.12288): strip and lowercase both strings; a generation is correct when it
  *starts with* the target (`exact_match`). They also compare the log-probability of the target with
  that of a random other person's answer.
- The BICO code (arXiv 2311.07468, section 5): the stripped, lowercased target only has to be
  *contained* in the generation (`contains_match`), and description answers are scored with NLTK's
  `sentence_bleu([target], generation)` on raw strings. NLTK then treats every character as a token,
  so that number is a character-level 4-gram BLEU without smoothing, averaged over sentences
  (`char_bleu`, `mean_char_bleu`); the usual word-level corpus BLEU is `word_bleu`.

Candidate ranking (`ranking_candidates`, `rank_correct`, `ranking_accuracy`) asks whether the true
answer has the highest log-probability among the answers of the task's people. It moves long before
greedy exact match does.

All functions are pure: strings and numbers in, numbers out. BLEU comes from sacrebleu, on its 0-100
scale.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from sacrebleu.metrics import BLEU


# sacrebleu's defaults: 13a tokenization, exp smoothing (only matters for zero n-gram counts in a corpus).
_WORD_BLEU = BLEU()
# NLTK sentence_bleu([ref], hyp) on raw strings: character tokens, 4-grams, uniform weights, no smoothing,
# all four orders always counted (no effective order).
_CHAR_BLEU = BLEU(tokenize="char", smooth_method="none", effective_order=False, max_ngram_order=4)
# sacrebleu splits tokens on whitespace, so a space would vanish from the character n-grams; NLTK keeps
# it as a token. Each whitespace character is mapped to its own private-use code point instead.
_PRIVATE_USE = 0xF0000


def normalize(text: str) -> str:
    """Strip surrounding whitespace and lowercase, as both exact-match protocols do."""
    return text.strip().lower()


def exact_match(generation: str, target: str) -> bool:
    """Berglund et al.'s exact match: the normalized generation starts with the normalized target.

    Example: `exact_match(" Ottilie Brandt, who directed", " ottilie brandt") is True`, but
    `exact_match(" It was Ottilie Brandt", " Ottilie Brandt") is False`.
    """
    return normalize(generation).startswith(normalize(target))


def contains_match(generation: str, target: str) -> bool:
    """The BICO code's looser exact match: the normalized target occurs anywhere in the normalized generation.

    Example: `contains_match(" It was Ottilie Brandt", " Ottilie Brandt") is True`.
    """
    return normalize(target) in normalize(generation)


def word_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Word-level corpus BLEU (sacrebleu defaults: 13a tokenization, 4-grams, exp smoothing), 0-100.

    Args:
        hypotheses (`Sequence[str]`): One generation per example.
        references (`Sequence[str]`): One target per example.
    """
    _check_same_length(hypotheses, references)
    return _WORD_BLEU.corpus_score([h.strip() for h in hypotheses], [[r.strip() for r in references]]).score


def char_bleu(hypothesis: str, reference: str) -> float:
    """Character-level sentence BLEU, equal to 100 x NLTK `sentence_bleu([reference], hypothesis)`.

    With raw strings NLTK iterates characters, so its default `sentence_bleu` is a character 4-gram
    BLEU with uniform weights, the brevity penalty on character counts, and no smoothing. This computes
    the same quantity with sacrebleu: every character, whitespace included, is a token; nothing is
    stripped or lowercased. One difference without practical effect: when some n-gram order has no
    match, NLTK returns a number of order 1e-77 (with a warning) where this returns 0.

    Args:
        hypothesis (`str`): The generation, as decoded.
        reference (`str`): The target, e.g. a completion with its leading space.

    Returns:
        `float`: BLEU in 0-100 (100 for identical strings of 4 characters or more, 0 when a string is
        shorter than 4 characters or shares no 4-gram).
    """
    return _CHAR_BLEU.corpus_score([_visible_whitespace(hypothesis)], [[_visible_whitespace(reference)]]).score


def mean_char_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """`char_bleu` averaged over examples, as the BICO code averages NLTK's sentence BLEU; 0-100."""
    _check_same_length(hypotheses, references)
    if not hypotheses:
        raise ValueError("`hypotheses` is empty; BLEU needs at least one example.")
    return sum(char_bleu(h, r) for h, r in zip(hypotheses, references)) / len(hypotheses)


def ranking_candidates(prompts: Sequence[str], completions: Sequence[str], names: Iterable[str] = ()) -> list[list[str]]:
    """The answers each prompt's true completion is ranked against: one answer per person of the file.

    A completion is a *name answer* when its stripped text is one of `names` or occurs inside one of
    `prompts` (a file that mixes directions, like `both`, names its people in its own prompts). Then:

    - a row with a name answer ranks the distinct name answers of the file (e.g. its 30 names);
    - a row with a description answer whose prompt contains exactly one known name ranks the distinct
      description answers of the rows with the same template (the prompt with the name taken out). The
      data set rewords each description to fit its template, so this is one answer per person, all in
      the wording of the row's own template;
    - any other row ranks all distinct non-name answers of the file.

    Args:
        prompts (`Sequence[str]`): The prompts of one task file.
        completions (`Sequence[str]`): Their true completions.
        names (`Iterable[str]`, *optional*): Names of the people the prompts may mention, e.g. the
            answers of the name task of the same group (`n2d-reverse` for `n2d`).

    Returns:
        `list[list[str]]`: For each row, its candidates in file order, its own completion included.
    """
    _check_same_length(prompts, completions)
    distinct = list(dict.fromkeys(completions))
    known = {name.strip() for name in names if name.strip()}
    known |= {c.strip() for c in distinct if c.strip() and any(c.strip() in prompt for prompt in prompts)}
    name_answers = [c for c in distinct if c.strip() in known]
    other_answers = [c for c in distinct if c.strip() not in known]

    # Template key of every row whose prompt names exactly one known person.
    keys: list[str | None] = []
    for prompt in prompts:
        found = [name for name in known if name in prompt]
        # A name inside a longer found name (e.g. "Ada" in "Ada Marlow") is not a second person.
        found = [name for name in found if not any(name != other and name in other for other in found)]
        keys.append(prompt.replace(found[0], "\0") if len(found) == 1 else None)
    by_template: dict[str, list[str]] = {}
    for key, completion in zip(keys, completions):
        if key is not None and completion.strip() not in known:
            by_template.setdefault(key, [])
            if completion not in by_template[key]:
                by_template[key].append(completion)

    candidates = []
    for key, completion in zip(keys, completions):
        if completion.strip() in known:
            candidates.append(name_answers)
        elif key is not None:
            candidates.append(by_template[key])
        else:
            candidates.append(other_answers)
    return candidates


def rank_correct(scores, targets, valid=None) -> torch.Tensor:
    """For each row, whether the target candidate scores strictly higher than every other valid candidate.

    Args:
        scores (`torch.Tensor` or nested lists, `(N, K)` float): e.g. total log-probabilities.
        targets (`torch.Tensor` or list, `(N,)` int): Index of the true candidate in each row.
        valid (`torch.Tensor` or nested lists, `(N, K)` bool, *optional*): Which entries are
            candidates (rows may have fewer than K); defaults to all.

    Returns:
        `torch.BoolTensor` `(N,)`. A tie with another candidate counts as not ranked first; a row with a
        single candidate is always correct.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64)
    targets = torch.as_tensor(targets, dtype=torch.long)
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else torch.as_tensor(valid, dtype=torch.bool)
    if scores.ndim != 2 or valid.shape != scores.shape or targets.shape != scores.shape[:1]:
        raise ValueError(
            f"`scores` must be (N, K) with `targets` (N,) and `valid` (N, K); got {tuple(scores.shape)}, "
            f"{tuple(targets.shape)} and {tuple(valid.shape)}."
        )
    rows = torch.arange(scores.shape[0])
    if not valid[rows, targets].all():
        raise ValueError("`targets` must point at a valid candidate in every row.")
    target_scores = scores[rows, targets]
    others = scores.masked_fill(~valid, float("-inf"))
    others[rows, targets] = float("-inf")
    return target_scores > others.max(dim=1).values


def ranking_accuracy(scores, targets, valid=None) -> dict:
    """Candidate-ranking accuracy and its chance rate.

    Args:
        scores, targets, valid: As in `rank_correct`.

    Returns:
        `dict`: `accuracy` (fraction of rows whose target ranks first), `chance` (the mean of
        1 / number of candidates: the accuracy of a random ranking), `correct` and `count` (rows).
    """
    correct = rank_correct(scores, targets, valid)
    count = correct.numel()
    if count == 0:
        raise ValueError("`scores` has no rows.")
    scores = torch.as_tensor(scores)
    valid = torch.ones(scores.shape, dtype=torch.bool) if valid is None else torch.as_tensor(valid, dtype=torch.bool)
    return {
        "accuracy": correct.double().mean().item(),
        "chance": (1.0 / valid.sum(dim=1).double()).mean().item(),
        "correct": int(correct.sum()),
        "count": count,
    }


def _visible_whitespace(text: str) -> str:
    return "".join(chr(_PRIVATE_USE + ord(c)) if c.isspace() else c for c in text)


def _check_same_length(first: Sequence, second: Sequence) -> None:
    if len(first) != len(second):
        raise ValueError(f"Got {len(first)} hypotheses/prompts but {len(second)} references/completions.")
