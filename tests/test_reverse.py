"""Entity-preserving reversal: word order, entity rules on every training row, the collator's batches."""

from __future__ import annotations

import re

import pytest
import torch

from bico.collators import IGNORE_INDEX, encode_rows, find_word_starts
from bico.data import load_task, load_train
from bico.reverse import (
    ReverseCollator,
    capitalised_runs,
    collect_names,
    find_names,
    reverse_row,
    reverse_words,
    row_entities,
)


def _spans_of(text: str, pieces) -> list[tuple[int, int]]:
    return [(text.index(piece), text.index(piece) + len(piece)) for piece in pieces]


def _runs(text: str) -> list[str]:
    return [text[start:end] for start, end in capitalised_runs(text)]


def test_reverse_words_reverses_words_and_keeps_units_whole():
    assert reverse_words("Ada Orr wrote a long song.") == "song long a wrote Orr Ada."
    assert reverse_words("Ada Orr wrote a long song.", [(0, 7)]) == "song long a wrote Ada Orr."
    # A span is extended to whole words, and overlapping spans make one unit.
    assert reverse_words("one two three four", [(1, 5)]) == "four three one two"
    assert reverse_words("one two three four five", [(0, 7), (4, 13)]) == "five four one two three"
    # Punctuation moves with its word; the sentence-final run stays at the end; quotes are words' own.
    assert reverse_words('Ada Orr, of "Rye Nights", sang??') == 'sang Nights", "Rye of Orr, Ada??'
    assert reverse_words('  wrote "A Long Song.".  ') == 'Song." Long "A wrote.'
    assert reverse_words("") == "" and reverse_words("Ada") == "Ada" and reverse_words("...") == "..."


def test_capitalised_runs_follow_the_documented_rules():
    assert _runs("Ever heard of Ada Orr? They sang") == ["Ada Orr?"]
    assert _runs("Q: Who wrote it? A: Well, Bo Lind did") == ["Bo Lind"]  # "Q: Who" and "A: Well," are not runs
    assert _runs("Quiz question: who is Ada Orr? Answer:") == ["Ada Orr?"]
    assert _runs("Meet Anna van der Berg and J. R. Tolk") == ["Meet Anna van der Berg", "J. R. Tolk"]
    assert _runs('the author of "The Long Rye Song.", a book') == ['"The Long Rye Song.",']
    assert _runs("Ada sang to Orr") == []  # single capitalised words need no keeping
    assert find_names("Ada Orr met Adam Orrin and Ada Orr's son", ["Ada Orr"]) == [(0, 7), (27, 34)]


def _people(data_dir) -> set[str]:
    """The 90 names, from the answers of the test files (each answer starts with " First Last")."""
    names = set()
    for task in ("d2n", "n2d-reverse", "both"):
        for completion in load_task(task, data_dir)["completion"]:
            if completion.strip()[:1].isupper():
                names.add(" ".join(completion.split()[:2]).rstrip(".,"))
    return names


@pytest.fixture(params=["data", "berglund"])
def any_data_dir(request, data_dir):
    return data_dir if request.param == "data" else request.getfixturevalue("berglund_dir")


def test_every_training_row_keeps_its_name_and_its_completion_whole(any_data_dir):
    people = _people(any_data_dir)
    assert len(people) == 90
    train = load_train(any_data_dir)
    for prompt, completion in zip(train["prompt"], train["completion"]):
        text, reversed_text = prompt + completion, reverse_row(prompt, completion)
        (name,) = [person for person in people if person in text]  # one person per row
        assert name in reversed_text, (text, reversed_text)
        # The completion (less its final punctuation) is the first unit of the reversed row.
        core = completion.strip().rstrip(".?!")
        assert reversed_text.startswith(core), (text, reversed_text)
        # A permutation of the row's words: the same characters, in single-spaced units.
        assert sorted(reversed_text.replace(" ", "")) == sorted(text.replace(" ", ""))
        assert "  " not in reversed_text and reversed_text == reversed_text.strip()
        # No capitalised run of a prompt glues another word to the name (it would still be whole).
        assert all(name not in run or run.strip(',.?!:;"') == name for run in _runs(prompt))


def test_reversing_twice_gives_the_row_back(any_data_dir):
    train = load_train(any_data_dir)
    for prompt, completion in list(zip(train["prompt"], train["completion"]))[::7]:
        text = prompt + completion
        # An entity at the end of the row loses the final punctuation, which moves to the end.
        entities = [text[start:end].rstrip(".?!") for start, end in row_entities(prompt, completion)]
        once = reverse_row(prompt, completion)
        # The entities are intact in the reversed text, so they can be found and kept again.
        pieces = [piece for piece in entities if piece in once]
        assert len(pieces) == len(entities)
        assert reverse_words(once, _spans_of(once, pieces)) == text.strip(), text
        assert reverse_words(reverse_words(text), ()) == text.strip()  # plain word reversal too


def test_collect_names_finds_the_answers_of_description_to_name_rows(any_data_dir):
    train = load_train(any_data_dir)
    names = collect_names(train["completion"])
    # The d2p and both groups answer with their names; p2d people occur only in prompts.
    assert len(names) == 60 and set(names) <= _people(any_data_dir)
    assert collect_names([" Ada Orr.", " Bo J. Lind now sings", " the baker", " Cy Dunn, who"]) == [
        "Ada Orr", "Bo J. Lind", "Cy Dunn"]


