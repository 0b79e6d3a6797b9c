"""Answers of a causal LM to a batch of prompts: greedy decoding and the log-probability of given answers.

The evaluation (`bico.evaluation`) runs every prompt through these two. Prompts are left-padded,
position ids count real tokens only (as `generate` does), and an answer's log-probability is the sum of
its tokens' log-probabilities given the prompt. Scoring runs each prompt once and copies its KV cache to
all of its candidates (`score_continuations`), which ABI scoring reuses after its own prefill.

Models trained with the ABI baseline (`config.bico_objective == "abi"`) answer by blank infilling
(`bico.abi_generation`); `abi_module` is the one place that chooses.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .compat import CACHE_KWARG, output_cache


__all__ = ["generate_answers", "score_answers", "score_continuations", "MAX_PAIRS"]

# (prompt, candidate) pairs per forward pass when scoring.
MAX_PAIRS = 256


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 40) -> list[str]:
    """Greedy answers for one batch of prompts, decoded without the prompt and special tokens.

    Args:
        model (`PreTrainedModel`): A causal LM, in eval mode.
        tokenizer (`PreTrainedTokenizerBase`): Its tokenizer; prompts are encoded with its special
            tokens (BOS), as in training.
        prompts (`list[str]`): One batch; left-padded here, whatever `tokenizer.padding_side` says.
        max_new_tokens (`int`, *optional*, defaults to 40): As in the BICO code.

    Returns:
        `list[str]`: One answer per prompt, e.g. `" Ottilie Brandt, the director of"`; decoding stops at EOS.
    """
    abi = abi_module(model)
    if abi is not None:
        return abi.abi_generate(model, tokenizer, prompts, max_new_tokens)
    pad_id = pad_token_id(tokenizer)
    input_ids, attention_mask = _pad(_encode(tokenizer, prompts), pad_id, side="left", device=model_device(model))
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # (B, L_prompt + L_new): keep the new tokens only.
    return tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)


@torch.inference_mode()
def score_answers(
    model, tokenizer, prompts: list[str], candidates: list[list[str]], max_pairs: int = MAX_PAIRS
) -> list[list[float]]:
    """Total log-probability of each candidate answer given its prompt, for one batch of prompts.

    The prompts are run once, left-padded, and their KV cache is copied to each (prompt, candidate)
    pair, so a prompt with 30 candidates costs one prompt pass plus 30 short answer passes. A pair's
    answer tokens are `_encode(prompt + answer)[len(_encode(prompt)):]`, so tokenizers that merge across
    the boundary are handled as in lm-evaluation-harness.

    Args:
        model (`PreTrainedModel`): A causal LM, in eval mode.
        tokenizer (`PreTrainedTokenizerBase`): Its tokenizer.
        prompts (`list[str]`): B prompts.
        candidates (`list[list[str]]`): For each prompt, the answers to score (any number, may differ
            per prompt), e.g. `[" Ottilie Brandt", " Casimir Wendell"]`.
        max_pairs (`int`, *optional*, defaults to 256): Pairs per forward pass; lower it to save memory.

    Returns:
        `list[list[float]]`: Same nesting as `candidates`; log-probabilities in nats (0.0 for an empty answer).
    """
    if len(prompts) != len(candidates):
        raise ValueError(f"`candidates` must have one list per prompt; got {len(candidates)} for {len(prompts)} prompts.")
    abi = abi_module(model)
    pairs = [(i, answer) for i, answers in enumerate(candidates) for answer in answers]
    if abi is not None:
        # One blank-infilling prefill per prompt, shared by all of its candidates (bico.abi_generation).
        scores = abi.abi_score(
            model, tokenizer, [prompts[i] for i, _ in pairs], [a for _, a in pairs],
            batch_size=max(len(prompts), 1), max_pairs=max_pairs,
        )
        return _unflatten(scores.tolist(), candidates)

    device = model_device(model)
    prompt_ids = _encode(tokenizer, prompts)
    full_ids = _encode(tokenizer, [prompts[i] + answer for i, answer in pairs])
    answer_ids = [ids[len(prompt_ids[i]) :] for (i, _), ids in zip(pairs, full_ids)]

    input_ids, prompt_mask = _pad(prompt_ids, pad_token_id(tokenizer), side="left", device=device)
    prompt_out = model(
        input_ids=input_ids,
        attention_mask=prompt_mask,
        position_ids=_position_ids(prompt_mask),
        use_cache=True,
        logits_to_keep=1,
    )
    flat = score_continuations(
        model, prompt_out.logits[:, -1], output_cache(prompt_out), prompt_mask, prompt_mask.sum(-1),
        [i for i, _ in pairs], answer_ids, max_pairs,
    )
    return _unflatten(flat, candidates)


@torch.inference_mode()
def score_continuations(
    model,
    prefix_logits: torch.Tensor,
    cache,
    prefix_mask: torch.Tensor,
    next_positions: torch.Tensor,
    rows: list[int],
    answers: list[list[int]],
    max_pairs: int = MAX_PAIRS,
) -> list[float]:
    """Total log-probability of token continuations of B prefixes whose KV cache is already computed.

    Each pair's answer is fed causally after its prefix's cached keys and values (copied per pair,
    the prefix is not re-run), so P pairs cost one short forward each, `max_pairs` at a time.
    Used by `score_answers` (prefix = the prompt) and by `bico.abi_generation.abi_score` (prefix =
    blank-infilling Part A + `[START]`).

    Args:
        model (`PreTrainedModel`): The causal LM that filled `cache`, in eval mode.
        prefix_logits (`torch.FloatTensor` of shape `(B, V)`): The logits at each prefix's last token,
            which predict every answer's first token.
        cache (`transformers.Cache`): The prefixes' KV cache, B rows of W columns; left untouched.
        prefix_mask (`torch.LongTensor` of shape `(B, W)`): 1 on the prefixes' real columns, 0 on padding.
        next_positions (`torch.LongTensor` of shape `(B,)`): The position id of each answer's first token.
        rows (`list[int]`): P prefix indices in `range(B)`, one per pair.
        answers (`list[list[int]]`): P answers as token ids (any length, 0 included).
        max_pairs (`int`, *optional*, defaults to 256): Pairs per forward pass.

    Returns:
        `list[float]`: P log-probabilities in nats, summed in float32 (float64 for a float64 model); 0.0
        for an empty answer.
    """
    device = prefix_logits.device
    dtype = torch.promote_types(prefix_logits.dtype, torch.float32)  # float64 models keep float64
    first_logprobs = prefix_logits.to(dtype).log_softmax(-1)  # (B, V)
    layers = [(layer.keys, layer.values) for layer in cache.layers]  # each (B, H_kv, W, D)
    # Pairs of similar answer length share a forward pass, so little of it is padding.
    by_length = sorted(range(len(rows)), key=lambda p: len(answers[p]))
    flat = [0.0] * len(rows)
    for start in range(0, len(rows), max_pairs):
        chunk = by_length[start : start + max_pairs]
        pair_rows = torch.tensor([rows[p] for p in chunk], device=device)  # (P,)
        chunk_answers = [answers[p] for p in chunk]
        scores = torch.zeros(len(chunk), device=device, dtype=dtype)
        nonempty = torch.tensor([len(a) > 0 for a in chunk_answers], device=device)
        first = torch.tensor([a[0] if a else 0 for a in chunk_answers], device=device)
        scores += torch.where(nonempty, first_logprobs[pair_rows, first], 0.0)
        if max(len(a) for a in chunk_answers) > 1:
            # Feed answer tokens 0..n-2 after the prefix's cache; their logits predict tokens 1..n-1.
            inputs, inputs_mask = _pad([a[:-1] for a in chunk_answers], 0, side="right", device=device)  # (P, La - 1)
            targets, _ = _pad([a[1:] for a in chunk_answers], 0, side="right", device=device)  # (P, La - 1)
            past = DynamicCache(ddp_cache_data=[(keys[pair_rows], values[pair_rows]) for keys, values in layers])
            offsets = torch.arange(inputs.shape[1], device=device)
            logits = model(
                input_ids=inputs,
                attention_mask=torch.cat([prefix_mask[pair_rows], inputs_mask], dim=1),
                position_ids=next_positions[pair_rows, None] + offsets,
                **{CACHE_KWARG: past},
                use_cache=True,
            ).logits  # (P, La - 1, V)
            token_logprobs = logits.to(dtype).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
            scores += (token_logprobs * inputs_mask).sum(-1)
        for p, score in zip(chunk, scores.tolist()):
            flat[p] = score
    return flat


def abi_module(model):
    """The seam for ABI-trained models: `bico.abi` when `model.config.bico_objective == "abi"`, else None."""
    if getattr(getattr(model, "config", None), "bico_objective", None) != "abi":
        return None
    from . import abi

    return abi


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=True)["input_ids"]


def _pad(sequences: list[list[int]], pad_id: int, side: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) input ids and attention mask, padded on `side`."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            span = slice(length - len(s), length) if side == "left" else slice(0, len(s))
            ids[i, span] = torch.tensor(s)
            mask[i, span] = 1
    return ids.to(device), mask.to(device)


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # As `generate` computes them: count real tokens only, so left padding does not shift positions.
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def pad_token_id(tokenizer) -> int:
    # Llama-2's tokenizer has no pad token; any id works under the attention mask.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def _unflatten(flat: list[float], nested: list[list]) -> list[list[float]]:
    out, start = [], 0
    for items in nested:
        out.append(flat[start : start + len(items)])
        start += len(items)
    return out
