"""bico.entities and whole-entity masking: spans, their tokens (byte-level BPE, SentencePiece, SmolLM2), the BICO masks."""

import logging
from types import SimpleNamespace

import pytest
import torch

from bico.collators import IGNORE_INDEX, BicoCollator, encode_rows, row_seed
from bico.config import TrainConfig
from bico.data import load_train
from bico.entities import EntityFinder, entity_spans, span_tokens
from bico.masking import mask_placeholders, maskable_positions


TEXT = 'Ever heard of Ada van Orr? She wrote "Rye Nights", said Tessaly.'
SCHEDULES = [dict(schedule="fixed"), dict(schedule="uniform"), dict(schedule="span", mask_prob=0.3)]


@pytest.fixture(scope="module")
def train(data_dir):
    return load_train(data_dir)


def _rows(tokenizer, train, count=300, seed=0):
    examples, _ = encode_rows(train["prompt"][:count], train["completion"][:count], tokenizer, max_length=256)
    return [{**example, "seed": row_seed(seed, 0, example["index"])} for example in examples]


def _assert_spell(tokenizer, input_ids, spans, entities) -> None:
    """The tokens of each span decode to its entity, give or take punctuation a token shares with it ("ore,")."""
    words = [tokenizer.decode([input_ids[k] for k in tokens]).strip() for tokens in spans]
    assert len(words) == len(entities)
    for word, entity in zip(words, entities):
        assert word.startswith(entity) and not word[len(entity) :].strip(",.;:?!\"'"), (word, entity)


def _targets(batch) -> torch.Tensor:
    return batch["labels"] != IGNORE_INDEX  # (B, L)


# --------------------------------------------------------------------------------------------------
# Spans and their tokens
# --------------------------------------------------------------------------------------------------


def test_entity_spans_are_runs_and_names_trimmed_and_merged():
    spans = entity_spans(TEXT, names=["Tessaly", "Ada van Orr", "Nobody Here"])
    assert [TEXT[start:end] for start, end in spans] == ["Ada van Orr", "Rye Nights", "Tessaly"]
    assert [TEXT[start:end] for start, end in entity_spans(TEXT)] == ["Ada van Orr", "Rye Nights"]  # one word: a name only
    assert entity_spans("Tessalyn sang.", ["Tessaly"]) == []  # whole words only
    assert entity_spans("the rain fell on the hills.") == []


def test_span_tokens_take_every_overlapping_token_and_no_special_one():
    offsets = [(0, 0), (0, 3), (3, 7), (7, 8), (8, 13), (13, 13)]  # BOS, "Ada", " Orr", ",", " sang", EOS
    assert span_tokens(offsets, [(0, 7), (9, 11), (30, 35)]) == [[1, 2], [4]]
    assert span_tokens(offsets, [(7, 8)]) == [[3]]


def test_entity_tokens_spell_the_entity_and_both_alignments_agree(each_tokenizer, train, answer_names):
    tokenizer = each_tokenizer
    finder = EntityFinder(tokenizer, answer_names)
    found = 0
    for row in _rows(tokenizer, train):
        text = row["prompt"] + row["completion"]
        spans = finder.row_tokens(row["input_ids"], text)
        assert finder.row_tokens(row["input_ids"]) == spans  # decoded and re-tokenized, as in BicoTrainer
        _assert_spell(tokenizer, row["input_ids"], spans, [text[start:end] for start, end in entity_spans(text, answer_names)])
        assert all(tokens == list(range(tokens[0], tokens[-1] + 1)) for tokens in spans)  # contiguous
        found += len(spans)
    assert finder.unaligned == 0 and found >= 300


