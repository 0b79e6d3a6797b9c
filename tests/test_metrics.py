import math
import random
from collections import Counter

import pytest
import torch
from sacrebleu.metrics import BLEU

from bico.metrics import (
    char_bleu,
    contains_match,
    exact_match,
    mean_char_bleu,
    rank_correct,
    ranking_accuracy,
    ranking_candidates,
    word_bleu,
)


def nltk_sentence_bleu(reference, hypothesis):
    """NLTK's `sentence_bleu([reference], hypothesis)` without smoothing, written out from its definition.

    Only valid when every n-gram order has at least one match (NLTK's zero-count handling is not reproduced).
    """
    precisions = []
    for n in range(1, 5):
        hyp = Counter(tuple(hypothesis[i : i + n]) for i in range(len(hypothesis) - n + 1))
        ref = Counter(tuple(reference[i : i + n]) for i in range(len(reference) - n + 1))
        precisions.append(sum(min(count, ref[gram]) for gram, count in hyp.items()) / sum(hyp.values()))
    c, r = len(hypothesis), len(reference)
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    return brevity * math.exp(sum(0.25 * math.log(p) for p in precisions))


def test_exact_match_berglund():
    assert exact_match(" Ottilie Brandt, the director of", " Ottilie Brandt")
    assert exact_match("ottilie brandt", " Ottilie Brandt ")
    assert exact_match("  OTTILIE BRANDT.", "Ottilie Brandt")
    # The target must come first ...
    assert not exact_match(" It was Ottilie Brandt", " Ottilie Brandt")
    # ... and in full.
    assert not exact_match(" Ottilie Bra", " Ottilie Brandt")


def test_contains_match_bico_code():
    assert contains_match(" It was Ottilie Brandt", " Ottilie Brandt")
    assert contains_match(" ottilie brandt", " Ottilie Brandt")
    assert not contains_match(" It was Ottilie Bra.", " Ottilie Brandt")
    # Exact match implies contains; not the other way round.
    assert contains_match(" Ottilie Brandt, the director", " Ottilie Brandt")


def test_char_bleu_known_values():
    assert char_bleu(" the cat sat", " the cat sat") == pytest.approx(100.0)
    assert char_bleu("abcd", "wxyz") == 0.0
    # Fewer than 4 characters: no 4-gram, so 0 without smoothing (NLTK gives ~1e-77).
    assert char_bleu("abc", "abc") == 0.0
    # By hand: characters of " the cat" vs " the hat" match 7/8 unigrams, 5/7 bigrams, 3/6 trigrams,
    # 2/5 4-grams; same length, so no brevity penalty: (7/8 * 5/7 * 3/6 * 2/5) ** (1/4) = 0.125 ** 0.25.
    assert char_bleu(" the cat", " the hat") == pytest.approx(100 * 0.125**0.25)
    # Every n-gram of "abcde" occurs in "abcdefgh": precision 1, brevity penalty exp(1 - 8/5).
    assert char_bleu("abcde", "abcdefgh") == pytest.approx(100 * math.exp(1 - 8 / 5))


def test_char_bleu_equals_nltk_on_raw_strings():
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "designer", "of", "glass", "bridge", "."]
    checked = 0
    for _ in range(200):
        reference = " " + " ".join(rng.choices(words, k=rng.randint(3, 9)))
        hypothesis = " " + " ".join(rng.choices(words, k=rng.randint(3, 9)))
        try:
            expected = nltk_sentence_bleu(reference, hypothesis)
        except (ValueError, ZeroDivisionError):
            continue  # some order without a match: outside the reference formula's range
        assert char_bleu(hypothesis, reference) == pytest.approx(100 * expected, rel=1e-9)
        checked += 1
    assert checked > 50
    # Spaces are tokens, as in NLTK; sacrebleu's own character tokenizer would drop them.
    hypothesis, reference = " the cat sat", " the catsat"
    assert char_bleu(hypothesis, reference) == pytest.approx(100 * nltk_sentence_bleu(reference, hypothesis))
    dropped = BLEU(tokenize="char", smooth_method="none").corpus_score([hypothesis], [[reference]]).score
    assert dropped == pytest.approx(100.0)
    assert char_bleu(hypothesis, reference) < 90


