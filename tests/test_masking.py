"""bico.masking: the fixed, uniform and span schedules, word starts, the labels rule and argument checks."""


import pytest
import torch

from bico.collators import (
    IGNORE_INDEX,
    BicoCollator,
    NtpCollator,
    encode_rows,
    find_word_starts,
    mask_placeholders,
    maskable_positions,
    row_seed,
    word_start_table,
)
from bico.data import load_train


@pytest.fixture(scope="module")
def examples(tiny_tokenizer, data_dir):
    train = load_train(data_dir)
    encoded, _ = encode_rows(train["prompt"], train["completion"], tiny_tokenizer, max_length=256)
    return encoded


SCHEDULE_CASES = [
    dict(schedule="fixed"),
    dict(schedule="uniform"),
    dict(schedule="uniform", mask_min=0.2, mask_max=0.6),
    dict(schedule="span"),
    dict(schedule="span", mask_prob=0.4),
]


def _seeded(examples, seed=0, epoch=0):
    return [{**example, "seed": row_seed(seed, epoch, example["index"])} for example in examples]


def _word_ids(starts: torch.Tensor) -> torch.Tensor:
    return starts.long().cumsum(dim=-1) - 1  # (B, L): word number of every token


def test_fixed_schedule_is_the_papers_rule_draw_for_draw(tiny_tokenizer, examples):
    # The masks of earlier releases, rebuilt from their rule: one uniform number per real token, a
    # maskable token masked below mask_prob, else one forced pick. Runs trained before keep their masks.
    rows = _seeded(examples[:300], seed=3, epoch=1)
    batch = BicoCollator(tiny_tokenizer, mask_prob=0.15)(rows)
    special = torch.tensor(tiny_tokenizer.all_special_ids)
    for row, example in enumerate(rows):
        ids = torch.tensor(example["input_ids"])
        generator = torch.Generator().manual_seed(example["seed"])
        candidates = ~torch.isin(ids, special)
        candidates[0] = False
        hits = (torch.rand(len(ids), generator=generator) < 0.15) & candidates
        if not hits.any():
            positions = candidates.nonzero().squeeze(1)
            hits[positions[torch.randint(len(positions), (1,), generator=generator)]] = True
        assert torch.equal(batch["labels"][row, : len(ids)] != IGNORE_INDEX, hits)


@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=lambda case: "-".join(map(str, case.values())))
def test_every_schedule_keeps_the_labels_rule(tiny_tokenizer, examples, case):
    rows = _seeded(examples[:600])
    batch = BicoCollator(tiny_tokenizer, **case)(rows)
    plain = NtpCollator(tiny_tokenizer)(rows)
    original, real = plain["input_ids"], plain["attention_mask"].bool()
    masked = batch["labels"] != IGNORE_INDEX
    special = torch.isin(original, torch.tensor(tiny_tokenizer.all_special_ids))
    assert torch.equal(batch["labels"][masked], original[masked])
    assert (batch["input_ids"][masked] == tiny_tokenizer.pad_token_id).all()
    assert torch.equal(batch["input_ids"][~masked], original[~masked])
    assert torch.equal(batch["attention_mask"].bool(), real & ~masked)
    assert not masked[:, 0].any() and not (masked & special).any() and not (masked & ~real).any()
    assert masked.any(dim=1).all()


@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=lambda case: "-".join(map(str, case.values())))
def test_every_schedule_is_keyed_on_the_row_seed_not_the_batch_or_padding(tiny_tokenizer, examples, case):
    collator = BicoCollator(tiny_tokenizer, **case)
    rows = _seeded(examples[:12], seed=5)
    full = collator(rows)["labels"]
    for row in (0, 7):
        length = len(rows[row]["input_ids"])
        assert torch.equal(collator([rows[row]])["labels"][0], full[row, :length])
    # Another epoch, other masks (a short row may draw the same spans again by chance).
    other_epoch = collator(_seeded(rows, seed=5, epoch=1))["labels"]
    assert (other_epoch != full).any(dim=1).sum() >= 9
    # Left padding (a user's collator may pad either side) gives each row the same mask.
    plain = NtpCollator(tiny_tokenizer)(rows)
    lengths = plain["attention_mask"].sum(dim=1)
    shifts = (plain["input_ids"].shape[1] - lengths).tolist()
    left_ids = torch.stack([ids.roll(shift) for ids, shift in zip(plain["input_ids"], shifts)])
    left_mask = torch.stack([mask.roll(shift) for mask, shift in zip(plain["attention_mask"], shifts)])
    left = mask_placeholders(
        left_ids, left_mask, maskable_positions(left_ids, left_mask, tiny_tokenizer.all_special_ids),
        0, case.get("mask_prob", 0.15), [torch.Generator().manual_seed(row["seed"]) for row in rows],
        schedule=case["schedule"], mask_min=case.get("mask_min", 0.0), mask_max=case.get("mask_max", 1.0),
        word_starts=find_word_starts(left_ids, tiny_tokenizer),
    )["labels"]
    assert torch.equal(torch.stack([labels.roll(-shift) for labels, shift in zip(left, shifts)]), full)


