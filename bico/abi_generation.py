"""Blank-infilling inference for ABI-trained Llama-family models: greedy infilling and completion scoring.

A model trained with GLM's autoregressive blank infilling (`bico.abi`; GLM, Du et al., ACL 2022,
section 2.3) answers a prompt by filling a blank after it: Part A is `prompt [MASK] EOS` (EOS because
the training texts end with it and spans never cover it), Part B starts with `[START]` and is
decoded greedily until `[END]`. Positions, attention mask and the bidirectional RoPE are those of
training (`bico.abi.collate_abi_examples`).

What differs from `model.generate`: one bidirectional prefill, then ordinary causal decoding. With the
`[MASK]` at index m, Part A holds positions 0..m+1 (EOS at m + 1) and Part B token t (`[START]` = 0)
sits at m + t. So `[START]` is the only Part B token with a key ahead of it (EOS, conjugate rotation); every
later Part B token sees Part A keys at or before its own position and earlier Part B keys, all with
the ordinary rotation, and no Part A token sees Part B. One forward of Part A + `[START]` inside
`bico.bidirectional(model)` therefore yields exactly the keys and values (cached, as HF does, with
their ordinary rotation) and the `[START]` logits that the full training-layout forward computes, and
the rest of Part B is a causal continuation of that KV cache, run outside the context (the patch
refuses a cache inside it). Scoring shares one prefill among all the completions of a prompt.
`use_cache=False` (or `model.generation_config.use_cache = False`) keeps the reference: every new
token re-runs the whole sequence in bidirectional mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from transformers import Cache, PreTrainedTokenizerBase
from transformers.utils import logging

from .abi import AbiExample, AbiTokens, abi_attention_mask, abi_token_ids, build_abi_example, collate_abi_examples
from .compat import CACHE_KWARG, output_cache
from .decoding import MAX_PAIRS, model_device, pad_token_id, score_continuations
from .patch import bidirectional, is_patched, patch_llama, unpatch_llama


logger = logging.get_logger(__name__)


def _infill_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion_ids: Sequence[int], tokens: AbiTokens, add_eos: bool
) -> AbiExample:
    """The training layout of `prompt + completion (+ EOS)` with one span covering exactly the completion."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    span = (len(prompt_ids), len(prompt_ids) + len(completion_ids))
    return build_abi_example(prompt_ids + list(completion_ids) + eos, [span], [0], tokens)


def _check_batch_size(batch_size: int, name: str = "batch_size") -> None:
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"`{name}` must be an integer >= 1, got {batch_size!r}.")


@contextlib.contextmanager
def _inference_mode(model: torch.nn.Module) -> Iterator[None]:
    """Patch (if needed), switch to eval and no_grad; undo it all afterwards. Bidirectional mode is per forward."""
    patched_here = not is_patched(model)
    if patched_here:
        patch_llama(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if patched_here:
            unpatch_llama(model)


def _uses_cache(model: torch.nn.Module, use_cache: bool | None) -> bool:
    # As `model.generate` does, an unset `use_cache` follows the model's generation config.
    if use_cache is not None:
        return use_cache
    if getattr(getattr(model, "generation_config", None), "use_cache", True) is False:
        logger.warning_once(
            "bico: `model.generation_config.use_cache` is False, so blank infilling runs the reference path "
            "(the whole sequence per token); set it to True for the KV-cache path (same results, faster)."
        )
        return False
    return True


def _score_dtype(model: torch.nn.Module) -> torch.dtype:
    # Log-softmax and sums in float32 at least; a float64 model keeps float64.
    return torch.promote_types(next(model.parameters()).dtype, torch.float32)


class _Prefix(NamedTuple):
    """B prompts' Part A + `[START]` after their one bidirectional forward (W columns, right-padded)."""

    logits: torch.Tensor  # (B, V) at `[START]`: the distribution of Part B's first token
    cache: Cache  # every layer's keys and values, (B, H_kv, W, D), keys with their ordinary rotation
    key_mask: torch.Tensor  # (B, W) long: 1 on Part A and `[START]`, 0 on padding
    next_positions: torch.Tensor  # (B,) long: the position of the token after `[START]` ([MASK] index + 1)


def _prefill(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], tokens: AbiTokens, add_eos: bool
) -> _Prefix:
    """Run Part A + `[START]` of each prompt once, in the training layout, inside `bidirectional(model)`."""
    examples = [_infill_example(tokenizer, prompt, [], tokens, add_eos) for prompt in prompts]
    batch = collate_abi_examples(examples, pad_token_id(tokenizer), "llama")
    batch.pop("labels")
    B, W = batch["input_ids"].shape
    starts = torch.tensor([example.part_a_length for example in examples])  # (B,) the `[START]` column
    # The lm_head runs only on the columns that hold a `[START]` (rows differ in Part A length).
    columns, row_column = torch.unique(starts, return_inverse=True)  # (K,), (B,)
    device = model_device(model)
    with bidirectional(model):
        inputs = {key: value.to(device) for key, value in batch.items()}
        out = model(**inputs, use_cache=True, logits_to_keep=columns.to(device))
    rows = torch.arange(B)
    return _Prefix(
        logits=out.logits[rows.to(device), row_column.to(device)],  # (B, V)
        cache=output_cache(out),
        key_mask=(torch.arange(W) <= starts[:, None]).long().to(device),  # (B, W)
        next_positions=(batch["position_ids"][rows, starts] + 1).to(device),
    )


