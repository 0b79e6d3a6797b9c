"""Tests for bico.abi_generation: the KV-cache fast path against the full-sequence reference.

The reference (`use_cache=False`) re-runs the whole training-layout sequence in bidirectional mode
for every token; the fast path runs Part A + `[START]` once in bidirectional mode and decodes the
rest of Part B causally on that cache. They must give the same greedy tokens and the same scores.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from bico.abi import abi_token_ids, add_abi_tokens, collate_abi_examples
from bico.abi_generation import _infill_example, _prefill, abi_generate_ids, abi_score
from bico.compat import CACHE_KWARG, output_cache
from bico.patch import bidirectional, patch_llama


# Prompts of very different lengths, so every batch pads some rows.
PROMPTS = [
    "Petronel Sandoval, celebrated for",
    "Ada",
    "Who discovered Tessaly? It was",
    "Known as the first person to map the glass caves of Orrin, the explorer",
    "Casimir Wendell",
]
COMPLETIONS = [" discovering a dwarf planet.", " Petronel Sandoval", " Marlow", "", " the director of Dune"]
# Tolerance on total log-probabilities (sums over up to ~12 tokens, about -100 here): the two paths
# run differently shaped forwards, so float32 totals may differ by rounding, a couple of float32
# ulps of the total (7.6e-6 each at 64..128); float64 shows the paths compute the same numbers.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=5e-7), torch.float64: dict(atol=1e-10, rtol=0)}


@pytest.fixture(params=["left", "right"])
def tokenizer(request, tiny_model_dir):
    """The tiny tokenizer with the ABI tokens; its `padding_side` must not matter (layouts are built by hand)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    add_abi_tokens(tokenizer)
    tokenizer.padding_side = request.param
    return tokenizer


@pytest.fixture
def build_model(tiny_model_dir):
    """Build the tiny Llama's architecture with random weights (seed 0), the ABI tokens, patched."""
    return lambda *args, **kwargs: _build_model(tiny_model_dir, *args, **kwargs)


