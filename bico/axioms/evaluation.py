"""Evaluation of axiomatic training: Yes/No accuracy per evaluation set and per chain length.

Vashishtha et al. (arXiv 2407.07612, section 4; DESIGN.md section 9) read the model's answer as the
more likely of the two answer tokens after the question's `?`, and report accuracy per evaluation
set (length, name shift, reversal, shuffling, branching) and per graph size; chance is 0.5 (every
set is balanced). `evaluate` does this for one model; `write_results` and `plot_accuracy` compare
several (one per positional encoding, `bico-axioms eval --model A --model B ...`).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..report import SPARE_COLORS
from .models import check_vocabulary, collate, last_position_logits
from .tokenizer import ANSWERS, answer_ids, encode


__all__ = ["evaluate", "predict", "summarize", "write_results", "format_results", "plot_accuracy"]

CHANCE = 0.5
# Fixed colours, so an encoding looks the same in every plot; other labels take the spare ones.
ENCODING_COLORS = {"none": "tab:blue", "learned": "tab:orange", "sinusoidal": "tab:green", "rope": "tab:red"}


def evaluate(model, tokenizer, rows: list[dict], batch_size: int = 64, desc: str | None = None) -> dict:
    """Accuracy of `model` on `rows`, overall, per set and per chain length.

    Args:
        model: A causal LM from `bico.axioms.models` (on any device; put in eval mode here).
        tokenizer: The tokenizer saved with it (`check_vocabulary` must pass).
        rows (`list[dict]`): Rows of `generate_eval` / `read_jsonl`, any mix of sets.
        batch_size (`int`, *optional*, defaults to 64): Rows per forward pass; the answers do not depend on it.
        desc (`str`, *optional*): Show a progress bar with this title; none when None.

    Returns:
        `dict`: `{"accuracy", "count", "sets": {set: {"accuracy", "count", "yes_rate", "by_num_nodes":
        {num_nodes: {"accuracy", "count"}}}}}`; `yes_rate` is the share of Yes answers (0.5 for a balanced
        answerer, 1.0 for one that always says Yes); `num_nodes` keys are strings (as in the JSON file).

    Raises:
        `ValueError`: a tokenizer that does not fit the model, or a row longer than GPT-2's position table.
    """
    if batch_size <= 0:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
    check_vocabulary(model, tokenizer)
    examples = encode(rows, tokenizer)
    limit = getattr(model.config, "n_positions", None)  # GPT-2's table; RoPE has no limit
    for index, example in enumerate(examples):
        if limit is not None and len(example["input_ids"]) > limit:
            raise ValueError(
                f"row {index} of set {example['set']!r} has {len(example['input_ids'])} tokens, more than the model's "
                f"{limit} positions (`max_positions`); train with a larger `max_positions`."
            )
    device = next(model.parameters()).device
    model.eval()
    predicted = predict(
        examples, answer_ids(tokenizer), tokenizer.pad_token_id, batch_size,
        lambda input_ids, attention_mask: last_position_logits(model, input_ids.to(device), attention_mask.to(device)), desc,
    )
    return summarize(examples, predicted, yes_id=answer_ids(tokenizer)[ANSWERS.index("Yes")])


def predict(examples: list[dict], answers: tuple[int, int], pad_token_id: int, batch_size: int, logits_fn,
            desc: str | None = None) -> list[int]:
    """The more likely of the two answer tokens for each encoded example, in the examples' order.

    Args:
        examples (`list[dict]`): Each with `input_ids` (`list[int]`, the prompt) and `label` (`collate`).
        answers (`tuple[int, int]`): The ids of Yes and No.
        pad_token_id (`int`): Right padding.
        batch_size (`int`): Examples per call of `logits_fn`; the answers do not depend on it.
        logits_fn: `(input_ids, attention_mask) -> logits`, (B, L) right-padded -> (B, V) at each row's last
            real position; called under `torch.no_grad()`.
        desc (`str`, *optional*): Show a progress bar with this title; none when None.

    Returns:
        `list[int]`: The predicted answer id of each example.
    """
    answers = torch.tensor(answers)
    # Batches of similar lengths waste less on padding; the answers are put back in row order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    predicted = [0] * len(examples)
    with torch.no_grad():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None):
            indices = order[start : start + batch_size]
            batch = collate([examples[i] for i in indices], pad_token_id)
            logits = logits_fn(batch["input_ids"], batch["attention_mask"]).float().cpu()  # (B, V)
            for i, token in zip(indices, answers[logits[:, answers].argmax(dim=-1)].tolist()):
                predicted[i] = token
    return predicted


def summarize(examples: list[dict], predicted: list[int], yes_id: int) -> dict:
    """Accuracy overall, per set and per chain length of predicted answer ids (`evaluate`'s return value).

    Args:
        examples (`list[dict]`): Each with `label` (the right answer's id), `set` and `num_nodes`.
        predicted (`list[int]`): The answer id predicted for each example.
        yes_id (`int`): The id of Yes, for `yes_rate`.
    """
    right = [p == example["label"] for p, example in zip(predicted, examples)]
    by_set = defaultdict(list)
    for index, example in enumerate(examples):
        by_set[example["set"]].append(index)
    sets = {}
    for name, indices in by_set.items():
        by_size = defaultdict(list)
        for i in indices:
            by_size[examples[i]["num_nodes"]].append(right[i])
        sets[name] = {
            "accuracy": sum(right[i] for i in indices) / len(indices),
            "count": len(indices),
            "yes_rate": sum(predicted[i] == yes_id for i in indices) / len(indices),
            "by_num_nodes": {str(n): {"accuracy": sum(hits) / len(hits), "count": len(hits)} for n, hits in sorted(by_size.items())},
        }
    return {"accuracy": sum(right) / len(right) if right else float("nan"), "count": len(right), "sets": sets}


# --------------------------------------------------------------------------------------------------
# Tables and plot
# --------------------------------------------------------------------------------------------------


def format_results(results_by_model: dict[str, dict]) -> str:
    """Markdown tables: accuracy per set (one column per model), then per chain length for each set.

    Args:
        results_by_model (`dict[str, dict]`): `{label: evaluate(...)}`, e.g. labels `none`, `learned`.
    """
    labels = list(results_by_model)
    sets = list(dict.fromkeys(name for results in results_by_model.values() for name in results["sets"]))
    lines = ["| set | n | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 2)]
    for name in sets:
        counts = {results["sets"][name]["count"] for results in results_by_model.values() if name in results["sets"]}
        cells = [_accuracy(results["sets"].get(name)) for results in results_by_model.values()]
        lines.append(f"| {name} | {'/'.join(map(str, sorted(counts)))} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Chance is {CHANCE}. By chain length (number of nodes; n = questions of that length):")
    for name in sets:
        sizes = sorted({int(n) for results in results_by_model.values() for n in results["sets"].get(name, {}).get("by_num_nodes", {})})
        lines += ["", f"**{name}**", "", "| model | " + " | ".join(map(str, sizes)) + " |", "|" + "---|" * (len(sizes) + 1)]
        first = next(results["sets"][name] for results in results_by_model.values() if name in results["sets"])
        lines.append("| n | " + " | ".join(str(first["by_num_nodes"].get(str(n), {}).get("count", "-")) for n in sizes) + " |")
        for label, results in results_by_model.items():
            by_size = results["sets"].get(name, {}).get("by_num_nodes", {})
            lines.append(f"| {label} | " + " | ".join(_accuracy(by_size.get(str(n))) for n in sizes) + " |")
    return "\n".join(lines)


def write_results(results_by_model: dict[str, dict], output_dir: str | os.PathLike) -> Path:
    """Write `results.json` (`{label: results}`) and `results.md` (`format_results`) into `output_dir`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results_by_model, indent=2) + "\n", encoding="utf-8")
    text = "# Axiomatic training: Yes/No accuracy\n\n" + format_results(results_by_model) + "\n"
    (output_dir / "results.md").write_text(text, encoding="utf-8")
    return output_dir