def _greedy_from_prefix(
    model: torch.nn.Module, prefix: _Prefix, max_new_tokens: int, end_token_id: int
) -> torch.Tensor:
    """Greedy Part B after `[START]`, decoded causally on the prefix's cache: (B, T) long on CPU, T <= `max_new_tokens`."""
    logits, attention_mask = prefix.logits, prefix.key_mask  # (B, V), (B, W)
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    generated = []
    for step in range(max_new_tokens):
        next_token = logits.argmax(dim=-1).masked_fill(finished, end_token_id)  # (B,)
        generated.append(next_token)
        finished |= next_token == end_token_id
        if finished.all() or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)  # (B, W + step + 1)
        logits = model(
            input_ids=next_token[:, None],
            attention_mask=attention_mask,
            position_ids=(prefix.next_positions + step)[:, None],
            **{CACHE_KWARG: prefix.cache},
            use_cache=True,
        ).logits[:, -1]
    return torch.stack(generated, dim=1).cpu()


def _greedy_reference(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int,
    tokens: AbiTokens, add_eos: bool,
) -> torch.Tensor:
    """The same as `_prefill` + `_greedy_from_prefix`, re-running the whole sequence per token: (B, T) long."""
    parts = [_infill_example(tokenizer, prompt, [], tokens, add_eos) for prompt in prompts]
    device = model_device(model)
    B, width = len(parts), max(part.part_a_length for part in parts)  # Part B starts at column `width` in every row
    part_a = torch.full((B, width), pad_token_id(tokenizer), dtype=torch.long)  # (B, La)
    for row, part in enumerate(parts):
        part_a[row, : part.part_a_length] = torch.tensor(part.input_ids[: part.part_a_length])
    a_lengths = torch.tensor([part.part_a_length for part in parts])  # (B,)
    mask_index = torch.tensor([part.positions[-1] for part in parts])  # (B,) the `[START]`'s = its `[MASK]`'s index
    positions_a = torch.arange(width).expand(B, width) * (torch.arange(width) < a_lengths[:, None])
    part_b = torch.full((B, 1), tokens.start_token_id, dtype=torch.long)  # (B, T)
    finished = torch.zeros(B, dtype=torch.bool)
    for _ in range(max_new_tokens):
        T = part_b.shape[1]
        positions_b = mask_index[:, None] + torch.arange(T)  # (B, T): [MASK] index + offset
        length = width + T
        mask = abi_attention_mask(a_lengths, torch.full((B,), width), torch.full((B,), length), length)
        with bidirectional(model):
            logits = model(
                input_ids=torch.cat([part_a, part_b], dim=1).to(device),
                attention_mask=mask.to(device),
                position_ids=torch.cat([positions_a, positions_b], dim=1).to(device),
                use_cache=False,
                logits_to_keep=1,  # only the last column is decoded; skips most of the lm_head
            ).logits  # (B, 1, V)
        next_token = logits[:, -1].argmax(dim=-1).cpu()  # (B,)
        next_token = next_token.masked_fill(finished, tokens.end_token_id)
        part_b = torch.cat([part_b, next_token[:, None]], dim=1)
        finished |= next_token == tokens.end_token_id
        if finished.all():
            break
    return part_b[:, 1:]


