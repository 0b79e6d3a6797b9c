"""Collator semantics: NTP labels, BICO placeholder masking, and the objective per step (schedules: test_masking.py)."""

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM

from bico.collators import (
    IGNORE_INDEX,
    BicoCollator,
    NtpCollator,
    choose_objective,
    default_placeholder_id,
    encode_rows,
    row_seed,
)
from bico.data import load_train
from bico.scratch import small_llama_config


@pytest.fixture(scope="module")
def examples(tiny_tokenizer, data_dir):
    train = load_train(data_dir)
    encoded, _ = encode_rows(train["prompt"], train["completion"], tiny_tokenizer, max_length=256)
    return encoded


def test_encode_rows_bos_text_eos(tiny_tokenizer):
    examples, truncated = encode_rows(["Ada Orr wrote"], [" a song."], tiny_tokenizer, max_length=256)
    ids = examples[0]["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id and ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "Ada Orr wrote a song."
    assert examples[0]["index"] == 0 and truncated == 0
    cut, truncated = encode_rows(["Ada Orr wrote"], [" a song."], tiny_tokenizer, max_length=4)
    assert cut[0]["input_ids"] == ids[:4] and truncated == 1


def test_ntp_labels_cover_every_real_token(tiny_tokenizer, examples):
    batch = NtpCollator(tiny_tokenizer)(examples[:8])
    lengths = [len(example["input_ids"]) for example in examples[:8]]
    assert batch["input_ids"].shape == (8, max(lengths))
    for row, length in enumerate(lengths):
        assert batch["input_ids"][row, :length].tolist() == examples[row]["input_ids"]
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert batch["labels"][row, :length].tolist() == examples[row]["input_ids"]  # prompt, completion, EOS
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()


def test_ntp_padding_found_from_lengths_when_pad_is_eos():
    # Llama-style setups often pad with EOS: the real EOS must keep its label.
    tokenizer = SimpleNamespace(pad_token_id=None, eos_token_id=2)
    batch = NtpCollator(tokenizer)([{"input_ids": [1, 5, 2]}, {"input_ids": [1, 2]}])
    assert batch["input_ids"].tolist() == [[1, 5, 2], [1, 2, 2]]
    assert batch["labels"].tolist() == [[1, 5, 2], [1, 2, IGNORE_INDEX]]


def test_bico_masking_semantics(tiny_tokenizer, examples):
    collator = BicoCollator(tiny_tokenizer, mask_prob=0.15)
    rows = [{**example, "seed": row_seed(0, 0, example["index"])} for example in examples[:2000]]
    batch = collator(rows)
    plain = NtpCollator(tiny_tokenizer)(rows)
    original, real = plain["input_ids"], plain["attention_mask"].bool()
    masked = batch["labels"] != IGNORE_INDEX
    special = torch.isin(original, torch.tensor(tiny_tokenizer.all_special_ids))

    # Labels: the original token exactly at the masked positions.
    assert torch.equal(batch["labels"][masked], original[masked])
    # Masked tokens become the placeholder (the pad id) and are hidden as keys, like padding.
    assert collator.placeholder_id == tiny_tokenizer.pad_token_id == 0
    assert (batch["input_ids"][masked] == 0).all()
    assert torch.equal(batch["input_ids"][~masked], original[~masked])
    assert torch.equal(batch["attention_mask"].bool(), real & ~masked)
    # Never masked: position 0, BOS/EOS/any special token, padding.
    assert not masked[:, 0].any()
    assert not (masked & special).any() and not (masked & ~real).any()
    # At least one masked token per row; overall rate ~ 0.15 of the maskable tokens.
    assert masked.any(dim=1).all()
    maskable = real & ~special
    maskable[:, 0] = False
    rate = masked.sum().item() / maskable.sum().item()
    assert 0.14 < rate < 0.165, rate


def test_bico_masks_keyed_on_row_seed_not_batch(tiny_tokenizer, examples):
    collator = BicoCollator(tiny_tokenizer)
    rows = [{**example, "seed": row_seed(3, 1, example["index"])} for example in examples[:6]]
    full = collator(rows)
    # The same row in another batch (other neighbours, other padding) gets the same mask.
    alone = collator([rows[4]])
    length = len(rows[4]["input_ids"])
    assert torch.equal(alone["labels"][0], full["labels"][4, :length])
    # Another epoch gives another mask.
    other = collator([{**rows[4], "seed": row_seed(3, 2, rows[4]["index"])}])
    assert not torch.equal(other["labels"], alone["labels"])


def test_bico_without_row_seeds_uses_its_seeded_generator(tiny_tokenizer, examples):
    first = BicoCollator(tiny_tokenizer, seed=7)(examples[:16])["labels"]
    again = BicoCollator(tiny_tokenizer, seed=7)(examples[:16])["labels"]
    other = BicoCollator(tiny_tokenizer, seed=8)(examples[:16])["labels"]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_bico_row_without_maskable_tokens_gets_no_labels(tiny_tokenizer):
    batch = BicoCollator(tiny_tokenizer)([{"input_ids": [1, 2]}, {"input_ids": [1, 40, 2]}])
    assert (batch["labels"][0] == IGNORE_INDEX).all()
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 40, IGNORE_INDEX]  # the one maskable token is forced


def test_shifted_loss_predicts_masked_token_at_next_position(tiny_tokenizer, examples):
    # The model's own loss on BICO labels = cross-entropy of output i against masked token i + 1.
    torch.manual_seed(0)
    config = small_llama_config(tiny_tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=64)
    model = LlamaForCausalLM(config).eval()
    batch = BicoCollator(tiny_tokenizer)(examples[:4])
    out = model(**batch, use_cache=False)
    rows, positions = (batch["labels"] != IGNORE_INDEX).nonzero(as_tuple=True)
    logits = out.logits[rows, positions - 1]  # output i - 1 predicts masked token i
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"][rows, positions])
    torch.testing.assert_close(out.loss, expected)


def test_placeholder_defaults_and_errors(tiny_tokenizer):
    assert default_placeholder_id(tiny_tokenizer) == tiny_tokenizer.pad_token_id
    assert default_placeholder_id(SimpleNamespace(pad_token_id=None, unk_token_id=3, eos_token_id=2)) == 3
    assert BicoCollator(tiny_tokenizer, placeholder_id=3).placeholder_id == 3
    with pytest.raises(ValueError, match="`placeholder_id`"):
        BicoCollator(tiny_tokenizer, placeholder_id=len(tiny_tokenizer))
    with pytest.raises(ValueError, match="`mask_prob`"):
        BicoCollator(tiny_tokenizer, mask_prob=0.0)


def test_choose_objective_is_keyed_on_seed_and_step():
    steps = range(10_000)
    picks = [choose_objective(0, step) for step in steps]
    assert picks == [choose_objective(0, step) for step in steps]  # any process, any time
    assert set(picks) == {"bico", "ntp"}
    assert 0.48 < picks.count("bico") / len(picks) < 0.52
    assert picks != [choose_objective(1, step) for step in steps]
    assert {choose_objective(0, step, p_bico=0.0) for step in steps} == {"ntp"}
    assert {choose_objective(0, step, p_bico=1.0, objective="abi") for step in steps} == {"abi"}
    mostly = [choose_objective(0, step, p_bico=0.8) for step in steps]
    assert 0.78 < mostly.count("bico") / len(mostly) < 0.82
    with pytest.raises(ValueError, match="`p_bico`"):
        choose_objective(0, 0, p_bico=1.5)
