"""bico.demask: masked copy + separator + row, the loss on the row only, masking options, markers, length, registration."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from bico.collators import IGNORE_INDEX, encode_rows, row_seed, row_text
from bico.config import TrainConfig
from bico.data import load_train
from bico.demask import DEFAULT_MARKER, DEFAULT_SEPARATOR, DemaskCollator
from bico.entities import EntityFinder
from bico.masking import find_word_starts
from bico.objectives import OBJECTIVES


@pytest.fixture(scope="module")
def train(data_dir):
    return load_train(data_dir)


def _rows(tokenizer, train, count=200, seed=0, max_length=256):
    examples, _ = encode_rows(train["prompt"][:count], train["completion"][:count], tokenizer, max_length=max_length)
    return [{**example, "seed": row_seed(seed, 0, example["index"])} for example in examples]


def _parts(collator, batch, row, example):
    """The built sequence of `row` cut into (BOS, copy, separator, original, EOS); asserts the layout."""
    ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
    lead, body, end = collator.split(example["input_ids"])
    n, sep = len(body), len(collator.separator_ids)
    assert ids == [*lead, *ids[len(lead) : len(lead) + n], *collator.separator_ids, *body, *end]
    return lead, ids[len(lead) : len(lead) + n], ids[len(lead) + n : len(lead) + n + sep], body, end


def test_layout_copy_separator_row_and_the_loss_on_the_row_only(each_tokenizer, train):
    tokenizer = each_tokenizer
    rows = _rows(tokenizer, train)
    collator = DemaskCollator(tokenizer, mask_prob=0.5)
    batch = collator(rows)
    masked = total = first_masked = 0
    for row, example in enumerate(rows):
        lead, copy, _, body, end = _parts(collator, batch, row, example)
        assert lead == [tokenizer.bos_token_id] and end == [tokenizer.eos_token_id]
        assert all(c == t or c == collator.marker_id for c, t in zip(copy, body))
        hidden = [c != t for c, t in zip(copy, body)]
        assert any(hidden)  # at least one per row
        masked, total, first_masked = masked + sum(hidden), total + len(body), first_masked + hidden[0]
        labels = batch["labels"][row]
        prefix = len(lead) + len(body) + len(collator.separator_ids)  # BOS, copy, separator
        assert (labels[:prefix] == IGNORE_INDEX).all()
        assert labels[prefix : prefix + len(body) + 1].tolist() == body + end  # the row and its EOS
        assert (labels[prefix + len(body) + 1 :] == IGNORE_INDEX).all()  # padding
    assert 0.46 < masked / total < 0.54 and 60 < first_masked < 140  # the copy's first token is maskable too
    assert (batch["attention_mask"].sum(dim=1) == torch.tensor([len(r["input_ids"]) * 2 - 2 + len(collator.separator_ids) for r in rows])).all()


def test_masking_options_are_the_bico_ones(tiny_tokenizer, train, answer_names):
    rows = _rows(tiny_tokenizer, train)

    def rates(**options):
        collator = DemaskCollator(tiny_tokenizer, **options)
        batch = collator(rows)
        parts = [_parts(collator, batch, row, example) for row, example in enumerate(rows)]
        return [sum(c != t for c, t in zip(copy, body)) / len(body) for _, copy, _, body, _ in parts]

    fixed = rates(mask_prob=0.3)
    assert 0.26 < sum(fixed) / len(fixed) < 0.34
    uniform = rates(schedule="uniform", mask_min=0.2, mask_max=0.9)
    assert min(uniform) < 0.35 and max(uniform) > 0.75 and 0.48 < sum(uniform) / len(uniform) < 0.62  # a rate per row
    span = DemaskCollator(tiny_tokenizer, mask_prob=0.3, schedule="span")
    batch = span(rows[:50])
    for row, example in enumerate(rows[:50]):  # whole words: a word's tokens are all markers or all kept
        _, copy, _, body, _ = _parts(span, batch, row, example)
        words = find_word_starts(torch.tensor([body]), tiny_tokenizer)[0].long().cumsum(0)  # (n,): word of each token
        hidden = torch.tensor([c != t for c, t in zip(copy, body)])
        assert all(hidden[words == word].all() or not hidden[words == word].any() for word in words.unique())
    # Whole entities on top: at probability 1 every name is hidden in the copy, its first token too.
    collator = DemaskCollator(tiny_tokenizer, mask_prob=0.05, entity_mask_prob=1.0, entity_names=answer_names)
    batch, finder = collator(rows), EntityFinder(tiny_tokenizer, answer_names)
    for row, example in enumerate(rows):
        _, copy, _, _, _ = _parts(collator, batch, row, example)
        spans = finder.row_tokens(example["input_ids"], example["prompt"] + example["completion"])
        assert spans and all(copy[k - 1] == collator.marker_id for tokens in spans for k in tokens)  # k - 1: after BOS


def test_masks_follow_the_row_seed(tiny_tokenizer, train):
    rows = _rows(tiny_tokenizer, train, count=40)
    collator = DemaskCollator(tiny_tokenizer, mask_prob=0.3, entity_mask_prob=0.5)
    batch = collator(rows)
    alone = collator(rows[7:8])
    assert torch.equal(alone["input_ids"][0], batch["input_ids"][7][batch["attention_mask"][7].bool()])
    assert not torch.equal(collator([{**row, "seed": row["seed"] + 1} for row in rows])["input_ids"], batch["input_ids"])


def test_inverted_copy_shows_the_masked_tokens_and_hides_the_rest(tiny_tokenizer, train, answer_names):
    rows = _rows(tiny_tokenizer, train, count=100)
    options = dict(mask_prob=0.15, entity_mask_prob=1.0, entity_names=answer_names)
    plain, inverted = DemaskCollator(tiny_tokenizer, **options), DemaskCollator(tiny_tokenizer, invert_prob=1.0, **options)
    never = DemaskCollator(tiny_tokenizer, invert_prob=0.0, **options)
    half = DemaskCollator(tiny_tokenizer, invert_prob=0.5, **options)
    batches = {name: (c, c(rows)) for name, c in dict(plain=plain, inverted=inverted, never=never, half=half).items()}
    finder = EntityFinder(tiny_tokenizer, answer_names)
    flipped = 0
    for row, example in enumerate(rows):
        copies = {name: _parts(c, batch, row, example)[1] for name, (c, batch) in batches.items()}
        body = _parts(plain, batches["plain"][1], row, example)[3]
        hidden = {name: [c != t for c, t in zip(copy, body)] for name, copy in copies.items()}
        assert copies["never"] == copies["plain"]  # invert_prob 0 draws nothing more: the masks of before
        assert all(a != b for a, b in zip(hidden["plain"], hidden["inverted"]))  # every token: hidden in exactly one
        names = [k - 1 for tokens in finder.row_tokens(example["input_ids"], row_text(example)) for k in tokens]
        assert names and all(not hidden["inverted"][k] for k in names)  # the name is shown ...
        assert sum(hidden["inverted"]) >= 0.6 * (len(body) - len(names))  # ... and most of the rest hidden
        assert copies["half"] in (copies["plain"], copies["inverted"])  # a row's coin, after its mask
        flipped += copies["half"] == copies["inverted"]
    assert 35 <= flipped <= 65
    # The batch the registered objective builds from a TrainConfig inverts too.
    config = TrainConfig(objective="demask", mask_prob=0.15, entity_mask_prob=1.0, demask_invert_prob=1.0)
    assert OBJECTIVES["demask"].make_collator(tiny_tokenizer, config).invert_prob == 1.0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=f"`invert_prob` \\(--demask_invert_prob\\) must be in \\[0, 1\\].*got {bad}"):
            DemaskCollator(tiny_tokenizer, invert_prob=bad)
        with pytest.raises(ValueError, match=f"`demask_invert_prob` must be in \\[0, 1\\].*got {bad}"):
            TrainConfig(objective="demask", demask_invert_prob=bad)


def test_rows_without_bos_mask_and_predict_the_first_token(tiny_tokenizer, answer_names):
    text = "Petronel Sandoval, celebrated for discovering a dwarf planet called Tessaly."
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    collator = DemaskCollator(tiny_tokenizer, mask_prob=0.05, entity_mask_prob=1.0, entity_names=answer_names)
    batch = collator([{"input_ids": ids, "seed": 3, "prompt": text, "completion": ""}])
    lead, copy, separator, body, _ = _parts(collator, batch, 0, {"input_ids": ids})
    name = EntityFinder(tiny_tokenizer, answer_names).row_tokens(ids, text)[0]
    assert lead == [] and name[0] == 0 and all(copy[k] == collator.marker_id for k in name)
    n = len(body)
    assert batch["labels"][0, n].item() == IGNORE_INDEX and batch["labels"][0, n + 1].item() == body[0]  # SEP predicts t1


def test_too_long_rows_are_cut_to_max_length(tiny_tokenizer, train, caplog):
    rows = _rows(tiny_tokenizer, train, count=8)
    longest = max(len(row["input_ids"]) for row in rows)
    fits = DemaskCollator(tiny_tokenizer, max_length=2 * longest)
    assert fits(rows)["input_ids"].shape[1] <= 2 * longest and fits.truncated == 0 and not caplog.text
    collator = DemaskCollator(tiny_tokenizer, max_length=30)
    batch = collator(rows)
    assert caplog.text.count("longer than `max_length`=30; both copies are cut") == 1
    assert batch["input_ids"].shape[1] <= 30 and collator.truncated == sum(2 * len(r["input_ids"]) - 1 > 30 for r in rows) > 0
    for row, example in enumerate(rows):
        lead, copy, _, body, end = _parts(collator, batch, row, example)
        assert body == example["input_ids"][1 : 1 + len(body)]  # both copies keep the same first tokens
        if len(example["input_ids"]) * 2 - 1 > 30:
            assert end == [] and len(lead) + 2 * len(body) + 1 in (29, 30)
    with pytest.raises(ValueError, match="`max_length` must be at least 4 for a demask sequence.*got 3"):
        DemaskCollator(tiny_tokenizer, max_length=3)


def test_marker_and_separator_must_be_existing_visible_tokens(tiny_tokenizer, sentencepiece_tokenizers):
    for tokenizer in [tiny_tokenizer, *sentencepiece_tokenizers.values()]:
        collator = DemaskCollator(tokenizer)  # the defaults exist as tokens in every one
        assert tokenizer.decode([collator.marker_id]).strip() == DEFAULT_MARKER
        assert tokenizer.decode(collator.separator_ids) in (DEFAULT_SEPARATOR, " " + DEFAULT_SEPARATOR)
    spm = sentencepiece_tokenizers["metaspace"]
    bad = [
        (tiny_tokenizer, dict(marker=""), r"`demask_marker` '' maps to no token; it must be visible text .*default is '_'"),
        (tiny_tokenizer, dict(marker="</s>"), r"`demask_marker` '</s>' is a special token"),
        (tiny_tokenizer, dict(marker="Petronel"), r"`demask_marker` 'Petronel' is 5 tokens \['P', 'et', 'r', 'on', 'el'\]; .*one existing token"),
        (tiny_tokenizer, dict(separator=""), r"`demask_separator` '' maps to no token"),
    ]
    for tokenizer, options, message in bad:
        with pytest.raises(ValueError, match=message):
            DemaskCollator(tokenizer, **options)
    # A tokenizer without byte fallback has no token for unseen text: unk is refused, not written silently.
    spm_no_fallback = _without_byte_fallback(spm)
    with pytest.raises(ValueError, match=r"`demask_marker` '§' maps to the unknown token '<unk>'"):
        DemaskCollator(spm_no_fallback, marker="§")
    with pytest.raises(ValueError, match="`demask_marker` must be non-empty text, got ''"):
        TrainConfig(objective="demask", demask_marker="")


def _without_byte_fallback(tokenizer):
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state["model"]["byte_fallback"] = False
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.mark.real
def test_defaults_and_layout_on_the_smollm2_tokenizer(smollm2_tokenizer, train, answer_names):
    tokenizer = smollm2_tokenizer
    collator = DemaskCollator(tokenizer, mask_prob=0.5, entity_mask_prob=1.0, entity_names=answer_names)
    assert tokenizer.convert_ids_to_tokens([collator.marker_id, *collator.separator_ids]) == ["_", "Ċ"]
    rows = _rows(tokenizer, train, count=50)
    batch = collator(rows)
    finder = EntityFinder(tokenizer, answer_names)
    for row, example in enumerate(rows):
        lead, copy, _, body, end = _parts(collator, batch, row, example)
        assert lead == [] and end == [tokenizer.eos_token_id]  # SmolLM2 adds no BOS
        assert all(copy[k] == collator.marker_id for tokens in finder.row_tokens(example["input_ids"]) for k in tokens)
    assert finder.unaligned == 0


def test_registered_causal_objective_loss_is_on_the_row(tiny_model_dir, data_dir, answer_names):
    objective = OBJECTIVES["demask"]
    assert objective.bidirectional is False and objective.setup is None
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = TrainConfig(objective="demask", data_dir=str(data_dir), mask_prob=0.5, mask_schedule="uniform",
                         entity_mask_prob=0.5, max_length=200)
    collator = objective.make_collator(tokenizer, config)
    assert (collator.max_length, collator.schedule, collator.entity_mask_prob) == (200, "uniform", 0.5)
    assert collator.entities.names == tuple(answer_names) and len(answer_names) == 60  # the answers of the training file
    rows = _rows(tokenizer, load_train(data_dir), count=8)
    batch = collator(rows)
    output = model(**batch, use_cache=False)
    # The loss is the mean cross-entropy of the row's tokens and EOS only: the copy and separator carry none.
    logits, targets = output.logits[:, :-1], batch["labels"][:, 1:]
    kept = targets != IGNORE_INDEX
    assert kept.sum() == sum(len(row["input_ids"]) - 1 for row in rows)  # all but BOS, once each
    torch.testing.assert_close(output.loss, torch.nn.functional.cross_entropy(logits[kept], targets[kept]))