def abi_generate_ids(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 40,
    batch_size: int = 16,
    add_eos: bool = True,
    use_cache: bool | None = None,
) -> list[list[int]]:
    """Greedy blank infilling, as token ids: what `abi_generate` decodes (same arguments).

    Returns:
        `list[list[int]]`: the tokens generated after `[START]` for each prompt, ending with `[END]`
        when it was generated within `max_new_tokens`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}.")
    _check_batch_size(batch_size)
    tokens = abi_token_ids(tokenizer)
    outputs: list[list[int]] = []
    with _inference_mode(model):
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first : first + batch_size]
            if _uses_cache(model, use_cache):
                prefix = _prefill(model, tokenizer, batch, tokens, add_eos)
                part_b = _greedy_from_prefix(model, prefix, max_new_tokens, tokens.end_token_id)
            else:
                part_b = _greedy_reference(model, tokenizer, batch, max_new_tokens, tokens, add_eos)
            for row in part_b.tolist():
                if tokens.end_token_id in row:
                    row = row[: row.index(tokens.end_token_id) + 1]
                outputs.append(row)
    return outputs


def abi_generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 40,
    batch_size: int = 16,
    add_eos: bool = True,
    use_cache: bool | None = None,
) -> list[str]:
    """Greedy blank infilling: fill the `[MASK]` after each prompt.

    Part A = `tokenizer(prompt)` (BOS included) + `[MASK]` (+ EOS); Part B = `[START]` then greedy
    tokens until `[END]` or `max_new_tokens`. Rows of a batch are padded and masked, so the result
    does not depend on `batch_size`. A model that is not yet patched is patched for the call and
    unpatched afterwards; its train/eval mode is restored. Call it outside `bico.bidirectional`.

    Args:
        model (`torch.nn.Module`): A Llama-family causal LM trained with `bico.abi.AbiCollator`.
        tokenizer (`PreTrainedTokenizerBase`): With the ABI tokens (`bico.abi.add_abi_tokens`).
        prompts (`Sequence[str]`): Prompt texts, without special tokens.
        max_new_tokens (`int`, *optional*, defaults to 40): Most tokens generated per prompt (`[END]` included).
        batch_size (`int`, *optional*, defaults to 16): Prompts per forward.
        add_eos (`bool`, *optional*, defaults to `True`): Put EOS after `[MASK]`, as in training texts.
        use_cache (`bool`, *optional*): `True`: one bidirectional prefill of Part A + `[START]`, then
            causal decoding on its KV cache (see the module docstring). `False`: the reference, which
            re-runs the whole sequence for every new token (same tokens, slower). Unset, it follows
            `model.generation_config.use_cache` (True unless set), as `model.generate` does; setting
            that to False is how `bico.evaluation.evaluate` runs the reference.

    Returns:
        `list[str]`: One infill per prompt, decoded without special tokens and without `[END]`.
    """
    generated = abi_generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, add_eos, use_cache)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]


def _score_from_prefixes(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], targets: list[list[int]],
    batch_size: int, max_pairs: int, tokens: AbiTokens, add_eos: bool,
) -> torch.Tensor:
    """Sum of log p(target tokens) after one shared prefill per distinct prompt: (N,) in `_score_dtype`."""
    distinct = list(dict.fromkeys(prompts))
    index_of = {prompt: i for i, prompt in enumerate(distinct)}
    members: list[list[int]] = [[] for _ in distinct]  # rows of each distinct prompt
    for n, prompt in enumerate(prompts):
        members[index_of[prompt]].append(n)
    scores = torch.zeros(len(prompts), dtype=_score_dtype(model))
    for first in range(0, len(distinct), batch_size):
        prefix = _prefill(model, tokenizer, distinct[first : first + batch_size], tokens, add_eos)
        pairs = [(i, n) for i in range(first, min(first + batch_size, len(distinct))) for n in members[i]]
        flat = score_continuations(
            model, prefix.logits, prefix.cache, prefix.key_mask, prefix.next_positions,
            [i - first for i, _ in pairs], [targets[n] for _, n in pairs], max_pairs,
        )
        scores[[n for _, n in pairs]] = torch.tensor(flat, dtype=scores.dtype)
    return scores


def _score_reference(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], completion_ids: list[list[int]],
    batch_size: int, include_end: bool, tokens: AbiTokens, add_eos: bool,
) -> torch.Tensor:
    """The same scores from one full training-layout forward per (prompt, completion) pair: (N,) in `_score_dtype`."""
    examples = [_infill_example(tokenizer, p, ids, tokens, add_eos) for p, ids in zip(prompts, completion_ids)]
    device = model_device(model)
    scores = []
    for first in range(0, len(examples), batch_size):
        batch = collate_abi_examples(examples[first : first + batch_size], pad_token_id(tokenizer), "llama")
        labels = batch.pop("labels")[:, 1:]  # (B, L - 1): the target of each output but the last
        with bidirectional(model):
            logits = model(**{key: value.to(device) for key, value in batch.items()}, use_cache=False).logits
        log_probs = torch.log_softmax(logits[:, :-1].to(_score_dtype(model)), dim=-1).cpu()  # (B, L - 1, V)
        keep = labels != -100
        if not include_end:
            keep &= labels != tokens.end_token_id
        picked = log_probs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # (B, L - 1)
        scores.append(torch.where(keep, picked, 0.0).sum(dim=1))
    return torch.cat(scores) if scores else torch.zeros(0, dtype=_score_dtype(model))


def abi_score(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 16,
    include_end: bool = False,
    add_eos: bool = True,
    max_pairs: int = MAX_PAIRS,
    use_cache: bool | None = None,
) -> torch.Tensor:
    """Total log-probability of each completion as the infill of `prompt [MASK]` (for ranking candidates).

    The sequence is the training layout of the text `prompt + completion (+ EOS)` with one span
    covering exactly the completion: Part A `prompt [MASK] (EOS)`, Part B `[START] completion`, and
    the score sums log p(token | Part A, earlier Part B tokens) over the completion's tokens. Rows
    with the same prompt share one prefill of Part A + `[START]` (list a prompt's candidates together
    with one `batch_size` covering many prompts: that is where the speed comes from).

    Args:
        model (`torch.nn.Module`): A Llama-family causal LM trained with `bico.abi.AbiCollator`.
        tokenizer (`PreTrainedTokenizerBase`): With the ABI tokens.
        prompts (`Sequence[str]`), completions (`Sequence[str]`): N rows each; completions are
            tokenized on their own (no special tokens). An empty completion scores 0.0 (or
            log p(`[END]`) with `include_end`).
        batch_size (`int`, *optional*, defaults to 16): Distinct prompts per prefill (with
            `use_cache=False`: rows per forward).
        include_end (`bool`, *optional*, defaults to `False`): Also add log p(`[END]`) after the
            completion, i.e. score "the blank is exactly this" rather than "the blank starts with this"
            (the latter matches causal-LM scoring of a completion without EOS).
        add_eos (`bool`, *optional*, defaults to `True`): Put EOS after `[MASK]`, as in training texts.
        max_pairs (`int`, *optional*, defaults to 256): Rows per continuation forward on the shared cache.
        use_cache (`bool`, *optional*): `False` runs the reference, one full forward per row (same
            scores up to float rounding, slower). Unset, it follows `model.generation_config.use_cache`
            (True unless set), as in `abi_generate`.

    Returns:
        `torch.FloatTensor` of shape `(N,)` (float32, float64 for a float64 model; on CPU): one total
        log-probability per row.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"`prompts` has {len(prompts)} rows but `completions` has {len(completions)}.")
    _check_batch_size(batch_size)
    _check_batch_size(max_pairs, "max_pairs")
    tokens = abi_token_ids(tokenizer)
    completion_ids = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions]
    with _inference_mode(model):
        if not _uses_cache(model, use_cache):
            return _score_reference(model, tokenizer, prompts, completion_ids, batch_size, include_end, tokens, add_eos)
        targets = [ids + [tokens.end_token_id] if include_end else ids for ids in completion_ids]
        return _score_from_prefixes(model, tokenizer, prompts, targets, batch_size, max_pairs, tokens, add_eos)
