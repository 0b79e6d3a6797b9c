"""Blank-infilling inference for ABI-trained Llama-family models: greedy infilling and completion scoring.

A model trained with GLM's autoregressive blank infilling (`bico.abi`; GLM, Du et al., ACL 2022,
section 2.3) answers a prompt by filling a blank after it: Part A is `prompt [MASK] EOS` (EOS because
the training texts end with it and spans never cover it), Part B starts with `[START]` and is
decoded greedily until `[END]`. Positions, attention mask and the bidirectional RoPE are those of
training (`bico.abi.collate_abi_examples`), so the forwards run inside `bico.bidirectional(model)`.

What differs from `model.generate`: no KV cache (the patch refuses one in bidirectional mode, and a
Part B query sees Part A keys ahead of it), so each new token re-runs the whole sequence. At the
lengths of the reversal-curse data (about 30 prompt tokens, 40 new ones) this is cheap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .abi import AbiTokens, abi_attention_mask, abi_token_ids, build_abi_example, collate_abi_examples
from .patch import bidirectional, is_patched, patch_llama, unpatch_llama


def _part_a(tokenizer: PreTrainedTokenizerBase, prompt: str, tokens: AbiTokens, add_eos: bool) -> tuple[list[int], int]:
    """Part A of an infilling query and the index of its `[MASK]`."""
    ids = list(tokenizer(prompt)["input_ids"])
    mask_index = len(ids)
    ids.append(tokens.mask_token_id)
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids, mask_index


def _check_batch_size(batch_size: int) -> None:
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")


@contextlib.contextmanager
def _inference_mode(model: torch.nn.Module) -> Iterator[None]:
    """Patch (if needed), switch to eval and no_grad, enter bidirectional mode; undo it all afterwards."""
    patched_here = not is_patched(model)
    if patched_here:
        patch_llama(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), bidirectional(model):
            yield
    finally:
        model.train(was_training)
        if patched_here:
            unpatch_llama(model)


def _pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def abi_generate_ids(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 40,
    batch_size: int = 16,
    add_eos: bool = True,
) -> list[list[int]]:
    """Greedy blank infilling, as token ids: what `abi_generate` decodes.

    Returns:
        `list[list[int]]`: the tokens generated after `[START]` for each prompt, ending with `[END]`
        when it was generated within `max_new_tokens`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}.")
    _check_batch_size(batch_size)
    tokens = abi_token_ids(tokenizer)
    pad_token_id = _pad_token_id(tokenizer)
    device = next(model.parameters()).device
    outputs: list[list[int]] = []
    with _inference_mode(model):
        for first in range(0, len(prompts), batch_size):
            parts, mask_index = zip(*(_part_a(tokenizer, p, tokens, add_eos) for p in prompts[first : first + batch_size]))
            B, width = len(parts), max(len(part) for part in parts)  # Part B starts at column `width` in every row
            part_a = torch.full((B, width), pad_token_id, dtype=torch.long)  # (B, La)
            for row, part in enumerate(parts):
                part_a[row, : len(part)] = torch.tensor(part)
            a_lengths = torch.tensor([len(part) for part in parts])  # (B,)
            mask_index = torch.tensor(mask_index)  # (B,)
            positions_a = torch.arange(width).expand(B, width) * (torch.arange(width) < a_lengths[:, None])
            part_b = torch.full((B, 1), tokens.start_token_id, dtype=torch.long)  # (B, T)
            finished = torch.zeros(B, dtype=torch.bool)
            for _ in range(max_new_tokens):
                T = part_b.shape[1]
                positions_b = mask_index[:, None] + torch.arange(T)  # (B, T): [MASK] index + offset
                length = width + T
                mask = abi_attention_mask(a_lengths, torch.full((B,), width), torch.full((B,), length), length)
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
            for row in part_b[:, 1:].tolist():
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
) -> list[str]:
    """Greedy blank infilling: fill the `[MASK]` after each prompt.

    Part A = `tokenizer(prompt)` (BOS included) + `[MASK]` (+ EOS); Part B = `[START]` then greedy
    tokens until `[END]` or `max_new_tokens`. Rows of a batch are padded and masked, so the result
    does not depend on `batch_size`. A model that is not yet patched is patched for the call and
    unpatched afterwards; its train/eval mode is restored.

    Args:
        model (`torch.nn.Module`): A Llama-family causal LM trained with `bico.abi.AbiCollator`.
        tokenizer (`PreTrainedTokenizerBase`): With the ABI tokens (`bico.abi.add_abi_tokens`).
        prompts (`Sequence[str]`): Prompt texts, without special tokens.
        max_new_tokens (`int`, *optional*, defaults to 40): Most tokens generated per prompt (`[END]` included).
        batch_size (`int`, *optional*, defaults to 16): Prompts per forward.
        add_eos (`bool`, *optional*, defaults to `True`): Put EOS after `[MASK]`, as in training texts.

    Returns:
        `list[str]`: One infill per prompt, decoded without special tokens and without `[END]`.
    """
    generated = abi_generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, add_eos)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]


def abi_score(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 16,
    include_end: bool = False,
    add_eos: bool = True,
) -> torch.Tensor:
    """Total log-probability of each completion as the infill of `prompt [MASK]` (for ranking candidates).

    The sequence is the training layout of the text `prompt + completion (+ EOS)` with one span
    covering exactly the completion: Part A `prompt [MASK] (EOS)`, Part B `[START] completion`, and
    the score sums log p(token | Part A, earlier Part B tokens) over the completion's tokens.

    Args:
        model (`torch.nn.Module`): A Llama-family causal LM trained with `bico.abi.AbiCollator`.
        tokenizer (`PreTrainedTokenizerBase`): With the ABI tokens.
        prompts (`Sequence[str]`), completions (`Sequence[str]`): Same length; completions are
            tokenized on their own (no special tokens). An empty completion scores 0.0 (or
            log p(`[END]`) with `include_end`).
        batch_size (`int`, *optional*, defaults to 16): Rows per forward.
        include_end (`bool`, *optional*, defaults to `False`): Also add log p(`[END]`) after the
            completion, i.e. score "the blank is exactly this" rather than "the blank starts with this"
            (the latter matches causal-LM scoring of a completion without EOS).
        add_eos (`bool`, *optional*, defaults to `True`): Put EOS after `[MASK]`, as in training texts.

    Returns:
        `torch.FloatTensor` of shape `(N,)` (float32, on CPU): one total log-probability per row.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"`prompts` has {len(prompts)} rows but `completions` has {len(completions)}.")
    _check_batch_size(batch_size)
    tokens = abi_token_ids(tokenizer)
    pad_token_id = _pad_token_id(tokenizer)
    device = next(model.parameters()).device
    examples = []
    for prompt, completion in zip(prompts, completions):
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
        eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
        span = (len(prompt_ids), len(prompt_ids) + len(completion_ids))
        examples.append(build_abi_example(prompt_ids + completion_ids + eos, [span], [0], tokens))
    scores = []
    with _inference_mode(model):
        for first in range(0, len(examples), batch_size):
            batch = collate_abi_examples(examples[first : first + batch_size], pad_token_id, "llama")
            labels = batch.pop("labels")[:, 1:]  # (B, L - 1): the target of each output but the last
            logits = model(**{key: value.to(device) for key, value in batch.items()}, use_cache=False).logits
            log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()  # (B, L - 1, V)
            keep = labels != -100
            if not include_end:
                keep &= labels != tokens.end_token_id
            picked = log_probs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # (B, L - 1)
            scores.append(torch.where(keep, picked, 0.0).sum(dim=1))
    return torch.cat(scores) if scores else torch.zeros(0)