def test_uniform_rates_spread_over_their_range():
    # Long rows, so a row's masked fraction is close to the rate it drew (binomial sd <= 0.025).
    B, L = 2000, 401
    input_ids = torch.full((B, L), 7)
    attention_mask = torch.ones_like(input_ids)
    maskable = maskable_positions(input_ids, attention_mask, special_ids=[0, 1, 2])
    for low, high in [(0.0, 1.0), (0.2, 0.6)]:
        generators = [torch.Generator().manual_seed(row_seed(0, 0, row)) for row in range(B)]
        labels = mask_placeholders(input_ids, attention_mask, maskable, 0, generators=generators,
                                   schedule="uniform", mask_min=low, mask_max=high)["labels"]
        rates = (labels != IGNORE_INDEX).sum(dim=1) / (L - 1)  # (B,)
        assert abs(rates.mean().item() - (low + high) / 2) < 0.015
        assert low - 0.08 < rates.min() and rates.max() < high + 0.08
        scaled = ((rates - low) / (high - low)).clamp(0, 1).sort().values
        ranks = torch.arange(1, B + 1) / B
        ks = torch.maximum(ranks - scaled, scaled - (ranks - 1 / B)).max().item()
        assert ks < 0.045, ks  # Kolmogorov-Smirnov distance to U(low, high); 0.021 and 0.030 measured
        buckets = torch.histc(scaled, bins=10, min=0, max=1)
        assert ((150 <= buckets) & (buckets <= 250)).all(), buckets.tolist()  # 200 expected in each


@pytest.mark.parametrize("mask_prob", [0.15, 0.4])
def test_span_masks_whole_words_covering_mask_prob(tiny_tokenizer, examples, mask_prob):
    rows = _seeded(examples[:1800])
    collator = BicoCollator(tiny_tokenizer, mask_prob=mask_prob, schedule="span")
    batch = collator(rows)
    plain = NtpCollator(tiny_tokenizer)(rows)
    masked = batch["labels"] != IGNORE_INDEX
    words = _word_ids(find_word_starts(plain["input_ids"], tiny_tokenizer))
    maskable = maskable_positions(plain["input_ids"], plain["attention_mask"], tiny_tokenizer.all_special_ids)
    masked_words = maskable_words = runs = multiword_runs = 0
    for row in range(len(rows)):
        row_words, row_masked = words[row][plain["attention_mask"][row].bool()], masked[row][: len(rows[row]["input_ids"])]
        per_word = torch.zeros(int(row_words[-1]) + 1).index_add_(0, row_words, row_masked.float())
        sizes = torch.bincount(row_words)
        assert ((per_word == 0) | (per_word == sizes)).all(), row  # every word fully masked or not at all
        blocked = torch.zeros_like(per_word).index_add_(0, row_words, (~maskable[row][: len(row_words)]).float())
        hit = per_word > 0
        masked_words += int(hit.sum())
        maskable_words += int((blocked == 0).sum())
        edges = torch.diff(torch.cat([torch.zeros(1), hit.float(), torch.zeros(1)]))
        lengths = (edges == -1).nonzero().squeeze(1) - (edges == 1).nonzero().squeeze(1)
        runs += len(lengths)
        multiword_runs += int((lengths > 1).sum())
    token_rate = masked.sum().item() / maskable.sum().item()
    word_rate = masked_words / maskable_words
    # Every maskable word is masked with probability mask_prob, so words and tokens both average it.
    assert abs(word_rate - mask_prob) < 0.008, word_rate
    assert abs(token_rate - mask_prob) < 0.008, token_rate
    assert multiword_runs / runs > 0.5  # names and clauses go as a whole; 0.6-0.7 measured


