"""Results of a comparison: mean and spread over seeds, Markdown tables and the plot of the reverse tasks.

`aggregate` turns runs read back by `bico.compare.load_run` into `{data set: {objective: ...}}`;
`format_comparison` (one row per task and objective) and `format_ablation` (one row per objective)
print it; `plot_comparison` draws the reverse tasks against training steps. Spread over seeds is the
sample standard deviation (n - 1); with one seed there is none.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

# Per-task numbers of `bico.evaluation.evaluate` that are averaged over seeds.
SUMMARY_METRICS = ("exact_match", "contains", "bleu_word", "bleu_char", "target_logprob", "random_logprob",
                   "target_beats_random", "rank_accuracy", "rank_chance")
PLOT_TASKS = ("n2d-reverse", "d2n-reverse")
PLOT_METRICS = {"exact_match": "exact match", "rank_accuracy": "candidate-ranking accuracy"}
# Fixed colours, so an objective looks the same in every panel and every plot; variants such as
# bico:mask_prob=0.3 take the spare ones (gray is the chance line's) in order of appearance.
OBJECTIVE_COLORS = {"ntp": "tab:blue", "bico": "tab:orange", "abi": "tab:green", "reverse": "tab:red"}
SPARE_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")

# --------------------------------------------------------------------------------------------------
# Aggregation over seeds
# --------------------------------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict:
    """`{"mean", "std", "n", "values"}`; `std` is the sample standard deviation, None for one value."""
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
        "values": values,
    }


def _task_numbers(runs: list[dict], get_tasks) -> dict:
    """`{task: {metric: summarize([...])}}` over `runs`, for the metrics every run has a number for."""
    out = {}
    tasks = dict.fromkeys(task for run in runs for task in get_tasks(run))
    for task in tasks:
        per_run = [get_tasks(run)[task] for run in runs if task in get_tasks(run)]
        metrics = {}
        for metric in SUMMARY_METRICS:
            values = [m[metric] for m in per_run if m.get(metric) is not None]
            if values:
                metrics[metric] = summarize(values)
        out[task] = metrics
    return out


def curve_points(run: dict) -> dict[int, dict]:
    """`{step: {task: metrics}}`: the evaluations during training plus the final one at the last step."""
    points = {record["step"]: dict(record["tasks"]) for record in run["history"]}
    if run["steps"] is not None:
        points[run["steps"]] = {**points.get(run["steps"], {}), **run["results"]}
    return dict(sorted(points.items()))


def aggregate(runs: list[dict]) -> dict:
    """Mean and spread over seeds of every run's final results and curves.

    Args:
        runs (`list[dict]`): `load_run` outputs (any data sets, objectives and seeds).

    Returns:
        `dict`: `{dataset: {objective: {"seeds": [...], "steps": [...], "final": {task: {metric: stats}},
        "curves": {task: {metric: {"steps": [...], "mean": [...], "std": [...], "n": [...]}}}}}}`, where
        `stats` is `summarize`'s dict; data sets and objectives in the order of `runs`.
    """
    out: dict = {}
    groups: dict = {}
    for run in runs:
        groups.setdefault(run["dataset"], {}).setdefault(run["objective"], []).append(run)
    for dataset, objectives in groups.items():
        for objective, group in objectives.items():
            points = [curve_points(run) for run in group]
            steps = sorted({step for p in points for step in p})
            by_step = {step: _task_numbers([p for p in points if step in p], lambda p, s=step: p[s]) for step in steps}
            curves: dict = {}
            for step in steps:
                for task, metrics in by_step[step].items():
                    for metric, stats in metrics.items():
                        curve = curves.setdefault(task, {}).setdefault(metric, {"steps": [], "mean": [], "std": [], "n": []})
                        curve["steps"].append(step)
                        curve["mean"].append(stats["mean"])
                        curve["std"].append(stats["std"])
                        curve["n"].append(stats["n"])
            out.setdefault(dataset, {})[objective] = {
                "seeds": [run["seed"] for run in group],
                "steps": sorted({run["steps"] for run in group if run["steps"] is not None}),
                "final": _task_numbers(group, lambda run: run["results"]),
                "curves": curves,
            }
    return out


# --------------------------------------------------------------------------------------------------
# Table and plot
# --------------------------------------------------------------------------------------------------


def _cell(stats: dict | None, digits: int, spread: bool = True) -> str:
    if stats is None:
        return "-"
    text = f"{stats['mean']:.{digits}f}"
    # The chance rate is a property of the data, not of the run: no spread to show.
    return text if stats["std"] is None or not spread else f"{text} ± {stats['std']:.{digits}f}"


def format_comparison(summary: dict) -> str:
    """Markdown tables of the final results: one per data set, one row per (task, objective).

    Columns: seeds (n); Berglund exact match; the BICO paper's looser match (target anywhere in the greedy
    answer); candidate-ranking accuracy and its chance rate; the mean
    log-probability of the target and of a random other person's answer, and how often the target wins
    (the last three only for the tasks with a `*_randomized` file). `mean ± std` over seeds; `-` where a
    metric does not apply.
    """
    header = ("| task | objective | n | exact match | contains | rank accuracy | rank chance | log p(target) "
              "| log p(random) | p(target) > p(random) |")
    blocks = []
    for dataset, objectives in summary.items():
        steps = sorted({s for entry in objectives.values() for s in entry["steps"]})
        lines = [f"### {dataset} ({', '.join(map(str, steps))} steps)", "", header, "|" + "---|" * 10]
        tasks = list(dict.fromkeys(task for entry in objectives.values() for task in entry["final"]))
        for task in tasks:
            for objective, entry in objectives.items():
                metrics = entry["final"].get(task)
                if metrics is None:
                    continue
                n = max((stats["n"] for stats in metrics.values()), default=0)
                cells = [task, objective, str(n), _cell(metrics.get("exact_match"), 3), _cell(metrics.get("contains"), 3),
                         _cell(metrics.get("rank_accuracy"), 3),
                         _cell(metrics.get("rank_chance"), 3, spread=False), _cell(metrics.get("target_logprob"), 2),
                         _cell(metrics.get("random_logprob"), 2), _cell(metrics.get("target_beats_random"), 3)]
                lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# The ablation table's columns: (task, metric, header). n2d is the forward direction the model was
# trained on; the two reverse tasks are the reversal curse.
ABLATION_COLUMNS = (
    ("n2d", "exact_match", "n2d EM"),
    ("n2d-reverse", "exact_match", "n2d-reverse EM"),
    ("n2d-reverse", "rank_accuracy", "n2d-reverse rank"),
    ("d2n", "exact_match", "d2n EM"),
    ("d2n-reverse", "exact_match", "d2n-reverse EM"),
    ("d2n-reverse", "rank_accuracy", "d2n-reverse rank"),
)


def format_ablation(summary: dict, columns: Sequence[tuple[str, str, str]] = ABLATION_COLUMNS) -> str:
    """Markdown tables with one row per objective (variants included) and one column per (task, metric).

    Cells are `mean ± std` over seeds; the last row gives the chance rate of the ranking columns (exact
    match's depends on the answers a model gives: 1 in N for one of N trained answers at random). One
    table per data set, objectives in run order.
    """
    header = "| objective | n | " + " | ".join(title for _, _, title in columns) + " |"
    blocks = []
    for dataset, objectives in summary.items():
        steps = sorted({s for entry in objectives.values() for s in entry["steps"]})
        lines = [f"### {dataset} ({', '.join(map(str, steps))} steps)", "", header, "|" + "---|" * (len(columns) + 2)]
        chance = ["-"] * len(columns)
        for objective, entry in objectives.items():
            cells = []
            for i, (task, metric, _) in enumerate(columns):
                metrics = entry["final"].get(task, {})
                cells.append(_cell(metrics.get(metric), 3))
                if metric == "rank_accuracy" and "rank_chance" in metrics:
                    chance[i] = _cell(metrics["rank_chance"], 3, spread=False)
            lines.append(f"| {objective} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
        lines.append("| chance | | " + " | ".join(chance) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def objective_colors(summary: dict) -> dict[str, str]:
    """A colour per objective of `summary`, the same in every data set's panels."""
    objectives = dict.fromkeys(objective for entries in summary.values() for objective in entries)
    variants = [objective for objective in objectives if objective not in OBJECTIVE_COLORS]
    spare = {objective: SPARE_COLORS[i % len(SPARE_COLORS)] for i, objective in enumerate(variants)}
    return {objective: OBJECTIVE_COLORS.get(objective) or spare[objective] for objective in objectives}


def plot_comparison(summary: dict, path: str | os.PathLike | None = None, tasks: Sequence[str] = PLOT_TASKS):
    """Plot the reverse tasks' metrics against training steps: one line per objective, mean over seeds.

    One row of panels per (data set, metric in `PLOT_METRICS`), one column per task that some run
    evaluated. The band is mean ± std over seeds (none for one seed); the legend gives the number of
    seeds, as a range where some seeds were not evaluated at every step; the ranking panels show the
    chance rate as a dashed line.

    Args:
        summary (`dict`): `aggregate`'s output.
        path (`str` or `os.PathLike`, *optional*): Where to save the PNG; not saved when None.
        tasks (`Sequence[str]`, *optional*, defaults to `("n2d-reverse", "d2n-reverse")`): The columns.

    Returns:
        `matplotlib.figure.Figure`.
    """
    from matplotlib.figure import (
        Figure,  # no pyplot: no global figure state, no GUI backend
    )

    evaluated = [task for task in tasks if any(task in entry["curves"] for entries in summary.values() for entry in entries.values())]
    tasks = evaluated or list(tasks)
    colors = objective_colors(summary)
    rows = [(dataset, metric) for dataset in summary for metric in PLOT_METRICS]
    fig = Figure(figsize=(5.5 * len(tasks), 3.4 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), len(tasks), squeeze=False)
    for (dataset, metric), row in zip(rows, axes):
        for task, ax in zip(tasks, row):
            chance = None
            for objective, entry in summary[dataset].items():
                curve = entry["curves"].get(task, {}).get(metric)
                if curve is None:
                    continue
                color = colors[objective]
                # Seeds evaluated at different steps make n vary along the line; the label says so.
                low_n, high_n = min(curve["n"]), max(curve["n"])
                n = low_n if low_n == high_n else f"{low_n}-{high_n}"
                ax.plot(curve["steps"], curve["mean"], marker="o", markersize=3, color=color, label=f"{objective} (n={n})")
                if any(std is not None for std in curve["std"]):
                    low = [m - (s or 0.0) for m, s in zip(curve["mean"], curve["std"])]
                    high = [m + (s or 0.0) for m, s in zip(curve["mean"], curve["std"])]
                    ax.fill_between(curve["steps"], low, high, color=color, alpha=0.2, linewidth=0)
                chance_curve = entry["curves"].get(task, {}).get("rank_chance")
                if chance_curve is not None:
                    chance = chance_curve["mean"][-1]
            if metric == "rank_accuracy" and chance is not None:
                ax.axhline(chance, linestyle="--", color="gray", linewidth=1, label=f"chance ({chance:.3f})")
            ax.set_title(f"{dataset}: {task}")
            ax.set_xlabel("training step")
            ax.set_ylabel(PLOT_METRICS[metric])
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize="small")
            else:
                ax.text(0.5, 0.5, "not evaluated", ha="center", va="center", transform=ax.transAxes)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def write_comparison(comparison: dict, output_dir: str | os.PathLike) -> None:
    """Write `comparison.json`, `comparison.md` and (when there are finished runs) `comparison.png`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n", encoding="utf-8")
    lines = ["# Objective comparison", ""]
    if comparison.get("command"):
        lines += ["```", comparison["command"], "```", ""]
    missing = [run["name"] for run in comparison["runs"] if run["status"] == "missing"]
    if missing:
        lines += [f"Not finished (left out): {', '.join(missing)}.", ""]
    lines += [
        ("Final evaluation of each run, mean ± sample std over seeds (n = seeds). Exact match: Berglund et al.'s "
         "(stripped, lowercased greedy answer starts with the target). Contains: the BICO paper's looser metric, the target "
         "anywhere in the greedy answer (40 new tokens). Rank accuracy: the target has the highest "
         "log-probability among the file's distinct answers; rank chance: the same for a random ranking. "
         "log p: total log-probability in nats of the target and of another person's answer (`*_randomized` files)."),
        "",
        format_comparison(comparison["summary"]) if comparison["summary"] else "No finished runs.",
        "",
    ]
    if comparison["summary"]:
        lines += ["## By objective", "", format_ablation(comparison["summary"]), ""]
    if comparison["summary"]:
        plot_comparison(comparison["summary"], output_dir / "comparison.png")
        lines += ["![reverse tasks against training steps](comparison.png)", ""]
    (output_dir / "comparison.md").write_text("\n".join(lines), encoding="utf-8")