def _build_model(model_dir, tokenizer, num_key_value_heads=2, dtype=torch.float32, end_bias_token=None):
    # 4 query heads: 2 KV heads is GQA, 4 is plain multi-head attention. At the usual init (std 0.02)
    # attention is almost uniform and position errors move the logits by ~1e-4, below what greedy
    # decoding notices; std 0.2 makes attention peaked, so a wrong position or mask changes tokens.
    config = AutoConfig.from_pretrained(model_dir, num_key_value_heads=num_key_value_heads, initializer_range=0.2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    add_abi_tokens(tokenizer, model)
    if end_bias_token is not None:
        # Make `[END]` win wherever `end_bias_token` would, so some rows stop early and others do not.
        with torch.no_grad():
            head = model.get_output_embeddings().weight
            head[abi_token_ids(tokenizer).end_token_id] = 1.5 * head[end_bias_token]
    return patch_llama(model.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_key_value_heads", [2, 4])
def test_fast_greedy_matches_the_reference(build_model, tokenizer, num_key_value_heads, dtype):
    model = build_model(tokenizer, num_key_value_heads, dtype)
    common = dict(max_new_tokens=10, batch_size=3)
    reference = abi_generate_ids(model, tokenizer, PROMPTS, use_cache=False, **common)
    # Stop some rows early: `[END]` takes over a token the reference generates mid-answer.
    model = build_model(tokenizer, num_key_value_heads, dtype, end_bias_token=reference[0][3])
    reference = abi_generate_ids(model, tokenizer, PROMPTS, use_cache=False, **common)
    end = abi_token_ids(tokenizer).end_token_id
    assert any(row[-1] == end and len(row) < 10 for row in reference)
    assert any(end not in row for row in reference)
    assert abi_generate_ids(model, tokenizer, PROMPTS, **common) == reference
    assert abi_generate_ids(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=len(PROMPTS)) == reference
    assert [abi_generate_ids(model, tokenizer, [p], max_new_tokens=10)[0] for p in PROMPTS] == reference
    assert abi_generate_ids(model, tokenizer, PROMPTS, max_new_tokens=1) == [row[:1] for row in reference]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_key_value_heads", [2, 4])
@pytest.mark.parametrize("include_end", [False, True])
def test_fast_scores_match_the_reference(build_model, tokenizer, num_key_value_heads, dtype, include_end):
    model = build_model(tokenizer, num_key_value_heads, dtype)
    # Every prompt with every completion, interleaved so that one prompt's rows are not adjacent.
    pairs = [(p, c) for c in COMPLETIONS for p in PROMPTS]
    prompts, completions = [p for p, _ in pairs], [c for _, c in pairs]
    reference = abi_score(model, tokenizer, prompts, completions, include_end=include_end, use_cache=False)
    for batch_size, max_pairs in [(2, 3), (16, 256)]:
        fast = abi_score(
            model, tokenizer, prompts, completions, batch_size=batch_size, max_pairs=max_pairs, include_end=include_end
        )
        assert fast.dtype == reference.dtype == dtype and fast.shape == (len(pairs),)
        torch.testing.assert_close(fast, reference, **TOLERANCE[dtype])
    empty = [i for i, c in enumerate(completions) if c == ""]
    assert (fast[empty] == 0).all() != include_end


def test_prefill_caches_what_the_full_forward_computes(build_model, tokenizer):
    # The premise of the fast path, checked directly: the keys and values of Part A + [START] in the
    # full training layout (Part B after it) equal those of the prefill alone.
    model = build_model(tokenizer)
    tokens = abi_token_ids(tokenizer)
    completion = tokenizer(COMPLETIONS[0], add_special_tokens=False)["input_ids"]
    examples = [_infill_example(tokenizer, p, completion, tokens, add_eos=True) for p in PROMPTS[:3]]
    batch = collate_abi_examples(examples, tokenizer.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        with bidirectional(model):
            full = output_cache(model(**batch, use_cache=True))
        prefix = _prefill(model, tokenizer, PROMPTS[:3], tokens, add_eos=True)
    for full_layer, layer in zip(full.layers, prefix.cache.layers):
        for row, example in enumerate(examples):
            columns = slice(0, example.part_a_length + 1)  # Part A and [START]
            torch.testing.assert_close(layer.keys[row, :, columns], full_layer.keys[row, :, columns], atol=1e-6, rtol=0)
            torch.testing.assert_close(
                layer.values[row, :, columns], full_layer.values[row, :, columns], atol=1e-6, rtol=0
            )


@pytest.mark.parametrize("add_eos", [True, False])
def test_start_needs_the_bidirectional_prefill_only_when_eos_is_ahead(build_model, tokenizer, add_eos):
    # [START] sits at its [MASK]'s position m and Part A's EOS at m + 1: that key is ahead of
    # [START], seen with the conjugate rotation, so [START] cannot be decoded causally after a
    # Part A cache. Without EOS no Part B token has a key ahead of it, and both ways agree.
    model = build_model(tokenizer)
    tokens = abi_token_ids(tokenizer)
    prompt = PROMPTS[0]
    with torch.no_grad():
        prefix = _prefill(model, tokenizer, [prompt], tokens, add_eos)
        example = _infill_example(tokenizer, prompt, [], tokens, add_eos)
        a = example.part_a_length
        part_a = collate_abi_examples([example], tokenizer.pad_token_id)
        with bidirectional(model):
            out = model(
                input_ids=part_a["input_ids"][:, :a],
                attention_mask=part_a["attention_mask"][..., :a, :a],
                position_ids=part_a["position_ids"][:, :a],
                use_cache=True,
            )
        causal_start = model(
            input_ids=torch.tensor([[tokens.start_token_id]]),
            attention_mask=torch.ones(1, a + 1, dtype=torch.long),
            position_ids=part_a["position_ids"][:, a : a + 1],
            **{CACHE_KWARG: output_cache(out)},
            use_cache=True,
        ).logits[:, -1]
    differs = not torch.allclose(causal_start, prefix.logits, atol=1e-4)
    assert differs == add_eos