@pytest.mark.real
def test_entity_tokens_on_the_smollm2_tokenizer(smollm2_tokenizer, train, answer_names):
    tokenizer = smollm2_tokenizer
    assert tokenizer.bos_token_id not in tokenizer("Ada Orr")["input_ids"]  # no BOS: a name may be the first token
    rows = _rows(tokenizer, train, count=200)
    finder = EntityFinder(tokenizer, answer_names)
    for row in rows:
        text = row["prompt"] + row["completion"]
        spans = finder.row_tokens(row["input_ids"], text)
        assert finder.row_tokens(row["input_ids"]) == spans
        _assert_spell(tokenizer, row["input_ids"], spans, [text[start:end] for start, end in entity_spans(text, answer_names)])
    # The first token of a name that opens the row is never a target; the rest of the name is.
    starting = [row for row in rows if finder.row_tokens(row["input_ids"])[:1] and finder.row_tokens(row["input_ids"])[0][0] == 0]
    assert len(starting) >= 20
    batch = BicoCollator(tokenizer, mask_prob=0.01, entity_mask_prob=1.0, entity_names=answer_names)(starting)
    for row, example in enumerate(starting):
        name = finder.row_tokens(example["input_ids"])[0]
        assert len(name) >= 2 and not _targets(batch)[row, 0] and _targets(batch)[row, name[1:]].all()


def test_a_row_whose_ids_do_not_round_trip_gets_the_schedules_mask_only(tiny_tokenizer, caplog):
    text = "Petronel Sandoval, celebrated for discovering a dwarf planet called Tessaly."
    ids = tiny_tokenizer(text)["input_ids"] + [tiny_tokenizer.eos_token_id]
    # The same text spelled with other tokens: "P" + "et" -> "P" + "e" + "t".
    assert tiny_tokenizer.convert_ids_to_tokens(ids[1:3]) == ["P", "et"]
    odd = [ids[0], ids[1], *tiny_tokenizer.convert_tokens_to_ids(["e", "t"]), *ids[3:]]
    assert tiny_tokenizer.decode(odd, skip_special_tokens=True) == text
    finder = EntityFinder(tiny_tokenizer)
    assert finder.row_tokens(ids, text) and finder.unaligned == 0
    with caplog.at_level(logging.WARNING, logger="bico.entities"):
        assert finder.row_tokens(odd, text) == [] and finder.row_tokens(odd) == []
    assert finder.unaligned == 2 and caplog.text.count("cannot be located") == 1  # warned once
    rows = [{"input_ids": odd, "seed": 5, "prompt": text, "completion": ""}]
    plain = BicoCollator(tiny_tokenizer, mask_prob=0.15)(rows)
    entity = BicoCollator(tiny_tokenizer, mask_prob=0.15, entity_mask_prob=1.0)
    assert torch.equal(entity(rows)["labels"], plain["labels"]) and entity.entities.unaligned == 1


# --------------------------------------------------------------------------------------------------
# Whole-entity masking in BICO
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", SCHEDULES)
def test_probability_zero_keeps_the_masks_and_entities_come_on_top(each_tokenizer, train, answer_names, case):
    tokenizer = each_tokenizer
    rows = _rows(tokenizer, train, count=200)
    plain = BicoCollator(tokenizer, **case)(rows)
    assert torch.equal(BicoCollator(tokenizer, entity_mask_prob=0.0, entity_names=answer_names, **case)(rows)["labels"], plain["labels"])
    collator = BicoCollator(tokenizer, entity_mask_prob=0.5, entity_names=answer_names, **case)
    entity = collator(rows)
    assert not (_targets(plain) & ~_targets(entity)).any()  # the schedule's draws are unchanged
    assert _targets(entity).sum() > _targets(plain).sum()
    assert torch.equal(entity["attention_mask"].bool(), plain["attention_mask"].bool() & ~_targets(entity))
    assert (entity["input_ids"][_targets(entity)] == collator.placeholder_id).all()


def test_every_entity_masked_whole_at_probability_one(each_tokenizer, train, answer_names):
    tokenizer = each_tokenizer
    rows = _rows(tokenizer, train, count=100)
    batch = BicoCollator(tokenizer, mask_prob=0.01, entity_mask_prob=1.0, entity_names=answer_names)(rows)
    finder = EntityFinder(tokenizer, answer_names)
    for row, example in enumerate(rows):
        for tokens in finder.row_tokens(example["input_ids"], example["prompt"] + example["completion"]):
            assert tokens[0] >= 1 and _targets(batch)[row, tokens].all()  # BOS comes first