def test_user_labels_keep_the_prompt_out_of_the_targets(tiny_tokenizer):
    prompts, completions = ["Ada Orr wrote", "Quiz: who is Bo Lind? Answer:"], [" a long song.", " the tallest baker."]
    examples, _ = encode_rows(prompts, completions, tiny_tokenizer, max_length=64)
    for example, prompt in zip(examples, prompts):
        prompt_length = len(tiny_tokenizer(prompt)["input_ids"])
        example["labels"] = [IGNORE_INDEX] * prompt_length + example["input_ids"][prompt_length:]
    unlabelled = {"input_ids": examples[0]["input_ids"], "index": 2}
    for case in [dict(schedule="fixed", mask_prob=1.0), dict(schedule="uniform", mask_min=0.9), dict(schedule="span", mask_prob=1.0)]:
        batch = BicoCollator(tiny_tokenizer, **case)(_seeded([*examples, unlabelled]))
        masked = batch["labels"] != IGNORE_INDEX
        for row, example in enumerate(examples):
            user = torch.tensor(example["labels"])
            assert not (masked[row, : len(user)] & (user == IGNORE_INDEX)).any()
            if case.get("mask_prob") == 1.0:  # everything the user labelled, but EOS, becomes a target
                assert torch.equal(masked[row, : len(user)], (user != IGNORE_INDEX) & (user != tiny_tokenizer.eos_token_id))
        assert masked[2, 1 : len(unlabelled["input_ids"]) - 1].any()  # a row without labels may be masked anywhere
    with pytest.raises(ValueError, match="same length"):
        BicoCollator(tiny_tokenizer)([{"input_ids": [1, 40, 41, 2], "labels": [-100, 40]}])


def _wrap(tokenizer_object, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, **special)


def _words_of(tokenizer, text, bos=()):
    ids = torch.tensor([[*bos, *tokenizer(text, add_special_tokens=False)["input_ids"]]])
    words = _word_ids(find_word_starts(ids, tokenizer))[0]
    groups = [ids[0][words == word].tolist() for word in range(int(words[-1]) + 1)]
    words = [tokenizer.decode(group, skip_special_tokens=True) for group in groups]
    return [word.strip() for word in words if word.strip()]  # BOS and the line break are words of their own


def test_word_starts_for_byte_level_and_sentencepiece_tokenizers(tiny_tokenizer):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = 'Ada Orr, the baker of "Rye Nights", wrote\ntwo songs.'
    # The project's scratch tokenizer (byte-level "Ġ"), with BOS: BOS is a word of its own.
    assert _words_of(tiny_tokenizer, text, bos=[1]) == text.split()
    # A SentencePiece-style ("▁") tokenizer, as Llama 2 and Mistral use.
    sentencepiece = Tokenizer(models.BPE(unk_token="<unk>"))
    sentencepiece.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    sentencepiece.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    sentencepiece.train_from_iterator([text.replace("\n", " ")] * 4, trainers.BpeTrainer(
        vocab_size=80, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tokenizer = _wrap(sentencepiece, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert _words_of(tokenizer, text.replace("\n", " "), bos=[1]) == text.split()
    # No marker anywhere: words cannot be found, and the span schedule says so.
    plain = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    with pytest.raises(ValueError, match="marks no word start"):
        word_start_table(_wrap(plain, unk_token="<unk>"))


def test_word_starts_for_the_smollm2_tokenizer_if_cached(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    text = 'Ada Orr, the baker of "Rye Nights", wrote\ntwo songs.'
    assert _words_of(tokenizer, text) == text.split()  # no BOS: position 0 begins the first word


def test_masking_arguments_are_checked(tiny_tokenizer):
    bad = [
        (dict(schedule="poisson"), r"`schedule` must be one of 'fixed', 'uniform', 'span'; got 'poisson'"),
        (dict(mask_prob=1.5), r"`mask_prob` must be in \(0, 1\], got 1.5"),
        (dict(schedule="uniform", mask_min=-0.1), r"`mask_min` must be in \[0, 1\], got -0.1"),
        (dict(schedule="uniform", mask_max=0.0), r"`mask_max` must be in \(0, 1\], got 0.0"),
        (dict(schedule="uniform", mask_min=0.8, mask_max=0.2), r"`mask_min` \(0.8\) must be at most `mask_max` \(0.2\)"),
    ]
    ids, mask = torch.tensor([[1, 40, 41, 2]]), torch.ones(1, 4, dtype=torch.long)
    maskable = maskable_positions(ids, mask, tiny_tokenizer.all_special_ids)
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            BicoCollator(tiny_tokenizer, **kwargs)
        with pytest.raises(ValueError, match=message):
            mask_placeholders(ids, mask, maskable, 0, **kwargs)
    with pytest.raises(ValueError, match="`word_starts` is required"):
        mask_placeholders(ids, mask, maskable, 0, schedule="span")
    with pytest.raises(ValueError, match="`word_starts` must have the shape"):
        mask_placeholders(ids, mask, maskable, 0, schedule="span", word_starts=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="`maskable` must have the shape"):
        mask_placeholders(ids, mask, maskable[:, :2], 0)
