"""The training mixes and evaluation sets of axiomatic training, as rows of premise, question and label.

Vashishtha et al., "Teaching Transformers Causal Reasoning through Axiomatic Training" (arXiv
2407.07612; DESIGN.md section 9). The paper's training files are not public, so the sets are rebuilt
from its rules; docs/axioms.md lists the choices made here and what differs from the public
evaluation files. The graphs and their text come from `bico.axioms.graphs`.

A row (`generate_train`, `generate_eval`, `read_jsonl`):
`{"premise": "EX causes T. T causes 9. 9 causes W.", "question": "Does EX cause 9?", "label": "Yes",
"set": "TS2", "num_nodes": 4, "nodes": ["EX", "T", "9", "W"], "edges": [["EX", "T"], ["T", "9"],
["9", "W"]], "query": ["EX", "9"], "seed": 0, "kind": "sequential", "num_edges": 3}`.
`edges` follow the premise's sentence order; `nodes` are in chain order (a topological order for
`branching`); `set` is the mix (`"custom"` for a dict) or the evaluation set; `seed` is the seed the
set was generated with. The model reads `instance_text(row)` and answers `label`.

Every set is deterministic in its seed (a `random.Random` per set, never the global one), and its
classes are balanced exactly: the answer of each row is chosen first, alternating, and then its
question drawn uniformly among the node pairs with that answer (`graphs.query_pairs`).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data import DataError, read_numbered_jsonl
from .graphs import ANSWERS, descendants, make_edges, premise_text, query_pairs, question_text, sample_names


CHAIN_KINDS = ("sequential", "flipped", "reversed")
# Weights of the chain kinds, from the reported sizes in thousands (sequential + flipped + reversed).
TRAIN_MIXES: dict[str, dict[str, float]] = {
    "TS1": {"sequential": 101 / 186, "flipped": 73 / 186, "reversed": 12 / 186},
    "TS2": {"sequential": 132 / 174, "flipped": 42 / 174},
    "OCC": {"sequential": 1.0},
}
PAPER_TRAIN_SIZE = 175_000


@dataclass(frozen=True)
class EvalSpec:
    """How one evaluation set is drawn.

    Args:
        kinds (`tuple[str, ...]`): Graph kinds of `graphs.GRAPH_KINDS`, in equal shares.
        node_counts (`tuple[int, ...]`): Graph sizes, in equal shares.
        name_lengths (`tuple[int, int]`, *optional*, defaults to `(1, 3)`): Node name length range.
        edges_per_node (`float`, *optional*): For `branching`: `int(edges_per_node * n)` edges on n nodes.
    """

    kinds: tuple[str, ...]
    node_counts: tuple[int, ...]
    name_lengths: tuple[int, int] = (1, 3)
    edges_per_node: float | None = None


EVAL_SPECS: dict[str, EvalSpec] = {
    "length-sequential": EvalSpec(("sequential",), tuple(range(7, 16))),
    "length-flipped": EvalSpec(("flipped",), tuple(range(7, 16))),
    # Both training structures, so that names are the one shift; `kind` tells them apart.
    "name-shift": EvalSpec(("sequential", "flipped"), tuple(range(3, 10)), name_lengths=(8, 10)),
    "reversed": EvalSpec(("reversed",), tuple(range(3, 7))),
    # The training sizes, so that sentence order is the one shift.
    "shuffled": EvalSpec(("shuffled",), tuple(range(3, 7))),
    "branching-1.4n": EvalSpec(("branching",), (5, 8, 10, 12), edges_per_node=1.4),
    "branching-2n": EvalSpec(("branching",), (5, 8, 10, 12), edges_per_node=2.0),
}
EVAL_SETS: tuple[str, ...] = tuple(EVAL_SPECS)
# The fields every row has, with their JSON types (`read_jsonl` checks them).
ROW_TYPES = {
    "premise": str, "question": str, "label": str, "set": str, "num_nodes": int,
    "nodes": list, "edges": list, "query": list, "seed": int,
}


def generate_train(
    mix: str | dict[str, float] = "TS2",
    num_instances: int = PAPER_TRAIN_SIZE,
    seed: int = 0,
    min_nodes: int = 3,
    max_nodes: int = 6,
    *,
    exclude: Iterable[dict | str] = (),
) -> list[dict]:
    """A training set: chains of `min_nodes`..`max_nodes` nodes with 1-3 character names, one question each.

    The chain kinds take shares of `num_instances` in proportion to the mix's weights, and within each
    kind the sizes take equal shares (rounded by largest remainder, so the counts are exact).

    Args:
        mix (`str` or `dict[str, float]`, *optional*, defaults to `"TS2"`): A name of `TRAIN_MIXES`
            (`"TS1"`, `"TS2"`, `"OCC"`), or weights over `"sequential"`, `"flipped"`, `"reversed"`, e.g.
            `{"sequential": 3, "flipped": 1}` (normalized; rows then have `set="custom"`).
        num_instances (`int`, *optional*, defaults to 175000, the paper's size): Number of rows.
        seed (`int`, *optional*, defaults to 0): The set's seed; the same arguments give the same rows.
        min_nodes, max_nodes (`int`, *optional*, defaults to 3 and 6): Chain sizes, inclusive (at least 2).
        exclude (`Iterable[dict | str]`, *optional*): Rows (or premises) no training premise may equal,
            e.g. the evaluation sets: a chain whose premise is among them is drawn again.

    Returns:
        `list[dict]`: `num_instances` rows in random order (see the module docstring), with
        `num_instances // 2` No rows, and as many Yes rows or one more.
    """
    weights, set_name = _resolve_mix(mix)
    _check_count("num_instances", num_instances)
    if not 2 <= min_nodes <= max_nodes:
        raise ValueError(
            f"`min_nodes` and `max_nodes` must satisfy 2 <= min_nodes <= max_nodes; got {min_nodes} and {max_nodes}."
        )
    excluded = {item if isinstance(item, str) else item["premise"] for item in exclude}
    rng = random.Random(f"train/{seed}")
    rows = []
    for (kind, num_nodes), label in _plan(rng, weights, range(min_nodes, max_nodes + 1), num_instances):
        while True:
            nodes = sample_names(rng, num_nodes)
            edges = make_edges(rng, kind, nodes)
            if premise_text(edges) not in excluded:
                break
        query = rng.choice(query_pairs(nodes, edges)[label])
        rows.append(_row(set_name, seed, kind, nodes, edges, query, label))
    return rows


def generate_eval(name: str, num_instances: int = 500, seed: int = 0) -> list[dict]:
    """An evaluation set of `EVAL_SETS`, drawn as `EVAL_SPECS[name]` says.

    Graph kinds and sizes take equal shares of the set, each with balanced classes. A `branching`
    graph gets one Yes and one No question (an odd `num_instances` drops the last graph's No).

    Args:
        name (`str`): One of `"length-sequential"`, `"length-flipped"`, `"name-shift"`, `"reversed"`,
            `"shuffled"`, `"branching-1.4n"`, `"branching-2n"`.
        num_instances (`int`, *optional*, defaults to 500, as the paper's files): Number of rows.
        seed (`int`, *optional*, defaults to 0): The set's seed; each set draws from its own stream,
            so sets with the same seed are independent.

    Returns:
        `list[dict]`: `num_instances` rows (see the module docstring), `num_instances // 2` of them No.
    """
    if name not in EVAL_SPECS:
        raise ValueError(f"`name` must be one of {', '.join(EVAL_SETS)}; got {name!r}.")
    _check_count("num_instances", num_instances)
    spec = EVAL_SPECS[name]
    kinds = dict.fromkeys(spec.kinds, 1.0)
    rng = random.Random(f"eval/{name}/{seed}")
    rows = []
    if spec.edges_per_node is None:
        for (kind, num_nodes), label in _plan(rng, kinds, spec.node_counts, num_instances):
            nodes = sample_names(rng, num_nodes, *spec.name_lengths)
            edges = make_edges(rng, kind, nodes)
            rows.append(_row(name, seed, kind, nodes, edges, rng.choice(query_pairs(nodes, edges)[label]), label))
        return rows
    for (kind, num_nodes), _ in _plan(rng, kinds, spec.node_counts, math.ceil(num_instances / 2)):
        nodes = sample_names(rng, num_nodes, *spec.name_lengths)
        edges = make_edges(rng, kind, nodes, num_edges=int(spec.edges_per_node * num_nodes))
        pairs = query_pairs(nodes, edges)
        rows.extend(_row(name, seed, kind, nodes, edges, rng.choice(pairs[label]), label) for label in ANSWERS)
    return rows[:num_instances]


def instance_text(row: dict) -> str:
    """The model's input, `premise + " " + question`, e.g. `"EX causes T. T causes 9. Does EX cause 9?"`."""
    return f"{row['premise']} {row['question']}"


def assert_disjoint(train_rows: Iterable[dict], eval_rows: Iterable[dict]) -> None:
    """Raise if a training premise is also an evaluation premise.

    Raises:
        `ValueError`: naming the first shared premise and its sets.
    """
    eval_sets = {row["premise"]: row["set"] for row in eval_rows}
    for row in train_rows:
        if row["premise"] in eval_sets:
            raise ValueError(
                f"the training premise {row['premise']!r} (set {row['set']}) is also in the evaluation set "
                f"{eval_sets[row['premise']]}; generate the training set with `exclude=` the evaluation rows."
            )


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write rows as JSONL, one object per line; creates the parent directory. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read and check a JSONL file of rows written by `write_jsonl`.

    Besides the fields and types of `ROW_TYPES`, each row must be consistent: `label` is `"Yes"` or
    `"No"`, `edges` and `query` are pairs of names in `nodes`, the premise and question are the text of
    `edges` and `query`, and the label is the truth of the question.

    Returns:
        `list[dict]`: One row per non-blank line, equal to the rows written.

    Raises:
        `DataError` (a `ValueError`): `path:line: what is wrong`, for the first bad line.
    """
    rows = []
    for line_number, row in read_numbered_jsonl(path, ROW_TYPES):
        problem = _row_problem(row)
        if problem:
            raise DataError(f"{path}:{line_number}: {problem}")
        rows.append(row)
    return rows


def _row_problem(row: dict) -> str | None:
    # What is wrong with a row whose fields have the right types, or None.
    nodes = row["nodes"]
    if row["label"] not in ANSWERS:
        return f"field `label` must be 'Yes' or 'No', got {row['label']!r}."
    if not all(isinstance(node, str) for node in nodes) or not len(set(nodes)) == len(nodes) == row["num_nodes"]:
        return f"field `nodes` must be {row['num_nodes']} (`num_nodes`) distinct names."
    for field, pairs in (("edges", row["edges"]), ("query", [row["query"]])):
        if not all(isinstance(pair, list) and len(pair) == 2 and all(name in nodes for name in pair) for pair in pairs):
            return f"field `{field}` must hold [cause, effect] pairs of names in `nodes`."
    if row["premise"] != premise_text(row["edges"]):
        return "field `premise` is not the text of `edges`."
    if row["question"] != question_text(row["query"]):
        return "field `question` is not the text of `query`."
    cause, effect = row["query"]
    truth = ANSWERS[0] if effect in descendants(nodes, row["edges"])[cause] else ANSWERS[1]
    if row["label"] != truth:
        return f"field `label` is {row['label']!r} but `edges` answer {truth!r}."
    return None


def _row(
    set_name: str, seed: int, kind: str, nodes: list[str], edges: list[list[str]], query: list[str], label: str
) -> dict:
    # Fresh lists: the two questions of a branching graph must not share them.
    nodes, edges, query = list(nodes), [list(edge) for edge in edges], list(query)
    return {
        "premise": premise_text(edges),
        "question": question_text(query),
        "label": label,
        "set": set_name,
        "num_nodes": len(nodes),
        "nodes": nodes,
        "edges": edges,
        "query": query,
        "seed": seed,
        "kind": kind,
        "num_edges": len(edges),
    }


def _plan(
    rng: random.Random, weights: dict[str, float], sizes: Sequence[int], total: int
) -> list[tuple[tuple[str, int], str]]:
    # `total` ((kind, num_nodes), answer) slots in random order. Kinds get shares of `total` in
    # proportion to `weights`, sizes equal shares of their kind's; answers alternate along the
    # slots, so each class has half (Yes one more when `total` is odd), each stratum to within one.
    strata = []
    for kind, kind_count in zip(weights, _apportion(list(weights.values()), total)):
        for num_nodes, count in zip(sizes, _apportion([1.0] * len(sizes), kind_count)):
            strata += [(kind, num_nodes)] * count
    slots = [(stratum, ANSWERS[i % 2]) for i, stratum in enumerate(strata)]
    rng.shuffle(slots)
    return slots


def _apportion(weights: list[float], total: int) -> list[int]:
    # Integer shares of `total` in proportion to `weights`: the largest remainders round up (the first on ties).
    exact = [total * weight / sum(weights) for weight in weights]
    counts = [math.floor(share) for share in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-round(exact[i] - counts[i], 9), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _resolve_mix(mix: str | dict[str, float]) -> tuple[dict[str, float], str]:
    # (weights summing to 1, the rows' `set`)
    if isinstance(mix, str):
        if mix not in TRAIN_MIXES:
            raise ValueError(
                f"`mix` must be one of {', '.join(TRAIN_MIXES)} or a dict of weights over "
                f"{', '.join(CHAIN_KINDS)}; got {mix!r}."
            )
        return TRAIN_MIXES[mix], mix
    unknown = sorted(set(mix) - set(CHAIN_KINDS))
    if unknown:
        raise ValueError(f"`mix` keys must be among {', '.join(CHAIN_KINDS)}; got {', '.join(map(repr, unknown))}.")
    values = list(mix.values())
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"`mix` weights must be finite, non-negative numbers with a positive sum; got {mix!r}.")
    return {kind: weight / sum(values) for kind, weight in mix.items()}, "custom"


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