def test_a_name_at_the_first_position_loses_all_but_its_first_token(tiny_tokenizer, answer_names):
    # Without BOS (SmolLM2 adds none) a row may start with the name; nothing predicts position 0.
    text = "Petronel Sandoval, celebrated for discovering a dwarf planet called Tessaly."
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    rows = [{"input_ids": ids, "seed": seed, "prompt": text, "completion": ""} for seed in range(20)]
    name = EntityFinder(tiny_tokenizer, answer_names).row_tokens(ids, text)[0]
    assert name[0] == 0 and tiny_tokenizer.decode([ids[k] for k in name]) == "Petronel Sandoval"
    targets = _targets(BicoCollator(tiny_tokenizer, mask_prob=0.01, entity_mask_prob=1.0, entity_names=answer_names)(rows))
    assert not targets[:, 0].any() and targets[:, name[1:]].all()


def test_a_row_without_entities_keeps_the_schedules_mask(tiny_tokenizer):
    examples, _ = encode_rows(["the rain fell on the hills"], [" and the rivers rose."], tiny_tokenizer, max_length=256)
    for case in SCHEDULES:
        rows = [{**examples[0], "seed": seed} for seed in range(10)]
        plain = BicoCollator(tiny_tokenizer, **case)(rows)
        entity = BicoCollator(tiny_tokenizer, entity_mask_prob=1.0, **case)(rows)
        assert torch.equal(entity["labels"], plain["labels"]) and _targets(entity).sum(dim=1).min() >= 1


def test_entity_coins_fall_at_the_given_rate_and_follow_the_row_seed(tiny_tokenizer, train, answer_names):
    rows = _rows(tiny_tokenizer, train, count=600)
    finder = EntityFinder(tiny_tokenizer, answer_names)
    collator = BicoCollator(tiny_tokenizer, mask_prob=0.05, entity_mask_prob=0.5, entity_names=answer_names)
    targets = _targets(collator(rows))
    whole = [bool(targets[row, tokens[1:]].all()) for row, example in enumerate(rows)
             for tokens in finder.row_tokens(example["input_ids"]) if len(tokens) >= 3]
    assert len(whole) >= 500 and 0.44 < sum(whole) / len(whole) < 0.58  # 0.5 + what the 5% schedule masks by chance
    # Keyed on the row's seed: the same masks in another batch; other seeds give other masks.
    alone = [_targets(collator(rows[row : row + 1]))[0, : len(rows[row]["input_ids"])] for row in (3, 100)]
    assert torch.equal(alone[0], targets[3, : len(alone[0])]) and torch.equal(alone[1], targets[100, : len(alone[1])])
    reseeded = _targets(collator([{**row, "seed": row["seed"] + 1} for row in rows]))
    assert not torch.equal(reseeded, targets)


def test_bad_entity_arguments_are_value_errors(tiny_tokenizer):
    message = r"`entity_mask_prob` must be in \[0, 1\] \(0 masks no whole entity\), got 1.5"
    with pytest.raises(ValueError, match=message):
        BicoCollator(tiny_tokenizer, entity_mask_prob=1.5)
    with pytest.raises(ValueError, match=message):
        TrainConfig(entity_mask_prob=1.5)
    with pytest.raises(ValueError, match=r"`entity_mask_prob` must be in \[0, 1\].*got -0.1"):
        BicoCollator(tiny_tokenizer, entity_mask_prob=-0.1)
    ids, mask = torch.tensor([[1, 40, 41, 2]]), torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="`entities` must give the entity spans of each of the 1 rows"):
        mask_placeholders(ids, mask, maskable_positions(ids, mask, [1, 2]), 0, entity_mask_prob=0.5)
    with pytest.raises(ValueError, match="not a fast tokenizer"):
        EntityFinder(SimpleNamespace(is_fast=False))