def test_names_keep_what_capitalised_runs_miss():
    # A name in lower case is no capitalised run; given in `names`, it is kept whole.
    assert reverse_row("It is ada orr who", " sang.") == "sang who orr ada is It."
    assert reverse_row("It is ada orr who", " sang.", names=["ada orr"]) == "sang who ada orr is It."


def _examples(tokenizer, prompts, completions, max_length=256):
    examples, _ = encode_rows(prompts, completions, tokenizer, max_length)
    return [{**example, "prompt": prompt, "completion": completion, "seed": 0}
            for example, prompt, completion in zip(examples, prompts, completions)]


def test_reverse_collator_makes_ntp_batches_of_the_reversed_rows(tiny_tokenizer, data_dir):
    train = load_train(data_dir)
    prompts, completions = train["prompt"][:8], train["completion"][:8]
    examples = _examples(tiny_tokenizer, prompts, completions)
    batch = ReverseCollator(tiny_tokenizer)(examples)
    texts = [reverse_row(prompt, completion) for prompt, completion in zip(prompts, completions)]
    rows = [tiny_tokenizer(text)["input_ids"] + [tiny_tokenizer.eos_token_id] for text in texts]
    lengths = [len(row) for row in rows]
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (8, max(lengths))
    for index, (row, length) in enumerate(zip(rows, lengths)):
        assert batch["input_ids"][index, :length].tolist() == row
        assert row[0] == tiny_tokenizer.bos_token_id and row[-1] == tiny_tokenizer.eos_token_id
        assert batch["attention_mask"][index].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert batch["labels"][index, :length].tolist() == row
        assert (batch["labels"][index, length:] == IGNORE_INDEX).all()
        assert tiny_tokenizer.decode(row, skip_special_tokens=True) == texts[index]


def test_reverse_collator_tokenization_of_words_and_spaces(tiny_tokenizer):
    examples = _examples(tiny_tokenizer, ["Ada Orr, known for"], [" writing a long song."])
    ids = ReverseCollator(tiny_tokenizer)(examples)["input_ids"]
    tokens = tiny_tokenizer.convert_ids_to_tokens(ids[0].tolist())
    # The reversed row starts like a prompt, without a space; every later word carries its space
    # ("Ġ"), so the completion's first word is tokenized as at the start of a text.
    assert tokens[0] == "<s>" and not tokens[1].startswith("Ġ") and tokens[-1] == "</s>"
    words = (find_word_starts(ids, tiny_tokenizer).long().cumsum(dim=1) - 1)[0]
    decoded = [tiny_tokenizer.decode(ids[0][words == word].tolist(), skip_special_tokens=True)
               for word in range(int(words[-1]) + 1)]
    assert [word for word in decoded if word] == ["writing", " a", " long", " song", " for", " known", " Ada", " Orr,."]


def test_reverse_collator_cuts_at_max_length_and_checks_its_input(tiny_tokenizer):
    examples = _examples(tiny_tokenizer, ["Ada Orr, known for"], [" writing a long song."])
    collator = ReverseCollator(tiny_tokenizer, max_length=6)
    batch = collator(examples)
    assert batch["input_ids"].shape == (1, 6) and batch["input_ids"][0, -1] != tiny_tokenizer.eos_token_id
    assert collator.truncated == 1
    with pytest.raises(ValueError, match=re.escape("example 0 has no `prompt` or `completion` string")):
        collator([{"input_ids": [1, 40, 2], "index": 0, "seed": 3}])
    with pytest.raises(ValueError, match="`max_length` must be at least 2, got 1"):
        ReverseCollator(tiny_tokenizer, max_length=1)
    assert torch.equal(ReverseCollator(tiny_tokenizer, names=["Ada Orr"])(examples)["input_ids"],
                       ReverseCollator(tiny_tokenizer)(examples)["input_ids"])


def test_reverse_marker_goes_before_each_reversed_row_and_is_checked(tiny_tokenizer):
    examples = _examples(tiny_tokenizer, ["Ada Orr, known for"], [" writing a long song."])
    plain = ReverseCollator(tiny_tokenizer)
    marked = ReverseCollator(tiny_tokenizer, marker="(reversed)")
    assert marked.reverse(examples) == ["(reversed) writing a long song for known Ada Orr,."]
    ids = marked(examples)["input_ids"][0].tolist()
    assert ids == tiny_tokenizer("(reversed) writing a long song for known Ada Orr,.")["input_ids"] + [tiny_tokenizer.eos_token_id]
    # The reversed words keep their tokens: only the marker's come in front (after BOS).
    reversed_ids = plain(examples)["input_ids"][0].tolist()
    assert ids[-(len(reversed_ids) - 2):] == reversed_ids[2:]
    with pytest.raises(ValueError, match=re.escape("`reverse_marker` '</s>' is a special token of the tokenizer")):
        ReverseCollator(tiny_tokenizer, marker="</s>")


def test_reverse_marker_reaches_the_collator_from_the_config(tiny_tokenizer, data_dir):
    from bico import TrainConfig
    from bico.compare import parse_variant, variant_label
    from bico.objectives import OBJECTIVES

    config = TrainConfig(objective="reverse", data_dir=str(data_dir), reverse_marker="(reversed)")
    assert OBJECTIVES["reverse"].make_collator(tiny_tokenizer, config).marker == "(reversed)"
    assert variant_label(config) == "reverse:reverse_marker=(reversed)"
    assert parse_variant("reverse:reverse_marker=(reversed)") == ("reverse", {"reverse_marker": "(reversed)"})
    with pytest.raises(ValueError, match="`reverse_marker` must be text without surrounding spaces"):
        TrainConfig(objective="reverse", reverse_marker=" (reversed)")