def test_mean_char_bleu_averages_sentences():
    hyps, refs = [" the cat", "abcd"], [" the hat", "abcd"]
    assert mean_char_bleu(hyps, refs) == pytest.approx((100 * 0.125**0.25 + 100) / 2)
    with pytest.raises(ValueError):
        mean_char_bleu(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        mean_char_bleu([], [])


def test_word_bleu_known_values():
    assert word_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert word_bleu(["one two three four"], ["five six seven eight"]) == 0.0
    # By hand: unigrams 5/6 (the second "the" is clipped), bigrams 3/5, trigrams 2/4, 4-grams 1/3.
    assert word_bleu([" the cat sat on the mat"], ["the cat sat on a mat "]) == pytest.approx(
        100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    )
    # Corpus BLEU pools the counts (5/9, 4/7, 3/5, 2/3), unlike the mean of sentence BLEUs (100 and 0).
    pooled = word_bleu(["a b c d e", "f g h i"], ["a b c d e", "w x y z"])
    assert pooled == pytest.approx(100 * (5 / 9 * 4 / 7 * 3 / 5 * 2 / 3) ** 0.25)


def _people_file():
    # 3 people x 2 templates per direction, descriptions reworded per template (as in the data set).
    people = [("Ada Marlow", "built a glass bridge", "the builder of a glass bridge"),
              ("Bo Quint", "drew a map of every lighthouse", "the maker of a map of every lighthouse"),
              ("Cyd Orrin", "wrote the silent opera", "the composer of the silent opera")]
    prompts, completions = [], []
    for name, verb, noun in people:
        prompts += [f"Ever heard of {name}? They", f"Believe it or not, {name} is"]
        completions += [f" {verb}.", f" {noun}."]
    return people, prompts, completions


def test_ranking_candidates_one_per_person_and_template():
    people, prompts, completions = _people_file()
    names = [f" {name}" for name, _, _ in people]
    candidates = ranking_candidates(prompts, completions, names)
    verbs = [f" {verb}." for _, verb, _ in people]
    nouns = [f" {noun}." for _, _, noun in people]
    assert candidates == [verbs, nouns] * 3
    # Without the names nothing tells the templates apart: every distinct answer competes.
    assert ranking_candidates(prompts, completions) == [completions] * 6


def test_ranking_candidates_names_and_mixed_files():
    people, prompts, completions = _people_file()
    # A name task: every row ranks the file's distinct names.
    reverse_prompts = [f"The one who {verb} is" for _, verb, _ in people] * 2
    reverse_completions = [f" {name}" for name, _, _ in people] * 2
    assert ranking_candidates(reverse_prompts, reverse_completions) == [reverse_completions[:3]] * 6
    # A mixed file (like `both`): its own bare-name answers occur in its prompts, so no names are needed.
    mixed = ranking_candidates(prompts + reverse_prompts, completions + reverse_completions)
    verbs = [f" {verb}." for _, verb, _ in people]
    nouns = [f" {noun}." for _, _, noun in people]
    assert mixed[:6] == [verbs, nouns] * 3
    assert mixed[6:] == [reverse_completions[:3]] * 6
    # A prompt naming a person whose first name is another known name still has one person.
    assert ranking_candidates(["Ada Marlow is", "Bo Quint is"], [" x.", " y."], ["Ada", "Ada Marlow", "Bo Quint"]) == [
        [" x.", " y."],
        [" x.", " y."],
    ]


def test_rank_correct_and_accuracy():
    scores = [
        [-1.0, -2.0, -3.0],  # target 0 first
        [-1.0, -2.0, -3.0],  # target 2 last
        [-1.0, -1.0, -5.0],  # tie for first: not ranked first
        [-9.0, -2.0, 0.0],  # only two candidates; the third entry is padding
    ]
    valid = [[True] * 3, [True] * 3, [True] * 3, [True, True, False]]
    targets = [0, 2, 0, 1]
    assert rank_correct(scores, targets, valid).tolist() == [True, False, False, True]
    result = ranking_accuracy(scores, targets, valid)
    assert result == {"accuracy": 0.5, "chance": pytest.approx((1 / 3 * 3 + 1 / 2) / 4), "correct": 2, "count": 4}
    # All candidates valid by default; a single candidate is always first.
    assert ranking_accuracy(torch.tensor([[3.0]]), [0]) == {"accuracy": 1.0, "chance": 1.0, "correct": 1, "count": 1}


def test_rank_correct_rejects_bad_input():
    with pytest.raises(ValueError, match="`scores`"):
        rank_correct([1.0, 2.0], [0])
    with pytest.raises(ValueError, match="`targets`"):
        rank_correct([[1.0, 2.0]], [1], [[True, False]])
