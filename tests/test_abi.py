"""Tests for bico.abi (ABI tokens, collator in both formats) and bico.abi_generation."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import bico.abi
from bico.abi import (
    IGNORE_INDEX,
    AbiCollator,
    AbiTokens,
    abi_attention_mask,
    abi_token_ids,
    add_abi_tokens,
    build_abi_example,
    collate_abi_examples,
)
from bico.abi_generation import abi_generate, abi_generate_ids, abi_score
from bico.patch import bidirectional, patch_llama


TOKENS = AbiTokens(mask_token_id=97, start_token_id=98, end_token_id=99)


@pytest.fixture
def tokenizer(tiny_model_dir):
    """A fresh copy of the tiny tokenizer with the ABI tokens (the session fixture stays untouched)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    add_abi_tokens(tokenizer)
    return tokenizer


@pytest.fixture
def texts(data_dir):
    with open(data_dir / "all_prompts_train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [row["prompt"] + row["completion"] for row in rows[:40]]


def encode(tokenizer, text):
    return tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]


# ------------------------------------------------------------------------------------------ tokens


def test_add_abi_tokens_adds_special_tokens_and_resizes(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    before = len(tokenizer)
    with pytest.raises(ValueError, match="add_abi_tokens"):
        abi_token_ids(tokenizer)
    tokens = add_abi_tokens(tokenizer, model)
    assert len(tokenizer) == before + 3
    assert sorted(tokens) == [before, before + 1, before + 2]
    assert tokenizer.mask_token == "[MASK]"
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    # Idempotent, never split, dropped by skip_special_tokens, kept by save/load.
    assert add_abi_tokens(tokenizer, model) == tokens and len(tokenizer) == before + 3
    ids = tokenizer("Ada [MASK] is [START]x[END]", add_special_tokens=False)["input_ids"]
    assert set(tokens) <= set(ids)
    assert "[" not in tokenizer.decode(ids, skip_special_tokens=True)
    tokenizer.save_pretrained(tmp_path)
    assert abi_token_ids(AutoTokenizer.from_pretrained(tmp_path)) == tokens


def test_add_abi_tokens_reuses_native_glm_names(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens(
        {"mask_token": "[MASK]", "extra_special_tokens": ["<|startofpiece|>", "<|endofpiece|>"]},
        replace_extra_special_tokens=False,
    )
    before = len(tokenizer)
    tokens = add_abi_tokens(tokenizer)
    assert len(tokenizer) == before
    assert tokens.start_token_id == tokenizer.convert_tokens_to_ids("<|startofpiece|>")
    assert tokens.end_token_id == tokenizer.convert_tokens_to_ids("<|endofpiece|>")


def test_abi_objective_is_registered_for_training(tiny_model_dir):
    from bico.config import TrainConfig
    from bico.objectives import OBJECTIVES

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    objective = OBJECTIVES["abi"]
    assert objective.bidirectional
    objective.setup(model, tokenizer, TrainConfig(objective="abi"))
    assert model.config.bico_objective == "abi"  # bico-eval switches to blank infilling
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    collator = objective.make_collator(tokenizer, TrainConfig(objective="abi", seed=4))
    assert isinstance(collator, AbiCollator)
    batch = collator([{"input_ids": encode(tokenizer, "Ada Marlow built a glass bridge."), "seed": 1}])
    assert batch["attention_mask"].dim() == 4


# ---------------------------------------------------------------------------------------- examples


def test_build_example_layout_by_hand():
    # text: BOS a b c d e f EOS, spans (b c) and (f), Part B order: (f) first.
    ids = [1, 10, 11, 12, 13, 14, 15, 2]
    example = build_abi_example(ids, [(2, 4), (6, 7)], [1, 0], TOKENS)
    assert example.input_ids == [1, 10, 97, 13, 14, 97, 2, 98, 15, 98, 11, 12]
    assert example.part_a_length == 7
    assert example.targets == [IGNORE_INDEX] * 7 + [15, 99, 11, 12, 99]
    assert example.positions == [0, 1, 2, 3, 4, 5, 6, 5, 5, 2, 2, 2]
    assert example.block_positions == [0] * 7 + [1, 2, 1, 2, 3]
    assert example.llama_positions == [0, 1, 2, 3, 4, 5, 6, 5, 6, 2, 3, 4]


def reconstruct(example, tokens):
    """Put each Part B span back in place of its [MASK] (found through GLM position 1)."""
    a = example.part_a_length
    filled = {}
    for index in range(a, len(example.input_ids)):
        if example.block_positions[index] > 1:
            filled.setdefault(example.positions[index], []).append(example.input_ids[index])
    out = []
    for index, token in enumerate(example.input_ids[:a]):
        out += filled.get(index, []) if token == tokens.mask_token_id else [token]
    return out


def test_part_a_and_part_b_reconstruct_the_text(tokenizer, texts):
    collator = AbiCollator(tokenizer, seed=3)
    tokens = collator.tokens
    for text in texts:
        ids = encode(tokenizer, text)
        example = collator.encode(ids)
        assert reconstruct(example, tokens) == ids
        assert tokenizer.decode(reconstruct(example, tokens), skip_special_tokens=True) == text
        # BOS and EOS are never blanked; every span's targets end with [END]; one [START] per [MASK].
        part_a = example.input_ids[: example.part_a_length]
        assert part_a[0] == tokenizer.bos_token_id and part_a[-1] == tokenizer.eos_token_id
        n_spans = part_a.count(tokens.mask_token_id)
        assert n_spans == example.input_ids.count(tokens.start_token_id) == example.targets.count(tokens.end_token_id)
        n_masked = len(ids) - (len(part_a) - n_spans)
        assert n_masked >= math.ceil(0.15 * (len(ids) - 2))
        assert len(example.input_ids) == len(ids) + 2 * n_spans


def test_part_b_order_is_shuffled(tokenizer, texts):
    collator = AbiCollator(tokenizer, seed=0, mask_ratio=0.5)
    in_text_order = []
    for text in texts:
        example = collator.encode(encode(tokenizer, text))
        starts = [p for p, b in zip(example.positions, example.block_positions) if b == 1]
        masks = [i for i, t in enumerate(example.input_ids[: example.part_a_length]) if t == collator.tokens.mask_token_id]
        assert sorted(starts) == masks  # each [MASK] has exactly one span in Part B
        in_text_order.append(starts == masks)
    assert len(in_text_order) == len(texts) and not all(in_text_order)


# ---------------------------------------------------------------------------------- llama format


def test_llama_batch_mask_structure(tokenizer, texts):
    collator = AbiCollator(tokenizer, seed=0)
    features = [{"input_ids": encode(tokenizer, text)} for text in texts[:6]]
    batch = collator(features)
    B, L = batch["input_ids"].shape
    assert batch["attention_mask"].shape == (B, 1, L, L) and batch["attention_mask"].dtype == torch.bool
    assert batch["position_ids"].shape == batch["labels"].shape == (B, L)
    tokens = collator.tokens
    for row in range(B):
        ids = batch["input_ids"][row].tolist()
        mask = batch["attention_mask"][row, 0]
        a = ids.index(tokens.start_token_id)  # Part B starts at the first [START]
        n = len(features[row]["input_ids"]) + 2 * ids[:a].count(tokens.mask_token_id)
        assert mask[:a, :a].all()  # Part A is bidirectional
        assert not mask[:a, a:].any()  # A never sees B (nor padding)
        assert mask[a:n, :a].all()  # B sees all of A
        assert torch.equal(mask[a:n, a:n], torch.ones(n - a, n - a, dtype=torch.bool).tril())  # B causal
        assert not mask[:n, n:].any()  # no real query sees padding
        assert torch.equal(mask[n:, :], torch.eye(L, dtype=torch.bool)[n:])  # padding sees only itself
    assert L == max(len(f["input_ids"]) for f in features) + 1 + 2 * int(  # longest + the [END] column
        max((batch["input_ids"][r] == tokens.mask_token_id).sum() for r in range(B)
            if len(features[r]["input_ids"]) == max(len(f["input_ids"]) for f in features))
    ) or L > max(len(f["input_ids"]) for f in features)


def test_llama_batch_positions_and_labels(tokenizer, texts):
    collator = AbiCollator(tokenizer, seed=5)
    tokens = collator.tokens
    ids = encode(tokenizer, texts[0])
    example = collator.encode(ids)
    batch = collate_abi_examples([example], tokenizer.pad_token_id, "llama")
    input_ids, positions, labels = batch["input_ids"][0], batch["position_ids"][0], batch["labels"][0]
    a, n = example.part_a_length, len(example.input_ids)
    assert input_ids.shape[0] == n + 1  # one extra column holds the last span's [END] label
    assert torch.equal(positions[:a], torch.arange(a))
    mask_positions = [i for i in range(a) if example.input_ids[i] == tokens.mask_token_id]
    offset = 0
    for t in range(a, n):
        if input_ids[t] == tokens.start_token_id:
            offset = 0
            mask = example.positions[t]
            assert mask in mask_positions
        assert positions[t] == mask + offset  # [MASK] index + offset inside the span
        offset += 1
    # Loss only on Part B: output t predicts labels[t + 1] after the HF shift.
    assert (labels[: a + 1] == IGNORE_INDEX).all()
    assert torch.equal(labels[1 : n + 1], torch.tensor(example.targets))
    for t in range(a, n):  # outputs that predict a span token predict the next input token
        if labels[t + 1] != tokens.end_token_id:
            assert labels[t + 1] == input_ids[t + 1]
    assert (labels == tokens.end_token_id).sum() == len(mask_positions)


def test_abi_attention_mask_with_a_gap_between_parts():
    # The generation layout: Part A padded to a common width, Part B after it.
    mask = abi_attention_mask(torch.tensor([2]), torch.tensor([4]), torch.tensor([6]), 6)[0, 0]
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],
            [1, 1, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_collator_seeding_and_state(tokenizer, texts):
    features = [{"input_ids": encode(tokenizer, text)} for text in texts[:4]]
    first, second = AbiCollator(tokenizer, seed=1), AbiCollator(tokenizer, seed=1)
    assert all(torch.equal(first(features)[k], second(features)[k]) for k in ("input_ids", "labels"))
    assert not torch.equal(AbiCollator(tokenizer, seed=2)(features)["labels"], second(features)["labels"])
    state = first.state_dict()
    expected = first(features)
    first(features)
    first.load_state_dict(state)
    assert torch.equal(first(features)["input_ids"], expected["input_ids"])
    # A per-example seed makes the example's spans independent of the batch around it.
    seeded = {"input_ids": features[0]["input_ids"], "seed": 123}
    alone = AbiCollator(tokenizer, seed=0)([seeded])["input_ids"][0]
    in_batch = AbiCollator(tokenizer, seed=9)([features[1], seeded])["input_ids"][1]
    assert torch.equal(in_batch[: alone.shape[0]], alone)


def test_collator_rejects_bad_input(tokenizer, tiny_model_dir):
    with pytest.raises(ValueError, match="`format`"):
        AbiCollator(tokenizer, format="t5")
    with pytest.raises(ValueError, match="`mask_ratio`"):
        AbiCollator(tokenizer, mask_ratio=1.5)
    with pytest.raises(ValueError, match="no non-special token"):
        AbiCollator(tokenizer)([{"input_ids": [tokenizer.bos_token_id, tokenizer.eos_token_id]}])
    with pytest.raises(ValueError, match="add_abi_tokens"):
        AbiCollator(AutoTokenizer.from_pretrained(tiny_model_dir))


# ------------------------------------------------------------------------------------- GLM format


def glm_separation_mask(sep: torch.Tensor, L: int) -> torch.Tensor:
    """The mask a GLM model builds from a separation index (DESIGN.md section 3): tril, plus all of Part A."""
    m = torch.ones(L, L).tril().expand(sep.shape[0], L, L).clone()
    m[torch.arange(L)[None, None, :].expand_as(m) < sep[:, None, None]] = 1
    return m.bool()


def test_native_glm_format(tokenizer, texts):
    features = [{"input_ids": encode(tokenizer, text), "seed": i} for i, text in enumerate(texts[:5])]
    glm = AbiCollator(tokenizer, format="glm")(features)
    llama = AbiCollator(tokenizer, format="llama")(features)  # same seeds, so the same spans
    B, L = glm["input_ids"].shape
    assert glm["position_ids"].shape == (B, 2, L)
    assert glm["attention_mask"].shape == (B,)
    assert torch.equal(llama["input_ids"][:, :L], glm["input_ids"])
    tokens = abi_token_ids(tokenizer)
    for row in range(B):
        ids = glm["input_ids"][row].tolist()
        sep = int(glm["attention_mask"][row])
        assert ids[sep] == tokens.start_token_id and tokens.start_token_id not in ids[:sep]
        position, block = glm["position_ids"][row]
        assert torch.equal(position[:sep], torch.arange(sep)) and not block[:sep].any()
        n = int(llama["attention_mask"][row, 0, :, 0].sum())  # real queries all see BOS; padding does not
        for t in range(sep, n):
            if ids[t] == tokens.start_token_id:
                start, mask_index = t, int(position[t])
                assert ids[mask_index] == tokens.mask_token_id
            assert position[t] == mask_index and block[t] == t - start + 1
        # Labels aligned with the logits (GLM does not shift): the [START] position predicts the first token.
        labels = glm["labels"][row]
        assert (labels[:sep] == IGNORE_INDEX).all()
        assert torch.equal(labels[: n], llama["labels"][row, 1 : n + 1])
        # Llama positions = GLM position + block position - 1 inside Part B.
        assert torch.equal(llama["position_ids"][row, sep:n], position[sep:n] + block[sep:n] - 1)
        # The separation-index mask GLM builds equals our 4D mask on real tokens.
        assert torch.equal(glm_separation_mask(torch.tensor([sep]), L)[0, :n, :n], llama["attention_mask"][row, 0, :n, :n])


# ---------------------------------------------------------------------------- tiny patched Llama


@pytest.fixture
def model(tiny_model_dir, tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    add_abi_tokens(tokenizer, model)
    return patch_llama(model)


def test_model_sees_only_what_the_mask_allows(model, tokenizer, texts):
    collator = AbiCollator(tokenizer)
    example = collator.encode(encode(tokenizer, texts[0]), random.Random(0))
    batch = collate_abi_examples([example], tokenizer.pad_token_id)
    a, n = example.part_a_length, len(example.input_ids)

    def logits(batch):
        with torch.no_grad(), bidirectional(model):
            return model(**batch, use_cache=False).logits[0]

    reference = logits(batch)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, n - 1] = 50  # the last Part B token
    out = logits(changed)
    assert torch.allclose(out[: n - 1], reference[: n - 1], atol=1e-6)  # A never sees B; B is causal
    assert not torch.allclose(out[n - 1], reference[n - 1])
    changed["input_ids"][0, a - 2] = 50  # a Part A token: every Part B output changes
    out = logits(changed)
    assert all(not torch.allclose(out[t], reference[t]) for t in range(a, n))
    # Padding: the same example next to a longer one gives the same logits on its tokens.
    longer = collator.encode(encode(tokenizer, texts[0] + texts[1]), random.Random(1))
    padded = collate_abi_examples([example, longer], tokenizer.pad_token_id)
    with torch.no_grad(), bidirectional(model):
        out = model(**padded, use_cache=False).logits[0]
    assert torch.allclose(out[:n], reference[:n], atol=1e-5)


def test_end_to_end_training_generation_and_scoring(model, tokenizer, texts):
    torch.manual_seed(0)
    features = [{"input_ids": encode(tokenizer, text)} for text in texts[:4]]
    collator = AbiCollator(tokenizer, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(60):
        with bidirectional(model):
            loss = model(**collator(features), use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert statistics.mean(losses[-10:]) < 0.7 * statistics.mean(losses[:5])

    prompts = ["Petronel Sandoval, celebrated for", "Who discovered Tessaly? It was", "Ada"]
    completions = [" discovering a dwarf planet.", " Petronel Sandoval.", " Marlow"]
    generated = abi_generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2)
    assert len(generated) == 3 and all(isinstance(text, str) for text in generated)
    assert generated == [abi_generate(model, tokenizer, [prompt], max_new_tokens=8)[0] for prompt in prompts]
    assert model.training  # mode restored

    scores = abi_score(model, tokenizer, prompts, completions, batch_size=2)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert (scores < 0).all() and torch.isfinite(scores).all()
    singles = torch.cat([abi_score(model, tokenizer, [p], [c]) for p, c in zip(prompts, completions)])
    assert torch.allclose(scores, singles, atol=1e-4)
    with_end = abi_score(model, tokenizer, prompts, completions, include_end=True)
    assert (with_end < scores).all()


def test_generation_layout_matches_the_training_layout(model, tokenizer):
    # Generation pads Part A to a common width and grows Part B after it; each greedy token must be
    # the argmax of the training layout (`collate_abi_examples`) at the same Part B step.
    prompts = ["Petronel Sandoval, celebrated for", "Ada", "Who discovered Tessaly? It was"]
    tokens = abi_token_ids(tokenizer)
    generated = abi_generate_ids(model, tokenizer, prompts, max_new_tokens=6)
    assert any(len(ids) > 1 for ids in generated)
    for prompt, ids in zip(prompts, generated):
        assert 1 <= len(ids) <= 6 and tokens.end_token_id not in ids[:-1]
        prompt_ids = tokenizer(prompt)["input_ids"]
        span = ids[:-1] if ids[-1] == tokens.end_token_id else ids
        text = prompt_ids + span + [tokenizer.eos_token_id]
        example = build_abi_example(text, [(len(prompt_ids), len(prompt_ids) + len(span))], [0], tokens)
        batch = collate_abi_examples([example], tokenizer.pad_token_id)
        batch.pop("labels")
        with torch.no_grad(), bidirectional(model):
            logits = model(**batch, use_cache=False).logits[0]
        a = example.part_a_length
        assert logits[a : a + len(ids)].argmax(dim=-1).tolist() == ids


def test_abi_generate_is_reexported_from_bico_abi():
    assert bico.abi.abi_generate is abi_generate and bico.abi.abi_score is abi_score
    with pytest.raises(AttributeError):
        bico.abi.no_such_name  # noqa: B018


def test_inference_rejects_bad_arguments(model, tokenizer):
    with pytest.raises(ValueError, match="`max_new_tokens`"):
        abi_generate(model, tokenizer, ["x"], max_new_tokens=0)
    with pytest.raises(ValueError, match="`completions`"):
        abi_score(model, tokenizer, ["x", "y"], [" z"])
    # An empty answer scores 0 (as in causal scoring), or log p([END]) when the end is included.
    assert abi_score(model, tokenizer, ["x"], [""]).tolist() == [0.0]
    assert abi_score(model, tokenizer, ["x"], [""], include_end=True).item() < 0
