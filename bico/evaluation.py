"""Evaluation on the name-description tasks: greedy answers, answer log-probabilities and their metrics.

The tasks and metrics are those of Berglund et al. (arXiv 2309.12288) and of the BICO paper (arXiv
2311.07468, section 5); DESIGN.md section 2 lists them and `bico.metrics` defines each metric. BICO
changes nothing at inference, so a model is evaluated as the ordinary causal LM:

- answers are decoded greedily (40 new tokens by default) from left-padded batches with the KV cache;
- the log-probability of an answer is the sum of its tokens' log-probabilities given the prompt
  (prompt and padding masked). For candidate ranking, each prompt is run once and its KV cache is
  shared by all of its candidates, which is what makes ranking cheap enough to run by default.

Models trained with the ABI baseline (`config.bico_objective == "abi"`) are evaluated in blank-infilling
mode through `bico.abi.abi_generate` / `bico.abi.abi_score`; `bico.decoding.abi_module` is the one place
that chooses. There too each prompt is run once (Part A + `[START]`, bidirectionally) and its KV cache
serves the greedy tokens and all of its candidates; `bico.decoding.score_continuations` scores in both modes.

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

from .data import TASKS, load_task, resolve_data_dir, resolve_tasks
from .decoding import abi_module, generate_answers, score_answers
from .metrics import char_bleu, contains_match, exact_match, mean_char_bleu, rank_correct, ranking_candidates, word_bleu


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
            "mode": "abi" if abi_module(model) is not None else "causal",
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


def _format_float(key: str, value: float) -> str:
    return f"{value:.2f}" if key.startswith(("bleu", "target_logprob", "random_logprob")) else f"{value:.3f}"
