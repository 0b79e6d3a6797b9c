"""Evaluation on the name-description tasks: greedy answers, answer log-probabilities and their metrics.

The tasks and metrics are those of Berglund et al. (arXiv 2309.12288) and of the BICO paper (arXiv
2311.07468, section 5); DESIGN.md section 2 lists them and `bico.metrics` defines each metric. BICO
changes nothing at inference, so a model is evaluated as the ordinary causal LM:

- answers are decoded greedily (40 new tokens by default) from left-padded batches with the KV cache;
- the log-probability of an answer is the sum of its tokens' log-probabilities given the prompt
  (prompt and padding masked). For candidate ranking, each prompt is run once and its KV cache is
  shared by all of its candidates, which is what makes ranking cheap enough to run by default.

Models trained with the ABI baseline (`config.bico_objective == "abi"`) are evaluated in blank-infilling
mode through `bico.abi.abi_generate` / `bico.abi.abi_score`; `_abi_module` is the one place that
chooses. There too each prompt is run once (Part A + `[START]`, bidirectionally) and its KV cache
serves the greedy tokens and all of its candidates; `score_continuations` scores in both modes.

Under Accelerate, batches are formed once over all prompts, dealt round-robin to the processes and
gathered, so every process returns the numbers a single process would.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from .compat import CACHE_KWARG, output_cache
from .data import TASKS, load_task, resolve_data_dir, resolve_tasks
from .metrics import char_bleu, contains_match, exact_match, mean_char_bleu, rank_correct, ranking_candidates, word_bleu


# (prompt, candidate) pairs per forward pass when scoring.
MAX_PAIRS = 256
# What each per-task number in `results["tasks"]` means (also written to results.json).
METRICS = {
    "count": "number of examples",
    "exact_match": "Berglund et al.: stripped, lowercased generation starts with the target",
    "contains": "BICO code: stripped, lowercased target occurs in the generation",
    "bleu_word": "word-level corpus BLEU (sacrebleu, 13a), 0-100; description answers only",
    "bleu_char": "mean character-level sentence BLEU = 100 x NLTK sentence_bleu on raw strings; description answers only",
    "target_logprob": "mean total log-probability of the target given the prompt",
    "random_logprob": "mean total log-probability of another person's answer (*_randomized file)",
    "target_beats_random": "fraction of examples where the target is more likely than the random answer",
    "rank_accuracy": "fraction of examples whose target has the highest log-probability among the candidates",
    "rank_chance": "accuracy of a random ranking (mean of 1 / number of candidates)",
}
# Task whose answers are the names of the people that a description-answer task's prompts mention.
NAME_TASKS = [name for name, task in TASKS.items() if task.answer == "name"]


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
    abi = _abi_module(model)
    if abi is not None:
        return abi.abi_generate(model, tokenizer, prompts, max_new_tokens)
    pad_id = _pad_token_id(tokenizer)
    input_ids, attention_mask = _pad(_encode(tokenizer, prompts), pad_id, side="left", device=_device(model))
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
    answer tokens are `encode(prompt + answer)[len(encode(prompt)):]`, so tokenizers that merge across
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
    abi = _abi_module(model)
    pairs = [(i, answer) for i, answers in enumerate(candidates) for answer in answers]
    if abi is not None:
        # One blank-infilling prefill per prompt, shared by all of its candidates (bico.abi_generation).
        scores = abi.abi_score(
            model, tokenizer, [prompts[i] for i, _ in pairs], [a for _, a in pairs],
            batch_size=max(len(prompts), 1), max_pairs=max_pairs,
        )
        return _unflatten(scores.tolist(), candidates)

    device = _device(model)
    prompt_ids = _encode(tokenizer, prompts)
    full_ids = _encode(tokenizer, [prompts[i] + answer for i, answer in pairs])
    answer_ids = [ids[len(prompt_ids[i]) :] for (i, _), ids in zip(pairs, full_ids)]

    input_ids, prompt_mask = _pad(prompt_ids, _pad_token_id(tokenizer), side="left", device=device)
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


@torch.inference_mode()
def evaluate(
    model,
    tokenizer,
    tasks,
    data_dir=None,
    batch_size: int = 32,
    max_new_tokens: int = 40,
    accelerator=None,
    rank: bool = True,
    show_progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Evaluate `model` on name-description tasks: generation metrics, log-probabilities and ranking.

    Args:
        model (`PreTrainedModel`): A causal LM (a peft wrapper or an Accelerate-prepared model is fine);
            it is put in eval mode and restored afterwards.
        tokenizer (`PreTrainedTokenizerBase`): Its tokenizer.
        tasks (`str` or `list[str]`): Task names of `bico.data.TASKS`, or `"all"`.
        data_dir (`str` or `os.PathLike`, *optional*): Directory of the task files; defaults to `data/`.
            The names of the people, used to build ranking candidates, are read from the name tasks'
            files (`n2d-reverse`, `d2n`) when the directory has them.
        batch_size (`int`, *optional*, defaults to 32): Prompts per generation and scoring batch.
        max_new_tokens (`int`, *optional*, defaults to 40): Greedy decoding length.
        accelerator (`accelerate.Accelerator`, *optional*): When given, batches are split across its
            processes and gathered; every process returns the full results.
        rank (`bool`, *optional*, defaults to `True`): Score every candidate answer for ranking; with
            `False` only the target and the random answer are scored.
        show_progress (`bool`, *optional*, defaults to `True`): tqdm bars on the main process.

    Returns:
        `tuple[dict, list[dict]]`: `results` with `tasks` (per-task metrics, see `METRICS`), `model`,
        `data_dir`, `settings`, `metrics`; and one prediction dict per example (task, index, prompt,
        target, generation and its per-example metrics), in task then file order.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}.")
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens}.")
    task_names = resolve_tasks(tasks)
    data_dir = resolve_data_dir(data_dir)
    datasets = {name: load_task(name, data_dir) for name in task_names}
    names = [c for name in NAME_TASKS if (data_dir / TASKS[name].file).is_file() for c in load_task(name, data_dir)["completion"]]

    rows = []
    for name, dataset in datasets.items():
        candidates = ranking_candidates(dataset["prompt"], dataset["completion"], names) if rank else None
        randoms = dataset["random_completion"] if "random_completion" in dataset.column_names else None
        for index, (prompt, target) in enumerate(zip(dataset["prompt"], dataset["completion"])):
            row = {"task": name, "index": index, "prompt": prompt, "target": target}
            row["candidates"] = candidates[index] if rank else [target]
            row["random"] = randoms[index] if randoms is not None else None
            # Everything to score for this row: the candidates, then the random answer if not among them.
            row["to_score"] = row["candidates"] + ([row["random"]] if row["random"] not in (None, *row["candidates"]) else [])
            rows.append(row)

    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    try:
        # Sorting by prompt length keeps padding low; ties keep file order.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt"]))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        start = time.perf_counter()
        generations = _run_batches(
            lambda batch: generate_answers(model, tokenizer, [rows[i]["prompt"] for i in batch], max_new_tokens),
            batches, accelerator, "generating", show_progress,
        )
        generation_seconds = time.perf_counter() - start
        scores = _run_batches(
            lambda batch: score_answers(model, tokenizer, [rows[i]["prompt"] for i in batch], [rows[i]["to_score"] for i in batch]),
            batches, accelerator, "scoring", show_progress,
        )
        scoring_seconds = time.perf_counter() - start - generation_seconds
    finally:
        model.train(was_training)
    for batch, batch_generations, batch_scores in zip(batches, generations, scores):
        for i, generation, row_scores in zip(batch, batch_generations, batch_scores):
            rows[i]["generation"] = generation
            rows[i]["scores"] = dict(zip(rows[i]["to_score"], row_scores))

    predictions, task_results = [], {}
    for name in task_names:
        task_rows = [row for row in rows if row["task"] == name]
        task_results[name], task_predictions = _task_metrics(TASKS[name], task_rows, rank)
        predictions.extend(task_predictions)
    results = {
        "model": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "data_dir": str(data_dir),
        "settings": {
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "decoding": "greedy",
            "mode": "abi" if _abi_module(model) is not None else "causal",
            "rank": rank,
            "num_processes": accelerator.num_processes if accelerator is not None else 1,
        },
        "tasks": task_results,
        "seconds": {"generation": round(generation_seconds, 2), "scoring": round(scoring_seconds, 2)},
        "metrics": METRICS,
    }
    return results, predictions


def format_table(results: dict) -> str:
    """A Markdown table of `results["tasks"]`: one row per task, `-` where a metric does not apply."""
    columns = [
        ("task", None), ("n", "count"), ("EM", "exact_match"), ("contains", "contains"),
        ("BLEU word", "bleu_word"), ("BLEU char", "bleu_char"), ("log p(target)", "target_logprob"),
        ("log p(random)", "random_logprob"), ("rank", "rank_accuracy"), ("chance", "rank_chance"),
    ]
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for name, metrics in results["tasks"].items():
        cells = [name]
        for _, key in columns[1:]:
            value = metrics.get(key)
            cells.append("-" if value is None else str(value) if isinstance(value, int) else _format_float(key, value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(results: dict, path: str | os.PathLike) -> None:
    """Write `results` as indented JSON; creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_predictions(predictions: list[dict], path: str | os.PathLike) -> None:
    """Write one JSON object per line; creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for prediction in predictions:
            f.write(json.dumps(prediction, ensure_ascii=False) + "\n")


def _task_metrics(task, rows: list[dict], rank: bool) -> tuple[dict, list[dict]]:
    generations = [row["generation"] for row in rows]
    targets = [row["target"] for row in rows]
    em = [exact_match(g, t) for g, t in zip(generations, targets)]
    contains = [contains_match(g, t) for g, t in zip(generations, targets)]
    target_scores = [row["scores"][row["target"]] for row in rows]
    metrics = {
        "answer": task.answer,
        "count": len(rows),
        "exact_match": sum(em) / len(rows),
        "exact_match_correct": sum(em),
        "contains": sum(contains) / len(rows),
        "contains_correct": sum(contains),
        "bleu_word": None,
        "bleu_char": None,
        "target_logprob": sum(target_scores) / len(rows),
        "random_logprob": None,
        "target_beats_random": None,
        "rank_accuracy": None,
        "rank_correct": None,
        "rank_chance": None,
        "rank_candidates": None,
    }
    predictions = [
        {"task": task.name, "index": row["index"], "prompt": row["prompt"], "target": row["target"],
         "generation": row["generation"], "exact_match": m, "contains": c, "target_logprob": s}
        for row, m, c, s in zip(rows, em, contains, target_scores)
    ]
    if task.answer == "description":
        metrics["bleu_word"] = word_bleu(generations, targets)
        metrics["bleu_char"] = mean_char_bleu(generations, targets)
        for prediction in predictions:
            prediction["bleu_char"] = char_bleu(prediction["generation"], prediction["target"])
    if rows[0]["random"] is not None:
        random_scores = [row["scores"][row["random"]] for row in rows]
        metrics["random_logprob"] = sum(random_scores) / len(rows)
        metrics["target_beats_random"] = sum(t > r for t, r in zip(target_scores, random_scores)) / len(rows)
        for prediction, row, score in zip(predictions, rows, random_scores):
            prediction.update(random_completion=row["random"], random_logprob=score)
    if rank:
        width = max(len(row["candidates"]) for row in rows)
        scores = torch.full((len(rows), width), float("-inf"), dtype=torch.float64)
        valid = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):
            scores[i, : len(row["candidates"])] = torch.tensor([row["scores"][c] for c in row["candidates"]], dtype=torch.float64)
            valid[i, : len(row["candidates"])] = True
        targets_index = [row["candidates"].index(row["target"]) for row in rows]
        correct = rank_correct(scores, targets_index, valid)
        counts = valid.sum(1).double()
        metrics.update(
            rank_accuracy=correct.double().mean().item(),
            rank_correct=int(correct.sum()),
            rank_chance=(1.0 / counts).mean().item(),
            rank_candidates=counts.mean().item(),
        )
        for i, (prediction, row) in enumerate(zip(predictions, rows)):
            prediction.update(
                rank_correct=bool(correct[i]),
                num_candidates=len(row["candidates"]),
                top_candidate=row["candidates"][int(scores[i].argmax())],
            )
    return metrics, predictions


def _run_batches(fn, batches: list[list[int]], accelerator, description: str, show_progress: bool) -> list:
    """`[fn(batch) for batch in batches]`, with the batches dealt round-robin across processes and gathered."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    is_main = accelerator is None or accelerator.is_main_process
    mine = list(range(rank, len(batches), world))
    outputs = [(b, fn(batches[b])) for b in tqdm(mine, desc=description, disable=not (show_progress and is_main))]
    if world > 1:
        from accelerate.utils import gather_object

        outputs = gather_object(outputs)
    return [output for _, output in sorted(outputs, key=lambda item: item[0])]


def _abi_module(model):
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


def _pad_token_id(tokenizer) -> int:
    # Llama-2's tokenizer has no pad token; any id works under the attention mask.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _unflatten(flat: list[float], nested: list[list]) -> list[list[float]]:
    out, start = [], 0
    for items in nested:
        out.append(flat[start : start + len(items)])
        start += len(items)
    return out


def _format_float(key: str, value: float) -> str:
    return f"{value:.2f}" if key.startswith(("bleu", "target_logprob", "random_logprob")) else f"{value:.3f}"