def plot_accuracy(results_by_encoding: dict[str, dict], path: str | os.PathLike | None = None):
    """Plot accuracy against chain length: one panel per evaluation set, one line per encoding, chance dashed.

    Args:
        results_by_encoding (`dict[str, dict]`): `{label: evaluate(...)}`; the labels `none`, `learned`,
            `sinusoidal`, `rope` keep fixed colours.
        path (`str` or `os.PathLike`, *optional*): Where to save the PNG; not saved when None.

    Returns:
        `matplotlib.figure.Figure`.

    Raises:
        `ImportError`: when matplotlib is not installed (`pip install matplotlib`).
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ImportError("plot_accuracy needs matplotlib: pip install matplotlib (or pip install 'bico[plot]').") from None

    sets = list(dict.fromkeys(name for results in results_by_encoding.values() for name in results["sets"]))
    spare = iter(SPARE_COLORS * len(results_by_encoding))
    colors = {label: ENCODING_COLORS.get(label) or next(spare) for label in results_by_encoding}
    columns = min(4, max(1, len(sets)))
    rows = -(-max(1, len(sets)) // columns)
    fig = Figure(figsize=(3.6 * columns, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for name, ax in zip(sets, axes):
        for label, results in results_by_encoding.items():
            by_size = results["sets"].get(name, {}).get("by_num_nodes", {})
            if by_size:
                sizes = sorted(by_size, key=int)
                ax.plot([int(n) for n in sizes], [by_size[n]["accuracy"] for n in sizes], marker="o", markersize=3,
                        color=colors[label], label=label)
        ax.axhline(CHANCE, linestyle="--", color="gray", linewidth=1, label="chance")
        ax.set_title(name)
        ax.set_xlabel("nodes (chain length)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    for ax in axes[len(sets):]:
        ax.set_visible(False)
    if sets:
        axes[0].legend(fontsize="small")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _accuracy(metrics: dict | None) -> str:
    return "-" if metrics is None else f"{metrics['accuracy']:.3f}"
